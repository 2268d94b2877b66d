"""Run configuration: file + CLI layering, validation naming the key, config.json round trip, presets, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedaqt.config import (
    RESUME_OVERRIDABLE,
    ConfigError,
    RunConfig,
    list_presets,
    load_config_file,
    resolve_config,
    resolve_resume_config,
)

runner = CliRunner()


def _flat(text: str) -> str:
    """CLI output with rich's line wrapping and box characters collapsed."""
    return " ".join(text.replace("│", " ").split())


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# ---------------------------------------------------------------------------------------------- layering
def test_defaults_preset_file_cli_precedence(tmp_path):
    f = _write(tmp_path, "run.toml", 'rounds = 7\nbits = 4\nseed = 3\n[options]\neval_max = 4\ndropout = 0.0\n')
    cfg = resolve_config("smoke", str(f), {"seed": 11, "lr": None})
    assert cfg.num_clients == 4 and cfg.batch_size == 2  # from the preset
    assert cfg.rounds == 7 and cfg.bits == 4  # the file overrides the preset
    assert cfg.seed == 11  # CLI overrides the file; None = flag not given
    assert cfg.lr == RunConfig().lr  # default
    # options tables merge key by key (the smoke preset sets eval_max 8, model_size, real_eval; the file wins)
    assert cfg.options == {"eval_max": 4, "dropout": 0.0, "model_size": "tiny", "real_eval": False}


def test_run_table_and_dashes(tmp_path):
    f = _write(tmp_path, "run.toml", '[run]\nnum-clients = 5\nclients_per_round = 2\n[options]\nproximal_mu = 0.1\n')
    cfg = resolve_config(None, str(f), {})
    assert (cfg.num_clients, cfg.clients_per_round, cfg.options) == (5, 2, {"proximal_mu": 0.1})


def test_config_json_round_trip_repeats_the_run(tmp_path):
    cfg = RunConfig(strategy="relay", bits=4, granularity="channel", seed=9, rounds=3, options={"eval_max": 8}, out=str(tmp_path))
    cfg.save(tmp_path / "config.json")
    assert resolve_config(None, str(tmp_path / "config.json"), {}) == cfg
    assert resolve_config(None, str(tmp_path), {}) == cfg  # a run directory works too
    assert not list(tmp_path.glob("*.tmp"))


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "text, key",
    [
        ("bitz = 8\n", "bitz"),
        ('bits = "eight"\n', "bits"),
        ("workload = 5\n", "workload"),
        ("rounds = 2.5\n", "rounds"),
        ('real_eval = "maybe"\n', "real_eval"),
        ("checkpointing = 3\n", "checkpointing"),
        ("num_clients = true\n", "num_clients"),
        ("options = 3\n", "options"),
    ],
)
def test_unknown_keys_and_wrong_types_name_the_key_and_file(tmp_path, text, key):
    f = _write(tmp_path, "bad.toml", text)
    with pytest.raises(ConfigError) as e:
        resolve_config(None, str(f), {})
    assert key in str(e.value) and "bad.toml" in str(e.value)


@pytest.mark.parametrize(
    "values, key",
    [
        ({"bits": 5}, "bits"),
        ({"granularity": "row"}, "granularity"),
        ({"algorithm": "sgd"}, "algorithm"),
        ({"partition": "label"}, "partition"),
        ({"rounds": 0}, "rounds"),
        ({"lr": -0.1}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"server_momentum": 1.0}, "server_momentum"),
        ({"clients_per_round": 40}, "clients_per_round"),
        ({"client_num_cpus": 4.0}, "client_num_cpus"),
        ({"algorithm": "fedsgd", "local_steps": 3}, "local_steps"),
        ({"ray_address": "localhost"}, "ray_address"),
        ({"strategy": "nope"}, "strategy"),
        ({"workload": "nope"}, "workload"),
    ],
)
def test_bad_values_name_the_key(values, key):
    from fedaqt.plugins import check_options, get_algorithm_class

    with pytest.raises(ConfigError) as e:  # what preflight runs, in its order
        cfg = RunConfig().override(values)
        cfg.validate(known_workloads=["asr", "wrapnet"], known_strategies=["fedsgd", "fedavg"],
                     known_algorithms=["fedsgd", "fedavg"])
        check_options(cfg)  # a migrated top-level option (partition) is checked by its workload's Options
        get_algorithm_class(cfg.algorithm).validate(cfg)  # what the algorithm requires (FedSGD: local_steps=1)
    assert key in str(e.value)


def test_unknown_name_lists_known_names():
    with pytest.raises(ConfigError) as e:
        RunConfig(strategy="nope").validate(known_strategies=["fedsgd", "relay"])
    assert "fedsgd" in str(e.value) and "relay" in str(e.value)


def test_missing_and_unparsable_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config_file(tmp_path / "nope.toml")
    f = _write(tmp_path, "broken.toml", "rounds = = 3\n")
    with pytest.raises(ConfigError, match="broken.toml"):
        load_config_file(f)


# ---------------------------------------------------------------------------------------------- presets
def test_presets_ship_and_validate():
    from fedaqt.plugins import strategy_names, workload_names

    assert {"default", "smoke", "relay-int4", "wrapnet-fmnist"} <= set(list_presets())
    for name in list_presets():
        resolve_config(name, None, {}).validate(known_workloads=workload_names(), known_strategies=strategy_names())
    assert resolve_config("default", None, {}) == RunConfig()  # `fedaqt run` == `fedaqt run --preset default`
    assert resolve_config("relay-int4", None, {}).strategy == "relay"
    with pytest.raises(ConfigError, match="smoke"):
        resolve_config("nope", None, {})


# ---------------------------------------------------------------------------------------------- CLI surface
def _run_params():
    import typer.main

    from fedaqt.cli import app

    cmd = typer.main.get_command(app).commands["run"]
    return {p.name for p in cmd.params}


def test_every_config_key_is_a_cli_option_and_vice_versa():
    from fedaqt.cli import CORE_SHORTCUTS, OPTION_SHORTCUTS
    from fedaqt.config import LEGACY_OPTION_KEYS

    params = _run_params() - {"preset", "config", "option", "resume", "verbose", "from_scratch"}
    fields = set(RunConfig.field_names()) - {"options"}
    # the former ASR/partition fields stay as flags that set the workload option of the same name
    assert set(OPTION_SHORTCUTS) == set(LEGACY_OPTION_KEYS) and not set(OPTION_SHORTCUTS) & fields
    assert params == fields | set(OPTION_SHORTCUTS) | set(CORE_SHORTCUTS)


def test_cli_bad_file_fails_before_ray(tmp_path):
    from fedaqt.cli import app

    f = _write(tmp_path, "bad.toml", "bitz = 8\n")
    res = runner.invoke(app, ["run", "--config", str(f)])
    assert res.exit_code == 2
    assert "bitz" in _flat(res.output)


def test_cli_unknown_strategy_lists_known(tmp_path):
    from fedaqt.cli import app

    res = runner.invoke(app, ["run", "--strategy", "nope", "--out", str(tmp_path / "r")])
    out = _flat(res.output)
    assert res.exit_code == 2
    assert "nope" in out and "fedavg" in out and "relay" in out and "fedyogi" in out
    assert not (tmp_path / "r" / "rounds.csv").exists()


def test_cli_bad_option_syntax(tmp_path):
    from fedaqt.cli import app

    res = runner.invoke(app, ["run", "-o", "eval_max", "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "KEY=VALUE" in _flat(res.output)


# ---------------------------------------------------------------------------------------------- resume
def test_resume_config_allows_only_where_it_runs(tmp_path):
    cfg = RunConfig(seed=5, rounds=4, out="somewhere/else", options={"eval_max": 8})
    cfg.save(tmp_path / "config.json")
    got = resolve_resume_config(tmp_path, {"num_cpus": 1, "client_num_cpus": 0.5, "ray_address": "127.0.0.1:6379"})
    assert got.out == str(tmp_path) and got.seed == 5 and got.num_cpus == 1 and got.ray_address == "127.0.0.1:6379"
    assert set(RESUME_OVERRIDABLE) == {"num_cpus", "client_num_cpus", "ray_address"}
    assert resolve_resume_config(tmp_path, {"seed": 5, "rounds": None}).seed == 5  # an equal value is fine
    with pytest.raises(ConfigError) as e:
        resolve_resume_config(tmp_path, {"seed": 6, "bits": 4})
    assert "seed" in str(e.value) and "bits" in str(e.value) and "num_cpus" in str(e.value)
    with pytest.raises(ConfigError, match="options"):
        resolve_resume_config(tmp_path, {"options": {"eval_max": 9}})
    with pytest.raises(ConfigError, match="--out"):
        resolve_resume_config(tmp_path, {"out": str(tmp_path / "other")})
    with pytest.raises(ConfigError, match="config.json"):
        resolve_resume_config(tmp_path / "missing", {})


def test_cli_resume_refuses_semantic_override_and_preset(tmp_path):
    from fedaqt.cli import app

    RunConfig(out=str(tmp_path)).save(tmp_path / "config.json")
    res = runner.invoke(app, ["run", "--resume", str(tmp_path), "--seed", "3"])
    assert res.exit_code == 2 and "seed" in _flat(res.output)
    res = runner.invoke(app, ["run", "--resume", str(tmp_path), "--preset", "smoke"])
    assert res.exit_code == 2 and "--preset" in _flat(res.output)
    res = runner.invoke(app, ["run", "--resume", str(tmp_path), "-o", "eval_max=3"])
    assert res.exit_code == 2 and "options" in _flat(res.output)


def test_saved_config_is_json_of_every_field(tmp_path):
    RunConfig().save(tmp_path / "config.json")
    data = json.loads((tmp_path / "config.json").read_text())
    assert set(data) == set(RunConfig.field_names())


def test_resolve_config_merges_command_line_options_with_the_preset_and_file(tmp_path):
    f = tmp_path / "o.toml"
    f.write_text("[options]\ndropout = 0.2\n")
    cfg = resolve_config("smoke", str(f), {"options": {"eval_max": 4}})
    assert cfg.options["eval_max"] == 4 and cfg.options["dropout"] == 0.2 and cfg.options["model_size"] == "tiny"
