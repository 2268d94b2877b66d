"""WrapNet accumulator arithmetic (spec §3.1-3.3): two's-complement wrap ``wrap_b``, the smooth-modulo cyclic
activation :func:`cyclic` / :class:`CyclicActivation`, exact integer accumulation wrapped to b bits
(:func:`int_conv2d`, :func:`int_linear`, the per-addition emulation :func:`accumulate_register`), and the overflow
penalty, mask and rate. Accumulator values are in integer units (multiples of ``s_w * s_x``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
