"""FedSGD (spec §2.2 step 3): one batch, upload the gradient."""

from __future__ import annotations

from typing import Any

from fedaqt.algorithms.base import ClientAlgorithm, LocalContext, LocalResult, grad_hook
from fedaqt.config import ConfigError, RunConfig


class FedSGD(ClientAlgorithm):
    """FedSGD: one batch of ``--batch-size``; uploads dL/dw_q of quantized layers and dL/dp of float parameters.

    Each gradient is encoded into the upload (``--uplink-bits``) as soon as backward produces it, through the
    layers' weight-grad hooks and post-accumulate-grad hooks of the float parameters, so the client never holds
    a float gradient of the whole model and keeps no optimizer state. Weight of the reply: the batch's examples.
    No options.
    """

    name = "fedsgd"
    description = "one batch per round; uploads the gradient dL/dw_q (relayed FedSGD = centralized QAT)"
    upload = "gradient"

    @classmethod
    def validate(cls, config: RunConfig) -> None:
        """Raises ConfigError: ``local_steps != 1`` (FedSGD uses one batch)."""
        super().validate(config)
        if config.local_steps != 1:
            raise ConfigError(
                f"local_steps={config.local_steps} is only meaningful with algorithm=fedavg; FedSGD uses one batch"
            )

    @classmethod
    def num_batches(cls, config: RunConfig) -> int:
        return 1

    def local_round(self, ctx: LocalContext, batches: list[Any]) -> LocalResult:
        upload, probe = ctx.upload, ctx.probe
        for p in ctx.params.values():
            p.grad = None
        for layer in ctx.qlayers.values():
            layer.zero_weight_grad()
            # row blocks (large Linear layers): never the whole float gradient; encoded exactly as a whole one
            layer.set_weight_grad_hook(lambda layer, g, r0: upload.add_rows(layer.weight_key, g, r0, layer.weight_shape),
                                       row_multiple=upload.row_multiple(tuple(layer.weight_shape)))
        with probe.saved_activations():
            loss, n = ctx.workload.loss(ctx.model, batches[0])
        # Parameter hooks are installed after the forward pass so that they run after MemTracker's own grad hooks
        # (installed during the forward), which read p.grad.
        for key, p in ctx.params.items():
            ctx.handles.append(p.register_post_accumulate_grad_hook(grad_hook(upload.add, key)))
        loss.backward()
        ctx.losses.append(float(loss.detach()))
        del loss
        for key, layer in ctx.qlayers.items():
            if key not in upload:
                upload.add_zeros(key, tuple(layer.weight_shape))
        for key, p in ctx.model.named_parameters():
            if key not in upload:
                upload.add_zeros(key, tuple(p.shape))
        return LocalResult(num_examples=int(n))
