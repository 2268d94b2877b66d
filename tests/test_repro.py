"""Reproducibility (issue 5): everything random derives from ``--seed``.

Fast tests drive the real server loop and client code in-process (toy workload, FakeGrid); the slow test runs the
tiny ASR job twice on Ray with two concurrent client workers and compares ``rounds.csv``.

The helpers at the top (``run_cli``, ``cli_env``, ``metrics``, ``baseline_asr_run``, ``kill_marked_processes``) are shared with
``test_resume.py`` and ``test_cluster.py``: the uninterrupted baseline run is made once per session.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fedaqt.config import RunConfig
from fedaqt.server.app import Server

ROOT = Path(__file__).resolve().parents[1]
FEDAQT = str(Path(sys.executable).parent / "fedaqt")
SPEECH = ROOT / "data" / "speech"
#: the tiny ASR job of the slow tests: smoke preset (tiny Conformer, 4 clients, 2 per round, eval every round),
#: 4 rounds, 2 CPUs -> 2 concurrent Ray client workers
ASR_ARGS = ["--preset", "smoke", "--rounds", "4", "--num-cpus", "2", "--seed", "0"]
#: wall-clock / process columns excluded from comparisons
WALL_CLOCK = {"seconds", "server_rss_peak_mib"}
CLIENT_SCHEDULE = ["round", "client_id", "status", "num_examples", "train_loss", "bytes_up"]


# ---------------------------------------------------------------------------------------------- shared helpers
def short_tmpdir(prefix: str) -> Path:
    """A fresh directory under /tmp with a short path (Ray's unix sockets go in RUN_DIR/ray), removed at exit."""
    d = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    return d


def cli_env(mark: str = "") -> dict[str, str]:
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", COLUMNS="200", FEDAQT_TEST_MARK=mark or uuid.uuid4().hex)
    return env


def kill_marked_processes(mark: str, *paths: str) -> list[int]:
    """SIGKILL the processes this test started: their environment holds ``FEDAQT_TEST_MARK=mark`` or their command
    line / environment names one of ``paths`` (the run directory; Ray's temp dir lies inside it). By pid only."""
    me = os.getpid()
    needles = [f"FEDAQT_TEST_MARK={mark}".encode()] + [p.encode() for p in paths if p]
    killed = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            blob = Path(f"/proc/{entry}/environ").read_bytes() + b"\0" + Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if any(n in blob for n in needles):
            try:
                os.kill(int(entry), signal.SIGKILL)
                killed.append(int(entry))
            except (ProcessLookupError, PermissionError):
                pass
    return killed


def run_cli(args: list[str], env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    """``fedaqt ARGS`` in its own session (its Ray processes too), killed with its group on timeout."""
    proc = subprocess.Popen([FEDAQT, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"fedaqt {' '.join(args)} timed out:\n{out[-4000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def metrics(run_dir: Path) -> pd.DataFrame:
    """rounds.csv without wall-clock columns."""
    df = pd.read_csv(Path(run_dir) / "rounds.csv")
    return df[[c for c in df.columns if c not in WALL_CLOCK]]


def schedule(run_dir: Path) -> pd.DataFrame:
    """clients.csv: who trained in which round and what they reported (no pids, node ids or timings)."""
    return pd.read_csv(Path(run_dir) / "clients.csv")[CLIENT_SCHEDULE]


def need_speech() -> None:
    if not (SPEECH / "train").is_dir():
        pytest.skip(f"{SPEECH} is missing: run scripts/setup.sh (fedaqt data speech --out data/speech)")


@functools.lru_cache(maxsize=None)
def baseline_asr_run() -> Path:
    """One uninterrupted run of the tiny ASR job (made once per session, shared by the slow tests)."""
    need_speech()
    out = short_tmpdir("fqb-") / "run"
    mark = uuid.uuid4().hex
    try:
        res = run_cli(["run", *ASR_ARGS, "--out", str(out)], cli_env(mark))
    finally:
        kill_marked_processes(mark, str(out))
    assert res.returncode == 0, res.stdout[-4000:]
    assert len(pd.read_csv(out / "rounds.csv")) == 4
    return out


# ---------------------------------------------------------------------------------------------- fast tests
class ShuffledGrid:
    """FakeGrid whose replies arrive in a random order (as with concurrent Ray workers)."""

    def __init__(self, num_nodes: int, shuffle_seed: int | None = None):
        from fakegrid import FakeGrid

        self.inner = FakeGrid(num_nodes)
        self.rng = random.Random(shuffle_seed)

    def get_node_ids(self):
        return self.inner.get_node_ids()

    def send_and_receive(self, messages, timeout=None):
        replies = list(self.inner.send_and_receive(messages, timeout))
        self.rng.shuffle(replies)
        return replies


def toy_run(tmp_path: Path, seed: int, strategy: str = "fedavgm", shuffle_seed: int | None = None, rounds: int = 4) -> Server:
    cfg = RunConfig(workload="toy", strategy=strategy, algorithm="fedavg", bits=8, local_steps=2, lr=0.1, server_lr=0.5,
                    server_momentum=0.5, num_clients=6, clients_per_round=3, rounds=rounds, eval_every=1, seed=seed,
                    out=str(tmp_path))
    server = Server(cfg, tmp_path)
    server.run_rounds(ShuffledGrid(6, shuffle_seed))
    return server


def test_partition_schedule_is_a_function_of_seed_and_round():
    from fedaqt.server.app import sample_partitions

    def sched(seed):
        return [sample_partitions(seed, r, 32, 8) for r in range(1, 11)]

    random.seed(123)
    a = sched(0)
    random.seed(456)  # the global state does not matter
    assert sched(0) == a
    assert sched(1) != a
    assert all(len(set(r)) == 8 for r in a)


def test_flower_node_sampling_is_seeded(toy_registered, tmp_path):
    """Flower samples nodes with the global `random`; the strategy seeds it from (seed, round)."""
    from flwr.app import ConfigRecord

    from fakegrid import FakeGrid

    def nodes(seed):
        cfg = RunConfig(workload="toy", strategy="fedsgd", num_clients=6, clients_per_round=3, seed=seed, out=str(tmp_path))
        server = Server(cfg, tmp_path)
        grid = FakeGrid(6)
        out = []
        for rnd in (1, 2, 3):
            random.random()  # disturb the global RNG between rounds
            msgs = server.configure_round(rnd, grid, ConfigRecord())
            out.append(sorted((m.metadata.dst_node_id, int(m.content["config"]["partition-id"])) for m in msgs))
        return out

    assert nodes(0) == nodes(0)
    assert nodes(0) != nodes(1)


def test_same_seed_same_metrics_different_seed_different_schedule(toy_registered, tmp_path):
    a = toy_run(tmp_path / "a", seed=0, shuffle_seed=1)
    b = toy_run(tmp_path / "b", seed=0, shuffle_seed=2)  # other reply arrival order
    c = toy_run(tmp_path / "c", seed=1, shuffle_seed=1)
    pd.testing.assert_frame_equal(metrics(tmp_path / "a"), metrics(tmp_path / "b"))
    pd.testing.assert_frame_equal(schedule(tmp_path / "a"), schedule(tmp_path / "b"))
    for k, v in a.arrays.items():  # bitwise: aggregation follows partition order, not arrival order
        assert np.array_equal(v.numpy(), b.arrays[k].numpy())
    sa, sc = schedule(tmp_path / "a"), schedule(tmp_path / "c")
    per_round = lambda s: [sorted(g.client_id) for _, g in s.groupby("round")]  # noqa: E731
    assert per_round(sa) != per_round(sc)
    assert not metrics(tmp_path / "a")["train_loss"].equals(metrics(tmp_path / "c")["train_loss"])


def test_server_seeds_global_generators(toy_registered, tmp_path):
    def draws(seed):
        Server(RunConfig(workload="toy", strategy="fedsgd", num_clients=6, clients_per_round=3, seed=seed, out=str(tmp_path)), tmp_path)
        return random.random(), float(np.random.rand()), float(torch.rand(()))

    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    first = draws(3)
    assert draws(3) == first and draws(4) != first


# ---------------------------------------------------------------------------------------------- Ray
@pytest.mark.slow
def test_two_ray_runs_same_seed_identical_metrics():
    """Two runs of the tiny ASR job, each with 2 concurrent Ray client workers: identical rounds.csv metrics.
    The second repeats the first from its saved configuration (``--config RUN_DIR/config.json``)."""
    first = baseline_asr_run()
    out = short_tmpdir("fqr-") / "run"
    mark = uuid.uuid4().hex
    try:
        res = run_cli(["run", "--config", str(first / "config.json"), "--out", str(out)], cli_env(mark))
    finally:
        kill_marked_processes(mark, str(out))
    assert res.returncode == 0, res.stdout[-4000:]
    pd.testing.assert_frame_equal(metrics(first), metrics(out))
    pd.testing.assert_frame_equal(schedule(first), schedule(out))
    clients = pd.read_csv(out / "clients.csv")
    assert clients["pid"].nunique() == 2  # two client workers ran concurrently
    saved = json.loads((first / "config.json").read_text())
    assert {**saved, "out": str(out)} == json.loads((out / "config.json").read_text())
