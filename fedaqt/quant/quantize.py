"""Uniform symmetric quantization: scales, codes, STE fake-quant and the relay correction.

Implements ``spec/METHODS.md`` section 1 (quantization math, gradients eqs. 3.1-3.3) and the server-side
gradient-relay correction of section 2.2 step 6 (eq. 3.4).

Conventions (spec 1.1):

* ``b`` is the bit-width (8 or 4), ``t_b = 2^(b-1) - 1`` (127 / 7). The grid is ``{-t_b, ..., t_b}``, zero-point 0.
* Per-tensor: one scale ``s = max|w| / t_b`` (a 0-d tensor). Per-channel: axis 0 is the output channel,
  ``s_c = max_{i in c} |w_i| / t_b`` with shape ``[out]``, broadcast as ``[out, 1, ...]``.
* ``q = clamp(round(w / s), -t_b, t_b)`` (round half to even, ``torch.round``), ``Q(w) = s * q``.
* All-zero tensors: ``s = max(s, eps)`` with eps ``1e-12`` (float64) / ``1e-8`` (float32) (spec 1.2).

This module imports nothing from other fedaqt packages.
"""

from __future__ import annotations

from typing import Literal

import torch

__all__ = [
    "Granularity",
    "GRANULARITIES",
    "SUPPORTED_BITS",
    "qmax",
    "default_eps",
    "check_granularity",
    "compute_scale",
    "broadcast_scale",
    "quantize",
    "dequantize",
    "fake_quantize",
    "ste_round",
    "fake_quant",
    "quantize_activation",
    "fake_quant_activation",
    "max_abs_mask",
    "relay_correction",
]

Granularity = Literal["tensor", "channel"]
GRANULARITIES: tuple[str, ...] = ("tensor", "channel")
SUPPORTED_BITS: tuple[int, ...] = (8, 4)


def qmax(bits: int) -> int:
    """Largest code of the symmetric signed grid, ``t_b = 2^(b-1) - 1`` (spec 1.1).

    Args:
        bits: bit-width, 8 or 4.

    Returns:
        127 for 8 bits, 7 for 4 bits.

    Raises:
        ValueError: ``bits`` is not 8 or 4 (the message names the bad value).
    """
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    return 2 ** (int(bits) - 1) - 1


def default_eps(dtype: torch.dtype) -> float:
    """All-zero guard for the scale (spec 1.2): 1e-12 for float64, 1e-8 for float32.

    Other floating dtypes (float16/bfloat16) use ``max(1e-8, finfo(dtype).tiny)`` so the guard is representable.
    """
    if dtype == torch.float64:
        return 1e-12
    if dtype == torch.float32:
        return 1e-8
    if dtype.is_floating_point:
        return max(1e-8, float(torch.finfo(dtype).tiny))
    raise ValueError(f"expected a floating dtype, got {dtype}")


def check_granularity(granularity: str) -> str:
    """Validate a granularity string.

    Raises:
        ValueError: ``granularity`` is not ``"tensor"`` or ``"channel"``.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    return granularity


def _check_float(w: torch.Tensor, what: str = "w") -> None:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(w).__name__}")
    if not w.dtype.is_floating_point:
        raise ValueError(f"{what} must be a floating-point tensor, got dtype {w.dtype}")


def _amax(w: torch.Tensor, granularity: str) -> torch.Tensor:
    """max|w| as a 0-d tensor (per tensor) or ``[out]`` (per channel). Differentiable (ties split like amax)."""
    check_granularity(granularity)
    if granularity == "tensor":
        return w.abs().amax() if w.numel() > 0 else w.new_zeros(())
    if w.dim() == 0:
        raise ValueError("per-channel quantization needs a tensor with at least 1 dimension (axis 0), got a 0-d tensor")
    out = w.shape[0]
    flat = w.abs().reshape(out, -1)
    if flat.shape[1] == 0:
        return w.new_zeros((out,))
    return flat.amax(dim=1)


def broadcast_scale(scale: torch.Tensor, ndim: int) -> torch.Tensor:
    """View a 0-d or ``[out]`` scale so that it broadcasts against a weight with ``ndim`` dims (axis 0 = out)."""
    if scale.dim() == 0 or ndim <= 1:
        return scale
    return scale.reshape((-1,) + (1,) * (ndim - 1))


def compute_scale(
    w: torch.Tensor, bits: int, granularity: Granularity, eps: float | None = None
) -> torch.Tensor:
    """Max-abs scale ``s = max|w| / t_b`` with the all-zero guard ``s = max(s, eps)`` (spec 1.1, 1.2).

    Args:
        w: floating tensor of any shape (per channel: at least 1-D, axis 0 is the output channel).
        bits: 8 or 4.
        granularity: ``"tensor"`` -> 0-d scale; ``"channel"`` -> scale of shape ``[w.shape[0]]``.
        eps: guard; default :func:`default_eps` of ``w.dtype``.

    Returns:
        Scale in ``w``'s dtype and device, differentiable w.r.t. ``w`` (detach it if you need a constant).

    Raises:
        ValueError: bad ``bits``/``granularity``, non-floating ``w``, or per-channel on a 0-d tensor.
    """
    _check_float(w)
    t = qmax(bits)
    if eps is None:
        eps = default_eps(w.dtype)
    return (_amax(w, granularity) / t).clamp_min(eps)


def quantize(w: torch.Tensor, bits: int, granularity: Granularity,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``w`` to codes and scale (spec 1.1): ``q = clamp(round(w/s), -t_b, t_b)``.

    With ``generator`` the codes use unbiased stochastic rounding instead (spec §2.4 "FedAvg stagnation"):
    ``q = clamp(floor(w/s + u), -t_b, t_b)`` with ``u ~ U[0, 1)`` drawn from ``generator`` (one draw per
    element), so ``E[s q] = w`` for every element (the scale is still the max-abs scale, hence ``|w/s| <= t_b``
    and the clamp only guards round-off). A ``w`` already on the grid (``w = s q``) keeps its codes exactly.

    Args:
        w: floating tensor, any shape (per channel: axis 0 = output channel).
        bits: 8 or 4 (int4 codes also live in an int8 container, values in ``[-7, 7]``).
        granularity: ``"tensor"`` or ``"channel"``.
        generator: None (default) = round to nearest (half to even, ``torch.round``); a ``torch.Generator`` on
            ``w``'s device = stochastic rounding, deterministic in the generator's state.

    Returns:
        ``(codes, scale)``: ``codes`` int8 with ``w``'s shape; ``scale`` in ``w``'s dtype, 0-d (per tensor) or
        ``[out]`` (per channel), detached.

    Raises:
        ValueError: bad ``bits``/``granularity`` or non-floating ``w``.
    """
    with torch.no_grad():
        t = qmax(bits)
        s = compute_scale(w.detach(), bits, granularity)
        x = w.detach() / broadcast_scale(s, w.dim())
        if generator is None:
            q = torch.round(x)
        else:
            u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
            q = torch.floor(x.add_(u))
            del u
        q = torch.clamp(q, -t, t)
        return q.to(torch.int8), s


def dequantize(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``Q = s * q`` with ``scale`` broadcast over axis 0 as ``[out, 1, ...]`` (spec 1.1).

    Args:
        codes: integer tensor (int8), any shape.
        scale: floating 0-d tensor or ``[codes.shape[0]]``.

    Returns:
        Float tensor in ``scale``'s dtype, shaped like ``codes``.

    Raises:
        ValueError: ``scale`` is not floating, or its shape is neither ``()`` nor ``[codes.shape[0]]``.
    """
    if not scale.dtype.is_floating_point:
        raise ValueError(f"scale must be floating point, got {scale.dtype}")
    if scale.dim() != 0:
        if scale.dim() != 1 or codes.dim() == 0 or scale.shape[0] != codes.shape[0]:
            raise ValueError(
                f"scale shape {tuple(scale.shape)} does not fit codes shape {tuple(codes.shape)} "
                "(expected () or [codes.shape[0]])"
            )
    return codes.to(scale.dtype) * broadcast_scale(scale, codes.dim())


def fake_quantize(w: torch.Tensor, bits: int, granularity: Granularity) -> torch.Tensor:
    """``Q(w) = dequantize(*quantize(w))`` without gradient (server-side copy, spec 2.2 step 1)."""
    codes, s = quantize(w, bits, granularity)
    return dequantize(codes, s)


def ste_round(u: torch.Tensor) -> torch.Tensor:
    """Straight-through round (spec 1.1): forward ``round(u)``, backward identity; ``u + (round(u) - u).detach()``."""
    return u + (torch.round(u) - u).detach()


def fake_quant(w: torch.Tensor, bits: int, granularity: Granularity, scale_grad: bool) -> torch.Tensor:
    """Reference fake-quantizer ``Q(w) = s * STE(clamp(round(w/s)))`` (spec 1.1/1.2), the test oracle.

    The round *and* the clamp are straight-through (``dQ/dw = delta`` with ``s`` fixed, as in eq. 3.2);
    with a max-abs scale the clamp never changes a value beyond float rounding. With ``scale_grad=False`` the
    backward is the exact identity (``dL/dw == dL/dQ`` bit for bit); with ``scale_grad=True`` the direct term
    is also the exact identity and the scale term ``dQ/ds = q - w/s`` flows into ``s = amax|w|/t_b``, so the
    two modes differ exactly at the max-abs entries only. (A plain ``s * ste_round(w/s)`` graph gives the same
    gradient up to float rounding; ``tests/test_quant.py`` checks both.)

    Args:
        w: floating tensor, any shape (per channel: axis 0 = out).
        bits: 8 or 4.
        granularity: ``"tensor"`` or ``"channel"``.
        scale_grad: True -> ``s = amax|w|/t_b`` stays in the graph, so autograd gives eq. 3.2/3.3 (ties in the
            max split evenly, like ``torch.amax``); False -> ``s`` detached, ``dL/dw = dL/dQ`` (eq. 3.1).

    Returns:
        Tensor shaped like ``w`` with the values of :func:`quantize` + :func:`dequantize`.
    """
    t = qmax(bits)
    s = compute_scale(w, bits, granularity)
    if not scale_grad:
        return _FakeQuantSTE.apply(w, broadcast_scale(s.detach(), w.dim()), t)
    return _FakeQuantScaleGrad.apply(w, broadcast_scale(s, w.dim()), t)


class _FakeQuantScaleGrad(torch.autograd.Function):
    """``s * clamp(round(w/s), -t, t)`` with the partials of spec 1.2: ``dQ_i/dw_j = delta_ij`` (STE, exact
    identity) and ``dQ_i/ds = q_i - w_i/s`` (summed to ``s``'s shape); ``ds/dw`` is left to autograd of
    ``amax(|w|)/t_b`` (ties split evenly)."""

    @staticmethod
    def forward(ctx, w, s, t):  # type: ignore[override]
        ctx.save_for_backward(w, s)
        ctx.t = t
        return torch.clamp(torch.round(w / s), -t, t) * s

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        w, s = ctx.saved_tensors
        grad_s = None
        if ctx.needs_input_grad[1]:
            u = w / s
            term = grad * (torch.clamp(torch.round(u), -ctx.t, ctx.t) - u)
            if s.dim() == 0:
                grad_s = term.sum()
            else:
                grad_s = term.sum(dim=tuple(range(1, term.dim())), keepdim=True) if term.dim() > 1 else term
        return grad, grad_s, None


class _FakeQuantSTE(torch.autograd.Function):
    """``s * clamp(round(w/s), -t, t)`` with a constant ``s``; backward is the exact identity (eq. 3.1)."""

    @staticmethod
    def forward(ctx, w, s, t):  # type: ignore[override]
        return torch.clamp(torch.round(w / s), -t, t) * s

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad, None, None


def quantize_activation(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-tensor symmetric activation quantization (spec 1.1 "Activations").

    Args:
        x: floating tensor, any shape.
        bits: 8 (default; spec [CHOICE]) or 4.

    Returns:
        ``(codes int8 shaped like x, scale 0-d in x's dtype, detached)``.
    """
    return quantize(x, bits, "tensor")


def fake_quant_activation(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Reference for the activation quantizer: ``s_x * STE(round(x/s_x))`` with ``s_x`` detached (spec 1.1)."""
    return fake_quant(x, bits, "tensor", scale_grad=False)


def max_abs_mask(w: torch.Tensor, granularity: Granularity) -> torch.Tensor:
    """Max-abs mask ``M`` of spec 1.2 with ties split ``1/n_ties`` (per tensor or per channel), shaped like ``w``."""
    a = w.abs()
    amax = broadcast_scale(_amax(w, granularity), w.dim())
    hit = (a == amax).to(w.dtype)
    if granularity == "tensor":
        n = hit.sum()
    else:
        n = broadcast_scale(hit.reshape(w.shape[0], -1).sum(dim=1), w.dim())
    return hit / n.clamp_min(1)


@torch.no_grad()
def relay_correction(
    grad: torch.Tensor,
    w: torch.Tensor,
    bits: int,
    granularity: Granularity,
    scale: torch.Tensor | None = None,
    codes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gradient-relay correction, spec 2.2 step 6 / eq. 3.4 (= the scale term of eq. 3.2/3.3).

    ``g_s = sum_i grad_i (Q(w)_i - w_i) / s`` (per tensor, or per channel summing within each channel) and
    ``corr = (g_s / t_b) * M ⊙ sign(w)``, with ``M`` the max-abs mask (ties split ``1/n_ties``, matching
    ``torch.amax``). Where the unguarded scale ``amax/t_b`` is below the eps guard the correction is 0 (matching
    autograd through ``clamp_min``). The result is linear in ``grad`` and nonzero only at max-abs entries.

    ``Q(w) = s * q`` must be exactly what the clients trained on. The server's relay therefore passes the
    ``codes`` and the float32 ``scale`` that went on the wire (:func:`fedaqt.quant.wire.encode_broadcast`
    quantizes in float32): re-quantizing ``w`` in float64 gives a scale that differs in the last float32 bits and,
    for a few entries of a large tensor, a different code, which makes ``g_s`` of that tensor/channel wrong.

    Args:
        grad: ``dL/dQ(w)`` (e.g. the aggregated client gradient), floating, shaped like ``w``.
        w: the server's float weight that was quantized, floating, any shape (per channel: axis 0 = out).
        bits: 8 or 4.
        granularity: ``"tensor"`` or ``"channel"``.
        scale: the scale actually used for ``Q(w)`` (floating, ``()`` per tensor or ``[w.shape[0]]`` per channel,
            finite, > 0), e.g. the float32 scale that was broadcast; default: the max-abs scale of ``w`` in
            ``w``'s dtype. When given, the eps guard is that of ``scale``'s dtype (spec 1.2).
        codes: the integer codes actually used for ``Q(w)`` (shaped like ``w``, values in ``[-t_b, t_b]``), e.g.
            the broadcast codes; requires ``scale``. Default: ``clamp(round(w / s), -t_b, t_b)`` recomputed here.

    Returns:
        Correction tensor shaped like ``w`` in the promoted dtype of ``grad``, ``w`` (and ``scale``); add it to
        ``grad``.

    Raises:
        ValueError: shape mismatch between ``grad``, ``w``, ``scale`` or ``codes``; non-integer or out-of-range
            codes; a non-floating, non-finite or negative scale; ``codes`` without ``scale``; bad
            bits/granularity. Each message names the bad value.
    """
    _check_float(w)
    _check_float(grad, "grad")
    if grad.shape != w.shape:
        raise ValueError(f"grad shape {tuple(grad.shape)} != weight shape {tuple(w.shape)}")
    t = qmax(bits)
    check_granularity(granularity)
    if granularity == "channel" and w.dim() == 0:
        raise ValueError("per-channel relay correction needs a tensor with at least 1 dimension, got a 0-d tensor")
    if codes is not None and scale is None:
        raise ValueError("relay_correction: codes were given without the scale they were quantized with")
    if scale is not None:
        _check_float(scale, "scale")
        want = () if granularity == "tensor" else (w.shape[0],)
        if tuple(scale.shape) != want:
            raise ValueError(f"scale shape {tuple(scale.shape)} != {want} for a {granularity} scale of a weight "
                             f"shaped {tuple(w.shape)}")
        if not bool(torch.isfinite(scale).all()) or bool((scale <= 0).any()):
            bad = scale[~torch.isfinite(scale) | (scale <= 0)].reshape(-1)[0]
            raise ValueError(f"scale must be finite and > 0 (the eps guard keeps it positive), got {float(bad)}")
    if codes is not None:
        if not isinstance(codes, torch.Tensor) or codes.dtype.is_floating_point or codes.dtype == torch.bool \
                or codes.is_complex():
            raise ValueError(f"codes must be an integer tensor, got {getattr(codes, 'dtype', type(codes).__name__)}")
        if codes.shape != w.shape:
            raise ValueError(f"codes shape {tuple(codes.shape)} != weight shape {tuple(w.shape)}")
        if codes.numel() and (int(codes.min()) < -t or int(codes.max()) > t):
            raise ValueError(f"codes must lie in [-{t}, {t}] for {bits}-bit weights, got "
                             f"[{int(codes.min())}, {int(codes.max())}]")
    dtype = torch.promote_types(grad.dtype, w.dtype)
    if scale is not None:
        dtype = torch.promote_types(dtype, scale.dtype)
    w = w.to(dtype)
    grad = grad.to(dtype)
    if scale is None:
        raw = _amax(w, granularity) / t
        eps = default_eps(dtype)
        s = raw.clamp_min(eps)
    else:
        # the guard acted where the scale was computed: in the scale's dtype (float32 on the wire)
        raw = _amax(w.to(scale.dtype), granularity) / t
        eps = default_eps(scale.dtype)
        s = scale.to(dtype)
    active = (raw >= eps).to(dtype)
    sb = broadcast_scale(s, w.dim())
    q = torch.clamp(torch.round(w / sb), -t, t) if codes is None else codes.to(dtype)
    term = grad * (q * sb - w) / sb
    if granularity == "tensor":
        g_s = term.sum()
    else:
        g_s = term.reshape(w.shape[0], -1).sum(dim=1)
    coef = broadcast_scale(g_s * active / t, w.dim())
    return coef * max_abs_mask(w, granularity) * torch.sign(w)
