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
import random
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import MessageType

from fedaqt.quant.uplink import decode_update
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
        """Check one reply; returns its clients.csv row and, if accepted, the decoded float update and n_k."""
        node = msg.metadata.src_node_id
        row = ClientRow(round=server_round, client_id=self.partition_of.get(node, -1), node_id=node)
        if msg.has_error():
            row.status, row.error = "error", str(msg.error.reason)[:500]
            return row, None, 0
        content = msg.content
        metrics = content.metric_records.get(METRICS_KEY)
        if metrics is None:
            row.status, row.error = "rejected", f"reply has no MetricRecord {METRICS_KEY!r}"
            return row, None, 0
        row.client_id = int(metrics.get("partition-id", row.client_id))
        row.num_examples = int(metrics.get("num-examples", 0))
        row.train_loss = float(metrics.get("train_loss", float("nan")))
        row.seconds = float(metrics.get("seconds", float("nan")))
        row.extra = {k: v for k, v in metrics.items() if k not in ("partition-id", "num-examples", "train_loss", "seconds")}
        if ERROR_KEY in content.config_records:
            row.status, row.error = "error", str(content.config_records[ERROR_KEY].get("error", ""))[:500]
            return row, None, 0
        update_rec = content.array_records.get(UPDATE_KEY)
        if update_rec is None:
            row.status, row.error = "rejected", f"reply has no ArrayRecord {UPDATE_KEY!r}"
            return row, None, 0
        row.bytes_up = record_nbytes(update_rec)
        try:
            update = decode_update(update_rec, self.spec.expected_update_shapes())
            if UPDATE_META_KEY in content.config_records:
                update = self.form_final_code_deltas(update, content.config_records[UPDATE_META_KEY])
        except ValueError as exc:
            row.status, row.error = "rejected", str(exc)[:500]
            return row, None, 0
        if row.num_examples <= 0:
            row.status, row.error = "rejected", f"num-examples={row.num_examples} must be positive"
            return row, None, 0
        if not np.isfinite(row.train_loss):
            row.status, row.error = "rejected", f"train_loss={row.train_loss} is not finite"
            return row, None, 0
        if self.budget_fn is not None:
            reason = self.budget_fn(row.client_id, content)
            if reason:
                row.status, row.error = "over_budget", reason
                return row, None, 0
        return row, update, row.num_examples

    def form_final_code_deltas(self, update: dict[str, torch.Tensor], meta: ConfigRecord) -> dict[str, torch.Tensor]:
        """FedAvg final-codes upload: ``delta_k = s_T q_T - s_0 q_0`` for the keys the reply names, ``s_0 q_0``
        being what this round broadcast. Raises ValueError for an unknown format or a key not sent quantized."""
        if str(meta.get("format", "")) != FINAL_CODES_FORMAT:
            raise ValueError(f"unknown update format {meta.get('format')!r} (expected {FINAL_CODES_FORMAT!r})")
        out = dict(update)
        for k in [str(k) for k in meta.get("keys", [])]:
            if k not in self.sent_dequantized or k not in out:
                raise ValueError(f"{k}: final codes for a tensor that was not broadcast quantized this round")
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
