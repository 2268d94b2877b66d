"""Typed options (issue 10, must-show 5): every -o key declared by core / workload / strategy / algorithm as a
pydantic model; unknown keys and bad values fail before Ray starts naming the key; `fedaqt plugins show`; the
ASR/partition settings moved out of RunConfig, with old config.json files and checkpoints migrated."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import pandas as pd
import pytest
import torch
from pydantic import BaseModel, ConfigDict, Field
from typer.testing import CliRunner

from fedaqt.config import ConfigError, RunConfig, resolve_config, resolve_resume_config
from fedaqt.options import BaseOptions, CoreOptions, describe_options, options_for
from fedaqt.plugins import check_options
from toy import ToyWorkload

runner = CliRunner()

#: (type of options.scale, value) that every TypedToy instance saw when it built client batches
SEEN: list[tuple[type, int]] = []


class TypedToy(ToyWorkload):
    """The toy workload with one typed option that changes its data (so a wrong value would show)."""

    name = "typedtoy"

    class Options(BaseOptions):
        scale: int = Field(1, ge=1, le=100, description="multiplies the client inputs")

    def client_batches(self, client_id, round_num, num_batches, batch_size):
        SEEN.append((type(self.options.scale), self.options.scale))
        return [(x * self.options.scale, y) for x, y in super().client_batches(client_id, round_num, num_batches, batch_size)]


def _flat(text: str) -> str:
    return " ".join(text.replace("│", " ").split())


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if anything would start Ray or a simulation."""
    import flwr.simulation
    import ray

    import fedaqt.launch.runner as sim_runner

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray must not start on bad input"))
    monkeypatch.setattr(flwr.simulation, "run_simulation", lambda *a, **k: pytest.fail("no simulation on bad input"))
    monkeypatch.setattr(sim_runner, "run_experiment", lambda *a, **k: pytest.fail("run_experiment reached"))


@pytest.fixture
def typed_registered(monkeypatch, toy_registered):
    import fedaqt.plugins as plugins

    monkeypatch.setitem(plugins._BUILTIN_WORKLOADS, "typedtoy", "test_options:TypedToy")
    SEEN.clear()


TOY = ["--workload", "toy", "--strategy", "fedavgm", "--algorithm", "fedavg", "--num-clients", "6",
       "--clients-per-round", "3"]


# ---------------------------------------------------------------------------------------------- CLI, before Ray
def test_unknown_option_fails_before_ray_naming_key_hint_and_every_allowed_key(tmp_path, no_ray, toy_registered):
    from fedaqt.cli import app

    # asr workload; --from-scratch: the core defaults (fedsgd) whether or not runs/pretrained exists
    res = runner.invoke(app, ["run", "--from-scratch", "--out", str(tmp_path / "r"), "-o", "eval_maxx=3"])
    out = _flat(res.output)
    assert res.exit_code == 2, res.output
    assert "unknown option 'eval_maxx'" in out and "did you mean eval_max?" in out
    assert "core: round_timeout, max_nonfinite_rounds, profile_memory" in out
    assert "workload asr: data_dir, model_size" in out and "strategy fedsgd: (none)" in out
    assert not (tmp_path / "r").exists()

    res = runner.invoke(app, ["run", *TOY, "--out", str(tmp_path / "t"), "-o", "local_epoch=10"])
    out = _flat(res.output)
    assert res.exit_code == 2, res.output
    assert "unknown option 'local_epoch'" in out and "workload toy: (none)" in out
    assert not (tmp_path / "t").exists()


def test_typo_local_epoch_suggests_local_epochs_when_fedavg_declares_it(tmp_path, no_ray, toy_registered):
    """Needs ALGO's client-algorithm plugins (fedavg declares local_epochs); the lead enables it at merge."""
    import fedaqt.plugins as plugins

    get_alg = getattr(plugins, "get_algorithm_class", None)
    if get_alg is None or "local_epochs" not in getattr(get_alg("fedavg"), "Options").model_fields:
        pytest.skip("client-algorithm plugins not merged yet (issue 10, ALGO part)")
    from fedaqt.cli import app

    res = runner.invoke(app, ["run", *TOY, "--out", str(tmp_path / "t"), "-o", "local_epoch=10"])
    out = _flat(res.output)
    assert res.exit_code == 2 and "unknown option 'local_epoch'" in out and "did you mean local_epochs?" in out
    assert "algorithm fedavg:" in out


@pytest.mark.parametrize(
    "args, needle",
    [
        (["-o", "eval_max=-1"], "option eval_max=-1 (workload asr) is not allowed: must be an integer >= 1"),
        (["-o", "eval_max=2.5"], "option eval_max=2.5 (workload asr) is not allowed: must be an integer >= 1"),
        (["-o", "model_size=huge"], "option model_size='huge' (workload asr) is not allowed: must be one of 'tiny', 'small', 'large'"),
        (["--model-size", "huge"], "option model_size='huge' (workload asr)"),  # the shortcut flag sets the option
        (["-o", "real_eval=maybe"], "option real_eval='maybe' (workload asr) is not allowed: must be true or false"),
        (["-o", "max_nonfinite_rounds=true"], "option max_nonfinite_rounds=True (core) is not allowed: must be an integer >= 1"),
        (["-o", "round_timeout=Infinity"], "option round_timeout=inf (core) is not allowed: must be a finite number > 0"),
        (["--strategy", "fedprox", "--algorithm", "fedavg", "-o", "proximal_mu=-0.5"],
         "option proximal_mu=-0.5 (strategy fedprox) is not allowed: must be a finite number >= 0"),
        (["--strategy", "fedyogi", "--algorithm", "fedavg", "-o", "beta_2=1"],
         "option beta_2=1 (strategy fedyogi) is not allowed: must be a finite number >= 0 and < 1"),
    ],
)
def test_bad_option_value_fails_before_ray_naming_key_value_range_and_owner(tmp_path, no_ray, args, needle):
    from fedaqt.cli import app

    res = runner.invoke(app, ["run", "--out", str(tmp_path / "r"), *args])
    assert res.exit_code == 2, res.output
    assert needle in _flat(res.output)
    assert not (tmp_path / "r").exists()


def test_run_help_lists_the_core_options():
    from fedaqt.cli import app

    out = _flat(runner.invoke(app, ["run", "--help"], env={"COLUMNS": "200"}).output)
    assert "round_timeout" in out and "max_nonfinite_rounds" in out and "profile_memory" in out
    assert "plugins show" in out


# ---------------------------------------------------------------------------------------------- plugins show
def _show(name: str):
    from fedaqt.cli import app

    return runner.invoke(app, ["plugins", "show", name], env={"COLUMNS": "200"})


def test_plugins_show_prints_kind_source_description_and_options():
    res = _show("fedprox")
    out = _flat(res.output)
    assert res.exit_code == 0, res.output
    assert "fedprox (strategy, from fedaqt): FedProx" in out
    assert "proximal_mu float 0.01 a finite number >= 0 weight mu" in out

    out = _flat(_show("wrapnet").output)
    assert "wrapnet (workload, from fedaqt)" in out
    assert "partition choice \"iid\" one of 'iid', 'dirichlet'" in out
    assert "act_bits int 8 an integer >= 1 and <= 8" in out and "alpha float 0.5 a finite number > 0" in out

    out = _flat(_show("core").output)
    assert "round_timeout float 3600.0 a finite number > 0" in out and "max_nonfinite_rounds int 3" in out

    out = _flat(_show("fedsgd").output)
    assert "fedsgd (strategy, from fedaqt)" in out and "options: (none)" in out


def test_plugins_show_fedavg_shows_every_kind():
    import fedaqt.plugins as plugins

    out = _flat(_show("fedavg").output)
    assert "fedavg (strategy, from fedaqt)" in out
    if getattr(plugins, "get_algorithm_class", None) is None:
        pytest.skip("client-algorithm plugins not merged yet: the algorithm table is checked after the merge")
    assert "fedavg (algorithm, from fedaqt)" in out
    assert "local_epochs" in out and "momentum" in out


def test_plugins_show_unknown_name_exits_2_listing_known_names():
    res = _show("fedaavg")
    out = _flat(res.output)
    assert res.exit_code == 2
    assert "unknown plugin 'fedaavg'" in out and "core" in out and "fedavg" in out and "asr" in out and "wrapnet" in out


# ---------------------------------------------------------------------------------------------- options_for
class _Model(BaseModel):  # a third-party style model: plain BaseModel, extra forbidden
    model_config = ConfigDict(extra="forbid")

    n: int = Field(4, ge=1, description="an int")
    x: float = Field(0.5, gt=0, lt=1, description="a fraction")
    flag: bool = Field(False, description="a bool")
    mode: Literal["a", "b"] = Field("a", description="a choice")
    w: Optional[float] = Field(None, gt=0, description="optional")


def test_options_for_types_values_like_the_cli_delivers_them():
    got = options_for(_Model, {"n": "7", "x": "0.25", "flag": "yes", "mode": "b", "w": 2, "other": 1}, "workload t")
    assert (got.n, got.x, got.flag, got.mode, got.w) == (7, 0.25, True, "b", 2.0)
    assert type(got.n) is int and type(got.x) is float and type(got.w) is float
    assert options_for(_Model, {}, "x") == _Model()  # defaults; keys of other owners are not this model's business


@pytest.mark.parametrize(
    "key, value, allowed",
    [
        ("n", 0, "an integer >= 1"),
        ("n", True, "an integer >= 1"),  # pydantic's lax mode would take True as 1
        ("n", "three", "an integer >= 1"),
        ("n", 2.5, "an integer >= 1"),
        ("x", 1.0, "a number > 0 and < 1"),
        ("x", False, "a number > 0 and < 1"),
        ("flag", "maybe", "true or false"),
        ("mode", "c", "one of 'a', 'b'"),
        ("w", -1.0, "a number > 0 or null"),
    ],
)
def test_options_for_error_names_key_value_owner_and_range(key, value, allowed):
    with pytest.raises(ConfigError) as e:
        options_for(_Model, {key: value}, "algorithm demo")
    assert str(e.value) == f"option {key}={value!r} (algorithm demo) is not allowed: must be {allowed}"


def test_core_options_refuse_nan_and_inf_and_match_the_old_defaults():
    for bad in (float("nan"), float("inf"), -1, 0):
        with pytest.raises(ConfigError, match="round_timeout"):
            options_for(CoreOptions, {"round_timeout": bad}, "core")
    core = CoreOptions()
    assert (core.round_timeout, core.max_nonfinite_rounds, core.profile_memory) == (3600.0, 3, False)


def test_describe_options_rows():
    rows = describe_options(_Model)
    assert [r.key for r in rows] == ["n", "x", "flag", "mode", "w"]
    assert rows[0] == ("n", "int", 4, "an integer >= 1", "an int")
    assert rows[3].type == "choice" and rows[3].allowed == "one of 'a', 'b'"
    assert rows[4].type == "float|None" and rows[4].default is None


def test_every_builtin_option_has_a_default_and_one_line_help():
    from fedaqt.plugins import get_strategy_plugin, get_workload_class, strategy_names

    models = [CoreOptions, get_workload_class("asr").Options, get_workload_class("wrapnet").Options]
    models += [get_strategy_plugin(n).Options for n in strategy_names()]
    for model in models:
        assert model.model_config.get("extra") == "forbid", model
        for key, field in model.model_fields.items():
            assert not field.is_required(), (model, key)
            assert field.description and "\n" not in field.description, (model, key)
            model.model_validate({})  # the defaults are valid


# ---------------------------------------------------------------------------------------------- check_options
def test_check_options_splits_the_table_by_owner():
    cfg = RunConfig(strategy="fedadam", algorithm="fedavg",
                    options={"eval_max": "8", "tau": "0.01", "round_timeout": 10, "model_size": "small"})
    typed = check_options(cfg)
    assert typed["core"].round_timeout == 10.0
    assert typed["workload asr"].eval_max == 8 and typed["workload asr"].model_size == "small"
    assert typed["strategy fedadam"].tau == 0.01 and typed["strategy fedadam"].beta_1 == 0.9


def test_a_key_two_owners_declare_needs_one_type(monkeypatch):
    import fedaqt.plugins as plugins
    import fedaqt.strategies.registry as registry

    real = plugins.get_strategy_plugin

    def with_options(model):
        def get(name):
            plug = real(name)
            return registry.StrategyPlugin(plug.factory, plug.upload, plug.description, model) if name == "fedavgm" else plug
        return get

    class SameType(BaseOptions):
        eval_max: int = Field(10, ge=5, description="shared with the asr workload")

    class OtherType(BaseOptions):
        eval_max: float = Field(10.0, description="shared with the asr workload, other type")

    monkeypatch.setattr(plugins, "get_strategy_plugin", with_options(SameType))
    typed = check_options(RunConfig(strategy="fedavgm", algorithm="fedavg", options={"eval_max": 6}))
    assert typed["workload asr"].eval_max == 6 and typed["strategy fedavgm"].eval_max == 6  # both get the value
    with pytest.raises(ConfigError, match=r"option eval_max=3 \(strategy fedavgm\) is not allowed: must be an integer >= 5"):
        check_options(RunConfig(strategy="fedavgm", algorithm="fedavg", options={"eval_max": 3}))  # each its own range
    monkeypatch.setattr(plugins, "get_strategy_plugin", with_options(OtherType))
    with pytest.raises(ConfigError) as e:
        check_options(RunConfig(strategy="fedavgm", algorithm="fedavg"))
    assert "'eval_max' is declared by workload asr as int and by strategy fedavgm as float" in str(e.value)


# ---------------------------------------------------------------------------------------------- typed in the workload
def test_workload_option_reaches_the_workload_typed_on_server_and_clients(tmp_path, typed_registered):
    """"3" (a TOML/JSON string) arrives as the int 3 in the workload, also in the client rebuilt from the broadcast
    config; the data it scales prove it is used (an independent run with scale 1 differs)."""
    from fakegrid import FakeGrid

    from fedaqt.server.app import Server

    def run(scale, out):
        cfg = RunConfig(workload="typedtoy", strategy="fedavgm", algorithm="fedavg", bits=8, local_steps=2, lr=0.1,
                        num_clients=6, clients_per_round=3, rounds=2, eval_every=1, seed=2, out=str(out),
                        options={"scale": scale})
        Server(cfg.validate(), out).run_rounds(FakeGrid(6))
        return pd.read_csv(out / "rounds.csv")

    three = run("3", tmp_path / "a")
    assert SEEN and set(SEEN) == {(int, 3)}  # every client round saw the int 3
    SEEN.clear()
    one = run(1, tmp_path / "b")
    assert set(SEEN) == {(int, 1)}
    assert not np.allclose(three["train_loss"], one["train_loss"])


def test_asr_options_typed_and_defaults_equal_the_old_runconfig_fields():
    from fedaqt.workloads.asr import ASRWorkload

    w = ASRWorkload(RunConfig(options={"eval_max": "8", "real_eval": "off", "speaker_offset": 2}))
    assert w.eval_max == 8 and type(w.eval_max) is int and w.options.real_eval is False and w.speaker_offset == 2
    d = ASRWorkload(RunConfig()).options
    # the values RunConfig had as fields before they became asr options
    assert (d.data_dir, d.model_size, d.real_eval, d.real_eval_max, d.partition) == ("data/speech", "tiny", True, 120, "speaker")
    assert (d.eval_max, d.train_subset, d.eval_subset, d.dropout, d.init_checkpoint) == (64, "train", "dev", 0.1, "")


def test_wrapnet_partition_options_give_the_same_splits_as_the_partition_functions():
    from fedaqt.data.partition import PartitionOptions, dirichlet_partition, iid_partition, partition_indices
    from fedaqt.workloads.wrapnet import WrapNetWorkload

    assert issubclass(WrapNetWorkload.Options, PartitionOptions)
    labels = np.random.default_rng(0).integers(0, 10, 500)
    got = partition_indices(PartitionOptions(partition="dirichlet", alpha=0.3), torch.from_numpy(labels), 7, 4)
    ref = dirichlet_partition(labels, 7, 0.3, 4)
    assert all(np.array_equal(a, b) for a, b in zip(got, ref, strict=True))
    got = partition_indices(PartitionOptions(), labels, 7, 4)
    assert all(np.array_equal(a, b) for a, b in zip(got, iid_partition(500, 7, 4), strict=True))
    with pytest.raises(ConfigError, match="option partition='speaker' \\(workload wrapnet\\)"):
        WrapNetWorkload(RunConfig(workload="wrapnet", options={"partition": "speaker"}))


# ---------------------------------------------------------------------------------------------- migration
#: what RunConfig.save wrote before this change (every field; the six below were top-level then)
def _old_config(**kw) -> dict:
    d = RunConfig().to_dict()
    d.update({"data_dir": "data/speech", "model_size": "tiny", "real_eval": True, "real_eval_max": 120,
              "partition": "speaker", "alpha": 0.5})
    d.update(kw)
    return d


def test_old_config_json_is_migrated_into_options(tmp_path, caplog):
    p = tmp_path / "config.json"
    p.write_text(json.dumps(_old_config(model_size="small", real_eval=False, data_dir="/d", seed=4,
                                        options={"eval_max": 8}), indent=2))
    with caplog.at_level(logging.INFO, logger="fedaqt.config"):
        cfg = resolve_config(None, str(p), {})
    assert cfg.seed == 4
    assert cfg.options == {"eval_max": 8, "model_size": "small", "real_eval": False, "data_dir": "/d"}
    assert not hasattr(cfg, "model_size") and "model_size" not in cfg.to_dict()
    moved = [r for r in caplog.records if "moved into options" in r.getMessage()]
    assert len(moved) == 1 and "model_size" in moved[0].getMessage()
    cfg.validate()  # the migrated options are valid asr options
    # an old file with only default values is the default run
    p.write_text(json.dumps(_old_config()))
    assert resolve_config(None, str(p), {}) == RunConfig()


def test_old_wrapnet_config_keeps_its_partition_and_refuses_asr_settings(tmp_path):
    """Legacy top-level keys move into options (config.py knows no plugins); the workload's Options then accepts
    its own (partition, alpha) and refuses what it never had (model_size), naming the key and the workload."""
    from fedaqt.plugins import check_options

    p = tmp_path / "config.json"
    p.write_text(json.dumps(_old_config(workload="wrapnet", strategy="fedavg", algorithm="fedavg", partition="dirichlet",
                                        alpha=0.3, options={"width": 0.0625})))
    cfg = resolve_config(None, str(p), {})
    assert cfg.options == {"width": 0.0625, "partition": "dirichlet", "alpha": 0.3}
    check_options(cfg)
    p.write_text(json.dumps(_old_config(workload="wrapnet", strategy="fedavg", algorithm="fedavg", model_size="small")))
    with pytest.raises(ConfigError, match="unknown option 'model_size'.*workload wrapnet"):
        check_options(resolve_config(None, str(p), {}))
    p.write_text(json.dumps(_old_config(workload="wrapnet", partition="label")))
    with pytest.raises(ConfigError, match="option partition='label' \\(workload wrapnet\\)"):
        check_options(resolve_config(None, str(p), {}))
    p.write_text(json.dumps(_old_config(workload="wrapnet", real_eval="maybe")))
    with pytest.raises(ConfigError, match="real_eval.*config.json"):  # the old field's type, naming the file
        resolve_config(None, str(p), {})


def test_cli_run_config_of_an_old_run_reaches_preflight_migrated(tmp_path, monkeypatch):
    import fedaqt.launch.runner as sim_runner
    from fedaqt.cli import app

    seen = {}

    def fake_preflight(cfg):
        seen["cfg"] = cfg
        raise ConfigError("stop here")

    monkeypatch.setattr(sim_runner, "preflight", fake_preflight)
    p = tmp_path / "config.json"
    p.write_text(json.dumps(_old_config(real_eval=False, real_eval_max=7)))
    res = runner.invoke(app, ["run", "--config", str(p), "--data-dir", "/elsewhere", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "stop here" in res.output
    assert seen["cfg"].options == {"real_eval": False, "real_eval_max": 7, "data_dir": "/elsewhere"}


class _Crash(RuntimeError):
    pass


def test_resume_of_a_run_written_before_the_change(tmp_path, toy_registered):
    """A run whose config.json and checkpoint hold the old top-level keys resumes and ends as the uninterrupted run."""
    from fakegrid import FakeGrid

    from fedaqt.server.app import Server, checkpoint_digest, read_checkpoint, semantic_config

    def cfg_for(out):
        return RunConfig(workload="toy", strategy="fedavgm", algorithm="fedavg", bits=8, local_steps=2, lr=0.1,
                         server_lr=0.3, num_clients=6, clients_per_round=3, rounds=4, eval_every=1, seed=2, out=str(out))

    full = tmp_path / "full"
    Server(cfg_for(full), full).run_rounds(FakeGrid(6))

    class CrashingGrid(FakeGrid):
        def send_and_receive(self, messages, timeout=None):
            messages = list(messages)
            if int(messages[0].content["config"]["server-round"]) == 3:
                raise _Crash()
            return super().send_and_receive(messages, timeout)

    cut = tmp_path / "cut"
    with pytest.raises(_Crash):
        Server(cfg_for(cut), cut).run_rounds(CrashingGrid(6))
    # rewrite the run as the old fedaqt wrote it: six more top-level keys (toy declares none of them)
    old = _old_config(**{k: v for k, v in cfg_for(cut).to_dict().items()}, partition="dirichlet", alpha=0.2)
    (cut / "config.json").write_text(json.dumps(old, indent=2, sort_keys=True))
    ckpt = read_checkpoint(cut / "checkpoint.pt")
    ckpt["config"] = json.dumps(old, sort_keys=True)
    ckpt["digest"] = checkpoint_digest(ckpt)
    torch.save(ckpt, cut / "checkpoint.pt")

    cfg = resolve_resume_config(cut, {"num_cpus": 2})
    assert semantic_config(old) == semantic_config(cfg)
    second = Server(cfg, cut, resume=True)
    assert second.start_round == 3
    second.run_rounds(FakeGrid(6))
    cols = lambda p: pd.read_csv(p / "rounds.csv").drop(columns=["seconds", "server_rss_peak_mib"])  # noqa: E731
    pd.testing.assert_frame_equal(cols(full), cols(cut))


def test_presets_hold_no_top_level_workload_settings():
    from fedaqt.config import LEGACY_OPTION_KEYS, PRESET_DIR, list_presets, load_config_file

    for name in list_presets():
        raw = load_config_file(PRESET_DIR / f"{name}.toml")
        assert not set(raw) & set(LEGACY_OPTION_KEYS), name
    assert resolve_config("wrapnet-fmnist", None, {}).options["partition"] == "iid"
    assert resolve_config("smoke", None, {}).options["real_eval"] is False


def test_unknown_key_of_an_unselected_plugin_names_that_plugin():
    """``-o proximal_mu=0.1`` with strategy fedsgd, ``-o momentum=0.5`` with algorithm fedsgd: still refused, and the
    message says which registered plugin declares the key and how to select it."""
    from fedaqt.plugins import check_options

    with pytest.raises(ConfigError, match="'proximal_mu' is an option of strategy fedprox \\(--strategy fedprox\\)"):
        check_options(RunConfig(options={"proximal_mu": 0.1}))
    with pytest.raises(ConfigError, match="'momentum' is an option of algorithm fedavg \\(--algorithm fedavg\\)"):
        check_options(RunConfig(options={"momentum": 0.5}))
    with pytest.raises(ConfigError) as e:
        check_options(RunConfig(options={"no_such_key_anywhere": 1}))
    assert "is an option of" not in str(e.value)


def test_field_validator_message_reaches_the_user_not_the_generic_type_text():
    """A plugin's own field validator explains the rule ("4 letters ..."); the error keeps that text instead of
    the field's type description ("must be a string"), and still names key, value and owner."""
    from pydantic import field_validator

    from fedaqt.config import ConfigError
    from fedaqt.options import options_for

    class Opts(BaseModel):
        model_config = ConfigDict(extra="forbid")
        mixers: str = Field("CCLL", description="per-stage mixers")

        @field_validator("mixers")
        @classmethod
        def _four(cls, v: str) -> str:
            if len(v) != 4:
                raise ValueError(f"mixers={v!r} must be 4 letters")
            return v

    with pytest.raises(ConfigError) as e:
        options_for(Opts, {"mixers": "CCX"}, "workload toy")
    msg = str(e.value)
    assert "mixers='CCX'" in msg and "workload toy" in msg and "must be 4 letters" in msg
    assert "must be a string" not in msg
    assert options_for(Opts, {"mixers": "CCCA"}, "workload toy").mixers == "CCCA"
