"""One client round on the native quantized model (spec §2.2 steps 2-4), independent of Flower.

The Flower ClientApp (:mod:`fedaqt.client.app`) only decodes messages and calls :func:`client_round`. Keeping the
round a plain function lets tests and ``fedaqt profile`` run it without Ray.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fedaqt.config import RunConfig
from fedaqt.plugins import get_workload_class
from fedaqt.quant.convert import convert_to_quantized, model_gradients, quant_layers, zero_quant_grads
from fedaqt.quant.quantize import dequantize
from fedaqt.quant.wire import QTensor
from fedaqt.workloads.base import Workload

# Per-process caches: a Ray actor runs many client rounds; the workload (data, features) and the model skeleton
# are built once per configuration and refilled with each broadcast.
_WORKLOADS: dict[str, Workload] = {}
_MODELS: dict[str, nn.Module] = {}


def _key(config: RunConfig) -> str:
    return json.dumps(config.to_dict(), sort_keys=True)


def get_workload(config: RunConfig) -> Workload:
    """The (cached) workload for ``config``. Raises UnknownPluginError for an unknown name."""
    key = _key(config)
    if key not in _WORKLOADS:
        _WORKLOADS[key] = get_workload_class(config.workload)(config)
    return _WORKLOADS[key]


def build_client_model(workload: Workload, config: RunConfig) -> nn.Module:
    """Float model skeleton converted to native quantized layers (``bits < 32``) for the workload's filter."""
    model = workload.build_model()
    if config.bits < 32:
        model = convert_to_quantized(model, config.bits, config.granularity, workload.quantize_filter)
    return model


def get_client_model(workload: Workload, config: RunConfig) -> nn.Module:
    key = _key(config)
    if key not in _MODELS:
        _MODELS[key] = build_client_model(workload, config)
    return _MODELS[key]


def load_broadcast(model: nn.Module, decoded: dict[str, Any]) -> None:
    """Fill ``model`` with a decoded broadcast.

    Quantized keys with a native layer get its codes + scales; quantized keys of layers the workload does not
    convert (e.g. WrapNet's own layers) are dequantized into the float parameter; float tensors are copied.

    Raises:
        ValueError: a broadcast key the model does not have, or a model tensor the broadcast does not cover.
    """
    qlayers = quant_layers(model)
    tensors = dict(model.named_parameters())
    tensors.update({k: v for k, v in model.named_buffers() if v.is_floating_point() or k not in qlayers})
    covered = set()
    with torch.no_grad():
        for key, value in decoded.items():
            if isinstance(value, QTensor):
                if key in qlayers:
                    qlayers[key].load_quantized(value.codes, value.scale)
                elif key in tensors:
                    tensors[key].copy_(value.dequantize().to(tensors[key].dtype))
                else:
                    raise ValueError(f"broadcast has quantized tensor {key!r} that the client model lacks")
            elif key in tensors:
                if tuple(tensors[key].shape) != tuple(value.shape):
                    raise ValueError(f"broadcast tensor {key!r} has shape {tuple(value.shape)}, model expects {tuple(tensors[key].shape)}")
                tensors[key].copy_(value.to(tensors[key].dtype))
            else:
                raise ValueError(f"broadcast has tensor {key!r} that the client model lacks")
            covered.add(key)
    missing = [k for k in list(qlayers) + [k for k, _ in model.named_parameters()] if k not in covered]
    if missing:
        raise ValueError(f"broadcast does not cover model tensors: {missing[:5]}{'...' if len(missing) > 5 else ''}")


def float_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Floating-point buffers that are model state (BatchNorm statistics), excluding quant codes/scales."""
    qnames = set()
    for name, mod in model.named_modules():
        if hasattr(mod, "weight_key"):
            qnames.update(f"{name}.{b}" if name else b for b, _ in mod.named_buffers(recurse=False))
    return {k: v for k, v in model.named_buffers() if v.is_floating_point() and k not in qnames}


@dataclass
class RoundResult:
    """What a client sends back: float ``update`` keyed by float-model state names, ``n`` examples, metrics."""

    update: dict[str, torch.Tensor]
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


def client_round(
    workload: Workload,
    model: nn.Module,
    config: RunConfig,
    client_id: int,
    round_num: int,
    proximal_mu: float = 0.0,
) -> RoundResult:
    """Train the already-loaded native quantized ``model`` for one round.

    FedSGD (spec §2.2 step 3): one batch, update = dL/dw_q for quantized tensors and dL/dp for float ones.
    FedAvg (step 4): ``config.local_steps`` SGD steps with re-quantization after every step (fresh max-abs scale);
    update = dequantized final - dequantized received (delta), float parameters likewise; optional FedProx term.
    Float buffers (BatchNorm statistics) upload their change in both modes.

    Returns:
        RoundResult whose ``update`` tensors are float32, shaped like the float model's state.
    """
    t0 = time.perf_counter()
    torch.manual_seed(hash((config.seed, client_id, round_num)) % (2**31))
    model.train()
    workload.set_checkpointing(model, config.checkpointing)
    qlayers = quant_layers(model)
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    buffers0 = {k: v.detach().clone() for k, v in float_buffers(model).items()}
    steps = 1 if config.algorithm == "fedsgd" else config.local_steps
    batches = workload.client_batches(client_id, round_num, steps, config.batch_size)
    losses, n_total = [], 0

    if config.algorithm == "fedsgd":
        for p in params.values():
            p.grad = None
        zero_quant_grads(model)
        loss, n = workload.loss(model, batches[0])
        loss.backward()
        losses.append(float(loss.detach()))
        n_total = n
        update = {k: g.detach().float() for k, g in model_gradients(model).items()}
        changed = 0.0
    else:
        codes0 = {k: (l.codes.clone(), l.scale.clone()) for k, l in qlayers.items()}
        params0 = {k: p.detach().clone() for k, p in params.items()}
        lr = config.lr
        changed_counts, numel = 0, sum(l.codes.numel() for l in qlayers.values())
        for batch in batches:
            for p in params.values():
                p.grad = None
            zero_quant_grads(model)
            loss, n = workload.loss(model, batch)
            loss.backward()
            losses.append(float(loss.detach()))
            n_total += n
            with torch.no_grad():
                for key, layer in qlayers.items():
                    g = layer.weight_grad
                    if g is None:
                        continue
                    w = layer.dequantized_weight()
                    if proximal_mu:
                        c0, s0 = codes0[key]
                        g = g + proximal_mu * (w - dequantize(c0, s0))
                    before = layer.codes.clone()
                    layer.requantize_(w - lr * g)
                    changed_counts += int((layer.codes != before).sum())
                for key, p in params.items():
                    if p.grad is None:
                        continue
                    g = p.grad
                    if proximal_mu:
                        g = g + proximal_mu * (p - params0[key])
                    p.sub_(lr * g)
        update = {}
        with torch.no_grad():
            for key, layer in qlayers.items():
                c0, s0 = codes0[key]
                update[key] = (layer.dequantized_weight() - dequantize(c0, s0)).float()
            for key, p in params.items():
                update[key] = (p.detach() - params0[key]).float()
        changed = changed_counts / max(1, numel * len(batches))

    for key, v in float_buffers(model).items():
        update[key] = (v.detach() - buffers0[key]).float()
    metrics = {
        "train_loss": float(sum(losses) / len(losses)),
        "seconds": time.perf_counter() - t0,
        "changed_fraction": float(changed),
    }
    return RoundResult(update=update, num_examples=int(n_total), metrics=metrics)
