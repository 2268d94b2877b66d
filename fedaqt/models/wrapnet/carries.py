"""WrapNet carries (spec §3.5): Algorithm 1 :func:`carry_count` (with the ``1[v<0]`` fix), the closed form, the
differentiable surrogate, the carry-variance regularizer :class:`CarryVariance` (R_c, EMA running mean), and packed
adds with Python ints with and without buffer bits."""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn

from .quantizers import _ste


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
