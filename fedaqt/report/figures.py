"""Tables and figures of a run directory (pandas + matplotlib)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def load_rounds(run_dir: str | Path) -> pd.DataFrame:
    """``rounds.csv`` as a DataFrame. Raises FileNotFoundError naming the path when it is missing."""
    path = Path(run_dir) / "rounds.csv"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a fedaqt run directory (from `fedaqt run --out`)?")
    return pd.read_csv(path)


def metric_columns(rounds: pd.DataFrame) -> list[str]:
    """Evaluation columns present in the run: the workload's own ``eval_columns``, which rounds.csv holds between
    ``train_loss`` and ``bytes_down`` (:func:`fedaqt.report.rundir.round_columns`; e.g. ssl-meta's ``linear_acc``),
    plus any ``eval_*`` / ``real_*`` / ``overflow_rate`` column elsewhere; only columns with a value."""
    from fedaqt.report.rundir import ROUND_HEAD, ROUND_TAIL

    cols = list(rounds.columns)
    own: list[str] = []
    if all(c in cols for c in ROUND_HEAD) and ROUND_TAIL[0] in cols:
        own = cols[cols.index(ROUND_HEAD[-1]) + 1: cols.index(ROUND_TAIL[0])]
    prefs = ("eval_", "real_", "overflow_rate")
    named = [c for c in cols if c.startswith(prefs) and not c.startswith("overflow_rate_") and c not in own]
    return [c for c in own + named if rounds[c].notna().any()]


def plot_metrics(rounds: pd.DataFrame, out_path: str | Path, title: str = "") -> Path:
    """Save a figure with one panel per metric family (WER/CER, accuracy, loss) against the round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = metric_columns(rounds)
    families = {
        "error rate": [c for c in cols if c.endswith(("_wer", "_cer"))],
        "accuracy / overflow": [c for c in cols if "acc" in c and "ci95" not in c or c == "overflow_rate"],
        "loss": [c for c in ["train_loss", "eval_loss"] if c in rounds and rounds[c].notna().any()],
    }
    placed = {c for v in families.values() for c in v}
    families["other metrics"] = [c for c in cols if c not in placed and "ci95" not in c]
    families = {k: v for k, v in families.items() if v}
    fig, axes = plt.subplots(1, len(families), figsize=(5 * len(families), 3.6), squeeze=False)
    for ax, (label, columns) in zip(axes[0], families.items()):
        for c in columns:
            d = rounds[["round", c]].dropna()
            ax.plot(d["round"], d[c], marker="o" if len(d) < 30 else None, label=c)
        ax.set_xlabel("round")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_clock(rounds: pd.DataFrame, clients: pd.DataFrame, out_path: str | Path, title: str = "") -> Path:
    """Save the simulated-clock figure of a run with a device trace (:mod:`fedaqt.server.clock`): the first
    evaluation metric against simulated time (rounds.csv ``sim_time``, seconds), and per tier (clients.csv ``tier``;
    the client id in the per-client layout) the count of sampled clients by status (ok, straggler, ...).

    Raises:
        ValueError: rounds.csv has no ``sim_time`` column (the run had no device trace).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "sim_time" not in rounds:
        raise ValueError("rounds.csv has no sim_time column: the run had no device trace (-o device_trace=FILE)")
    cols = metric_columns(rounds) or [c for c in ("train_loss",) if c in rounds]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), squeeze=False)
    ax = axes[0][0]
    for c in cols[:2]:
        d = rounds[["sim_time", c]].dropna()
        ax.plot(d["sim_time"], d[c], marker="o" if len(d) < 30 else None, label=c)
    ax.set_xlabel("simulated time (s)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax = axes[0][1]
    key = clients["tier"].astype(object).fillna("").astype(str) if "tier" in clients else clients["client_id"].astype(str)
    key = key.where(key != "", clients["client_id"].astype(str))
    table = pd.crosstab(key, clients["status"])
    bottom = None
    for status in table.columns:
        ax.bar(table.index.astype(str), table[status], bottom=bottom, label=status)
        bottom = table[status] if bottom is None else bottom + table[status]
    ax.set_xlabel("tier")
    ax.set_ylabel("sampled clients (all rounds)")
    ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
