"""``fedaqt profile``: what one client round's memory goes to, across bit-widths, uplinks and algorithms (issue 4).

For every combination of ``--bits`` x ``--uplink-bits`` x ``--algorithm`` x ``--checkpointing`` one client round
runs in a fresh process (``multiprocessing`` spawn, so peaks never contaminate each other). The round is the real
client path: the float model's broadcast is encoded (``quant.encode_broadcast``), decoded into the native client
model, and :func:`fedaqt.client.app.handle_train` trains client 0 on round 1's batch and encodes the reply, with the
MemTracker profile on (:mod:`fedaqt.client.memory`). FedAvg combinations assume a server that accepts final codes.

Output: ``OUT/memory.csv`` (columns ``workload, bits, uplink_bits, algorithm, checkpointing, peak_mib``, one
``mem_<category>_mib`` per category (``wire``: message bytes), then ``ratio`` (peak / reference peak),
``train_peak_mib`` (training part only), ``saved_<dtype>_mib`` (saved for backward), ``rss_peak_mib``, ``upload_mib``,
``model_size``, ``batch_size``, ``num_parameters``, ``seconds``), ``OUT/memory.png`` (stacked bars per category)
and a table on the terminal. The reference row is the 32-bit, no-checkpointing row (float32 uplink and the first
algorithm preferred); when it was not requested the first row is the reference and the table says so.

``--bits 16`` profiles the float model in float16 (the dissertation's Table 3.2 float16 row); ``fedaqt run``
accepts only 32/8/4.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any, Optional, Sequence

import typer

from fedaqt.report.memory_table import add_ratios, rich_table, write_outputs

PROFILE_BITS = (32, 16, 8, 4)
PROFILE_UPLINK_BITS = (32, 16, 8, 4)


def _categories() -> list[str]:
    from fedaqt.client.memory import CATEGORIES

    return [f"mem_{c}_mib" for c in CATEGORIES]


def _parse_list(value: str, name: str, allowed: Sequence, convert, kind: str = "") -> list:
    """Comma-separated ``value`` -> distinct converted items in order; typer.BadParameter names ``name``."""
    out: list = []
    for part in str(value).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            v = convert(part)
        except ValueError:
            raise typer.BadParameter(f"{name}: {part!r} is not {kind}; allowed: {', '.join(map(str, allowed))}")
        if v not in allowed:
            shown = repr(v) if isinstance(v, str) else v
            raise typer.BadParameter(f"{name}: {shown} is not allowed; choose from {', '.join(map(str, allowed))}")
        if v not in out:
            out.append(v)
    if not out:
        raise typer.BadParameter(f"{name}: give at least one value")
    return out


def parse_int_list(value: str, name: str, allowed: Sequence[int]) -> list[int]:
    """``"32,8,4"`` -> ``[32, 8, 4]``. Raises typer.BadParameter naming ``name`` and the allowed values."""
    return _parse_list(value, name, allowed, int, "an integer")


def parse_str_list(value: str, name: str, allowed: Sequence[str]) -> list[str]:
    """``"fedsgd,FedAvg"`` -> ``["fedsgd", "fedavg"]`` (case-insensitive). Raises typer.BadParameter."""
    return _parse_list(value, name, allowed, str.lower)


def parse_onoff_list(value: str) -> list[bool]:
    vals = parse_str_list(value, "--checkpointing", ("on", "off", "true", "false", "1", "0"))
    out: list[bool] = []
    for v in vals:
        b = v in ("on", "true", "1")
        if b not in out:
            out.append(b)
    return out


# ------------------------------------------------------------------------------------------------ one combination
def profile_one(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one client round with the memory profile on; meant to run in a fresh process.

    Args:
        spec: ``{"config": RunConfig dict, "threads": int, "client_id": int, "round": int}``.

    Returns:
        One ``memory.csv`` row (without ``ratio``).

    Raises:
        RuntimeError: the client round failed (the client's error message).
    """
    import torch

    from fedaqt.client.app import handle_train
    from fedaqt.config import RunConfig
    from fedaqt.protocol import METRICS_KEY, SERVER_ROUND, encode_train, reply_error, train_config
    from fedaqt.quant.convert import quantized_weight_keys
    from fedaqt.quant.wire import encode_broadcast

    torch.set_num_threads(max(1, int(spec.get("threads", 1))))
    cfg = RunConfig.from_mapping(spec["config"], source="profile")
    from fedaqt.client.trainer import get_workload

    workload = get_workload(cfg)
    prepare = getattr(workload, "prepare", None)
    if prepare is not None:
        prepare()
    # the server's side of round 1: quantized broadcast of the initial float model
    float_model = workload.build_model()
    num_parameters = int(sum(p.numel() for p in float_model.parameters()))
    wire_bits = cfg.bits if cfg.bits in (8, 4) else 32
    qkeys: list[str] = []
    if wire_bits < 32:
        qkeys = list(quantized_weight_keys(float_model, workload.quantize_filter))
        qkeys += list(workload.broadcast_quantized_keys(float_model))
    state = {k: p.detach() for k, p in float_model.named_parameters()}
    state.update({k: b.detach() for k, b in float_model.named_buffers() if b.is_floating_point()})
    arrays, meta = encode_broadcast(state, qkeys, wire_bits, cfg.granularity)
    del state, float_model
    train_cfg = train_config(cfg.to_dict())
    train_cfg[SERVER_ROUND] = int(spec.get("round", 1))
    content = encode_train(arrays, meta, train_cfg, partition_id=int(spec.get("client_id", 0)), accept_final_codes=True)
    del arrays  # the client owns the received broadcast and frees it as it decodes
    reply = handle_train(content, profile=True, release_broadcast=True)
    error = reply_error(reply)
    if error is not None:
        raise RuntimeError(error)
    m = dict(reply.metric_records[METRICS_KEY])
    row: dict[str, Any] = {
        "workload": cfg.workload,
        "bits": cfg.bits,
        "uplink_bits": cfg.uplink_bits,
        "algorithm": cfg.algorithm,
        "checkpointing": "on" if cfg.checkpointing else "off",
        "peak_mib": float(m["peak_mib"]),
    }
    for c in _categories():
        row[c] = float(m[c])
    from fedaqt.client.memory import SAVED_GROUPS

    row["train_peak_mib"] = float(m["train_peak_mib"])
    for g in SAVED_GROUPS:
        row[f"saved_{g}_mib"] = float(m[f"saved_{g}_mib"])
    row.update({
        "rss_peak_mib": float(m["rss_peak_mib"]),
        "upload_mib": float(m["upload_bytes"]) / 2**20,
        "model_size": str(cfg.options.get("model_size", "")),
        "batch_size": cfg.batch_size,
        "num_parameters": num_parameters,
        "train_loss": float(m["train_loss"]),
        "seconds": float(m["seconds"]),
    })
    return row


def run_in_fresh_process(spec: dict[str, Any]) -> dict[str, Any]:
    """:func:`profile_one` in a new spawned process (one process per combination)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as ex:
        return ex.submit(profile_one, spec).result()


def profile_rows(
    combos: list[dict[str, Any]],
    base: dict[str, Any],
    threads: int = 1,
    progress: Any = None,
) -> list[dict[str, Any]]:
    """Profile each combination (a partial RunConfig dict merged over ``base``) in its own fresh process."""
    rows = []
    for i, combo in enumerate(combos):
        cfg = {**base, **combo}
        if progress is not None:
            progress(i, len(combos), cfg)
        rows.append(run_in_fresh_process({"config": cfg, "threads": threads, "client_id": 0, "round": 1}))
    return rows


def profile_command(
    workload: str = typer.Option("asr", help="workload name"),
    bits: str = typer.Option("32,16,8,4", help="client weight bit-widths, comma separated: 32, 16 (float16 model), 8, 4"),
    uplink_bits: str = typer.Option("32,8", "--uplink-bits", help="upload encodings, comma separated: 32, 16, 8, 4"),
    algorithm: str = typer.Option("fedsgd", help="client algorithms, comma separated (any registered: fedsgd, fedavg, ...)"),
    checkpointing: str = typer.Option("on", help="gradient checkpointing, comma separated: on, off"),
    batch_size: int = typer.Option(2, help="client batch size (the dissertation used 2)"),
    model_size: Optional[str] = typer.Option(None, help="workload option model_size (asr: tiny, small, large ~36.5M parameters; default large for a workload that has the option)"),
    local_steps: int = typer.Option(1, help="FedAvg local steps"),
    granularity: str = typer.Option("tensor", help="scale granularity: tensor or channel"),
    data_dir: Optional[str] = typer.Option(None, help="workload option data_dir: dataset directory (default: the workload's)"),
    seed: int = typer.Option(0, help="seed"),
    threads: int = typer.Option(1, help="torch threads per profiled round"),
    out: str = typer.Option("runs/profile", help="output directory for memory.csv and memory.png"),
    option: list[str] = typer.Option([], "--option", "-o", help="workload option KEY=VALUE (repeatable)"),
) -> None:
    """Profile one client round's memory per bit-width / uplink / algorithm / checkpointing (fresh process each)."""
    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # piped / captured: do not squeeze the table into 80 columns
        console = Console(width=200)
    try:
        bits_l = parse_int_list(bits, "--bits", PROFILE_BITS)
        up_l = parse_int_list(uplink_bits, "--uplink-bits", PROFILE_UPLINK_BITS)
        from fedaqt.plugins import algorithm_names

        alg_l = parse_str_list(algorithm, "--algorithm", algorithm_names())
        ck_l = parse_onoff_list(checkpointing)
    except typer.BadParameter as exc:
        console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(code=2)
    from fedaqt.config import ConfigError, RunConfig
    from fedaqt.plugins import workload_names

    options: dict[str, Any] = {}
    for item in option:
        if "=" not in item:
            console.print(f"[bold red]error:[/] --option {item!r} must be KEY=VALUE")
            raise typer.Exit(code=2)
        k, v = item.split("=", 1)
        try:
            options[k] = json.loads(v)
        except json.JSONDecodeError:
            options[k] = v
    try:
        from fedaqt.plugins import check_options, get_workload_class

        if workload in workload_names():
            declared = getattr(get_workload_class(workload), "Options", None)
            declared = set(getattr(declared, "model_fields", {}) or {})
            # --model-size / --data-dir are the workload's options; profiling defaults to the large model
            if model_size is None and "model_size" in declared and "model_size" not in options:
                model_size = "large"
        for key, value in (("model_size", model_size), ("data_dir", data_dir)):
            if value is not None:
                options.setdefault(key, value)
        base = RunConfig(workload=workload, batch_size=batch_size, local_steps=local_steps,
                         granularity=granularity, seed=seed, options=options, out=str(out))
        # every option checked by its owner's typed model (model_size, data_dir, ... by the workload's Options)
        from fedaqt.plugins import get_algorithm_class

        steps_of: dict[str, int] = {}
        for a in alg_l:  # each algorithm's own rules and options (FedSGD: one batch whatever --local-steps says)
            cls = get_algorithm_class(a)
            steps_of[a] = local_steps if cls.num_batches(base.override({"local_steps": local_steps})) > 1 else 1
            probe_cfg = base.override({"algorithm": a, "local_steps": steps_of[a]})
            probe_cfg.validate(known_workloads=workload_names())
            check_options(probe_cfg)
            cls.validate(probe_cfg)
        # through the workload itself (no per-workload special case): its data are present and its model builds
        # with these settings (e.g. ASR's model_size), here, before any process starts
        probe = get_workload_class(workload)(base)
        probe.prepare()
        probe.build_model()  # dropped at once; a bad workload setting raises here, naming it
        batch = probe.batch_label()  # "batch 2", or what the workload's batch is (few-shot: an episode)
        del probe
    except (ConfigError, FileNotFoundError, ValueError, KeyError) as exc:
        console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(code=2)
    combos = [
        {"bits": b, "uplink_bits": u, "algorithm": a, "checkpointing": c,
         "local_steps": steps_of[a]}
        for b, u, a, c in itertools.product(bits_l, up_l, alg_l, ck_l)
    ]
    model_size = str(options.get("model_size", "")) or "-"
    console.print(f"[bold]fedaqt profile[/] workload={workload} model_size={model_size} {batch}: "
                  f"{len(combos)} client rounds, each in a fresh process")

    def progress(i: int, n: int, cfg: dict) -> None:
        console.print(f"  [{i + 1}/{n}] bits={cfg['bits']} uplink={cfg['uplink_bits']} {cfg['algorithm']} "
                      f"checkpointing={'on' if cfg['checkpointing'] else 'off'}")

    try:
        rows = profile_rows(combos, base.to_dict(), threads=threads, progress=progress)
    except (RuntimeError, FileNotFoundError, ValueError) as exc:
        console.print(f"[bold red]error:[/] profiling failed: {exc}")
        raise typer.Exit(code=1)
    note = add_ratios(rows)
    csv_path, png_path = write_outputs(rows, Path(out), title=f"{workload} ({model_size}), {batch}")
    n_params = rows[0].get("num_parameters", 0)
    console.print(rich_table(rows, f"client memory per round: {workload} {model_size} ({count_label(n_params)} "
                                   f"parameters), {batch}"))
    console.print(note)
    console.print(f"wrote {csv_path} and {png_path}")


def count_label(n: int) -> str:
    """A parameter count for humans: ``"29,317"`` below 100k, else ``"0.3M"`` / ``"21.4M"``."""
    return f"{int(n):,}" if n < 100_000 else f"{n / 1e6:.1f}M"


if __name__ == "__main__":  # pragma: no cover
    typer.run(profile_command)
