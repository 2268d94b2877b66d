"""WrapNet: quantized networks that tolerate integer overflow in low-bit (e.g. 8-bit) accumulators (spec §3).

Everything in spec §3 (METHODS.md, rebuilt from chapter 2 of the seed dissertation / Ni et al. 2020) lives here:

* §3.1 fixed-point layer: ``wrap_b``; binary (XNOR, per-output-channel ``s_w = mean|w|``), ternary (TWN,
  ``Δ = 0.7 mean|w|``) and uniform multi-bit (§1) weight quantizers with the STE; unsigned a-bit activations
  ``x_q = clamp(round(x/s_x), 0, 2^a-1)``; exact integer accumulation (:func:`int_conv2d`, :func:`int_linear`)
  wrapped to b bits with two's-complement overflow, and a register-level emulation that wraps after every
  addition (:func:`accumulate_register`).
* §3.2 the smooth-modulo cyclic activation :func:`cyclic` (slope ``k``) and the WrapNet layers
  :class:`WrapConv2d` / :class:`WrapLinear`: ``conv(x_q, w_q) -> z_q -> c(z_q) -> x s_w s_x``; the networks add
  ``BN -> ReLU`` and the next layer quantizes with its own fixed ``s_x``.
* §3.3 overflow penalty :func:`overflow_penalty` and rate :func:`overflow_rate` (strict range, §3.7).
* §3.4 step-size selection by target overflow rate: :func:`select_layer_step_size`, :func:`select_step_sizes`.
* §3.5 carries: Algorithm 1 :func:`carry_count` (with the ``1[v<0]`` fix), the closed form, the differentiable
  surrogate, the carry-variance regularizer :class:`CarryVariance` (R_c, EMA running mean), packed adds with
  Python ints with and without buffer bits, and the hybrid procedure :func:`hybrid_carry_finetune`.
* §3.6 the four-stage pipeline :func:`train_pipeline`.
* Networks: :class:`WrapVGG7` and :class:`WrapResNet20` for 28x28x1 and 32x32x3 inputs, first and last layers
  full precision (§3.1), width configurable.
* Federated clients (spec §2.2 applied to WrapNet): :func:`quantize_wrap_layers` replaces each WrapNet layer's
  float weight by a :class:`WrapWeightCodes` child (int8 codes + float32 scale of the int8/int4 broadcast, a
  :class:`fedaqt.quant.layers.QuantLayer`), so the client holds no float copy; the layer binarizes/ternarizes
  ``ŵ = s*q`` with the same quantizer as the float layer, and autograd keeps its integer operands as int8/uint8.

Units: accumulator values ``z_q`` are in integer units (multiples of ``s_w * s_x``); bit-widths are bits.
Mode switches (per layer, set for a whole model with :func:`set_wrapnet_mode` / :func:`wrapnet_mode`):
``act_quant`` (False = float activations, still in integer units once ``s_x`` is set), ``cyclic`` (insert ``c``),
``acc_bits`` (accumulator width used at inference; 32 = no wrap), so the same trained weights can be evaluated
with a 32-bit and a b-bit accumulator.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedaqt.quant.layers import QuantLayer, _grad_anchor
from fedaqt.quant.quantize import check_granularity, dequantize, qmax

__all__ = [
    "wrap_b", "wrap_int", "cyclic", "cyclic_threshold", "CyclicActivation",
    "ste_round", "binarize_weight", "ternarize_weight", "uniform_quantize_weight", "quantize_weight",
    "quantize_activation", "int_conv2d", "int_linear", "accumulate_register",
    "overflow_penalty", "overflow_rate", "overflow_mask",
    "carry_count", "carry_count_closed_form", "carry_count_tensor", "carry_count_surrogate",
    "sequential_end_around_carries", "carry_variance", "CarryVariance",
    "pack_lanes", "unpack_lanes", "packed_add", "packed_add_buffered", "packed_accumulate",
    "WrapConv2d", "WrapLinear", "WrapWeightCodes", "quantize_wrap_layers", "WrapVGG7", "WrapResNet20", "build_wrapnet",
    "wrap_layers", "set_wrapnet_mode", "wrapnet_mode", "model_overflow_penalty", "model_carry_regularizer",
    "reset_overflow_stats", "overflow_rates", "StepChoice", "select_layer_step_size", "select_step_sizes",
    "calibrate_fixed_bits", "evaluate", "train_epochs", "train_pipeline", "measure_carries",
    "hybrid_carry_finetune",
]

NO_WRAP_BITS = 32  # acc_bits >= this means "no wrap" in the layers (a 32-bit accumulator never overflows here)
_FLOAT32_EXACT = 2 ** 24  # integers up to this magnitude are exact in float32


# ============================================================================ §3.1 wrap, §3.2 cyclic activation
def wrap_b(z: torch.Tensor, b: int) -> torch.Tensor:
    """b-bit two's-complement wrap-around ``mod(z + 2^(b-1), 2^b) - 2^(b-1)`` (spec §3.1).

    Args:
        z: any-shape tensor, integer or floating (real-valued inputs are allowed; autograd derivative is 1 a.e.).
        b: accumulator bits, >= 1.

    Returns:
        Tensor like ``z`` (same dtype) with values in ``[-2^(b-1), 2^(b-1))``.
    """
    if b < 1:
        raise ValueError(f"b={b!r} is not allowed; accumulator bits must be >= 1")
    half = 2 ** (b - 1)
    return torch.remainder(z + half, 2 * half) - half


def wrap_int(z: int, b: int) -> int:
    """Python-int version of :func:`wrap_b` (exact for any magnitude)."""
    half = 1 << (b - 1)
    return ((z + half) % (2 * half)) - half


def cyclic_threshold(b: int, k: float) -> float:
    """``T = k/(k+1) * 2^(b-1)``: the end of the identity part of the cyclic activation and its max |output|."""
    return k / (k + 1.0) * 2 ** (b - 1)


class _CyclicFn(torch.autograd.Function):
    """Fused forward/backward of the smooth modulo (fewer passes over large activations on CPU)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, b: int, k: float) -> torch.Tensor:  # type: ignore[override]
        half = float(2 ** (b - 1))
        t = cyclic_threshold(b, k)
        m = torch.remainder(z + half, 2 * half).sub_(half)
        outer = m.abs() > t
        ctx.save_for_backward(outer)
        ctx.k = k
        # outside the identity part: f(m) = k*2^(b-1)*sign(m) - k*m
        return torch.where(outer, (torch.sign(m) * half - m) * k, m)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (outer,) = ctx.saved_tensors
        return torch.where(outer, grad * (-ctx.k), grad), None, None


def cyclic(z: torch.Tensor, b: int = 8, k: float = 2.0) -> torch.Tensor:
    """Smooth-modulo cyclic activation ``c(z) = f(wrap_b(z))`` (spec §3.2, seed eq. in §2.3.1).

    ``f(m) = m`` for ``|m| <= T``, ``k 2^(b-1) - k m`` for ``m > T``, ``-k 2^(b-1) - k m`` for ``m < -T`` with
    ``T = k/(k+1) 2^(b-1)``. ``c`` is continuous, periodic with period ``2^b``, has range ``[-T, T]`` and
    autograd derivative 1 where ``|wrap_b(z)| <= T`` and ``-k`` elsewhere (the derivative of ``mod`` is 1 a.e.).

    Args:
        z: any-shape tensor in integer units (real values allowed). Integer dtypes are converted to float64
            (exact below 2^53).
        b: accumulator bits the activation emulates (>= 1).
        k: transition slope, > 0.

    Returns:
        Floating tensor shaped like ``z``.

    Raises:
        ValueError: ``k <= 0`` or ``b < 1``.
    """
    if not k > 0:
        raise ValueError(f"k={k!r} is not allowed; the cyclic slope must be > 0")
    if b < 1:
        raise ValueError(f"b={b!r} is not allowed; accumulator bits must be >= 1")
    if not z.is_floating_point():
        z = z.to(torch.float64)
    return _CyclicFn.apply(z, int(b), float(k))


class CyclicActivation(nn.Module):
    """Module wrapper of :func:`cyclic` (spec §3.2)."""

    def __init__(self, b: int = 8, k: float = 2.0) -> None:
        super().__init__()
        self.b, self.k = b, k

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return cyclic(z, self.b, self.k)

    def extra_repr(self) -> str:
        return f"b={self.b}, k={self.k}"


# ============================================================================ §3.1 quantizers (STE)
def _ste(value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """Forward exactly ``value``; backward the gradient of ``surrogate`` (``surrogate - surrogate.detach()`` is 0)."""
    return value.detach() + (surrogate - surrogate.detach())


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.round(u)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad


def ste_round(u: torch.Tensor) -> torch.Tensor:
    """``round(u)`` (half to even) forward, identity backward (§1.1 STE); the forward value is exact."""
    return _RoundSTE.apply(u)


def _channel_dims(w: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(1, w.dim()))


def _per_channel(s: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return s.reshape(-1, *([1] * (w.dim() - 1)))


def binarize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """XNOR-Net binary weights (spec §3.1): ``w_q = sign(w)`` in {-1, +1} (sign(0) = +1), ``s_w = mean|w|``.

    Args:
        w: float weight ``[out, ...]`` (Linear ``[out, in]``, Conv ``[out, in, kh, kw]``).

    Returns:
        (w_q like ``w`` with exact values ±1 and identity STE gradient, s_w ``[out]`` differentiable in ``w``).
    """
    s = w.abs().mean(dim=_channel_dims(w))
    sign = torch.where(w >= 0, torch.ones_like(w), -torch.ones_like(w))
    return _ste(sign, w), s


def ternarize_weight(w: torch.Tensor, delta_factor: float = 0.7) -> tuple[torch.Tensor, torch.Tensor]:
    """TWN ternary weights (spec §3.1 [CHOICE]): ``Δ = 0.7 mean|w|`` and ``s_w = mean(|w| : |w| > Δ)`` per channel.

    Returns:
        (w_q in {-1, 0, +1} with identity STE gradient, s_w ``[out]``). A channel with no entry above ``Δ``
        (all-zero weights) gets ``s_w = 0`` and ``w_q = 0``.
    """
    dims = _channel_dims(w)
    delta = delta_factor * w.detach().abs().mean(dim=dims, keepdim=True)
    mask = (w.detach().abs() > delta).to(w.dtype)
    q = torch.sign(w.detach()) * mask
    s = (w.abs() * mask).sum(dim=dims) / mask.sum(dim=dims).clamp_min(1.0)
    return _ste(q, w), s


def uniform_quantize_weight(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-channel uniform quantizer of spec §1.1: ``q = clamp(round(w/s), -t, t)``, ``s = max|w|/t``.

    ``t = 2^(bits-1) - 1``. Gradients follow §1.2 (scale is a function of ``w``; STE on round).

    Returns:
        (codes q like ``w``, integer-valued floats, STE gradient; scale ``[out]``). ``w ≈ q * s``.
    """
    if bits < 2:
        raise ValueError(f"bits={bits!r} is not allowed for the uniform quantizer; use >= 2 (or 'binary')")
    t = 2 ** (bits - 1) - 1
    eps = 1e-12 if w.dtype == torch.float64 else 1e-8
    s = (w.abs().amax(dim=_channel_dims(w)) / t).clamp_min(eps)
    q = torch.clamp(ste_round(w / _per_channel(s, w)), -t, t)
    return q, s


def quantize_weight(w: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch on ``mode``: ``"binary"``, ``"ternary"``, ``"int2"``..``"int8"`` or ``"float"`` (q = w, s = 1).

    Returns:
        (integer-valued codes ``w_q`` shaped like ``w``, per-output-channel scale ``s_w`` ``[out]``).

    Raises:
        ValueError: unknown mode.
    """
    if mode == "binary":
        return binarize_weight(w)
    if mode == "ternary":
        return ternarize_weight(w)
    if mode.startswith("int") and mode[3:].isdigit():
        return uniform_quantize_weight(w, int(mode[3:]))
    if mode == "float":
        return w, torch.ones(w.shape[0], dtype=w.dtype, device=w.device)
    raise ValueError(f"weight quantizer {mode!r} is not allowed; choose binary, ternary, int2..int8 or float")


def _max_abs_code(mode: str) -> float:
    if mode in ("binary", "ternary"):
        return 1.0
    if mode.startswith("int"):
        return float(2 ** (int(mode[3:]) - 1) - 1)
    return math.inf


class _QuantActFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, s_x: float, top: float) -> torch.Tensor:  # type: ignore[override]
        u = x / s_x
        ctx.save_for_backward(u)
        ctx.s_x, ctx.top = s_x, top
        return torch.round(u).clamp_(0.0, top)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (u,) = ctx.saved_tensors
        inside = (u >= 0) & (u <= ctx.top)
        return torch.where(inside, grad / ctx.s_x, torch.zeros_like(grad)), None, None


def quantize_activation(x: torch.Tensor, s_x: torch.Tensor | float, a: int) -> torch.Tensor:
    """Unsigned a-bit fixed-point activations ``x_q = clamp(round(x/s_x), 0, 2^a - 1)`` (spec §3.1).

    Args:
        x: float activations (post-ReLU), any shape.
        s_x: step size (> 0), scalar tensor or float; treated as a constant.
        a: activation bits, 1..16.

    Returns:
        Integer-valued tensor like ``x`` (codes, not rescaled) with exact forward values; the backward pass is
        the clipped STE ``1[0 <= x/s_x <= 2^a-1] / s_x``.

    Raises:
        ValueError: ``s_x <= 0`` or ``a < 1``.
    """
    s = float(s_x)
    if not s > 0:
        raise ValueError(f"s_x={s!r} is not allowed; the activation step size must be > 0")
    if a < 1:
        raise ValueError(f"a={a!r} is not allowed; activation bits must be >= 1")
    return _QuantActFn.apply(x, s, float(2 ** a - 1))


# ============================================================================ §3.1 exact integer accumulators
def int_conv2d(
    x_q: torch.Tensor, w_q: torch.Tensor, stride: int | tuple = 1, padding: int | tuple = 0, acc_bits: int = 32,
    dilation: int | tuple = 1, groups: int = 1,
) -> torch.Tensor:
    """Exact integer convolution ``z_q = sum_i w_q,i x_q,i`` wrapped to a b-bit two's-complement accumulator.

    Products are summed exactly (float64 holds every integer below 2^53 exactly; PyTorch's CPU float64
    convolution is im2col + GEMM, and the result is rounded to int64 to remove any doubt), then wrapped with
    ``wrap_b``. Because wrap-around is a ring homomorphism, this equals an accumulator that wraps after every
    addition (:func:`accumulate_register`) bit for bit: it is the true integer result of the b-bit hardware.

    Args:
        x_q: integer-valued activations ``[B, C_in, H, W]`` (any dtype).
        w_q: integer-valued weights ``[C_out, C_in/groups, kh, kw]``.
        acc_bits: accumulator bits; values >= 64 return the unwrapped sum.

    Returns:
        int64 ``[B, C_out, H', W']``.
    """
    z = F.conv2d(x_q.detach().double(), w_q.detach().double(), None, stride, padding, dilation, groups)
    z = torch.round(z).to(torch.int64)
    return wrap_b(z, acc_bits) if acc_bits < 64 else z


def int_linear(x_q: torch.Tensor, w_q: torch.Tensor, acc_bits: int = 32) -> torch.Tensor:
    """Exact integer ``x_q @ w_q^T`` wrapped to ``acc_bits`` (int64 matmul). Shapes ``[B, in]``, ``[out, in]`` -> int64 ``[B, out]``."""
    z = x_q.detach().round().to(torch.int64) @ w_q.detach().round().to(torch.int64).t()
    return wrap_b(z, acc_bits) if acc_bits < 64 else z


def accumulate_register(products: torch.Tensor, b: int) -> torch.Tensor:
    """Register-level b-bit accumulator: ``acc <- wrap_b(acc + p_i)`` after every single addition (spec §3.9).

    Args:
        products: integer tensor ``[..., L]`` (the L products of each output, in addition order).

    Returns:
        int64 ``[...]``; equals ``wrap_b(sum(products), b)`` exactly (tests check this).
    """
    p = products.to(torch.int64)
    acc = torch.zeros(p.shape[:-1], dtype=torch.int64)
    for i in range(p.shape[-1]):
        acc = wrap_b(acc + p[..., i], b)
    return acc


# ============================================================================ §3.3 overflow penalty and rate
def overflow_penalty(z_q: torch.Tensor, b: int) -> torch.Tensor:
    """``R_o = mean_i max(|z_q,i| - 2^(b-1), 0)`` over all elements (neurons and batch; spec §3.3 [CHOICE]).

    ``z_q`` is the unwrapped integer accumulator value before ``c``. Zero when every ``|z_q| <= 2^(b-1)`` (so
    ``z = +2^(b-1)`` is not penalized even though it overflows, §3.7); gradient ``sign(z_q)/N`` outside.

    Returns:
        0-d tensor (integer units).
    """
    return torch.relu(z_q.abs() - 2 ** (b - 1)).mean()


def overflow_mask(z_q: torch.Tensor, b: int) -> torch.Tensor:
    """Boolean mask of overflowing entries: ``z_q`` outside the strict range ``[-2^(b-1), 2^(b-1) - 1]`` (§3.7)."""
    half = 2 ** (b - 1)
    return (z_q < -half) | (z_q > half - 1)


def overflow_rate(z_q: torch.Tensor, b: int) -> float:
    """Fraction of (neuron, sample) entries of ``z_q`` that overflow b bits (strict range; spec §3.4, §3.7)."""
    return int(overflow_mask(z_q.detach(), b).sum()) / z_q.numel() if z_q.numel() else 0.0


# ============================================================================ §3.5 carries
def carry_count(v: Sequence[int], b: int) -> tuple[int, int, int]:
    """Algorithm 1 (spec §3.5, with the ``1[v_i < 0]`` fix): carries of one output's packed b-bit additions.

    Args:
        v: the products (Python ints, each in the signed b-bit range).
        b: lane bits.

    Returns:
        (u, C, r_final): ``u = sum_i (v_i + 2^b 1[v_i < 0])`` (unsigned reinterpretation), the total number of
        carries ``C`` (including end-around carries from re-adding earlier carries) and the last remainder.
    """
    base = 1 << b
    u = sum(int(x) + (base if int(x) < 0 else 0) for x in v)
    c, r, total = u, 0, 0
    while c != 0:
        c, r = divmod(c + r, base)
        total += c
    return u, total, r


def carry_count_closed_form(u: int, b: int) -> tuple[int, int]:
    """Closed form of Algorithm 1: ``r_final ≡ u (mod 2^b - 1)`` with ``r_final`` in [1, 2^b - 1] (0 iff u = 0), and
    ``C = (u - r_final) / (2^b - 1)`` (spec §3.5). Returns (C, r_final)."""
    m = (1 << b) - 1
    if u == 0:
        return 0, 0
    r = (u - 1) % m + 1
    return (u - r) // m, r


def carry_count_tensor(u: torch.Tensor, b: int) -> torch.Tensor:
    """Algorithm 1 on a tensor of unsigned sums ``u`` (int64, any shape), iterated until every carry is 0.

    Returns int64 carry counts shaped like ``u``; equals :func:`carry_count_closed_form` elementwise.
    """
    base = 1 << b
    c = u.to(torch.int64)
    r = torch.zeros_like(c)
    total = torch.zeros_like(c)
    while bool((c != 0).any()):
        s = c + r
        c, r = torch.div(s, base, rounding_mode="floor"), torch.remainder(s, base)
        total = total + c
    return total


def _ste_floor(t: torch.Tensor) -> torch.Tensor:
    return _ste(torch.floor(t), t)


def _ste_mod(t: torch.Tensor, m: float) -> torch.Tensor:
    return _ste(torch.remainder(t, m), t)


def _carries_from_u(u: torch.Tensor, b: int, iterations: int) -> torch.Tensor:
    base = float(2 ** b)
    c, r = u, torch.zeros_like(u)
    total = torch.zeros_like(u)
    for _ in range(iterations):
        s = c + r
        c, r = _ste_floor(s / base), _ste_mod(s, base)
        total = total + c
    return total


def carry_count_surrogate(v: torch.Tensor, b: int, iterations: int = 3, exact_forward: bool = False) -> torch.Tensor:
    """Differentiable surrogate of Algorithm 1 (spec §3.5) on products ``v`` ``[..., L]`` (float).

    ``1[v<0]`` becomes ``(1 - tanh(v))/2``, ``floor``/``mod`` get identity (STE) gradients, and the loop is
    unrolled for ``iterations`` (default 3) steps. With ``exact_forward=True`` the forward value uses the exact
    indicator (the tanh form only supplies the gradient), so the forward equals Algorithm 1 whenever 3 iterations
    suffice.

    Returns:
        float ``[...]`` carry counts.
    """
    soft = (1.0 - torch.tanh(v)) / 2.0
    ind = _ste((v.detach() < 0).to(v.dtype), soft) if exact_forward else soft
    u = (v + float(2 ** b) * ind).sum(dim=-1)
    return _carries_from_u(u, b, iterations)


def sequential_end_around_carries(v: Sequence[int], b: int) -> tuple[int, int]:
    """Reference accumulator: add each product (as unsigned b-bit) to a b-bit register; every carry out is added
    back at the bottom (one's-complement end-around carry). Returns (carries, final register value)."""
    base = 1 << b
    acc = carries = 0
    for x in v:
        acc += int(x) % base
        while acc >= base:
            acc = acc - base + 1
            carries += 1
    return carries, acc


def carry_variance(n: torch.Tensor, m_hat: torch.Tensor) -> torch.Tensor:
    """Eq. 2.3: ``mean_j (1/bs) sum_k (n_k[j] - m_hat[j])^2`` for carry counts ``n`` ``[bs, J]`` and running mean
    ``m_hat`` ``[J]``. Returns a 0-d tensor (carries^2)."""
    return ((n - m_hat) ** 2).mean(dim=0).mean()


class CarryVariance(nn.Module):
    """Carry-variance regularizer R_c of one layer (spec §3.5, eqs. 2.2-2.3) with an EMA running mean.

    ``forward(n)`` with carry counts ``n`` ``[bs, J]`` (J = neurons, feature map flattened): in training mode it
    first updates ``m_hat <- (1-momentum) m_hat + momentum * mean_k n_k`` (the first batch initializes it), then
    returns ``mean_j mean_k (n_k[j] - m_hat[j])^2``. ``m_hat`` is also the inference-time carry correction
    (subtract ``round(m_hat)``).
    """

    def __init__(self, num_neurons: int, momentum: float = 0.1) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("m_hat", torch.zeros(num_neurons))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def forward(self, n: torch.Tensor) -> torch.Tensor:
        n = n.reshape(n.shape[0], -1)
        if self.training:
            with torch.no_grad():
                m_batch = n.detach().mean(dim=0).to(self.m_hat.dtype)
                if bool(self.initialized):
                    self.m_hat.mul_(1 - self.momentum).add_(self.momentum * m_batch)
                else:
                    self.m_hat.copy_(m_batch)
                    self.initialized.fill_(True)
        return carry_variance(n, self.m_hat.to(n.dtype))


# ---------------------------------------------------------------------------- packed adds with Python ints
def pack_lanes(values: Sequence[int], lane_bits: int = 8) -> int:
    """Pack lane values (lane 0 in the least significant bits) into one Python int; each value is taken mod
    ``2^lane_bits`` (two's-complement bit pattern for negatives)."""
    reg = 0
    for i, v in enumerate(values):
        reg |= (int(v) % (1 << lane_bits)) << (i * lane_bits)
    return reg


def unpack_lanes(reg: int, lanes: int, lane_bits: int = 8) -> list[int]:
    """Inverse of :func:`pack_lanes`: the unsigned value of each of ``lanes`` lanes."""
    mask = (1 << lane_bits) - 1
    return [(reg >> (i * lane_bits)) & mask for i in range(lanes)]


def packed_add(a: Sequence[int], b: Sequence[int], lane_bits: int = 8) -> list[int]:
    """One register add of two packed vectors WITHOUT buffer bits (spec §3.5): lane ``i`` becomes
    ``(a_i + b_i + carry_in_i) mod 2^lane_bits`` where ``carry_in_i`` is the carry out of lane ``i-1`` (carry
    contamination); the carry out of the top lane is dropped (register width = lanes x lane_bits)."""
    if len(a) != len(b):
        raise ValueError(f"packed_add needs equal lane counts, got {len(a)} and {len(b)}")
    lanes = len(a)
    reg = (pack_lanes(a, lane_bits) + pack_lanes(b, lane_bits)) & ((1 << (lanes * lane_bits)) - 1)
    return unpack_lanes(reg, lanes, lane_bits)


def _buffer_mask(lanes: int, lane_bits: int) -> int:
    return pack_lanes([(1 << (lane_bits - 1)) - 1] * lanes, lane_bits)  # e.g. 0x7F7F7F7F


def packed_add_buffered(a: Sequence[int], b: Sequence[int], lane_bits: int = 8) -> list[int]:
    """One register add WITH a buffer bit per lane (spec §3.5): values are (lane_bits-1)-bit, the top bit of each
    lane absorbs the carry and is cleared with the mask ``0x7F..7F`` after the add, so lane ``i`` becomes exactly
    ``(a_i + b_i) mod 2^(lane_bits-1)``."""
    if len(a) != len(b):
        raise ValueError(f"packed_add_buffered needs equal lane counts, got {len(a)} and {len(b)}")
    vb = lane_bits - 1
    lanes = len(a)
    reg = pack_lanes([x % (1 << vb) for x in a], lane_bits) + pack_lanes([x % (1 << vb) for x in b], lane_bits)
    return unpack_lanes(reg & _buffer_mask(lanes, lane_bits), lanes, lane_bits)


def packed_accumulate(vectors: Iterable[Sequence[int]], lane_bits: int = 8, buffer_bit: bool = False) -> list[int]:
    """Accumulate a sequence of packed vectors in one register (lane values unsigned). With ``buffer_bit`` every
    add is followed by the mask (per-lane arithmetic mod 2^(lane_bits-1)); without, carries contaminate the next
    lane and the top carry is dropped."""
    vectors = [list(v) for v in vectors]
    if not vectors:
        return []
    acc = [0] * len(vectors[0])
    for vec in vectors:
        acc = packed_add_buffered(acc, vec, lane_bits) if buffer_bit else packed_add(acc, vec, lane_bits)
    return acc


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
    weights with the same quantizer the server model uses (:func:`quantize_weight`).

    Args:
        weight_shape: ``[out, ...]`` of the float weight.
        bits: broadcast bit-width, 8 or 4. granularity: ``"tensor"`` or ``"channel"``.
    """

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


# ============================================================================ networks
def _ch(base: int, width: float) -> int:
    return max(1, int(round(base * width)))


class WrapVGG7(nn.Module):
    """VGG-7 (2x(128-C3) MP2 2x(256-C3) MP2 2x(512-C3) MP2 1024-FC 10-FC; TWN/WrapNet CIFAR net) with WrapNet layers.

    Channels are multiplied by ``width`` (default 0.125 -> 16-16-32-32-64-64, FC 128, fast on CPU). ``conv1`` and
    the classifier ``fc2`` are full precision (spec §3.1); ``conv2..conv6`` and ``fc1`` are WrapNet layers, each
    followed by BatchNorm and ReLU (ReLU after BN, Table 2.9).

    Input float ``[B, in_channels, image_size, image_size]`` (28x28x1 Fashion-MNIST or 32x32x3 CIFAR-10);
    output logits ``[B, num_classes]``.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28, width: float = 0.125,
                 weight_quant: str = "binary", b: int = 8, k: float = 2.0, act_bits: int = 8,
                 persistent_step_sizes: bool = True) -> None:
        super().__init__()
        c = [_ch(v, width) for v in (128, 128, 256, 256, 512, 512)]
        fc = _ch(1024, width)
        kw = dict(weight_quant=weight_quant, b=b, k=k, act_bits=act_bits, persistent_step_sizes=persistent_step_sizes)
        self.conv1 = nn.Conv2d(in_channels, c[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c[0])
        self.conv2 = WrapConv2d(c[0], c[1], **kw)
        self.bn2 = nn.BatchNorm2d(c[1])
        self.conv3 = WrapConv2d(c[1], c[2], **kw)
        self.bn3 = nn.BatchNorm2d(c[2])
        self.conv4 = WrapConv2d(c[2], c[3], **kw)
        self.bn4 = nn.BatchNorm2d(c[3])
        self.conv5 = WrapConv2d(c[3], c[4], **kw)
        self.bn5 = nn.BatchNorm2d(c[4])
        self.conv6 = WrapConv2d(c[4], c[5], **kw)
        self.bn6 = nn.BatchNorm2d(c[5])
        side = image_size // 8
        self.fc1 = WrapLinear(c[5] * side * side, fc, **kw)
        self.bn7 = nn.BatchNorm1d(fc)
        self.fc2 = nn.Linear(fc, num_classes)
        self.checkpointing = False  # accepted for the workload interface; the nets are small, no checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.relu(self.bn3(self.conv3(x)))
        x = F.max_pool2d(F.relu(self.bn4(self.conv4(x))), 2)
        x = F.relu(self.bn5(self.conv5(x)))
        x = F.max_pool2d(F.relu(self.bn6(self.conv6(x))), 2)
        x = F.relu(self.bn7(self.fc1(x.flatten(1))))
        return self.fc2(x)


class _BasicBlock(nn.Module):
    """ResNet basic block with WrapNet convs and an option-A (subsample + zero-pad, parameter-free) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int, kw: dict) -> None:
        super().__init__()
        self.conv1 = WrapConv2d(cin, cout, stride=stride, **kw)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = WrapConv2d(cout, cout, **kw)
        self.bn2 = nn.BatchNorm2d(cout)
        self.stride, self.pad = stride, cout - cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        sc = x[:, :, :: self.stride, :: self.stride] if self.stride > 1 else x
        if self.pad:
            sc = F.pad(sc, (0, 0, 0, 0, 0, self.pad))
        return F.relu(out + sc)


class WrapResNet20(nn.Module):
    """ResNet-20 (He et al. 2016 CIFAR variant: 3 stages x 3 basic blocks, 16/32/64 channels x ``width``) with
    WrapNet convolutions in every block; stem conv and classifier full precision (spec §3.1).

    Input ``[B, in_channels, H, W]`` (28x28x1 or 32x32x3), output logits ``[B, num_classes]``.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28, width: float = 1.0,
                 weight_quant: str = "binary", b: int = 8, k: float = 2.0, act_bits: int = 8,
                 persistent_step_sizes: bool = True, blocks_per_stage: int = 3) -> None:
        super().__init__()
        del image_size  # global average pooling makes the net size-agnostic
        kw = dict(weight_quant=weight_quant, b=b, k=k, act_bits=act_bits, persistent_step_sizes=persistent_step_sizes)
        widths = [_ch(v, width) for v in (16, 32, 64)]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages, cin = [], widths[0]
        for i, cout in enumerate(widths):
            blocks = []
            for j in range(blocks_per_stage):
                blocks.append(_BasicBlock(cin, cout, 2 if (i > 0 and j == 0) else 1, kw))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(cin, num_classes)
        self.checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def build_wrapnet(arch: str = "vgg7", **kwargs: Any) -> nn.Module:
    """``arch`` in {"vgg7", "resnet20"}; keyword arguments go to :class:`WrapVGG7` / :class:`WrapResNet20`."""
    if arch == "vgg7":
        return WrapVGG7(**kwargs)
    if arch == "resnet20":
        return WrapResNet20(**kwargs)
    raise ValueError(f"arch={arch!r} is not allowed; choose vgg7 or resnet20")


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


# ============================================================================ §3.4 step-size selection
def _exact_z(layer: _WrapMixin, x_q: torch.Tensor, w_q: torch.Tensor, a: int) -> torch.Tensor:
    """Exact unwrapped integer accumulator of ``layer`` for integer-valued ``x_q``/``w_q``: float32 when every
    partial sum is below 2^24 (exact), else the int64/float64 path of :func:`int_conv2d`/:func:`int_linear`."""
    if _max_abs_code(layer.weight_quant) * (2 ** a - 1) * layer._fan_in() < _FLOAT32_EXACT:
        return torch.round(layer._op(x_q.float(), w_q.float()))
    return layer._int_op(x_q, w_q, 64)


@dataclass
class StepChoice:
    """Result of §3.4 for one layer: chosen bits ``a``, step ``s_x``, its overflow ``rate``, the calibration
    ``clip`` (max ReLU input) and the rate for every bit-width tried (``rates[a]``)."""

    a: int
    s_x: float
    rate: float
    clip: float
    rates: dict[int, float] = field(default_factory=dict)


@torch.no_grad()
def select_layer_step_size(layer: _WrapMixin, x: torch.Tensor, b: int | None = None, p: float = 0.05,
                           bit_grid: Sequence[int] = (8, 7, 6, 5, 4, 3, 2, 1)) -> StepChoice:
    """Spec §3.4 for one layer: for ``a`` in ``bit_grid`` (coarsening), ``s_x = clip/(2^a - 1)`` with
    ``clip = max x``; quantize ``x``, compute the exact integer ``z_q`` and its overflow rate against ``b`` bits;
    stop at the first ``a`` with rate ``<= p`` (or the last ``a`` of the grid). Sets ``layer.s_x``/``act_bits``.

    Args:
        layer: a :class:`WrapConv2d` / :class:`WrapLinear`.
        x: float calibration inputs of the layer (post-ReLU), ``[N, ...]``.
        b: accumulator bits (default ``layer.effective_bits``).
        p: target overflow rate in [0, 1].

    Raises:
        ValueError: ``p`` outside [0, 1] or empty grid.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p={p!r} is not allowed; the target overflow rate is a fraction in [0, 1]")
    if not bit_grid:
        raise ValueError("bit_grid is empty")
    b = layer.effective_bits if b is None else b
    w_q, _ = layer.quantized_weight()
    w_q = w_q.detach()
    clip = float(x.max()) if x.numel() else 0.0
    if clip <= 0:  # dead input: any step works, use 1 bit
        a = int(bit_grid[-1])
        layer.s_x.fill_(1.0)
        layer.act_bits.fill_(a)
        return StepChoice(a, 1.0, 0.0, clip, {a: 0.0})
    rates: dict[int, float] = {}
    chosen = None
    for a in bit_grid:
        s = clip / (2 ** a - 1)
        x_q = quantize_activation(x, s, int(a))
        z = _exact_z(layer, x_q, w_q, int(a))
        rates[int(a)] = overflow_rate(z, b)
        chosen = (int(a), s)
        if rates[int(a)] <= p:
            break
    a, s = chosen
    layer.s_x.fill_(s)
    layer.act_bits.fill_(a)
    return StepChoice(a, s, rates[a], clip, rates)


def _collect_inputs(model: nn.Module, batches: Iterable, use_batch_stats: bool) -> dict[str, torch.Tensor]:
    layers = wrap_layers(model)
    store: dict[str, list[torch.Tensor]] = {n: [] for n, _ in layers}
    hooks = [layer.register_forward_pre_hook(lambda m, inp, n=n: store[n].append(inp[0].detach()))
             for n, layer in layers]
    was_training = model.training
    bn_saved = []
    try:
        model.eval()
        if use_batch_stats:
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    bn_saved.append((m, m.momentum, copy.deepcopy(m.state_dict())))
                    m.momentum = 0.0
                    m.train()
        with torch.no_grad(), wrapnet_mode(model, act_quant=False, cyclic=False, acc_bits=NO_WRAP_BITS,
                                           track_carries=False, carry_mode="none"):
            saved_steps = [(layer, layer.s_x.clone()) for _, layer in layers]
            for _, layer in layers:
                layer.s_x.zero_()  # stage-1 behaviour: float activations
            try:
                for batch in batches:
                    x = batch[0] if isinstance(batch, (tuple, list)) else batch
                    model(x)
            finally:
                for layer, s in saved_steps:
                    layer.s_x.copy_(s)
    finally:
        for h in hooks:
            h.remove()
        for m, mom, state in bn_saved:
            m.momentum = mom
            m.load_state_dict(state)
        model.train(was_training)
    return {n: torch.cat(v) for n, v in store.items() if v}


def select_step_sizes(model: nn.Module, calib_batches: Iterable, b: int | None = None, p: float = 0.05,
                      bit_grid: Sequence[int] = (8, 7, 6, 5, 4, 3, 2, 1),
                      use_batch_stats: bool = False) -> dict[str, StepChoice]:
    """Spec §3.4 for every WrapNet layer, on the float-activation network (pipeline stage 2).

    Runs ``calib_batches`` (iterable of ``x`` or ``(x, y)``; float images) through the model with float
    activations and no cyclic layer, records each WrapNet layer's input, and calls
    :func:`select_layer_step_size` per layer. The chosen ``s_x`` and ``a`` are frozen into the layers.

    Args:
        b: accumulator bits (default: each layer's ``effective_bits``).
        use_batch_stats: use batch statistics in BatchNorm (for an untrained model whose running statistics are
            still the identity); running statistics are left unchanged.

    Returns:
        {layer name: :class:`StepChoice`}; the median of the ``a`` values is the "Bits" column of Table 2.3.
    """
    inputs = _collect_inputs(model, calib_batches, use_batch_stats)
    return {n: select_layer_step_size(layer, inputs[n], b, p, bit_grid)
            for n, layer in wrap_layers(model) if n in inputs}


def calibrate_fixed_bits(model: nn.Module, calib_batches: Iterable, a: int, b: int | None = None,
                         use_batch_stats: bool = False) -> dict[str, StepChoice]:
    """Baseline quantized activations (BWN-QA/TWN-QA, Table 2.6): every layer gets ``a`` bits and
    ``s_x = max x / (2^a - 1)`` regardless of overflow (rates against ``b`` are still reported)."""
    return select_step_sizes(model, calib_batches, b=b, p=1.0, bit_grid=(a,), use_batch_stats=use_batch_stats)


# ============================================================================ training and evaluation
@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable, **modes: Any) -> dict[str, Any]:
    """Accuracy and overflow rates of ``model`` on ``batches`` of ``(x, y)`` under temporary ``modes`` (e.g.
    ``acc_bits=8``). Returns {"accuracy": float in [0, 1], "overflow_rate": mean over layers, "overflow_rates":
    {layer: rate}, "n": examples}."""
    was = model.training
    model.eval()
    correct = total = 0
    with wrapnet_mode(model, **modes):
        reset_overflow_stats(model)
        for x, y in batches:
            correct += int((model(x).argmax(1) == y).sum())
            total += int(y.numel())
        rates = overflow_rates(model)
    model.train(was)
    return {"accuracy": correct / max(total, 1), "overflow_rate": float(np.mean(list(rates.values()))) if rates else 0.0,
            "overflow_rates": rates, "n": total}


def train_epochs(model: nn.Module, train_loader: Iterable, epochs: float, lr: float = 1e-3,
                 lambda_o: float = 0.0, lambda_c: float = 0.0, weight_decay: float = 0.0,
                 log: Callable[[str], None] | None = None, tag: str = "") -> list[float]:
    """Adam (spec §3.6) with a cosine learning-rate decay over ``epochs`` passes of ``train_loader`` (an
    iterable of ``(x, y)`` that can be iterated repeatedly; fractional epochs stop early). Loss
    ``CE + λ_o R_o + λ_c R_c``. Returns the mean loss of each epoch."""
    if epochs <= 0:
        return []
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    try:
        steps_per_epoch = len(train_loader)  # type: ignore[arg-type]
    except TypeError:
        steps_per_epoch = None
    total = int(math.ceil(epochs * steps_per_epoch)) if steps_per_epoch else None
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total) if total else None
    model.train()
    history, step = [], 0
    for ep in range(int(math.ceil(epochs))):
        losses = []
        for x, y in train_loader:
            if total is not None and step >= total:
                break
            loss = F.cross_entropy(model(x), y)
            if lambda_o:
                loss = loss + lambda_o * model_overflow_penalty(model)
            if lambda_c:
                loss = loss + lambda_c * model_carry_regularizer(model)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            losses.append(float(loss.detach()))
            step += 1
        history.append(float(np.mean(losses)) if losses else float("nan"))
        if log:
            log(f"{tag} epoch {ep + 1}: loss {history[-1]:.4f}")
    return history


def train_pipeline(model: nn.Module, train_loader: Iterable, calib_batches: Sequence, *, b: int = 8,
                   p: float = 0.05, k: float = 2.0, epochs: Sequence[float] = (2, 1, 1), lr: float = 1e-3,
                   lambda_o: float = 0.01, lambda_c: float = 0.0, track_carries: bool = False,
                   bit_grid: Sequence[int] = (8, 7, 6, 5, 4, 3, 2, 1), eval_fn: Callable[[nn.Module], Any] | None = None,
                   log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The four-stage WrapNet pipeline (spec §3.6), small-scale defaults (Adam lr 1e-3, cosine decay per stage).

    1. pre-train with quantized weights and float activations, no cyclic layers (``epochs[0]``; 0 skips it,
       e.g. to reuse an already pre-trained model);
    2. select per-layer ``s_x`` for overflow rate ``p`` at ``b`` bits (§3.4) on ``calib_batches``;
    3. insert ``c(.)`` (slope ``k``) and warm up with float activations (``epochs[1]``);
    4. fine-tune with quantized weights and activations, loss ``CE + λ_o R_o (+ λ_c R_c)`` (``epochs[2]``).

    Args:
        model: a WrapNet network (:class:`WrapVGG7`, :class:`WrapResNet20`, ...), modified in place.
        train_loader: re-iterable of ``(x float [B, C, H, W], y int64 [B])``.
        calib_batches: sequence of ``(x, y)`` or ``x`` for §3.4.
        eval_fn: optional ``eval_fn(model)`` called after stages 1, 3 and 4; its results are returned.

    Every WrapNet layer's ``b`` and ``k`` are set to the given values; the model ends in the fine-tuning modes
    (``act_quant=True``, ``cyclic=True``, 32-bit accumulator; evaluate with ``acc_bits=b`` for the b-bit result).

    Returns:
        {"steps": {layer: StepChoice}, "median_bits": float, "losses": {stage: [per-epoch loss]},
        "evals": {stage: eval_fn result}}.
    """
    out: dict[str, Any] = {"losses": {}, "evals": {}}
    for _, layer in wrap_layers(model):
        layer.b, layer.k = b, k
    set_wrapnet_mode(model, act_quant=False, cyclic=False, acc_bits=NO_WRAP_BITS, track_carries=False)
    out["losses"]["pretrain"] = train_epochs(model, train_loader, epochs[0], lr, log=log, tag="[1 pretrain]")
    if eval_fn and epochs[0]:
        out["evals"]["pretrain"] = eval_fn(model)
    steps = select_step_sizes(model, calib_batches, b, p, bit_grid)
    out["steps"] = steps
    out["median_bits"] = float(np.median([c.a for c in steps.values()])) if steps else float("nan")
    if log:
        log("[2 step sizes] " + ", ".join(f"{n}: a={c.a} rate={c.rate:.3%}" for n, c in steps.items()))
    set_wrapnet_mode(model, cyclic=True, act_quant=False)
    out["losses"]["warmup"] = train_epochs(model, train_loader, epochs[1], lr, log=log, tag="[3 warm-up]")
    if eval_fn:
        out["evals"]["warmup"] = eval_fn(model)
    set_wrapnet_mode(model, cyclic=True, act_quant=True, track_carries=track_carries or bool(lambda_c))
    out["losses"]["finetune"] = train_epochs(model, train_loader, epochs[2], lr, lambda_o=lambda_o,
                                             lambda_c=lambda_c, log=log, tag="[4 fine-tune]")
    if eval_fn:
        out["evals"]["finetune"] = eval_fn(model)
    return out


# ============================================================================ §3.5 carries at the model level
@torch.no_grad()
def measure_carries(model: nn.Module, batches: Iterable) -> dict[str, dict[str, float]]:
    """Carry statistics per WrapNet layer (quantized activations required): {layer: {"mean": mean carries per
    neuron, "std": mean over neurons of the per-neuron std over images}} (Table 2.5 columns)."""
    layers = wrap_layers(model)
    acc: dict[str, list[torch.Tensor]] = {n: [] for n, _ in layers}
    was = model.training
    model.eval()
    with wrapnet_mode(model, track_carries=True):
        for batch in batches:
            model(batch[0] if isinstance(batch, (tuple, list)) else batch)
            for n, layer in layers:
                if layer.last_carries is not None:
                    acc[n].append(layer.last_carries.flatten(1).float())
                    layer.last_carries = None
    model.train(was)
    out = {}
    for n, chunks in acc.items():
        if chunks:
            c = torch.cat(chunks)
            out[n] = {"mean": float(c.mean()), "std": float(c.std(dim=0, unbiased=False).mean())}
    return out


def hybrid_carry_finetune(model: nn.Module, train_loader: Iterable, calib_batches: Sequence,
                          eval_fn: Callable[[nn.Module], float], *, steps_epochs: float = 0.25,
                          lambda_c: float = 1e-3, lambda_o: float = 0.01, lr: float = 1e-4, tol: float = 0.01,
                          p: float = 0.05, lanes: int = 4, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Hybrid bit-packing procedure (spec §3.5), on a fine-tuned WrapNet (stage 4 state).

    1. Measure each layer's carry std (:func:`measure_carries`) and order layers from smallest to largest.
    2. Layer by layer in that order: simulate neighbor-lane carries (with the ``round(m_hat)`` correction) and
       R_c on it, fine-tune ``steps_epochs`` epochs, evaluate with ``eval_fn(model) -> accuracy``. If accuracy
       falls more than ``tol`` below the carry-free baseline, undo that layer (restore its weights) and stop.
    3. Give the remaining layers a buffer bit (7-bit lanes: wrap/cyclic at b-1 bits), re-select their ``s_x``
       for overflow rate ``p`` at b-1 bits, fine-tune ``steps_epochs`` epochs.

    Returns:
        {"order": [layers], "carry_layers": [...], "buffer_layers": [...], "baseline": acc, "accuracies":
        {layer: acc after adding it}, "final": acc, "carry_stats": measure_carries output}.
    """
    set_wrapnet_mode(model, act_quant=True, cyclic=True)
    for _, layer in wrap_layers(model):
        layer.carry_lanes = lanes
    stats = measure_carries(model, calib_batches)
    order = sorted(stats, key=lambda n: stats[n]["std"])
    named = dict(wrap_layers(model))
    baseline = float(eval_fn(model))
    out: dict[str, Any] = {"order": order, "carry_layers": [], "buffer_layers": [], "baseline": baseline,
                           "accuracies": {}, "carry_stats": stats}
    for n in order:
        saved = copy.deepcopy(model.state_dict())
        layer = named[n]
        layer.track_carries, layer.carry_mode = True, "simulate"
        train_epochs(model, train_loader, steps_epochs, lr, lambda_o=lambda_o, lambda_c=lambda_c, log=log,
                     tag=f"[hybrid carries {n}]")
        acc = float(eval_fn(model))
        out["accuracies"][n] = acc
        if acc < baseline - tol:
            model.load_state_dict(saved)
            layer.track_carries, layer.carry_mode = False, "none"
            break
        out["carry_layers"].append(n)
    rest = [n for n in order if n not in out["carry_layers"]]
    if rest:
        for n in rest:
            named[n].carry_mode = "buffer"
        inputs = _collect_inputs(model, calib_batches, use_batch_stats=False)
        for n in rest:
            select_layer_step_size(named[n], inputs[n], None, p)
        train_epochs(model, train_loader, steps_epochs, lr, lambda_o=lambda_o, lambda_c=lambda_c, log=log,
                     tag="[hybrid buffer bits]")
    out["buffer_layers"] = rest
    out["final"] = float(eval_fn(model))
    return out
