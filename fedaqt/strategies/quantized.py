"""Quantized-broadcast strategies on Flower's Message API (spec §2.2).

:class:`QuantizedMixin` is placed in front of a Flower strategy class (``flwr.serverapp.strategy``). It owns what
is specific to quantized federated training and reuses Flower's classes for the server-side math:

* ``configure_train``: Flower samples the nodes (with the global ``random`` module, which we seed per round);
  we assign each sampled node a data partition drawn from our own seeded generator, and replace the float
  payload by the quantized broadcast (``quant.encode_broadcast``: int8 / packed int4 codes + float32 scales).
* ``aggregate_train``: every reply is validated (status, shapes, dtypes, finite values); malformed, failed or
  over-budget replies are logged and recorded, never averaged in. The accepted float updates (FedSGD gradients or
  FedAvg deltas) are averaged weighted by ``num-examples``; :meth:`correct_mean_update` may post-process the mean
  (the gradient relay does); then Flower's own ``aggregate_train`` of the wrapped class applies the server
  optimizer to one reply holding ``W + sign * mean`` (sign -1 for gradients, +1 for deltas). Because every
  Flower strategy listed here starts by taking the weighted mean of the replies, this equals running Flower's
  strategy on the clients' float models directly (tested at ``--bits 32``).
* Float buffers (BatchNorm running statistics) are not parameters: the server moves them by the mean client
  delta, outside the optimizer.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import MessageType

from fedaqt.quant.uplink import decode_update
from fedaqt.quant.quantize import qmax
from fedaqt.quant.wire import QTensor, decode_broadcast, encode_broadcast, record_nbytes

log = logging.getLogger("fedaqt.strategy")

#: record keys of a train message (server -> client)
BROADCAST_KEY, QUANT_META_KEY, CONFIG_KEY = "arrays", "quant", "config"
#: record keys of a train reply (client -> server)
UPDATE_KEY, METRICS_KEY, ERROR_KEY, PROFILE_KEY = "arrays", "metrics", "error", "profile"
#: FedAvg final-codes upload (issue 4): the train-config flag by which the server accepts the final codes + scales
#: of quantized layers, and the reply ConfigRecord ``{"format": FINAL_CODES_FORMAT, "keys": [...]}`` naming them
ACCEPT_FINAL_CODES, UPDATE_META_KEY, FINAL_CODES_FORMAT = "accept-final-codes", "update", "final-codes"


@dataclass
class BroadcastSpec:
    """What the server broadcasts and what it expects back.

    Attributes:
        bits: weight bit-width on the wire (32 = float32, 8, 4).
        granularity: "tensor" or "channel" scales.
        quantized_keys: float-model state keys sent as codes + scales.
        param_shapes: trainable parameter keys -> shape (the update keys the server expects).
        buffer_shapes: float buffer keys -> shape (clients upload their delta).
        update_kind: "gradient" (FedSGD) or "delta" (FedAvg).
    """

    bits: int
    granularity: str
    quantized_keys: frozenset[str]
    param_shapes: dict[str, tuple[int, ...]]
    buffer_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    update_kind: str = "gradient"
    #: quantized-layer keys a FedAvg final-codes reply must name (None: not checked)
    final_code_keys: frozenset[str] | None = None

    def expected_update_shapes(self) -> dict[str, tuple[int, ...]]:
        return {**self.param_shapes, **self.buffer_shapes}


@dataclass
class ClientRow:
    """One row of ``clients.csv`` (one sampled client in one round)."""

    round: int
    client_id: int
    node_id: int
    status: str = "ok"
    num_examples: int = 0
    train_loss: float = float("nan")
    seconds: float = float("nan")
    bytes_up: int = 0
    error: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "extra"}
        d.update(self.extra)
        return d


class QuantizedMixin:
    """Turns a Flower Message-API strategy into a quantized-broadcast one (see module docstring).

    Call :meth:`setup_quantized` once before the first round.
    """

    spec: BroadcastSpec

    def setup_quantized(
        self,
        spec: BroadcastSpec,
        buffers: dict[str, np.ndarray],
        seed: int,
        num_clients: int,
        clients_per_round: int,
        budget_fn: Any = None,
    ) -> None:
        self.spec = spec
        self.buffers = {k: np.asarray(v) for k, v in buffers.items()}
        self.seed = seed
        self.num_clients = num_clients
        self.clients_per_round = clients_per_round
        self.budget_fn = budget_fn  # (client_id, reply content) -> reason str or None (memory budgets)
        self.current_float: dict[str, np.ndarray] | None = None
        self.last_client_rows: list[ClientRow] = []
        self.last_round_stats: dict[str, float] = {}
        self.partition_of: dict[int, int] = {}
        self.sent_dequantized: dict[str, torch.Tensor] = {}
        self.sent_quantized: dict[str, Any] = {}  # this round's broadcast QTensors (codes + float32 scales), for the relay

    # ------------------------------------------------------------------ sampling + broadcast
    def sample_partitions(self, server_round: int) -> list[int]:
        """The data partitions trained in ``server_round``: a deterministic function of (seed, round)."""
        rng = np.random.default_rng([self.seed, 7919, server_round])
        return sorted(rng.choice(self.num_clients, size=self.clients_per_round, replace=False).tolist())

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Any) -> Iterable[Message]:
        # Flower's node sampling uses the global `random` module: seed it per round (reproducible, resumable).
        random.seed(self.seed * 1_000_003 + server_round)
        messages = list(super().configure_train(server_round, arrays, config, grid))  # type: ignore[misc]
        if not messages:
            return []
        self.current_float = {k: np.asarray(a.numpy()) for k, a in arrays.items()}
        state = {k: torch.from_numpy(np.array(v)) for k, v in {**self.current_float, **self.buffers}.items()}
        q_arrays, q_meta = encode_broadcast(state, self.spec.quantized_keys, self.spec.bits, self.spec.granularity)
        # the codes + float32 scales exactly as sent (the relay's Q(w)); FedAvg clients upload the final codes +
        # scales of quantized layers, and the delta is formed against the Q(W) sent
        self.sent_quantized: dict[str, QTensor] = {}
        self.sent_dequantized = {}
        if self.spec.bits < 32 and self.spec.quantized_keys:
            self.sent_quantized = {k: v for k, v in decode_broadcast(q_arrays, q_meta).items() if isinstance(v, QTensor)}
            if self.spec.update_kind == "delta":
                self.sent_dequantized = {k: v.dequantize() for k, v in self.sent_quantized.items()}
        partitions = self.sample_partitions(server_round)
        base_config = messages[0].content[self.configrecord_key]  # type: ignore[attr-defined]
        out = []
        self.partition_of = {}
        for msg, pid in zip(messages, partitions):
            cfg = ConfigRecord(dict(base_config))
            cfg["partition-id"] = int(pid)
            if self.sent_dequantized:
                cfg[ACCEPT_FINAL_CODES] = True
            node = msg.metadata.dst_node_id
            self.partition_of[node] = int(pid)
            content = RecordDict({BROADCAST_KEY: q_arrays, QUANT_META_KEY: q_meta, CONFIG_KEY: cfg})
            out.append(Message(content=content, dst_node_id=node, message_type=MessageType.TRAIN))
        self.last_round_stats = {"bytes_down": float(record_nbytes(q_arrays) * len(out))}
        return out

    # ------------------------------------------------------------------ aggregation
    def validate_reply(self, msg: Message, server_round: int) -> tuple[ClientRow, dict[str, torch.Tensor] | None, int]:
        """Check one reply completely; returns its clients.csv row and, if accepted, the decoded float update
        (``{key: float32 tensor}`` shaped as :meth:`BroadcastSpec.expected_update_shapes`) and its weight n_k.

        Never raises for a bad reply: a Flower error or a client-side error record gives status ``error`` (a
        Ray actor that died gives ``died``); a malformed reply gives ``rejected`` with the reason in ``error``;
        an over-budget one ``over_budget``. Checked: the metrics record (``num-examples`` an integer in
        ``[1, max_examples]``, ``partition-id`` the partition the server assigned to that node, ``train_loss`` and
        (optional) ``seconds`` finite reals, ``seconds >= 0``; other metric keys scalar and not named like a clients.csv
        column), the update arrays (decodable ``.npy`` with the expected keys/shapes/dtypes, finite), and the
        FedAvg final-codes metadata (format, keys, codes within the run's bit-width).
        """
        node = msg.metadata.src_node_id
        assigned = self.partition_of.get(node, -1)
        row = ClientRow(round=server_round, client_id=assigned, node_id=node)
        if msg.has_error():
            reason = str(msg.error.reason)
            row.status = "died" if CLIENT_DIED_MARK in reason else "error"
            row.error = reason[:500]
            return row, None, 0
        try:
            return self._validate_content(msg.content, row, assigned)
        except Exception as exc:  # noqa: BLE001 - a reply must never crash the round
            row.status, row.error = "rejected", f"{type(exc).__name__}: {exc}"[:500]
            return row, None, 0

    def _validate_content(self, content: RecordDict, row: ClientRow,
                          assigned: int) -> tuple[ClientRow, dict[str, torch.Tensor] | None, int]:
        def reject(reason: str) -> tuple[ClientRow, None, int]:
            row.status, row.error = "rejected", reason[:500]
            return row, None, 0

        if ERROR_KEY in content.config_records:
            row.status, row.error = "error", str(content.config_records[ERROR_KEY].get("error", ""))[:500]
            return row, None, 0
        metrics = content.metric_records.get(METRICS_KEY)
        if metrics is None:
            return reject(f"reply has no MetricRecord {METRICS_KEY!r}")
        try:
            pid = _int_metric(metrics, "partition-id")
            if assigned >= 0 and pid != assigned:
                raise ValueError(f"partition-id={pid} but the server assigned partition {assigned} to this node")
            row.client_id = pid
            row.num_examples = _int_metric(metrics, "num-examples")
            row.train_loss = _real_metric(metrics, "train_loss")
            if "seconds" in metrics:  # optional (wall time, informative); when present a finite number >= 0
                row.seconds = _real_metric(metrics, "seconds")
        except ValueError as exc:
            return reject(str(exc))
        if row.num_examples <= 0:
            return reject(f"num-examples={row.num_examples} must be positive")
        limit = getattr(self, "max_examples", None)
        if limit is not None and row.num_examples > limit:
            return reject(f"num-examples={row.num_examples} exceeds the {limit} examples the client was asked to process")
        if row.seconds < 0:
            return reject(f"seconds={row.seconds} must be >= 0")
        extra = {}
        for k, v in metrics.items():
            if k in _METRIC_FIELDS:
                continue
            if k in RESERVED_CLIENT_COLUMNS:
                return reject(f"metric key {k!r} collides with the clients.csv column of that name")
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                return reject(f"metric {k!r}={v!r} must be a scalar int or float")
            extra[k] = v
        row.extra = extra
        update_rec = content.array_records.get(UPDATE_KEY)
        if update_rec is None:
            return reject(f"reply has no ArrayRecord {UPDATE_KEY!r}")
        row.bytes_up = record_nbytes(update_rec)
        try:
            update = decode_update(update_rec, self.spec.expected_update_shapes())
            if UPDATE_META_KEY in content.config_records:
                update = self.form_final_code_deltas(update, content.config_records[UPDATE_META_KEY], update_rec)
        except ValueError as exc:
            return reject(str(exc))
        if self.budget_fn is not None:
            reason = self.budget_fn(row.client_id, content)
            if reason:
                row.status, row.error = "over_budget", reason
                return row, None, 0
        return row, update, row.num_examples

    def form_final_code_deltas(self, update: dict[str, torch.Tensor], meta: ConfigRecord,
                               raw: ArrayRecord | None = None) -> dict[str, torch.Tensor]:
        """FedAvg final-codes upload: ``delta_k = s_T q_T - s_0 q_0`` for the keys the reply names, ``s_0 q_0``
        being what this round broadcast.

        ``meta["keys"]`` must list each key once and exactly the quantized-layer keys the server expects
        (:attr:`BroadcastSpec.final_code_keys`, when set); with ``raw`` (the reply's ArrayRecord) each named key
        must be int8 codes within ``[-t_b, t_b]`` of the run's bit-width ``b`` (7 for 4 bits, 127 for 8).

        Raises:
            ValueError: an unknown format, final codes that were not requested, a malformed/duplicated/missing
                key, a key not sent quantized, or codes outside the bit-width (the message names the key).
        """
        if str(meta.get("format", "")) != FINAL_CODES_FORMAT:
            raise ValueError(f"unknown update format {meta.get('format')!r} (expected {FINAL_CODES_FORMAT!r})")
        if not self.sent_dequantized:
            raise ValueError("final codes in a reply to a round that did not request them")
        keys = meta.get("keys", [])
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise ValueError(f"final-codes keys must be a list of strings, got {keys!r}")
        dup = sorted({k for k in keys if keys.count(k) > 1})
        if dup:
            raise ValueError(f"{dup[0]}: listed more than once in the final-codes keys")
        want = self.spec.final_code_keys
        if want is not None:
            missing = sorted(set(want) - set(keys))
            if missing:
                raise ValueError(f"{missing[0]}: quantized layer missing from the final-codes keys")
        t = qmax(self.spec.bits) if self.spec.bits < 32 else 127
        out = dict(update)
        for k in keys:
            if k not in self.sent_dequantized or k not in out:
                raise ValueError(f"{k}: final codes for a tensor that was not broadcast quantized this round")
            if raw is not None:
                codes = raw[k].numpy()
                if codes.dtype != np.int8:
                    raise ValueError(f"{k}: final codes must be int8, got {codes.dtype}")
                if codes.size and int(np.abs(codes.astype(np.int16)).max()) > t:
                    raise ValueError(f"{k}: final codes outside [-{t}, {t}] for {self.spec.bits}-bit weights")
            out[k] = out[k] - self.sent_dequantized[k].to(out[k].dtype)
        return out

    def correct_mean_update(self, server_round: int, mean: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Hook applied to the weighted-mean update before the server optimizer step (identity here)."""
        return mean

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        rows, accepted = [], []
        for msg in replies:
            row, update, n = self.validate_reply(msg, server_round)
            rows.append(row)
            if update is not None:
                accepted.append((update, n))
            elif row.status != "ok":
                log.warning("round %d: client %d %s: %s", server_round, row.client_id, row.status, row.error)
        self.last_client_rows = rows
        self.last_round_stats["bytes_up"] = float(sum(r.bytes_up for r in rows))
        self.last_round_stats["clients_ok"] = float(len(accepted))
        if not accepted or self.current_float is None:
            return None, None
        total = sum(n for _, n in accepted)
        mean: dict[str, torch.Tensor] = {}
        for key, shape in self.spec.expected_update_shapes().items():
            acc = torch.zeros(shape, dtype=torch.float64)
            for update, n in accepted:
                acc += update[key].to(torch.float64) * (n / total)
            mean[key] = acc
        mean = self.correct_mean_update(server_round, mean)
        sign = -1.0 if self.spec.update_kind == "gradient" else 1.0
        pseudo = {}
        for key, current in self.current_float.items():
            pseudo[key] = Array(np.asarray(current + sign * mean[key].numpy().astype(current.dtype), dtype=current.dtype))
        for key in self.spec.buffer_shapes:
            self.buffers[key] = (self.buffers[key] + mean[key].numpy()).astype(self.buffers[key].dtype)
        synthetic = Message(
            content=RecordDict(
                {"arrays": ArrayRecord(pseudo), "metrics": MetricRecord({self.weighted_by_key: total})}  # type: ignore[attr-defined]
            ),
            dst_node_id=0,
            message_type=MessageType.TRAIN,
        )
        arrays, _ = super().aggregate_train(server_round, [synthetic])  # type: ignore[misc]
        ok = [r for r in rows if r.status == "ok"]
        metrics = MetricRecord(
            {
                "train_loss": float(sum(r.train_loss * r.num_examples for r in ok) / max(1, sum(r.num_examples for r in ok))),
                "num-examples": int(total),
            }
        )
        return arrays, metrics


#: the metrics of a reply that become fixed clients.csv columns
_METRIC_FIELDS = ("partition-id", "num-examples", "train_loss", "seconds")
#: clients.csv columns a reply's extra metrics may not overwrite
RESERVED_CLIENT_COLUMNS = frozenset(f.name for f in ClientRow.__dataclass_fields__.values() if f.name != "extra") | {
    "ray_node_id", "client_id", "num_examples"}
#: marker in the Flower error reason of a client whose Ray actor died (see :mod:`fedaqt.launch.backend`)
CLIENT_DIED_MARK = "ClientActorDied"


def _int_metric(metrics: MetricRecord, key: str) -> int:
    """``metrics[key]`` as an int; raises ValueError naming the key for a missing, list, bool, non-finite or
    fractional value."""
    if key not in metrics:
        raise ValueError(f"metrics have no {key!r}")
    v = metrics[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{key}={v!r} must be an integer")
    if isinstance(v, float) and not (math.isfinite(v) and v.is_integer()):
        raise ValueError(f"{key}={v!r} must be an integer")
    return int(v)


def _real_metric(metrics: MetricRecord, key: str) -> float:
    """``metrics[key]`` as a finite float; raises ValueError naming the key otherwise."""
    if key not in metrics:
        raise ValueError(f"metrics have no {key!r}")
    v = metrics[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
        raise ValueError(f"{key}={v!r} must be a finite number")
    return float(v)
