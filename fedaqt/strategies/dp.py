"""Central differential privacy with fixed clipping around a quantized strategy (issue 15, must-show 4).

:class:`QuantizedDPFixedClipping` is Flower's ``DifferentialPrivacyServerSideFixedClipping``
(``flwr.serverapp.strategy``, Andrew et al. / McMahan et al. 2018, "DP-FedAvg") wrapped around a fedaqt strategy
(:class:`fedaqt.strategies.quantized.QuantizedMixin` in front of a Flower strategy). Enabled by the core options
``dp_clip`` (> 0) and ``dp_noise`` (see ``fedaqt plugins show core``). Per round:

1. ``configure_train`` is the wrapped strategy's: Flower's node sampling and the quantized broadcast are unchanged;
2. the round loop still validates every reply (:func:`fedaqt.protocol.validate_reply`) and hands only the accepted,
   normalized replies (float32 parameter *updates*: FedSGD gradients or FedAvg deltas) to ``aggregate_train``;
   with streaming aggregation (the default, :mod:`fedaqt.server.stream`) it clips each accepted update as it
   arrives (:meth:`QuantizedDPFixedClipping.clip_update`), sums it and hands the clipped mean to
   :meth:`~QuantizedDPFixedClipping.aggregate_streamed`: the same steps 3-5 without holding the replies;
3. Flower's ``validate_replies`` (errors / count), then each client's update is clipped to L2 norm ``C = dp_clip``
   over all its parameter tensors (Flower's ``clip_inputs_inplace``: ``u * min(1, C / ||u||)``). Flower's own
   wrapper clips ``reply - current_model``; fedaqt's replies already are the update, so it clips the reply itself;
4. the wrapped strategy takes the ``num-examples``-weighted mean of the clipped updates and Gaussian noise
   ``N(0, (dp_noise * C * max_k w_k)^2)`` (``w_k = n_k / sum n``; ``= dp_noise * C / m`` for ``m`` equal weights,
   Flower's ``compute_stdv``) is added to that mean, *before* the server optimizer (momentum, Adam) and the relay
   correction: everything after the noisy mean is post-processing. Flower's wrapper adds the noise to the
   aggregated model after the optimizer step instead, which is the same only for FedAvg with server lr 1. The
   noise is drawn from ``numpy.random.default_rng([seed, 0xD9, round])`` (reproducible, resume-safe);
5. the privacy spent after round ``r`` is reported as rounds.csv ``dp_epsilon``: opacus's RDP accountant
   (``opacus.accountants.RDPAccountant``, Mironov 2017; subsampled Gaussian of Mironov et al. 2019) for ``r``
   steps of noise multiplier ``dp_noise`` at sampling rate ``q = clients_per_round / num_clients``, at ``delta =
   dp_delta``. ``inf`` at ``dp_noise = 0``. Caveats: opacus assumes Poisson sampling, fedaqt samples a fixed number
   of clients without replacement (the usual approximation); every round counts as a release, also one that
   aggregated nothing (conservative). rounds.csv ``dp_clipped``: the fraction of this round's clients whose update
   was scaled down.

Not covered by the guarantee: the float buffers (BatchNorm running statistics), which the round loop averages
outside the strategy (:meth:`fedaqt.server.app.Server.mean_buffers`) without clipping or noise; the ASR conformer
has BatchNorm in its convolution modules, so its ε covers the parameters only. Flower's own accounting
(``accountant=``) is not used: it requires ``FedAvg.aggregate_train`` unchanged and equal client weights.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping
from flwr.serverapp.strategy.dp_fixed_clipping import validate_replies
from flwr.supercore.differential_privacy import clip_inputs_inplace, get_norm

from fedaqt.protocol import METRICS_KEY, NUM_EXAMPLES, UPDATE_KEY


def rdp_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """ε at ``delta`` after ``steps`` subsampled-Gaussian releases (opacus ``RDPAccountant``); inf when
    ``noise_multiplier`` is 0, 0 when ``steps`` is 0."""
    if steps <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(float(noise_multiplier), float(sample_rate), int(steps))]
    return float(acc.get_epsilon(delta=float(delta)))


class QuantizedDPFixedClipping(DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed-clipping DP around a fedaqt quantized strategy (module docstring).

    Args:
        strategy: a :class:`~fedaqt.strategies.quantized.QuantizedMixin` strategy (its ``mean_noise`` hook adds
            the noise to the weighted mean update).
        noise_multiplier: σ >= 0 (noise std = σ · C · max_k w_k on the mean update).
        clipping_norm: C > 0, L2 norm bound of one client's update (all parameter tensors flattened together).
        num_sampled_clients: clients sampled per round (Flower's reply-count check).
        sample_rate: ``clients_per_round / num_clients`` for the accountant.
        delta: δ of the reported (ε, δ).
        seed: the run's seed (the noise of round ``r`` is drawn from ``default_rng([seed, 0xD9, r])``).

    Raises:
        ValueError: σ < 0, C <= 0, or a wrapped strategy without the ``mean_noise`` hook (Flower's checks + ours).
    """

    def __init__(self, strategy: Any, noise_multiplier: float, clipping_norm: float, num_sampled_clients: int, *,
                 sample_rate: float, delta: float, seed: int) -> None:
        if not hasattr(strategy, "mean_noise"):
            raise ValueError(f"DP needs a fedaqt quantized strategy (QuantizedMixin), got {type(strategy).__name__}")
        super().__init__(strategy, noise_multiplier=noise_multiplier, clipping_norm=clipping_norm,
                         num_sampled_clients=num_sampled_clients)
        self.sample_rate = float(sample_rate)
        self.delta = float(delta)
        self.seed = int(seed)

    # the server's contract: configure_train, aggregate_train, state_dict, load_state_dict (+ the streaming hooks below)
    def state_dict(self) -> dict[str, Any]:
        """The wrapped strategy's state (the DP wrapper keeps none: ε is a function of the round, the noise of
        ``(seed, round)``)."""
        return self.strategy.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.strategy.load_state_dict(state)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Any) -> Iterable[Message]:
        """The wrapped strategy's messages (its sampling and quantized broadcast)."""
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def clip_update(self, update: Any, keys: Iterable[str]) -> tuple[dict[str, np.ndarray], bool]:
        """One client's update clipped to L2 norm ``C`` over all ``keys`` together (Flower's ``get_norm`` /
        ``clip_inputs_inplace``: ``u * C / ||u||`` when ``||u|| > C``): ``({key: float32 array}, clipped)``."""
        keys = list(keys)
        arrs = [np.array(v.numpy() if hasattr(v, "numpy") else v, dtype=np.float32, copy=True)
                for v in (update[k] for k in keys)]
        clipped = bool(get_norm(arrs) > self.clipping_norm)
        if clipped:
            clip_inputs_inplace(arrs, self.clipping_norm)  # Flower's FlatClip: u * C / ||u||
        return dict(zip(keys, arrs)), clipped

    #: the server may stream (fedaqt.server.stream): it clips every accepted reply with :meth:`clip_update` as it
    #: arrives, folds it into the running sum and calls :meth:`aggregate_streamed` with the mean
    accepts_mean_reply = True

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Clip each normalized reply's update, aggregate with noise on the mean (module docstring)."""
        replies = list(replies)
        if not replies or not validate_replies(replies, self.num_sampled_clients):  # Flower's checks (count, errors)
            return None, None
        clipped = 0
        weights = []
        for msg in replies:
            record = msg.content.array_records[UPDATE_KEY]
            update, was_clipped = self.clip_update({k: record[k] for k in record.keys()}, record.keys())
            clipped += int(was_clipped)
            msg.content[UPDATE_KEY] = ArrayRecord({k: Array(v) for k, v in update.items()})
            weights.append(float(msg.content.metric_records[METRICS_KEY][NUM_EXAMPLES]))
        return self._noisy_step(server_round, replies, max(weights), sum(weights), clipped, len(replies))

    def aggregate_streamed(self, server_round: int, mean_reply: Message, max_weight: float, total: float,
                           clipped: int, count: int) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The streamed round's step: ``mean_reply`` (normalized, weight ``total``) is the weighted mean of the
        ``count`` accepted updates, each clipped by :meth:`clip_update` (``clipped`` of them scaled down);
        ``max_weight`` = the largest ``n_k``. Same noise, step and metrics as :meth:`aggregate_train`."""
        if count < 1:
            return None, None
        return self._noisy_step(server_round, [mean_reply], max_weight, total, clipped, count)

    def _noisy_step(self, server_round: int, replies: list[Message], max_weight: float, total: float, clipped: int,
                    count: int) -> tuple[ArrayRecord | None, MetricRecord | None]:
        std = 0.0
        if self.noise_multiplier > 0:
            std = float(self.noise_multiplier * self.clipping_norm * max_weight / total)
        self.strategy.mean_noise = (std, np.random.default_rng([self.seed, 0xD9, int(server_round)]))
        try:
            arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        finally:
            self.strategy.mean_noise = None
        eps = rdp_epsilon(self.noise_multiplier, self.sample_rate, int(server_round), self.delta)
        out = dict(metrics.items()) if metrics is not None else {}
        out.update({"dp_epsilon": eps, "dp_clipped": clipped / count, "dp_noise_std": std})
        return arrays, MetricRecord(out)


def wrap_with_dp(strategy: Any, config: Any) -> Any:
    """``strategy`` wrapped in :class:`QuantizedDPFixedClipping` when ``options.dp_clip > 0``, else unchanged.

    Raises:
        ValueError: ``dp_noise > 0`` without ``dp_clip`` (noise without a sensitivity bound is no guarantee).
    """
    from fedaqt.options import core_options

    core = core_options(config)
    if core.dp_clip <= 0:
        if core.dp_noise > 0:
            raise ValueError(f"options.dp_noise={core.dp_noise} needs options.dp_clip > 0 (the clipping norm C)")
        return strategy
    return QuantizedDPFixedClipping(strategy, noise_multiplier=core.dp_noise, clipping_norm=core.dp_clip,
                                    num_sampled_clients=config.clients_per_round,
                                    sample_rate=config.clients_per_round / config.num_clients,
                                    delta=core.dp_delta, seed=config.seed)
