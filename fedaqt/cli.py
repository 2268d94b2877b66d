"""fedaqt command line (typer): run, report, data, plugins."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Federated quantized training simulation (Flower + Ray).")
data_app = typer.Typer(no_args_is_help=True, help="Build or inspect datasets.")
plugins_app = typer.Typer(no_args_is_help=True, help="Registered workloads, strategies and client algorithms, and their options.")
app.add_typer(data_app, name="data")
app.add_typer(plugins_app, name="plugins")
console = Console()


#: ``fedaqt run`` flags that set a workload option of the same name (they were RunConfig fields before)
OPTION_SHORTCUTS = ("data_dir", "model_size", "real_eval", "real_eval_max", "partition", "alpha")
#: flags that set a core option of the same name (fedaqt.options.CoreOptions)
CORE_SHORTCUTS = ("device_trace", "deadline_s", "secagg")


def _fail(msg: str) -> None:
    console.print(f"[bold red]error:[/] {msg}")
    raise typer.Exit(code=2)


@app.command()
def run(
    preset: Optional[str] = typer.Option(None, help="named configuration shipped with fedaqt (see `fedaqt plugins list`)"),
    config: Optional[str] = typer.Option(None, "--config", help="TOML or JSON config file (a run's config.json repeats it)"),
    workload: Optional[str] = typer.Option(None, help="workload name (default asr)"),
    strategy: Optional[str] = typer.Option(None, help="fedsgd, fedavg, relay, fedprox, fedavgm, fedadam, fedyogi or a plugin"),
    bits: Optional[int] = typer.Option(None, help="broadcast weight bit-width: 32, 8 or 4"),
    granularity: Optional[str] = typer.Option(None, help="scale granularity: tensor or channel"),
    algorithm: Optional[str] = typer.Option(None, help="client algorithm: fedsgd, fedavg or a plugin's (fedaqt plugins list)"),
    uplink_bits: Optional[int] = typer.Option(None, help="upload encoding: 32 (float32), 16 (float16), 8 (int8 SR), 4 (int4 SR, packed)"),
    num_clients: Optional[int] = typer.Option(None, help="number of clients (data partitions)"),
    clients_per_round: Optional[int] = typer.Option(None, help="clients sampled per round"),
    rounds: Optional[int] = typer.Option(None, help="number of rounds"),
    local_steps: Optional[int] = typer.Option(None, help="local SGD steps per round (fedavg)"),
    batch_size: Optional[int] = typer.Option(None, help="client batch size"),
    lr: Optional[float] = typer.Option(None, help="client learning rate (fedavg)"),
    server_lr: Optional[float] = typer.Option(None, help="server learning rate"),
    server_momentum: Optional[float] = typer.Option(None, help="server SGD momentum"),
    seed: Optional[int] = typer.Option(None, help="the one seed all randomness derives from"),
    out: Optional[str] = typer.Option(None, help="run directory"),
    checkpointing: Optional[bool] = typer.Option(None, "--checkpointing/--no-checkpointing", help="gradient checkpointing of encoder blocks"),
    num_cpus: Optional[int] = typer.Option(None, help="CPU cores given to Ray"),
    client_num_cpus: Optional[float] = typer.Option(None, help="CPU cores per simulated client"),
    eval_every: Optional[int] = typer.Option(None, help="evaluate every N rounds and the first and last (0 = the workload default: asr 25, fewshot 10, ssl-meta 5, others 1)"),
    data_dir: Optional[str] = typer.Option(None, help="workload option data_dir: dataset directory (LibriSpeech layout for asr)"),
    model_size: Optional[str] = typer.Option(None, help="workload option model_size (asr): tiny, small, large"),
    real_eval: Optional[bool] = typer.Option(None, "--real-eval/--no-real-eval", help="workload option real_eval (asr): also evaluate on real recorded speech"),
    real_eval_max: Optional[int] = typer.Option(None, help="workload option real_eval_max (asr): at most this many real-speech utterances"),
    partition: Optional[str] = typer.Option(None, help="workload option partition: speaker (asr), iid or dirichlet (wrapnet)"),
    alpha: Optional[float] = typer.Option(None, help="workload option alpha: Dirichlet concentration for partition dirichlet"),
    ray_address: Optional[str] = typer.Option(None, help="attach to an existing Ray cluster (e.g. 127.0.0.1:6379)"),
    device_profile: Optional[str] = typer.Option(None, help="CSV of per-client memory budgets"),
    device_trace: Optional[str] = typer.Option(None, help="core option device_trace: device trace CSV (simulated clock, availability)"),
    deadline_s: Optional[float] = typer.Option(None, help="core option deadline_s: simulated round deadline in seconds (needs --device-trace)"),
    secagg: Optional[bool] = typer.Option(None, "--secagg/--no-secagg", help="core option secagg: Flower's SecAgg+ secure aggregation (FedSGD, --uplink-bits 32 or 8)"),
    option: list[str] = typer.Option([], "--option", "-o", help="option KEY=VALUE (repeatable) of the core (round_timeout, max_nonfinite_rounds, profile_memory), the workload, strategy or algorithm: `fedaqt plugins show NAME`"),
    resume: Optional[str] = typer.Option(None, "--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last complete round (its config.json; only --num-cpus, --client-num-cpus, --ray-address may change)"),
    from_scratch: bool = typer.Option(False, "--from-scratch", help="asr: start from random weights even when `fedaqt pretrain` wrote runs/pretrained/pretrained.pt"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="show Flower/Ray logs"),
) -> None:
    """Run a federated simulation and write the run directory."""
    from fedaqt.config import ConfigError, explicit_keys, resolve_config, resolve_resume_config
    from fedaqt.launch.runner import run_experiment

    cli = {k: v for k, v in locals().items() if k not in ("preset", "config", "option", "resume", "verbose", "resolve_config", "resolve_resume_config", "run_experiment", "ConfigError", "from_scratch", "explicit_keys")}
    # --data-dir, --model-size, ... are shortcuts for workload options (-o wins when both are given)
    shortcuts = {k: cli.pop(k) for k in OPTION_SHORTCUTS + CORE_SHORTCUTS if cli.get(k) is not None}
    for k in OPTION_SHORTCUTS + CORE_SHORTCUTS:
        cli.pop(k, None)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        opts: dict = dict(shortcuts)
        for item in option:
            if "=" not in item:
                raise ConfigError(f"--option {item!r} must be KEY=VALUE")
            k, v = item.split("=", 1)
            opts[k] = _parse_value(v)
        if resume:
            if preset or config:
                raise ConfigError("--resume RUN_DIR takes the configuration from RUN_DIR/config.json; drop --preset/--config")
            if opts:
                cli["options"] = {**resolve_resume_config(resume, {}).options, **opts}
            cfg = resolve_resume_config(resume, cli)
        else:
            cfg = resolve_config(preset, config, cli)
            if opts:
                cfg = cfg.override({"options": {**cfg.options, **opts}}, source="--option")
        if not resume and not from_scratch:
            cfg = _with_pretrained(cfg, explicit_keys(preset, config, {**cli, "options": opts}))
    except ConfigError as exc:
        _fail(str(exc))
    from fedaqt.launch.runner import preflight

    try:
        preflight(cfg)  # every check before the header and progress bar: bad input fails cleanly, nothing touched
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    console.print(f"[bold]fedaqt run[/] {'(resume) ' if resume else ''}workload={cfg.workload} strategy={cfg.strategy} bits={cfg.bits} "
                  f"algorithm={cfg.algorithm} clients={cfg.clients_per_round}/{cfg.num_clients} rounds={cfg.rounds} -> {cfg.out}")
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from fedaqt.plugins import get_workload_class

    # the workload's first metrics (ASR: loss/WER/CER; fewshot: 1-/5-shot accuracy; ssl-meta: linear_acc ...)
    metric_names = [c for c in get_workload_class(cfg.workload).eval_columns if "ci95" not in c][:3]
    with Progress(
        TextColumn("[bold blue]round"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"), console=console, transient=False,
    ) as bar:
        task = bar.add_task("rounds", total=cfg.rounds, info="starting Ray...")

        def progress(rnd: int, row: dict) -> None:
            shown = {k: row[k] for k in ("train_loss", *metric_names) if k in row}
            bar.update(task, completed=rnd, info=" ".join(f"{k}={v:.3f}" for k, v in shown.items()))

        try:
            summary = run_experiment(cfg, progress=progress, resume=bool(resume), preflight_done=True)  # checked above
        except (ConfigError, FileNotFoundError, ValueError) as exc:
            _fail(str(exc))
        except RuntimeError:  # the run stopped: run_experiment printed one line with the cause and --resume
            raise typer.Exit(code=1) from None
    _print_summary(summary, cfg.out)
    if summary.get("rounds_completed", 0) and not summary.get("client_status_counts", {}).get("ok"):
        counts = ", ".join(f"{k}: {v}" for k, v in summary.get("client_status_counts", {}).items())
        console.print(f"[bold red]error:[/] no client update was accepted in any round ({counts}); the global model "
                      f"is the initial one. See the error column of {cfg.out}/clients.csv")
        raise typer.Exit(code=1)


def _with_pretrained(cfg, explicit: tuple[set[str], set[str]] = (set(), set())):
    """asr without options.init_checkpoint: start from the `fedaqt pretrain` checkpoint when one matches the corpus.

    Its clients then use the training speakers the pretraining did not see (speaker_offset = its speakers);
    num_clients / clients_per_round shrink to the speakers left, with a message; the fine-tuning recipe
    (fedaqt.workloads.asr_pretrain.finetune_defaults) fills the keys not in ``explicit`` (run keys, option keys set
    by the preset, file or command line). Otherwise cfg is unchanged.
    """
    if cfg.workload != "asr" or cfg.options.get("init_checkpoint"):
        return cfg
    from fedaqt.workloads.asr_pretrain import CHECKPOINT_NAME, DEFAULT_DIR, PretrainRecipe, load_metrics, recipe_key

    meta = load_metrics(DEFAULT_DIR)
    data_dir = cfg.options.get("data_dir", "data/speech")
    if meta is None:
        console.print(f"[yellow]no pretrained checkpoint in {DEFAULT_DIR}: training from random weights "
                      "(build one with `fedaqt pretrain`; --from-scratch silences this)[/]")
        return cfg
    try:  # pretrained.json is a file on disk: a foreign or damaged recipe means "no usable checkpoint", never a crash
        recipe = PretrainRecipe(**meta["recipe"])
    except (KeyError, TypeError) as exc:
        console.print(f"[yellow]{DEFAULT_DIR}/pretrained.json has no usable recipe ({exc}): training from random "
                      "weights (rerun `fedaqt pretrain --force`)[/]")
        return cfg
    if Path(recipe.data_dir).resolve() != Path(data_dir).resolve():
        return cfg  # pretrained on another corpus (e.g. --data-dir LibriSpeech): keep the run as asked
    model_size = cfg.options.get("model_size", "tiny")
    if recipe.model_size != model_size:
        console.print(f"[yellow]{DEFAULT_DIR}/pretrained.pt is a {recipe.model_size} model, this run asks for "
                      f"model_size={model_size}: training from random weights[/]")
        return cfg
    if recipe_key(recipe) != meta.get("key"):
        console.print(f"[yellow]{DEFAULT_DIR}/pretrained.pt does not match the corpus in {data_dir} any more: training "
                      "from random weights (rerun `fedaqt pretrain`)[/]")
        return cfg
    from fedaqt.workloads.asr import ASRWorkload

    n_spk = len(ASRWorkload(cfg).speakers) - recipe.speakers
    meta["checkpoint"] = str(Path(DEFAULT_DIR) / CHECKPOINT_NAME)  # where it is now (the JSON says where it was written)
    from fedaqt.workloads.asr_pretrain import finetune_defaults

    recipe_values = finetune_defaults(*explicit)
    values: dict = {**recipe_values, "options": {**cfg.options, **recipe_values["options"],
                                                 "init_checkpoint": meta["checkpoint"], "speaker_offset": recipe.speakers}}
    if cfg.num_clients > n_spk:
        values["num_clients"] = n_spk
        values["clients_per_round"] = min(cfg.clients_per_round, n_spk)
    ev = meta.get("eval", {})
    console.print(f"starting from the pretrained checkpoint {meta['checkpoint']} (held-out WER {ev.get('eval_wer', float('nan')):.3f}); "
                  f"clients: training speakers {recipe.speakers}.. ({min(cfg.num_clients, n_spk)} clients); --from-scratch for random weights")
    shown = {k: v for k, v in recipe_values.items() if k != "options"} | recipe_values["options"]
    if shown:
        console.print("fine-tuning recipe (keys you did not set): " + " ".join(f"{k}={v}" for k, v in shown.items()))
    return cfg.override(values, source="pretrained checkpoint")


def _cell(v) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return ""
    if isinstance(v, float):
        return f"{int(v)}" if v.is_integer() and abs(v) >= 1 else f"{v:.3g}"
    return str(v)


def _parse_value(v: str):
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


def _print_summary(summary: dict, out: str) -> None:
    table = Table(title=f"run summary ({out})")
    table.add_column("key")
    table.add_column("value")
    init = (summary.get("config") or {}).get("options", {}).get("init_checkpoint")
    if init:  # before FL: the starting checkpoint and its evaluation (`fedaqt pretrain` wrote it next to it)
        table.add_row("pretrained_checkpoint", str(init))
        for k, v in _pretrained_eval(init).items():
            table.add_row(f"pretrained_{k}", f"{v:.4g}" if isinstance(v, float) else repr(v))
    for k, v in summary.items():
        if k in ("config", "workload"):
            continue
        table.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
    console.print(table)


def _pretrained_eval(init: str) -> dict:
    """The evaluation stored next to a `fedaqt pretrain` checkpoint (``pretrained.json``), {} when absent.

    A file on disk: a damaged one is reported as empty, never a crash."""
    meta_path = Path(init).with_suffix(".json")
    try:
        ev = json.loads(meta_path.read_text()).get("eval", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return ev if isinstance(ev, dict) else {}


@app.command()
def report(run_dir: str = typer.Argument(..., help="a run directory written by `fedaqt run`")) -> None:
    """Print the per-round table of a run and save figures/metrics.png."""
    from fedaqt.report.figures import load_rounds, metric_columns, plot_metrics

    try:
        rounds = load_rounds(run_dir)
    except FileNotFoundError as exc:
        _fail(str(exc))
    metrics = metric_columns(rounds)
    extra = [c for c in ("relay_norm_ratio", "clients_ok", "seconds") if c in rounds]
    # evaluated rounds (and the last one) keep the table short; every round stays in rounds.csv
    shown = rounds[rounds[metrics].notna().any(axis=1) | (rounds["round"] == rounds["round"].max())] if metrics else rounds
    table = Table(title=f"{run_dir}/rounds.csv ({len(shown)} of {len(rounds)} rounds: the evaluated ones)")
    cols = ["round", "train_loss"] + metrics + ["MiB_down", "MiB_up"] + extra
    for c in cols:
        table.add_column(c, justify="right")
    for _, r in shown.iterrows():
        vals = {**r.to_dict(), "MiB_down": r.get("bytes_down", float("nan")) / 2**20, "MiB_up": r.get("bytes_up", float("nan")) / 2**20}
        table.add_row(*[_cell(vals.get(c)) for c in cols])
    Console(width=max(console.width, 130)).print(table)  # wide enough not to elide numbers in pipes
    cfg_path = Path(run_dir) / "config.json"
    init = json.loads(cfg_path.read_text()).get("options", {}).get("init_checkpoint") if cfg_path.exists() else None
    if init and Path(init).with_suffix(".json").exists():  # before FL: the pretrained model's evaluation
        # pretrained.json is a file on disk: a non-numeric or missing value is shown as such, never crashes the report
        shown = _pretrained_eval(init).items()
        console.print(f"before FL (pretrained {init}): " + " ".join(
            f"{k}={v:.3f}" if isinstance(v, (int, float)) else f"{k}={v!r}" for k, v in shown))
    fig = plot_metrics(rounds, Path(run_dir) / "figures" / "metrics.png", title=str(run_dir))
    console.print(f"figure: {fig}")
    if "sim_time" in rounds and (Path(run_dir) / "clients.csv").exists():
        import pandas as pd

        from fedaqt.report.figures import plot_clock

        clock = plot_clock(rounds, pd.read_csv(Path(run_dir) / "clients.csv"), Path(run_dir) / "figures" / "clock.png",
                           title=str(run_dir))
        console.print(f"figure: {clock}")


class _PretrainDefaults:  # the recipe's defaults without importing torch at CLI start-up
    speakers, steps, batch_size, lr = 48, 1500, 16, 3e-3


_PRETRAIN = _PretrainDefaults


@app.command()
def pretrain(
    data_dir: str = typer.Option("data/speech", help="speech corpus (LibriSpeech layout)"),
    speakers: int = typer.Option(_PRETRAIN.speakers, help="pretrain on the first N sorted training speakers (the phone "
                                 "corpus' 16 kHz pretraining speakers); clients get the rest"),
    steps: int = typer.Option(_PRETRAIN.steps, help="AdamW steps"),
    batch_size: int = typer.Option(_PRETRAIN.batch_size, help="utterances per step"),
    lr: float = typer.Option(_PRETRAIN.lr, help="peak AdamW learning rate (warm-up, then cosine decay)"),
    seed: int = typer.Option(0, help="seed of the initial weights and the batches"),
    model_size: str = typer.Option("tiny", help="Conformer size preset"),
    out: str = typer.Option("runs/pretrained", help="checkpoint directory (`fedaqt run` loads runs/pretrained)"),
    force: bool = typer.Option(False, "--force", help="retrain even when a matching checkpoint exists"),
) -> None:
    """Central pretraining of the float Conformer (asr); cached: skipped when the checkpoint matches recipe + corpus."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from fedaqt.workloads.asr_pretrain import PretrainRecipe
    from fedaqt.workloads.asr_pretrain import pretrain as do_pretrain

    recipe = PretrainRecipe(data_dir=data_dir, speakers=speakers, steps=steps, batch_size=batch_size, lr=lr,
                            seed=seed, model_size=model_size)
    with Progress(TextColumn("[bold blue]pretrain"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=console) as bar:
        task = bar.add_task("steps", total=steps, info="")
        try:
            meta = do_pretrain(recipe, out, force=force,
                               progress=lambda s, loss: bar.update(task, completed=s, info=f"loss={loss:.3f}"))
        except (ValueError, FileNotFoundError) as exc:
            _fail(str(exc))
    ev = meta.get("eval", {})
    console.print(f"{'reused' if meta['reused'] else 'wrote'} {meta['checkpoint']}: "
                  + " ".join(f"{k}={v:.3f}" for k, v in ev.items()) + f" (training {meta['seconds']:.0f} s)")


@data_app.command("speech")
def data_speech(
    out: str = typer.Option("data/speech", help="output directory (LibriSpeech layout)"),
    num_train_speakers: int = typer.Option(32, help="federated client speakers (one per client)"),
    num_eval_speakers: int = typer.Option(8, help="held-out evaluation speakers"),
    utterances_per_speaker: int = typer.Option(64, help="utterances per client speaker (issue 11: 64 gives each "
                                                "federated client enough caller speech for 200 FedSGD rounds)"),
    seed: int = typer.Option(0, help="seed for voices, lines and variation"),
    domain: str = typer.Option("phone", help="text domain: phone (phone-menu sentences like the real Asterisk "
                               "prompts) or shakespeare (play roles)"),
    num_pretrain_speakers: int = typer.Option(48, help="phone domain: 16 kHz speakers for central pretraining "
                                              "(first in train/; `fedaqt pretrain --speakers` uses them)"),
    pretrain_utterances: int = typer.Option(80, help="phone domain: utterances per pretraining speaker"),
    eval_utterances: int = typer.Option(8, help="utterances per held-out evaluation speaker"),
    text_shift: bool = typer.Option(True, help="phone domain: pretraining speakers read system prompts, clients and "
                                    "held-out speakers callers' digits/spelling/times (the default: a text domain "
                                    "federated rounds must teach); --no-text-shift gives every group one mix"),
) -> None:
    """Build the default speech corpus (phone-menu sentences, or Shakespeare roles) read by flite / espeak-ng."""
    from fedaqt.data.corpus import build_speech_corpus

    try:
        info = build_speech_corpus(out, num_train_speakers=num_train_speakers, num_eval_speakers=num_eval_speakers,
                                   utterances_per_speaker=utterances_per_speaker, seed=seed, domain=domain,
                                   num_pretrain_speakers=num_pretrain_speakers if domain == "phone" else 0,
                                   pretrain_utterances_per_speaker=pretrain_utterances,
                                   eval_utterances_per_speaker=eval_utterances, text_shift=text_shift)
    except (RuntimeError, ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    console.print_json(json.dumps(info, default=str))


@data_app.command("glyphs")
def data_glyphs(
    out: str = typer.Option("data/glyphs", help="output directory (glyphs.npz + manifest.json)"),
    instances: int = typer.Option(20, help="images per class (font x distortion)"),
    max_classes_per_script: int = typer.Option(40, help="at most this many characters per script"),
    seed: int = typer.Option(0, help="seed for the class choice, script split and distortions"),
    font_dir: str = typer.Option("/usr/share/fonts/truetype/noto", help="directory of .ttf fonts (fonts-noto-core)"),
) -> None:
    """Build the Omniglot-like glyph set (one class per character, splits by script) for few-shot learning."""
    from rich.progress import Progress

    from fedaqt.data.glyphs import build_glyphs

    try:
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task("rendering glyph classes", total=None)
            info = build_glyphs(out, font_dir=font_dir, instances=instances,
                                max_classes_per_script=max_classes_per_script, seed=seed,
                                progress=lambda i, n: bar.update(task, completed=i, total=n))
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    console.print_json(json.dumps(info, default=str))


@plugins_app.command("list")
def plugins_list() -> None:
    """List workloads and strategies: name, kind, source package, description."""
    from fedaqt.config import list_presets
    from fedaqt.plugins import list_plugins

    table = Table(title="fedaqt plugins")
    for c in ("name", "kind", "source", "description"):
        table.add_column(c)
    for p in list_plugins():
        table.add_row(p.name, p.kind, p.source, p.description)
    for name in list_presets():
        table.add_row(name, "preset", "fedaqt", "named configuration (--preset)")
    console.print(table)


@plugins_app.command("show")
def plugins_show(name: str = typer.Argument(..., help="a workload, strategy or client algorithm name, or 'core'")) -> None:
    """Show a plugin's kind, source package, description and its options (key, type, default, allowed, help).

    A name registered as several kinds (fedavg is a strategy and a client algorithm) shows each. ``core`` shows
    the options every run has. An unknown name exits with code 2 and lists the known names.
    """
    from fedaqt.options import CoreOptions, describe_options
    from fedaqt.plugins import PluginLoadError, plugin_entries

    try:
        entries = plugin_entries(name)
    except PluginLoadError as exc:
        _fail(str(exc))
    if name == "core":
        entries = [("core", "fedaqt", "options of fedaqt's server and clients, whatever the plugins", CoreOptions), *entries]
    if not entries:
        from fedaqt.config import list_presets, preset_path

        if name in list_presets():  # a preset is a named configuration: show its file
            console.print(f"[bold]{name}[/] (preset, from fedaqt): {preset_path(name)}")
            console.print(preset_path(name).read_text(), markup=False, highlight=False)
            return
        from fedaqt.plugins import known_plugin_names

        _fail(f"unknown plugin {name!r}; known names: core, {', '.join(known_plugin_names())}")
    for kind, source, description, model in entries:
        console.print(f"[bold]{name}[/] ({kind}, from {source}): {description}")
        rows = describe_options(model)
        if not rows:
            console.print("  options: (none)\n")
            continue
        table = Table(title=f"{kind if kind == name else f'{kind} {name}'}: -o KEY=VALUE")
        for c in ("key", "type", "default", "allowed", "help"):
            table.add_column(c, overflow="fold")
        for r in rows:
            table.add_row(r.key, r.type, json.dumps(r.default, default=str), r.allowed, r.help)
        Console(width=max(console.width, 160)).print(table)


from fedaqt.launch.profile import profile_command  # noqa: E402  (kept light: imports lazily inside)

app.command("profile")(profile_command)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
