"""Simulation wiring: validate, then ``flwr.simulation.run_simulation`` on the Ray backend.

Everything that can be checked is checked before Ray starts (config values, plugin names, the strategy's
algorithm, the workload's data, a resumed run's checkpoint). A local Ray instance gets a temp dir of its own
(inside the run directory when the path is short enough for Ray's unix sockets) and is shut down after the run,
also on error. With ``ray_address`` the run attaches to an existing cluster instead (Flower's backend
``init_args = {"address": ...}``); ``ray.shutdown()`` then only disconnects this driver.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from fedaqt.config import ConfigError, RunConfig
from fedaqt.plugins import get_strategy_plugin, get_workload_class, strategy_names, workload_names
from fedaqt.report.rundir import RunDir
from fedaqt.sim.nodeinfo import runtime_node_id  # noqa: F401  (re-exported: clients record their Ray node)

log = logging.getLogger("fedaqt.sim")

# Ray's socket paths live under the temp dir and must stay below the 107-byte AF_UNIX limit.
_MAX_RAY_TMP = 40


def preflight(config: RunConfig) -> RunConfig:
    """Validate everything before any work starts.

    Raises:
        ConfigError: a bad value, an unknown plugin name, a strategy/algorithm mismatch, or a bad device profile
            (``--device-profile``, see :mod:`fedaqt.sim.devices`).
        FileNotFoundError: the workload's data is missing (the message says how to build it).
    """
    config.validate(known_workloads=workload_names(), known_strategies=strategy_names())
    plugin = get_strategy_plugin(config.strategy)
    if plugin.algorithm and plugin.algorithm != config.algorithm:
        if config.strategy == "relay":
            raise ConfigError(
                f"strategy 'relay' is defined for FedSGD only (spec §2.2 step 6), got algorithm={config.algorithm!r}; "
                "use --algorithm fedsgd, or another strategy for FedAvg"
            )
        raise ConfigError(
            f"strategy {config.strategy!r} needs algorithm={plugin.algorithm!r}, got {config.algorithm!r}"
        )
    validate_round_options(config)
    if config.device_profile:
        from fedaqt.sim.devices import validate_device_profile

        validate_device_profile(config)  # ConfigError naming the file, line and value
    if config.ray_address and config.ray_address != "auto":
        check_ray_address(config.ray_address)
    try:
        workload = get_workload_class(config.workload)(config)
        workload.prepare()
        # build what the server builds, so bad model sizes / option values fail before any file is touched
        workload.build_model()
        plugin.factory(config)
    except (ValueError, TypeError, KeyError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"invalid configuration for workload {config.workload!r} / strategy {config.strategy!r}: {exc}") from exc
    return config


def validate_round_options(config: RunConfig) -> None:
    """Check the fault-handling options (``-o KEY=VALUE``): ``round_timeout`` (seconds the server waits for a
    round's replies, a finite number > 0) and ``max_nonfinite_rounds`` (rounds whose aggregated model may be
    non-finite before the run stops, an integer >= 1).

    Raises:
        ConfigError: naming the key and the bad value.
    """
    opts = config.options
    if "round_timeout" in opts:
        v = opts["round_timeout"]
        ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and v > 0
        if not ok:
            raise ConfigError(f"options.round_timeout={v!r} must be a finite number of seconds > 0")
    if "max_nonfinite_rounds" in opts:
        v = opts["max_nonfinite_rounds"]
        ok = not isinstance(v, bool) and isinstance(v, int) and v >= 1
        if not ok:
            raise ConfigError(f"options.max_nonfinite_rounds={v!r} must be an integer >= 1")


def check_ray_address(address: str, timeout: float = 3.0) -> None:
    """Fail fast when nothing listens at ``--ray-address`` (ray.init would otherwise retry for minutes).

    Raises:
        ConfigError: the host:port does not accept a TCP connection within ``timeout`` seconds.
    """
    import socket

    host, _, port = address.rpartition(":")
    host = host.replace("ray://", "") or "127.0.0.1"
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"ray_address={address!r}: no Ray head answers there ({exc}). Start one with "
            "`ray start --head --port 6379` (see README, 'Ray cluster') or leave --ray-address out to run locally"
        ) from None


def ray_temp_dir(run_dir: Path) -> Path:
    candidate = run_dir.resolve() / "ray"
    if len(str(candidate)) <= _MAX_RAY_TMP:
        candidate.mkdir(parents=True, exist_ok=True)
        return candidate
    return Path(tempfile.mkdtemp(prefix="fedaqt-ray-"))


def backend_config(config: RunConfig) -> dict[str, Any]:
    """Flower's Ray backend config: client resources and ``ray.init`` arguments (attach or start locally)."""
    init_args: dict[str, Any]
    if config.ray_address:
        init_args = {"address": config.ray_address}
    else:
        init_args = {
            "num_cpus": config.num_cpus,
            "num_gpus": 0,
            "include_dashboard": False,
            "object_store_memory": 256 * 1024 * 1024,
        }
    return {
        "client_resources": {"num_cpus": config.client_num_cpus, "num_gpus": 0.0},
        "init_args": init_args,
    }


def checkpoint_round(config: RunConfig) -> int:
    """Last complete round in ``config.out``'s checkpoint (0 when there is none).

    Raises:
        ConfigError: the checkpoint is unreadable or was written with a different configuration.
    """
    from fedaqt.server.app import read_checkpoint, semantic_config

    path = RunDir(config.out).checkpoint_path
    if not path.exists():
        return 0
    try:
        ckpt = read_checkpoint(path)
    except Exception as exc:  # noqa: BLE001 - report which file is bad
        raise ConfigError(f"cannot resume: {path} is unreadable ({exc})") from exc
    saved, now = semantic_config(json.loads(ckpt["config"])), semantic_config(config)
    diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if diff:
        raise ConfigError(f"cannot resume: {path} was written with different values of {', '.join(diff)}")
    return int(ckpt["round"])


def run_experiment(config: RunConfig, progress: Any = None, resume: bool = False) -> dict[str, Any]:
    """Run one federated experiment end to end; returns the summary written to ``summary.json``.

    A new run (``resume=False``) removes the results of an earlier run in ``config.out``. With ``resume=True``
    the run continues after the last checkpointed round of ``config.out`` (a finished run only rewrites its
    summary, without starting Ray).

    Raises:
        ConfigError / FileNotFoundError: from :func:`preflight` or the checkpoint check, before Ray starts.
        RuntimeError: the simulation failed (Flower's error, chained).
    """
    preflight(config)
    run = RunDir(config.out)
    done = 0
    if resume:
        done = checkpoint_round(config)
    else:
        removed = run.clear_results()
        if removed:
            log.warning("%s held an earlier run; removed its %s", run.root, ", ".join(removed))
    config.save(run.config_path)

    from fedaqt.server.app import Server, make_server_app

    if resume and done >= config.rounds:
        log.warning("%s already completed %d rounds; nothing to resume", run.root, done)
        return Server(config, run.root, progress, resume=True).finish()

    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    tmp = None
    if not config.ray_address:
        tmp = ray_temp_dir(run.root)
        os.environ["RAY_TMPDIR"] = str(tmp)
    _quiet_flower()

    import ray
    from flwr.simulation import run_simulation

    from fedaqt.client.app import app as client_app

    result: dict[str, Any] = {}
    server_app = make_server_app(config, run.root, progress, result, resume=resume)
    interrupted = False
    failure: BaseException | None = None
    from fedaqt.sim import backend as sim_backend

    try:
        # our Ray backend replaces dead actors and ends hung clients (see fedaqt.sim.backend for why)
        with sim_backend.installed():
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=config.num_clients,
                backend_config=backend_config(config),
            )
    except KeyboardInterrupt:
        interrupted = True
    except Exception as exc:  # noqa: BLE001 - reported in one line below, chained
        failure = exc
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if tmp is not None and tmp.name.startswith("fedaqt-ray-"):
            shutil.rmtree(tmp, ignore_errors=True)
    if "summary" not in result:
        _stop_unfinished(run.root, interrupted, failure)
    return result["summary"]


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost chained exception (Flower wraps the ServerApp's in RuntimeErrors)."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        nxt = exc.__cause__ or exc.__context__
        if nxt is None:
            break
        from fedaqt.server.app import RunAborted

        if isinstance(exc, RunAborted):
            break
        exc = nxt
    return exc


def _stop_unfinished(run_dir: Path, interrupted: bool, failure: BaseException | None = None) -> None:
    """The simulation ended before its last round (Ctrl-C or a failure).

    Prints one line naming the cause (the server's :class:`fedaqt.server.app.RunAborted` message, else the
    innermost exception) and the ``--resume`` command. Flower's ServerApp thread may still wait in
    ``send_and_receive`` for replies that will never come (up to the round timeout); it is not a daemon thread, so
    the interpreter would hang at exit: then the process ends without waiting for it.

    Raises:
        KeyboardInterrupt: after Ctrl-C; RuntimeError otherwise (chained to the failure).
    """
    import sys
    import threading

    from fedaqt.server.app import RunAborted

    cause = _root_cause(failure) if failure is not None else None
    if isinstance(cause, RunAborted):
        msg = str(cause)
    else:
        why = "was interrupted" if interrupted else "stopped before completing its rounds"
        if cause is not None:
            why += f" ({type(cause).__name__}: {str(cause).strip().splitlines()[0] if str(cause).strip() else ''})"
        elif not interrupted:
            why += " (see the log above)"
        msg = (f"the run {why}; every completed round is checkpointed in {run_dir}: "
               f"continue with `fedaqt run --resume {run_dir}`")
    print(f"error: {msg}", file=sys.stderr, flush=True)
    waiting = [t for t in threading.enumerate() if t is not threading.main_thread() and t.is_alive() and not t.daemon]
    if waiting:
        logging.shutdown()
        os._exit(130 if interrupted else 1)
    if interrupted:
        raise KeyboardInterrupt(msg)
    raise RuntimeError(msg) from failure


def _quiet_flower() -> None:
    """Flower logs every round at INFO; fedaqt shows its own progress, so keep Flower at WARNING."""
    from flwr.common.logger import FLOWER_LOGGER

    FLOWER_LOGGER.setLevel(logging.WARNING)
    if not any(isinstance(f, _KnownNoise) for f in FLOWER_LOGGER.filters):
        FLOWER_LOGGER.addFilter(_KnownNoise())


class _KnownNoise(logging.Filter):
    """Drops Flower warnings that are expected here: fedaqt evaluates on the server (fraction_evaluate=0) and
    pins flwr 1.42, whose run_simulation is marked deprecated in favour of `flwr run`."""

    NOISE = ("fraction_evaluate is set to 0.0", "run_simulation` function is deprecated", "This is a deprecated feature")

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(n in msg for n in self.NOISE)
