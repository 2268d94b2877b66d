"""The message contract between the server and a client: every record and config key of the train message and of
its reply, their encode/decode, and the complete validation of a reply (spec §2.2).

Train message (server -> client), a :class:`flwr.app.RecordDict`:

* ``BROADCAST_KEY`` (ArrayRecord): the float model as sent, int8 / packed int4 codes + float32 scales for quantized
  tensors, float32 otherwise (:func:`fedaqt.quant.wire.encode_broadcast`);
* ``QUANT_META_KEY`` (ConfigRecord): the codes' metadata (keys, bit-widths, axes, shapes);
* ``CONFIG_KEY`` (ConfigRecord): ``RUN_CONFIG`` (the run's configuration as JSON), ``SERVER_ROUND`` (set by
  Flower's ``configure_train``), ``PARTITION_ID`` (the data partition the server assigned to that node),
  ``PROXIMAL_MU`` (FedProx, set by Flower's FedProx), ``ACCEPT_FINAL_CODES`` (the server forms FedAvg deltas
  from final codes itself) and, in a SecAgg+ round, ``SECAGG_KEYS`` / ``SECAGG_SCALES`` (the update keys in the order
  of the masked vector, the shared int8 scales; :mod:`fedaqt.client.secagg`). A SecAgg+ reply is Flower's legacy
  ``FitRes`` layout masked by ``secaggplus_mod`` instead of the reply below.

Reply (client -> server):

* ``UPDATE_KEY`` (ArrayRecord): the update encoded at ``uplink_bits`` (:mod:`fedaqt.quant.uplink`): FedSGD
  gradients or FedAvg deltas, or for a final-codes upload the final int8 codes + float32 scales of quantized layers;
* ``METRICS_KEY`` (MetricRecord): ``PARTITION_ID``, ``NUM_EXAMPLES``, ``train_loss``, optional ``seconds`` and any
  other scalar (all written to clients.csv);
* ``UPDATE_META_KEY`` (ConfigRecord, only for a final-codes upload): ``{"format": FINAL_CODES_FORMAT, "keys": [...]}``;
* ``NODEINFO_KEY`` (ConfigRecord, optional): ``ray_node_id`` and ``hostname`` of the process that trained;
* ``ERROR_KEY`` (ConfigRecord ``{"error": text}``) instead of the update when the client failed.

This module imports nothing of fedaqt but :mod:`fedaqt.quant` (plus flwr, torch and numpy).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedaqt.quant.quantize import qmax
from fedaqt.quant.uplink import decode_update
from fedaqt.quant.wire import QTensor, record_nbytes

# ---------------------------------------------------------------------------------------------- keys
#: record keys of a train message (server -> client)
BROADCAST_KEY, QUANT_META_KEY, CONFIG_KEY = "arrays", "quant", "config"
#: record keys of a train reply (client -> server)
UPDATE_KEY, METRICS_KEY, ERROR_KEY = "arrays", "metrics", "error"
#: FedAvg final-codes upload (issue 4): the train-config flag by which the server accepts the final codes + scales
#: of quantized layers, and the reply ConfigRecord ``{"format": FINAL_CODES_FORMAT, "keys": [...]}`` naming them
ACCEPT_FINAL_CODES, UPDATE_META_KEY, FINAL_CODES_FORMAT = "accept-final-codes", "update", "final-codes"
#: train-config keys: the run configuration (JSON), the round (Flower's own key), the assigned data partition,
#: FedProx's proximal coefficient (Flower's own key)
RUN_CONFIG, SERVER_ROUND, PARTITION_ID, PROXIMAL_MU = "run-config", "server-round", "partition-id", "proximal-mu"
#: reply metric: examples processed (the aggregation weight; Flower's ``weighted_by_key`` default)
NUM_EXAMPLES = "num-examples"
#: reply ConfigRecord with the Ray node id and hostname of the client process (see :mod:`fedaqt.client.nodeinfo`)
NODEINFO_KEY = "nodeinfo"
#: marker in the Flower error reason of a client whose Ray actor died (see :mod:`fedaqt.launch.backend`)
CLIENT_DIED_MARK = "ClientActorDied"
#: SecAgg+ (:mod:`fedaqt.server.secagg`): train-config keys naming the update keys in the order of the securely
#: summed vector and, at ``--uplink-bits 8``, the shared per-tensor scales of this round (same order)
SECAGG_KEYS, SECAGG_SCALES = "secagg-keys", "secagg-scales"


# ---------------------------------------------------------------------------------------------- what is expected
@dataclass
class BroadcastSpec:
    """What the server broadcasts and what it expects back.

    Attributes:
        bits: weight bit-width on the wire (32 = float32, 8, 4).
        granularity: "tensor" or "channel" scales.
        quantized_keys: float-model state keys sent as codes + scales.
        param_shapes: trainable parameter keys -> shape (the update keys the server expects).
        buffer_shapes: float buffer keys -> shape (clients upload their delta).
        update_kind: "gradient" (FedSGD) or "delta" (FedAvg): the client algorithm's ``upload``.
        final_code_keys: quantized-layer keys a FedAvg final-codes reply must name (None: not checked).
    """

    bits: int
    granularity: str
    quantized_keys: frozenset[str]
    param_shapes: dict[str, tuple[int, ...]]
    buffer_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    update_kind: str = "gradient"
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


#: the metrics of a reply that become fixed clients.csv columns
METRIC_FIELDS = (PARTITION_ID, NUM_EXAMPLES, "train_loss", "seconds")
#: clients.csv columns a reply's extra metrics may not overwrite
RESERVED_CLIENT_COLUMNS = frozenset(f for f in ClientRow.__dataclass_fields__ if f != "extra") | {
    "ray_node_id", "client_id", "num_examples"}

#: ``budget_fn(client_id, reply content) -> reason`` (over budget) or None (admitted)
BudgetFn = Callable[[int, RecordDict], Optional[str]]


@dataclass
class ReplyExpectation:
    """What the server expects of one reply (the input of :func:`validate_reply`).

    Attributes:
        round: the server round.
        partition: the data partition the server assigned to the replying node (-1: none assigned, not checked).
        spec: the broadcast spec (expected update keys, shapes, bit-width, final-code keys).
        max_examples: the most examples the client was asked to process (None: not checked).
        sent_quantized: this round's broadcast QTensors (codes + float32 scales as sent); a final-codes reply is
            accepted only when non-empty and forms ``delta = s_T q_T - s_0 q_0`` against them.
        budget_fn: memory-budget check (``--device-profile``), None admits every reply.
    """

    round: int
    partition: int
    spec: BroadcastSpec
    max_examples: int | None = None
    sent_quantized: Mapping[str, QTensor] = field(default_factory=dict)
    budget_fn: BudgetFn | None = None
    _dequantized: dict[str, torch.Tensor] | None = field(default=None, repr=False, compare=False)

    def sent_dequantized(self) -> dict[str, torch.Tensor]:
        """``s_0 q_0`` of every tensor sent quantized (float32 tensors; computed once)."""
        if self._dequantized is None:
            self._dequantized = {k: v.dequantize() for k, v in self.sent_quantized.items()}
        return self._dequantized


@dataclass(frozen=True)
class TrainInstructions:
    """A decoded train message's config (what :func:`decode_train` returns).

    Attributes:
        partition_id: the data partition to train (-1 when neither the message nor the node names one).
        server_round: the round (int >= 0).
        run_config: the run configuration as a plain dict (``RunConfig.to_dict()``).
        proximal_mu: FedProx's proximal coefficient (0.0: none).
        accept_final_codes: the server accepts final codes + scales instead of FedAvg deltas.
    """

    partition_id: int
    server_round: int
    run_config: dict[str, Any]
    proximal_mu: float = 0.0
    accept_final_codes: bool = False


# ---------------------------------------------------------------------------------------------- train message
def train_config(run_config: Mapping[str, Any]) -> ConfigRecord:
    """The round-independent train ConfigRecord: ``{RUN_CONFIG: json}`` (keys sorted, so it is reproducible)."""
    return ConfigRecord({RUN_CONFIG: json.dumps(dict(run_config), sort_keys=True)})


def encode_train(broadcast: ArrayRecord, quant_meta: ConfigRecord, config: Mapping[str, Any] | ConfigRecord,
                 partition_id: int | None = None, accept_final_codes: bool = False) -> RecordDict:
    """The content of one train message.

    Args:
        broadcast: the encoded float model (:func:`fedaqt.quant.wire.encode_broadcast`).
        quant_meta: its metadata ConfigRecord.
        config: the train config (``RUN_CONFIG``, ``SERVER_ROUND``, ...); copied, never modified.
        partition_id: the data partition of the receiving node (None: not set).
        accept_final_codes: set ``ACCEPT_FINAL_CODES = True`` (only written when True).
    """
    cfg = ConfigRecord(dict(config))
    if partition_id is not None:
        cfg[PARTITION_ID] = int(partition_id)
    if accept_final_codes:
        cfg[ACCEPT_FINAL_CODES] = True
    return RecordDict({BROADCAST_KEY: broadcast, QUANT_META_KEY: quant_meta, CONFIG_KEY: cfg})


def assign_partition(content: RecordDict, partition_id: int, accept_final_codes: bool = False) -> RecordDict:
    """A copy of a train message's content (same broadcast records, new config) naming ``partition_id``."""
    return encode_train(content[BROADCAST_KEY], content[QUANT_META_KEY], content[CONFIG_KEY], partition_id,
                        accept_final_codes)


def train_partition_id(content: RecordDict, fallback: int | None = None) -> int:
    """The partition a train message names, else ``fallback``, else -1 (never raises for a malformed config)."""
    try:
        cfg = content[CONFIG_KEY]
        return int(cfg.get(PARTITION_ID, fallback if fallback is not None else -1))
    except Exception:  # noqa: BLE001 - used for the error reply of a malformed message
        return int(fallback) if fallback is not None else -1


def decode_train(content: RecordDict, fallback_partition: int | None = None) -> TrainInstructions:
    """Decode a train message's config.

    Args:
        content: the train message content (:func:`encode_train`).
        fallback_partition: the partition when the message names none (the node's ``partition-id``).

    Raises:
        KeyError: no ``CONFIG_KEY`` record, or no ``RUN_CONFIG``/``SERVER_ROUND`` in it.
        ValueError: ``RUN_CONFIG`` is not a JSON object (json.JSONDecodeError is a ValueError), or a value of the
            wrong type.
    """
    cfg = content[CONFIG_KEY]
    run_config = json.loads(str(cfg[RUN_CONFIG]))
    if not isinstance(run_config, dict):
        raise ValueError(f"{RUN_CONFIG} must be a JSON object, got {type(run_config).__name__}")
    return TrainInstructions(
        partition_id=train_partition_id(content, fallback_partition),
        server_round=int(cfg[SERVER_ROUND]),
        run_config=run_config,
        proximal_mu=float(cfg.get(PROXIMAL_MU, 0.0)),
        accept_final_codes=bool(cfg.get(ACCEPT_FINAL_CODES, False)),
    )


# ---------------------------------------------------------------------------------------------- reply
def encode_reply(update: ArrayRecord, metrics: Mapping[str, Any], final_code_keys: list[str] | None = None,
                 nodeinfo: ConfigRecord | None = None) -> RecordDict:
    """The content of a train reply.

    Args:
        update: the encoded update (:meth:`fedaqt.client.trainer.UploadBuffer.to_array_record`).
        metrics: scalar metrics, at least ``PARTITION_ID``, ``NUM_EXAMPLES`` and ``train_loss``.
        final_code_keys: the keys whose arrays are final codes + scales (a non-empty list adds ``UPDATE_META_KEY``).
        nodeinfo: the ``NODEINFO_KEY`` ConfigRecord (:func:`fedaqt.client.nodeinfo.reply_nodeinfo`), or None.
    """
    records: dict[str, Any] = {UPDATE_KEY: update, METRICS_KEY: MetricRecord(dict(metrics))}
    if nodeinfo is not None:
        records[NODEINFO_KEY] = nodeinfo
    if final_code_keys:
        records[UPDATE_META_KEY] = ConfigRecord({"format": FINAL_CODES_FORMAT, "keys": list(final_code_keys)})
    return RecordDict(records)


def encode_error_reply(partition_id: int, error: str) -> RecordDict:
    """The reply of a client that failed: ``METRICS_KEY`` (partition, 0 examples) + ``ERROR_KEY`` ``{"error": ...}``."""
    return RecordDict({
        METRICS_KEY: MetricRecord({PARTITION_ID: int(partition_id), NUM_EXAMPLES: 0}),
        ERROR_KEY: ConfigRecord({"error": str(error)}),
    })


def reply_error(content: RecordDict) -> str | None:
    """The error text of an error reply, None for any other reply."""
    if ERROR_KEY in content.config_records:
        return str(content.config_records[ERROR_KEY].get("error", ""))
    return None


def validate_reply(msg: Message, expect: ReplyExpectation) -> tuple[ClientRow, dict[str, torch.Tensor] | None, int]:
    """Check one reply completely; returns its clients.csv row and, if accepted, the decoded float update
    (``{key: float32 tensor}`` shaped as :meth:`BroadcastSpec.expected_update_shapes`) and its weight n_k.

    Never raises for a bad reply: a Flower error or a client-side error record gives status ``error`` (a Ray actor
    that died gives ``died``); a malformed reply gives ``rejected`` with the reason in ``error``; an over-budget one
    ``over_budget``. Checked: the metrics record (``num-examples`` an integer in ``[1, max_examples]``,
    ``partition-id`` the partition the server assigned to that node, ``train_loss`` and (optional) ``seconds`` finite
    reals, ``seconds >= 0``; other metric keys scalar and not named like a clients.csv column), the update arrays
    (decodable ``.npy`` with the expected keys/shapes/dtypes, finite), and the FedAvg final-codes metadata (format,
    keys, codes within the run's bit-width). The row's ``client_id`` is the assigned partition until the reply's own
    ``partition-id`` is read; ``bytes_up`` is the size of the update record.
    """
    node = msg.metadata.src_node_id
    row = ClientRow(round=expect.round, client_id=expect.partition, node_id=node)
    if msg.has_error():
        reason = str(msg.error.reason)
        row.status = "died" if CLIENT_DIED_MARK in reason else "error"
        row.error = reason[:500]
        return row, None, 0
    try:
        return _validate_content(msg.content, row, expect)
    except Exception as exc:  # noqa: BLE001 - a reply must never crash the round
        row.status, row.error = "rejected", f"{type(exc).__name__}: {exc}"[:500]
        return row, None, 0


def _validate_content(content: RecordDict, row: ClientRow,
                      expect: ReplyExpectation) -> tuple[ClientRow, dict[str, torch.Tensor] | None, int]:
    def reject(reason: str) -> tuple[ClientRow, None, int]:
        row.status, row.error = "rejected", reason[:500]
        return row, None, 0

    error = reply_error(content)
    if error is not None:
        row.status, row.error = "error", error[:500]
        return row, None, 0
    metrics = content.metric_records.get(METRICS_KEY)
    if metrics is None:
        return reject(f"reply has no MetricRecord {METRICS_KEY!r}")
    reason = check_reply_metrics(metrics, row, expect)
    if reason:
        return reject(reason)
    update_rec = content.array_records.get(UPDATE_KEY)
    if update_rec is None:
        return reject(f"reply has no ArrayRecord {UPDATE_KEY!r}")
    row.bytes_up = record_nbytes(update_rec)
    try:
        update = decode_update(update_rec, expect.spec.expected_update_shapes())
        if UPDATE_META_KEY in content.config_records:
            update = form_final_code_deltas(update, content.config_records[UPDATE_META_KEY], expect, update_rec)
    except ValueError as exc:
        return reject(str(exc))
    if expect.budget_fn is not None:
        reason = expect.budget_fn(row.client_id, content)
        if reason:
            row.status, row.error = "over_budget", reason
            return row, None, 0
    return row, update, row.num_examples


def check_reply_metrics(metrics: Mapping[str, Any], row: ClientRow, expect: ReplyExpectation) -> str:
    """The metric checks of :func:`validate_reply` (also what a SecAgg+ server can check of a masked reply, whose
    metrics travel in plaintext): '' when they pass, else the reason. Fills ``row`` (``client_id``,
    ``num_examples``, ``train_loss``, ``seconds``, ``extra``).

    Checked: ``partition-id`` the partition the server assigned to that node, ``num-examples`` an integer in
    ``[1, max_examples]``, ``train_loss`` and (optional) ``seconds`` finite reals, ``seconds >= 0``; other metric
    keys scalar and not named like a clients.csv column.
    """
    try:
        pid = _int_metric(metrics, PARTITION_ID)
        if expect.partition >= 0 and pid != expect.partition:
            raise ValueError(f"{PARTITION_ID}={pid} but the server assigned partition {expect.partition} to this node")
        row.client_id = pid
        row.num_examples = _int_metric(metrics, NUM_EXAMPLES)
        row.train_loss = _real_metric(metrics, "train_loss")
        if "seconds" in metrics:  # optional (wall time, informative); when present a finite number >= 0
            row.seconds = _real_metric(metrics, "seconds")
    except ValueError as exc:
        return str(exc)
    if row.num_examples <= 0:
        return f"{NUM_EXAMPLES}={row.num_examples} must be positive"
    limit = expect.max_examples
    if limit is not None and row.num_examples > limit:
        return f"{NUM_EXAMPLES}={row.num_examples} exceeds the {limit} examples the client was asked to process"
    if row.seconds < 0:
        return f"seconds={row.seconds} must be >= 0"
    extra = {}
    for k, v in metrics.items():
        if k in METRIC_FIELDS:
            continue
        if k in RESERVED_CLIENT_COLUMNS:
            return f"metric key {k!r} collides with the clients.csv column of that name"
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return f"metric {k!r}={v!r} must be a scalar int or float"
        extra[k] = v
    row.extra = extra
    return ""


def form_final_code_deltas(update: dict[str, torch.Tensor], meta: ConfigRecord, expect: ReplyExpectation,
                           raw: ArrayRecord | None = None) -> dict[str, torch.Tensor]:
    """FedAvg final-codes upload: ``delta_k = s_T q_T - s_0 q_0`` for the keys the reply names, ``s_0 q_0`` being
    what this round broadcast (``expect.sent_quantized``).

    ``meta["keys"]`` must list each key once and exactly the quantized-layer keys the server expects
    (:attr:`BroadcastSpec.final_code_keys`, when set); with ``raw`` (the reply's ArrayRecord) each named key must be
    int8 codes within ``[-t_b, t_b]`` of the run's bit-width ``b`` (7 for 4 bits, 127 for 8), or for a 4-bit run the
    packed int4 form (uint8, two codes per byte, already range-checked by ``decode_update``).

    Raises:
        ValueError: an unknown format, final codes that were not requested, a malformed/duplicated/missing key, a
            key not sent quantized, or codes outside the bit-width (the message names the key).
    """
    if str(meta.get("format", "")) != FINAL_CODES_FORMAT:
        raise ValueError(f"unknown update format {meta.get('format')!r} (expected {FINAL_CODES_FORMAT!r})")
    sent = expect.sent_dequantized()
    if not sent:
        raise ValueError("final codes in a reply to a round that did not request them")
    keys = meta.get("keys", [])
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise ValueError(f"final-codes keys must be a list of strings, got {keys!r}")
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise ValueError(f"{dup[0]}: listed more than once in the final-codes keys")
    spec = expect.spec
    want = spec.final_code_keys
    if want is not None:
        missing = sorted(set(want) - set(keys))
        if missing:
            raise ValueError(f"{missing[0]}: quantized layer missing from the final-codes keys")
    t = qmax(spec.bits) if spec.bits < 32 else 127
    out = dict(update)
    for k in keys:
        if k not in sent or k not in out:
            raise ValueError(f"{k}: final codes for a tensor that was not broadcast quantized this round")
        if raw is not None:
            codes = raw[k].numpy()
            if codes.dtype == np.uint8 and spec.bits == 4:
                pass  # packed int4 (issue 17): decode_update checked every nibble lies in [-7, 7]
            elif codes.dtype != np.int8:
                want = "int8 or packed int4 (uint8)" if spec.bits == 4 else "int8"
                raise ValueError(f"{k}: final codes must be {want}, got {codes.dtype}")
            elif codes.size and int(np.abs(codes.astype(np.int16)).max()) > t:
                raise ValueError(f"{k}: final codes outside [-{t}, {t}] for {spec.bits}-bit weights")
        out[k] = out[k] - sent[k].to(out[k].dtype)
    return out


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


# ---------------------------------------------------------------------------------------------- to the strategy
def normalized_reply(update: Mapping[str, torch.Tensor], keys: Any, num_examples: int, node_id: int) -> Message:
    """What the strategy receives of one accepted reply: ``UPDATE_KEY`` = ArrayRecord of the decoded float32 update
    of the parameter ``keys`` (numpy arrays, bitwise the decoded tensors) and ``METRICS_KEY`` =
    ``{NUM_EXAMPLES: n}``; sent "from" ``node_id``."""
    from flwr.common import MessageType

    from fedaqt.quant.npy import to_array

    # np.array(order="C"), not np.ascontiguousarray: the latter turns a 0-d parameter into shape (1,)
    arrays = ArrayRecord({k: to_array(np.array(update[k].detach().cpu().numpy(), copy=True, order="C")) for k in keys})
    content = RecordDict({UPDATE_KEY: arrays, METRICS_KEY: MetricRecord({NUM_EXAMPLES: int(num_examples)})})
    return Message(content=content, dst_node_id=int(node_id), message_type=MessageType.TRAIN)
