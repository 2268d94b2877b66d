"""Flower ServerApp: float global model, quantized broadcast, evaluation, checkpoints, run directory.

The round loop is ours rather than ``Strategy.start``: ``start`` always begins at round 1 and has no per-round
hook, while a run here must write ``rounds.csv``/``clients.csv`` and an atomic checkpoint after every round and
resume from the last complete one. Each round still calls the strategy's own ``configure_train`` /
``aggregate_train`` exactly as ``start`` does, and ``grid.send_and_receive`` in between.

Reproducibility: the server seeds Python's ``random``, numpy's and torch's global generators from
``config.seed`` before it builds anything; the strategy re-seeds ``random`` for Flower's node sampling every round
and draws each round's data partitions from ``(seed, round)``; replies are aggregated in partition order, not
arrival order, so concurrent Ray workers cannot change the float sums.

Checkpoint (``RUN_DIR/checkpoint.pt``, replaced atomically after the round's CSV rows are on disk): round number,
float parameters, the strategy's float buffers (BatchNorm statistics), the Flower strategy's optimizer state
(:data:`STRATEGY_STATE_ATTRS`, plus ``checkpoint_state()`` of a strategy that defines it), the RNG states of
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
from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from torch import nn

from fedaqt.config import RESUME_OVERRIDABLE, RunConfig, migrate_legacy
from fedaqt.options import CoreOptions, core_options
from fedaqt.plugins import get_strategy_plugin, get_workload_class
from fedaqt.quant.convert import quantized_weight_keys
from fedaqt.report.rundir import RunDir, replace_atomic, write_json_atomic
from fedaqt.sim import backend as sim_backend
from fedaqt.sim.nodeinfo import ActorNodeMap, nodeinfo_of
from fedaqt.strategies.quantized import BroadcastSpec, ClientRow
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
        update_kind="gradient" if config.algorithm == "fedsgd" else "delta",
        final_code_keys=frozenset(qkeys),
    )


def load_into(model: nn.Module, params: dict[str, np.ndarray], buffers: dict[str, np.ndarray]) -> None:
    state = {k: torch.from_numpy(np.asarray(v)) for k, v in {**params, **buffers}.items()}
    model.load_state_dict(state, strict=False)


# ---------------------------------------------------------------------------------------------- RNG + checkpoint
CHECKPOINT_FORMAT = 1

#: Flower strategy attributes that carry server-optimizer state between rounds (``flwr.serverapp.strategy``):
#: FedAvgM ``current_arrays`` (ArrayRecord) + ``momentum_vector`` (list of arrays); FedOpt (FedAdam, FedYogi,
#: FedAdagrad) ``current_arrays``/``m_t``/``v_t`` (dicts of arrays); QuantizedMixin ``buffers`` (float buffers).
STRATEGY_STATE_ATTRS = ("current_arrays", "momentum_vector", "m_t", "v_t", "buffers")


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
        return {"__arrayrecord__": {k: torch.from_numpy(np.array(a.numpy(), copy=True)) for k, a in obj.items()}}
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
    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor)):
        return obj
    raise TypeError(f"cannot checkpoint strategy state of type {type(obj).__name__}")


def _decode_state(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__arrayrecord__"}:
            return ArrayRecord({k: Array(t.numpy()) for k, t in obj["__arrayrecord__"].items()})
        if set(obj) == {"__ndarray__"}:
            return obj["__ndarray__"].numpy()
        if set(obj) == {"__tuple__"}:
            return tuple(_decode_state(v) for v in obj["__tuple__"])
        return {k: _decode_state(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode_state(v) for v in obj]
    return obj


def strategy_state(strategy: Any) -> dict[str, Any]:
    """The strategy's cross-round state (see :data:`STRATEGY_STATE_ATTRS`), encoded for ``torch.save``."""
    out: dict[str, Any] = {"attrs": {}}
    for name in STRATEGY_STATE_ATTRS:
        if hasattr(strategy, name):
            out["attrs"][name] = _encode_state(getattr(strategy, name))
    if callable(getattr(strategy, "checkpoint_state", None)):
        out["custom"] = _encode_state(strategy.checkpoint_state())
    return out


def restore_strategy_state(strategy: Any, state: dict[str, Any]) -> None:
    """Inverse of :func:`strategy_state`."""
    for name, value in state.get("attrs", {}).items():
        setattr(strategy, name, _decode_state(value))
    if "custom" in state:
        if not callable(getattr(strategy, "restore_checkpoint_state", None)):
            raise ValueError("the checkpoint holds custom strategy state but the strategy has no restore_checkpoint_state()")
        strategy.restore_checkpoint_state(_decode_state(state["custom"]))


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
        self.run = RunDir(run_dir)
        self.progress = progress
        self.workload: Workload = get_workload_class(config.workload)(config)
        self.model = self.workload.build_model()
        self.spec = make_spec(config, self.workload, self.model)
        plugin = get_strategy_plugin(config.strategy)
        self.strategy = plugin.factory(config)
        params, buffers = float_state_split(self.model)
        self.strategy.setup_quantized(
            self.spec, buffers, config.seed, config.num_clients, config.clients_per_round, budget_fn=self.budget_fn()
        )
        self.arrays = ArrayRecord({k: Array(v) for k, v in params.items()})
        self.start_round = 1
        self.history: list[dict[str, Any]] = []
        self.node_map = ActorNodeMap()
        self.rejected_updates: list[dict[str, Any]] = []
        if resume:
            self.restore()

    # ------------------------------------------------------------------ checkpoint
    def save_checkpoint(self, rnd: int) -> None:
        """Write ``checkpoint.pt`` for completed round ``rnd`` (write to a temp file, fsync, rename).

        Besides the state (module docstring) it holds ``records``, the row count and digest of rounds.csv and
        clients.csv (checked on resume), and ``digest``, the sha256 of everything else (checked on load). Once
        written, the results of an earlier run set aside in ``.previous/`` are deleted (:class:`RunDir`).
        """
        ckpt = {
            "format": CHECKPOINT_FORMAT,
            "round": int(rnd),
            "config": json.dumps(self.config.to_dict(), sort_keys=True),
            "params": {k: torch.from_numpy(np.array(a.numpy(), copy=True)) for k, a in self.arrays.items()},
            "strategy": strategy_state(self.strategy),
            "rng": rng_state(),
            "records": self.run.records(),
        }
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
        self.arrays = ArrayRecord({k: Array(v) for k, v in params.items()})
        restore_strategy_state(self.strategy, ckpt["strategy"])
        set_rng_state(ckpt["rng"])
        self.start_round = done + 1
        return done

    def budget_fn(self) -> Any:
        """Memory-budget check of replies (``--device-profile``); None admits every client."""
        if not self.config.device_profile:
            return None
        from fedaqt.sim.devices import make_budget_fn

        return make_budget_fn(self.config)

    def evaluate(self, round_num: int) -> dict[str, float]:
        """Server-side evaluation of the float global model (the workload's metrics, e.g. ``eval_cer``).

        Raises:
            RunAborted: the workload's ``evaluate`` raised; the message names the exception, where it was raised
                and the ``fedaqt run --resume`` command (the round is not checkpointed, so a resume redoes it).
        """
        params = {k: a.numpy() for k, a in self.arrays.items()}
        load_into(self.model, params, self.strategy.buffers)
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
        """The most examples a client is asked to process in one round: one batch (FedSGD) or ``local_steps``
        batches (FedAvg) of ``batch_size``; a reply claiming more is rejected."""
        cfg = self.config
        return int(cfg.batch_size * (1 if cfg.algorithm == "fedsgd" else cfg.local_steps))

    def run_rounds(self, grid: Any) -> dict[str, Any]:
        """Run rounds ``start_round..config.rounds``; returns the summary (see :meth:`finish`).

        Per round: configure, ``send_and_receive`` with ``options.round_timeout`` seconds (default 3600), validate
        and aggregate, record a ``timeout`` clients.csv row for every sampled client that did not answer in time,
        then refuse an aggregated model that is not finite (old model and strategy state kept, rounds.csv
        ``update_rejected`` = 1, reason logged and listed in the summary's ``rejected_updates``).

        Raises:
            RunAborted: ``options.max_nonfinite_rounds`` (default 3) rounds produced a non-finite model, or the
                server-side evaluation failed; every round before is checkpointed and the message says how to resume.
        """
        cfg = self.config
        core = core_options(cfg)  # typed, validated in preflight
        timeout, max_bad = core.round_timeout, core.max_nonfinite_rounds
        self.strategy.max_examples = self.max_examples_per_reply()
        train_config = ConfigRecord({"run-config": json.dumps(cfg.to_dict(), sort_keys=True)})
        for rnd in range(self.start_round, cfg.rounds + 1):
            t0 = time.perf_counter()
            messages = list(self.strategy.configure_train(rnd, self.arrays, ConfigRecord(dict(train_config)), grid))
            replies = list(grid.send_and_receive(messages, timeout=timeout))
            sim_backend.abandon_before(time.time())  # Ray backend: kill what this round still runs (timeouts)
            replies = self.in_partition_order(replies)
            before = strategy_state(self.strategy)  # restored if the aggregated model is not finite
            new_arrays, metrics = self.strategy.aggregate_train(rnd, replies)
            self.record_nodes(replies)
            self.record_timeouts(rnd, messages, replies, timeout)
            rejected = ""
            if new_arrays is not None:
                rejected = self.nonfinite_reason(new_arrays)
                if rejected:
                    restore_strategy_state(self.strategy, before)
                    self.rejected_updates.append({"round": rnd, "reason": rejected})
                    log.error("round %d: the aggregated model is not finite (%s); the global model is unchanged", rnd, rejected)
                else:
                    self.arrays = self.as_model_dtypes(new_arrays)
            else:
                log.warning("round %d: no client update was aggregated; the global model is unchanged", rnd)
            stats = dict(self.strategy.last_round_stats)
            row: dict[str, Any] = {
                "round": rnd,
                "train_loss": float(metrics["train_loss"]) if metrics is not None else math.nan,
                "bytes_down": int(stats.pop("bytes_down", 0)),
                "bytes_up": int(stats.pop("bytes_up", 0)),
                "clients_ok": int(stats.pop("clients_ok", 0)),
                "clients_sampled": len(messages),
                "update_rejected": int(bool(rejected)),
            }
            row.update(stats)
            if self.should_evaluate(rnd):
                row.update(self.evaluate(rnd))
            row["seconds"] = time.perf_counter() - t0
            self.run.rounds.append([row])
            self.run.clients.append([r.as_dict() for r in self.strategy.last_client_rows])
            self.save_checkpoint(rnd)
            self.history.append(row)
            if self.progress:
                self.progress(rnd, row)
            if len(self.rejected_updates) >= max_bad:
                self.finish()
                raise RunAborted(
                    f"round {rnd}: the aggregated model was not finite in {len(self.rejected_updates)} rounds "
                    f"(max_nonfinite_rounds={max_bad}; last: {rejected or self.rejected_updates[-1]['reason']}); "
                    f"the model of the last finite round is checkpointed in {self.run.root}: inspect clients.csv, "
                    f"then continue with `fedaqt run --resume {self.run.root}`"
                )
        return self.finish()

    def nonfinite_reason(self, arrays: ArrayRecord) -> str:
        """'' when every aggregated parameter and float buffer is finite, else which key is not (and how)."""
        for k, a in arrays.items():
            v = np.asarray(a.numpy())
            if v.dtype.kind in "fc" and not np.isfinite(v).all():
                return f"{k}: {int(np.isnan(v).sum())} NaN, {int(np.isinf(v).sum())} inf of {v.size} values"
        for k, v in self.strategy.buffers.items():
            v = np.asarray(v)
            if v.dtype.kind in "fc" and not np.isfinite(v).all():
                return f"buffer {k}: not finite"
        return ""

    def record_timeouts(self, rnd: int, messages: list[Any], replies: list[Any], timeout: float) -> None:
        """Add a ``timeout`` row to the round's clients.csv rows for every message without a reply."""
        answered = {int(m.metadata.src_node_id) for m in replies}
        rows = list(self.strategy.last_client_rows)
        part = getattr(self.strategy, "partition_of", {}) or {}
        for msg in messages:
            node = int(msg.metadata.dst_node_id)
            if node in answered:
                continue
            row = ClientRow(round=rnd, client_id=int(part.get(node, -1)), node_id=node, status="timeout",
                            error=f"no reply within round_timeout={timeout:g} s")
            row.extra["ray_node_id"] = ""
            rows.append(row)
            log.warning("round %d: client %d timeout: no reply within %g s", rnd, row.client_id, timeout)
        rows.sort(key=lambda r: (r.client_id, r.node_id))
        self.strategy.last_client_rows = rows

    def as_model_dtypes(self, arrays: ArrayRecord) -> ArrayRecord:
        """``arrays`` cast to the float model's parameter dtypes (Flower's FedAdam/FedYogi/FedAdagrad return
        float64 arrays for a float32 model; the global model, its broadcast and checkpoint stay float32)."""
        dtypes = {k: p.detach().numpy().dtype for k, p in self.model.named_parameters()}
        out = {}
        for k, a in arrays.items():
            v = np.asarray(a.numpy())
            want = dtypes.get(k, v.dtype)
            out[k] = Array(v if v.dtype == want else v.astype(want))
        return ArrayRecord(out)

    def in_partition_order(self, replies: list[Any]) -> list[Any]:
        """Replies sorted by the data partition their node trained (arrival order varies with Ray's scheduling;
        the weighted sums must not)."""
        part = getattr(self.strategy, "partition_of", {}) or {}

        def key(msg: Any) -> tuple[int, int]:
            node = int(msg.metadata.src_node_id)
            return (part.get(node, 1 << 62), node)

        return sorted(replies, key=key)

    def record_nodes(self, replies: list[Any]) -> None:
        """Put each client's Ray node id into its clients.csv row (column ``ray_node_id``; "" when unknown)."""
        by_node: dict[int, str] = {}
        for msg in replies:
            node_hex = ""
            try:
                if not msg.has_error():
                    node_hex = nodeinfo_of(msg.content)
                    if not node_hex:
                        metrics = msg.content.metric_records.get("metrics")
                        pid = int(metrics.get("pid", 0)) if metrics is not None else 0
                        node_hex = self.node_map.node_of(pid)
            except Exception:  # noqa: BLE001 - informative only
                node_hex = ""
            by_node[int(msg.metadata.src_node_id)] = node_hex
        for row in getattr(self.strategy, "last_client_rows", []):
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
) -> ServerApp:
    """A ServerApp bound to ``config``; the run summary is stored in ``result["summary"]`` when given.
    ``resume``: continue from the run directory's checkpoint (see :class:`Server`)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            server = Server(config, run_dir, progress, resume=resume)
            summary = server.run_rounds(grid)
            if result is not None:
                result["summary"] = summary
        finally:
            sim_backend.stop()  # end hung clients now, so run_simulation returns and Ray is torn down

    return app
