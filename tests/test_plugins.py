"""Plugin registries (issue 5): built-ins through entry points, the README's example plugin as an installed
distribution selected by name, clear errors for unknown, broken and clashing plugins."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pandas as pd
import pytest

import fedaqt.plugins as plugins
from fedaqt.config import RunConfig
from fedaqt.protocol import BroadcastSpec
from fedaqt.strategies.quantized import QuantizedMixin
from fedaqt.strategies.registry import BUILTIN_STRATEGIES, StrategyPlugin

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "fedaqt-example-plugin"
VENV_BIN = Path(sys.executable).parent
BUILTIN_WORKLOADS = {"asr", "wrapnet"}
BUILTIN_STRATEGY_NAMES = {"fedavg", "fedsgd", "relay", "fedprox", "fedavgm", "fedadam", "fedyogi"}


def _spec(upload: str = "gradient") -> BroadcastSpec:
    return BroadcastSpec(bits=32, granularity="tensor", quantized_keys=frozenset(), param_shapes={"w": (2,)},
                         update_kind=upload or "gradient")


def _env(site: Path) -> dict[str, str]:
    env = dict(os.environ, COLUMNS="250", FLWR_TELEMETRY_ENABLED="0")
    env["PYTHONPATH"] = os.pathsep.join([str(site)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


# ---------------------------------------------------------------------------------------------- built-ins
def test_builtins_register_through_entry_points():
    fedaqt_eps = {g: {ep.name for ep in entry_points(group=g) if ep.dist is not None and ep.dist.name == "fedaqt"}
                  for g in (plugins.WORKLOAD_GROUP, plugins.STRATEGY_GROUP)}
    assert fedaqt_eps[plugins.WORKLOAD_GROUP] >= BUILTIN_WORKLOADS
    assert fedaqt_eps[plugins.STRATEGY_GROUP] >= BUILTIN_STRATEGY_NAMES
    assert set(BUILTIN_STRATEGIES) == BUILTIN_STRATEGY_NAMES
    for name in BUILTIN_STRATEGY_NAMES:
        plugin = plugins.get_strategy_plugin(name)
        assert plugin is BUILTIN_STRATEGIES[name]
        algorithm = {"gradient": "fedsgd", "delta": "fedavg", "": "fedsgd"}[plugin.upload]
        strategy = plugin.factory(RunConfig(strategy=name, algorithm=algorithm), _spec(plugin.upload))
        assert isinstance(strategy, QuantizedMixin) and strategy.spec.update_kind == (plugin.upload or "gradient")
    rows = {(p.name, p.kind): p for p in plugins.list_plugins()}
    for name in BUILTIN_WORKLOADS:
        assert rows[(name, "workload")].source == "fedaqt" and rows[(name, "workload")].description
    for name in BUILTIN_STRATEGY_NAMES:
        assert rows[(name, "strategy")].source == "fedaqt" and rows[(name, "strategy")].description


def test_unknown_names_list_known_ones():
    with pytest.raises(plugins.UnknownPluginError) as e:
        plugins.get_workload_class("nope")
    assert "asr" in str(e.value) and "wrapnet" in str(e.value)
    with pytest.raises(plugins.UnknownPluginError) as e:
        plugins.get_strategy_plugin("nope")
    assert all(n in str(e.value) for n in BUILTIN_STRATEGY_NAMES)


# ---------------------------------------------------------------------------------------------- example plugin
def test_example_plugin_is_found_by_name(with_example):
    workload = plugins.get_workload_class("blobs")
    assert workload.__module__ == "fedaqt_example_plugin"
    plugin = plugins.get_strategy_plugin("fedadagrad")
    assert isinstance(plugin, StrategyPlugin) and plugin.upload == ""
    strategy = plugin.factory(RunConfig(server_lr=0.2, lr=0.3), _spec())
    assert isinstance(strategy, QuantizedMixin) and (strategy.eta, strategy.eta_l) == (0.2, 0.3)
    rows = {(p.name, p.kind): p for p in plugins.list_plugins()}
    assert rows[("blobs", "workload")].source == "fedaqt-example-plugin"
    assert rows[("fedadagrad", "strategy")].source == "fedaqt-example-plugin"
    assert "FedAdagrad" in rows[("fedadagrad", "strategy")].description


def test_cli_plugins_list_shows_builtins_and_example(example_site):
    res = subprocess.run([str(VENV_BIN / "fedaqt"), "plugins", "list"], env=_env(example_site),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    lines = {line.split("│")[1].strip(): line for line in res.stdout.splitlines() if line.count("│") >= 4}
    for name in BUILTIN_WORKLOADS | BUILTIN_STRATEGY_NAMES:
        assert name in lines and "fedaqt" in lines[name], name
    for name, kind in (("blobs", "workload"), ("fedadagrad", "strategy")):
        assert kind in lines[name] and "fedaqt-example-plugin" in lines[name]
    for preset in ("default", "smoke", "relay-int4", "wrapnet-fmnist"):
        assert preset in lines


def test_example_plugin_trains_in_process(with_example, tmp_path):
    """The example workload + strategy through the real server loop and client code (no Ray)."""
    import torch

    from fakegrid import FakeGrid
    from fedaqt.server.app import Server

    torch.set_num_threads(1)
    cfg = RunConfig(workload="blobs", strategy="fedadagrad", algorithm="fedavg", bits=8, local_steps=3, lr=0.1,
                    server_lr=0.1, num_clients=4, clients_per_round=2, rounds=3, batch_size=16, eval_every=1,
                    out=str(tmp_path))
    server = Server(cfg, tmp_path)
    assert server.spec.quantized_keys == {"0.weight"}
    summary = server.run_rounds(FakeGrid(4))
    rounds = pd.read_csv(tmp_path / "rounds.csv")
    clients = pd.read_csv(tmp_path / "clients.csv")
    assert list(rounds["round"]) == [1, 2, 3] and (clients.status == "ok").all()
    assert summary["final_eval_accuracy"] > summary["first_eval_accuracy"]


@pytest.mark.slow
def test_cli_run_with_example_plugin_on_ray(example_site, tmp_path):
    """`fedaqt run --workload blobs --strategy fedadagrad` with the plugin installed: Ray actors import it too."""
    import tempfile

    out = Path(tempfile.mkdtemp(prefix="fqp-", dir="/tmp"))  # short: Ray's sockets live in out/ray
    try:
        res = subprocess.run(
            [str(VENV_BIN / "fedaqt"), "run", "--workload", "blobs", "--strategy", "fedadagrad", "--algorithm", "fedavg",
             "--bits", "8", "--local-steps", "2", "--lr", "0.1", "--server-lr", "0.1", "--num-clients", "4",
             "--clients-per-round", "2", "--rounds", "2", "--batch-size", "16", "--eval-every", "1", "--out", str(out)],
            env=_env(example_site), capture_output=True, text=True, timeout=300, start_new_session=True,
        )
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        rounds = pd.read_csv(out / "rounds.csv")
        clients = pd.read_csv(out / "clients.csv")
        assert list(rounds["round"]) == [1, 2] and rounds["eval_accuracy"].notna().all()
        assert (clients.status == "ok").all() and len(clients) == 4
    finally:
        shutil.rmtree(out, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- bad plugins
def _fake_dist(site: Path, name: str, entry_points_txt: str) -> None:
    info = site / f"{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(entry_points_txt)


def test_broken_and_clashing_plugins_are_clear_errors(tmp_path, monkeypatch):
    _fake_dist(tmp_path, "bad-plugin", "[fedaqt.workloads]\nnotaworkload = json:dumps\nmissing = no_such_module_xyz:W\n"
                                       "[fedaqt.strategies]\nnotastrategy = json:dumps\n")
    _fake_dist(tmp_path, "clash-one", "[fedaqt.workloads]\ntwin = json:dumps\n")
    _fake_dist(tmp_path, "clash-two", "[fedaqt.workloads]\ntwin = json:loads\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(plugins.PluginLoadError, match="bad-plugin.*not a subclass"):
        plugins.get_workload_class("notaworkload")
    with pytest.raises(plugins.PluginLoadError, match="no_such_module_xyz"):
        plugins.get_workload_class("missing")
    with pytest.raises(plugins.PluginLoadError, match="notastrategy.*bad-plugin"):
        plugins.get_strategy_plugin("notastrategy")
    with pytest.raises(plugins.PluginLoadError, match="clash-one, clash-two"):
        plugins.get_workload_class("twin")
    rows = {(p.name, p.kind): p for p in plugins.list_plugins()}  # listing never fails
    assert "failed to load" in rows[("missing", "workload")].description
    assert "clash" in rows[("twin", "workload")].source
    assert rows[("asr", "workload")].source == "fedaqt"


@pytest.mark.parametrize("group, name, get", [
    ("fedaqt.algorithms", "fedavg", "get_algorithm_class"),
    ("fedaqt.workloads", "asr", "get_workload_class"),
    ("fedaqt.strategies", "relay", "get_strategy_plugin"),
])
def test_a_plugin_cannot_shadow_a_builtin_name(tmp_path, monkeypatch, group, name, get):
    """Another package registering a built-in name is a clash naming both, whether or not fedaqt's own entry
    points are installed (an editable install older than a group falls back to the built-in table)."""
    _fake_dist(tmp_path, "shadow-plugin", f"[{group}]\n{name} = json:dumps\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(plugins.PluginLoadError, match=f"{name}.*several packages.*fedaqt.*shadow-plugin"):
        getattr(plugins, get)(name)


def test_readme_shows_the_tested_example():
    readme = (ROOT / "README.md").read_text()
    code = (EXAMPLE / "fedaqt_example_plugin" / "__init__.py").read_text().rstrip("\n")
    assert code in readme
    for line in (EXAMPLE / "pyproject.toml").read_text().splitlines():
        if line.startswith(("blobs =", "fedadagrad =", "localprox =")):
            assert line in readme
