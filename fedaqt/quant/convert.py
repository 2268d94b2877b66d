"""Model conversion: float model -> native quantized model (spec 2.1 partition, 2.2 steps 1-2).

``convert_to_quantized`` swaps, in place, every module that a registered handler covers
(:mod:`fedaqt.quant.registry`: built-ins ``nn.Linear`` -> :class:`QuantLinear`, ``nn.Conv1d`` ->
:class:`QuantConv1d`, ``nn.Conv2d`` -> :class:`QuantConv2d`, ``nn.MultiheadAttention`` ->
:class:`QuantMultiheadAttention`; plugins add more with :func:`fedaqt.quant.register_quantized_layer`) and whose
qualified name passes ``include``. Float parameters (biases, norms, unconverted layers) are the *same* Parameter
objects and keep exactly the float model's state_dict names, so a float state dict maps onto the quantized model by
name, and every quantized weight is addressed by its float key (``QuantLayer.weight_key``).

Rules:

* ``include(name, module)`` gets the qualified module name (``""`` for the root) and the float module.
  ``include=None`` converts every module a handler covers and leaves the rest float.
* With an ``include``, a module that ``include`` selects, that directly owns a floating Parameter with >= 2 dims (a
  weight matrix/kernel) and that no handler covers is an error (``TypeError`` naming the module and its type),
  never a silent float layer. Modules owning only 1-D parameters (norms) have nothing to quantize (spec 2.1) and
  may be selected freely; containers are not checked (only modules that own parameters are).
* A handler with ``covers_children`` (``nn.MultiheadAttention``) converts its subtree as a unit: the ``nn.Linear``
  ``out_proj`` inside an ``nn.MultiheadAttention`` is never converted on its own (``nn.MHA`` reads its weight
  directly); it is converted together with its attention module, which quantizes both ``in_proj_weight`` and
  ``out_proj.weight``.

This module imports nothing from other fedaqt packages.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from .layers import QuantLayer
from .quantize import check_granularity, qmax
from .registry import QuantConfig, QuantHandler, handler_for, has_quantizable_parameter, registered_quantized_layers

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


def _unhandled_error(name: str, mod: nn.Module) -> TypeError:
    cls = type(mod)
    known = ", ".join(t.__qualname__ for t in registered_quantized_layers())
    covering_base = next((b for b in cls.__mro__[1:] if b in registered_quantized_layers()), None)
    why = (f" (it subclasses {covering_base.__qualname__} but overrides forward, so that handler does not cover "
           "it)") if covering_base is not None else ""
    return TypeError(
        f"module {name or '<root>'!r} of type {cls.__module__}.{cls.__qualname__} is selected for quantization "
        f"by the include filter but no quantized-layer handler covers it{why}; register one with "
        f"fedaqt.quant.register_quantized_layer({cls.__qualname__}, handler) or exclude it from the filter "
        f"(handled types: {known})"
    )


def _targets(model: nn.Module, include: Optional[IncludeFn]) -> list[tuple[str, nn.Module, QuantHandler]]:
    """(qualified name, module, handler) of the modules to convert, in module order.

    Raises:
        TypeError: ``include`` selects a module with a >= 2-D float Parameter that no handler covers.
    """
    out: list[tuple[str, nn.Module, QuantHandler]] = []
    covered: list[str] = []  # prefixes of subtrees converted as a unit
    for name, mod in model.named_modules():
        if any(p == "" or name.startswith(p + ".") for p in covered):
            continue
        handler = handler_for(mod)
        if handler is not None:
            if handler.covers_children:
                covered.append(name)
            if include is None or include(name, mod):
                out.append((name, mod, handler))
        elif include is not None and has_quantizable_parameter(mod) and include(name, mod):
            raise _unhandled_error(name, mod)
    return out


def _weight_keys_of(name: str, mod: nn.Module, handler: QuantHandler) -> list[str]:
    prefix = f"{name}." if name else ""
    return [f"{prefix}{k}" for k in handler.weight_keys(mod)]


def quantized_weight_keys(float_model: nn.Module, include: Optional[IncludeFn] = None) -> list[str]:
    """The float state_dict keys that :func:`convert_to_quantized` with the same ``include`` would quantize
    (spec 2.1), in module order. Use it as ``quantized_keys`` for :func:`fedaqt.quant.wire.encode_broadcast`.

    Raises:
        TypeError: ``include`` selects a module with a weight matrix/kernel that no handler covers (naming the
            module and its type).
    """
    keys: list[str] = []
    for name, mod, handler in _targets(float_model, include):
        keys.extend(_weight_keys_of(name, mod, handler))
    return keys


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def _check_built(name: str, mod: nn.Module, new: nn.Module, handler: QuantHandler, keys: list[str]) -> None:
    """The handler contract (see :mod:`fedaqt.quant.registry`); raises TypeError naming the module and handler."""
    who = f"{name!r} ({type(mod).__qualname__}, handler {handler!r})"
    if not isinstance(new, nn.Module):
        raise TypeError(f"{who}: convert() returned {type(new).__name__}, not an nn.Module")
    prefix = f"{name}."
    float_state = mod.state_dict(keep_vars=True)
    layers = {m.weight_key: m for m in new.modules() if isinstance(m, QuantLayer)}
    n_layers = sum(isinstance(m, QuantLayer) for m in new.modules())
    want = {prefix + k for k in keys}
    if set(layers) != want or n_layers != len(want):
        raise TypeError(f"{who}: the quantized module's QuantLayer weight_keys {sorted(layers)} "
                        f"(from {n_layers} layers) != the handler's weight keys {sorted(want)}")
    for k in keys:
        t = float_state.get(k)
        if t is None or not t.dtype.is_floating_point:
            raise TypeError(f"{who}: weight key {k!r} is not a floating tensor of the float module")
        if tuple(layers[prefix + k].weight_shape) != tuple(t.shape):
            raise TypeError(f"{who}: {prefix + k} has weight_shape {tuple(layers[prefix + k].weight_shape)} != "
                            f"float shape {tuple(t.shape)}")
    float_params = {n for n, _ in mod.named_parameters()} - set(keys)
    new_params = {n for n, _ in new.named_parameters()}
    if new_params != float_params:
        raise TypeError(f"{who}: the quantized module's parameters {sorted(new_params)} != the float module's "
                        f"non-quantized parameters {sorted(float_params)} (float state names must be kept)")


def convert_to_quantized(
    model: nn.Module,
    bits: int,
    granularity: str,
    include: Optional[IncludeFn] = None,
) -> nn.Module:
    """Swap covered float layers for native quantized layers, in place (spec 2.2 steps 1-2).

    Each new layer is initialised by quantizing the float weight with a max-abs scale in the weight's dtype
    (:func:`fedaqt.quant.quantize.quantize`); float weights are dropped from the model, biases are kept as the same
    Parameter objects. Training/eval mode is preserved. Which types are covered, and how, is the registry of
    :mod:`fedaqt.quant.registry`.

    Args:
        model: float model (modified in place and returned).
        bits: 8 or 4.
        granularity: ``"tensor"`` or ``"channel"``.
        include: ``include(qualified_name, module) -> bool``; None converts every covered layer.

    Returns:
        ``model`` itself.

    Raises:
        ValueError: bad ``bits``/``granularity``, converting the root module itself, or an unsupported layer
            configuration (e.g. Conv1d/Conv2d ``padding_mode != 'zeros'``, MHA with ``kdim != embed_dim``).
        TypeError: ``include`` selects a module with a weight matrix/kernel that no handler covers (naming the
            module and its type), or a handler breaks its contract. Raised before the model is modified.
    """
    qmax(bits)
    check_granularity(granularity)
    config = QuantConfig(int(bits), granularity)
    targets = _targets(model, include)
    for name, _, _ in targets:
        if name == "":
            raise ValueError("convert_to_quantized cannot replace the root module itself; wrap it in a container")
    for name, mod, handler in targets:
        keys = list(handler.weight_keys(mod))
        new = handler.convert(mod, config, f"{name}.")
        _check_built(name, mod, new, handler, keys)
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
