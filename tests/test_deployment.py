"""Issue 15, must-show 1: the Flower app on the Deployment Engine (a SuperLink + two SuperNodes, ``flwr run``).

The end-to-end test starts ``flower-superlink --insecure`` and two ``flower-supernode --insecure`` as subprocesses
(free ports, own temp dirs, ``FLWR_HOME`` in a temp dir, telemetry off), submits the tiny ASR job with
``flwr run . CONNECTION --stream``, and compares its rounds.csv / clients.csv with the Simulation Engine run of the
same configuration and seed (``fedaqt run``'s :func:`fedaqt.launch.runner.run_experiment`) on every deterministic
column (not the timings, pids, node ids). Every process it started is stopped by its process-group id (the PID it
started; the SuperLink's ``flower-superexec`` children are in that group) in a ``finally`` block.

Cost: each ClientApp message runs in a fresh ``flwr-clientapp`` process (imports torch, builds the model), so a
round costs seconds of process start-up per client on top of training: the whole test took 348 s on this shared
2-core machine at load 7-9 (the SuperLink run about 4 min of it). Marked ``slow``; the ~90 s target is not reachable
here. It passed the time it ran as a test (and the same flow by hand before).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from fedaqt.app import config_from_run_config, parse_options
from fedaqt.config import ConfigError, RunConfig

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

#: rounds.csv / clients.csv columns that depend only on the configuration and seed
ROUND_COLUMNS = ["round", "train_loss", "eval_loss", "eval_wer", "eval_cer", "bytes_down", "bytes_up", "clients_ok",
                 "clients_sampled", "update_rejected"]
CLIENT_COLUMNS = ["round", "client_id", "status", "num_examples", "train_loss", "bytes_up", "upload_bytes"]


# ---------------------------------------------------------------------------------------------- run config
def _pyproject_run_config() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # pragma: no cover
        import tomli as tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def test_pyproject_run_config_is_runconfig_with_its_defaults():
    """[tool.flwr.app.config] holds every RunConfig field at RunConfig's default, plus preset/config/options."""
    table = _pyproject_run_config()
    defaults = RunConfig().to_dict()
    defaults.pop("options")
    assert set(table) == set(defaults) | {"preset", "config", "options"}
    for k, v in defaults.items():
        assert table[k] == v and type(table[k]) is type(v), k
    assert config_from_run_config(table) == RunConfig()


def test_run_config_is_validated_like_fedaqt_run(tmp_path):
    table = _pyproject_run_config()
    cfg = config_from_run_config({**table, "num_clients": 4, "clients_per_round": 2,
                                  "options": "eval_max=4 real_eval=false data_dir='/x y'"})
    assert (cfg.num_clients, cfg.clients_per_round) == (4, 2)
    assert cfg.options == {"eval_max": 4, "real_eval": False, "data_dir": "/x y"}
    with pytest.raises(ConfigError, match="num_clientz"):
        config_from_run_config({**table, "num_clientz": 3})
    with pytest.raises(ConfigError, match="bits"):
        config_from_run_config({**table, "bits": "eight"})
    with pytest.raises(ConfigError, match="must be KEY=VALUE"):
        parse_options("eval_max")
    # a preset: only the keys that differ from the defaults override it (as `fedaqt run --preset smoke --rounds 3`)
    from fedaqt.config import resolve_config

    got = config_from_run_config({**table, "preset": "smoke", "rounds": 3})
    assert got == resolve_config("smoke", None, {"rounds": 3})
    # range checks are preflight's, as for `fedaqt run`: a bad value fails before any file is written
    from fedaqt.launch.runner import preflight

    with pytest.raises(ConfigError, match="clients_per_round"):
        preflight(config_from_run_config({**table, "num_clients": 2, "clients_per_round": 3,
                                          "out": str(tmp_path / "r")}))
    assert not (tmp_path / "r").exists()


def test_app_components_are_the_simulation_objects():
    """`flwr run` loads the components of pyproject.toml; the ClientApp is the one run_simulation gets."""
    try:
        import tomllib
    except ModuleNotFoundError:  # pragma: no cover
        import tomli as tomllib
    import importlib

    comps = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["components"]
    objs = {}
    for name, ref in comps.items():
        mod, attr = ref.split(":")
        objs[name] = getattr(importlib.import_module(mod), attr)
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    import fedaqt.client.app

    assert objs["clientapp"] is fedaqt.client.app.app and isinstance(objs["clientapp"], ClientApp)
    assert isinstance(objs["serverapp"], ServerApp)


@pytest.mark.usefixtures("toy_registered")
def test_server_app_main_runs_the_round_loop_of_fedaqt_run(tmp_path):
    """The Flower app's ServerApp body on an in-process grid (toy workload): the same rounds.csv and model as
    fedaqt run's Server; an earlier run in `out` is set aside and put back when the new one fails before round 1;
    a bad run config fails before anything is written."""
    from flwr.app import Context, RecordDict

    from fakegrid import FakeGrid
    from fedaqt import app as flower_app
    from fedaqt.server.app import Server

    table = _pyproject_run_config()
    kw = dict(workload="toy", strategy="fedavgm", algorithm="fedavg", bits=8, local_steps=2, lr=0.1, server_lr=0.3,
              server_momentum=0.9, num_clients=6, clients_per_round=3, rounds=2, eval_every=1, seed=2)

    def ctx(**over):
        return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={**table, **kw, **over})

    out = tmp_path / "app"
    flower_app.main(FakeGrid(6), ctx(out=str(out)))
    ref = Server(RunConfig(**kw, out=str(tmp_path / "ref")), tmp_path / "ref")
    ref.run_rounds(FakeGrid(6))
    a, b = pd.read_csv(out / "rounds.csv"), pd.read_csv(tmp_path / "ref" / "rounds.csv")
    cols = [c for c in a.columns if c not in ("seconds", "server_rss_peak_mib")]  # wall clock, process RSS
    pd.testing.assert_frame_equal(a[cols], b[cols])
    assert RunConfig.from_mapping(__import__("json").loads((out / "config.json").read_text())).rounds == 2
    before = (out / "rounds.csv").read_bytes()

    class Broken(FakeGrid):
        def send_and_receive(self, messages, timeout=None):
            raise RuntimeError("link down")

    with pytest.raises(RuntimeError, match="link down"):
        flower_app.main(Broken(6), ctx(out=str(out)))
    assert (out / "rounds.csv").read_bytes() == before  # the earlier run is back
    with pytest.raises(ConfigError, match="clients_per_round"):
        flower_app.main(FakeGrid(6), ctx(out=str(tmp_path / "bad"), clients_per_round=9))
    assert not (tmp_path / "bad").exists()


def test_fab_holds_the_package_only():
    """The FAB Flower builds from this directory: fedaqt's sources and presets, no tests/data/runs, < 1 MB."""
    import io
    import zipfile

    from flwr.cli.build import build_fab_from_disk

    fab = build_fab_from_disk(ROOT)
    names = zipfile.ZipFile(io.BytesIO(fab)).namelist()
    assert "fedaqt/app.py" in names and "fedaqt/presets/default.toml" in names and "pyproject.toml" in names
    assert not [n for n in names if n.startswith(("tests/", "data/", "runs/", "bench/", ".venv"))]
    assert len(fab) < 1_000_000


def test_example_connections_parse_with_flowers_reader():
    """examples/flwr/config.toml: the two SuperLink connections, as Flower 1.42's own parser reads them."""
    try:
        import tomllib
    except ModuleNotFoundError:  # pragma: no cover
        import tomli as tomllib
    from flwr.cli.flower_config import parse_superlink_connection

    table = tomllib.loads((ROOT / "examples" / "flwr" / "config.toml").read_text())["superlink"]
    assert table["default"] == "local-simulation"
    sim = parse_superlink_connection(table["local-simulation"], "local-simulation")
    dep = parse_superlink_connection(table["local-deployment"], "local-deployment")
    assert sim.options is not None and sim.options.num_supernodes >= RunConfig().num_clients
    assert dep.address == "127.0.0.1:9093" and dep.insecure


# ---------------------------------------------------------------------------------------------- end to end
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(port: int, procs: list, deadline_s: float = 60.0) -> None:
    import httpx

    t_end = time.monotonic() + deadline_s
    while time.monotonic() < t_end:
        for p, log in procs:
            if p.poll() is not None:
                raise RuntimeError(f"a Flower process exited with {p.returncode}:\n{Path(log).read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1.0).is_success:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the SuperLink did not answer on port {port} within {deadline_s:g} s")


def _stop(procs: list) -> None:
    """SIGTERM each started process group (its id is the PID started), SIGKILL what is left after 15 s."""
    for p, _ in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    t_end = time.monotonic() + 15
    for p, _ in procs:
        try:
            p.wait(timeout=max(0.1, t_end - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for p, _ in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # also children still in the group (superexec, clientapp)
        except ProcessLookupError:
            pass
        p.wait(timeout=10)


def flwr_run_on_superlink(tmp_path: Path, run_config: dict, options: dict, out: Path, supernodes: int = 2) -> None:
    """``flwr run`` of this app on a local insecure SuperLink with ``supernodes`` SuperNodes (node config
    ``partition-id=i num-partitions=N``), all started as subprocesses in their own process groups under
    ``tmp_path`` (logs in ``tmp_path/<name>/log.txt``) and stopped by group id at the end, run or not.
    ``run_config`` / ``options`` become ``--run-config`` keys / the ``options`` string; the run writes ``out``.
    Asserts that ``flwr run`` exits 0, that ``out/summary.json`` appears, and that every process has ended."""
    home = tmp_path / "flwr-home"
    home.mkdir()
    port = _free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "OMP_NUM_THREADS": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONPATH": str(ROOT)}
    procs: list = []

    def start(name: str, args: list[str]) -> None:
        d = tmp_path / name
        d.mkdir()
        log = d / "log.txt"
        with log.open("w") as f:
            p = subprocess.Popen([str(BIN / args[0]), *args[1:]], cwd=d, env=env, stdout=f, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        procs.append((p, log))

    try:
        start("superlink", ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(port),
                            "--disable-runtime-dependency-installation"])
        _wait_http(port, procs)
        for i in range(supernodes):
            start(f"supernode{i}", ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{port}",
                                    "--port", str(_free_port()), "--node-config",
                                    f"partition-id={i} num-partitions={supernodes}"])
        overrides = " ".join(f"{k}={v}" for k, v in run_config.items())
        opts = " ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in options.items())
        cmd = [str(BIN / "flwr"), "run", str(ROOT), "test", "--stream",
               "--run-config", f"{overrides} out='{out}' options='{opts}'"]
        res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        t_end = time.monotonic() + 60  # --stream returns when the run ends; summary.json is its last write
        while not (out / "summary.json").exists() and time.monotonic() < t_end:
            time.sleep(0.5)
        assert (out / "summary.json").exists(), res.stdout[-3000:]
    finally:
        _stop(procs)
    assert all(p.poll() is not None for p, _ in procs)


@pytest.mark.slow
def test_flwr_run_on_superlink_equals_simulation(tmp_path):
    speech = ROOT / "data" / "speech"
    if not (speech / "corpus.json").exists():
        pytest.skip("the speech corpus (data/speech) is not built")
    tiny = dict(num_clients=2, clients_per_round=2, rounds=2, batch_size=2, bits=4, eval_every=1, uplink_bits=8)
    opts = {"eval_max": 4, "data_dir": str(speech), "real_eval": False}

    # reference: the Simulation Engine (fedaqt run's path)
    from fedaqt.launch.runner import run_experiment

    sim_out = tmp_path / "sim"
    run_experiment(RunConfig(**tiny, out=str(sim_out), options=opts))

    dep_out = tmp_path / "dep"
    flwr_run_on_superlink(tmp_path, tiny, opts, dep_out)

    sim, dep = pd.read_csv(sim_out / "rounds.csv"), pd.read_csv(dep_out / "rounds.csv")
    cols = [c for c in ROUND_COLUMNS if c in sim]
    assert list(dep["round"]) == [1, 2] and (dep["clients_ok"] == 2).all()
    pd.testing.assert_frame_equal(dep[cols], sim[cols])
    simc = pd.read_csv(sim_out / "clients.csv").sort_values(["round", "client_id"]).reset_index(drop=True)
    depc = pd.read_csv(dep_out / "clients.csv").sort_values(["round", "client_id"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(depc[CLIENT_COLUMNS], simc[CLIENT_COLUMNS])
    # the clients ran in the SuperNodes' flwr-clientapp processes, not in the Ray workers of the reference run
    assert not set(depc["pid"]) & set(simc["pid"])
