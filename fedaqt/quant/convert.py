"""Model conversion: float model -> native quantized model (spec 2.1 partition, 2.2 steps 1-2).

``convert_to_quantized`` swaps, in place, every ``nn.Linear`` / ``nn.Conv1d`` / ``nn.MultiheadAttention`` whose
qualified name passes ``include`` for :class:`QuantLinear` / :class:`QuantConv1d` / :class:`QuantMultiheadAttention`.
Float parameters (biases, norms, unconverted layers) are the *same* Parameter objects and keep exactly the float
model's state_dict names, so a float state dict maps onto the quantized model by name, and every quantized weight is
addressed by its float key (``QuantLayer.weight_key``).

Rules:

* The ``nn.Linear`` ``out_proj`` inside an ``nn.MultiheadAttention`` is never converted on its own (``nn.MHA`` reads
  its weight directly); it is converted together with its attention module, which quantizes both
  ``in_proj_weight`` and ``out_proj.weight``.
* ``include(name, module)`` gets the qualified module name (``""`` for the root) and the float module.
  ``include=None`` converts every eligible module.

This module imports nothing from other fedaqt packages.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from .layers import QuantConv1d, QuantLayer, QuantLinear, QuantMultiheadAttention
from .quantize import check_granularity, qmax

__all__ = [
    "IncludeFn",
    "convert_to_quantized",
    "quant_layers",
    "quantized_weight_keys",
    "model_gradients",
    "zero_quant_grads",
    "load_float_state",
]

IncludeFn = Callable[[str, nn.Module], bool]

_ELIGIBLE = (nn.Linear, nn.Conv1d, nn.MultiheadAttention)


def _targets(model: nn.Module, include: Optional[IncludeFn]) -> list[tuple[str, nn.Module]]:
    """Eligible (qualified name, module) pairs passing ``include``, skipping children of nn.MultiheadAttention."""
    out: list[tuple[str, nn.Module]] = []
    inside_mha: list[str] = []
    for name, mod in model.named_modules():
        if any(name.startswith(p + ".") or (p == "" and name != "") for p in inside_mha):
            continue
        if isinstance(mod, (QuantLayer, QuantMultiheadAttention)):
            continue
        if isinstance(mod, nn.MultiheadAttention):
            inside_mha.append(name)
        if isinstance(mod, _ELIGIBLE) and (include is None or include(name, mod)):
            out.append((name, mod))
    return out


def _weight_keys_of(name: str, mod: nn.Module) -> list[str]:
    prefix = f"{name}." if name else ""
    if isinstance(mod, nn.MultiheadAttention):
        return [f"{prefix}in_proj_weight", f"{prefix}out_proj.weight"]
    return [f"{prefix}weight"]


def quantized_weight_keys(float_model: nn.Module, include: Optional[IncludeFn] = None) -> list[str]:
    """The float state_dict keys that :func:`convert_to_quantized` with the same ``include`` would quantize
    (spec 2.1), in module order. Use it as ``quantized_keys`` for :func:`fedaqt.quant.wire.encode_broadcast`."""
    keys: list[str] = []
    for name, mod in _targets(float_model, include):
        keys.extend(_weight_keys_of(name, mod))
    return keys


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def convert_to_quantized(
    model: nn.Module,
    bits: int,
    granularity: str,
    include: Optional[IncludeFn] = None,
) -> nn.Module:
    """Swap eligible float layers for native quantized layers, in place (spec 2.2 steps 1-2).

    Each new layer is initialised by quantizing the float weight with a max-abs scale in the weight's dtype
    (:func:`fedaqt.quant.quantize.quantize`); float weights are dropped from the model, biases are kept as the same
    Parameter objects. Training/eval mode is preserved.

    Args:
        model: float model (modified in place and returned).
        bits: 8 or 4.
        granularity: ``"tensor"`` or ``"channel"``.
        include: ``include(qualified_name, module) -> bool``; None converts every eligible layer.

    Returns:
        ``model`` itself.

    Raises:
        ValueError: bad ``bits``/``granularity``, converting the root module itself, or an unsupported layer
            configuration (e.g. Conv1d ``padding_mode != 'zeros'``, MHA with ``kdim != embed_dim``).
    """
    qmax(bits)
    check_granularity(granularity)
    for name, mod in _targets(model, include):
        if name == "":
            raise ValueError("convert_to_quantized cannot replace the root module itself; wrap it in a container")
        prefix = f"{name}."
        if isinstance(mod, nn.MultiheadAttention):
            new: nn.Module = QuantMultiheadAttention.from_float(mod, bits, granularity, prefix=prefix)
        elif isinstance(mod, nn.Conv1d):
            new = QuantConv1d.from_float(mod, bits, granularity, weight_key=f"{prefix}weight")
        else:
            new = QuantLinear.from_float(mod, bits, granularity, weight_key=f"{prefix}weight")
        new.train(mod.training)
        _set_submodule(model, name, new)
    return model


def quant_layers(model: nn.Module) -> dict[str, QuantLayer]:
    """All :class:`QuantLayer` modules of ``model`` (including the projections of quantized attention modules),
    keyed by ``weight_key`` (the float model's state_dict key of the weight).

    Raises:
        ValueError: a layer has an empty or duplicate ``weight_key``.
    """
    out: dict[str, QuantLayer] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLayer):
            key = mod.weight_key
            if not key:
                raise ValueError(f"quantized layer {name!r} has no weight_key (build it with convert_to_quantized)")
            if key in out:
                raise ValueError(f"duplicate weight_key {key!r} (module {name!r})")
            out[key] = mod
    return out


def model_gradients(qmodel: nn.Module) -> dict[str, torch.Tensor]:
    """Float gradients of a quantized model keyed by float-model state names (spec 2.2 step 3, the upload).

    Quantized weights give ``layer.weight_grad`` (``g = dL/dw_q``), float parameters give ``param.grad``; a missing
    gradient becomes zeros (quantized: dtype of the layer's scale; float: the parameter's dtype). Layers that
    deliver their gradient through a hook have ``weight_grad is None`` and therefore appear as zeros.

    Returns:
        ``{state_key: tensor shaped like the float weight/parameter}`` (tensors are the stored gradients, not
        copies, except for the zero fill-ins).
    """
    grads: dict[str, torch.Tensor] = {}
    for key, layer in quant_layers(qmodel).items():
        g = layer.weight_grad
        if g is None:
            g = torch.zeros(layer.weight_shape, dtype=layer.scale.dtype, device=layer.scale.device)
        grads[key] = g
    for name, p in qmodel.named_parameters():
        if name in grads:
            raise ValueError(f"float parameter {name!r} collides with a quantized weight key")
        grads[name] = p.grad if p.grad is not None else torch.zeros_like(p)
    return grads


def zero_quant_grads(qmodel: nn.Module, include_float: bool = False) -> None:
    """Set ``weight_grad = None`` on every quantized layer; with ``include_float`` also ``param.grad = None``."""
    for layer in quant_layers(qmodel).values():
        layer.zero_weight_grad()
    if include_float:
        for p in qmodel.parameters():
            p.grad = None


def load_float_state(
    qmodel: nn.Module,
    state: dict[str, torch.Tensor],
    strict: bool = True,
) -> None:
    """Load a float state dict (float-model names) into a quantized model.

    Quantized keys are re-quantized into their layer (fresh max-abs scale, spec 2.2 step 1); every other key is
    copied into the parameter/buffer of the same name.

    Args:
        qmodel: converted model.
        state: ``{float_state_key: tensor}``.
        strict: require every quantized key and every float parameter/buffer of ``qmodel`` to be present and no
            unknown key.

    Raises:
        ValueError: unknown / missing keys (strict) or a shape mismatch, naming the key.
    """
    layers = quant_layers(qmodel)
    params = dict(qmodel.named_parameters())
    buffers = {n: b for n, b in qmodel.named_buffers() if not isinstance(_owner(qmodel, n), QuantLayer)}
    seen = set()
    for key, t in state.items():
        if key in layers:
            layers[key].requantize_(t)
        elif key in params or key in buffers:
            dst = params.get(key, buffers.get(key))
            if tuple(dst.shape) != tuple(t.shape):
                raise ValueError(f"{key}: shape {tuple(t.shape)} != model shape {tuple(dst.shape)}")
            with torch.no_grad():
                dst.copy_(t)
        elif strict:
            raise ValueError(f"unknown state key {key!r}")
        seen.add(key)
    if strict:
        missing = (set(layers) | set(params) | set(buffers)) - seen
        if missing:
            raise ValueError(f"missing state keys: {sorted(missing)}")


def _owner(model: nn.Module, name: str) -> nn.Module:
    parent, _, _ = name.rpartition(".")
    return model.get_submodule(parent) if parent else model
