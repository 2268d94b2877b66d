"""Bad input fails before Ray starts, naming the bad value and the allowed ones (issue 2)."""

import pytest
from typer.testing import CliRunner

from fedaqt.cli import app
from fedaqt.config import ConfigError, RunConfig
from fedaqt.launch.runner import preflight

runner = CliRunner()


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--workload", "nope"], "asr"),
        (["--strategy", "nope"], "relay"),
        (["--bits", "5"], "32, 8, 4"),
        (["--granularity", "row"], "tensor, channel"),
        (["--num-clients", "0"], "num_clients must be a positive integer"),
        (["--rounds", "-1"], "rounds must be a positive integer"),
        (["--clients-per-round", "50", "--num-clients", "4"], "exceeds num_clients=4"),
        (["--strategy", "relay", "--algorithm", "fedavg"], "FedSGD only"),
        (["--algorithm", "nope"], "fedavg"),
        (["--algorithm", "fedsgd", "--local-steps", "3"], "local_steps=3"),
        (["--algorithm", "fedavg", "--strategy", "fedavg", "-o", "momentum=1.5"], "momentum=1.5"),
        (["--algorithm", "fedavg", "--strategy", "fedavg", "-o", "local_epochs=-1"], "local_epochs=-1"),
        (["--data-dir", "/nonexistent/speech"], "fedaqt data speech"),
    ],
)
def test_cli_rejects_bad_input_before_ray(args, needle, tmp_path, monkeypatch):
    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray must not start on bad input"))
    result = runner.invoke(app, ["run", "--out", str(tmp_path / "r"), *args])
    assert result.exit_code == 2, result.output
    assert needle in " ".join(result.output.split())


def test_unknown_config_key_is_named():
    with pytest.raises(ConfigError, match="bitz"):
        RunConfig.from_mapping({"bitz": 8})




def test_unreachable_ray_address_fails_fast(tmp_path, monkeypatch):
    import socket
    import time

    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray must not start on bad input"))
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    result = runner.invoke(app, ["run", "--out", str(tmp_path / "r"), "--ray-address", f"127.0.0.1:{port}"])
    assert result.exit_code == 2, result.output
    assert "no Ray head answers" in " ".join(result.output.split())
    assert time.monotonic() - t0 < 30


@pytest.mark.parametrize("args", [["--model-size", "huge"], ["--strategy", "fedprox", "--algorithm", "fedavg", "-o", "proximal_mu=abc"]])
def test_bad_values_leave_an_earlier_run_untouched(tmp_path, args, monkeypatch):
    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray must not start on bad input"))
    out = tmp_path / "r"
    out.mkdir()
    (out / "rounds.csv").write_text("round\n1\n")
    result = runner.invoke(app, ["run", "--out", str(out), *args])
    assert result.exit_code == 2, result.output
    assert (out / "rounds.csv").read_text() == "round\n1\n"
    assert not (out / "config.json").exists()


@pytest.mark.parametrize("counts, code", [({"error": 4}, 1), ({"ok": 3, "error": 1}, 0)])
def test_a_run_in_which_no_client_update_was_accepted_exits_nonzero(tmp_path, monkeypatch, counts, code):
    """Every round finished but no reply was aggregated (all clients errored): the global model is the initial one,
    so ``fedaqt run`` says so and exits 1 instead of reporting success."""
    import fedaqt.launch.runner as launch_runner

    monkeypatch.setattr(launch_runner, "preflight", lambda cfg: cfg)
    monkeypatch.setattr(launch_runner, "run_experiment", lambda cfg, **kw: {
        "rounds_completed": 2, "client_status_counts": counts, "participation_rate": counts.get("ok", 0) / 4})
    res = runner.invoke(app, ["run", "--preset", "smoke", "--out", str(tmp_path / "r")])
    assert res.exit_code == code, res.output
    assert ("no client update was accepted" in res.output) == (code == 1)
