"""The tables and figure of ``fedaqt profile`` (``memory.csv``, ``memory.png``, the terminal table) from its rows.

Pure formatting: a row is one profiled client round, a dict with the id columns (:data:`ID_COLUMNS`), ``peak_mib``,
one ``mem_<category>_mib`` per memory category (in the order the profiler recorded them), and the other metrics
(``train_peak_mib``, ``saved_<dtype>_mib``, ``rss_peak_mib``, ``upload_mib``, ...). The harness that produces the
rows (fresh processes, the real client round) is :mod:`fedaqt.launch.profile`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

ID_COLUMNS = ["workload", "bits", "uplink_bits", "algorithm", "checkpointing"]


def category_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The ``mem_<category>_mib`` columns of ``rows`` (those of the first row, in its order)."""
    return [c for c in rows[0] if c.startswith("mem_") and c.endswith("_mib")] if rows else []


def reference_index(rows: list[dict[str, Any]]) -> tuple[int, str]:
    """Index of the reference row and a note: the 32-bit no-checkpointing row (float32 uplink and the first
    algorithm preferred), else the first row."""
    cands = [i for i, r in enumerate(rows) if r["bits"] == 32 and r["checkpointing"] == "off"]
    if cands:
        cands.sort(key=lambda i: (rows[i]["uplink_bits"] != 32, rows[i]["algorithm"] != rows[0]["algorithm"], i))
        r = rows[cands[0]]
        return cands[0], (f"reference: 32-bit, no checkpointing, uplink {r['uplink_bits']}, {r['algorithm']} "
                          f"({r['peak_mib']:.1f} MiB)")
    r = rows[0]
    return 0, (f"the 32-bit no-checkpointing row was not requested; reference is the first row (bits {r['bits']}, "
               f"uplink {r['uplink_bits']}, {r['algorithm']}, checkpointing {r['checkpointing']}, "
               f"{r['peak_mib']:.1f} MiB)")


def limit_ratio(bits: int, uplink_bits: int) -> float:
    """The physical-limit estimate of a FedSGD client's peak relative to the float32 / float32-upload client,
    ``(b_w + b_up) / 64`` (issue 17): the least a client holds is its weights at ``b_w`` bits per parameter and its
    encoded upload at ``b_up`` bits, against 32 + 32 for float32 weights and a float32 gradient (activations,
    scales, float parameters and message overheads excluded)."""
    return (int(bits) + int(uplink_bits)) / 64.0


def add_ratios(rows: list[dict[str, Any]]) -> str:
    """Set ``ratio`` = peak / reference peak and ``limit_ratio`` = :func:`limit_ratio` on every row; returns the
    reference note."""
    i, note = reference_index(rows)
    ref = rows[i]["peak_mib"]
    for r in rows:
        r["ratio"] = r["peak_mib"] / ref if ref > 0 else float("nan")
        r["limit_ratio"] = limit_ratio(r["bits"], r["uplink_bits"])
    return note


def dominant(row: dict[str, Any], k: int = 2) -> str:
    """The ``k`` largest categories of a row with their share of the peak, e.g. ``buffers 45%, grads 44%``."""
    cats = sorted(((row[c], c[4:-4]) for c in category_columns([row])), reverse=True)[:k]
    peak = row["peak_mib"] or 1.0
    return ", ".join(f"{name} {100 * v / peak:.0f}%" for v, name in cats if v > 0)


def row_label(r: dict[str, Any]) -> str:
    return f"{r['bits']}b/up{r['uplink_bits']}/{r['algorithm']}/ckpt-{r['checkpointing']}"


def write_outputs(rows: list[dict[str, Any]], out: Path, title: str = "") -> tuple[Path, Path]:
    """Write ``memory.csv`` and ``memory.png`` (stacked bars per category) into ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    cats = category_columns(rows)
    lead = ID_COLUMNS + ["peak_mib"] + cats + ["ratio"] + (["limit_ratio"] if "limit_ratio" in rows[0] else [])
    df = pd.DataFrame(rows)
    df = df[lead + [c for c in df.columns if c not in lead]]
    csv_path = out / "memory.csv"
    df.to_csv(csv_path, index=False)

    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows) + 2), 4.8))
    bottom = [0.0] * len(rows)
    colors = plt.get_cmap("tab10").colors
    x = list(range(len(rows)))
    for j, c in enumerate(cats):
        vals = [float(r[c]) for r in rows]
        if not any(vals):
            continue
        ax.bar(x, vals, bottom=bottom, label=c[4:-4], color=colors[j % len(colors)])
        bottom = [b + v for b, v in zip(bottom, vals)]
    for i, r in enumerate(rows):
        ax.text(i, bottom[i], f"{r['peak_mib']:.0f}\n{r['ratio']:.2f}x", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x)
    ax.set_xticklabels([row_label(r) for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("peak tracked memory (MiB)")
    ax.set_title(title or "client memory per round (MemTracker peak)")
    ax.set_ylim(0, max(bottom) * 1.2 if bottom and max(bottom) > 0 else 1)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    png_path = out / "memory.png"
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return csv_path, png_path


def rich_table(rows: list[dict[str, Any]], title: str) -> Any:
    """The terminal table: one row per profiled round; ``ratio`` (peak / reference) next to ``limit``, the
    physical-limit estimate ``(b_w + b_up) / 64`` (:func:`limit_ratio`)."""
    from rich.table import Table

    t = Table(title=title)
    cats = category_columns(rows)
    for c in ["bits", "uplink", "algorithm", "ckpt", "peak MiB", "ratio", "limit", "train MiB"] + \
            [c[4:-4] for c in cats] + ["saved f32/i8", "RSS MiB", "upload MiB", "dominant"]:
        t.add_column(c, justify="left" if c in ("algorithm", "dominant") else "right")
    for r in rows:
        saved = f"{r.get('saved_float32_mib', 0.0):.1f}/{r.get('saved_int8_mib', 0.0):.1f}"
        t.add_row(str(r["bits"]), str(r["uplink_bits"]), r["algorithm"], r["checkpointing"], f"{r['peak_mib']:.1f}",
                  f"{r['ratio']:.3f}", f"{r.get('limit_ratio', limit_ratio(r['bits'], r['uplink_bits'])):.3f}",
                  f"{r.get('train_peak_mib', r['peak_mib']):.1f}",
                  *[f"{r[c]:.1f}" for c in cats], saved, f"{r['rss_peak_mib']:.0f}",
                  f"{r['upload_mib']:.1f}", dominant(r))
    return t
