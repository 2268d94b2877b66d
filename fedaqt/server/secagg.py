"""Secure aggregation with Flower's SecAgg+ for fedaqt's FedSGD rounds (issue 15, must-show 3).

``-o secagg=true`` runs every round's upload through Flower 1.42's own SecAgg+ code: the server workflow
``flwr.server.workflow.SecAggPlusWorkflow`` (its four stages: setup, share keys, collect masked vectors, unmask)
and, on the clients, ``flwr.client.mod.secaggplus_mod`` (:mod:`fedaqt.client.secagg`). No cryptography is ours.

How it fits fedaqt's Message-API round loop (:meth:`fedaqt.server.app.Server.run_rounds`). ``SecAggPlusWorkflow``
only runs in a ``LegacyContext`` with a legacy ``flwr.server.strategy.Strategy`` and owns the round's message
exchange, so :class:`SecAggRound` runs it *in place of* ``grid.send_and_receive``:

1. the round loop builds the train messages as always (Flower's node sampling, the quantized broadcast, the
   assigned partitions); :meth:`SecAggRound.prepare` adds the update keys and, at ``--uplink-bits 8``, the round's
   shared scales to each message's config;
2. a capture strategy (:class:`_CaptureStrategy`, a legacy ``Strategy``) hands the workflow the sampled nodes in
   ``configure_fit``; the workflow (:class:`_Workflow`) sends fedaqt's train messages in its stage
   ``collect_masked_vectors``, and ``aggregate_fit`` receives the unmasked weighted mean and every client's
   plaintext ``FitRes`` (num_examples, metrics). The strategy of the run is not touched by the workflow;
3. a recording grid (:class:`_StageGrid`) around the run's grid counts every stage's bytes, calls the launcher's
   ``on_round_end`` hook after each stage and *validates the masked replies before they are summed*: the plaintext
   metrics (:func:`fedaqt.protocol.check_reply_metrics`: assigned partition, ``num-examples`` in
   ``[1, max_examples]`` and equal to ``FitRes.num_examples``, finite loss, scalar metrics) and the masked vector's
   structure (one int array per update tensor, shapes, integers in ``[0, modulus)``). A reply that fails is
   withheld from the workflow, which then treats that client as a dropout and removes its masks from the others'
   with the secret shares (SecAgg+'s dropout recovery); the client is recorded ``rejected``;
4. the mean (parameters and float-buffer deltas, ``max_weight``-quantized weights ``n_k``) goes to the run's
   strategy as one normalized reply of weight ``sum n_k``: the server optimizer and the gradient relay's
   correction (:class:`fedaqt.strategies.relay.GradientRelayMixin`) apply to the securely aggregated mean as they
   apply to the plain one.

What the server cannot validate under SecAgg+: the contents of one reply's arrays (shapes beyond the masked
vector's, finite values, the element range, FedAvg final codes, memory budgets from measured peaks are not
checked per client; a client can shift the sum by up to ``clipping_range`` per element without being noticed).
A non-finite or diverging *aggregate* is still refused by the round loop.

Quantization (Flower's ``flwr.common.secure_aggregation.quantization``: each client multiplies its update by
``dq_k = round(n_k/W * T) / T`` (``W = max_weight``, set to the most examples a client is asked for, so FedSGD's
equal batches give ``dq_k = 1``), clips to ``[-C, C]`` and rounds stochastically onto the integers
``0..T`` of ``(x + C) T / 2C``; the server divides the unmasked sum by ``sum dq_k``):

* ``--uplink-bits 32``: ``C = secagg_clipping_range`` (8), ``T = secagg_quantization_range`` (2^22). Error of the
  mean per element: ``|mean_secagg - sum dq_k u_k / sum dq_k| < m (2C/T) / sum dq_k`` (= ``2C/T`` = 3.8e-6 at
  the defaults for equal weights), plus clipping where ``|u| > C`` (``secagg_clipped`` in clients.csv).
* ``--uplink-bits 8`` (shared scale): clients send int8 codes ``q_k = SR(u_k / s_t)`` on a scale ``s_t`` that the
  server broadcasts for tensor ``t`` this round (round 1: ``secagg_scale_init / 127``; later
  ``secagg_headroom * max|previous round's mean of t| / 127``); the workflow runs with ``C = 128`` and
  ``T = 256 W``, so Flower's quantizer maps ``n_k q_k / W`` to the integer ``n_k q_k + 128 W`` (stochastic
  rounding of an integer is the integer), the masked sum is exact and the mean is
  ``s_t sum_k n_k q_k / sum_k n_k``, the plain weighted mean of the clients' shared-scale int8 updates (up to
  float64 rounding). Its error against the float mean is below ``s_t`` per element (unbiased), plus clipping of
  codes beyond ±127.

Costs: every element travels as int64 in the masked vector (8 B instead of 1 B at int8 or 4 B at float32), plus
the key-agreement stages (two public keys per client, encrypted shares per neighbour pair, the unmask shares) and
three extra round trips. Rows of rounds.csv: ``bytes_down``/``bytes_up`` count all four stages (broadcast and
SecAgg+ configs down; masked vectors and key material up), ``secagg_masked_bytes`` the masked vectors alone.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, Parameters, bytes_to_ndarray, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey

from fedaqt import protocol
from fedaqt.config import ConfigError
from fedaqt.options import core_options
from fedaqt.protocol import (BROADCAST_KEY, CLIENT_DIED_MARK, CONFIG_KEY, NUM_EXAMPLES, QUANT_META_KEY, SECAGG_KEYS,
                             SECAGG_SCALES, BroadcastSpec, ClientRow)
from fedaqt.quant.wire import record_nbytes

log = logging.getLogger("fedaqt.secagg")

#: Flower's default (and largest allowed) SecAgg+ modulus: masks and sums live in [0, 2^32)
MODULUS_RANGE = 2**32
#: code range of the shared-scale int8 uplink and the clipping range that maps it onto Flower's integers
INT8_TMAX, INT8_CLIP = 127, 128.0
FITRES_METRICS, FITRES_NUM_EXAMPLES = "fitres.metrics", "fitres.num_examples"


def _count_or_fraction(v: float) -> int | float:
    """A SecAgg+ count option: <= 1 a fraction (float), else an integer count (Flower tells them apart by type)."""
    return float(v) if v <= 1 else int(v)


def secagg_parameters(config: Any, max_weight: int) -> dict[str, Any]:
    """``SecAggPlusWorkflow`` keyword arguments of a run (module docstring): ``num_shares``,
    ``reconstruction_threshold``, ``max_weight`` (= ``max_weight``, the most examples a client is asked for),
    ``clipping_range``, ``quantization_range``, ``modulus_range``."""
    core = core_options(config)
    w = int(max_weight)
    if config.uplink_bits == 8:
        clip, levels = INT8_CLIP, 256 * w
    else:
        clip, levels = float(core.secagg_clipping_range), int(core.secagg_quantization_range)
    return {"num_shares": _count_or_fraction(core.secagg_num_shares),
            "reconstruction_threshold": _count_or_fraction(core.secagg_threshold),
            "max_weight": float(w), "clipping_range": float(clip), "quantization_range": int(levels),
            "modulus_range": MODULUS_RANGE}


def validate_secagg(config: Any, max_weight: int) -> None:
    """Refuse, before any work starts, a SecAgg+ run that cannot work (no-op when ``secagg`` is off).

    Raises:
        ConfigError: naming the bad combination: an uplink other than 32/8 (per-client scales cannot be summed),
            a client algorithm that does not upload gradients (only FedSGD is integrated), central DP
            (``dp_clip``: it clips single updates the server cannot see), a device trace or device profile (their
            per-client decisions need the reply's contents or timing after the masked sum exists), fewer than 2
            clients per round, share counts that do not fit ``clients_per_round``, a modulus overflow
            (``clients_per_round * quantization_range >= 2^32``), or Flower's own parameter checks.
    """
    core = core_options(config)
    if not core.secagg:
        return
    from fedaqt.plugins import get_algorithm_class

    if config.uplink_bits not in (32, 8):
        raise ConfigError(
            f"options.secagg=true needs --uplink-bits 32 or 8, got uplink_bits={config.uplink_bits}: the "
            f"{config.uplink_bits}-bit uplink uses a scale per client and tensor, and such codes cannot be summed "
            "under SecAgg+ masks (8 bits uses one shared scale per tensor and round instead)")
    algo = get_algorithm_class(config.algorithm)
    if algo.upload != "gradient":
        raise ConfigError(
            f"options.secagg=true is integrated for FedSGD (gradient uploads) only, got algorithm="
            f"{config.algorithm!r} (uploads a {algo.upload!r}); use --algorithm fedsgd")
    if core.dp_clip > 0 or core.dp_noise > 0:
        raise ConfigError(
            f"options.secagg=true cannot be combined with central DP (dp_clip={core.dp_clip}, dp_noise="
            f"{core.dp_noise}): the DP wrapper clips each client's update, which the server never sees under SecAgg+")
    if core.device_trace or config.device_profile:
        what = f"device_trace={core.device_trace!r}" if core.device_trace else f"device_profile={config.device_profile!r}"
        raise ConfigError(
            f"options.secagg=true cannot be combined with {what}: stragglers and over-budget clients are decided "
            "per reply, and a masked reply cannot be taken out of the sum")
    m = int(config.clients_per_round)
    if m < 2:
        raise ConfigError(f"options.secagg=true needs clients_per_round >= 2 (Flower's SecAgg+), got {m}")
    params = secagg_parameters(config, max_weight)
    shares, threshold = params["num_shares"], params["reconstruction_threshold"]
    if isinstance(shares, int) and shares > m:
        raise ConfigError(f"option secagg_num_shares={shares} exceeds clients_per_round={m}")
    if isinstance(threshold, int) and isinstance(shares, int) and threshold >= shares:
        raise ConfigError(f"option secagg_threshold={threshold} must be below secagg_num_shares={shares}")
    if isinstance(threshold, int) and threshold > m:
        raise ConfigError(f"option secagg_threshold={threshold} exceeds clients_per_round={m}")
    levels = params["quantization_range"]
    if (m + 1) * levels >= MODULUS_RANGE:
        which = (f"256 x max_weight {max_weight} (int8 shared scale)" if config.uplink_bits == 8
                 else "secagg_quantization_range")
        raise ConfigError(
            f"options.secagg=true: clients_per_round={m} x quantization range {levels} ({which}) overflows the "
            f"SecAgg+ modulus 2^32; lower clients_per_round or the range")
    try:
        SecAggPlusWorkflow(**params)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"options.secagg=true: Flower's SecAggPlusWorkflow refuses {params}: {exc}") from None


def content_nbytes(content: RecordDict) -> int:
    """Wire bytes of a message for the rounds.csv byte columns: the broadcast ArrayRecord (as fedaqt counts it
    everywhere, :func:`fedaqt.quant.wire.record_nbytes`) plus Flower's SecAgg+ ConfigRecord (``count_bytes``: keys,
    ciphertexts, shares, masked vectors); plaintext metrics and the run config are not counted (as in plain runs)."""
    n = 0
    if BROADCAST_KEY in content.array_records:
        n += record_nbytes(content.array_records[BROADCAST_KEY])
    if RECORD_KEY_CONFIGS in content.config_records:
        n += config_nbytes(content.config_records[RECORD_KEY_CONFIGS])
    return n


def config_nbytes(record: ConfigRecord) -> int:
    """Bytes of a ConfigRecord's values as Flower's ``ConfigRecord.count_bytes`` counts them (str/bytes: their
    length, bool 1, int/float 8), keys included; unlike flwr 1.42's own method it accepts empty lists."""

    def one(v: Any) -> int:
        if isinstance(v, bool):
            return 1
        if isinstance(v, (str, bytes)):
            return len(v)
        return 8

    n = 0
    for k, v in record.items():
        n += len(k) + (sum(one(x) for x in v) if isinstance(v, list) else one(v))
    return n


# ---------------------------------------------------------------------------------------------- legacy adapters
class _CaptureStrategy(Strategy):
    """The legacy strategy ``SecAggPlusWorkflow`` drives: ``configure_fit`` returns this round's sampled nodes (the
    fit instructions are replaced by fedaqt's train messages, :class:`_Workflow`), ``aggregate_fit`` keeps the
    unmasked result and the clients' plaintext ``FitRes`` for the round loop."""

    def __init__(self, nodes: list[int], grid: Any) -> None:
        self.nodes = list(nodes)
        self.grid = grid
        self.results: list[tuple[Any, Any]] | None = None
        self.failures: list[Any] = []

    def initialize_parameters(self, client_manager: Any) -> None:
        return None

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: Any) -> list[tuple[Any, FitIns]]:
        empty = FitIns(Parameters(tensors=[], tensor_type=""), {})
        return [(GridClientProxy(nid, self.grid, 0), empty) for nid in self.nodes]

    def aggregate_fit(self, server_round: int, results: list[tuple[Any, Any]], failures: list[Any]) -> tuple[None, dict]:
        self.results, self.failures = list(results), list(failures)
        return None, {}

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: Any) -> list:
        return []

    def aggregate_evaluate(self, server_round: int, results: list, failures: list) -> tuple[None, dict]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> None:
        return None


class _Workflow(SecAggPlusWorkflow):
    """Flower's ``SecAggPlusWorkflow`` whose stage ``collect_masked_vectors`` sends fedaqt's train message of each
    node (broadcast, quantization metadata, config) instead of the legacy ``FitIns`` record."""

    def __init__(self, contents: dict[int, RecordDict], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.contents = contents

    def collect_masked_vectors_stage(self, grid: Any, context: Any, state: Any) -> bool:
        state.nid_to_fitins = {nid: self.contents[nid] for nid in state.nid_to_fitins}
        return super().collect_masked_vectors_stage(grid, context, state)


@dataclass
class _NodeLog:
    """What one node did in a SecAgg+ round (for its clients.csv row)."""

    stage: str = ""          # the last stage it answered
    error: str = ""          # Flower's error reason, or the reason its masked reply was refused
    status: str = ""         # "" (fine so far), "error", "died", "timeout", "rejected"
    bytes_up: int = 0
    row: ClientRow | None = None
    reply: Any = None        # its stage-2 reply (nodeinfo)


class _StageGrid:
    """The run's grid, recording each SecAgg+ stage (bytes, replies) and validating the masked replies before the
    workflow sums them (module docstring, step 3)."""

    def __init__(self, grid: Any, accept: Callable[[Message, _NodeLog], bool], on_stage_end: Callable[[], None] | None):
        self.grid = grid
        self.accept = accept
        self.on_stage_end = on_stage_end
        self.nodes: dict[int, _NodeLog] = {}
        self.bytes_down = self.bytes_up = self.masked_bytes = 0
        self.stages: list[str] = []

    def get_node_ids(self) -> list[int]:
        return list(self.grid.get_node_ids())

    def send_and_receive(self, messages: Any, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        stage = ""
        if messages:
            stage = str(messages[0].content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE, ""))
        self.stages.append(stage)
        self.bytes_down += sum(content_nbytes(m.content) for m in messages)
        sent = {int(m.metadata.dst_node_id) for m in messages}
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        if self.on_stage_end is not None:
            self.on_stage_end()
        answered: set[int] = set()
        out = []
        for msg in replies:
            node = int(msg.metadata.src_node_id)
            answered.add(node)
            log_ = self.nodes.setdefault(node, _NodeLog())
            if msg.has_error():
                reason = str(msg.error.reason)
                log_.status = "died" if CLIENT_DIED_MARK in reason else "error"
                log_.error = f"SecAgg+ stage {stage}: {reason}"[:500]
                out.append(msg)
                continue
            nb = content_nbytes(msg.content)
            log_.bytes_up += nb
            self.bytes_up += nb
            log_.stage = stage
            if stage == Stage.COLLECT_MASKED_VECTORS:
                log_.reply = msg
                masked = msg.content.config_records.get(RECORD_KEY_CONFIGS, {}).get(Key.MASKED_PARAMETERS, [])
                self.masked_bytes += int(sum(len(b) for b in masked)) if isinstance(masked, list) else 0
                if not self.accept(msg, log_):
                    continue  # withheld: the workflow treats the client as a dropout (its masks are removed)
            out.append(msg)
        for node in sent - answered:
            log_ = self.nodes.setdefault(node, _NodeLog())
            if not log_.status:
                log_.status, log_.error = "timeout", f"SecAgg+ stage {stage}: no reply within the round timeout"
        return out


@dataclass
class SecAggOutcome:
    """One SecAgg+ round: clients.csv rows, the unmasked mean (None when the workflow halted or nothing was
    aggregated), its total weight, and the rounds.csv byte counts."""

    rows: list[ClientRow]
    mean: dict[str, np.ndarray] | None
    total: int
    aggregated: int
    replies: list[Any] = field(default_factory=list)
    bytes_down: int = 0
    bytes_up: int = 0
    masked_bytes: int = 0
    halted: str = ""


class SecAggRound:
    """SecAgg+ in place of one round's ``send_and_receive`` + validation + mean (module docstring).

    Args:
        config: the run configuration (``-o secagg=true``; checked by :func:`validate_secagg`).
        spec: the broadcast spec (update keys: parameters, then float buffers).
        max_weight: the most examples a client is asked to process (FedSGD: the batch size): Flower's
            ``max_weight``, so equal FedSGD batches are weighted exactly 1.
    """

    def __init__(self, config: Any, spec: BroadcastSpec, max_weight: int) -> None:
        self.config = config
        self.core = core_options(config)
        self.spec = spec
        self.shapes = spec.expected_update_shapes()
        self.keys = list(spec.param_shapes) + [k for k in spec.buffer_shapes if k not in spec.param_shapes]
        self.max_weight = int(max_weight)
        self.params = secagg_parameters(config, self.max_weight)
        self.int8 = config.uplink_bits == 8
        #: int8: max|mean| per key of the last aggregated round (the next round's shared scales); checkpointed
        self.prev_amax: dict[str, float] = {}
        self.scales: list[float] = []

    # ------------------------------------------------------------------ state (checkpoint)
    def state_dict(self) -> dict[str, Any]:
        return {"prev_amax": {k: float(v) for k, v in self.prev_amax.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prev_amax = {str(k): float(v) for k, v in dict(state.get("prev_amax", {})).items()}

    # ------------------------------------------------------------------ the round
    def shared_scales(self) -> list[float]:
        """This round's shared int8 scale per update key (module docstring)."""
        init = float(self.core.secagg_scale_init) / INT8_TMAX
        out = []
        for k in self.keys:
            amax = self.prev_amax.get(k, 0.0)
            s = self.core.secagg_headroom * amax / INT8_TMAX if amax > 0 and math.isfinite(amax) else init
            out.append(float(max(s, np.finfo(np.float32).tiny)))
        return out

    def prepare(self, messages: list[Message]) -> list[Message]:
        """The train messages with ``SECAGG_KEYS`` (and at 8 bits this round's ``SECAGG_SCALES``) in their config."""
        self.scales = self.shared_scales() if self.int8 else []
        out = []
        for msg in messages:
            cfg = ConfigRecord(dict(msg.content[CONFIG_KEY]))
            cfg[SECAGG_KEYS] = list(self.keys)
            if self.int8:
                cfg[SECAGG_SCALES] = list(self.scales)
            content = RecordDict({BROADCAST_KEY: msg.content[BROADCAST_KEY], QUANT_META_KEY: msg.content[QUANT_META_KEY],
                                  CONFIG_KEY: cfg})
            out.append(Message(content=content, dst_node_id=int(msg.metadata.dst_node_id),
                               message_type=msg.metadata.message_type))
        return out

    def check_masked(self, msg: Message) -> str:
        """'' when a stage-2 reply's masked vector has the expected structure, else the reason."""
        cfg = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        if cfg is None or Key.MASKED_PARAMETERS not in cfg:
            return "reply has no SecAgg+ masked vector"
        masked = cfg[Key.MASKED_PARAMETERS]
        if not isinstance(masked, list) or len(masked) != 1 + len(self.keys):
            n = len(masked) if isinstance(masked, list) else type(masked).__name__
            return f"masked vector has {n} arrays, expected {1 + len(self.keys)} (weight + one per update tensor)"
        mod = int(self.params["modulus_range"])
        for i, b in enumerate(masked):
            try:
                a = bytes_to_ndarray(b)
            except Exception as exc:  # noqa: BLE001 - untrusted bytes
                return f"masked array {i} is not a .npy array ({type(exc).__name__})"
            want = (1,) if i == 0 else tuple(self.shapes[self.keys[i - 1]])
            name = "weight" if i == 0 else self.keys[i - 1]
            if tuple(a.shape) != want:
                return f"{name}: masked shape {tuple(a.shape)} != expected {want}"
            if a.dtype.kind not in "iu":
                return f"{name}: masked values must be integers, got {a.dtype}"
            if a.size and (int(a.min()) < 0 or int(a.max()) >= mod):
                return f"{name}: masked values outside [0, 2^32)"
        return ""

    def run(self, rnd: int, grid: Any, messages: list[Message], timeout: float | None,
            expectation: Callable[[int], protocol.ReplyExpectation],
            partition_of: dict[int, int], on_stage_end: Callable[[], None] | None = None) -> SecAggOutcome:
        """Run the four SecAgg+ stages for ``messages`` (from :meth:`prepare`) on ``grid``.

        Args:
            expectation: ``node -> ReplyExpectation`` (assigned partition, max examples) for the metric checks.
            partition_of: node -> assigned partition (clients.csv ``client_id`` of nodes without a valid reply).
            on_stage_end: called after each stage's ``send_and_receive`` (the launcher's ``on_round_end`` hook).
        """
        contents = {int(m.metadata.dst_node_id): m.content for m in messages}
        capture = _CaptureStrategy(list(contents), grid)

        def accept(msg: Message, node_log: _NodeLog) -> bool:
            node = int(msg.metadata.src_node_id)
            row = ClientRow(round=rnd, client_id=int(partition_of.get(node, -1)), node_id=node)
            node_log.row = row
            metrics = msg.content.config_records.get(FITRES_METRICS)
            nrec = msg.content.metric_records.get(FITRES_NUM_EXAMPLES)
            reason = ""
            if metrics is None or nrec is None:
                reason = "reply has no plaintext FitRes metrics / num_examples"
            else:
                reason = protocol.check_reply_metrics(metrics, row, expectation(node))
                if not reason and int(nrec.get("num_examples", -1)) != row.num_examples:
                    reason = (f"FitRes.num_examples={nrec.get('num_examples')} != metric {NUM_EXAMPLES}="
                              f"{row.num_examples}")
            if not reason:
                reason = self.check_masked(msg)
            if reason:
                row.status, row.error = "rejected", reason[:500]
                node_log.status, node_log.error = "rejected", row.error
                log.warning("round %d: client %d rejected before the masked sum: %s", rnd, row.client_id, reason)
                return False
            return True

        stage_grid = _StageGrid(grid, accept, on_stage_end)
        context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                                strategy=capture)
        context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: int(rnd)})
        context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
        workflow = _Workflow(contents, **self.params, timeout=timeout)
        workflow(stage_grid, context)
        halted = ""
        mean = None
        total = 0
        aggregated_nodes: set[int] = set()
        if capture.results is None:
            halted = f"secure aggregation halted after stage {stage_grid.stages[-1] if stage_grid.stages else '-'}"
            log.error("round %d: %s (too few clients left for the reconstruction threshold)", rnd, halted)
        elif capture.results:
            vec = parameters_to_ndarrays(capture.results[0][1].parameters)
            if len(vec) != len(self.keys):
                raise RuntimeError(f"SecAgg+ returned {len(vec)} arrays for {len(self.keys)} update keys")
            mean = {}
            for i, (key, arr) in enumerate(zip(self.keys, vec)):
                arr = np.asarray(arr, dtype=np.float64).reshape(self.shapes[key])
                mean[key] = arr * self.scales[i] if self.int8 else arr
            aggregated_nodes = {int(proxy.node_id) for proxy, _ in capture.results}
            total = int(sum(int(fitres.num_examples) for _, fitres in capture.results))
        rows = []
        replies = []
        for node in contents:
            nlog = stage_grid.nodes.get(node, _NodeLog())
            row = nlog.row or ClientRow(round=rnd, client_id=int(partition_of.get(node, -1)), node_id=node)
            row.bytes_up = nlog.bytes_up
            if nlog.reply is not None:
                replies.append(nlog.reply)
            if node in aggregated_nodes:
                row.status = "ok"
            elif row.status == "ok":  # a valid masked reply that was not aggregated
                row.status = nlog.status or "error"
                row.error = nlog.error or halted or "not aggregated"
            if nlog.status in ("error", "died", "timeout") and node not in aggregated_nodes:
                row.status, row.error = nlog.status, nlog.error
            rows.append(row)
        rows.sort(key=lambda r: (r.client_id, r.node_id))
        return SecAggOutcome(rows=rows, mean=mean, total=total, aggregated=len(aggregated_nodes), replies=replies,
                             bytes_down=stage_grid.bytes_down, bytes_up=stage_grid.bytes_up,
                             masked_bytes=stage_grid.masked_bytes, halted=halted)

    def update_scales(self, mean: dict[str, np.ndarray]) -> None:
        """Remember max|mean| per key (the next round's int8 shared scales)."""
        self.prev_amax = {k: float(np.max(np.abs(v))) if v.size else 0.0 for k, v in mean.items()}
