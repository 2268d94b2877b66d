"""Native quantized layers: weights live only as int codes + float scale (spec 2.2 step 2).

Each layer holds the weight as two buffers, the codes and ``scale`` (float, 0-d per tensor or ``[out]`` per
channel), plus an ordinary float ``bias`` parameter (or None). 8-bit codes are the int8 buffer ``codes`` shaped like
the weight; 4-bit codes are the uint8 buffer ``packed`` ``[ceil(numel/2)]``, two codes per byte in the wire format's
layout (:mod:`fedaqt.quant.pack`, issue 17), unpacked transiently, per layer, inside forward and backward (and inside
the recomputation under checkpointing); ``layer.codes`` of a 4-bit layer is then a fresh unpacked int8 copy.
No float weight tensor is stored anywhere in the module.

Forward quantizes the input activation dynamically to int8 (per tensor, detached scale, spec 1.1) and computes the
output from the integer operands, ``y = s_x * s_w * (q_x @ q_w^T) + bias``, in the input's floating dtype (exact
integer accumulation while ``|acc| < 2^24`` in float32 / ``2^53`` in float64). A custom
:class:`torch.autograd.Function` saves for backward only the int8 activation codes, the int8 weight codes and the
two scales (4 bits: the packed buffer itself, no copy); backward rebuilds ``x̂ = s_x q_x`` and ``ŵ = s_w q_w`` transiently and returns
``grad_x = grad_y @ ŵ`` and ``grad_w = grad_y^T @ x̂`` (STE through both quantizers).

Because the weight is a buffer, ``grad_w`` does not land in a ``.grad``: it is delivered to the layer, by default
accumulated into ``layer.weight_grad`` (float, shaped like the weight), or passed to a hook installed with
:meth:`QuantLayer.set_weight_grad_hook` (``fn(layer, grad_w)``), called exactly once per backward pass through the
layer (also under non-reentrant gradient checkpointing, whose recomputation runs only the forward).

This module imports nothing from other fedaqt packages.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .pack import check_packed_int4, pack_int4, packed_int4_nbytes, unpack_int4_fast
from .quantize import (
    broadcast_scale,
    check_granularity,
    dequantize,
    qmax,
    quantize,
    quantize_activation,
)

__all__ = [
    "ACT_BITS",
    "QuantLayer",
    "QuantLinear",
    "QuantConv1d",
    "QuantConv2d",
    "QuantMultiheadAttention",
    "WeightGradHook",
]

#: Activation bit-width for every quantized layer (spec 1.1 [CHOICE]: int8 activations for int8 and int4 weights).
ACT_BITS = 8

WeightGradHook = Callable[["QuantLayer", torch.Tensor], None]


def _grad_anchor() -> Optional[torch.Tensor]:
    """An empty leaf that requires grad, passed to the autograd Function so that backward runs (and ``grad_w`` is
    produced) even when neither the input nor the bias requires grad. ``None`` when grad mode is off."""
    if torch.is_grad_enabled():
        return torch.empty(0, requires_grad=True)
    return None


class QuantLayer(nn.Module):
    """Common base of :class:`QuantLinear`, :class:`QuantConv1d` and :class:`QuantConv2d` (the modules keyed by
    ``weight_key``).

    Attributes:
        bits: weight bit-width, 8 or 4.
        granularity: ``"tensor"`` or ``"channel"`` (axis 0 = output channel).
        weight_key: the float model's state_dict key of this weight (set by the converter; ``""`` otherwise).
        weight_shape: ``torch.Size`` of the (virtual) float weight.
        weight_requires_grad: when False, backward computes no ``grad_w`` (frozen layer).
        weight_grad: accumulated float ``grad_w`` (shaped like the weight) or None before any backward / when a hook
            is installed.
        codes: int8 buffer shaped like the weight (8 bits, or 4 bits with ``pack_int4_codes = False``); for a packed
            4-bit layer a read-only view computed on access (fresh unpacked int8 copy).
        packed: (packed 4-bit layers) uint8 buffer ``[ceil(numel/2)]``, two codes per byte (wire layout).
        scale: float buffer, 0-d (per tensor) or ``[out]`` (per channel).
    """

    scale: torch.Tensor
    #: hold 4-bit codes packed two per byte (``packed`` buffer); a subclass may set False to keep one int8 per code
    pack_int4_codes: bool = True

    @property
    def packs_codes(self) -> bool:
        """True when the codes live packed two per byte (4 bits and :attr:`pack_int4`)."""
        return self.bits == 4 and type(self).pack_int4_codes

    def __getattr__(self, name: str):
        # ``codes`` of a packed layer: a transient unpacked int8 copy (the module keeps only ``packed``)
        if name == "codes":
            buffers = self.__dict__.get("_buffers", {})
            if "codes" not in buffers and "packed" in buffers:
                return self.unpacked_codes()
        return super().__getattr__(name)

    def stored_codes(self) -> torch.Tensor:
        """The codes buffer itself: int8 ``codes`` shaped like the weight, or uint8 ``packed`` ``[ceil(numel/2)]``
        for a packed 4-bit layer (no copy)."""
        return self._buffers["packed"] if self.packs_codes else self._buffers["codes"]

    def unpack_stored(self, stored: torch.Tensor) -> torch.Tensor:
        """int8 codes shaped like the weight from :meth:`stored_codes` (or a clone of it): unpacked for a packed
        layer (a fresh tensor), ``stored`` itself otherwise."""
        if self.packs_codes:
            return unpack_int4_fast(stored, self.weight_shape.numel()).reshape(self.weight_shape)
        return stored

    def unpacked_codes(self) -> torch.Tensor:
        """int8 codes shaped like the weight (a fresh unpacked copy for a packed 4-bit layer, else the buffer)."""
        return self.unpack_stored(self.stored_codes())

    def _init_quant(
        self,
        weight_shape: tuple[int, ...],
        bits: int,
        granularity: str,
        dtype: torch.dtype | None,
        device: torch.device | str | None,
    ) -> None:
        qmax(bits)
        check_granularity(granularity)
        self.bits = int(bits)
        self.granularity = granularity
        self.weight_key = ""
        self.weight_shape = torch.Size(weight_shape)
        self.weight_requires_grad = True
        self.weight_grad: Optional[torch.Tensor] = None
        self._weight_grad_hook: Optional[WeightGradHook] = None
        self._weight_grad_rows: Optional[int] = None
        dtype = dtype or torch.get_default_dtype()
        if self.packs_codes:
            numel = int(torch.Size(weight_shape).numel())
            self.register_buffer("packed", torch.zeros(packed_int4_nbytes(numel), dtype=torch.uint8, device=device))
        else:
            self.register_buffer("codes", torch.zeros(weight_shape, dtype=torch.int8, device=device))
        sshape = () if granularity == "tensor" else (weight_shape[0],)
        self.register_buffer("scale", torch.ones(sshape, dtype=dtype, device=device))

    # ---------------------------------------------------------------- weight state
    @property
    def out_dim(self) -> int:
        return int(self.weight_shape[0])

    def load_quantized(self, codes: torch.Tensor, scale: torch.Tensor, packed: bool = False) -> None:
        """Copy received codes and scale into the buffers (spec 2.2 step 2).

        Args:
            codes: integer tensor shaped like the weight (int8 preferred) with values in ``[-t_b, t_b]``; with
                ``packed`` the 4-bit wire form, uint8 ``[ceil(numel/2)]`` (copied as is into a packed layer, so a
                broadcast is decoded straight into the packed buffer; unpacked into an int8 layer).
            scale: floating tensor, ``()`` for per-tensor or ``[out]`` for per-channel layers; finite, >= 0.
                It is converted to the dtype of the ``scale`` buffer.

            packed: ``codes`` is packed int4 (only for 4-bit layers).

        Raises:
            ValueError: wrong shape, dtype, out-of-range codes, a bad scale, or ``packed`` for an 8-bit layer
                (message names ``weight_key``).
        """
        name = self.weight_key or type(self).__name__
        t = qmax(self.bits)
        packed_in = bool(packed)
        if packed_in and self.bits != 4:
            raise ValueError(f"{name}: packed int4 codes for a {self.bits}-bit layer")
        if packed_in:
            try:
                check_packed_int4(codes, self.weight_shape.numel(), t)
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
        else:
            if tuple(codes.shape) != tuple(self.weight_shape):
                raise ValueError(f"{name}: codes shape {tuple(codes.shape)} != weight shape {tuple(self.weight_shape)}")
            if codes.dtype.is_floating_point or codes.dtype == torch.bool or codes.is_complex():
                raise ValueError(f"{name}: codes must be an integer tensor, got {codes.dtype}")
            if codes.numel() and (int(codes.min()) < -t or int(codes.max()) > t):
                raise ValueError(
                    f"{name}: codes must lie in [-{t}, {t}] for {self.bits}-bit weights, "
                    f"got [{int(codes.min())}, {int(codes.max())}]"
                )
        if tuple(scale.shape) != tuple(self.scale.shape):
            raise ValueError(
                f"{name}: scale shape {tuple(scale.shape)} != expected {tuple(self.scale.shape)} "
                f"({self.granularity} granularity)"
            )
        if not scale.dtype.is_floating_point:
            raise ValueError(f"{name}: scale must be floating point, got {scale.dtype}")
        if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
            raise ValueError(f"{name}: scale must be finite and >= 0")
        with torch.no_grad():
            self._store_codes(codes, packed_in)
            self.scale.copy_(scale.to(self.scale.dtype))

    def _store_codes(self, codes: torch.Tensor, packed_in: bool = False) -> None:
        """Write validated codes (int weight-shaped, or packed uint8 when ``packed_in``) into the codes buffer."""
        dst = self.stored_codes()
        if self.packs_codes:
            dst.copy_(codes.reshape(-1) if packed_in else pack_int4(codes.to(torch.int8)))
        elif packed_in:
            dst.copy_(unpack_int4_fast(codes.reshape(-1), dst.numel()).reshape(dst.shape))
        else:
            dst.copy_(codes.to(torch.int8))

    def dequantized_weight(self) -> torch.Tensor:
        """Transient float weight ``ŵ = s * q`` (dtype of the ``scale`` buffer, shaped like the weight)."""
        return dequantize(self.unpacked_codes(), self.scale)

    @torch.no_grad()
    def requantize_(self, w_float: torch.Tensor, generator: Optional[torch.Generator] = None) -> None:
        """Re-quantize a float weight into the buffers with a fresh max-abs scale (spec 2.2 step 4.4).

        Args:
            w_float: floating tensor shaped like the weight (e.g. ``ŵ_t - η g_t``); it is not kept.
            generator: None = round to nearest; a ``torch.Generator`` = unbiased stochastic rounding
                (:func:`fedaqt.quant.quantize.quantize`), so a step smaller than half a code is not rounded away.

        Raises:
            ValueError: wrong shape or non-floating input.
        """
        if tuple(w_float.shape) != tuple(self.weight_shape):
            raise ValueError(
                f"{self.weight_key or type(self).__name__}: weight shape {tuple(w_float.shape)} != "
                f"{tuple(self.weight_shape)}"
            )
        codes, s = quantize(w_float, self.bits, self.granularity, generator)
        self._store_codes(codes)
        del codes
        self.scale.copy_(s.to(self.scale.dtype))

    # ---------------------------------------------------------------- gradient delivery
    def set_weight_grad_hook(self, fn: Optional[Callable], row_multiple: Optional[int] = None) -> None:
        """Install ``fn(layer, grad_w)`` to receive ``grad_w`` instead of accumulating it into ``weight_grad``.

        ``grad_w`` is a fresh float tensor shaped like the weight that the layer keeps no reference to (encode and
        drop it to free memory). ``fn=None`` restores accumulation.

        Args:
            fn: the hook, or None.
            row_multiple: None = ``fn(layer, grad_w)`` with the whole gradient. An int ``m >= 1`` = row blocks:
                ``fn(layer, rows, r0)`` with ``rows = grad_w[r0:r0 + len(rows)]``, in increasing ``r0`` covering all
                rows once per backward, every block but the last a multiple of ``m`` rows, so that the layer never
                holds the whole float gradient (:class:`QuantLinear` above :data:`WEIGHT_BLOCK_ELEMS` elements; the
                other layers deliver one block, ``r0 = 0``). The blocks' values equal the whole gradient's bitwise.

        Raises:
            TypeError: ``fn`` not callable. ValueError: ``row_multiple < 1``.
        """
        if fn is not None and not callable(fn):
            raise TypeError(f"weight-grad hook must be callable or None, got {type(fn).__name__}")
        if row_multiple is not None and (isinstance(row_multiple, bool) or int(row_multiple) < 1):
            raise ValueError(f"row_multiple must be an int >= 1 or None, got {row_multiple!r}")
        self._weight_grad_hook = fn
        self._weight_grad_rows = None if fn is None or row_multiple is None else int(row_multiple)

    def _weight_grad_row_step(self) -> Optional[int]:
        """Rows per delivered block (a multiple of the hook's ``row_multiple``), or None for whole gradients."""
        m = getattr(self, "_weight_grad_rows", None)
        if m is None or self._weight_grad_hook is None:
            return None
        step = _block_rows(int(self.weight_shape[0]), int(self.weight_shape[1:].numel()))
        return -(-step // m) * m

    def _deliver_weight_grad(self, grad_w: torch.Tensor) -> None:
        hook = self._weight_grad_hook
        if hook is not None:
            if getattr(self, "_weight_grad_rows", None) is not None:
                hook(self, grad_w, 0)
            else:
                hook(self, grad_w)
        elif self.weight_grad is None:
            self.weight_grad = grad_w
        else:
            self.weight_grad = self.weight_grad + grad_w

    def zero_weight_grad(self) -> None:
        """Drop the accumulated ``weight_grad`` (set it to None)."""
        self.weight_grad = None

    def _quant_repr(self) -> str:
        return f"bits={self.bits}, granularity={self.granularity!r}, weight_key={self.weight_key!r}"


# =============================================================================== Linear
#: the most weight elements a :class:`QuantLinear` materializes in float at once (forward: float codes of a block of
#: output rows; backward: ``ŵ`` of a block of input columns); 2^17 = 512 KiB in float32. A block changes which
#: output elements one matmul computes, never the dot product behind an element (each is the same sum over the
#: same reduction axis), so the results equal the unblocked product (tests/test_int4_packed.py checks bitwise).
WEIGHT_BLOCK_ELEMS = 1 << 17
#: the fewest rows / columns per block (thin matmuls may take other BLAS kernels with another summation order)
MIN_BLOCK = 128


def _block_rows(rows: int, cols: int) -> int:
    """Rows per block of a ``[rows, cols]`` weight (``>= rows``: one block), even when ``cols`` is odd so that a
    block of packed int4 rows starts on a byte."""
    step = max(MIN_BLOCK, WEIGHT_BLOCK_ELEMS // max(1, cols))
    if step >= rows:
        return rows
    nblocks = -(-rows // step)
    step = -(-rows // nblocks)  # balanced blocks: no thin last block
    if cols % 2 and step % 2:
        step += 1
    return step


def _code_rows(layer: "QuantLayer", stored: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    """int8 codes of weight rows ``r0:r1`` of a 2-D layer, from its stored codes (a packed layer unpacks only those
    rows' bytes; ``r0 * cols`` is even, see :func:`_block_rows`)."""
    if not layer.packs_codes:
        return stored[r0:r1]
    cols = int(layer.weight_shape[1])
    b0 = (r0 * cols) // 2
    n = (r1 - r0) * cols
    return unpack_int4_fast(stored[b0:b0 + packed_int4_nbytes(n)], n).reshape(r1 - r0, cols)


class _QuantLinearFn(torch.autograd.Function):
    """y = s_x s_w (q_x @ q_w^T) + b; saves only (q_x int8, stored q_w (int8, or the packed uint8 buffer), s_x,
    s_w)."""

    @staticmethod
    def forward(ctx, x, stored, w_scale, bias, anchor, layer):  # type: ignore[override]
        dtype = x.dtype
        xq, sx = quantize_activation(x, ACT_BITS)
        out_f, in_f = layer.weight_shape
        step = _block_rows(out_f, in_f)
        xf = xq.to(dtype)
        if step >= out_f:
            codes = layer.unpack_stored(stored)
            acc = xf @ codes.to(dtype).t()
            del codes
        else:  # output columns in blocks of weight rows: never the whole weight in float (same dot products)
            acc = xf.new_empty(*xf.shape[:-1], out_f)
            for o in range(0, out_f, step):
                rows = _code_rows(layer, stored, o, min(o + step, out_f))
                acc[..., o:o + rows.shape[0]] = xf @ rows.to(dtype).t()
                del rows
        del xf
        y = acc * (sx * w_scale.to(dtype))
        del acc
        if bias is not None:
            y = y + bias.to(dtype)
        ctx.save_for_backward(xq, stored, sx, w_scale)
        ctx.layer = layer
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        xq, stored, sx, w_scale = ctx.saved_tensors
        layer: QuantLayer = ctx.layer
        dtype = grad_y.dtype
        out_f, in_f = layer.weight_shape
        grad_x = grad_b = None
        if ctx.needs_input_grad[0]:
            codes = layer.unpack_stored(stored)
            step = _block_rows(in_f, out_f)
            if step >= in_f:
                w_hat = dequantize(codes, w_scale.to(dtype))
                grad_x = grad_y @ w_hat
                del w_hat
            else:  # grad_x in blocks of input columns: ŵ[:, j0:j1] only (same dot products)
                grad_x = grad_y.new_empty(*grad_y.shape[:-1], in_f)
                for j in range(0, in_f, step):
                    w_hat = dequantize(codes[:, j:j + step], w_scale.to(dtype))
                    grad_x[..., j:j + step] = grad_y @ w_hat
                    del w_hat
            del codes
        gy2 = grad_y.reshape(-1, out_f)
        if layer.weight_requires_grad:
            x_hat = xq.reshape(-1, in_f).to(dtype) * sx.to(dtype)
            step = layer._weight_grad_row_step()
            if step is None or step >= out_f:
                grad_w = gy2.t() @ x_hat
                del x_hat
                layer._deliver_weight_grad(grad_w)
                del grad_w
            else:  # row blocks straight to the hook: never the whole float gradient (same dot products)
                hook = layer._weight_grad_hook
                for o in range(0, out_f, step):
                    rows = gy2[:, o:o + step].t() @ x_hat
                    hook(layer, rows, o)
                    del rows
                del x_hat
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_b = gy2.sum(0)
        return grad_x, None, None, grad_b, None, None


class QuantLinear(QuantLayer):
    """Drop-in for :class:`torch.nn.Linear` holding int8/int4 weight codes + scale (spec 2.2 step 2).

    Args:
        in_features, out_features: as ``nn.Linear``; the virtual weight is ``[out_features, in_features]``.
        bias: create a float bias parameter ``[out_features]``.
        bits: weight bit-width, 8 or 4 (activations are always int8).
        granularity: ``"tensor"`` (scale 0-d) or ``"channel"`` (scale ``[out_features]``).
        dtype, device: of the scale buffer and bias (codes are int8).

    Shapes: input ``[*, in_features]`` floating -> output ``[*, out_features]`` in the input's dtype.

    Raises:
        ValueError: bad bits/granularity.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        bits: int = 8,
        granularity: str = "tensor",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self._init_quant((self.out_features, self.in_features), bits, granularity, dtype, device)
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.out_features, dtype=dtype or torch.get_default_dtype(),
                                                 device=device))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_float(cls, linear: nn.Linear, bits: int, granularity: str, weight_key: str = "") -> "QuantLinear":
        """Build from an ``nn.Linear``: quantize its weight (spec 2.2 step 1) and reuse its bias Parameter."""
        return cls.from_float_weight(linear.weight, linear.bias, bits, granularity, weight_key)

    @classmethod
    def from_float_weight(cls, weight: torch.Tensor, bias: Optional[torch.Tensor], bits: int, granularity: str,
                          weight_key: str = "") -> "QuantLinear":
        """Build from a float weight ``[out, in]`` (quantized with a max-abs scale in its dtype) and an optional
        bias (a Parameter is reused as is, a plain tensor is copied into a new Parameter)."""
        w = weight.detach()
        if w.dim() != 2:
            raise ValueError(f"{weight_key or 'QuantLinear'}: weight must be 2-D [out, in], got {tuple(w.shape)}")
        m = cls(w.shape[1], w.shape[0], bias=False, bits=bits, granularity=granularity, dtype=w.dtype,
                device=w.device)
        if bias is not None:
            m.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias.detach().clone())
        m.requantize_(w)
        m.weight_key = weight_key
        return m

    def linear_with_bias(self, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """Quantized linear map with an external float ``bias`` (used by :class:`QuantMultiheadAttention`)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{self.weight_key or 'QuantLinear'}: input last dim {x.shape[-1]} != "
                             f"in_features {self.in_features}")
        anchor = _grad_anchor() if self.weight_requires_grad else None
        return _QuantLinearFn.apply(x, self.stored_codes(), self.scale, bias, anchor, self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[*, in_features]`` float -> ``[*, out_features]`` (input dtype); int8 activations, int weights.

        Raises:
            ValueError: last input dim != ``in_features``.
        """
        return self.linear_with_bias(x, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {self._quant_repr()}")


# =============================================================================== Conv1d / Conv2d
class _QuantConvFn(torch.autograd.Function):
    """y = s_x s_w convNd(q_x, q_w) + b for a :class:`_QuantConvNd` layer (N = ``layer._dims``, 1 or 2); saves only
    (q_x int8, stored q_w (int8, or the packed uint8 buffer), s_x, s_w)."""

    @staticmethod
    def forward(ctx, x, stored, w_scale, bias, anchor, layer):  # type: ignore[override]
        dtype = x.dtype
        xq, sx = quantize_activation(x, ACT_BITS)
        codes = layer.unpack_stored(stored)
        acc = layer._conv(xq.to(dtype), codes.to(dtype), None, layer.stride, layer.padding, layer.dilation,
                          layer.groups)
        del codes
        y = acc * broadcast_scale(sx * w_scale.to(dtype), 1 + layer._dims)
        del acc
        if bias is not None:
            y = y + bias.to(dtype).reshape(1, -1, *([1] * layer._dims))
        ctx.save_for_backward(xq, stored, sx, w_scale)
        ctx.layer = layer
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        xq, stored, sx, w_scale = ctx.saved_tensors
        layer: _QuantConvNd = ctx.layer
        dtype = grad_y.dtype
        grad_x = grad_b = None
        args = (layer.stride, layer.padding, layer.dilation, layer.groups)
        if ctx.needs_input_grad[0]:
            w_hat = dequantize(layer.unpack_stored(stored), w_scale.to(dtype))
            grad_x = layer._conv_input(xq.shape, w_hat, grad_y, *args)
            del w_hat
        if layer.weight_requires_grad:
            x_hat = xq.to(dtype) * sx.to(dtype)
            grad_w = layer._conv_weight(x_hat, layer.weight_shape, grad_y, *args)
            del x_hat
            layer._deliver_weight_grad(grad_w)
            del grad_w
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_b = grad_y.sum(dim=(0, *range(2, 2 + layer._dims)))
        return grad_x, None, None, grad_b, None, None


def _ntuple(v, n: int, name: str) -> tuple[int, ...]:
    """An int or an ``n``-tuple/list of ints -> ``n``-tuple of ints. Raises ValueError naming ``name`` and ``v``."""
    if isinstance(v, bool):
        raise ValueError(f"{name} must be an int or a {n}-tuple of ints, got {v!r}")
    if isinstance(v, (tuple, list)):
        if len(v) != n:
            raise ValueError(f"{name} must be an int or a {n}-tuple, got {v!r}")
        return tuple(int(e) for e in v)
    return (int(v),) * n


class _QuantConvNd(QuantLayer):
    """What :class:`QuantConv1d` and :class:`QuantConv2d` share: the native forward/backward (:class:`_QuantConvFn`),
    argument checks, :meth:`from_float` and the repr. A subclass sets ``_dims`` (spatial dims), ``_float_type``
    (the ``nn.ConvNd`` it replaces), ``_conv`` / ``_conv_input`` / ``_conv_weight`` (``F.convNd`` and
    ``torch.nn.grad.convNd_input/weight``) and ``_layout`` (the spatial axes' names in error messages)."""

    _dims: int
    _float_type: type
    _conv: Callable
    _conv_input: Callable
    _conv_weight: Callable
    _layout: str

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, ...],
        stride: int | tuple[int, ...] = 1,
        padding: int | tuple[int, ...] = 0,
        dilation: int | tuple[int, ...] = 1,
        groups: int = 1,
        bias: bool = True,
        bits: int = 8,
        granularity: str = "tensor",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        cls = type(self).__name__
        if isinstance(padding, str):
            raise ValueError(f"{cls} needs an integer padding, got {padding!r} ({cls}.from_float and "
                             "convert_to_quantized resolve 'same'/'valid')")
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels={in_channels} and out_channels={out_channels} must be divisible by "
                             f"groups={groups}")
        n = self._dims
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.kernel_size = _ntuple(kernel_size, n, "kernel_size")
        self.stride = _ntuple(stride, n, "stride")
        self.padding = _ntuple(padding, n, "padding")
        self.dilation = _ntuple(dilation, n, "dilation")
        self.groups = int(groups)
        for what, v, lo in (("kernel_size", self.kernel_size, 1), ("stride", self.stride, 1),
                            ("padding", self.padding, 0), ("dilation", self.dilation, 1)):
            if min(v) < lo:
                raise ValueError(f"{cls}: {what} must be >= {lo}, got {v}")
        shape = (self.out_channels, self.in_channels // self.groups) + self.kernel_size
        self._init_quant(shape, bits, granularity, dtype, device)
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.out_channels, dtype=dtype or torch.get_default_dtype(),
                                                 device=device))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_float(cls, conv: nn.Module, bits: int, granularity: str, weight_key: str = "") -> "_QuantConvNd":
        """Build from an ``nn.Conv1d`` / ``nn.Conv2d`` (``padding_mode='zeros'``): quantize its kernel (max-abs
        scale in the weight's dtype, spec 2.2 step 1) and reuse its bias Parameter.

        Raises:
            ValueError: unsupported ``padding_mode`` or a ``"same"`` padding that is not symmetric (even effective
                kernel); the message names ``weight_key``.
        """
        name = weight_key or cls._float_type.__name__
        if conv.padding_mode != "zeros":
            raise ValueError(f"{name}: padding_mode {conv.padding_mode!r} is not supported (only 'zeros')")
        padding = conv.padding
        if isinstance(padding, str):
            if padding == "valid":
                padding = (0,) * cls._dims
            else:  # "same" (stride 1 enforced by nn.ConvNd)
                totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
                if any(t % 2 for t in totals):
                    raise ValueError(f"{name}: padding='same' with an even effective kernel "
                                     f"{tuple(t + 1 for t in totals)} is asymmetric and not supported")
                padding = tuple(t // 2 for t in totals)
        w = conv.weight.detach()
        m = cls(conv.in_channels, conv.out_channels, tuple(conv.kernel_size), stride=tuple(conv.stride),
                padding=tuple(padding), dilation=tuple(conv.dilation), groups=conv.groups, bias=False, bits=bits,
                granularity=granularity, dtype=w.dtype, device=w.device)
        if conv.bias is not None:
            m.bias = conv.bias
        m.requantize_(w)
        m.weight_key = weight_key
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C_in, *spatial]`` (or unbatched ``[C_in, *spatial]``) float -> ``[B, C_out, *spatial_out]`` in the
        input dtype.

        Raises:
            ValueError: wrong input rank or channel count.
        """
        unbatched = x.dim() == 1 + self._dims
        if unbatched:
            x = x.unsqueeze(0)
        if x.dim() != 2 + self._dims or x.shape[1] != self.in_channels:
            raise ValueError(f"{self.weight_key or type(self).__name__}: expected input [B, {self.in_channels}, "
                             f"{self._layout}], got {tuple(x.shape)}")
        anchor = _grad_anchor() if self.weight_requires_grad else None
        y = _QuantConvFn.apply(x, self.stored_codes(), self.scale, self.bias, anchor, self)
        return y.squeeze(0) if unbatched else y

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding}")
        if self.dilation != (1,) * self._dims:
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        return s + f", bias={self.bias is not None}, {self._quant_repr()}"


class QuantConv1d(_QuantConvNd):
    """Drop-in for :class:`torch.nn.Conv1d` (zero padding) holding int8/int4 kernel codes + scale (spec 2.2).

    Covers the Conformer conv module: pointwise (``kernel_size=1``) and depthwise (``groups=channels``) convs.
    The virtual weight is ``[out_channels, in_channels // groups, kernel_size]``; forward/backward are native
    (integer operands, a custom autograd Function saving only the int8 input codes, the int8 kernel codes and the
    two scales).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias: as ``nn.Conv1d``
            (each an int or a 1-tuple; integer padding only, :meth:`from_float` resolves ``"same"``/``"valid"``).
        bits: 8 or 4. granularity: ``"tensor"`` or ``"channel"`` (scale ``[out_channels]``).
        dtype, device: of the scale buffer and bias (codes are int8).

    Shapes: input ``[B, C_in, L]`` (or unbatched ``[C_in, L]``) -> ``[B, C_out, L_out]`` in the input's dtype.

    Raises:
        ValueError: bad bits/granularity/groups/padding/kernel values (the message names the value).
    """

    _dims = 1
    _float_type = nn.Conv1d
    _conv = staticmethod(F.conv1d)
    _conv_input = staticmethod(torch.nn.grad.conv1d_input)
    _conv_weight = staticmethod(torch.nn.grad.conv1d_weight)
    _layout = "L"


class QuantConv2d(_QuantConvNd):
    """Drop-in for :class:`torch.nn.Conv2d` (zero padding) holding int8/int4 kernel codes + scale (spec 2.2).

    The virtual weight is ``[out_channels, in_channels // groups, kH, kW]``; forward/backward are native (integer
    operands, a custom autograd Function saving only the int8 input codes, the int8 kernel codes and the two
    scales), covering stride, padding, dilation, groups (incl. depthwise ``groups=in_channels``) and bias.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias: as ``nn.Conv2d``
            (each of ``kernel_size``/``stride``/``padding``/``dilation`` an int or a 2-tuple; integer padding only,
            :meth:`from_float` resolves ``"same"``/``"valid"``).
        bits: 8 or 4 (int4 codes in ``[-7, 7]`` held in int8). granularity: ``"tensor"`` (0-d scale) or
            ``"channel"`` (scale ``[out_channels]``).
        dtype, device: of the scale buffer and bias (codes are int8).

    Shapes: input ``[B, C_in, H, W]`` (or unbatched ``[C_in, H, W]``) floating -> ``[B, C_out, H_out, W_out]`` in
    the input's dtype.

    Raises:
        ValueError: bad bits/granularity/groups/padding/kernel values (the message names the value).
    """

    _dims = 2
    _float_type = nn.Conv2d
    _conv = staticmethod(F.conv2d)
    _conv_input = staticmethod(torch.nn.grad.conv2d_input)
    _conv_weight = staticmethod(torch.nn.grad.conv2d_weight)
    _layout = "H, W"


# =============================================================================== MultiheadAttention
class QuantMultiheadAttention(nn.Module):
    """Drop-in for :class:`torch.nn.MultiheadAttention` *self-attention* with quantized projections (spec 2.1).

    Holds ``in_proj`` (:class:`QuantLinear` ``E -> 3E`` without its own bias; the float bias is the parameter
    ``in_proj_bias`` on this module, as in ``nn.MultiheadAttention``) and ``out_proj`` (:class:`QuantLinear` with
    bias ``out_proj.bias``). Their ``weight_key`` are ``<prefix>in_proj_weight`` and ``<prefix>out_proj.weight``,
    so float parameter names equal those of ``nn.MultiheadAttention``. Attention itself runs in float with
    :func:`torch.nn.functional.scaled_dot_product_attention`.

    Args:
        embed_dim: ``E``; num_heads: ``H`` (``E % H == 0``); dropout: attention dropout (training only);
        bias: create ``in_proj_bias [3E]`` and ``out_proj.bias [E]``; batch_first: inputs ``[B, T, E]``;
        bits: 8 or 4; granularity: ``"tensor"`` or ``"channel"``.

    Forward (as torchaudio's ConformerLayer calls it): ``forward(query, key, value, key_padding_mask=None,
    need_weights=True, attn_mask=None, average_attn_weights=True, is_causal=False) -> (output, weights|None)``
    with ``query``/``key``/``value`` the same tensor ``[T, B, E]`` (``[B, T, E]`` if ``batch_first``; unbatched
    ``[T, E]`` accepted). ``key_padding_mask`` ``[B, S]`` (bool True = ignore, or additive float),
    ``attn_mask`` ``[T, S]`` or ``[B*H, T, S]`` (bool True = not allowed, or additive float).

    Raises:
        ValueError: ``embed_dim`` not divisible by ``num_heads``.
        NotImplementedError: ``query``, ``key`` and ``value`` are not the same tensor (cross-attention would need
            several passes through ``in_proj`` and several weight-gradient deliveries per backward).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        bits: int = 8,
        granularity: str = "tensor",
        batch_first: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        self.embed_dim = int(embed_dim)
        self.num_heads = int(num_heads)
        self.head_dim = self.embed_dim // self.num_heads
        self.dropout = float(dropout)
        self.batch_first = bool(batch_first)
        self.bits = int(bits)
        self.granularity = granularity
        self.in_proj = QuantLinear(embed_dim, 3 * embed_dim, bias=False, bits=bits, granularity=granularity,
                                   dtype=dtype, device=device)
        self.out_proj = QuantLinear(embed_dim, embed_dim, bias=bias, bits=bits, granularity=granularity,
                                    dtype=dtype, device=device)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim, dtype=dtype or torch.get_default_dtype(),
                                                         device=device))
        else:
            self.register_parameter("in_proj_bias", None)
        self.set_prefix("")

    def set_prefix(self, prefix: str) -> None:
        """Set the ``weight_key`` of both projections from this module's qualified name prefix (``"a.b."``)."""
        self.in_proj.weight_key = f"{prefix}in_proj_weight"
        self.out_proj.weight_key = f"{prefix}out_proj.weight"

    @classmethod
    def from_float(cls, mha: nn.MultiheadAttention, bits: int, granularity: str,
                   prefix: str = "") -> "QuantMultiheadAttention":
        """Build from an ``nn.MultiheadAttention`` with packed in-projection (``kdim == vdim == embed_dim``), no
        ``bias_k``/``bias_v`` and ``add_zero_attn=False``; biases are reused, weights quantized.

        Raises:
            ValueError: an unsupported configuration (the message names it).
        """
        name = prefix.rstrip(".") or "MultiheadAttention"
        if not mha._qkv_same_embed_dim or mha.in_proj_weight is None:
            raise ValueError(f"{name}: kdim/vdim different from embed_dim are not supported")
        if mha.bias_k is not None or mha.bias_v is not None:
            raise ValueError(f"{name}: add_bias_kv=True is not supported")
        if mha.add_zero_attn:
            raise ValueError(f"{name}: add_zero_attn=True is not supported")
        w = mha.in_proj_weight.detach()
        m = cls(mha.embed_dim, mha.num_heads, dropout=mha.dropout, bias=False, bits=bits, granularity=granularity,
                batch_first=mha.batch_first, dtype=w.dtype, device=w.device)
        m.in_proj = QuantLinear.from_float_weight(w, None, bits, granularity)
        m.out_proj = QuantLinear.from_float(mha.out_proj, bits, granularity)
        if mha.in_proj_bias is not None:
            m.in_proj_bias = mha.in_proj_bias
        m.train(mha.training)
        m.set_prefix(prefix)
        return m

    def quant_children(self) -> list[QuantLinear]:
        """``[in_proj, out_proj]``."""
        return [self.in_proj, self.out_proj]

    @staticmethod
    def _float_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
        return mask.to(dtype)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: Optional[torch.Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[torch.Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Self-attention; see the class docstring for shapes and masks.

        Returns:
            ``(output [T, B, E] (or [B, T, E] if batch_first), weights)``; ``weights`` is None unless
            ``need_weights`` (then ``[B, T, S]`` averaged over heads, or ``[B, H, T, S]``).
        """
        if not (query is key and key is value):
            raise NotImplementedError(
                "QuantMultiheadAttention supports self-attention only (query, key and value must be the same tensor)"
            )
        x = query
        unbatched = x.dim() == 2
        if unbatched:
            x = x.unsqueeze(1) if not self.batch_first else x.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if self.batch_first:
            x = x.transpose(0, 1)
        T, B, E = x.shape
        if E != self.embed_dim:
            raise ValueError(f"expected embed_dim {self.embed_dim}, got input {tuple(query.shape)}")
        H, Dh = self.num_heads, self.head_dim
        qkv = self.in_proj.linear_with_bias(x, self.in_proj_bias)  # [T, B, 3E]
        q, k, v = qkv.chunk(3, dim=-1)
        del qkv

        def heads(t: torch.Tensor) -> torch.Tensor:  # [T, B, E] -> [B, H, T, Dh]
            return t.reshape(T, B, H, Dh).permute(1, 2, 0, 3)

        q, k, v = heads(q), heads(k), heads(v)
        dtype = q.dtype
        mask: Optional[torch.Tensor] = None
        if attn_mask is not None:
            am = self._float_mask(attn_mask, dtype)
            if am.dim() == 2:
                am = am.reshape(1, 1, T, T)
            elif am.dim() == 3:
                am = am.reshape(B, H, T, T)
            else:
                raise ValueError(f"attn_mask must be [T, S] or [B*H, T, S], got {tuple(attn_mask.shape)}")
            mask = am
        elif is_causal:
            mask = torch.zeros(T, T, dtype=dtype, device=q.device).masked_fill(
                torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf")).reshape(1, 1, T, T)
        if key_padding_mask is not None:
            if tuple(key_padding_mask.shape) != (B, T):
                raise ValueError(f"key_padding_mask must be [B, S] = {(B, T)}, got {tuple(key_padding_mask.shape)}")
            kpm = self._float_mask(key_padding_mask, dtype).reshape(B, 1, 1, T)
            mask = kpm if mask is None else mask + kpm
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(Dh)
            if mask is not None:
                scores = scores + mask
            attn = torch.softmax(scores, dim=-1)
            del scores
            weights = attn.mean(dim=1) if average_attn_weights else attn
            if p > 0:
                attn = F.dropout(attn, p=p)
            out = attn @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        out = out.permute(2, 0, 1, 3).reshape(T, B, E)
        out = self.out_proj(out)
        if self.batch_first:
            out = out.transpose(0, 1)
        if unbatched:
            out = out.squeeze(0) if self.batch_first else out.squeeze(1)
            if weights is not None:
                weights = weights.squeeze(0)
        return out, weights

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, "
                f"batch_first={self.batch_first}, bits={self.bits}, granularity={self.granularity!r}")
