"""The run directory: everything a user needs after a run, readable with pandas.

Files: ``config.json`` (resolved RunConfig), ``rounds.csv`` (one row per round), ``clients.csv`` (one row per
sampled client per round), ``summary.json``, ``checkpoint.pt`` (latest complete round), ``figures/``.
CSV rows are appended and flushed every round, so a killed run keeps every completed round.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

#: columns written first in rounds.csv (more follow, e.g. workload metrics and strategy statistics)
ROUND_COLUMNS = [
    "round", "train_loss", "eval_loss", "eval_wer", "eval_cer", "real_wer", "real_cer",
    "bytes_down", "bytes_up", "clients_ok", "clients_sampled", "seconds",
]
CLIENT_COLUMNS = ["round", "client_id", "node_id", "status", "num_examples", "train_loss", "seconds", "bytes_up", "error"]


class CsvLog:
    """Append-only CSV whose header is fixed by the first row (later unknown keys raise ValueError)."""

    def __init__(self, path: Path, leading: list[str]) -> None:
        self.path = Path(path)
        self.leading = leading
        self.header: list[str] | None = None
        if self.path.exists() and self.path.stat().st_size > 0:
            with self.path.open() as f:
                self.header = next(csv.reader(f))

    def append(self, rows: Iterable[dict[str, Any]]) -> None:
        rows = list(rows)
        if not rows:
            return
        if self.header is None:
            keys: list[str] = []
            for r in rows:
                keys += [k for k in r if k not in keys]
            self.header = [k for k in self.leading if k in keys or k in self.leading] + [k for k in keys if k not in self.leading]
            with self.path.open("w", newline="") as f:
                csv.writer(f).writerow(self.header)
        with self.path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.header, extrasaction="ignore")
            for r in rows:
                w.writerow({k: _fmt(r.get(k)) for k in self.header})
            f.flush()
            os.fsync(f.fileno())

    def truncate_after(self, last_round: int) -> None:
        """Drop rows of rounds > ``last_round`` (resume after a crash mid-round)."""
        if not self.path.exists() or self.header is None:
            return
        with self.path.open() as f:
            reader = list(csv.reader(f))
        keep = [reader[0]] + [r for r in reader[1:] if r and int(float(r[0])) <= last_round]
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("w", newline="") as f:
            csv.writer(f).writerows(keep)
        os.replace(tmp, self.path)


def _fmt(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float) and math.isnan(v):
        return ""
    return v


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = Path(path).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


class RunDir:
    """Paths and writers of one run directory (created if missing)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.rounds = CsvLog(self.root / "rounds.csv", ROUND_COLUMNS)
        self.clients = CsvLog(self.root / "clients.csv", CLIENT_COLUMNS)

    @property
    def config_path(self) -> Path:
        return self.root / "config.json"

    @property
    def summary_path(self) -> Path:
        return self.root / "summary.json"

    @property
    def checkpoint_path(self) -> Path:
        return self.root / "checkpoint.pt"

    @property
    def figures(self) -> Path:
        p = self.root / "figures"
        p.mkdir(exist_ok=True)
        return p
