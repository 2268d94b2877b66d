"""Client upload encoding of float gradients / deltas (``--uplink-bits``; spec 2.2 steps 3-5, DESIGN step 3).

Encodings, self-described by the array dtypes in the :class:`flwr.app.ArrayRecord`:

* 32: ``key`` -> float32 array shaped like the tensor.
* 16: ``key`` -> float16 array (values beyond ±65504 overflow to inf and are rejected by :func:`decode_update`).
* 8: ``key`` -> int8 codes in ``[-127, 127]`` with **unbiased stochastic rounding** and ``key::scale`` -> float32
  scale: per channel (``[out]``, axis 0) for tensors with 2 or more dims, per tensor (0-d) for 0-d/1-D tensors
  (biases, norm parameters: a per-element scale would cost more than float32). ``E[scale * codes] = tensor``.

* 4: ``key`` -> int4 codes in ``[-7, 7]``, unbiased stochastic rounding, packed two per byte as uint8
  ``[ceil(numel/2)]`` (:mod:`fedaqt.quant.pack`, the broadcast's layout) and ``key::scale`` -> float32 scale with
  the same per-channel / per-tensor rule as 8 bits (issue 17). The packed array does not carry the tensor's shape:
  :func:`decode_update` takes it from ``expected``. FedAvg final codes of a 4-bit layer travel in this form too.

A decoder tells them apart by dtype: float32, float16, int8 accompanied by ``key::scale``, or uint8 (packed int4)
accompanied by ``key::scale``.
This module imports nothing from other fedaqt packages.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from .npy import from_array, to_array
from .pack import check_packed_int4, pack_int4, packed_int4_nbytes, unpack_int4
from .wire import SCALE_SUFFIX, numpy_to_tensor

__all__ = ["UPLINK_BITS", "encode_tensor_uplink", "encode_update", "decode_update", "stochastic_round_int8",
           "stochastic_round_int4", "stochastic_round_shared"]

UPLINK_BITS: tuple[int, ...] = (32, 16, 8, 4)
_T8 = 127
_T4 = 7
_F32_TINY = float(np.finfo(np.float32).tiny)


def _check_bits(uplink_bits: int) -> None:
    if isinstance(uplink_bits, bool) or uplink_bits not in UPLINK_BITS:
        raise ValueError(f"uplink_bits must be one of {UPLINK_BITS}, got {uplink_bits!r}")


def stochastic_round_int8(
    t: torch.Tensor, generator: Optional[torch.Generator] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unbiased stochastic int8 quantization: ``q = floor(u) + 1[r < u - floor(u)]``, ``u = t / s``.

    Args:
        t: finite floating tensor (any device; computed on CPU in float64).
        generator: CPU ``torch.Generator`` for the uniforms ``r``; None uses the global RNG.

    Returns:
        ``(codes int8 [t.shape] in [-127, 127], scale float32)`` on CPU, scale per channel ``[out]`` for
        ``t.dim() >= 2`` else 0-d. The float32 scale is the max-abs scale ``max|t|/127`` rounded *up* if needed so
        that ``|t/s| <= 127``; hence ``E[s * q] = t`` exactly (no clamping bias).

    Raises:
        ValueError: ``t`` is not floating or holds non-finite values.
    """
    return _stochastic_round(t, _T8, generator, "int8")


def stochastic_round_int4(
    t: torch.Tensor, generator: Optional[torch.Generator] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unbiased stochastic int4 quantization (issue 17): as :func:`stochastic_round_int8` with ``t_4 = 7``.

    Returns:
        ``(codes int8 [t.shape] in [-7, 7] (unpacked; :func:`fedaqt.quant.pack.pack_int4` packs them), scale
        float32)``: per channel ``[out]`` for ``t.dim() >= 2`` else 0-d, ``max|t|/7`` rounded up so that
        ``|t/s| <= 7``; ``E[s * q] = t``.

    Raises:
        ValueError: ``t`` is not floating or holds non-finite values.
    """
    return _stochastic_round(t, _T4, generator, "int4")


def _stochastic_round(t: torch.Tensor, tmax: int, generator: Optional[torch.Generator],
                      name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not t.dtype.is_floating_point:
        raise ValueError(f"expected a floating tensor, got {t.dtype}")
    x = t.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"cannot {name}-encode a tensor with non-finite values")
    per_channel = x.dim() >= 2
    if per_channel:
        amax = x.abs().reshape(x.shape[0], -1).amax(dim=1) if x.numel() else x.new_zeros(x.shape[0])
    else:
        amax = x.abs().amax() if x.numel() else x.new_zeros(())
    s32 = (amax / tmax).clamp_min(_F32_TINY).to(torch.float32)
    too_small = amax / s32.to(torch.float64) > tmax
    if bool(too_small.any()):
        s32 = torch.where(too_small, torch.nextafter(s32, torch.full_like(s32, float("inf"))), s32)
    s64 = s32.to(torch.float64)
    sb = s64.reshape((-1,) + (1,) * (x.dim() - 1)) if per_channel else s64
    u = x / sb
    lo = torch.floor(u)
    r = torch.rand(u.shape, generator=generator, dtype=torch.float64)
    q = lo + (r < (u - lo)).to(torch.float64)
    q = q.clamp_(-tmax, tmax)
    return q.to(torch.int8), s32


def stochastic_round_shared(t: torch.Tensor, scale: float, generator: Optional[torch.Generator] = None,
                            tmax: int = _T8) -> tuple[torch.Tensor, int]:
    """Unbiased stochastic rounding onto a *given* (shared, per-round) scale, for secure aggregation (issue 15).

    ``q = clamp(floor(u) + 1[r < u - floor(u)], -tmax, tmax)``, ``u = t / scale``: every client of a round rounds
    onto the same grid, so the integer codes can be summed under masks (:mod:`fedaqt.server.secagg`) and
    ``scale * sum_k q_k`` is the sum of the clients' dequantized updates exactly. ``E[scale * q] = t`` for elements
    with ``|t| <= tmax * scale``; larger ones are clipped (biased), and counted.

    Args:
        t: finite floating tensor (computed on CPU in float64).
        scale: the shared scale, finite and > 0.
        generator: CPU generator for the uniforms ``r`` (None: torch's global one).
        tmax: largest code magnitude (127 for int8).

    Returns:
        ``(codes int8 tensor [t.shape] in [-tmax, tmax], number of clipped elements)``.

    Raises:
        ValueError: ``scale`` not finite and > 0, a non-floating ``t`` or non-finite values.
    """
    if not (isinstance(scale, (int, float)) and np.isfinite(scale) and scale > 0):
        raise ValueError(f"shared scale must be a finite number > 0, got {scale!r}")
    if not t.dtype.is_floating_point:
        raise ValueError(f"expected a floating tensor, got {t.dtype}")
    x = t.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("cannot encode a tensor with non-finite values")
    u = x / float(scale)
    lo = torch.floor(u)
    r = torch.rand(u.shape, generator=generator, dtype=torch.float64)
    q = lo + (r < (u - lo)).to(torch.float64)
    clipped = int((q.abs() > tmax).sum())
    return q.clamp_(-tmax, tmax).to(torch.int8), clipped


def encode_tensor_uplink(
    t: torch.Tensor,
    uplink_bits: int,
    generator: Optional[torch.Generator] = None,
    key: str = "",
) -> dict[str, np.ndarray]:
    """Encode one float tensor for upload (used from a layer's weight-gradient hook).

    Args:
        t: floating tensor (gradient or delta), any shape/device.
        uplink_bits: 32 (float32), 16 (float16), 8 (int8 stochastic rounding + float32 scale) or 4 (int4
            stochastic rounding packed two per byte, uint8 ``[ceil(numel/2)]``, + float32 scale).
        generator: CPU generator for the 8/4-bit stochastic rounding (ignored otherwise).
        key: prefix of the returned keys (the state key).

    Returns:
        ``{key: array}`` for 32/16 bits; ``{key: int8 codes, key + "::scale": float32 scale}`` for 8 bits;
        ``{key: uint8 packed codes, key + "::scale": float32 scale}`` for 4 bits.
        Put the entries into an ArrayRecord as :class:`flwr.app.Array` (see :func:`encode_update`).

    Raises:
        ValueError: bad ``uplink_bits``, non-floating ``t``, or non-finite values with 8/4 bits.
    """
    _check_bits(uplink_bits)
    if not t.dtype.is_floating_point:
        raise ValueError(f"{key or 'tensor'}: expected a floating tensor, got {t.dtype}")
    if uplink_bits == 8:
        try:
            codes, s = stochastic_round_int8(t, generator)
        except ValueError as e:
            raise ValueError(f"{key or 'tensor'}: {e}") from None
        return {key: codes.numpy(), key + SCALE_SUFFIX: s.numpy()}
    if uplink_bits == 4:
        try:
            codes, s = stochastic_round_int4(t, generator)
        except ValueError as e:
            raise ValueError(f"{key or 'tensor'}: {e}") from None
        return {key: pack_int4(codes).numpy(), key + SCALE_SUFFIX: s.numpy()}
    dtype = torch.float32 if uplink_bits == 32 else torch.float16
    return {key: np.array(t.detach().to("cpu", dtype).numpy(), copy=True, order="C")}


def encode_update(
    tensors: Mapping[str, torch.Tensor],
    uplink_bits: int,
    generator: Optional[torch.Generator] = None,
) -> ArrayRecord:
    """Encode a client update ``{state_key: float tensor}`` into an ArrayRecord (see module docstring).

    Raises:
        ValueError: bad ``uplink_bits``, a key ending in ``::scale``, a non-floating tensor, or non-finite values
            with 8 bits (naming the key).
    """
    _check_bits(uplink_bits)
    arrays: dict[str, Array] = {}
    for k, t in tensors.items():
        if k.endswith(SCALE_SUFFIX):
            raise ValueError(f"update key {k!r} ends with the reserved suffix {SCALE_SUFFIX!r}")
        for kk, a in encode_tensor_uplink(t, uplink_bits, generator, key=k).items():
            arrays[kk] = to_array(a)
    return ArrayRecord(arrays)


def _load_npy(arrays: ArrayRecord, key: str) -> np.ndarray:
    """``arrays[key]`` as an ndarray; ValueError naming the key when the payload is not one ``.npy`` array
    (empty bytes, an ``.npz`` zip, garbage, a non-numpy serialization type)."""
    try:
        a = from_array(arrays[key])  # read-only view; decode_update copies
    except Exception as exc:  # noqa: BLE001 - np.load raises EOFError/ValueError/OSError/... for bad bytes
        raise ValueError(f"{key}: payload is not a .npy array ({type(exc).__name__}: {exc})") from None
    if not isinstance(a, np.ndarray):
        close = getattr(a, "close", None)
        if callable(close):
            close()
        raise ValueError(f"{key}: payload is not a .npy array (got {type(a).__name__})")
    return a


def decode_update(
    arrays: ArrayRecord,
    expected: Optional[Mapping[str, Sequence[int]]] = None,
    uplink_bits: Optional[int] = None,
) -> dict[str, torch.Tensor]:
    """Decode and validate a client update (the server rejects replies that fail, DESIGN step 3).

    Args:
        arrays: the reply's ArrayRecord from :func:`encode_update`.
        expected: optional ``{state_key: shape}``; then the keys must match exactly and shapes must agree.
            Required for packed int4 entries (uint8), whose arrays do not carry the shape.
        uplink_bits: optional; when given, every tensor must use that encoding.

    Returns:
        ``{state_key: float32 CPU tensor}`` (int8 / packed int4 entries dequantized ``scale * codes``, exactly:
        float32 ``scale`` times a small integer).

    Raises:
        ValueError: naming the key, for a missing or unexpected key, a wrong shape, a wrong dtype (anything but
            float32/float16/int8-with-scale/uint8-with-scale, or not the required ``uplink_bits``), int8 codes of
            -128, packed int4 codes of -8 or of the wrong length or without ``expected``, a scale that
            is not float32 of shape ``()``/``[out]``, a stray ``::scale`` array, non-finite values, or a payload
            that is not a ``.npy`` array (empty, zip, garbage).
    """
    if uplink_bits is not None:
        _check_bits(uplink_bits)
    keys = list(arrays.keys())
    base = [k for k in keys if not k.endswith(SCALE_SUFFIX)]
    bset = set(base)
    for k in keys:
        if k.endswith(SCALE_SUFFIX) and k[: -len(SCALE_SUFFIX)] not in bset:
            raise ValueError(f"{k}: scale array without its codes")
    if expected is not None:
        missing = [k for k in expected if k not in bset]
        if missing:
            raise ValueError(f"{missing[0]}: missing from the update")
        extra = [k for k in base if k not in expected]
        if extra:
            raise ValueError(f"{extra[0]}: unexpected key in the update")
    out: dict[str, torch.Tensor] = {}
    for k in base:
        a = _load_npy(arrays, k)
        sk = k + SCALE_SUFFIX
        if a.dtype == np.uint8:
            bits = 4
            t = _decode_packed_int4(arrays, k, a, expected)
        elif expected is not None and tuple(a.shape) != tuple(int(d) for d in expected[k]):
            raise ValueError(f"{k}: shape {tuple(a.shape)} != expected {tuple(int(d) for d in expected[k])}")
        elif a.dtype == np.int8:
            bits = 8
            if sk not in arrays:
                raise ValueError(f"{k}: int8 codes without a {SCALE_SUFFIX!r} array")
            s = _load_npy(arrays, sk)
            if s.dtype != np.float32:
                raise ValueError(f"{k}: scale must be float32, got {s.dtype}")
            want = (a.shape[0],) if a.ndim >= 2 else ()
            if tuple(s.shape) != want:
                raise ValueError(f"{k}: scale shape {tuple(s.shape)} != expected {want}")
            if not np.isfinite(s).all() or (s < 0).any():
                raise ValueError(f"{k}: non-finite or negative scale")
            if a.size and int(a.min()) < -_T8:
                raise ValueError(f"{k}: int8 codes must lie in [-127, 127]")
            codes = torch.from_numpy(np.array(a, copy=True)).to(torch.float32)
            st = numpy_to_tensor(s)
            if a.ndim >= 2:
                st = st.reshape((-1,) + (1,) * (a.ndim - 1))
            t = codes * st
        elif a.dtype in (np.float32, np.float16):
            bits = 32 if a.dtype == np.float32 else 16
            if sk in arrays:
                raise ValueError(f"{k}: unexpected scale array for a {a.dtype} tensor")
            if not np.isfinite(a).all():
                raise ValueError(f"{k}: non-finite values in the update")
            t = numpy_to_tensor(a).to(torch.float32)
        else:
            raise ValueError(f"{k}: unsupported dtype {a.dtype} (allowed: float32, float16, int8 + scale, "
                             "uint8 packed int4 + scale)")
        if uplink_bits is not None and bits != uplink_bits:
            raise ValueError(f"{k}: encoded with {bits} bits, expected uplink_bits={uplink_bits}")
        # codes x scale can overflow float32; a float payload was checked above (np.isfinite), no second pass
        if bits < 16 and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{k}: non-finite values in the update")
        out[k] = t
    return out


def _decode_packed_int4(arrays: ArrayRecord, k: str, a: np.ndarray,
                        expected: Optional[Mapping[str, Sequence[int]]]) -> torch.Tensor:
    """One packed int4 entry (uint8 ``[ceil(numel/2)]`` + ``k::scale``) -> float32 ``scale * codes`` shaped as
    ``expected[k]``. Raises ValueError naming ``k``."""
    if expected is None:
        raise ValueError(f"{k}: packed int4 codes need the expected shape to decode")
    shape = tuple(int(d) for d in expected[k])
    numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if a.ndim != 1 or a.shape[0] != packed_int4_nbytes(numel):
        raise ValueError(f"{k}: packed int4 codes of shape {tuple(a.shape)} != ({packed_int4_nbytes(numel)},) "
                         f"for shape {shape}")
    sk = k + SCALE_SUFFIX
    if sk not in arrays:
        raise ValueError(f"{k}: packed int4 codes without a {SCALE_SUFFIX!r} array")
    s = _load_npy(arrays, sk)
    if s.dtype != np.float32:
        raise ValueError(f"{k}: scale must be float32, got {s.dtype}")
    want = (shape[0],) if len(shape) >= 2 else ()
    if tuple(s.shape) != want:
        raise ValueError(f"{k}: scale shape {tuple(s.shape)} != expected {want}")
    if not np.isfinite(s).all() or (s < 0).any():
        raise ValueError(f"{k}: non-finite or negative scale")
    packed = torch.from_numpy(np.array(a, copy=True))
    try:
        check_packed_int4(packed, numel, _T4)
    except ValueError as e:
        raise ValueError(f"{k}: {e}") from None
    codes = unpack_int4(packed, numel).reshape(shape).to(torch.float32)
    st = numpy_to_tensor(s)
    if len(shape) >= 2:
        st = st.reshape((-1,) + (1,) * (len(shape) - 1))
    return codes * st
