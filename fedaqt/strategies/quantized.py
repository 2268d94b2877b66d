"""Quantized-broadcast strategies on Flower's Message API (spec §2.2).

:class:`QuantizedMixin` is placed in front of a Flower strategy class (``flwr.serverapp.strategy``). It owns what
is specific to quantized federated training and reuses Flower's classes for the server-side math:

* ``configure_train``: Flower samples the nodes (with the global ``random`` module, which we seed per round) and
  we replace the float payload by the quantized broadcast (``quant.encode_broadcast``: int8 / packed int4 codes +
  float32 scales) of the float state the server hands in (parameters + float buffers). The round loop
  (:mod:`fedaqt.server.app`) then assigns each message its data partition.
* ``aggregate_train`` receives only the replies the round loop accepted (:func:`fedaqt.protocol.validate_reply`),
  normalized (:func:`fedaqt.protocol.normalized_reply`: ``arrays`` = the decoded float32 update of the
  parameters, ``metrics`` = ``{"num-examples": n}``), in partition order. The updates (FedSGD gradients or FedAvg
  deltas) are averaged weighted by ``num-examples``; :meth:`correct_mean_update` may post-process the mean (the
  gradient relay does); then Flower's own ``aggregate_train`` of the wrapped class applies the server optimizer to
  one reply holding ``W + sign * mean`` (sign -1 for gradients, +1 for deltas). Because every Flower strategy
  listed here starts by taking the weighted mean of the replies, this equals running Flower's strategy on the
  clients' float models directly (tested at ``--bits 32``). The returned MetricRecord holds ``num-examples`` and
  the strategy's own statistics of the round (:meth:`record_metric`, e.g. the relay's ``relay_norm_ratio``).
* Cross-round state (Flower's ``current_arrays``/``momentum_vector``/``m_t``/``v_t`` and a subclass's own) goes
  through :meth:`state_dict` / :meth:`load_state_dict`, which the server checkpoints.

Float buffers (BatchNorm running statistics) are not the strategy's: the server moves them by the mean client
delta, outside the optimizer, and keeps them in its checkpoint.
"""

from __future__ import annotations

import logging
import math
import random
from typing import Any, Iterable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import MessageType

from fedaqt.protocol import (  # noqa: F401 - BroadcastSpec/ClientRow re-exported for plugins that import them from here
    METRICS_KEY,
    NUM_EXAMPLES,
    UPDATE_KEY,
    BroadcastSpec,
    ClientRow,
    encode_train,
)
from fedaqt.quant.npy import from_array, to_array
from fedaqt.quant.wire import QTensor, decode_broadcast, encode_broadcast

log = logging.getLogger("fedaqt.strategy")


def cosine_factor(server_round: int, total_rounds: int) -> float:
    """Cosine decay of the server learning rate: ``0.5 (1 + cos(pi (r - 1) / R))`` for round ``r`` (1-based) of
    ``R`` rounds: 1 in round 1, 0.5 halfway, ``> 0`` in the last round (Loshchilov & Hutter 2017, no restarts).
    Rounds past ``R`` (a longer resumed run) stay at the last round's factor."""
    r = min(max(server_round, 1), total_rounds)
    return 0.5 * (1.0 + math.cos(math.pi * (r - 1) / total_rounds))


class QuantizedMixin:
    """Turns a Flower Message-API strategy into a quantized-broadcast one (see module docstring).

    Args:
        spec: what is broadcast and what the updates are (:class:`fedaqt.protocol.BroadcastSpec`).
        seed: the run's seed; Flower's node sampling of round ``r`` uses ``random.seed(seed * 1_000_003 + r)``.
        lr_schedule: ``"constant"`` or ``"cosine"``: round ``r`` of ``total_rounds`` steps with the Flower
            strategy's server learning rate (FedAvgM ``server_learning_rate``, FedOpt ``eta``) times
            ``0.5 (1 + cos(pi (r - 1) / total_rounds))`` (:func:`cosine_factor`; core option ``server_lr_schedule``).
        total_rounds: the run's number of rounds (needed by ``"cosine"``).
        *args, **kwargs: passed on to the Flower strategy (``super().__init__``).

    Raises:
        ValueError: an unknown ``lr_schedule``, ``"cosine"`` with ``total_rounds < 1`` or on a Flower strategy
            without a server learning rate (FedAvg, FedProx).

    A subclass with its own cross-round state extends :meth:`state_dict` / :meth:`load_state_dict` through
    ``super()``.
    """

    #: Flower strategy attributes that carry server-optimizer state between rounds (``flwr.serverapp.strategy``):
    #: FedAvgM ``current_arrays`` (ArrayRecord) + ``momentum_vector`` (list of arrays); FedOpt (FedAdam, FedYogi,
    #: FedAdagrad) ``current_arrays``/``m_t``/``v_t`` (dicts of arrays)
    STATE_ATTRS = ("current_arrays", "momentum_vector", "m_t", "v_t")

    #: Flower attributes holding the server learning rate (FedAvgM / FedOpt), scaled by the schedule
    LR_ATTRS = ("server_learning_rate", "eta")

    def __init__(self, *args: Any, spec: BroadcastSpec, seed: int, lr_schedule: str = "constant",
                 total_rounds: int = 0, **kwargs: Any) -> None:
        if lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule={lr_schedule!r}: choose 'constant' or 'cosine'")
        if lr_schedule == "cosine" and total_rounds < 1:
            raise ValueError(f"lr_schedule='cosine' needs total_rounds >= 1, got {total_rounds!r}")
        self.lr_schedule, self.total_rounds = lr_schedule, int(total_rounds)
        if not isinstance(spec, BroadcastSpec):
            raise TypeError(f"spec must be a fedaqt.protocol.BroadcastSpec, got {type(spec).__name__}")
        self.spec = spec
        self.seed = int(seed)
        self.current_float: dict[str, np.ndarray] | None = None
        # this round's broadcast QTensors (codes + float32 scales exactly as sent), for the relay
        self.sent_quantized: dict[str, QTensor] = {}
        self._round_metrics: dict[str, float] = {}
        #: (std, numpy Generator) set by the DP wrapper (:mod:`fedaqt.strategies.dp`) for one aggregate_train:
        #: Gaussian noise of that std is added to the weighted mean update; None = no noise
        self.mean_noise: tuple[float, Any] | None = None
        super().__init__(*args, **kwargs)
        # the configured server learning rate(s), which the schedule scales per round
        self._base_lr = {a: float(getattr(self, a)) for a in self.LR_ATTRS if hasattr(self, a)}
        if lr_schedule != "constant" and not self._base_lr:
            raise ValueError(f"server_lr_schedule={lr_schedule!r}: {type(self).__name__} has no server learning rate "
                             f"to schedule (use fedsgd, fedavgm, relay, fedadam or fedyogi)")

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The strategy's cross-round state: those of :attr:`STATE_ATTRS` the strategy has (values as Flower keeps
        them: ArrayRecord, lists/dicts of numpy arrays). Subclasses add their own through ``super()``."""
        return {name: getattr(self, name) for name in self.STATE_ATTRS if hasattr(self, name)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict`.

        Raises:
            ValueError: a key that is neither in :attr:`STATE_ATTRS` nor handled by a subclass.
        """
        unknown = sorted(set(state) - set(self.STATE_ATTRS))
        if unknown:
            raise ValueError(f"unknown strategy state {unknown} for {type(self).__name__} (known: {self.STATE_ATTRS})")
        for name, value in state.items():
            setattr(self, name, value)

    def record_metric(self, name: str, value: float) -> None:
        """Report a statistic of this round's aggregation (a rounds.csv column, e.g. ``relay_norm_ratio``)."""
        self._round_metrics[name] = float(value)

    # ------------------------------------------------------------------ broadcast
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Any) -> Iterable[Message]:
        """Flower's sampling + the quantized broadcast of ``arrays`` (the float parameters and, under the keys of
        ``spec.buffer_shapes``, the float buffers). Only the parameters reach the Flower strategy."""
        # Flower's node sampling uses the global `random` module: seed it per round (reproducible, resumable).
        random.seed(self.seed * 1_000_003 + server_round)
        if self.lr_schedule == "cosine":  # stateless in the round number, so a resumed run continues it exactly
            for attr, base in self._base_lr.items():
                setattr(self, attr, base * cosine_factor(server_round, self.total_rounds))
        buffer_keys = set(self.spec.buffer_shapes)
        params = ArrayRecord({k: a for k, a in arrays.items() if k not in buffer_keys})
        messages = list(super().configure_train(server_round, params, config, grid))  # type: ignore[misc]
        if not messages:
            return []
        full = {k: from_array(a, writable=True) for k, a in arrays.items()}
        self.current_float = {k: v for k, v in full.items() if k not in buffer_keys}
        state = {k: torch.from_numpy(v) for k, v in full.items()}  # shares full's memory: encode_broadcast copies
        q_arrays, q_meta = encode_broadcast(state, self.spec.quantized_keys, self.spec.bits, self.spec.granularity)
        # the codes + float32 scales exactly as sent (the relay's Q(w))
        self.sent_quantized = {}
        if self.spec.bits < 32 and self.spec.quantized_keys:
            self.sent_quantized = {k: v for k, v in decode_broadcast(q_arrays, q_meta).items() if isinstance(v, QTensor)}
        base_config = messages[0].content[self.configrecord_key]  # type: ignore[attr-defined]
        return [Message(content=encode_train(q_arrays, q_meta, base_config), dst_node_id=msg.metadata.dst_node_id,
                        message_type=MessageType.TRAIN) for msg in messages]

    # ------------------------------------------------------------------ aggregation
    @property
    def accepts_mean_reply(self) -> bool:
        """True when :meth:`aggregate_train` only needs the weighted mean of the replies, so the server may stream:
        fold every reply into a running sum as it arrives and hand in one normalized reply of weight ``sum n_k``
        (:mod:`fedaqt.server.stream`). False for a subclass that overrides ``aggregate_train`` (a robust aggregator
        such as a median needs every reply); such a subclass may set it back to True if it only needs the mean."""
        return type(self).aggregate_train is QuantizedMixin.aggregate_train

    def correct_mean_update(self, server_round: int, mean: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Hook applied to the weighted-mean update before the server optimizer step (identity here)."""
        return mean

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Server step from accepted, normalized replies (module docstring); ``(None, None)`` when there are none.

        Raises:
            ValueError: a reply without the ``arrays``/``metrics`` records or an update key of the spec.
        """
        accepted = []
        for msg in replies:
            arrays = msg.content.array_records.get(UPDATE_KEY)
            metrics = msg.content.metric_records.get(METRICS_KEY)
            if arrays is None or metrics is None:
                raise ValueError("aggregate_train expects normalized replies (fedaqt.protocol.normalized_reply)")
            accepted.append(({k: torch.from_numpy(from_array(a, writable=True)) for k, a in arrays.items()},
                             int(metrics[NUM_EXAMPLES])))
        if not accepted or self.current_float is None:
            self._round_metrics = {}
            return None, None
        total = sum(n for _, n in accepted)
        mean: dict[str, torch.Tensor] = {}
        for key, shape in self.spec.param_shapes.items():
            acc = torch.zeros(shape, dtype=torch.float64)
            for update, n in accepted:
                if key not in update:
                    raise ValueError(f"aggregate_train: a reply has no update for {key!r}")
                acc += update[key].to(torch.float64) * (n / total)
            mean[key] = acc
        return self.aggregate_mean(server_round, mean, total)

    def aggregate_mean(self, server_round: int, mean: dict[str, torch.Tensor],
                       total: int) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The server step of :meth:`aggregate_train` from the weighted mean itself: ``mean`` = ``{key: float64
        tensor of the parameter's shape}`` = ``sum_k n_k u_k / total``, ``total`` = ``sum_k n_k`` (examples).
        The streaming round (:mod:`fedaqt.server.app`) calls it with its running sums' mean, which skips
        encoding that mean into a reply only to decode it again; ``aggregate_train`` of one reply holding ``mean``
        gives the same result bit for bit. ``(None, None)`` before the first broadcast."""
        self._round_metrics = {}
        if self.lr_schedule != "constant":
            self.record_metric("server_lr", next(getattr(self, a) for a in self._base_lr))
        if self.current_float is None:
            return None, None
        if self.mean_noise is not None and self.mean_noise[0] > 0:  # central DP: noise on the mean, before the step
            std, rng = self.mean_noise
            for key, shape in self.spec.param_shapes.items():
                mean[key] = mean[key] + torch.from_numpy(rng.normal(0.0, std, size=shape))
        mean = self.correct_mean_update(server_round, mean)
        sign = -1.0 if self.spec.update_kind == "gradient" else 1.0
        pseudo = {}
        for key, current in self.current_float.items():
            pseudo[key] = to_array(np.asarray(current + sign * mean[key].numpy().astype(current.dtype), dtype=current.dtype))
        synthetic = Message(
            content=RecordDict(
                {self.arrayrecord_key: ArrayRecord(pseudo),  # type: ignore[attr-defined]
                 METRICS_KEY: MetricRecord({self.weighted_by_key: total})}  # type: ignore[attr-defined]
            ),
            dst_node_id=0,
            message_type=MessageType.TRAIN,
        )
        arrays, _ = super().aggregate_train(server_round, [synthetic])  # type: ignore[misc]
        return arrays, MetricRecord({NUM_EXAMPLES: int(total), **self._round_metrics})
