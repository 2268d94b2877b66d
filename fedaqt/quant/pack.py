"""Int4 packing: two signed 4-bit codes per byte (spec 1.1 "for int4, optionally pack two per byte").

Layout: the codes are flattened in row-major order; element ``2k`` goes to the low nibble of byte ``k`` and element
``2k+1`` to the high nibble, each as a 4-bit two's-complement value. An odd count leaves the last high nibble 0.

This module imports nothing from other fedaqt packages.
"""

from __future__ import annotations

import torch

__all__ = ["pack_int4", "unpack_int4", "packed_int4_nbytes"]


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
