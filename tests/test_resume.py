"""Checkpoint and resume (issue 5).

Fast: the real server loop in-process (toy workload, FakeGrid) crashes mid-round and resumes; the result is
bitwise the uninterrupted run for strategies with server-optimizer state (FedAvgM momentum, FedAdam moments).
Slow: ``fedaqt run`` of the tiny ASR job on Ray is SIGKILLed (whole process group) mid-run, then
``fedaqt run --resume RUN_DIR`` finishes it; its metrics equal the uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fedaqt.config import ConfigError, RunConfig
from fedaqt.server.app import Server, read_checkpoint
from fedaqt.strategies.quantized import QuantizedMixin
from fakegrid import FakeGrid
from test_repro import (
    ASR_ARGS,
    FEDAQT,
    ROOT,
    baseline_asr_run,
    cli_env,
    kill_marked_processes,
    metrics,
    need_speech,
    run_cli,
    schedule,
    short_tmpdir,
)


pytestmark = pytest.mark.usefixtures("toy_registered")


class Crash(RuntimeError):
    pass


class CrashingGrid(FakeGrid):
    """Delivers rounds normally until ``crash_round``, whose train messages never come back."""

    def __init__(self, num_nodes: int, crash_round: int | None = None):
        super().__init__(num_nodes)
        self.crash_round = crash_round

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        if messages and int(messages[0].content["config"]["server-round"]) == self.crash_round:
            raise Crash("killed mid-round")
        return super().send_and_receive(messages, timeout)


def toy_config(out: Path, strategy: str, **kw) -> RunConfig:
    base = dict(workload="toy", strategy=strategy, algorithm="fedavg", bits=8, local_steps=2, lr=0.1, server_lr=0.3,
                server_momentum=0.9, num_clients=6, clients_per_round=3, rounds=5, eval_every=1, seed=2, out=str(out))
    base.update(kw)
    return RunConfig(**base)


@pytest.mark.parametrize("strategy", ["fedavgm", "fedadam", "relay"])
def test_crash_and_resume_equals_uninterrupted(tmp_path, strategy):
    kw = {"algorithm": "fedsgd", "local_steps": 1} if strategy == "relay" else {}
    full = Server(toy_config(tmp_path / "full", strategy, **kw), tmp_path / "full")
    full.run_rounds(FakeGrid(6))

    cfg = toy_config(tmp_path / "cut", strategy, **kw)
    first = Server(cfg, tmp_path / "cut")
    with pytest.raises(Crash):
        first.run_rounds(CrashingGrid(6, crash_round=3))
    ckpt = read_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    assert ckpt["round"] == 2 and not list((tmp_path / "cut").glob("*.tmp"))
    # a crash after the round's CSV rows but before its checkpoint: those rows must go on resume
    pd.read_csv(tmp_path / "full" / "rounds.csv").iloc[[2]].to_csv(tmp_path / "cut" / "rounds.csv", mode="a", header=False, index=False)
    with (tmp_path / "cut" / "clients.csv").open("a") as f:
        f.write("3,1,1001,,ok,3")  # torn line (no newline)

    random.seed(777), np.random.seed(777), torch.manual_seed(777)  # a new process has other RNG states
    second = Server(cfg, tmp_path / "cut", resume=True)
    assert second.start_round == 3
    second.run_rounds(FakeGrid(6))
    pd.testing.assert_frame_equal(metrics(tmp_path / "full"), metrics(tmp_path / "cut"))
    pd.testing.assert_frame_equal(schedule(tmp_path / "full"), schedule(tmp_path / "cut"))
    for k, v in full.arrays.items():
        assert np.array_equal(v.numpy(), second.arrays[k].numpy()), k


def test_checkpoint_holds_model_optimizer_rounds_and_rng(tmp_path):
    server = Server(toy_config(tmp_path, "fedadam", rounds=2), tmp_path)
    server.run_rounds(FakeGrid(6))
    ckpt = read_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["round"] == 2
    assert set(ckpt["params"]) == set(server.spec.param_shapes)
    for k, t in ckpt["params"].items():
        assert np.array_equal(t.numpy(), server.arrays[k].numpy())
    attrs = ckpt["strategy"]
    assert set(attrs) == {a for a in QuantizedMixin.STATE_ATTRS if hasattr(server.strategy, a)}
    assert set(ckpt["buffers"]) == set(server.spec.buffer_shapes)
    assert set(attrs["m_t"]) == set(attrs["v_t"]) == set(server.spec.param_shapes)
    assert set(ckpt["rng"]) == {"python", "numpy", "torch"}
    assert json.loads(ckpt["config"])["seed"] == 2

    momentum = Server(toy_config(tmp_path / "m", "fedavgm", rounds=2), tmp_path / "m")
    momentum.run_rounds(FakeGrid(6))
    state = read_checkpoint(tmp_path / "m" / "checkpoint.pt")["strategy"]
    assert len(state["momentum_vector"]) == len(server.spec.param_shapes)
    assert "__arrayrecord__" in state["current_arrays"]


def test_resume_refuses_other_configuration_and_skips_finished_runs(tmp_path):
    from fedaqt.launch.runner import checkpoint_round, run_experiment

    cfg = toy_config(tmp_path, "fedavgm", rounds=2)
    Server(cfg, tmp_path).run_rounds(FakeGrid(6))
    cfg.save(tmp_path / "config.json")
    assert checkpoint_round(cfg) == 2
    assert checkpoint_round(cfg.override({"num_cpus": 1})) == 2  # where it runs may change
    with pytest.raises(ConfigError, match="seed"):
        checkpoint_round(cfg.override({"seed": 3}))
    with pytest.raises(ValueError, match="seed"):
        Server(cfg.override({"seed": 3}), tmp_path, resume=True)
    before = pd.read_csv(tmp_path / "rounds.csv")
    summary = run_experiment(cfg, resume=True)  # finished: no Ray, summary rewritten
    assert summary["rounds_completed"] == 2
    pd.testing.assert_frame_equal(before, pd.read_csv(tmp_path / "rounds.csv"))


def test_resume_without_checkpoint_starts_over(tmp_path):
    cfg = toy_config(tmp_path, "fedavgm", rounds=2)
    (tmp_path / "rounds.csv").write_text("round,train_loss\n1,0.5\n")
    server = Server(cfg, tmp_path, resume=True)
    assert server.start_round == 1
    server.run_rounds(FakeGrid(6))
    assert list(pd.read_csv(tmp_path / "rounds.csv")["round"]) == [1, 2]


def test_new_run_in_old_directory_replaces_its_results(tmp_path):
    from fedaqt.report.rundir import RunDir

    (tmp_path / "rounds.csv").write_text("round,train_loss\n1,0.5\n")
    (tmp_path / "checkpoint.pt").write_bytes(b"old")
    assert sorted(RunDir(tmp_path).clear_results()) == ["checkpoint.pt", "rounds.csv"]
    assert not (tmp_path / "rounds.csv").exists()


# ---------------------------------------------------------------------------------------------- SIGKILL + --resume
@pytest.mark.slow
def test_sigkill_mid_run_then_resume_matches_uninterrupted():
    need_speech()
    reference = baseline_asr_run()
    out = short_tmpdir("fqk-") / "run"
    mark = uuid.uuid4().hex
    env = cli_env(mark)
    proc = subprocess.Popen([FEDAQT, "run", *ASR_ARGS, "--out", str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 200
        rows = 0
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                rows = (out / "rounds.csv").read_text().count("\n") - 1
            except FileNotFoundError:
                rows = 0
            if rows >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed:\n" + proc.communicate()[0][-3000:]
        assert rows >= 2, "no progress before the deadline"
        os.killpg(proc.pid, signal.SIGKILL)  # the driver, its Ray head and workers: no cleanup runs
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        kill_marked_processes(mark, str(out))
    killed_rows = len(pd.read_csv(out / "rounds.csv"))
    assert killed_rows < 4 and not (out / "summary.json").exists()
    assert (out / "checkpoint.pt").exists()

    mark2 = uuid.uuid4().hex
    try:
        res = run_cli(["run", "--resume", str(out)], cli_env(mark2))
    finally:
        kill_marked_processes(mark2, str(out))
    assert res.returncode == 0, res.stdout[-4000:]
    assert "(resume)" in res.stdout
    pd.testing.assert_frame_equal(metrics(reference), metrics(out))
    pd.testing.assert_frame_equal(schedule(reference), schedule(out))
    ref_summary = json.loads((reference / "summary.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    for key in ("rounds_completed", "final_eval_loss", "final_eval_cer", "final_eval_wer", "total_bytes_up"):
        assert summary[key] == ref_summary[key], key


def test_checkpoint_write_failure_is_raised_not_lost(tmp_path, monkeypatch):
    """Checkpoints are written on a background thread (issue 16): a failed write (disk full) must stop the run
    with that error, and the checkpoint on disk stays the last one written."""
    import fedaqt.server.app as server_app

    real_save = server_app.torch.save

    def save(obj, path, *a, **kw):
        if isinstance(obj, dict) and obj.get("round") == 3:
            raise OSError(28, "No space left on device")
        return real_save(obj, path, *a, **kw)

    monkeypatch.setattr(server_app.torch, "save", save)
    server = Server(toy_config(tmp_path, "fedadam"), tmp_path)
    with pytest.raises(OSError, match="No space left"):
        server.run_rounds(FakeGrid(6))
    assert read_checkpoint(tmp_path / "checkpoint.pt")["round"] == 2


def test_background_checkpoints_land_in_order_before_run_rounds_returns(tmp_path, monkeypatch):
    """Slow writes overlap the next rounds but never each other, land in round order, and the last round's
    checkpoint is on disk when run_rounds returns."""
    log: list[tuple[int, float, float]] = []
    real = Server._write_checkpoint

    def slow(self, ckpt, rnd):
        t0 = time.perf_counter()
        time.sleep(0.2)
        real(self, ckpt, rnd)
        log.append((rnd, t0, time.perf_counter()))

    monkeypatch.setattr(Server, "_write_checkpoint", slow)
    server = Server(toy_config(tmp_path, "fedadam"), tmp_path)
    server.run_rounds(FakeGrid(6))
    assert [r for r, _, _ in log] == [1, 2, 3, 4, 5]
    assert all(log[i][2] <= log[i + 1][1] for i in range(len(log) - 1))
    ckpt = read_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["round"] == 5 and ckpt["records"]["rounds.csv"][0] == 5
