"""Broadcast wire format in Flower records (DESIGN "Data flow" step 1-2, spec 2.2 step 1, 2.6 "Payload").

``encode_broadcast`` turns the server's float state into

* an :class:`flwr.app.ArrayRecord` with, for every quantized key ``k``: ``k`` -> int8 codes (8 bits, weight shape)
  or int4 codes packed two per byte as uint8 ``[ceil(numel/2)]`` (4 bits, see :mod:`fedaqt.quant.pack`), and
  ``k::scale`` -> float32 scale (``()`` per tensor, ``[out]`` per channel); every other floating tensor as
  float32 (non-floating buffers such as int64 counters keep their integer dtype);
* a :class:`flwr.app.ConfigRecord` with the metadata, all under the ``quant.`` prefix so it can share a record
  with the train config::

      quant.format      "fedaqt.broadcast/1"
      quant.bits        32 | 8 | 4
      quant.granularity "tensor" | "channel"
      quant.keys        [str]   quantized keys, in order
      quant.key_bits    [int]   bit-width per key (8 or 4)
      quant.key_axis    [int]   -1 per tensor, 0 per channel
      quant.key_shapes  [str]   weight shape per key, comma separated ("" for 0-d)

Arrays travel as ``.npy`` bytes (no pickles); bfloat16 never crosses (it is converted to float32).
This module imports nothing from other fedaqt packages.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Mapping, Optional

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord

from .convert import quant_layers
from .npy import from_array, to_array
from .pack import check_packed_int4, pack_int4, packed_int4_nbytes, unpack_int4
from .quantize import check_granularity, dequantize, qmax, quantize

__all__ = [
    "WIRE_FORMAT",
    "SCALE_SUFFIX",
    "BROADCAST_BITS",
    "QTensor",
    "encode_broadcast",
    "decode_broadcast",
    "record_nbytes",
    "npy_header_nbytes",
    "expected_payload_bytes",
    "tensor_to_numpy",
    "numpy_to_tensor",
    "load_broadcast",
    "load_client_broadcast",
]

WIRE_FORMAT = "fedaqt.broadcast/1"
SCALE_SUFFIX = "::scale"
BROADCAST_BITS: tuple[int, ...] = (32, 8, 4)

_K_FORMAT = "quant.format"
_K_BITS = "quant.bits"
_K_GRAN = "quant.granularity"
_K_KEYS = "quant.keys"
_K_KBITS = "quant.key_bits"
_K_AXIS = "quant.key_axis"
_K_SHAPES = "quant.key_shapes"


class QTensor:
    """A received quantized weight.

    Attributes:
        codes: int8 tensor shaped like the weight (values in ``[-t_b, t_b]``). For a 4-bit weight decoded from the
            wire it is computed on access (a fresh unpacked copy of :attr:`packed`).
        scale: float32 tensor, ``()`` per tensor or ``[out]`` per channel.
        bits: 8 or 4.
        granularity: ``"tensor"`` or ``"channel"``.
        packed: the 4-bit codes as received, uint8 ``[ceil(numel/2)]`` two per byte (:mod:`fedaqt.quant.pack`),
            or None (then ``codes`` is stored).
        shape: the weight's shape.

    Construct with ``QTensor(codes=..., scale=..., bits=..., granularity=...)`` or, packed,
    ``QTensor(scale=..., bits=4, granularity=..., packed=..., shape=...)``.

    Raises:
        ValueError: neither ``codes`` nor ``packed`` (with ``shape``) given.
    """

    __slots__ = ("_codes", "scale", "bits", "granularity", "packed", "_shape")

    def __init__(self, codes: Optional[torch.Tensor] = None, scale: Optional[torch.Tensor] = None, bits: int = 8,
                 granularity: str = "tensor", packed: Optional[torch.Tensor] = None,
                 shape: Optional[Iterable[int]] = None) -> None:
        if codes is None and (packed is None or shape is None):
            raise ValueError("QTensor needs codes, or packed codes and the weight shape")
        self._codes = codes
        self.scale = scale
        self.bits = int(bits)
        self.granularity = granularity
        self.packed = packed
        self._shape = torch.Size(shape) if shape is not None else torch.Size(codes.shape)

    @property
    def codes(self) -> torch.Tensor:
        if self._codes is not None:
            return self._codes
        return unpack_int4(self.packed, self._shape.numel()).reshape(self._shape)

    @property
    def shape(self) -> torch.Size:
        return self._shape

    def storage(self) -> torch.Tensor:
        """The codes as held: ``packed`` when set, else ``codes`` (no copy)."""
        return self.packed if self.packed is not None else self._codes

    def load_into(self, layer: Any) -> None:
        """``layer.load_quantized`` with the codes as held (a packed weight goes straight into the layer's packed
        buffer)."""
        if self.packed is not None:
            layer.load_quantized(self.packed, self.scale, packed=True)
        else:
            layer.load_quantized(self._codes, self.scale)

    def dequantize(self) -> torch.Tensor:
        """``s * q`` as a float32 tensor shaped like the weight (spec 1.1)."""
        return dequantize(self.codes, self.scale)

    def __repr__(self) -> str:
        return (f"QTensor(shape={tuple(self._shape)}, bits={self.bits}, granularity={self.granularity!r}, "
                f"packed={self.packed is not None})")


def tensor_to_numpy(t: torch.Tensor) -> np.ndarray:
    """Detached, contiguous CPU numpy copy of ``t`` (bfloat16 -> float32; bfloat16 never crosses a record)."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        t = t.to(torch.float32)
    return np.array(t.cpu().numpy(), copy=True, order="C")  # (np.ascontiguousarray would turn 0-d into 1-d)


def numpy_to_tensor(a: np.ndarray) -> torch.Tensor:
    """Torch tensor owning a copy of ``a``."""
    return torch.from_numpy(np.array(a, copy=True))


def _shape_str(shape: Iterable[int]) -> str:
    return ",".join(str(int(d)) for d in shape)


def _parse_shape(s: str, key: str) -> tuple[int, ...]:
    if s == "":
        return ()
    try:
        shape = tuple(int(p) for p in s.split(","))
    except ValueError:
        raise ValueError(f"{key}: bad shape metadata {s!r}") from None
    if any(d < 0 for d in shape):
        raise ValueError(f"{key}: bad shape metadata {s!r}")
    return shape


def encode_broadcast(
    state: Mapping[str, torch.Tensor],
    quantized_keys: Iterable[str],
    bits: int,
    granularity: str,
) -> tuple[ArrayRecord, ConfigRecord]:
    """Encode the server's float state for broadcast (spec 2.2 step 1).

    Quantized tensors are first cast to float32 and then quantized, so the scale that crosses the wire (float32) is
    exactly the one used for the codes; the server-side ``Q(w)`` the clients see is
    ``decode_broadcast(...)[k].dequantize()``.

    Args:
        state: ``{state_key: tensor}`` (e.g. ``model.state_dict()``), any device/dtype.
        quantized_keys: keys of ``state`` to quantize (e.g. :func:`fedaqt.quant.convert.quantized_weight_keys`);
            ignored when ``bits == 32``.
        bits: 32 (everything float32), 8 (int8 codes) or 4 (int4 packed two per byte, uint8).
        granularity: ``"tensor"`` or ``"channel"``.

    Returns:
        ``(arrays, config)`` as described in the module docstring.

    Raises:
        ValueError: bad ``bits``/``granularity``, a quantized key missing from ``state`` or not floating, a
            per-channel key that is 0-d, or a state key ending in ``::scale`` (each message names the key).
    """
    if isinstance(bits, bool) or bits not in BROADCAST_BITS:
        raise ValueError(f"broadcast bits must be one of {BROADCAST_BITS}, got {bits!r}")
    check_granularity(granularity)
    qkeys = [] if bits == 32 else list(dict.fromkeys(quantized_keys))
    for k in qkeys:
        if k not in state:
            raise ValueError(f"quantized key {k!r} is not in the state dict")
        if not state[k].dtype.is_floating_point:
            raise ValueError(f"quantized key {k!r} has non-floating dtype {state[k].dtype}")
        if granularity == "channel" and state[k].dim() == 0:
            raise ValueError(f"quantized key {k!r} is 0-d and cannot be quantized per channel")
    qset = set(qkeys)
    arrays: dict[str, Array] = {}
    for k, t in state.items():
        if k.endswith(SCALE_SUFFIX):
            raise ValueError(f"state key {k!r} ends with the reserved suffix {SCALE_SUFFIX!r}")
        if k in qset:
            codes, s = quantize(t.detach().to(torch.float32), bits, granularity)
            if bits == 4:
                arrays[k] = to_array(tensor_to_numpy(pack_int4(codes)))
            else:
                arrays[k] = to_array(tensor_to_numpy(codes))
            arrays[k + SCALE_SUFFIX] = to_array(tensor_to_numpy(s.to(torch.float32)))
        elif t.dtype.is_floating_point:
            arrays[k] = to_array(tensor_to_numpy(t.detach().to(torch.float32)))
        else:
            arrays[k] = to_array(tensor_to_numpy(t))
    config = ConfigRecord(
        {
            _K_FORMAT: WIRE_FORMAT,
            _K_BITS: int(bits),
            _K_GRAN: granularity,
            _K_KEYS: qkeys,
            _K_KBITS: [int(bits)] * len(qkeys),
            _K_AXIS: [(-1 if granularity == "tensor" else 0)] * len(qkeys),
            _K_SHAPES: [_shape_str(state[k].shape) for k in qkeys],
        }
    )
    return ArrayRecord(arrays), config


def decode_broadcast(arrays: ArrayRecord, config: ConfigRecord) -> dict[str, QTensor | torch.Tensor]:
    """Decode a broadcast (spec 2.2 step 2) and validate it: ``dict(iter_decode_broadcast(arrays, config))``.

    Args:
        arrays, config: as produced by :func:`encode_broadcast` (the config may hold other, non-``quant.`` keys).

    Returns:
        ``{state_key: QTensor}`` for quantized keys (codes unpacked to int8) and ``{state_key: tensor}`` for the
        rest (float32, or the integer dtype for non-floating buffers), in record order.

    Raises:
        ValueError: missing/unknown format, inconsistent metadata, a quantized key without its codes or scale, a
            wrong dtype or shape, codes outside ``[-t_b, t_b]``, a negative or non-finite scale, a non-finite float
            tensor, or a stray ``::scale`` array. The message names the key.
    """
    return dict(iter_decode_broadcast(arrays, config))


def iter_decode_broadcast(arrays: ArrayRecord, config: ConfigRecord,
                          release: bool = False) -> Iterator[tuple[str, QTensor | torch.Tensor]]:
    """:func:`decode_broadcast` one tensor at a time, so a client can load each into its model and never hold the
    whole decoded broadcast. The metadata and the presence of every codes/scale array are checked before the
    first item; each tensor's own checks run when it is reached (same errors as :func:`decode_broadcast`).

    Args:
        release: delete each array (and its ``::scale``) from ``arrays`` once decoded, so the received bytes
            are freed as the decoding proceeds (the caller must own the record).

    Yields:
        ``(state_key, QTensor or tensor)`` in record order.
    """
    fmt = config.get(_K_FORMAT)
    if fmt != WIRE_FORMAT:
        raise ValueError(f"{_K_FORMAT}: expected {WIRE_FORMAT!r}, got {fmt!r}")
    meta = {}
    for mk in (_K_KEYS, _K_KBITS, _K_AXIS, _K_SHAPES):
        v = config.get(mk)
        if not isinstance(v, list):
            raise ValueError(f"{mk}: expected a list in the broadcast config, got {type(v).__name__}")
        meta[mk] = v
    n = len(meta[_K_KEYS])
    for mk, v in meta.items():
        if len(v) != n:
            raise ValueError(f"{mk}: has {len(v)} entries, expected {n} (one per quantized key)")
    if len(set(meta[_K_KEYS])) != n:
        raise ValueError(f"{_K_KEYS}: duplicate keys")

    qinfo = {}
    for key, kb, axis, shp in zip(meta[_K_KEYS], meta[_K_KBITS], meta[_K_AXIS], meta[_K_SHAPES]):
        if not isinstance(key, str):
            raise ValueError(f"{_K_KEYS}: keys must be strings, got {key!r}")
        if kb not in (8, 4) or isinstance(kb, bool):
            raise ValueError(f"{key}: bits must be 8 or 4, got {kb!r}")
        if axis not in (-1, 0) or isinstance(axis, bool):
            raise ValueError(f"{key}: axis must be -1 (per tensor) or 0 (per channel), got {axis!r}")
        if not isinstance(shp, str):
            raise ValueError(f"{key}: shape metadata must be a string, got {shp!r}")
        qinfo[key] = (int(kb), int(axis), _parse_shape(shp, key))

    keys = list(arrays.keys())
    for k in keys:
        if k.endswith(SCALE_SUFFIX) and k[: -len(SCALE_SUFFIX)] not in qinfo:
            raise ValueError(f"{k}: scale array without a quantized key in the config")
    for key in qinfo:
        if key not in arrays:
            raise ValueError(f"{key}: quantized key listed in the config but missing from the arrays")
        if key + SCALE_SUFFIX not in arrays:
            raise ValueError(f"{key}: missing scale array {key + SCALE_SUFFIX!r}")

    for k in keys:
        if k.endswith(SCALE_SUFFIX):
            continue
        a = from_array(arrays[k])  # a read-only view: copied below
        if k in qinfo:
            value: QTensor | torch.Tensor = _decode_qtensor(k, a, from_array(arrays[k + SCALE_SUFFIX]), *qinfo[k])
        else:
            if a.dtype.kind == "f":
                if a.dtype != np.float32:
                    raise ValueError(f"{k}: float tensors must be float32 on the wire, got {a.dtype}")
                if not np.isfinite(a).all():
                    raise ValueError(f"{k}: non-finite values in the broadcast")
            elif a.dtype.kind not in "iub":
                raise ValueError(f"{k}: unsupported dtype {a.dtype}")
            # from_array gave a read-only view of the record's bytes: the tensor owns a copy
            value = torch.from_numpy(a if a.flags.writeable else np.array(a, copy=True))
        del a
        if release:
            del arrays[k]
            if k in qinfo:
                del arrays[k + SCALE_SUFFIX]
        yield k, value
        del value


def _decode_qtensor(key: str, a: np.ndarray, s: np.ndarray, bits: int, axis: int,
                    shape: tuple[int, ...]) -> QTensor:
    numel = int(np.prod(shape)) if shape else 1
    if bits == 8:
        if a.dtype != np.int8:
            raise ValueError(f"{key}: 8-bit codes must be int8, got {a.dtype}")
        if tuple(a.shape) != shape:
            raise ValueError(f"{key}: codes shape {tuple(a.shape)} != metadata shape {shape}")
        codes = numpy_to_tensor(a)
    else:
        if a.dtype != np.uint8:
            raise ValueError(f"{key}: packed 4-bit codes must be uint8, got {a.dtype}")
        if tuple(a.shape) != (packed_int4_nbytes(numel),):
            raise ValueError(f"{key}: packed codes shape {tuple(a.shape)} != ({packed_int4_nbytes(numel)},) "
                             f"for weight shape {shape}")
        packed = numpy_to_tensor(a)
        try:  # checked packed (no unpacked copy): the client loads these bytes straight into its layer
            check_packed_int4(packed, numel, 8)
        except ValueError as e:
            raise ValueError(f"{key}: {e}") from None
        if packed.numel() and bool(((packed & 0xF) == 8).any() or ((packed >> 4) == 8).any()):
            raise ValueError(f"{key}: codes outside [-{qmax(bits)}, {qmax(bits)}] for {bits}-bit weights")
        codes = None
    t = qmax(bits)
    if codes is not None and codes.numel() and (int(codes.min()) < -t or int(codes.max()) > t):
        raise ValueError(f"{key}: codes outside [-{t}, {t}] for {bits}-bit weights")
    if s.dtype != np.float32:
        raise ValueError(f"{key}: scale must be float32, got {s.dtype}")
    want = () if axis == -1 else ((shape[0],) if shape else None)
    if want is None or tuple(s.shape) != want:
        raise ValueError(f"{key}: scale shape {tuple(s.shape)} does not match axis {axis} and weight shape {shape}")
    if not np.isfinite(s).all() or (s < 0).any():
        raise ValueError(f"{key}: scale must be finite and >= 0")
    gran = "tensor" if axis == -1 else "channel"
    if codes is None:
        return QTensor(scale=numpy_to_tensor(s), bits=bits, granularity=gran, packed=packed, shape=shape)
    return QTensor(codes=codes, scale=numpy_to_tensor(s), bits=bits, granularity=gran)


def record_nbytes(arrays: ArrayRecord) -> int:
    """Bytes on the wire: the sum of the serialized array data (``len(Array.data)``, i.e. raw data plus each
    array's ``.npy`` header, ~128 B), excluding the key strings."""
    return int(sum(len(a.data) for a in arrays.values()))


def npy_header_nbytes(arrays: ArrayRecord) -> int:
    """Total ``.npy`` header overhead of a record: ``record_nbytes - sum of raw data bytes``."""
    raw = 0
    for a in arrays.values():
        raw += int(np.prod(a.shape, dtype=np.int64)) * np.dtype(a.dtype).itemsize
    return record_nbytes(arrays) - raw


def expected_payload_bytes(
    state: Mapping[str, torch.Tensor],
    quantized_keys: Iterable[str],
    bits: int,
    granularity: str,
    header_bytes_per_array: int = 0,
) -> int:
    """Spec 2.6 "Payload": ``sum numel*bytes_per_code + 4*#scales + 4*#float_params`` (+ headers).

    ``bytes_per_code`` is 1 for int8 and 0.5 for packed int4 (an odd count rounds up to whole bytes); ``#scales``
    is 1 per tensor or ``out`` per channel; non-floating buffers count their own item size. Add
    ``header_bytes_per_array`` times the number of arrays to compare with :func:`record_nbytes`.

    Raises:
        ValueError: bad ``bits``/``granularity``.
    """
    if bits not in BROADCAST_BITS:
        raise ValueError(f"broadcast bits must be one of {BROADCAST_BITS}, got {bits!r}")
    check_granularity(granularity)
    qset = set() if bits == 32 else set(quantized_keys)
    total = 0
    n_arrays = 0
    for k, t in state.items():
        numel = t.numel()
        if k in qset:
            total += numel if bits == 8 else packed_int4_nbytes(numel)
            total += 4 * (1 if granularity == "tensor" else int(t.shape[0]))
            n_arrays += 2
        else:
            total += numel * (4 if t.dtype.is_floating_point else t.element_size())
            n_arrays += 1
    return total + n_arrays * header_bytes_per_array


def load_broadcast(qmodel: torch.nn.Module, decoded: Mapping[str, QTensor | torch.Tensor], strict: bool = True) -> None:
    """Load a decoded broadcast into a converted (native quantized) model (spec 2.2 step 2).

    ``QTensor`` entries go to the quantized layer with that ``weight_key`` via ``load_quantized`` (codes and scale
    copied into the buffers; no float weight is created); tensors are copied into the parameter/buffer of the same
    name (cast to its dtype).

    Args:
        qmodel: model converted with :func:`fedaqt.quant.convert.convert_to_quantized`.
        decoded: output of :func:`decode_broadcast`.
        strict: require that every quantized layer and every float parameter/buffer of ``qmodel`` is covered and
            that no key is unknown.

    Raises:
        ValueError: naming the key, for an unknown/missing key, a QTensor for a float parameter (or vice versa),
            a bit-width or granularity that differs from the layer's, or a shape mismatch.
    """
    layers = quant_layers(qmodel)
    owned = {id(b) for layer in layers.values() for b in layer.buffers(recurse=False)}
    targets = dict(qmodel.named_parameters())
    targets.update({n: b for n, b in qmodel.named_buffers() if id(b) not in owned})
    seen = set()
    for key, v in decoded.items():
        if isinstance(v, QTensor):
            layer = layers.get(key)
            if layer is None:
                if strict:
                    raise ValueError(f"{key}: quantized tensor in the broadcast but no quantized layer in the model")
                continue
            if v.bits != layer.bits or v.granularity != layer.granularity:
                raise ValueError(f"{key}: broadcast has {v.bits}-bit {v.granularity} codes, layer expects "
                                 f"{layer.bits}-bit {layer.granularity}")
            v.load_into(layer)
        else:
            dst = targets.get(key)
            if dst is None:
                if key in layers:
                    raise ValueError(f"{key}: float tensor in the broadcast for a quantized layer")
                if strict:
                    raise ValueError(f"{key}: unknown key (not a parameter or buffer of the model)")
                continue
            if tuple(dst.shape) != tuple(v.shape):
                raise ValueError(f"{key}: shape {tuple(v.shape)} != model shape {tuple(dst.shape)}")
            with torch.no_grad():
                dst.copy_(v.to(device=dst.device, dtype=dst.dtype))
        seen.add(key)
    if strict:
        missing = [k for k in list(layers) + list(targets) if k not in seen]
        if missing:
            raise ValueError(f"{missing[0]}: missing from the broadcast ({len(missing)} missing in all)")


def load_client_broadcast(model: torch.nn.Module, decoded: Any) -> None:
    """Fill a client ``model`` (converted by its workload) with a decoded broadcast: a dict ``{key: QTensor or
    tensor}`` or an iterable of ``(key, value)`` pairs (:func:`fedaqt.quant.wire.iter_decode_broadcast`, loaded one
    at a time). Unlike :func:`fedaqt.quant.wire.load_broadcast` it also accepts quantized keys of layers kept float.

    Quantized keys with a native layer get its codes + scales; quantized keys of layers the workload does not
    convert (e.g. WrapNet's own layers) are dequantized into the float parameter; float tensors are copied.

    Raises:
        ValueError: a broadcast key the model does not have, or a model tensor the broadcast does not cover.
    """
    qlayers = quant_layers(model)
    tensors = dict(model.named_parameters())
    tensors.update({k: v for k, v in model.named_buffers() if v.is_floating_point() or k not in qlayers})
    covered = set()
    with torch.no_grad():
        for key, value in (decoded.items() if hasattr(decoded, "items") else decoded):
            if isinstance(value, QTensor):
                if key in qlayers:
                    value.load_into(qlayers[key])
                elif key in tensors:
                    tensors[key].copy_(value.dequantize().to(tensors[key].dtype))
                else:
                    raise ValueError(f"broadcast has quantized tensor {key!r} that the client model lacks")
            elif key in tensors:
                if tuple(tensors[key].shape) != tuple(value.shape):
                    raise ValueError(f"broadcast tensor {key!r} has shape {tuple(value.shape)}, model expects {tuple(tensors[key].shape)}")
                tensors[key].copy_(value.to(tensors[key].dtype))
            else:
                raise ValueError(f"broadcast has tensor {key!r} that the client model lacks")
            covered.add(key)
    missing = [k for k in list(qlayers) + [k for k, _ in model.named_parameters()] if k not in covered]
    if missing:
        raise ValueError(f"broadcast does not cover model tensors: {missing[:5]}{'...' if len(missing) > 5 else ''}")
