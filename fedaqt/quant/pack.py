"""Int4 packing: two signed 4-bit codes per byte (spec 1.1 "for int4, optionally pack two per byte").

Layout: the codes are flattened in row-major order; element ``2k`` goes to the low nibble of byte ``k`` and element
``2k+1`` to the high nibble, each as a 4-bit two's-complement value. An odd count leaves the last high nibble 0.

This module imports nothing from other fedaqt packages.
"""

from __future__ import annotations

import torch

__all__ = ["pack_int4", "unpack_int4", "unpack_int4_fast", "check_packed_int4", "packed_int4_nbytes"]


def packed_int4_nbytes(numel: int) -> int:
    """Bytes needed to pack ``numel`` int4 codes: ``ceil(numel / 2)``."""
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    return (int(numel) + 1) // 2


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack int4 codes two per byte.

    Args:
        codes: int8 tensor (any shape, any device) with values in ``[-8, 7]``.

    Returns:
        uint8 tensor of shape ``[ceil(n/2)]`` (``n = codes.numel()``) on ``codes``' device.

    Raises:
        ValueError: ``codes`` is not int8, or a value lies outside ``[-8, 7]`` (the message gives the offending
            minimum/maximum).
    """
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.int8:
        raise ValueError(f"pack_int4 expects an int8 tensor, got {getattr(codes, 'dtype', type(codes))}")
    flat = codes.reshape(-1)
    n = flat.numel()
    if n:
        lo, hi = int(flat.min()), int(flat.max())
        if lo < -8 or hi > 7:
            raise ValueError(f"int4 codes must lie in [-8, 7], got values in [{lo}, {hi}]")
    if n % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    nib = (flat.to(torch.int16) & 0xF).to(torch.uint8)
    return (nib[0::2] | (nib[1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`.

    Args:
        packed: uint8 tensor of shape ``[ceil(numel/2)]`` (any 1-D-flattenable shape).
        numel: number of codes to return.

    Returns:
        int8 tensor of shape ``[numel]`` with values in ``[-8, 7]``; reshape it to the weight's shape.

    Raises:
        ValueError: ``packed`` is not uint8, its length is not ``ceil(numel/2)``, or the padding nibble of an odd
            count is not 0.
    """
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise ValueError(f"unpack_int4 expects a uint8 tensor, got {getattr(packed, 'dtype', type(packed))}")
    flat = packed.reshape(-1)
    need = packed_int4_nbytes(numel)
    if flat.numel() != need:
        raise ValueError(f"packed int4 data has {flat.numel()} bytes, expected ceil({numel}/2) = {need}")
    lo = (flat & 0xF).to(torch.int16)
    hi = (flat >> 4).to(torch.int16)
    out = torch.stack([lo, hi], dim=1).reshape(-1)
    if numel % 2 and int(out[-1]) != 0:
        raise ValueError("packed int4 data has a nonzero padding nibble for an odd number of codes")
    out = out[:numel]
    out = torch.where(out >= 8, out - 16, out)
    return out.to(torch.int8)


def unpack_int4_fast(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """:func:`unpack_int4` without the checks, for the layers' hot path (the buffer was validated when loaded).

    Args:
        packed: uint8 ``[ceil(numel/2)]`` as written by :func:`pack_int4`.
        numel: number of codes.

    Returns:
        int8 ``[numel]`` (a fresh tensor; sign-extended nibbles ``(n ^ 8) - 8``).
    """
    lo = ((packed & 0xF) ^ 8).view(torch.int8) - 8
    hi = ((packed >> 4) ^ 8).view(torch.int8) - 8
    out = torch.stack([lo, hi], dim=-1).reshape(-1)
    return out if out.numel() == numel else out[:numel]


def check_packed_int4(packed: torch.Tensor, numel: int, t: int = 7) -> None:
    """Validate packed int4 codes without unpacking them: uint8 of length ``ceil(numel/2)``, every nibble a code
    in ``[-t, t]`` (``t = 7``: the nibble ``8`` = -8 is rejected; ``t = 8`` allows it) and, for an odd ``numel``,
    a zero padding nibble.

    Raises:
        ValueError: naming the problem (dtype, length, the out-of-range value, the padding nibble).
    """
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise ValueError(f"packed int4 codes must be uint8, got {getattr(packed, 'dtype', type(packed))}")
    flat = packed.reshape(-1)
    need = packed_int4_nbytes(numel)
    if flat.numel() != need:
        raise ValueError(f"packed int4 data has {flat.numel()} bytes, expected ceil({numel}/2) = {need}")
    if numel % 2 and int(flat[-1]) >> 4 != 0:
        raise ValueError("packed int4 data has a nonzero padding nibble for an odd number of codes")
    if t < 8 and flat.numel() and bool(((flat & 0xF) == 8).any() or ((flat >> 4) == 8).any()):
        raise ValueError(f"int4 codes must lie in [-{t}, {t}], got -8")
