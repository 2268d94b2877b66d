"""Fast ``.npy`` codec for Flower's :class:`flwr.app.Array` (issue 16: per-round cost of a small model).

Flower's ``Array(ndarray)`` runs ``np.save`` into a ``BytesIO`` and ``Array.numpy()`` runs ``np.load``, which parses
the ``.npy`` header with ``ast.literal_eval`` every time: about 50 µs per tensor, whatever its size. A tiny
Conformer has ~124 tensors, and one round touches the whole model a dozen times (broadcast, each reply, the
aggregate, the checkpoint), so on a 2-core machine that header work alone was ~0.1 s of every round, on the
round's critical path. Why our own code and not a library: the format is Flower's (``stype "numpy.ndarray"``,
``np.save`` bytes), no library exposes a cached codec for it, and it is a few lines on top of numpy's own header
functions.

* :func:`to_array` gives **byte-identical** records to ``Array(ndarray)`` (the header of each ``(dtype, shape)`` is
  produced once by ``np.save`` itself and cached), for C-contiguous arrays; anything else goes through Flower.
* :func:`from_array` returns the same values, dtype and shape as ``Array.numpy()``: the header is parsed once per
  distinct header (numpy's ``read_array_header_1_0``) and cached; the data is a zero-copy, **read-only** view of the
  record's bytes (``writable=True`` gives a fresh copy, as ``np.load`` does). Headers it does not know how to read
  fast (format versions 2/3, Fortran order, object dtypes, a non-numpy ``stype``) go through ``Array.numpy()``,
  so every error Flower/numpy would raise is raised unchanged.

The caches are bounded (:data:`MAX_CACHED_HEADERS`; cleared when full), so a stream of odd shapes from a bad client
costs time, never memory. Imports nothing from other fedaqt packages.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
from flwr.app import Array

__all__ = ["to_array", "from_array", "MAX_CACHED_HEADERS"]

#: at most this many distinct headers (per direction) are cached
MAX_CACHED_HEADERS = 4096
_MAGIC_V1 = b"\x93NUMPY\x01\x00"
_STYPE = "numpy.ndarray"  # flwr.app.array.SType.NUMPY

_encode_headers: dict[tuple[str, tuple[int, ...]], bytes] = {}
_decode_headers: dict[bytes, tuple[np.dtype, tuple[int, ...], int]] = {}


def to_array(nd: np.ndarray) -> Array:
    """``Array(nd)`` with the ``.npy`` header cached per ``(dtype, shape)``: the same bytes, dtype, shape and stype.

    Args:
        nd: any numpy array; C-contiguous, non-object ones take the fast path (the bytes are ``header +
            nd.tobytes()``, one copy), others go through ``Array(nd)``.

    Raises:
        whatever ``Array(nd)`` raises (e.g. an object array: ``np.save`` refuses pickles).
    """
    if not isinstance(nd, np.ndarray) or nd.dtype.hasobject or not nd.flags.c_contiguous:
        return Array(nd)
    key = (nd.dtype.str, nd.shape)
    header = _encode_headers.get(key)
    if header is None:
        arr = Array(nd)  # numpy writes the header (version, padding, alignment) exactly as it always does
        header = arr.data[: len(arr.data) - nd.nbytes]
        if len(_encode_headers) >= MAX_CACHED_HEADERS:
            _encode_headers.clear()
        _encode_headers[key] = header
        return arr
    return Array(dtype=str(nd.dtype), shape=tuple(int(d) for d in nd.shape), stype=_STYPE,
                 data=b"".join((header, nd.data)))  # one copy (header + tobytes() would be two)


def _parse_header(data: bytes) -> tuple[np.dtype, tuple[int, ...], int] | None:
    """(dtype, shape, data offset) of a version-1.0, C-order, non-object ``.npy`` header; None otherwise."""
    if len(data) < 10 or data[:8] != _MAGIC_V1:
        return None
    offset = 10 + int.from_bytes(data[8:10], "little")
    header = data[:offset]
    hit = _decode_headers.get(header)
    if hit is not None:
        return hit
    try:
        # numpy's own parser (after the 8-byte magic + version), once per distinct header
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(io.BytesIO(header[8:]), max_header_size=10000)
    except Exception:  # noqa: BLE001 - an odd header: Array.numpy() raises (or reads) it as numpy would
        return None
    if fortran or dtype.hasobject:
        return None
    hit = (dtype, tuple(int(d) for d in shape), offset)
    if len(_decode_headers) >= MAX_CACHED_HEADERS:
        _decode_headers.clear()
    _decode_headers[header] = hit
    return hit


def from_array(a: Any, writable: bool = False) -> np.ndarray:
    """``a.numpy()`` for a Flower ``Array`` of ``stype "numpy.ndarray"``, without re-parsing a known header.

    Args:
        a: a :class:`flwr.app.Array`.
        writable: return a fresh, writable copy (what ``np.load`` returns); the default is a read-only view of
            ``a.data`` (no copy), which lives as long as the array that is returned.

    Returns:
        ndarray of the record's dtype and shape.

    Raises:
        TypeError: a non-numpy ``stype`` (from ``Array.numpy()``); ValueError/EOFError/...: bad bytes, as
        ``np.load`` raises them (a payload shorter or longer than its header says is sent to ``np.load``,
        which rejects it).
    """
    data = getattr(a, "data", None)
    parsed = _parse_header(data) if isinstance(data, bytes) and getattr(a, "stype", None) == _STYPE else None
    if parsed is not None:
        dtype, shape, offset = parsed
        count = math.prod(shape)
        if len(data) - offset == count * dtype.itemsize:
            out = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)
            return out.copy() if writable else out
    out = a.numpy()
    return out if (out.flags.writeable or not writable) else out.copy()
