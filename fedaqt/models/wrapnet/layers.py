"""WrapNet layers (spec §3.1-3.3, §3.5): :class:`WrapConv2d` / :class:`WrapLinear` (``conv(x_q, w_q) -> z_q ->
c(z_q) -> x s_w s_x``), the federated client's code-holding weight :class:`WrapWeightCodes` +
:func:`quantize_wrap_layers` (spec §2.2 applied to WrapNet: int8 codes + float32 scale, no float copy), and the
model-level helpers: :func:`wrap_layers`, mode switches :func:`set_wrapnet_mode` / :func:`wrapnet_mode`, summed
penalties/regularizers and overflow statistics."""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fedaqt.quant.layers import QuantLayer, _grad_anchor
from fedaqt.quant.quantize import check_granularity, dequantize, qmax

from .accumulator import (
    NO_WRAP_BITS, _FLOAT32_EXACT, cyclic, int_conv2d, int_linear, overflow_mask, overflow_penalty, wrap_b,
)
from .carries import CarryVariance, _carries_from_u
from .quantizers import _max_abs_code, _ste, quantize_activation, quantize_weight, ste_round


# ============================================================================ §3.1-3.3 WrapNet layers
def _same_tensor(a: torch.Tensor, b: torch.Tensor | None) -> bool:
    return b is not None and a.dtype == b.dtype and a.shape == b.shape and a.data_ptr() == b.data_ptr()


@contextlib.contextmanager
def _integer_saved_tensors(w_op: torch.Tensor | None, x_op: torch.Tensor | None, a: int) -> Iterator[None]:
    """While active, autograd stores the integer-valued weight operand ``w_op`` (codes in [-127, 127]) as int8 and
    the a-bit activation codes ``x_op`` (``[0, 2^a - 1]``) as uint8 (int32 above 8 bits) instead of float copies,
    and restores the float values exactly when backward needs them (spec §2.2: only integer tensors are kept for
    backward). ``None`` operands are stored as usual."""
    x_dtype = torch.uint8 if a <= 8 else torch.int32

    def pack(t: torch.Tensor) -> Any:
        if _same_tensor(t, w_op):
            return ("int", t.to(torch.int8), t.dtype)
        if _same_tensor(t, x_op):
            return ("int", t.to(x_dtype), t.dtype)
        return ("keep", t, None)

    def unpack(packed: Any) -> torch.Tensor:
        kind, t, dtype = packed
        return t.to(dtype) if kind == "int" else t

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


class _CodesWrapWeightFn(torch.autograd.Function):
    """``(codes, scale) -> (w_q, s_w)``: the spec §3.1 weight quantizer applied to ``ŵ = s*q``.

    Saves only the codes and the scale; backward rebuilds ``ŵ`` transiently, back-propagates through the same
    quantizer (STE, :func:`quantize_weight`) and delivers ``dL/dŵ`` to the holder (hook or ``weight_grad``)."""

    @staticmethod
    def forward(ctx, codes, scale, anchor, holder, mode):  # type: ignore[override]
        w_hat = dequantize(codes, scale)
        w_q, s_w = quantize_weight(w_hat, mode)
        ctx.save_for_backward(codes, scale)
        ctx.holder, ctx.mode = holder, mode
        return w_q.detach(), s_w.detach()

    @staticmethod
    def backward(ctx, grad_wq, grad_sw):  # type: ignore[override]
        codes, scale = ctx.saved_tensors
        holder = ctx.holder
        if holder.weight_requires_grad:
            with torch.enable_grad():
                w_hat = dequantize(codes, scale).requires_grad_(True)
                w_q, s_w = quantize_weight(w_hat, ctx.mode)
                outs = [(o, g) for o, g in ((w_q, grad_wq), (s_w, grad_sw)) if g is not None and o.requires_grad]
                if outs:
                    (grad_w,) = torch.autograd.grad([o for o, _ in outs], [w_hat], [g for _, g in outs],
                                                    allow_unused=True)
                else:
                    grad_w = None
            del w_hat, w_q, s_w
            holder._deliver_weight_grad(torch.zeros(holder.weight_shape, dtype=scale.dtype) if grad_w is None
                                        else grad_w.detach())
        return None, None, None, None, None


class WrapWeightCodes(QuantLayer):
    """Client-side weight of a WrapNet layer: int8 codes (int4 values in ``[-7, 7]`` too) + float32 scale of the
    broadcast, exactly like :class:`fedaqt.quant.layers.QuantLayer` (no float weight is stored).

    It is a child ``qweight`` of its WrapNet layer with ``weight_key = "<layer>.weight"``, so the client code
    loads it with ``load_quantized``, trains it through the weight-grad hook (FedSGD) or ``requantize_`` (FedAvg)
    and uploads ``dL/dŵ``. :meth:`wrap_weight` turns ``ŵ = s*q`` into the layer's binary/ternary/multi-bit
    weights with the same quantizer the server model uses (:func:`quantize_weight`). Its 4-bit codes stay one int8
    per code (``pack_int4_codes = False``; the packed layout of issue 17 is for the native quantized layers).

    Args:
        weight_shape: ``[out, ...]`` of the float weight.
        bits: broadcast bit-width, 8 or 4. granularity: ``"tensor"`` or ``"channel"``.
    """

    pack_int4_codes = False

    def __init__(self, weight_shape: Sequence[int], bits: int, granularity: str,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        self._init_quant(tuple(int(d) for d in weight_shape), bits, granularity, dtype, device)

    @classmethod
    def from_float(cls, weight: torch.Tensor, bits: int, granularity: str, weight_key: str = "") -> "WrapWeightCodes":
        """Codes + scale of ``weight`` (float32 max-abs quantization, as the broadcast encoder does)."""
        w = weight.detach().to(torch.float32)
        m = cls(tuple(w.shape), bits, granularity, dtype=torch.float32, device=w.device)
        m.requantize_(w)
        m.weight_key = weight_key
        return m

    def wrap_weight(self, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``quantize_weight(s*q, mode)``: (w_q shaped like the weight, s_w ``[out]``), float32; the gradient of
        the loss w.r.t. ``ŵ = s*q`` is delivered once per backward (see :class:`QuantLayer`)."""
        anchor = _grad_anchor() if self.weight_requires_grad else None
        return _CodesWrapWeightFn.apply(self.codes, self.scale, anchor, self, mode)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - the owning layer calls wrap_weight
        raise RuntimeError("WrapWeightCodes is driven by its WrapNet layer (wrap_weight)")

    def extra_repr(self) -> str:
        return f"shape={tuple(self.weight_shape)}, {self._quant_repr()}"


def quantize_wrap_layers(model: nn.Module, bits: int, granularity: str) -> nn.Module:
    """Client model: replace, in place, every WrapNet layer's float ``weight`` by a :class:`WrapWeightCodes`
    child ``qweight`` (codes + scale at ``bits``/``granularity``, ``weight_key = "<layer>.weight"``).

    Afterwards the model holds no float copy of those weights; load broadcasts with
    ``fedaqt.quant.wire.load_client_broadcast``. Layers already converted are left alone.

    Args:
        model: a model with WrapNet layers (modified in place and returned).
        bits: 8 or 4. granularity: ``"tensor"`` or ``"channel"``.

    Raises:
        ValueError: bad ``bits`` or ``granularity``.
    """
    qmax(bits)
    check_granularity(granularity)
    for name, layer in wrap_layers(model):
        if layer.holds_codes:
            continue
        holder = WrapWeightCodes.from_float(layer.weight, bits, granularity, weight_key=f"{name}.weight")
        holder.train(layer.training)
        del layer.weight
        layer.qweight = holder
    return model


class _WrapMixin:
    """Shared state and forward of :class:`WrapConv2d` / :class:`WrapLinear` (spec §3.1-3.3, §3.5)."""

    weight: nn.Parameter

    def _init_wrap(self, weight_quant: str, b: int, k: float, act_bits: int, persistent: bool) -> None:
        quantize_weight(torch.zeros(1, 1), weight_quant)  # validates the name
        self.weight_quant = weight_quant
        self.b = int(b)  # accumulator bits the cyclic activation, penalty and overflow rate refer to
        self.k = float(k)
        self.act_quant = False
        self.cyclic = False
        self.acc_bits = NO_WRAP_BITS
        self.carry_mode = "none"  # "none" | "simulate" (neighbor-lane carries) | "buffer" (7-bit lanes)
        self.carry_lanes = 4
        self.carry_correct = True
        self.track_carries = False
        # s_x = 0 means "not calibrated": float activations, no integer units.
        self.register_buffer("s_x", torch.zeros(()), persistent=persistent)
        self.register_buffer("act_bits", torch.tensor(float(act_bits)), persistent=persistent)
        self.carry_reg: CarryVariance | None = None
        self.last_penalty: torch.Tensor | None = None
        self.last_carry_reg: torch.Tensor | None = None
        self.last_carries: torch.Tensor | None = None
        self.reset_overflow_stats()

    # -- statistics
    def reset_overflow_stats(self) -> None:
        self.overflow_count = 0
        self.overflow_total = 0

    @property
    def effective_bits(self) -> int:
        """Lane/accumulator bits actually used: ``b - 1`` with a buffer bit (§3.5), else ``b``."""
        return self.b - 1 if self.carry_mode == "buffer" else self.b

    def _op(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    def _int_op(self, x_q: torch.Tensor, w_q: torch.Tensor, acc_bits: int) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def _fan_in(self) -> int:
        return int(math.prod(self.weight_shape[1:]))

    @property
    def weight_shape(self) -> torch.Size:
        """Shape of the layer's weight ``[out, ...]`` (float parameter or client codes)."""
        codes = self._modules.get("qweight")
        return codes.weight_shape if codes is not None else self.weight.shape

    @property
    def holds_codes(self) -> bool:
        """True on a client model after :func:`quantize_wrap_layers`: the weight lives only as integer codes +
        float scale in the child :class:`WrapWeightCodes` ``qweight`` (no float weight parameter)."""
        return self._modules.get("qweight") is not None

    def quantized_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The weights this layer computes with: ``(w_q, s_w)`` of spec §3.1 for ``weight_quant``.

        Float layer: ``quantize_weight(self.weight, weight_quant)`` (STE gradient into ``weight``). Client layer
        (:attr:`holds_codes`): the same quantizer applied to the dequantized broadcast ``ŵ = s*q``
        (:meth:`WrapWeightCodes.wrap_weight`; the gradient ``dL/dŵ`` goes to the codes holder's weight-grad hook).

        Returns:
            (w_q like the weight, integer-valued floats; s_w ``[out]``).
        """
        if self.holds_codes:
            return self.qweight.wrap_weight(self.weight_quant)
        return quantize_weight(self.weight, self.weight_quant)

    def _lane_shift(self, n: torch.Tensor) -> torch.Tensor:
        """Carries entering each lane: lanes are consecutive output channels, ``carry_lanes`` per register; lane j
        receives the carry count of lane j-1, lane 0 of each register receives none ([CHOICE], spec §3.5)."""
        prev = torch.roll(n, shifts=1, dims=1)
        ch = torch.arange(n.shape[1], device=n.device)
        first = (ch % self.carry_lanes == 0).reshape(1, -1, *([1] * (n.dim() - 2)))
        return torch.where(first, torch.zeros_like(prev), prev)

    def _carries(self, x_q: torch.Tensor, w_q: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Per-neuron carry counts (Algorithm 1 on ``u = z + 2^b * #negative products``), exact forward, tanh
        surrogate gradient (§3.5). Negative products are ``w < 0`` times ``x > 0`` (``x_q >= 0``), a convolution."""
        bits = self.effective_bits
        neg = self._op((x_q.detach() > 0).to(z.dtype), (w_q.detach() < 0).to(z.dtype))
        # (1 - tanh(w x))/2 summed = (L - op(tanh x, w))/2 for w in {-1,0,1}; only its gradient is used.
        soft = -0.5 * self._op(torch.tanh(x_q), torch.sign(w_q.detach()) + (w_q - w_q.detach()))
        u = z + float(2 ** bits) * _ste(neg, soft)
        return _carries_from_u(u, bits, iterations=3)

    def _wrap_forward(self, x: torch.Tensor) -> torch.Tensor:
        w_q, s_w = self.quantized_weight()
        s_w = s_w.to(x.dtype)
        calibrated = bool(self.s_x > 0)
        if not calibrated:
            if self.act_quant or self.cyclic:
                raise RuntimeError(
                    "WrapNet layer has no activation step size s_x; run select_step_sizes()/calibrate_fixed_bits() "
                    "before enabling act_quant or cyclic"
                )
            return self._op(x, w_q) * self._bcast(s_w, x)
        s_x = float(self.s_x)
        a = int(self.act_bits)
        bits = self.effective_bits
        x_int = quantize_activation(x, s_x, a) if self.act_quant else x / s_x
        integer = self.act_quant and self.weight_quant != "float"
        work_dtype = x.dtype
        if integer and _max_abs_code(self.weight_quant) * (2 ** a - 1) * self._fan_in() >= _FLOAT32_EXACT:
            work_dtype = torch.float64  # keep the integer sum exact (§1.1)
        x_op, w_op = x_int.to(work_dtype), w_q.to(work_dtype)
        if self.holds_codes and torch.is_grad_enabled():
            # client: autograd keeps the integer operands as int8/uint8 codes, not as float copies (like QuantLayer)
            with _integer_saved_tensors(w_op if self.weight_quant != "float" else None,
                                        x_op if self.act_quant else None, a):
                z = self._op(x_op, w_op)
        else:
            z = self._op(x_op, w_op)
        del x_op, w_op
        if integer:
            z = ste_round(z)  # the float sum of integers is exact; rounding only removes any doubt
        if self.training:
            self.last_penalty = overflow_penalty(z, bits)
        else:
            self.last_penalty = None
        if not self.training:  # statistics for evaluation (training forwards are not counted)
            with torch.no_grad():
                self.overflow_count += int(overflow_mask(z, bits).sum())
                self.overflow_total += z.numel()
        need_carries = integer and (self.track_carries or self.carry_mode == "simulate")
        if need_carries:
            n = self._carries(x_int.to(work_dtype), w_q.to(work_dtype), z)
            self.last_carries = n.detach()
            if self.track_carries:
                if self.carry_reg is None or self.carry_reg.m_hat.numel() != n[0].numel():
                    self.carry_reg = CarryVariance(n[0].numel()).to(z.device)
                    self.carry_reg.train(self.training)
                self.last_carry_reg = self.carry_reg(n.flatten(1))
            if self.carry_mode == "simulate":
                n_in = self._lane_shift(n)
                if self.carry_correct and self.carry_reg is not None:
                    m = torch.round(self.carry_reg.m_hat).reshape(1, *n.shape[1:]).to(z.dtype)
                    n_in = n_in - self._lane_shift(m.expand_as(n))
                z = z + n_in
        acc = self.acc_bits if self.carry_mode != "buffer" else min(self.acc_bits, bits)
        if acc < NO_WRAP_BITS:
            z = wrap_b(z, acc)
        if self.cyclic:
            z = cyclic(z, bits, self.k)
        return z.to(x.dtype) * self._bcast(s_w * s_x, x)

    @staticmethod
    def _bcast(s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return s.reshape(1, -1, *([1] * (x.dim() - 2)))

    def wrap_repr(self) -> str:
        return (f"w={self.weight_quant}, b={self.b}, k={self.k}, act_quant={self.act_quant}, cyclic={self.cyclic}, "
                f"acc_bits={self.acc_bits}, a={int(self.act_bits)}, s_x={float(self.s_x):.4g}, carry={self.carry_mode}")


class WrapConv2d(_WrapMixin, nn.Conv2d):
    """WrapNet convolution (spec §3.1-3.2): quantize input with its own ``s_x`` (a bits), binary/ternary/multi-bit
    weights, exact integer ``z_q``, optional wrap to ``acc_bits``, cyclic ``c`` (b, k), rescale by ``s_w s_x``.

    Input float ``[B, C_in, H, W]`` (post-ReLU); output float ``[B, C_out, H', W']`` (feed to BatchNorm, then ReLU).
    No bias (BatchNorm follows). Before calibration (``s_x = 0``) it is a plain quantized-weight convolution with
    float activations (pipeline stage 1).

    Attributes (mode switches): ``act_quant``, ``cyclic``, ``acc_bits`` (32 = no wrap), ``k``, ``b``,
    ``carry_mode`` ("none" | "simulate" | "buffer"), ``track_carries`` (computes R_c into ``last_carry_reg``).
    After a forward: ``last_penalty`` (R_o of this layer, training forwards only); evaluation forwards add to
    ``overflow_count/overflow_total`` (see :func:`overflow_rates`).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, padding: int = 1,
                 weight_quant: str = "binary", b: int = 8, k: float = 2.0, act_bits: int = 8,
                 persistent_step_sizes: bool = True) -> None:
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self._init_wrap(weight_quant, b, k, act_bits, persistent_step_sizes)

    def _op(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, w, None, self.stride, self.padding, self.dilation, self.groups)

    def _int_op(self, x_q: torch.Tensor, w_q: torch.Tensor, acc_bits: int) -> torch.Tensor:
        return int_conv2d(x_q, w_q, self.stride, self.padding, acc_bits, self.dilation, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._wrap_forward(x)

    def extra_repr(self) -> str:
        return nn.Conv2d.extra_repr(self) + ", " + self.wrap_repr()


class WrapLinear(_WrapMixin, nn.Linear):
    """WrapNet fully connected layer; same semantics as :class:`WrapConv2d`. Input ``[B, in]``, output ``[B, out]``."""

    def __init__(self, in_features: int, out_features: int, weight_quant: str = "binary", b: int = 8, k: float = 2.0,
                 act_bits: int = 8, persistent_step_sizes: bool = True) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias=False)
        self._init_wrap(weight_quant, b, k, act_bits, persistent_step_sizes)

    def _op(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.linear(x, w)

    def _int_op(self, x_q: torch.Tensor, w_q: torch.Tensor, acc_bits: int) -> torch.Tensor:
        return int_linear(x_q, w_q, acc_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._wrap_forward(x)

    def extra_repr(self) -> str:
        return nn.Linear.extra_repr(self) + ", " + self.wrap_repr()


# ============================================================================ model-level helpers
def wrap_layers(model: nn.Module) -> list[tuple[str, _WrapMixin]]:
    """All WrapNet layers of ``model`` in forward-definition order, as (qualified name, layer)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _WrapMixin)]


_MODE_KEYS = ("act_quant", "cyclic", "acc_bits", "k", "track_carries", "carry_mode", "carry_correct")


def set_wrapnet_mode(model: nn.Module, **modes: Any) -> None:
    """Set mode switches on every WrapNet layer: ``act_quant`` (bool), ``cyclic`` (bool), ``acc_bits`` (int,
    32 = no wrap), ``k`` (float), ``track_carries`` (bool), ``carry_mode`` (str), ``carry_correct`` (bool).
    ``None`` values are ignored.

    Raises:
        ValueError: unknown key.
    """
    bad = sorted(set(modes) - set(_MODE_KEYS))
    if bad:
        raise ValueError(f"unknown WrapNet mode(s) {bad}; allowed: {', '.join(_MODE_KEYS)}")
    for _, layer in wrap_layers(model):
        for key, val in modes.items():
            if val is not None:
                setattr(layer, key, val)


@contextlib.contextmanager
def wrapnet_mode(model: nn.Module, **modes: Any) -> Iterator[nn.Module]:
    """Context manager: temporarily set modes (see :func:`set_wrapnet_mode`), restore them on exit."""
    saved = [(layer, {k: getattr(layer, k) for k in _MODE_KEYS}) for _, layer in wrap_layers(model)]
    try:
        set_wrapnet_mode(model, **modes)
        yield model
    finally:
        for layer, vals in saved:
            for k, v in vals.items():
                setattr(layer, k, v)


def model_overflow_penalty(model: nn.Module) -> torch.Tensor:
    """``R_o = sum_l R_o^l`` over the WrapNet layers' last training forward (spec §3.3); 0 if none recorded."""
    terms = [layer.last_penalty for _, layer in wrap_layers(model) if layer.last_penalty is not None]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def model_carry_regularizer(model: nn.Module) -> torch.Tensor:
    """``R_c`` = mean over layers with ``track_carries`` of their last carry variance (spec §3.5); 0 if none."""
    terms = [layer.last_carry_reg for _, layer in wrap_layers(model)
             if layer.track_carries and layer.last_carry_reg is not None]
    return torch.stack(terms).mean() if terms else torch.zeros(())


def reset_overflow_stats(model: nn.Module) -> None:
    for _, layer in wrap_layers(model):
        layer.reset_overflow_stats()


def overflow_rates(model: nn.Module) -> dict[str, float]:
    """Per-layer overflow rate (strict range, against each layer's effective b) accumulated since the last
    :func:`reset_overflow_stats`; layers that saw no calibrated forward are omitted."""
    return {n: layer.overflow_count / layer.overflow_total for n, layer in wrap_layers(model) if layer.overflow_total}
