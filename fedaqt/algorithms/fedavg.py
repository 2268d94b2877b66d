"""FedAvg (spec §2.2 step 4): local SGD on the native quantized model, upload the delta (or final codes)."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

import torch
from pydantic import Field

from fedaqt.options import BaseOptions

from fedaqt.algorithms.base import ClientAlgorithm, LocalContext, LocalResult, grad_hook
from fedaqt.config import ConfigError, RunConfig
from fedaqt.quant.quantize import dequantize


class FedAvgOptions(BaseOptions):
    """``-o KEY=VALUE`` options of ``--algorithm fedavg``."""

    local_epochs: int = Field(0, ge=0, le=100, description="passes over the client's own partition per round (0 = --local-steps batches; at most 100: every epoch's batches are built before training)")
    momentum: float = Field(0.0, ge=0.0, lt=1.0, description="client SGD momentum (torch.optim.SGD: dampening 0, no Nesterov)")
    weight_decay: float = Field(0.0, ge=0.0, allow_inf_nan=False, description="client SGD L2 weight decay (torch.optim.SGD, all parameters)")
    stochastic_rounding: Union[Literal["auto"], bool] = Field(
        "auto", description="unbiased stochastic rounding when re-quantizing after a local step (auto = on for --bits <= 4)")


class FedAvg(ClientAlgorithm):
    """FedAvg: local SGD (lr ``--lr``) on the native quantized model; uploads ``final - received``.

    Local work: ``--local-steps`` batches of ``--batch-size`` drawn by :meth:`Workload.client_batches`, or with
    ``-o local_epochs=E`` (E > 0) exactly E passes over the client's own partition
    (:meth:`Workload.client_epoch_batches`: every example once per epoch, a fresh permutation per (seed, client,
    round, epoch), the last batch of an epoch may be smaller); ``local_steps`` must then stay 1.

    Each step follows ``torch.optim.SGD`` (dampening 0, Nesterov off) on float parameters and on the dequantized
    weight ``ŵ = s q`` of each quantized layer, applied per tensor as soon as its gradient exists (no float
    gradient of the model is held): ``g += weight_decay * w`` (all parameters, biases and norms too, as SGD
    does); FedProx ``g += mu (w - w_0)`` when the strategy sends ``proximal_mu``; with ``momentum`` m > 0
    ``buf = g`` on the first step else ``buf = m buf + g``, ``g = buf``; ``w -= lr g``. A quantized layer is then
    re-quantized with a fresh max-abs scale (spec §2.2 step 4.4), by default to the nearest code; with
    ``stochastic_rounding`` (default ``auto``: on for ``--bits <= 4``) by unbiased stochastic rounding
    ``q = floor(w/s + u)``, ``u ~ U[0, 1)`` from the round's generator (seeded per (seed, client, round)), so
    ``E[s q] = w`` and steps smaller than half a code are not rounded away (spec §2.4 "FedAvg stagnation").

    Memory: momentum keeps one float32 buffer per trained tensor for the round (for a quantized layer 4 bytes per
    weight next to its 1-byte codes, i.e. the float model's size again); the probe counts it as ``opt``.

    Upload: the delta on dequantized values, or, when the server accepts final codes, the final codes + scales
    of the quantized layers (float parameters send their delta). Aggregation weight (``num-examples``): the
    examples processed in the round, i.e. ``local_steps * batch_size`` or ``local_epochs * partition_size``.
    """

    name = "fedavg"
    description = "local SGD (steps or epochs, momentum, weight decay, stochastic re-quantization); uploads the delta"
    upload = "delta"
    Options = FedAvgOptions
    _mu: float = 0.0  # the round's FedProx coefficient (set by local_round)

    # ---------------------------------------------------------------- configuration
    @classmethod
    def validate(cls, config: RunConfig) -> None:
        """Raises ConfigError: a bad option, or ``local_epochs > 0`` together with ``local_steps != 1``."""
        opts = cls.parse_options(config)
        if opts.local_epochs > 0 and config.local_steps != 1:
            raise ConfigError(
                f"options.local_epochs={opts.local_epochs} and local_steps={config.local_steps} both set the local "
                "work of a round; use one (local_epochs > 0 needs local_steps=1)"
            )

    @classmethod
    def max_examples(cls, config: RunConfig, workload: Any, client_id: int) -> int:
        """``local_epochs * workload.partition_size(client_id)`` with epochs, else ``local_steps * batch_size``."""
        epochs = cls.parse_options(config).local_epochs
        if epochs > 0:
            return int(epochs * workload.partition_size(client_id))
        return int(config.local_steps * config.batch_size)

    def stochastic_rounding_on(self) -> bool:
        """Whether re-quantization rounds stochastically (``auto``: ``--bits <= 4``)."""
        sr = self.options.stochastic_rounding
        return self.config.bits <= 4 if sr == "auto" else bool(sr)

    # ---------------------------------------------------------------- hooks for subclasses
    def proximal_mu(self, ctx: LocalContext) -> float:
        """The FedProx coefficient of the round (default: what the strategy sent, ``ctx.proximal_mu``)."""
        return float(ctx.proximal_mu)

    def step_gradient(self, ctx: LocalContext, key: str, w: torch.Tensor, g: torch.Tensor,
                      w0: Optional[torch.Tensor]) -> torch.Tensor:
        """The gradient the step uses for tensor ``key`` (before momentum), all float tensors shaped like the
        weight: ``g + weight_decay * w + mu * (w - w0)``. ``w0`` is the received value (None unless
        :meth:`needs_initial_weights`). Must not modify ``w`` or ``w0``."""
        wd = self.options.weight_decay
        if wd:
            g = g.add(w, alpha=wd)
        mu = self._mu
        if mu:
            g = g + mu * (w - w0)
        return g

    def needs_initial_weights(self, ctx: LocalContext) -> bool:
        """Whether :meth:`step_gradient` reads ``w0`` (default: a FedProx term is active)."""
        return self._mu != 0.0

    def round_metrics(self, ctx: LocalContext) -> dict[str, float]:
        """Extra clients.csv metrics of the round (default none)."""
        return {}

    # ---------------------------------------------------------------- the round
    def batches(self, workload: Any, client_id: int, round_num: int) -> list[Any]:
        epochs = self.options.local_epochs
        if epochs <= 0:
            return super().batches(workload, client_id, round_num)
        out: list[Any] = []
        for epoch in range(epochs):
            out.extend(workload.client_epoch_batches(client_id, round_num, epoch, self.config.batch_size))
        return out

    def local_round(self, ctx: LocalContext, batches: list[Any]) -> LocalResult:
        qlayers, params, upload, probe, lr = ctx.qlayers, ctx.params, ctx.upload, ctx.probe, ctx.lr
        final_codes = ctx.final_codes and bool(qlayers)
        self._mu = self.proximal_mu(ctx)
        need_w0 = self.needs_initial_weights(ctx)
        momentum = float(self.options.momentum)
        generator = ctx.generator if self.stochastic_rounding_on() else None
        keep_codes0 = need_w0 or not final_codes
        # the received codes as stored (a packed 4-bit layer: its packed bytes), unpacked only when used
        codes0 = {k: (l.stored_codes().clone(), l.scale.clone()) for k, l in qlayers.items()} if keep_codes0 else {}
        params0 = {k: p.detach().clone() for k, p in params.items()}
        probe.mark_other(*[t for pair in codes0.values() for t in pair], *params0.values())
        bufs: dict[str, torch.Tensor] = {}
        counts = {"changed": 0}
        numel = sum(l.weight_shape.numel() for l in qlayers.values())

        def with_momentum(key: str, g: torch.Tensor) -> torch.Tensor:
            if not momentum:
                return g
            buf = bufs.get(key)
            if buf is None:
                buf = bufs[key] = torch.clone(g).detach()
                probe.mark_optimizer_state(buf)
            else:
                buf.mul_(momentum).add_(g)
            return buf

        @torch.no_grad()
        def layer_step(layer: Any, g: torch.Tensor) -> None:
            key = layer.weight_key
            w = layer.dequantized_weight()  # the transient float weight of this layer only
            g = g.to(w.dtype)
            w0 = dequantize(layer.unpack_stored(codes0[key][0]), codes0[key][1]) if need_w0 else None
            g = with_momentum(key, self.step_gradient(ctx, key, w, g, w0))
            del w0
            w.sub_(g, alpha=lr)  # in place: no float temporaries beyond w
            del g
            before = layer.codes.clone()
            layer.requantize_(w, generator) if generator is not None else layer.requantize_(w)
            del w
            counts["changed"] += int((layer.codes != before).sum())

        @torch.no_grad()
        def param_step(key: str, g: torch.Tensor) -> None:
            p = params[key]
            g = with_momentum(key, self.step_gradient(ctx, key, p, g, params0[key] if need_w0 else None))
            p.sub_(lr * g)

        for layer in qlayers.values():
            layer.zero_weight_grad()
            layer.set_weight_grad_hook(layer_step)
        n_total = 0
        for i, batch in enumerate(batches):
            probe.next_step()
            for p in params.values():
                p.grad = None
            with probe.saved_activations():
                loss, n = ctx.workload.loss(ctx.model, batch)
            if i == 0:  # after the first forward: run after MemTracker's grad hooks (see FedSGD)
                for key, p in params.items():
                    ctx.handles.append(p.register_post_accumulate_grad_hook(grad_hook(param_step, key)))
            loss.backward()
            ctx.losses.append(float(loss.detach()))
            del loss
            n_total += int(n)
        del bufs
        with torch.no_grad():
            for key, layer in qlayers.items():
                if final_codes:
                    upload.add_final_codes(key, layer)
                else:
                    c0, s0 = codes0[key]
                    upload.add(key, layer.dequantized_weight() - dequantize(layer.unpack_stored(c0), s0))
            del codes0
            for key, p in ctx.model.named_parameters():
                if key in params0:
                    d = params0.pop(key)  # the received copy becomes the delta, in place: p - p0
                    d.sub_(p.detach()).neg_()
                    upload.add(key, d)
                    del d
                else:
                    upload.add_zeros(key, tuple(p.shape))
        changed = counts["changed"] / max(1, numel * len(batches))
        return LocalResult(num_examples=n_total, changed_fraction=changed, metrics=self.round_metrics(ctx))
