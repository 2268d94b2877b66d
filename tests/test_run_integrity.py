"""Issue 9, items 10, 11 and 13: resume never loses data silently, bad input fails before anything is deleted,
records keep their columns.

All in-process (toy workload, FakeGrid, ``run_simulation`` replaced by the real Server loop): no Ray starts.
The independent references are the bytes on disk before the run, pandas' reading of the CSVs, and counts of what
the test itself wrote.
"""

from __future__ import annotations

import csv
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from fakegrid import FakeGrid
from fedaqt.cli import app
from fedaqt.config import ConfigError, RunConfig
from fedaqt.report.rundir import CsvLog, RunDir
from fedaqt.server.app import Server, read_checkpoint

pytestmark = pytest.mark.usefixtures("toy_registered")
runner = CliRunner()


def _flat(text: str) -> str:
    return " ".join(text.replace("│", " ").split())


def toy_config(out: Path, **kw) -> RunConfig:
    base = dict(workload="toy", strategy="fedavgm", algorithm="fedavg", bits=8, local_steps=2, lr=0.1, server_lr=0.3,
                server_momentum=0.9, num_clients=6, clients_per_round=3, rounds=4, eval_every=1, seed=2, out=str(out))
    base.update(kw)
    return RunConfig(**base)


class StopAt(FakeGrid):
    """Delivers rounds until ``stop_round``, which raises (the process died mid-round)."""

    def __init__(self, num_nodes: int, stop_round: int | None = None, fail_round: int | None = None):
        super().__init__(num_nodes)
        self.stop_round, self.fail_round = stop_round, fail_round

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        rnd = int(messages[0].content["config"]["server-round"]) if messages else 0
        if rnd == self.stop_round:
            raise RuntimeError("killed mid-round")
        self.fail_partitions = set(range(len(self.node_ids))) if rnd == self.fail_round else set()
        return super().send_and_receive(messages, timeout)


def _killed_run(out: Path, rounds_done: int = 2) -> RunConfig:
    cfg = toy_config(out)
    with pytest.raises(RuntimeError, match="killed"):
        Server(cfg, out).run_rounds(StopAt(6, stop_round=rounds_done + 1))
    cfg.save(out / "config.json")
    assert read_checkpoint(out / "checkpoint.pt")["round"] == rounds_done
    return cfg


def _tear_last_line(path: Path) -> None:
    text = path.read_text()
    path.write_text(text[: len(text) - 1 - len(text.rstrip("\n").rsplit("\n", 1)[1]) // 2])  # half the last row, no "\n"


# ---------------------------------------------------------------------------------------------- item 10
@pytest.mark.parametrize("name", ["rounds.csv", "clients.csv"])
def test_resume_refuses_a_torn_row_of_a_checkpointed_round(tmp_path, name):
    from fedaqt.launch.runner import checkpoint_round

    cfg = _killed_run(tmp_path)
    _tear_last_line(tmp_path / name)  # the last row belongs to round 2, which the checkpoint holds
    before = (tmp_path / name).read_bytes()
    with pytest.raises(ConfigError, match=name) as e:
        checkpoint_round(cfg)
    assert "lost" in str(e.value)
    with pytest.raises(ValueError, match=name):
        Server(cfg, tmp_path, resume=True)
    assert (tmp_path / name).read_bytes() == before  # refused: nothing rewritten


def test_resume_refuses_a_deleted_or_edited_csv(tmp_path):
    from fedaqt.launch.runner import checkpoint_round

    cfg = _killed_run(tmp_path)
    rounds = tmp_path / "rounds.csv"
    good = rounds.read_text()
    rounds.unlink()
    with pytest.raises(ConfigError, match="rounds.csv is missing"):
        checkpoint_round(cfg)
    rounds.write_text(good.replace(good.splitlines()[1].split(",")[1], "0.123", 1))  # round 1's train_loss edited
    with pytest.raises(ConfigError, match="rounds.csv differ"):
        checkpoint_round(cfg)
    rounds.write_text(good)
    assert checkpoint_round(cfg) == 2


def test_resume_drops_only_rows_after_the_checkpoint(tmp_path):
    """The repair that is allowed: rows of the unfinished round and a torn line after the checkpoint."""
    from fedaqt.launch.runner import checkpoint_round

    cfg = _killed_run(tmp_path)
    want = {n: (tmp_path / n).read_text() for n in ("rounds.csv", "clients.csv")}
    with (tmp_path / "rounds.csv").open("a") as f:
        f.write("3,0.5" + "," * (len(want["rounds.csv"].splitlines()[0].split(",")) - 2) + "\n")
    with (tmp_path / "clients.csv").open("a") as f:
        f.write("3,1,1001,,o")  # torn, no newline
    assert checkpoint_round(cfg) == 2
    assert {n: (tmp_path / n).read_text() for n in want} == want
    server = Server(cfg, tmp_path, resume=True)
    server.run_rounds(FakeGrid(6))
    assert list(pd.read_csv(tmp_path / "rounds.csv")["round"]) == [1, 2, 3, 4]
    counts = pd.read_csv(tmp_path / "clients.csv")["round"].value_counts().sort_index()
    assert counts.to_dict() == {1: 3, 2: 3, 3: 3, 4: 3}


def test_bit_flip_in_a_checkpoint_tensor_is_refused(tmp_path):
    from fedaqt.launch.runner import checkpoint_round

    cfg = _killed_run(tmp_path)
    path = tmp_path / "checkpoint.pt"
    raw = torch.load(path, map_location="cpu", weights_only=True)
    name, tensor = max(raw["params"].items(), key=lambda kv: kv[1].numel())
    needle = tensor.contiguous().numpy().tobytes()
    data = bytearray(path.read_bytes())
    at = data.find(needle)
    assert at > 0, "tensor bytes not found in the file"  # the first copy is "params" (FedAvgM state holds another)
    data[at + len(needle) // 2] ^= 0x10  # one bit of one float
    path.write_bytes(bytes(data))
    flipped = torch.load(path, map_location="cpu", weights_only=True)["params"][name]
    assert not torch.equal(flipped, tensor)  # torch itself loads the damaged tensor without complaint
    with pytest.raises(ValueError, match="corrupt"):
        read_checkpoint(path)
    with pytest.raises(ConfigError, match="checkpoint.pt"):
        checkpoint_round(cfg)


# ---------------------------------------------------------------------------------------------- item 11
def _old_run(out: Path) -> dict[str, bytes]:
    """A finished earlier run in ``out``; returns its files' bytes."""
    cfg = toy_config(out, rounds=2, seed=5)
    Server(cfg, out).run_rounds(FakeGrid(6))
    cfg.save(out / "config.json")
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--seed", "-1"], "seed must be an integer in [0, 2**63 - 1], got -1"),
        (["--seed", str(2**64)], "seed must be an integer in [0, 2**63 - 1]"),
        (["-o", "round_timeout=abc"], "option round_timeout='abc' (core) is not allowed: must be a finite number > 0"),
        (["-o", "round_timeout=0"], "option round_timeout=0 (core) is not allowed"),
        (["-o", "round_timeout=-1"], "option round_timeout=-1 (core) is not allowed"),
        (["-o", "profile_memory=maybe"], "option profile_memory='maybe' (core) is not allowed: must be true or false"),
        (["--strategy", "fedadam", "-o", "beta_1=1.5"], "option beta_1=1.5 (strategy fedadam) is not allowed: must be a finite number >= 0 and < 1"),
    ],
)
def test_bad_values_fail_in_preflight_naming_the_key_and_keep_the_old_run(tmp_path, args, needle, monkeypatch):
    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray must not start on bad input"))
    out = tmp_path / "r"
    old = _old_run(out)
    result = runner.invoke(app, ["run", "--workload", "toy", "--strategy", "fedavgm", "--algorithm", "fedavg",
                                 "--num-clients", "6", "--clients-per-round", "3", "--out", str(out), *args])
    assert result.exit_code == 2, result.output
    assert needle in _flat(result.output)
    assert _files(out) == old


def test_out_naming_a_file_is_one_clear_line(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    for out in (f, f / "sub"):
        result = runner.invoke(app, ["run", "--workload", "toy", "--out", str(out)])
        assert result.exit_code == 2, result.output
        assert "--out must name a run directory" in _flat(result.output) and "Traceback" not in result.output
    assert f.read_text() == "x"


def _fake_simulation(monkeypatch, grid_factory):
    """``run_simulation`` replaced by the real ServerApp main on an in-process grid (no Ray)."""
    import flwr.simulation

    def fake(server_app, client_app, num_supernodes, backend_config):
        main = server_app._main  # the function make_server_app registered with @app.main() (ignores the context)
        try:
            main(grid_factory(), None)
        except RuntimeError:
            pass  # Flower logs a ServerApp exception and returns

    monkeypatch.setattr(flwr.simulation, "run_simulation", fake)


@pytest.mark.parametrize("stop_round", [1, 2])
def test_old_results_are_deleted_only_once_round_1_is_checkpointed(tmp_path, monkeypatch, stop_round):
    from fedaqt.launch.runner import run_experiment

    out = tmp_path / "r"
    old = _old_run(out)
    _fake_simulation(monkeypatch, lambda: StopAt(6, stop_round=stop_round))
    with pytest.raises(RuntimeError, match="stopped before completing"):
        run_experiment(toy_config(out, rounds=3, seed=9))
    if stop_round == 1:  # failed before its first checkpoint: the earlier run is back, byte for byte
        assert _files(out) == old
    else:  # round 1 checkpointed: the earlier run is gone, the new one resumable
        assert read_checkpoint(out / "checkpoint.pt")["round"] == 1
        assert '"seed": 9' in (out / "config.json").read_text()
        assert list(pd.read_csv(out / "rounds.csv")["round"]) == [1]
    assert not (out / ".previous").exists()


def test_a_run_killed_before_round_1_keeps_the_old_results_for_the_next_start(tmp_path):
    """SIGKILL leaves ``.previous/``: a new run then keeps those (not the killed run's partial files) aside."""
    out = tmp_path / "r"
    old = _old_run(out)
    run = RunDir(out)
    assert sorted(run.set_aside()) == sorted(old)
    (out / "config.json").write_text("{}")  # the killed run's partial files, no checkpoint
    (out / "rounds.csv").write_text("round\n")
    assert sorted(RunDir(out).set_aside()) == sorted(old)
    assert sorted(RunDir(out).restore_previous()) == sorted(old)
    assert _files(out) == old


def test_ray_auto_refuses_instances_not_started_by_ray_start(tmp_path, monkeypatch):
    from ray._private import services, utils

    from fedaqt.launch import runner as runner_mod

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(utils, "read_ray_address", lambda temp_dir=None: None)
    monkeypatch.setattr(services, "find_gcs_addresses", lambda: frozenset({"10.1.2.3:6379"}))
    with pytest.raises(ConfigError) as e:
        runner_mod.resolve_ray_address("auto")
    assert "10.1.2.3:6379" in str(e.value) and "not attached" in str(e.value)
    # found via RAY_ADDRESS, but the head runs as another user: refused unless named explicitly
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6390")
    monkeypatch.setattr(runner_mod, "_gcs_owner", lambda addr: (4242, os.getuid() + 1))
    with pytest.raises(ConfigError, match="pass --ray-address 127.0.0.1:6390"):
        runner_mod.resolve_ray_address("auto")
    monkeypatch.setattr(runner_mod, "_gcs_owner", lambda addr: (4242, os.getuid()))
    monkeypatch.setattr(runner_mod, "check_ray_address", lambda addr, timeout=3.0: None)
    assert runner_mod.resolve_ray_address("auto") == "127.0.0.1:6390"
    assert runner_mod.backend_config(toy_config(tmp_path, ray_address="auto"))["init_args"] == {"address": "127.0.0.1:6390"}


def test_device_profile_with_a_utf8_bom_is_valid(tmp_path):
    from fedaqt.server.budgets import load_device_profile

    p = tmp_path / "profile.csv"
    p.write_bytes("client_id,memory_mib\n0,300\n1,800\n".encode("utf-8-sig"))
    prof = load_device_profile(p, 2)
    assert [prof.budgets[i].memory_mib for i in (0, 1)] == [300, 800]


# ---------------------------------------------------------------------------------------------- item 13
def test_header_widens_when_every_client_failed_in_round_1(tmp_path):
    cfg = toy_config(tmp_path, rounds=2, options={"profile_memory": True})
    Server(cfg, tmp_path).run_rounds(StopAt(6, fail_round=1))
    clients = pd.read_csv(tmp_path / "clients.csv")
    assert list(clients.groupby("round")["status"].apply(lambda s: (s == "ok").sum())) == [0, 3]
    for col in ("pid", "rss_peak_mib", "peak_mib"):
        assert col in clients.columns, col
        assert clients.loc[clients["round"] == 1, col].isna().all()
        assert clients.loc[clients["round"] > 1, col].notna().all()
    with open(tmp_path / "clients.csv", newline="") as f:
        widths = {len(r) for r in csv.reader(f)}
    assert widths == {len(clients.columns)}


def test_csvlog_widening_keeps_old_values_and_digest(tmp_path):
    log = CsvLog(tmp_path / "x.csv", ["round"])
    log.append([{"round": 1, "a": 1.5}])
    before = log.record()
    log.append([{"round": 2, "a": 2.5, "b": "x"}])
    assert (tmp_path / "x.csv").read_text() == "round,a,b\n1,1.5,\n2,2.5,x\n"
    reopened = CsvLog(tmp_path / "x.csv", ["round"])
    assert reopened.record() == log.record() and reopened.rows == 2
    only_first = hashlib.sha256(b'[["a","1.5"],["round","1"]]\n').hexdigest()
    assert before == [1, only_first]


def test_ray_sessions_and_dead_tmp_fallbacks_are_pruned(tmp_path, monkeypatch):
    from fedaqt.launch import runner as runner_mod

    ray_dir = tmp_path / "ray"
    (ray_dir / "session_2026-01-01_00-00-00_1").mkdir(parents=True)
    (ray_dir / "session_latest").symlink_to(ray_dir / "session_2026-01-01_00-00-00_1")
    (ray_dir / "keep.txt").write_text("k")
    assert sorted(runner_mod.prune_ray_sessions(ray_dir)) == ["session_2026-01-01_00-00-00_1", "session_latest"]
    assert [p.name for p in ray_dir.iterdir()] == ["keep.txt"]

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for name, pid in (("fedaqt-ray-dead", dead.pid), ("fedaqt-ray-live", os.getppid())):
        (tmp_path / name).mkdir()
        (tmp_path / name / runner_mod._OWNER_FILE).write_text(str(pid))
    (tmp_path / "fedaqt-ray-unowned").mkdir()
    assert runner_mod.clean_stale_ray_dirs(tmp_path) == [tmp_path / "fedaqt-ray-dead"]
    assert sorted(p.name for p in tmp_path.glob("fedaqt-ray-*")) == ["fedaqt-ray-live", "fedaqt-ray-unowned"]
    monkeypatch.setattr(runner_mod.tempfile, "gettempdir", lambda: str(tmp_path))
    long_dir = tmp_path / ("x" * 60)
    made = runner_mod.ray_temp_dir(long_dir)
    assert made.parent == tmp_path and (made / runner_mod._OWNER_FILE).read_text() == str(os.getpid())
