"""Flower ServerApp: float global model, quantized broadcast, evaluation, checkpoints, run directory.

The round loop is ours rather than ``Strategy.start``: ``start`` always begins at round 1 and has no per-round
hook, while a run here must write ``rounds.csv``/``clients.csv`` and an atomic checkpoint after every round and
resume from the last complete one. Each round still calls the strategy's own ``configure_train`` /
``aggregate_train`` exactly as ``start`` does, and ``grid.send_and_receive`` in between.

The round loop owns the message contract (:mod:`fedaqt.protocol`); the strategy is built complete
(``StrategyPlugin.factory(config, spec)``) and the server only calls its ``configure_train``, ``aggregate_train``,
``state_dict`` and ``load_state_dict``, never reads its attributes. Per round the server

1. asks the strategy for the train messages (Flower's node sampling + the quantized broadcast of the float
   parameters and buffers), assigns each sampled node its data partition (:func:`sample_partitions`, a function of
   ``(seed, round)``, paired with the nodes in the order the strategy returned them) and writes it, and the
   final-codes offer of a FedAvg round, into each message's config;
2. validates every reply (:func:`fedaqt.protocol.validate_reply`: status, shapes, dtypes, finite values, the
   assigned partition, the example bound, memory budgets), writing one clients.csv row per sampled node
   (ok / rejected / error / died / over_budget / timeout, with ``ray_node_id``);
3. hands the strategy only the accepted replies, normalized (:func:`fedaqt.protocol.normalized_reply`), in
   partition order; moves the float buffers (BatchNorm statistics) by their weighted mean client delta itself;
4. writes rounds.csv (``bytes_down``/``bytes_up``/``clients_ok`` from the messages and replies, the strategy's
   returned metrics such as ``relay_norm_ratio`` as further columns) and the checkpoint.

Reproducibility: the server seeds Python's ``random``, numpy's and torch's global generators from
``config.seed`` before it builds anything; the strategy re-seeds ``random`` for Flower's node sampling every round
and the server draws each round's data partitions from ``(seed, round)``; replies are aggregated in partition
order, not arrival order, so concurrent Ray workers cannot change the float sums.

Checkpoint (``RUN_DIR/checkpoint.pt``, replaced atomically after the round's CSV rows are on disk): round number,
float parameters, the float buffers (BatchNorm statistics), the strategy's cross-round state
(``strategy.state_dict()``: Flower's optimizer state and a subclass's own), the RNG states of
``random``/numpy/torch, and the configuration. ``Server(..., resume=True)`` restores all of it and drops CSV rows
of later rounds, so a run killed mid-round and resumed computes the same rounds as one never interrupted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from flwr.serverapp import Grid, ServerApp
from torch import nn

from fedaqt import protocol
from fedaqt.client.memory import read_vmhwm_kib, reset_vmhwm
from fedaqt.config import RESUME_OVERRIDABLE, RunConfig, migrate_legacy
from fedaqt.options import CoreOptions, core_options
from fedaqt.plugins import get_algorithm_class, get_strategy_plugin, get_workload_class
from fedaqt.protocol import BROADCAST_KEY, METRICS_KEY, NUM_EXAMPLES, QUANT_META_KEY, BroadcastSpec, ClientRow
from fedaqt.quant.convert import quantized_weight_keys
from fedaqt.quant.npy import from_array, to_array
from fedaqt.quant.wire import QTensor, decode_broadcast, record_nbytes
from fedaqt.report.rundir import RunDir, replace_atomic, write_json_atomic
from fedaqt.server.nodes import ActorNodeMap, nodeinfo_of
from fedaqt.server.stream import WeightedSum, stream_replies
from fedaqt.workloads.base import Workload

log = logging.getLogger("fedaqt.server")

ProgressFn = Callable[[int, dict[str, Any]], None]

#: ``options.round_timeout``: seconds the server waits for a round's replies (declared in fedaqt.options.CoreOptions)
DEFAULT_ROUND_TIMEOUT = CoreOptions.model_fields["round_timeout"].default
#: ``options.max_nonfinite_rounds``: rounds with a non-finite aggregated model before the run stops
DEFAULT_MAX_NONFINITE_ROUNDS = CoreOptions.model_fields["max_nonfinite_rounds"].default


class RunAborted(RuntimeError):
    """The server stopped the run; the message names the cause and the ``fedaqt run --resume`` command."""


def float_state_split(model: nn.Module) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(trainable parameters, floating-point buffers) of the float model as numpy arrays."""
    params = {k: p.detach().cpu().numpy().copy() for k, p in model.named_parameters()}
    buffers = {k: b.detach().cpu().numpy().copy() for k, b in model.named_buffers() if b.is_floating_point()}
    return params, buffers


def sample_partitions(seed: int, server_round: int, num_clients: int, clients_per_round: int,
                      available: list[int] | None = None) -> list[int]:
    """The data partitions trained in ``server_round``: ``clients_per_round`` distinct ids of ``range(num_clients)``,
    sorted, a deterministic function of ``(seed, round)`` (numpy ``default_rng([seed, 7919, round])``).

    ``available`` (a device trace's clients that are on this round, :meth:`fedaqt.server.clock.DeviceTrace.available`):
    draw ``min(clients_per_round, len(available))`` of those instead; None = every client is available."""
    rng = np.random.default_rng([seed, 7919, server_round])
    if available is None:
        return sorted(rng.choice(num_clients, size=clients_per_round, replace=False).tolist())
    pool = np.asarray(sorted(set(int(c) for c in available)), dtype=np.int64)
    if pool.size == 0:
        return []
    return sorted(rng.choice(pool, size=min(clients_per_round, int(pool.size)), replace=False).tolist())


def make_spec(config: RunConfig, workload: Workload, model: nn.Module) -> BroadcastSpec:
    params, buffers = float_state_split(model)
    qkeys = quantized_weight_keys(model, workload.quantize_filter) if config.bits < 32 else []
    extra = workload.broadcast_quantized_keys(model) if config.bits < 32 else []
    return BroadcastSpec(
        bits=config.bits,
        granularity=config.granularity,
        quantized_keys=frozenset(list(qkeys) + list(extra)),
        param_shapes={k: tuple(v.shape) for k, v in params.items()},
        buffer_shapes={k: tuple(v.shape) for k, v in buffers.items()},
        update_kind=get_algorithm_class(config.algorithm).upload,
        final_code_keys=frozenset(qkeys),
    )


def build_strategy(config: RunConfig, spec: BroadcastSpec) -> Any:
    """The run's strategy: the plugin's ``factory(config, spec)``, wrapped in central DP with fixed clipping when
    ``options.dp_clip > 0`` (:func:`fedaqt.strategies.dp.wrap_with_dp`).

    Raises:
        ValueError: from the factory, or ``dp_noise > 0`` without ``dp_clip``.
    """
    from fedaqt.strategies.dp import wrap_with_dp

    return wrap_with_dp(get_strategy_plugin(config.strategy).factory(config, spec), config)


def load_into(model: nn.Module, params: dict[str, np.ndarray], buffers: dict[str, np.ndarray]) -> None:
    state = {k: torch.from_numpy(np.asarray(v)) for k, v in {**params, **buffers}.items()}
    model.load_state_dict(state, strict=False)


# ---------------------------------------------------------------------------------------------- RNG + checkpoint
CHECKPOINT_FORMAT = 1

def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, numpy's global generator and torch's CPU generator from ``seed``."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """RNG states of ``random``, numpy (global) and torch (CPU) as plain types + one uint8 tensor."""
    npst = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": npst["bit_generator"],
            "key": [int(x) for x in npst["state"]["key"]],
            "pos": int(npst["state"]["pos"]),
            "has_gauss": int(npst["has_gauss"]),
            "gauss": float(npst["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": n["bit_generator"],
            "state": {"key": np.asarray(n["key"], dtype=np.uint32), "pos": n["pos"]},
            "has_gauss": n["has_gauss"],
            "gauss": n["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])


def _encode_state(obj: Any) -> Any:
    """Strategy state -> what ``torch.load(weights_only=True)`` reads back (tensors, dicts, lists, scalars)."""
    if isinstance(obj, ArrayRecord):
        return {"__arrayrecord__": {k: torch.from_numpy(from_array(a, writable=True)) for k, a in obj.items()}}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": torch.from_numpy(np.array(obj, copy=True))}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {str(k): _encode_state(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode_state(v) for v in obj]}
    if isinstance(obj, list):
        return [_encode_state(v) for v in obj]
    if isinstance(obj, torch.Tensor):  # a copy: a background checkpoint write must not see later in-place changes
        return obj.detach().clone()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint strategy state of type {type(obj).__name__}")


def _decode_state(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__arrayrecord__"}:
            return ArrayRecord({k: to_array(t.numpy()) for k, t in obj["__arrayrecord__"].items()})
        if set(obj) == {"__ndarray__"}:
            return obj["__ndarray__"].numpy()
        if set(obj) == {"__tuple__"}:
            return tuple(_decode_state(v) for v in obj["__tuple__"])
        return {k: _decode_state(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode_state(v) for v in obj]
    return obj


class CheckpointWriter:
    """Writes each round's checkpoint on one background thread, so the next round's broadcast does not wait for
    the digest, the pickling and the fsyncs (a 31 MB FedAdam checkpoint of the tiny Conformer: ~0.3-0.5 s per
    round on the 2-core machine, issue 16).

    Order and safety: the state is copied on the round loop's thread (:meth:`Server._checkpoint_state`) after the
    round's CSV rows are on disk; at most one write is in flight and :meth:`submit` first waits for the one
    before, so checkpoints land in round order and each replaces the last atomically. A process killed while a
    write is in flight leaves the previous round's checkpoint; ``--resume`` then drops the newer CSV rows and
    redoes that round (the same results: the RNG state is part of the checkpoint). :meth:`wait` re-raises a
    failed write (disk full, permissions) instead of losing it. Written with the standard library's
    ``ThreadPoolExecutor``; torch.save and hashlib release the GIL for the tensor bytes.
    """

    def __init__(self, write: Callable[[dict[str, Any], int], None]) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._write = write
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedaqt-checkpoint")
        self._pending: Any = None

    def submit(self, ckpt: dict[str, Any], rnd: int) -> None:
        """Wait for the previous write (re-raising its error), then start writing ``ckpt`` of round ``rnd``."""
        self.wait()
        self._pending = self._pool.submit(self._write, ckpt, rnd)

    def wait(self) -> None:
        """Block until the write in flight (if any) is on disk; raise its exception if it failed."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """:meth:`wait`, then stop the thread."""
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)


def strategy_state(strategy: Any) -> dict[str, Any]:
    """``strategy.state_dict()`` (its cross-round state) encoded for ``torch.save``."""
    return _encode_state(strategy.state_dict())


def restore_strategy_state(strategy: Any, state: dict[str, Any]) -> None:
    """Inverse of :func:`strategy_state`: ``strategy.load_state_dict(decoded state)``."""
    strategy.load_state_dict(_decode_state(state))


def semantic_config(config: RunConfig | dict[str, Any]) -> dict[str, Any]:
    """The configuration keys that determine the computation (all but where/how it runs).

    A mapping from a checkpoint written before the ASR/partition settings became workload options is migrated
    first (:func:`fedaqt.config.migrate_legacy`), as ``fedaqt run --resume`` migrates the run's ``config.json``.
    """
    d = config.to_dict() if isinstance(config, RunConfig) else migrate_legacy(dict(config), source="checkpoint")
    return {k: v for k, v in d.items() if k not in RESUME_OVERRIDABLE and k != "out"}


def checkpoint_digest(obj: Any) -> str:
    """sha256 (hex) of a checkpoint's content: every key, scalar and tensor (dtype, shape and raw bytes), walked
    in sorted-key order, so it survives ``torch.save``/``torch.load`` and changes with any flipped bit."""
    h = hashlib.sha256()

    def walk(o: Any) -> None:
        if isinstance(o, dict):
            h.update(b"d%d;" % len(o))
            for k in sorted(o, key=str):
                walk(str(k))
                walk(o[k])
        elif isinstance(o, (list, tuple)):
            h.update(b"l%d;" % len(o))
            for v in o:
                walk(v)
        elif isinstance(o, torch.Tensor):
            t = o.detach().cpu().contiguous()
            h.update(f"t{t.dtype}{tuple(t.shape)};".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(o, str):
            b = o.encode()
            h.update(b"s%d;" % len(b) + b)
        elif isinstance(o, bool) or o is None:
            h.update(f"b{o!r};".encode())
        elif isinstance(o, int):
            h.update(f"i{o};".encode())
        elif isinstance(o, float):
            h.update(f"f{o.hex()};".encode())
        else:
            raise TypeError(f"cannot digest checkpoint value of type {type(o).__name__}")

    walk(obj)
    return h.hexdigest()


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load ``checkpoint.pt`` (tensors on CPU; only plain types, so ``weights_only`` loading is used) and check
    its digest (:func:`checkpoint_digest`, stored under ``"digest"`` by :meth:`Server.save_checkpoint`).

    Raises:
        ValueError: not a fedaqt checkpoint of a known format, or its content does not match its digest (a
            flipped bit, a partly overwritten file); the message names the file.
    """
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a torn or foreign file: name it
        raise ValueError(f"{path} is not a readable fedaqt checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a fedaqt checkpoint (format {CHECKPOINT_FORMAT})")
    stored = ckpt.pop("digest", None)
    if stored is None:
        log.warning("%s has no digest (written by an older fedaqt); its content cannot be verified", path)
    elif checkpoint_digest(ckpt) != stored:
        raise ValueError(f"{path} is corrupt: its content does not match the sha256 digest stored with it")
    return ckpt


class Server:
    """Drives the rounds of one run. ``grid`` is Flower's Grid (or any object with ``get_node_ids`` and
    ``send_and_receive``).

    Args:
        config: the validated run configuration.
        run_dir: the run directory (created if missing).
        progress: called ``progress(round, row)`` after every round.
        resume: continue from ``run_dir/checkpoint.pt`` (from round 1 when there is none) and drop CSV rows of
            rounds after it.

    Raises:
        ValueError: on resume, a checkpoint written with a different configuration or model.
    """

    def __init__(self, config: RunConfig, run_dir: str | Path, progress: ProgressFn | None = None, resume: bool = False) -> None:
        self.config = config
        seed_everything(config.seed)
        self.progress = progress
        self.workload: Workload = get_workload_class(config.workload)(config)
        self.run = RunDir(run_dir, eval_columns=self.workload.eval_columns)  # rounds.csv: this workload's columns
        self.model = self.workload.build_model()
        self.spec = make_spec(config, self.workload, self.model)
        self.strategy = build_strategy(config, self.spec)
        params, buffers = float_state_split(self.model)
        self.arrays = ArrayRecord({k: to_array(v) for k, v in params.items()})
        #: the float buffers (BatchNorm statistics): broadcast with the parameters, moved by the mean client delta
        self.buffers: dict[str, np.ndarray] = {k: np.asarray(v) for k, v in buffers.items()}
        self.max_examples = self.max_examples_per_reply()
        self.budget = self.budget_fn()
        #: this round's node -> assigned data partition, and the broadcast QTensors sent (FedAvg final codes)
        self.partition_of: dict[int, int] = {}
        self.sent_quantized: dict[str, QTensor] = {}
        self.start_round = 1
        self.history: list[dict[str, Any]] = []
        self.node_map = ActorNodeMap()
        self.rejected_updates: list[dict[str, Any]] = []
        self.on_round_end: Callable[[], None] | None = None  # set by make_server_app (the launcher's hook)
        from fedaqt.server.clock import validate_device_trace

        #: the device trace (``-o device_trace``) driving availability and the simulated clock; None = off
        self.trace = validate_device_trace(config)
        self.deadline_s = core_options(config).deadline_s
        self.sim_time = 0.0  # simulated seconds of the rounds done (rounds.csv ``sim_time``)
        self.available: list[int] | None = None  # this round's available clients (trace only)
        #: SecAgg+ (``-o secagg=true``, :mod:`fedaqt.server.secagg`): runs each round's exchange; None = off
        self.secagg = None
        if core_options(config).secagg:
            from fedaqt.server.secagg import SecAggRound, validate_secagg

            validate_secagg(config, self.max_examples)
            self.secagg = SecAggRound(config, self.spec, self.max_examples)
        if resume:
            self.restore()
            self.sim_time = self.simulated_time_done()

    # ------------------------------------------------------------------ checkpoint
    def save_checkpoint(self, rnd: int) -> None:
        """Write ``checkpoint.pt`` for completed round ``rnd`` (write to a temp file, fsync, rename).

        Besides the state (module docstring) it holds ``records``, the row count and digest of rounds.csv and
        clients.csv (checked on resume), and ``digest``, the sha256 of everything else (checked on load). Once
        written, the results of an earlier run set aside in ``.previous/`` are deleted (:class:`RunDir`).
        """
        self._write_checkpoint(self._checkpoint_state(rnd), rnd)

    def _checkpoint_state(self, rnd: int) -> dict[str, Any]:
        """The checkpoint of completed round ``rnd`` as plain types; every tensor is a copy, so a background
        write (:class:`CheckpointWriter`) never sees the next round's changes."""
        ckpt = {
            "format": CHECKPOINT_FORMAT,
            "round": int(rnd),
            "config": json.dumps(self.config.to_dict(), sort_keys=True),
            "params": {k: torch.from_numpy(from_array(a, writable=True)) for k, a in self.arrays.items()},
            "buffers": {k: torch.from_numpy(np.array(v, copy=True)) for k, v in self.buffers.items()},
            "strategy": strategy_state(self.strategy),
            "rng": rng_state(),
            "records": self.run.records(),
        }
        if self.secagg is not None:  # the int8 shared scales of the next round come from this round's mean
            ckpt["secagg"] = self.secagg.state_dict()
        return ckpt

    def _write_checkpoint(self, ckpt: dict[str, Any], rnd: int) -> None:
        ckpt["digest"] = checkpoint_digest(ckpt)
        path = self.run.checkpoint_path
        tmp = path.with_name(path.name + ".tmp")
        torch.save(ckpt, tmp)
        replace_atomic(tmp, path)
        if self.run.discard_previous():
            log.info("round %d checkpointed: removed the earlier run's results from %s", rnd, self.run.previous)

    def restore(self) -> int:
        """Load the checkpoint (if any) and make the CSVs end at its round; returns that round (0 = none).

        Raises:
            ValueError: a corrupt checkpoint, another configuration or model; ConfigError (a ValueError): a CSV
                that lost or changed rows of checkpointed rounds (:meth:`RunDir.check_resume`, naming the file).
        """
        path = self.run.checkpoint_path
        if not path.exists():
            log.warning("no checkpoint in %s: the run restarts at round 1", self.run.root)
            self.run.clear_results()
            self.start_round = 1
            return 0
        ckpt = read_checkpoint(path)
        saved = semantic_config(json.loads(ckpt["config"]))
        now = semantic_config(self.config)
        diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        if diff:
            raise ValueError(
                f"checkpoint {path} was written with a different configuration ({', '.join(diff)}); "
                "resume with the run's own config.json"
            )
        params = {k: t.numpy() for k, t in ckpt["params"].items()}
        expected = {k: tuple(v) for k, v in self.spec.param_shapes.items()}
        got = {k: tuple(v.shape) for k, v in params.items()}
        if got != expected:
            raise ValueError(f"checkpoint {path} does not match the model (parameter names or shapes differ)")
        done = int(ckpt["round"])
        self.run.check_resume(done, ckpt.get("records"))
        self.arrays = ArrayRecord({k: to_array(v) for k, v in params.items()})
        strategy = ckpt["strategy"]
        if "buffers" in ckpt:
            buffers = {k: t.numpy() for k, t in ckpt["buffers"].items()}
        else:  # written before the round loop owned the buffers: {"attrs": {..., "buffers": ...}}
            attrs = dict(strategy.get("attrs", {}))
            buffers = _decode_state(attrs.pop("buffers", {}))
            strategy = attrs
        if set(buffers) != set(self.buffers):
            raise ValueError(f"checkpoint {path} does not match the model (float buffer names differ)")
        self.buffers = {k: np.asarray(v) for k, v in buffers.items()}
        restore_strategy_state(self.strategy, strategy)
        if self.secagg is not None:
            self.secagg.load_state_dict(ckpt.get("secagg", {}))
        set_rng_state(ckpt["rng"])
        self.start_round = done + 1
        return done

    def budget_fn(self) -> Any:
        """Memory-budget check of replies (``--device-profile``); None admits every client."""
        if not self.config.device_profile:
            return None
        from fedaqt.server.budgets import make_budget_fn

        return make_budget_fn(self.config)

    def evaluate(self, round_num: int) -> dict[str, float]:
        """Server-side evaluation of the float global model (the workload's metrics, e.g. ``eval_cer``).

        Raises:
            RunAborted: the workload's ``evaluate`` raised; the message names the exception, where it was raised
                and the ``fedaqt run --resume`` command (the round is not checkpointed, so a resume redoes it).
        """
        params = {k: from_array(a, writable=True) for k, a in self.arrays.items()}
        load_into(self.model, params, self.buffers)
        try:
            return self.workload.evaluate(self.model, round_num)
        except Exception as exc:  # noqa: BLE001 - one line with the cause and how to continue
            where = ""
            frames = traceback.extract_tb(exc.__traceback__)
            if frames:
                f = frames[-1]
                where = f" (at {f.filename}:{f.lineno} in {f.name})"
            raise RunAborted(
                f"round {round_num}: server-side evaluate of workload {self.config.workload!r} failed: "
                f"{type(exc).__name__}: {exc}{where}; rounds before {round_num} are checkpointed in {self.run.root}: "
                f"after fixing the cause continue with `fedaqt run --resume {self.run.root}`"
            ) from exc

    def should_evaluate(self, rnd: int) -> bool:
        every = self.config.eval_every or self.workload.default_eval_every
        return rnd == 1 or rnd == self.config.rounds or rnd % every == 0

    def max_examples_per_reply(self) -> int:
        """The most examples any client is asked to process in one round, from the client algorithm
        (:meth:`ClientAlgorithm.max_examples`: one batch for FedSGD, ``local_steps`` batches or ``local_epochs``
        passes over the client's partition for FedAvg); a reply claiming more is rejected."""
        cfg = self.config
        algorithm = get_algorithm_class(cfg.algorithm)
        return max(int(algorithm.max_examples(cfg, self.workload, c)) for c in range(cfg.num_clients))

    def configure_round(self, rnd: int, grid: Any, config: ConfigRecord | None = None) -> list[Message]:
        """The train messages of round ``rnd``: the strategy's (Flower's node sampling + the broadcast), each with its
        node's data partition (:func:`sample_partitions`, paired with the nodes in the strategy's order) and, for a
        quantized FedAvg round, ``ACCEPT_FINAL_CODES``. Sets :attr:`partition_of` and :attr:`sent_quantized`."""
        if config is None:
            config = protocol.train_config(self.config.to_dict())
        messages = list(self.strategy.configure_train(rnd, self.broadcast_state(), ConfigRecord(dict(config)), grid))
        cfg = self.config
        self.available = self.trace.available(cfg.seed, rnd) if self.trace is not None else None
        partitions = sample_partitions(cfg.seed, rnd, cfg.num_clients, cfg.clients_per_round, self.available)
        self.partition_of, self.sent_quantized = {}, {}
        final_codes = self.spec.update_kind == "delta" and self.spec.bits < 32 and bool(self.spec.quantized_keys)
        decoded: dict[int, dict[str, QTensor]] = {}
        out = []
        for msg, pid in zip(messages, partitions):
            accept = False
            if final_codes:
                arrays = msg.content[BROADCAST_KEY]
                if id(arrays) not in decoded:
                    decoded[id(arrays)] = {k: v for k, v in decode_broadcast(arrays, msg.content[QUANT_META_KEY]).items()
                                           if isinstance(v, QTensor)}
                self.sent_quantized = decoded[id(arrays)]
                accept = bool(self.sent_quantized)
            node = int(msg.metadata.dst_node_id)
            self.partition_of[node] = int(pid)
            out.append(Message(content=protocol.assign_partition(msg.content, int(pid), accept), dst_node_id=node,
                               message_type=msg.metadata.message_type))
        return out

    def broadcast_state(self) -> ArrayRecord:
        """What the strategy broadcasts: the float parameters, then the float buffers."""
        return ArrayRecord({**dict(self.arrays.items()), **{k: to_array(np.asarray(v)) for k, v in self.buffers.items()}})

    def validate_replies(self, rnd: int, replies: list[Any]) -> tuple[list[ClientRow], list[tuple[Any, dict[str, torch.Tensor], int]]]:
        """Each reply through :func:`fedaqt.protocol.validate_reply`: (clients.csv rows, accepted ``(reply, update,
        n_k)``), both in the order of ``replies``; bad replies are logged, never raised."""
        rows, accepted = [], []
        for msg in replies:
            node = int(msg.metadata.src_node_id)
            expect = protocol.ReplyExpectation(round=rnd, partition=self.partition_of.get(node, -1), spec=self.spec,
                                               max_examples=self.max_examples, sent_quantized=self.sent_quantized,
                                               budget_fn=self.budget)
            row, update, n = protocol.validate_reply(msg, expect)
            rows.append(row)
            if update is not None:
                accepted.append((msg, update, n))
            elif row.status != "ok":
                log.warning("round %d: client %d %s: %s", rnd, row.client_id, row.status, row.error)
        return rows, accepted

    def mean_buffers(self, accepted: list[tuple[Any, dict[str, torch.Tensor], int]]) -> dict[str, np.ndarray]:
        """The float buffers moved by the ``n_k``-weighted mean of the accepted clients' buffer deltas (float64 sum,
        cast back to each buffer's dtype); the current buffers when nothing was accepted."""
        if not accepted:
            return dict(self.buffers)
        total = sum(n for _, _, n in accepted)
        out = {}
        for key, shape in self.spec.buffer_shapes.items():
            acc = torch.zeros(shape, dtype=torch.float64)
            for _, update, n in accepted:
                acc += update[key].to(torch.float64) * (n / total)
            out[key] = (self.buffers[key] + acc.numpy()).astype(self.buffers[key].dtype)
        return out

    def run_rounds(self, grid: Any) -> dict[str, Any]:
        """Run rounds ``start_round..config.rounds``; returns the summary (see :meth:`finish`).

        Per round: configure (:meth:`configure_round`), ``send_and_receive`` with ``options.round_timeout`` seconds
        (default 3600), validate (:meth:`validate_replies`), aggregate the accepted replies, record a ``timeout``
        clients.csv row for every sampled client that did not answer in time, then refuse an aggregated model that
        is not finite (old model, buffers and strategy state kept, rounds.csv ``update_rejected`` = 1, reason logged
        and listed in the summary's ``rejected_updates``).

        Raises:
            RunAborted: ``options.max_nonfinite_rounds`` (default 3) rounds produced a non-finite model, or the
                server-side evaluation failed; every round before is checkpointed and the message says how to resume.
        """
        cfg = self.config
        core = core_options(cfg)  # typed, validated in preflight
        timeout, max_bad = core.round_timeout, core.max_nonfinite_rounds
        train_config = protocol.train_config(cfg.to_dict())
        writer = CheckpointWriter(self._write_checkpoint)
        try:
            return self._rounds(grid, core, timeout, max_bad, train_config, writer)
        except BaseException:
            try:
                writer.close()  # the last completed round's checkpoint lands before the error propagates
            except Exception as exc:  # noqa: BLE001 - the round's own error is the one to raise; log this one
                log.error("the checkpoint write in flight failed too: %s: %s", type(exc).__name__, exc)
            raise

    def _rounds(self, grid: Any, core: CoreOptions, timeout: float, max_bad: int, train_config: Any,
                writer: CheckpointWriter) -> dict[str, Any]:
        cfg = self.config
        for rnd in range(self.start_round, cfg.rounds + 1):
            t0 = time.perf_counter()
            hwm_reset = reset_vmhwm()  # this process's RSS high-water mark, from here to the end of the round
            messages = self.configure_round(rnd, grid, train_config)
            sim_row: dict[str, Any] = {}
            byte_row: dict[str, Any] = {}
            before = strategy_state(self.strategy)  # restored if the aggregated model is not finite
            if self.secagg is not None:  # SecAgg+: the four stages replace send_and_receive + validation + mean
                rows, accepted, new_arrays, metrics, new_buffers, byte_row = self.secagg_round(rnd, grid, messages, timeout)
                n_accepted = len(accepted)
            elif core.stream_aggregation and self.trace is None and getattr(self.strategy, "accepts_mean_reply", False):
                rows, n_accepted, new_arrays, metrics, new_buffers = self.streamed_round(rnd, grid, messages, timeout)
            else:  # every reply of the round held: the simulated clock, a robust aggregator, stream_aggregation=false
                replies = list(grid.send_and_receive(messages, timeout=timeout))
                if self.on_round_end is not None:
                    self.on_round_end()  # the launcher's hook (Ray backend: kill what this round still runs, timeouts)
                replies = self.in_partition_order(replies)
                rows, accepted = self.validate_replies(rnd, replies)
                if self.trace is not None:
                    rows, accepted, sim_row = self.apply_clock(rnd, messages, rows, accepted)
                keys = list(self.spec.param_shapes)
                normalized = [protocol.normalized_reply(update, keys, n, int(msg.metadata.src_node_id))
                              for msg, update, n in accepted]
                # the parameters now travel in `normalized`: keep only the buffer deltas (mean_buffers) of the decoded updates
                accepted = [(msg, {k: update[k] for k in self.spec.buffer_shapes}, n) for msg, update, n in accepted]
                new_arrays, metrics = self.strategy.aggregate_train(rnd, normalized)
                new_buffers = self.mean_buffers(accepted)
                self.record_nodes(replies, rows)
                rows = self.record_timeouts(rnd, messages, {int(m.metadata.src_node_id) for m in replies}, timeout, rows)
                n_accepted = len(accepted)
                del replies, normalized, accepted
            rejected = ""
            if new_arrays is not None:
                rejected = self.nonfinite_reason(new_arrays, new_buffers)
                if rejected:
                    restore_strategy_state(self.strategy, before)
                    self.rejected_updates.append({"round": rnd, "reason": rejected})
                    log.error("round %d: the aggregated model is not finite (%s); the global model is unchanged", rnd, rejected)
                else:
                    self.arrays = self.as_model_dtypes(new_arrays)
                    self.buffers = new_buffers
                    if self.secagg is not None and byte_row.get("_mean") is not None:
                        self.secagg.update_scales(byte_row["_mean"])
            else:
                log.warning("round %d: no client update was aggregated; the global model is unchanged", rnd)
            ok = [r for r in rows if r.status == "ok"]
            train_loss = math.nan
            if n_accepted:
                train_loss = float(sum(r.train_loss * r.num_examples for r in ok) / max(1, sum(r.num_examples for r in ok)))
            row: dict[str, Any] = {
                "round": rnd,
                "train_loss": train_loss,
                "bytes_down": int(byte_row.pop("bytes_down_override", None)
                                  or sum(record_nbytes(m.content[BROADCAST_KEY]) for m in messages)),
                "bytes_up": int(byte_row.pop("bytes_up_override", None) or sum(r.bytes_up for r in rows)),
                "clients_ok": n_accepted,
                "clients_sampled": len(messages),
                "update_rejected": int(bool(rejected)),
            }
            row.update(sim_row)
            byte_row.pop("_mean", None)
            row.update(byte_row)  # SecAgg+: bytes of all four stages, masked-vector bytes
            for k, v in (metrics.items() if metrics is not None else ()):  # the strategy's own statistics
                if k != NUM_EXAMPLES and k not in row:
                    row[k] = v
            if self.should_evaluate(rnd):
                row.update(self.evaluate(rnd))
            row["seconds"] = time.perf_counter() - t0
            hwm = read_vmhwm_kib() if hwm_reset else None
            # the driver's (this process's) peak RSS in the round: server, Flower's in-memory state and, in a Ray
            # simulation, the simulation engine's threads (the clients run in other processes)
            row["server_rss_peak_mib"] = hwm / 1024 if hwm is not None else math.nan
            self.run.rounds.append([row])
            self.run.clients.append([r.as_dict() for r in rows])
            writer.submit(self._checkpoint_state(rnd), rnd)  # digest + save + fsync overlap the next round
            self.history.append(row)
            if self.progress:
                self.progress(rnd, row)
            if len(self.rejected_updates) >= max_bad:
                writer.close()
                self.finish()
                raise RunAborted(
                    f"round {rnd}: the aggregated model was not finite in {len(self.rejected_updates)} rounds "
                    f"(max_nonfinite_rounds={max_bad}; last: {rejected or self.rejected_updates[-1]['reason']}); "
                    f"the model of the last finite round is checkpointed in {self.run.root}: inspect clients.csv, "
                    f"then continue with `fedaqt run --resume {self.run.root}`"
                )
        writer.close()
        return self.finish()

    def streamed_round(self, rnd: int, grid: Any, messages: list[Message], timeout: float) -> tuple[Any, ...]:
        """One round with streaming aggregation (:mod:`fedaqt.server.stream`): each reply is validated as it arrives,
        an accepted one folded into order-independent running sums of ``n_k * update`` (parameters and buffer deltas)
        and its content dropped, so the server holds O(model), not O(clients x model). The strategy then gets the
        mean as one normalized reply of weight ``sum n_k`` (what its weighted mean of the individual replies would
        give). Returns (clients.csv rows sorted by (client, node), accepted count, new arrays, metrics, new buffers).
        """
        params = WeightedSum(self.spec.param_shapes)
        buffers = WeightedSum(self.spec.buffer_shapes)
        keys = list(self.spec.param_shapes)
        clip = getattr(self.strategy, "clip_update", None)  # central DP: each update clipped before it is summed
        clipped, max_n = 0, 0
        rows: list[ClientRow] = []
        answered: set[int] = set()  # the nodes that replied (record_timeouts)
        for msg in stream_replies(grid, messages, timeout):
            (row,), accepted = self.validate_replies(rnd, [msg])
            for _, update, n in accepted:
                if clip is not None:
                    clipped_update, was_clipped = clip(update, keys)
                    clipped += int(was_clipped)
                    params.add(clipped_update, n)
                else:
                    params.add(update, n)
                buffers.add(update, n)  # buffers are not clipped (fedaqt.strategies.dp: not covered by ε)
                max_n = max(max_n, int(n))
            del accepted
            rows.append(row)
            self.record_nodes([msg], [row])
            answered.add(int(msg.metadata.src_node_id))
            del msg  # the update lives on only in the sums
        if self.on_round_end is not None:
            self.on_round_end()  # the launcher's hook (Ray backend: kill what this round still runs, timeouts)
        rows = self.record_timeouts(rnd, messages, answered, timeout, rows)
        if not params.count:
            return rows, 0, None, None, dict(self.buffers)
        mean = {k: torch.from_numpy(v) for k, v in params.mean().items()}
        if hasattr(self.strategy, "aggregate_streamed"):
            reply = protocol.normalized_reply(mean, keys, params.total, 0)
            new_arrays, metrics = self.strategy.aggregate_streamed(rnd, reply, max_n, params.total, clipped,
                                                                    params.count)
        elif hasattr(self.strategy, "aggregate_mean"):  # QuantizedMixin: the mean itself, not encoded into a reply
            new_arrays, metrics = self.strategy.aggregate_mean(rnd, {k: mean[k] for k in keys}, params.total)
        else:
            reply = protocol.normalized_reply(mean, keys, params.total, 0)
            new_arrays, metrics = self.strategy.aggregate_train(rnd, [reply])
        bmean = buffers.mean() if buffers.shapes else {}
        new_buffers = {k: (v + bmean[k]).astype(v.dtype) if k in bmean else v for k, v in self.buffers.items()}
        return rows, params.count, new_arrays, metrics, new_buffers

    def secagg_round(self, rnd: int, grid: Any, messages: list[Message], timeout: float) -> tuple[Any, ...]:
        """One round through SecAgg+ (:class:`fedaqt.server.secagg.SecAggRound`): returns (clients.csv rows, the
        aggregated clients (a list of that length), the strategy's new arrays and metrics, the new float buffers,
        rounds.csv byte columns + ``"_mean"``, the unmasked mean). The strategy gets the securely aggregated mean
        as one normalized reply of weight ``sum n_k``, so its weighted mean is that mean and the server optimizer and
        the relay correction apply to it unchanged."""
        assert self.secagg is not None
        messages = self.secagg.prepare(messages)

        def expectation(node: int) -> protocol.ReplyExpectation:
            return protocol.ReplyExpectation(round=rnd, partition=self.partition_of.get(node, -1), spec=self.spec,
                                             max_examples=self.max_examples)

        out = self.secagg.run(rnd, grid, messages, timeout, expectation, self.partition_of,
                              on_stage_end=self.on_round_end)
        self.record_nodes(out.replies, out.rows)
        byte_row: dict[str, Any] = {"bytes_down_override": out.bytes_down, "bytes_up_override": out.bytes_up,
                                    "secagg_masked_bytes": out.masked_bytes, "_mean": out.mean}
        if out.mean is None or out.total <= 0:
            return out.rows, [], None, None, dict(self.buffers), byte_row
        keys = list(self.spec.param_shapes)
        reply = protocol.normalized_reply({k: torch.from_numpy(out.mean[k]) for k in keys}, keys, out.total, 0)
        new_arrays, metrics = self.strategy.aggregate_train(rnd, [reply])
        new_buffers = {k: (self.buffers[k] + out.mean[k]).astype(self.buffers[k].dtype) for k in self.spec.buffer_shapes}
        return out.rows, [None] * out.aggregated, new_arrays, metrics, new_buffers, byte_row

    def apply_clock(self, rnd: int, messages: list[Any], rows: list[ClientRow],
                    accepted: list[tuple[Any, dict[str, torch.Tensor], int]]
                    ) -> tuple[list[ClientRow], list[tuple[Any, dict[str, torch.Tensor], int]], dict[str, Any]]:
        """The simulated clock of round ``rnd`` (:mod:`fedaqt.server.clock`): every reply's row gets ``sim_seconds``
        and ``tier``; an accepted client past ``deadline_s`` becomes ``status=straggler`` and leaves ``accepted``.
        Returns (rows, accepted, the rounds.csv columns ``sim_seconds``, ``sim_time``, ``clients_available``,
        ``stragglers``)."""
        from fedaqt.server.clock import simulated_seconds

        assert self.trace is not None
        down = {int(m.metadata.dst_node_id): int(record_nbytes(m.content[BROADCAST_KEY])) for m in messages}
        ok_nodes = {int(msg.metadata.src_node_id) for msg, _, _ in accepted}
        dropped: set[int] = set()
        times: list[float] = []
        for row in rows:
            if row.client_id < 0 or row.client_id not in self.trace.devices:
                continue
            dev = self.trace.device(row.client_id)
            row.extra["tier"] = dev.tier or ""
            if row.status not in ("ok", "over_budget"):  # no reply to time (error, died, rejected)
                continue
            seconds = row.seconds if math.isfinite(row.seconds) else 0.0
            t = simulated_seconds(seconds, down.get(int(row.node_id), 0), int(row.bytes_up), dev)
            row.extra["sim_seconds"] = t
            times.append(t)
            if self.deadline_s > 0 and t > self.deadline_s and int(row.node_id) in ok_nodes:
                row.status = "straggler"
                row.error = f"simulated round time {t:.3f} s > deadline_s {self.deadline_s:g} s"
                dropped.add(int(row.node_id))
                log.info("round %d: client %d straggler: %s", rnd, row.client_id, row.error)
        accepted = [a for a in accepted if int(a[0].metadata.src_node_id) not in dropped]
        if dropped:
            sim = float(self.deadline_s)
        else:
            sim = max(times, default=0.0)
        self.sim_time += sim
        return rows, accepted, {"sim_seconds": sim, "sim_time": self.sim_time,
                                "clients_available": len(self.available or []), "stragglers": len(dropped)}

    def simulated_time_done(self) -> float:
        """``sim_time`` of the last round in rounds.csv (0 when there is none): the clock continues on resume."""
        import pandas as pd

        path = self.run.rounds.path
        if self.trace is None or not Path(path).exists():
            return 0.0
        df = pd.read_csv(path)
        if "sim_time" not in df or not len(df):
            return 0.0
        return float(df["sim_time"].iloc[-1])

    def nonfinite_reason(self, arrays: ArrayRecord, buffers: dict[str, np.ndarray] | None = None) -> str:
        """'' when every aggregated parameter and float buffer (``buffers``, default the current ones) is finite,
        else which key is not (and how)."""
        for k, a in arrays.items():
            v = from_array(a)
            if v.dtype.kind in "fc" and not np.isfinite(v).all():
                return f"{k}: {int(np.isnan(v).sum())} NaN, {int(np.isinf(v).sum())} inf of {v.size} values"
        for k, v in (self.buffers if buffers is None else buffers).items():
            v = np.asarray(v)
            if v.dtype.kind in "fc" and not np.isfinite(v).all():
                return f"buffer {k}: not finite"
        return ""

    def record_timeouts(self, rnd: int, messages: list[Any], answered: set[int], timeout: float,
                        rows: list[ClientRow]) -> list[ClientRow]:
        """``rows`` plus a ``timeout`` row for every message whose node is not in ``answered`` (the nodes that
        replied), sorted by (client_id, node_id)."""
        rows = list(rows)
        for msg in messages:
            node = int(msg.metadata.dst_node_id)
            if node in answered:
                continue
            row = ClientRow(round=rnd, client_id=int(self.partition_of.get(node, -1)), node_id=node, status="timeout",
                            error=f"no reply within round_timeout={timeout:g} s")
            row.extra["ray_node_id"] = ""
            rows.append(row)
            log.warning("round %d: client %d timeout: no reply within %g s", rnd, row.client_id, timeout)
        rows.sort(key=lambda r: (r.client_id, r.node_id))
        return rows

    def as_model_dtypes(self, arrays: ArrayRecord) -> ArrayRecord:
        """``arrays`` cast to the float model's parameter dtypes (Flower's FedAdam/FedYogi/FedAdagrad return
        float64 arrays for a float32 model; the global model, its broadcast and checkpoint stay float32)."""
        dtypes = {k: p.detach().numpy().dtype for k, p in self.model.named_parameters()}
        out = {}
        for k, a in arrays.items():
            v = from_array(a)
            want = dtypes.get(k, v.dtype)
            out[k] = a if v.dtype == want else to_array(v.astype(want))  # an unchanged record is reused as it is
        return ArrayRecord(out)

    def in_partition_order(self, replies: list[Any]) -> list[Any]:
        """Replies sorted by the data partition the server assigned to their node (arrival order varies with Ray's
        scheduling; the weighted sums must not)."""
        part = self.partition_of

        def key(msg: Any) -> tuple[int, int]:
            node = int(msg.metadata.src_node_id)
            return (part.get(node, 1 << 62), node)

        return sorted(replies, key=key)

    def record_nodes(self, replies: list[Any], rows: list[ClientRow]) -> None:
        """Put each client's Ray node id into its clients.csv row (column ``ray_node_id``; "" when unknown)."""
        by_node: dict[int, str] = {}
        for msg in replies:
            node_hex = ""
            try:
                if not msg.has_error():
                    node_hex = nodeinfo_of(msg.content)
                    if not node_hex:
                        metrics = msg.content.metric_records.get(METRICS_KEY)
                        pid = int(metrics.get("pid", 0)) if metrics is not None else 0
                        node_hex = self.node_map.node_of(pid)
            except Exception:  # noqa: BLE001 - informative only
                node_hex = ""
            by_node[int(msg.metadata.src_node_id)] = node_hex
        for row in rows:
            row.extra["ray_node_id"] = by_node.get(int(row.node_id), "")

    def finish(self) -> dict[str, Any]:
        import pandas as pd

        rounds = _read_csv(pd, self.run.rounds.path, ("round", "bytes_down", "bytes_up", "seconds"))
        clients = _read_csv(pd, self.run.clients.path, ("round", "status"))
        summary: dict[str, Any] = {
            "rounds_completed": int(rounds["round"].max()) if len(rounds) else 0,
            "config": self.config.to_dict(),
            "workload": self.workload.describe(),
            "num_parameters": int(sum(p.numel() for p in self.model.parameters())),
            "num_quantized_tensors": len(self.spec.quantized_keys),
            "participation_rate": float((clients["status"] == "ok").mean()) if len(clients) else 0.0,
            "client_status_counts": clients["status"].value_counts().to_dict() if len(clients) else {},
            "total_bytes_down": int(rounds["bytes_down"].sum()),
            "total_bytes_up": int(rounds["bytes_up"].sum()),
            "wall_seconds": float(rounds["seconds"].sum()),
            "rejected_updates": list(self.rejected_updates),
        }
        evals = rounds.dropna(subset=[c for c in self.workload.eval_columns[:1] if c in rounds])
        if len(evals):
            first, last = evals.iloc[0], evals.iloc[-1]
            for col in self.workload.eval_columns:
                if col in rounds:
                    summary[f"first_{col}"] = _num(first.get(col))
                    summary[f"final_{col}"] = _num(last.get(col))
        write_json_atomic(self.run.summary_path, summary)
        return summary


def _read_csv(pd: Any, path: Path, columns: tuple[str, ...]) -> Any:
    """The CSV as a DataFrame; an empty one with ``columns`` when the file does not exist yet (no row written)."""
    if not Path(path).exists():
        return pd.DataFrame({c: [] for c in columns})
    return pd.read_csv(path)


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def make_server_app(
    config: RunConfig,
    run_dir: str | Path,
    progress: ProgressFn | None = None,
    result: dict | None = None,
    resume: bool = False,
    on_round_end: Callable[[], None] | None = None,
    on_finish: Callable[[], None] | None = None,
) -> ServerApp:
    """A ServerApp bound to ``config``; the run summary is stored in ``result["summary"]`` when given.
    ``resume``: continue from the run directory's checkpoint (see :class:`Server`).

    The launcher's hooks (the server knows nothing of how clients are run): ``on_round_end()`` is called once per
    round right after ``send_and_receive`` returns (the Ray backend abandons what that round still runs: clients
    past the round timeout); ``on_finish()`` once when ``main`` ends, normally or not (the Ray backend ends hung
    clients so ``run_simulation`` returns)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            summary = run_server(config, run_dir, grid, progress, resume=resume, on_round_end=on_round_end)
            if result is not None:
                result["summary"] = summary
        finally:
            if on_finish is not None:
                on_finish()

    return app


def run_server(config: RunConfig, run_dir: str | Path, grid: Grid, progress: ProgressFn | None = None,
               resume: bool = False, on_round_end: Callable[[], None] | None = None) -> dict[str, Any]:
    """Run the rounds of ``config`` on ``grid`` into ``run_dir``; returns the summary (``summary.json``).

    The ServerApp body of both front ends: ``fedaqt run`` (:func:`make_server_app`, Simulation Engine) and the
    Flower app's ``server_app`` (:mod:`fedaqt.app`, ``flwr run`` on a SuperLink)."""
    server = Server(config, run_dir, progress, resume=resume)
    server.on_round_end = on_round_end
    return server.run_rounds(grid)
