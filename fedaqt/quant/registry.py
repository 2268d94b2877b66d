"""Quantizable layer types as a registry: configs as data + one handler per float module type (spec 2.1, 2.2).

In the style of torchao's ``quantization/quant_api.py`` (a config dataclass, a ``type -> handler`` table and a
filter function), :func:`fedaqt.quant.convert.convert_to_quantized`, :func:`~fedaqt.quant.convert.quantized_weight_keys`
and the "selected but unhandled" check all go through this table. Built-ins:

* ``nn.Linear`` -> :class:`~fedaqt.quant.layers.QuantLinear` (quantizes ``weight``);
* ``nn.Conv1d`` -> :class:`~fedaqt.quant.layers.QuantConv1d` (``weight``);
* ``nn.Conv2d`` -> :class:`~fedaqt.quant.layers.QuantConv2d` (``weight``);
* ``nn.MultiheadAttention`` -> :class:`~fedaqt.quant.layers.QuantMultiheadAttention` (``in_proj_weight`` and
  ``out_proj.weight``; its subtree is converted as a unit).

A plugin registers another type with :func:`register_quantized_layer` (e.g. at import of its workload module, which
happens in every process that builds the model). The handler contract, checked by the converter for every module
it builds:

* ``weight_keys(module)`` lists the float state_dict keys (relative to the module) that become codes + scales;
  each must name a floating tensor of the float module;
* ``convert(module, config, prefix)`` returns the quantized module; it (or its submodules) contains exactly one
  :class:`~fedaqt.quant.layers.QuantLayer` per weight key, with ``weight_key == prefix + key`` and the float
  tensor's shape, and its parameters are exactly the float module's parameters minus the weight keys (same
  names), so float state dicts map onto the quantized model by name;
* loading and dequantizing go through those :class:`~fedaqt.quant.layers.QuantLayer` objects
  (``load_quantized(codes, scale)`` for a broadcast, ``requantize_(w)`` for a float tensor,
  ``dequantized_weight()``), which the wire, :func:`~fedaqt.quant.convert.load_float_state` and the client
  trainer address by ``weight_key`` through :func:`~fedaqt.quant.convert.quant_layers`.

Lookup walks the module type's MRO, so a handler for ``nn.Linear`` also covers subclasses that keep
``nn.Linear.forward`` (e.g. ``NonDynamicallyQuantizableLinear``); a subclass that overrides ``forward`` (e.g.
WrapNet's ``WrapConv2d``) is *not* covered unless a handler is registered for it, because converting it would
silently drop its own computation.

This module imports nothing from other fedaqt packages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from torch import nn

from .layers import QuantConv1d, QuantConv2d, QuantLinear, QuantMultiheadAttention
from .quantize import check_granularity, qmax

__all__ = [
    "QuantConfig",
    "QuantHandler",
    "LayerHandler",
    "MultiheadAttentionHandler",
    "register_quantized_layer",
    "unregister_quantized_layer",
    "registered_quantized_layers",
    "handler_for",
    "has_quantizable_parameter",
]


@dataclass(frozen=True)
class QuantConfig:
    """How weights are quantized (the data a handler gets).

    Attributes:
        bits: weight bit-width, 8 or 4 (activations are always int8).
        granularity: ``"tensor"`` (0-d scale) or ``"channel"`` (scale ``[out]``, axis 0).

    Raises:
        ValueError: bad ``bits`` or ``granularity`` (naming the value).
    """

    bits: int
    granularity: str

    def __post_init__(self) -> None:
        qmax(self.bits)
        check_granularity(self.granularity)


class QuantHandler:
    """Base class of a quantized-layer handler: how one float module type becomes a native quantized module.

    Subclasses override :meth:`convert` and, when the quantized keys are not just ``weight``, :meth:`weight_keys`.
    Set :attr:`covers_children` when the quantized module replaces the float module's whole subtree (the children
    are then never considered on their own, as for ``nn.MultiheadAttention``'s ``out_proj``). Make handlers
    comparable (e.g. frozen dataclasses) so that registering an equal handler twice is a no-op.
    """

    #: the quantized module replaces the whole subtree; children are never converted or checked on their own
    covers_children: bool = False

    def weight_keys(self, module: nn.Module) -> list[str]:
        """Float state_dict keys of ``module`` (relative, e.g. ``["weight"]``) that become codes + scales."""
        return ["weight"]

    def convert(self, module: nn.Module, config: QuantConfig, prefix: str) -> nn.Module:
        """Build the quantized module from ``module`` (``prefix`` = its qualified name + ``"."``).

        Raises:
            ValueError: an unsupported configuration of ``module`` (the message names it).
        """
        raise NotImplementedError(f"{type(self).__name__}.convert")


@dataclass(frozen=True)
class LayerHandler(QuantHandler):
    """Handler for a single-weight layer whose quantized class has
    ``from_float(module, bits, granularity, weight_key=...)`` (QuantLinear, QuantConv1d, QuantConv2d)."""

    quant_cls: type

    def convert(self, module: nn.Module, config: QuantConfig, prefix: str) -> nn.Module:
        return self.quant_cls.from_float(module, config.bits, config.granularity, weight_key=f"{prefix}weight")


@dataclass(frozen=True)
class MultiheadAttentionHandler(QuantHandler):
    """``nn.MultiheadAttention`` -> :class:`QuantMultiheadAttention`; quantizes ``in_proj_weight`` and
    ``out_proj.weight`` together (``out_proj`` is never converted on its own: ``nn.MultiheadAttention`` reads its
    weight directly)."""

    covers_children = True

    def weight_keys(self, module: nn.Module) -> list[str]:
        return ["in_proj_weight", "out_proj.weight"]

    def convert(self, module: nn.Module, config: QuantConfig, prefix: str) -> nn.Module:
        return QuantMultiheadAttention.from_float(module, config.bits, config.granularity, prefix=prefix)


_HANDLERS: dict[type, QuantHandler] = {}


def register_quantized_layer(float_type: type, handler: QuantHandler, replace: bool = False) -> None:
    """Register ``handler`` for modules of ``float_type`` (and its subclasses that keep its ``forward``).

    Args:
        float_type: an ``nn.Module`` subclass (the float layer type).
        handler: a :class:`QuantHandler` (needs ``convert`` and ``weight_keys``).
        replace: allow replacing a different handler already registered for ``float_type``.

    Raises:
        TypeError: ``float_type`` is not an ``nn.Module`` subclass or ``handler`` is not a handler.
        ValueError: a different handler is already registered for ``float_type`` and ``replace`` is False
            (registering an equal handler again is a no-op).
    """
    if not (isinstance(float_type, type) and issubclass(float_type, nn.Module)):
        raise TypeError(f"float_type must be an nn.Module subclass, got {float_type!r}")
    if not (callable(getattr(handler, "convert", None)) and callable(getattr(handler, "weight_keys", None))):
        raise TypeError(f"handler for {float_type.__qualname__} must have convert() and weight_keys() "
                        f"(subclass fedaqt.quant.QuantHandler), got {handler!r}")
    old = _HANDLERS.get(float_type)
    if old is not None and old != handler and not replace:
        raise ValueError(f"a quantized-layer handler is already registered for {float_type.__qualname__} "
                         f"({old!r}); pass replace=True to replace it with {handler!r}")
    _HANDLERS[float_type] = handler


def unregister_quantized_layer(float_type: type) -> Optional[QuantHandler]:
    """Remove the handler registered for exactly ``float_type``; returns it (None if there was none)."""
    return _HANDLERS.pop(float_type, None)


def registered_quantized_layers() -> dict[type, QuantHandler]:
    """A copy of the registry, ``{float_type: handler}``, in registration order."""
    return dict(_HANDLERS)


def handler_for(module_or_type: Any) -> Optional[QuantHandler]:
    """The handler covering a module (or module type), or None.

    Walks the type's MRO: the first registered type wins, but a handler registered for a base class covers a
    subclass only if the subclass does not override ``forward`` (below the registered type).
    """
    cls = module_or_type if isinstance(module_or_type, type) else type(module_or_type)
    for base in cls.__mro__:
        h = _HANDLERS.get(base)
        if h is not None:
            if base is cls or getattr(cls, "forward", None) is getattr(base, "forward", None):
                return h
            return None
    return None


def has_quantizable_parameter(module: nn.Module) -> bool:
    """True if ``module`` directly owns a floating Parameter with at least 2 dims (a weight matrix/kernel).

    1-D parameters (biases, norm scales/shifts) are always float (spec 2.1 [CHOICE]), so a module owning only those
    has nothing to quantize and may be selected by a filter without error.
    """
    return any(p is not None and p.dtype.is_floating_point and p.dim() >= 2
               for p in module._parameters.values())


register_quantized_layer(nn.Linear, LayerHandler(QuantLinear))
register_quantized_layer(nn.Conv1d, LayerHandler(QuantConv1d))
register_quantized_layer(nn.Conv2d, LayerHandler(QuantConv2d))
register_quantized_layer(nn.MultiheadAttention, MultiheadAttentionHandler())
