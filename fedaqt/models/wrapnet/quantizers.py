"""WrapNet weight and activation quantizers with the straight-through estimator (spec §3.1): binary (XNOR,
per-output-channel ``s_w = mean|w|``), ternary (TWN, ``Δ = 0.7 mean|w|``), uniform multi-bit (§1), and unsigned
a-bit activations ``x_q = clamp(round(x/s_x), 0, 2^a-1)``."""

from __future__ import annotations

import math

import torch


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
