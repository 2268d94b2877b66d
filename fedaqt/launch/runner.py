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
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from fedaqt.config import ConfigError, RunConfig
from fedaqt.plugins import (algorithm_names, check_options, get_algorithm_class, get_strategy_plugin, get_workload_class,
                            strategy_names, workload_names)
from fedaqt.report.rundir import RunDir

log = logging.getLogger("fedaqt.launch")

# Ray's socket paths live under the temp dir and must stay below the 107-byte AF_UNIX limit.
_MAX_RAY_TMP = 40


def preflight(config: RunConfig) -> RunConfig:
    """Validate everything before any work starts.

    Raises:
        ConfigError: a bad value, an unknown plugin name, a strategy/algorithm mismatch, or a bad device profile
            (``--device-profile``, see :mod:`fedaqt.server.budgets`).
        FileNotFoundError: the workload's data is missing (the message says how to build it).
    """
    config.validate(known_workloads=workload_names(), known_strategies=strategy_names(),
                    known_algorithms=algorithm_names())
    check_options(config)  # every -o key declared by core/workload/strategy/algorithm, every value in range
    plugin = get_strategy_plugin(config.strategy)
    algorithm = get_algorithm_class(config.algorithm)
    if plugin.upload not in ("", algorithm.upload):
        if config.strategy == "relay":
            raise ConfigError(
                f"strategy 'relay' is defined for FedSGD only (spec §2.2 step 6), got algorithm={config.algorithm!r} "
                f"(upload {algorithm.upload!r}); use --algorithm fedsgd, or another strategy for FedAvg"
            )
        raise ConfigError(
            f"strategy {config.strategy!r} needs a client algorithm that uploads a {plugin.upload!r}; algorithm "
            f"{config.algorithm!r} uploads a {algorithm.upload!r}"
        )
    algorithm.validate(config)  # ConfigError naming the key (e.g. FedSGD with local_steps != 1, a bad -o value)
    if config.device_profile:
        from fedaqt.server.budgets import validate_device_profile

        validate_device_profile(config)  # ConfigError naming the file, line and value
    from fedaqt.server.clock import validate_device_trace

    validate_device_trace(config)  # -o device_trace / deadline_s: ConfigError naming the file, line and value
    if config.ray_address:
        resolve_ray_address(config.ray_address)  # 'auto': what it found, refused when not this user's
    try:
        workload = get_workload_class(config.workload)(config)
        workload.prepare()
        # build what the server builds, so bad model sizes / option values fail before any file is touched
        from fedaqt.server.app import build_strategy, make_spec

        model = workload.build_model()
        build_strategy(config, make_spec(config, workload, model))  # the plugin's factory (+ the DP wrapper)
        algorithm.max_examples(config, workload, 0)  # e.g. local_epochs on a workload without partition_size
        from fedaqt.options import core_options

        if core_options(config).secagg:  # SecAgg+: combinations that cannot work (fedaqt.server.secagg)
            from fedaqt.server.secagg import validate_secagg

            validate_secagg(config, max(int(algorithm.max_examples(config, workload, c)) for c in range(config.num_clients)))
    except NotImplementedError as exc:
        raise ConfigError(f"algorithm {config.algorithm!r} with workload {config.workload!r}: {exc}") from exc
    except (ValueError, TypeError, KeyError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"invalid configuration for workload {config.workload!r} / strategy {config.strategy!r}: {exc}") from exc
    return config


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


def resolve_ray_address(address: str) -> str:
    """The HOST:PORT a run attaches to for ``--ray-address`` (checked with :func:`check_ray_address`).

    ``auto`` takes ``RAY_ADDRESS`` or the address file that ``ray start`` writes (``$RAY_TMPDIR/ray`` or
    ``/tmp/ray``, ``ray_current_cluster``) and logs what it found. Unlike ``ray.init(address="auto")`` it never
    falls back to any raylet running on the machine (e.g. another program's local instance); and a head whose
    GCS process runs as another user is refused. Naming the address explicitly attaches to it anyway.

    Raises:
        ConfigError: ``auto`` found nothing (the message lists the Ray processes seen, if any), found a head of
            another user, or nothing answers at the address.
    """
    if address != "auto":
        check_ray_address(address)
        return address
    from ray._private import services, utils

    env = os.environ.get("RAY_ADDRESS", "")
    source = "the RAY_ADDRESS environment variable"
    found = env
    if not found:
        path = utils.get_ray_address_file(None)
        found = utils.read_ray_address(None) or ""
        source = f"{path} (written by `ray start`)"
    if not found:
        others = sorted(services.find_gcs_addresses())
        seen = f"; Ray instances of other programs run at {', '.join(others)} (not attached)" if others else ""
        raise ConfigError(
            f"ray_address='auto': no Ray head started with `ray start` was found (RAY_ADDRESS is unset and "
            f"{utils.get_ray_address_file(None)} does not exist){seen}. Start one with `ray start --head --port 6379`, "
            "or name the address with --ray-address HOST:PORT"
        )
    owner = _gcs_owner(found)
    if owner is not None and owner[1] != os.getuid():
        raise ConfigError(
            f"ray_address='auto' found the Ray head at {found} (from {source}), but its GCS process "
            f"(pid {owner[0]}) runs as uid {owner[1]}, not as you (uid {os.getuid()}); "
            f"pass --ray-address {found} to attach to it anyway"
        )
    check_ray_address(found)
    if found not in _REPORTED:
        _REPORTED.add(found)
        log.warning("--ray-address auto: attaching to the Ray head at %s (from %s%s)", found, source,
                    f", GCS pid {owner[0]}" if owner else "")
    return found


_REPORTED: set[str] = set()


def _gcs_owner(address: str) -> tuple[int, int] | None:
    """(pid, uid) of the local gcs_server listening on ``address``'s port, None when not found locally."""
    import ray  # noqa: F401  (puts Ray's bundled psutil on the path)
    import psutil

    port = address.rpartition(":")[2]
    for proc in psutil.process_iter(["pid", "name", "cmdline", "uids"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or [])
            if "gcs_server" in (proc.info["name"] or "") or "gcs_server" in cmd.split(" ")[0]:
                if f"--gcs_server_port={port}" in cmd:
                    return proc.info["pid"], proc.info["uids"].real
        except (psutil.Error, AttributeError, TypeError):
            continue
    return None


#: the owner file of a ``/tmp`` fallback Ray temp dir (pid of the fedaqt process that made it)
_OWNER_FILE = "fedaqt-owner.pid"


def ray_temp_dir(run_dir: Path) -> Path:
    """Ray's temp dir for a local run: ``RUN_DIR/ray`` when short enough for unix sockets, else a fresh
    ``$TMPDIR/fedaqt-ray-*`` (removed after the run; it holds :data:`_OWNER_FILE`).

    Before that, Ray sessions of earlier runs in ``RUN_DIR/ray`` are pruned and ``fedaqt-ray-*`` dirs whose
    owner process is gone (a killed run) are removed, so a reused run directory or a crash leaves nothing
    to pile up.
    """
    clean_stale_ray_dirs()
    candidate = run_dir.resolve() / "ray"
    if len(str(candidate)) <= _MAX_RAY_TMP:
        prune_ray_sessions(candidate)
        candidate.mkdir(parents=True, exist_ok=True)
        return candidate
    tmp = Path(tempfile.mkdtemp(prefix="fedaqt-ray-"))
    (tmp / _OWNER_FILE).write_text(str(os.getpid()))
    return tmp


def prune_ray_sessions(ray_dir: Path) -> list[str]:
    """Remove ``ray_dir/session_*`` (Ray's per-start session dirs) left by earlier runs; returns their names.

    Only called before this run starts its own Ray there; two runs in one run directory at once are not
    supported anyway (they would write the same CSVs)."""
    removed = []
    if not ray_dir.is_dir():
        return removed
    for p in sorted(ray_dir.glob("session_*")):
        if p.is_symlink():
            p.unlink(missing_ok=True)
        elif p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            continue
        removed.append(p.name)
    if removed:
        log.info("pruned %d Ray session dir(s) of earlier runs in %s", len(removed), ray_dir)
    return removed


def clean_stale_ray_dirs(base: str | Path | None = None) -> list[Path]:
    """Remove ``fedaqt-ray-*`` dirs under ``base`` (default the temp dir) whose owner process is dead.

    Dirs without an owner file, or whose owner still runs, are left alone. Returns the removed paths."""
    removed = []
    for d in Path(base or tempfile.gettempdir()).glob("fedaqt-ray-*"):
        try:
            pid = int((d / _OWNER_FILE).read_text().strip())
        except (OSError, ValueError):
            continue
        if pid == os.getpid() or _alive(pid):
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def backend_config(config: RunConfig) -> dict[str, Any]:
    """Flower's Ray backend config: client resources and ``ray.init`` arguments (attach or start locally)."""
    init_args: dict[str, Any]
    if config.ray_address:
        init_args = {"address": resolve_ray_address(config.ray_address) if config.ray_address == "auto" else config.ray_address}
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
        ConfigError: the checkpoint is unreadable or corrupt (digest), was written with a different
            configuration, or rounds.csv / clients.csv lost or changed rows of its rounds (the message names
            the file). Rows after the checkpointed round (the unfinished round, a torn last line) are dropped.
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
    done = int(ckpt["round"])
    RunDir(config.out).check_resume(done, ckpt.get("records"))  # the CSVs end at `done`, or refused naming one
    return done


def run_experiment(config: RunConfig, progress: Any = None, resume: bool = False,
                   preflight_done: bool = False) -> dict[str, Any]:
    """Run one federated experiment end to end; returns the summary written to ``summary.json``.

    A new run (``resume=False``) in a directory holding an earlier run moves that run's results aside
    (``RUN_DIR/.previous/``, see :class:`fedaqt.report.rundir.RunDir`); they are deleted once the new run has
    checkpointed round 1, and put back unchanged when it fails before that (preflight failures touch nothing).
    With ``resume=True`` the run continues after the last checkpointed round of ``config.out`` (a finished run
    only rewrites its summary, without starting Ray).

    ``preflight_done``: the caller has just run :func:`preflight` on this ``config`` (``fedaqt run`` does, before
    its header), so it is not run a second time; API callers leave it False and get the same checks.

    Raises:
        ConfigError / FileNotFoundError: from :func:`preflight` or the checkpoint check, before Ray starts.
        RuntimeError: the simulation failed (Flower's error, chained).
    """
    if not preflight_done:
        preflight(config)
    done = checkpoint_round(config) if resume else 0
    run = RunDir(config.out)
    if not resume:
        moved = run.set_aside()
        if moved:
            log.warning("%s held an earlier run; its %s are kept in %s until this run checkpoints round 1",
                        run.root, ", ".join(moved), run.previous)
    try:
        return _run(config, run, progress, resume, done)
    except BaseException:
        restored = run.restore_previous()
        if restored:
            log.warning("the run failed before its first checkpoint; restored the earlier run's %s in %s",
                        ", ".join(restored), run.root)
        raise


def serve(config: RunConfig, grid: Any) -> dict[str, Any]:
    """The Flower app's ServerApp body (:mod:`fedaqt.app`, ``flwr run``): run ``config`` (already through
    :func:`preflight`) on ``grid``, a SuperLink's nodes, into ``config.out``; returns the summary.

    Like a new :func:`run_experiment`: an earlier run in ``config.out`` is set aside and put back when this one fails
    before its first checkpoint; ``config.json`` is written first. The round loop is the one ``fedaqt run`` runs
    (:func:`fedaqt.server.app.run_server`); there is no Ray backend to hook (the SuperNodes run the clients)."""
    from fedaqt.server.app import run_server

    run = RunDir(config.out)
    moved = run.set_aside()
    if moved:
        log.warning("%s held an earlier run; its %s are kept in %s until this run checkpoints round 1",
                    run.root, ", ".join(moved), run.previous)
    try:
        config.save(run.config_path)
        return run_server(config, run.root, grid)
    except BaseException:
        restored = run.restore_previous()
        if restored:
            log.warning("the run failed before its first checkpoint; restored the earlier run's %s in %s",
                        ", ".join(restored), run.root)
        raise


def _run(config: RunConfig, run: RunDir, progress: Any, resume: bool, done: int) -> dict[str, Any]:
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

    from fedaqt.launch import backend as sim_backend

    result: dict[str, Any] = {}
    server_app = make_server_app(
        config, run.root, progress, result, resume=resume,
        on_round_end=lambda: sim_backend.abandon_before(time.time()),  # kill what a round still runs (timeouts)
        on_finish=sim_backend.stop,  # end hung clients now, so run_simulation returns and Ray is torn down
    )
    interrupted = False
    failure: BaseException | None = None

    try:
        # our Ray backend replaces dead actors and ends hung clients (see fedaqt.launch.backend for why)
        with sim_backend.installed():
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                # one SuperNode per client of a round, not per client of the population: the server assigns every
                # message its data partition (fedaqt.protocol.assign_partition), so a node is just a slot, and a
                # 10,000-client population costs Flower no 10,000 node records (issue 16)
                num_supernodes=min(config.num_clients, config.clients_per_round),
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
        restored = run.restore_previous()
        if restored:
            log.warning("the run stopped before its first checkpoint; restored the earlier run's %s in %s",
                        ", ".join(restored), run.root)
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
