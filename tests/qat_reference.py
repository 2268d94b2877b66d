"""Independent references for the gradient-relay tests (spec 1.1/1.2, 2.3), written from the spec with plain torch.

Nothing here uses fedaqt. The server's float model is float32 and the broadcast quantizes it in float32 (float32
scale ``s = amax|w|/t_b``, float32 ``w/s``, round half to even). The references take exactly those float32 values
for the forward and run the rest, including the backward, in float64, so that their own rounding (~1e-16) is far
below the client's float32 arithmetic (~1e-7) and below the relay errors they must catch (a float64 re-quantization
of the server weight changes the scale by ~1e-8 relative and, in a large tensor, a few codes).
"""

from __future__ import annotations

import torch


def qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def _amax(w: torch.Tensor, granularity: str) -> torch.Tensor:
    return w.abs().amax() if granularity == "tensor" else w.abs().amax(dim=1, keepdim=True)


def wire_quant(w: torch.Tensor, bits: int, granularity: str) -> torch.Tensor:
    """Centralized QAT quantizer ``Q(w) = s * STE(clamp(round(w/s), -t_b, t_b))`` with ``s = amax|w|/t_b``
    differentiable (eps guard 1e-8), for a 2-D float64 ``w`` holding float32 values.

    Forward values are the float32 broadcast's: the scale is the float32 ``amax/t_b`` and the codes come from the
    float32 division ``w/s``. Gradient: ``dQ_i/dw_j = delta_ij`` (STE) plus ``dQ_i/ds = q_i - w_i/s`` times
    ``ds/dw = M sign(w) / t_b`` (autograd of amax, ties split evenly), all in float64.
    """
    t = qmax(bits)
    amax = _amax(w, granularity)
    s32 = torch.clamp(amax.detach().float() / t, min=1e-8)  # the float32 scale that goes on the wire
    codes = torch.clamp(torch.round(w.detach().float() / s32), -t, t)  # float32 w/s, as the broadcast
    s = torch.clamp(amax / t, min=1e-8)
    s = s + (s32.double() - s).detach()  # value: the float32 scale; gradient: d(amax/t_b)/dw in float64
    u = w / s
    return s * (u + (codes.double() - u).detach())


def wire_act(x: torch.Tensor) -> torch.Tensor:
    """Dynamic per-tensor int8 activation quantization of a float32 ``x`` as the client computes it (float32
    scale ``amax|x|/127`` and codes), returned as float64 ``s_x q_x`` (no gradient: ``x`` is data)."""
    x = x.float()
    s = torch.clamp(x.abs().amax() / 127, min=1e-8)
    return (torch.clamp(torch.round(x / s), -127, 127) * s).double()


def float64_code_mismatches(w32: torch.Tensor, bits: int, granularity: str) -> int:
    """How many codes a float64 re-quantization of the float32 weight ``w32`` gets differently from the float32
    broadcast (what the old relay did)."""
    t = qmax(bits)
    out = []
    for w in (w32.float(), w32.double()):
        out.append(torch.clamp(torch.round(w / torch.clamp(_amax(w, granularity) / t, min=1e-8)), -t, t))
    return int((out[0] != out[1]).sum())


def max_abs_positions(w: torch.Tensor, granularity: str) -> torch.Tensor:
    """Boolean mask of the max-abs entries of each tensor / channel (axis 0) of a 2-D ``w``."""
    return w.abs() == _amax(w, granularity)
