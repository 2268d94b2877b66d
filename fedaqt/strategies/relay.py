"""Gradient relay (spec §2.2 step 6, §2.3; dissertation eq. 3.4).

After the FedSGD aggregation the server adds, for every quantized tensor, the part of the quantization-aware
gradient that only the float weights can give: ``corr = (g_s / t_b) (M ⊙ sign(w))`` with
``g_s = sum_i ḡ_i (Q(w)_i - w_i) / s``. Because ``corr`` is linear in the gradient, correcting the mean equals
averaging the corrected client gradients, so relayed FedSGD equals centralized QAT with a differentiable scale.
Client uploads are untouched; float (unquantized) tensors get no correction.
"""

from __future__ import annotations

import torch

from fedaqt.quant.quantize import relay_correction


class GradientRelayMixin:
    """Adds the relay correction in :meth:`correct_mean_update`; compose with any mean-gradient aggregator.

    Records ``relay_norm_ratio`` = ||corr|| / ||ḡ|| over the quantized tensors in ``last_round_stats``.

    Raises:
        ValueError: the broadcast spec's updates are deltas (FedAvg): the relay is defined for FedSGD only.
    """

    def correct_mean_update(self, server_round: int, mean: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        mean = super().correct_mean_update(server_round, mean)  # type: ignore[misc]
        spec = self.spec  # type: ignore[attr-defined]
        if spec.update_kind != "gradient":
            raise ValueError("the gradient relay is defined for FedSGD (gradient uploads) only, not FedAvg deltas")
        corr_sq = grad_sq = 0.0
        out = dict(mean)
        if spec.bits < 32:
            for key in sorted(spec.quantized_keys):
                w = torch.from_numpy(self.current_float[key]).to(torch.float64)  # type: ignore[attr-defined]
                g = mean[key].to(torch.float64)
                corr = relay_correction(g, w, spec.bits, spec.granularity)
                out[key] = g + corr
                corr_sq += float(corr.pow(2).sum())
                grad_sq += float(g.pow(2).sum())
        self.last_round_stats["relay_norm_ratio"] = (corr_sq**0.5) / (grad_sq**0.5) if grad_sq > 0 else 0.0  # type: ignore[attr-defined]
        return out
