"""Gradient relay (spec §2.2 step 6, §2.3; dissertation eq. 3.4).

After the FedSGD aggregation the server adds, for every quantized tensor, the part of the quantization-aware
gradient that only the float weights can give: ``corr = (g_s / t_b) (M ⊙ sign(w))`` with
``g_s = sum_i ḡ_i (Q(w)_i - w_i) / s``. Because ``corr`` is linear in the gradient, correcting the mean equals
averaging the corrected client gradients, so relayed FedSGD equals centralized QAT with a differentiable scale.
Client uploads are untouched; float (unquantized) tensors get no correction.

``Q(w) = s q`` is taken from what went on the wire this round (the int8/int4 codes and float32 scales that
``configure_train`` broadcast and keeps decoded in ``sent_quantized``), never re-quantized on the server: a float64
re-quantization of the float32 weights gives slightly different scales and, in a large tensor, a few different
codes, and the correction of those tensors/channels would no longer match what the clients trained on.
"""

from __future__ import annotations

import torch

from fedaqt.quant.quantize import relay_correction


class GradientRelayMixin:
    """Adds the relay correction in :meth:`correct_mean_update`; compose with any mean-gradient aggregator.

    Reports ``relay_norm_ratio`` = ||corr|| / ||ḡ|| over the quantized tensors as a round metric
    (:meth:`QuantizedMixin.record_metric`: a rounds.csv column).
    The correction is computed in float64 from the server's float32 weight ``w`` (``current_float``), the mean
    gradient, and the broadcast codes + float32 scales of this round (``sent_quantized``).

    Raises:
        ValueError: the broadcast spec's updates are deltas (FedAvg): the relay is defined for FedSGD only.
        RuntimeError: a quantized key has no broadcast codes + scale of this round, or they were sent at another
            bit-width/granularity than the spec's (the message names the key).
    """

    def correct_mean_update(self, server_round: int, mean: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        mean = super().correct_mean_update(server_round, mean)  # type: ignore[misc]
        spec = self.spec  # type: ignore[attr-defined]
        if spec.update_kind != "gradient":
            raise ValueError("the gradient relay is defined for FedSGD (gradient uploads) only, not FedAvg deltas")
        corr_sq = grad_sq = 0.0
        out = dict(mean)
        if spec.bits < 32:
            sent = getattr(self, "sent_quantized", None) or {}
            for key in sorted(spec.quantized_keys):
                qt = sent.get(key)
                if qt is None:
                    raise RuntimeError(f"relay: no broadcast codes + scale for {key!r} in round {server_round} "
                                       "(configure_train keeps them in sent_quantized)")
                if qt.bits != spec.bits or qt.granularity != spec.granularity:
                    raise RuntimeError(f"relay: {key!r} was broadcast as {qt.bits}-bit {qt.granularity} codes, the "
                                       f"spec says {spec.bits}-bit {spec.granularity}")
                w = torch.from_numpy(self.current_float[key])  # type: ignore[attr-defined]  # float32, as quantized
                g = mean[key].to(torch.float64)
                corr = relay_correction(g, w, spec.bits, spec.granularity, scale=qt.scale, codes=qt.codes)
                out[key] = g + corr
                corr_sq += float(corr.pow(2).sum())
                grad_sq += float(g.pow(2).sum())
        self.record_metric("relay_norm_ratio", (corr_sq**0.5) / (grad_sq**0.5) if grad_sq > 0 else 0.0)  # type: ignore[attr-defined]
        return out
