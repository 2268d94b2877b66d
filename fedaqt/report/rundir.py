"""The run directory: everything a user needs after a run, readable with pandas.

Files: ``config.json`` (resolved RunConfig), ``rounds.csv`` (one row per round), ``clients.csv`` (one row per
sampled client per round), ``summary.json``, ``checkpoint.pt`` (latest complete round), ``figures/``.
CSV rows are appended and fsynced every round, then the checkpoint is replaced atomically. The checkpoint
records how many rows each CSV had and a digest of them (:meth:`CsvLog.record`), so ``fedaqt run --resume``
drops the rows of a round whose checkpoint was not written and refuses, naming the file, a CSV that lost or
changed rows of a checkpointed round (:meth:`RunDir.check_resume`).

A new run in a directory that holds an earlier run moves the earlier results (:data:`PREVIOUS_FILES`) into
``RUN_DIR/.previous/`` (:meth:`RunDir.set_aside`) and deletes them only once its own round 1 is checkpointed
(:meth:`RunDir.discard_previous`); a run that fails before that puts them back byte for byte
(:meth:`RunDir.restore_previous`), also at the next start after a run killed before its first checkpoint.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

from fedaqt.config import ConfigError

#: generic columns written first in rounds.csv, before the workload's ``eval_columns`` (:func:`round_columns`)
ROUND_HEAD = ["round", "train_loss"]
#: generic columns written after the workload's ``eval_columns`` (more follow, e.g. strategy statistics)
ROUND_TAIL = ["bytes_down", "bytes_up", "clients_ok", "clients_sampled", "seconds"]


def round_columns(eval_columns: Iterable[str] = ()) -> list[str]:
    """The leading columns of rounds.csv for a workload whose ``evaluate`` returns ``eval_columns``:
    :data:`ROUND_HEAD` + ``eval_columns`` + :data:`ROUND_TAIL` (each name once, in that order). A run's
    rounds.csv has only its own workload's columns (an image run has no empty ASR WER columns)."""
    cols: list[str] = []
    for c in [*ROUND_HEAD, *eval_columns, *ROUND_TAIL]:
        if c not in cols:
            cols.append(c)
    return cols


CLIENT_COLUMNS = [
    "round", "client_id", "node_id", "ray_node_id", "status", "num_examples", "train_loss", "seconds", "bytes_up", "error",
]
#: files of a run's results (removed when a new run starts in an existing directory)
RESULT_FILES = ("rounds.csv", "clients.csv", "summary.json", "checkpoint.pt")
#: what a new run sets aside (and restores when it fails before its first checkpoint): the results and their config
PREVIOUS_FILES = RESULT_FILES + ("config.json",)
PREVIOUS_DIR = ".previous"


def _row_bytes(header: list[str], row: list[str]) -> bytes:
    """Canonical form of one CSV row for the digest: its non-empty cells by column name. A wider header (new
    columns, empty in old rows) or another column order leaves it unchanged."""
    cells = sorted((h, v) for h, v in zip(header, row) if v != "")
    return json.dumps(cells, separators=(",", ":")).encode() + b"\n"


class CsvLog:
    """Append-only CSV. The header starts as the first rows' keys (``leading`` first) and is widened when later
    rows bring new keys: the file is rewritten atomically with the new columns, empty in the older rows.

    ``rows`` counts the data rows and :meth:`digest` hashes them (canonical form, see :func:`_row_bytes`).
    """

    def __init__(self, path: Path, leading: list[str]) -> None:
        self.path = Path(path)
        self.leading = leading
        self.header: list[str] | None = None
        self.rows = 0
        self._sha = hashlib.sha256()
        if self.path.exists() and self.path.stat().st_size > 0:
            self._load(self.path.read_text())

    def _load(self, text: str) -> list[list[str]]:
        """Set header, row count and digest from ``text`` (a torn last line is ignored); returns the data rows."""
        table = list(csv.reader(io.StringIO(text)))
        self.header = table[0] if table else None
        self.rows, self._sha = 0, hashlib.sha256()
        data = [r for r in table[1:] if r]
        for r in data:
            self._sha.update(_row_bytes(self.header or [], r))
        self.rows = len(data)
        return data

    def digest(self) -> str:
        """sha256 (hex) of the data rows written so far, in canonical form."""
        return self._sha.hexdigest()

    def record(self) -> list[Any]:
        """``[rows, digest]``, stored in the checkpoint and checked by :meth:`check_resume`."""
        return [self.rows, self.digest()]

    def append(self, rows: Iterable[dict[str, Any]]) -> None:
        """Append ``rows`` (dicts; missing keys are written empty, None/NaN as empty) and fsync.

        Keys not yet in the header widen it (the file is rewritten atomically first), so no column is lost."""
        rows = list(rows)
        if not rows:
            return
        keys: list[str] = []
        for r in rows:
            keys += [k for k in r if k not in keys]
        if self.header is None:
            self.header = [k for k in self.leading if k in keys or k in self.leading] + [k for k in keys if k not in self.leading]
            with self.path.open("w", newline="") as f:
                csv.writer(f).writerow(self.header)
        elif any(k not in self.header for k in keys):
            self._widen([k for k in keys if k not in self.header])
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=self.header, extrasaction="ignore")
        for r in rows:
            w.writerow({k: _fmt(r.get(k)) for k in self.header})
        text = buf.getvalue()
        with self.path.open("a", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        for r in csv.reader(io.StringIO(text)):
            self._sha.update(_row_bytes(self.header, r))
            self.rows += 1

    def _widen(self, new: list[str]) -> None:
        assert self.header is not None
        old = self.header
        cols = old + new
        header = [k for k in self.leading if k in cols] + [k for k in cols if k not in self.leading]
        data = list(csv.reader(io.StringIO(self.path.read_text())))[1:]
        pos = {k: i for i, k in enumerate(old)}
        wide = [[r[pos[k]] if k in pos and pos[k] < len(r) else "" for k in header] for r in data if r]
        self._rewrite([header] + wide)
        self.header = header

    def _rewrite(self, table: list[list[str]]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w", newline="") as f:
            csv.writer(f).writerows(table)
        replace_atomic(tmp, self.path)

    def truncate_after(self, last_round: int) -> None:
        """Drop rows of rounds > ``last_round`` (resume after a crash mid-round), and a torn last line.

        A line without its final newline (the process died while writing it) is dropped whatever its round, as
        are rows whose field count differs from the header. ``last_round`` 0 keeps only the header. This is the
        repair of a checkpoint without CSV records; :meth:`check_resume` also verifies what is kept.
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
            self.rows, self._sha = 0, hashlib.sha256()
            return
        width = len(reader[0])

        def keep_row(r: list[str]) -> bool:
            try:
                return len(r) == width and int(float(r[0])) <= last_round
            except ValueError:
                return False

        keep = [reader[0]] + [r for r in reader[1:] if r and keep_row(r)]
        self._rewrite(keep)
        self._load(self.path.read_text())

    def check_resume(self, last_round: int, record: list[Any] | None, unique_rounds: bool = False) -> None:
        """Make the file end at checkpointed round ``last_round``, or refuse.

        Rows after the ``record[0]`` rows the checkpoint saw (the unfinished round, a torn last line) are dropped.
        Refused, naming this file: a missing file or fewer complete rows than recorded (rows were lost, e.g. a
        torn or truncated line of a checkpointed round), rows whose digest differs from ``record[1]`` (the file
        was edited or corrupted), kept rows of rounds after ``last_round``, and with ``unique_rounds`` rounds
        other than exactly 1..``last_round`` once each. ``record`` None (a checkpoint without records): the
        rows of rounds <= ``last_round`` are kept and only the structural checks apply.

        Raises:
            ConfigError: the message names the file, what is wrong and that the run cannot be resumed.
        """
        name = str(self.path)
        if last_round <= 0:
            self.truncate_after(0)
            return
        if not self.path.exists() or self.header is None:
            if record is not None and int(record[0]) == 0:
                return
            raise ConfigError(
                f"cannot resume: {name} is missing or empty, but the checkpoint holds round {last_round}; "
                "its rows are lost, so resuming would leave them out of the record. Start a new run "
                "(or restore the file from a backup)"
            )
        text = self.path.read_text()
        if record is None:
            self.truncate_after(last_round)
        else:
            want_rows, want_digest = int(record[0]), str(record[1])
            if not text.endswith("\n"):
                text = text[: text.rfind("\n") + 1]  # a torn last line is never a complete row
            table = list(csv.reader(io.StringIO(text)))
            data = [r for r in table[1:] if r]
            if len(data) < want_rows:
                raise ConfigError(
                    f"cannot resume: {name} holds {len(data)} complete row(s) but the checkpoint of round {last_round} "
                    f"recorded {want_rows}: rows of checkpointed rounds were lost (a torn or truncated file)"
                )
            sha = hashlib.sha256()
            for r in data[:want_rows]:
                sha.update(_row_bytes(table[0], r))
            if sha.hexdigest() != want_digest:
                raise ConfigError(
                    f"cannot resume: the first {want_rows} row(s) of {name} differ from what the checkpoint of round "
                    f"{last_round} recorded (sha256 mismatch): the file was edited or corrupted"
                )
            if len(data) > want_rows or len(table) - 1 != len(data) or not self.path.read_text().endswith("\n"):
                self._rewrite([table[0]] + data[:want_rows])
            self._load(self.path.read_text())
        rounds = []
        for r in csv.reader(io.StringIO(self.path.read_text())):
            rounds.append(r[0] if r else "")
        try:
            nums = [int(float(x)) for x in rounds[1:]]
        except ValueError as exc:
            raise ConfigError(f"cannot resume: {name} has a row with a bad round number ({exc})") from None
        if any(n > last_round for n in nums):
            raise ConfigError(f"cannot resume: {name} holds rows of rounds after the checkpointed round {last_round}")
        if unique_rounds and sorted(nums) != list(range(1, last_round + 1)):
            missing = sorted(set(range(1, last_round + 1)) - set(nums))
            raise ConfigError(
                f"cannot resume: {name} must hold rounds 1..{last_round} once each (the checkpoint is at round "
                f"{last_round}); missing {missing[:10]}{'...' if len(missing) > 10 else ''}"
                f"{', duplicated rows' if len(nums) != len(set(nums)) else ''}"
            )


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

    def __init__(self, root: str | Path, eval_columns: Iterable[str] = ()) -> None:
        """``eval_columns``: the workload's metric names (``Workload.eval_columns``), placed after ``train_loss`` in
        a new rounds.csv (:func:`round_columns`); an existing rounds.csv keeps its header (resume), widened by name
        only when rows bring new keys."""
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.round_columns = round_columns(eval_columns)
        self.rounds = CsvLog(self.root / "rounds.csv", self.round_columns)
        self.clients = CsvLog(self.root / "clients.csv", CLIENT_COLUMNS)

    def _reopen(self) -> None:
        self.rounds = CsvLog(self.root / "rounds.csv", self.round_columns)
        self.clients = CsvLog(self.root / "clients.csv", CLIENT_COLUMNS)

    def clear_results(self) -> list[str]:
        """Remove the result files of an earlier run in this directory (a new run starts); returns their names."""
        removed = []
        for name in RESULT_FILES:
            f = self.root / name
            if f.exists():
                f.unlink()
                removed.append(name)
        self._reopen()
        return removed

    # ------------------------------------------------------------------ earlier results of a new run's directory
    @property
    def previous(self) -> Path:
        return self.root / PREVIOUS_DIR

    def set_aside(self) -> list[str]:
        """A new run starts here: move the earlier run's :data:`PREVIOUS_FILES` into ``.previous/``; returns
        their names.

        When ``.previous/`` already exists and there is no checkpoint here, the files here are those of a run
        killed before its first checkpoint: they are deleted and ``.previous/`` (the last complete results) kept.
        """
        prev = self.previous
        if prev.is_dir():
            if (self.root / "checkpoint.pt").exists():
                shutil.rmtree(prev)
            else:
                for name in PREVIOUS_FILES:
                    (self.root / name).unlink(missing_ok=True)
                self._reopen()
                return sorted(p.name for p in prev.iterdir())
        moved = [n for n in PREVIOUS_FILES if (self.root / n).exists()]
        if moved:
            tmp = self.root / (PREVIOUS_DIR + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            for name in moved:
                os.replace(self.root / name, tmp / name)
            os.replace(tmp, prev)
        self._reopen()
        return moved

    def discard_previous(self) -> bool:
        """Delete ``.previous/`` (this run checkpointed its first round); True when there was one."""
        if not self.previous.is_dir():
            return False
        shutil.rmtree(self.previous, ignore_errors=True)
        return True

    def restore_previous(self) -> list[str]:
        """Put ``.previous/`` back (this run failed before its first checkpoint): this run's result files are
        deleted and the earlier ones moved back unchanged. Returns the restored names ([] when none)."""
        prev = self.previous
        if not prev.is_dir():
            return []
        for name in PREVIOUS_FILES:
            (self.root / name).unlink(missing_ok=True)
        restored = []
        for f in sorted(prev.iterdir()):
            os.replace(f, self.root / f.name)
            restored.append(f.name)
        prev.rmdir()
        self._reopen()
        return restored

    # ------------------------------------------------------------------ resume
    def check_resume(self, last_round: int, records: dict[str, Any] | None) -> None:
        """Make rounds.csv and clients.csv end at checkpointed round ``last_round`` or refuse (see
        :meth:`CsvLog.check_resume`); ``records`` maps file names to the checkpoint's ``[rows, digest]``.

        Raises:
            ConfigError: naming the file that lost or changed rows.
        """
        records = records or {}
        self.rounds.check_resume(last_round, records.get("rounds.csv") if records else None, unique_rounds=True)
        self.clients.check_resume(last_round, records.get("clients.csv") if records else None)

    def records(self) -> dict[str, list[Any]]:
        """``{file name: [rows, digest]}`` of both CSVs (stored in the checkpoint)."""
        return {"rounds.csv": self.rounds.record(), "clients.csv": self.clients.record()}

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
