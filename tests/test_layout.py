"""Issue 10, LAYOUT: what moved must keep working, and the seams between the launcher and the server.

* rounds.csv holds only the columns of the workload in use (generic + ``Workload.eval_columns``), and an older
  rounds.csv with the wider header (the ASR columns every run used to get) still resumes, keeping its header;
* the server reaches the Ray backend only through the hooks the launcher passes to ``make_server_app``;
* ``fedaqt run`` runs ``preflight`` once (``run_experiment`` still runs it for API callers);
* ``fedaqt profile`` validates workload settings by building the workload's model (no per-workload special case).
"""

from __future__ import annotations

import csv
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from fakegrid import FakeGrid
from fedaqt.config import RunConfig
from fedaqt.server.app import Server, make_server_app

pytestmark = pytest.mark.usefixtures("toy_registered")

ROOT = Path(__file__).resolve().parents[1]
#: rounds.csv's leading columns before issue 10: every run got the ASR evaluation columns
OLD_ROUND_COLUMNS = ["round", "train_loss", "eval_loss", "eval_wer", "eval_cer", "real_wer", "real_cer",
                     "bytes_down", "bytes_up", "clients_ok", "clients_sampled", "seconds"]


def toy_config(out: Path, **kw) -> RunConfig:
    base = dict(workload="toy", strategy="fedavgm", algorithm="fedavg", bits=8, local_steps=2, lr=0.1, server_lr=0.3,
                server_momentum=0.9, num_clients=6, clients_per_round=3, rounds=4, eval_every=1, seed=2, out=str(out))
    base.update(kw)
    return RunConfig(**base)


def _header(path: Path) -> list[str]:
    with path.open() as f:
        return next(csv.reader(f))


def test_rounds_csv_has_only_the_workload_columns(tmp_path):
    """The toy workload evaluates ``eval_loss`` only: its rounds.csv starts with exactly the generic columns around
    it and has none of the ASR columns (eval_wer/eval_cer/real_*)."""
    Server(toy_config(tmp_path, rounds=2), tmp_path).run_rounds(FakeGrid(6))
    header = _header(tmp_path / "rounds.csv")
    assert header[:8] == ["round", "train_loss", "eval_loss", "bytes_down", "bytes_up", "clients_ok",
                          "clients_sampled", "seconds"]
    assert not {"eval_wer", "eval_cer", "real_wer", "real_cer"} & set(header)
    df = pd.read_csv(tmp_path / "rounds.csv")
    assert list(df["round"]) == [1, 2] and df["eval_loss"].notna().all() and df["bytes_down"].gt(0).all()


def test_rundir_puts_a_workloads_eval_columns_after_train_loss(tmp_path):
    """An image workload's metrics (names of its own) lead, and a column the workload declares is there from the
    first row even when that row lacks it (no rewrite later)."""
    from fedaqt.report.rundir import RunDir

    run = RunDir(tmp_path, eval_columns=("eval_accuracy", "overflow_rate"))
    run.rounds.append([{"round": 1, "train_loss": 0.5, "bytes_up": 10, "eval_accuracy": 0.25, "extra_stat": 3}])
    assert _header(tmp_path / "rounds.csv") == ["round", "train_loss", "eval_accuracy", "overflow_rate", "bytes_down",
                                                 "bytes_up", "clients_ok", "clients_sampled", "seconds", "extra_stat"]
    assert (tmp_path / "rounds.csv").read_text().splitlines()[1] == "1,0.5,0.25,,,10,,,,3"


def test_old_wide_rounds_csv_still_resumes(tmp_path):
    """A run directory written before issue 10 (rounds.csv with the empty ASR columns) resumes: the kept rows pass
    the checkpoint's digest, the header is kept as it is, and the finished run equals an uninterrupted one."""
    full = tmp_path / "full"
    Server(toy_config(full), full).run_rounds(FakeGrid(6))

    cut = tmp_path / "cut"
    cfg = toy_config(cut)

    class StopAfter2(FakeGrid):
        def send_and_receive(self, messages, timeout=None):
            messages = list(messages)
            if int(messages[0].content["config"]["server-round"]) == 3:
                raise KeyboardInterrupt
            return super().send_and_receive(messages, timeout)

    with pytest.raises(KeyboardInterrupt):
        Server(cfg, cut).run_rounds(StopAfter2(6))
    # rewrite rounds.csv as the old code wrote it: the old leading columns (ASR ones empty), then the rest
    path = cut / "rounds.csv"
    with path.open() as f:
        rows = list(csv.DictReader(f))
    new_header = _header(path)
    old_header = OLD_ROUND_COLUMNS + [c for c in new_header if c not in OLD_ROUND_COLUMNS]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=old_header)
        w.writeheader()
        w.writerows(rows)
    assert _header(path) != new_header

    resumed = Server(cfg, cut, resume=True)
    assert resumed.start_round == 3
    resumed.run_rounds(FakeGrid(6))
    assert _header(path) == old_header
    a, b = pd.read_csv(full / "rounds.csv"), pd.read_csv(path)
    assert list(b["round"]) == [1, 2, 3, 4]
    assert b[["eval_wer", "eval_cer", "real_wer", "real_cer"]].isna().all().all()
    cols = [c for c in a.columns if c not in ("seconds", "server_rss_peak_mib")]  # wall clock, process RSS
    pd.testing.assert_frame_equal(a[cols], b[cols])


def test_server_reaches_the_backend_only_through_the_launchers_hooks(tmp_path):
    """``on_round_end`` once per round, right after the round's replies; ``on_finish`` once, also when the run
    fails."""
    calls: list[str] = []

    class Recording(FakeGrid):
        def send_and_receive(self, messages, timeout=None):
            calls.append("send")
            return super().send_and_receive(messages, timeout)

    cfg = toy_config(tmp_path / "a", rounds=3)
    app = make_server_app(cfg, tmp_path / "a", result={}, on_round_end=lambda: calls.append("round_end"),
                          on_finish=lambda: calls.append("finish"))
    app._main(Recording(6), None)  # the function make_server_app registered with @app.main()
    assert calls == ["send", "round_end"] * 3 + ["finish"]

    class Broken(FakeGrid):
        def send_and_receive(self, messages, timeout=None):
            raise RuntimeError("grid broke")

    calls.clear()
    app = make_server_app(toy_config(tmp_path / "b"), tmp_path / "b", on_round_end=lambda: calls.append("round_end"),
                          on_finish=lambda: calls.append("finish"))
    with pytest.raises(RuntimeError, match="grid broke"):
        app._main(Broken(6), None)
    assert calls == ["finish"]
    # no hooks (API callers, tests): nothing to call
    make_server_app(toy_config(tmp_path / "c", rounds=1), tmp_path / "c")._main(FakeGrid(6), None)


def test_fedaqt_run_preflights_once_and_run_experiment_on_its_own(tmp_path, monkeypatch):
    import flwr.simulation

    from fedaqt.cli import app
    from fedaqt.launch import runner

    def fake(server_app, client_app, num_supernodes, backend_config):
        server_app._main(FakeGrid(num_supernodes), None)

    monkeypatch.setattr(flwr.simulation, "run_simulation", fake)
    seen: list[str] = []
    real = runner.preflight

    def counting(config):
        seen.append(config.out)
        return real(config)

    monkeypatch.setattr(runner, "preflight", counting)
    out = tmp_path / "cli"
    result = CliRunner().invoke(app, ["run", "--workload", "toy", "--strategy", "fedsgd", "--num-clients", "4",
                                      "--clients-per-round", "2", "--rounds", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert seen == [str(out)] and list(pd.read_csv(out / "rounds.csv")["round"]) == [1]

    seen.clear()
    api = tmp_path / "api"
    runner.run_experiment(RunConfig(workload="toy", strategy="fedsgd", num_clients=4, clients_per_round=2, rounds=1,
                                    out=str(api)))
    assert seen == [str(api)]


def test_profile_rejects_a_bad_workload_setting_before_any_process(monkeypatch):
    """``fedaqt profile --model-size huge``: the ASR workload's typed options name the key, the value and the
    allowed sizes; the error comes from the parent (exit code 2), no client round is started."""
    if not (ROOT / "data" / "speech" / "manifest.json").exists() and not (ROOT / "data" / "speech").is_dir():
        pytest.skip("default speech corpus missing (scripts/setup.sh)")
    import fedaqt.launch.profile as profile
    from fedaqt.cli import app

    started: list[dict] = []
    monkeypatch.setattr(profile, "run_in_fresh_process", lambda spec: started.append(spec) or {})
    result = CliRunner().invoke(app, ["profile", "--model-size", "huge", "--bits", "4", "--uplink-bits", "8"])
    assert result.exit_code == 2, result.output
    out = result.output
    assert "model_size='huge'" in out and all(f"'{s}'" in out for s in ("tiny", "small", "large")), out
    assert "Traceback" not in out
    assert started == []
