"""The run directory: everything a user needs after a run, readable with pandas.

Files: ``config.json`` (resolved RunConfig), ``rounds.csv`` (one row per round), ``clients.csv`` (one row per
sampled client per round), ``summary.json``, ``checkpoint.pt`` (latest complete round), ``figures/``.
CSV rows are appended and fsynced every round, then the checkpoint is replaced atomically, so a killed run keeps
every completed round and ``fedaqt run --resume`` drops the rows of a round whose checkpoint was not written.
"""

from __future__ import annotations

import csv
import io
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
CLIENT_COLUMNS = [
    "round", "client_id", "node_id", "ray_node_id", "status", "num_examples", "train_loss", "seconds", "bytes_up", "error",
]
#: files of a run's results (removed when a new run starts in an existing directory)
RESULT_FILES = ("rounds.csv", "clients.csv", "summary.json", "checkpoint.pt")


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
        """Drop rows of rounds > ``last_round`` (resume after a crash mid-round), and a torn last line.

        A line without its final newline (the process died while writing it) is dropped whatever its round, as
        are rows whose field count differs from the header. ``last_round`` 0 keeps only the header.
        """
        if not self.path.exists() or self.header is None:
            return
        text = self.path.read_text()
        if text and not text.endswith("\n"):
            text = text[: text.rfind("\n") + 1]
        reader = list(csv.reader(io.StringIO(text)))
        if not reader:
            self.path.unlink()
            self.header = None
            return
        width = len(reader[0])

        def keep_row(r: list[str]) -> bool:
            try:
                return len(r) == width and int(float(r[0])) <= last_round
            except ValueError:
                return False

        keep = [reader[0]] + [r for r in reader[1:] if r and keep_row(r)]
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w", newline="") as f:
            csv.writer(f).writerows(keep)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


def _fmt(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float) and math.isnan(v):
        return ""
    return v


def replace_atomic(tmp: Path, path: Path) -> None:
    """fsync ``tmp``, rename it over ``path`` and fsync the directory: readers see the old or the new file."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:
        fd = os.open(Path(path).parent, os.O_RDONLY)
    except OSError:  # pragma: no cover - directories cannot be opened on some platforms
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: Any) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    replace_atomic(tmp, path)


class RunDir:
    """Paths and writers of one run directory (created if missing)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.rounds = CsvLog(self.root / "rounds.csv", ROUND_COLUMNS)
        self.clients = CsvLog(self.root / "clients.csv", CLIENT_COLUMNS)

    def clear_results(self) -> list[str]:
        """Remove the result files of an earlier run in this directory (a new run starts); returns their names."""
        removed = []
        for name in RESULT_FILES:
            f = self.root / name
            if f.exists():
                f.unlink()
                removed.append(name)
        self.rounds = CsvLog(self.root / "rounds.csv", ROUND_COLUMNS)
        self.clients = CsvLog(self.root / "clients.csv", CLIENT_COLUMNS)
        return removed

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
