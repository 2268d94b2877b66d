"""One client round on the native quantized model (spec §2.2 steps 2-4), independent of Flower.

The Flower ClientApp (:mod:`fedaqt.client.app`) only decodes messages and calls :func:`client_round`. Keeping the
round a plain function lets tests and ``fedaqt profile`` run it without Ray. The local computation itself belongs
to the client algorithm (:mod:`fedaqt.algorithms`, ``--algorithm``); this module holds the round's plumbing.

Memory (issue 4). The upload is built *while* the gradients are produced, so the client never holds a float
gradient of the whole model:

* FedSGD: every quantized layer delivers its weight gradient to a hook (:meth:`QuantLayer.set_weight_grad_hook`)
  and every float parameter to a post-accumulate-grad hook; the hook encodes it into the :class:`UploadBuffer`
  at ``config.uplink_bits`` (float32, float16, or per-channel int8 with unbiased stochastic rounding) and the float
  gradient is dropped at once. No optimizer state exists on the client.
* FedAvg: the same hooks apply the local SGD step of a layer as soon as its gradient exists (re-quantizing it,
  spec §2.2 step 4), so no float gradient of the model exists either (momentum, when set, keeps one float buffer
  per tensor: optimizer state). A server that announces it (``accept-final-codes`` in the train config)
  receives the final codes + scales of the quantized layers instead of a float delta and forms the delta from
  what it sent (:func:`final_codes_arrays`); float parameters upload their delta at ``uplink_bits``.

``--bits 16`` is a profile-only setting (``fedaqt profile``, the float16 row of the dissertation's Table 3.2): the
client model is the float model in float16 (inputs cast to float16, outputs back to float32).
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from fedaqt.algorithms.base import ClientAlgorithm, LocalContext, algorithm_generator
from fedaqt.client.memory import MemoryProbe, MemoryProfile, profiling_requested
from fedaqt.config import RunConfig
from fedaqt.plugins import get_algorithm_class, get_workload_class
from fedaqt.quant.convert import quant_layers
from fedaqt.quant.layers import QuantLayer
from fedaqt.quant.pack import pack_int4, packed_int4_nbytes, unpack_int4_fast
from fedaqt.quant.uplink import encode_tensor_uplink, stochastic_round_int4
from fedaqt.quant.wire import SCALE_SUFFIX
from fedaqt.quant.wire import load_client_broadcast as load_broadcast  # noqa: F401  (moved to quant; name kept)
from fedaqt.workloads.base import Workload

#: client model bit-widths: 32/8/4 as in ``fedaqt run``; 16 = float16 float model (``fedaqt profile`` only)
CLIENT_BITS = (32, 16, 8, 4)

#: numpy's ``np.save`` writes a non-file object in chunks of 16 MiB (``numpy.lib.format.write_array``)
_NPY_WRITE_CHUNK = 16 * 2**20

# Per-process caches: a Ray actor runs many client rounds; the workload (data, features) and the model skeleton
# are built once per configuration and refilled with each broadcast.
_WORKLOADS: dict[str, Workload] = {}
_MODELS: dict[str, nn.Module] = {}


def _key(config: RunConfig) -> str:
    return json.dumps(config.to_dict(), sort_keys=True)


def get_workload(config: RunConfig) -> Workload:
    """The (cached) workload for ``config``. Raises UnknownPluginError for an unknown name."""
    key = _key(config)
    if key not in _WORKLOADS:
        _WORKLOADS[key] = get_workload_class(config.workload)(config)
    return _WORKLOADS[key]


def _half_io(model: nn.Module) -> None:
    """Cast floating inputs of ``model`` to float16 and floating outputs back to float32 (bits 16)."""

    def to_half(t: Any) -> Any:
        return t.half() if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    def to_float(t: Any) -> Any:
        return t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    model.register_forward_pre_hook(lambda m, args, kwargs: (tree_map(to_half, args), tree_map(to_half, kwargs)),
                                    with_kwargs=True)
    model.register_forward_hook(lambda m, args, out: tree_map(to_float, out))


def build_client_model(workload: Workload, config: RunConfig) -> nn.Module:
    """Float model skeleton converted to native quantized layers (``bits`` 8/4) by
    :meth:`Workload.convert_client_model` (default: the workload's ``quantize_filter``);
    ``bits == 32`` keeps the float model, ``bits == 16`` casts it to float16 (profile only).

    Raises:
        ValueError: ``config.bits`` not in :data:`CLIENT_BITS`.
    """
    if config.bits not in CLIENT_BITS:
        raise ValueError(f"client bits must be one of {CLIENT_BITS}, got {config.bits!r}")
    model = workload.build_model()
    if config.bits == 16:
        model = model.half()
        _half_io(model)
    elif config.bits < 16:
        model = workload.convert_client_model(model, config.bits, config.granularity)
    return model


def get_client_model(workload: Workload, config: RunConfig) -> nn.Module:
    key = _key(config)
    if key not in _MODELS:
        _MODELS[key] = build_client_model(workload, config)
    return _MODELS[key]


def float_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Floating-point buffers that are model state (BatchNorm statistics), excluding quant codes/scales."""
    qnames = set()
    for name, mod in model.named_modules():
        if hasattr(mod, "weight_key"):
            qnames.update(f"{name}.{b}" if name else b for b, _ in mod.named_buffers(recurse=False))
    return {k: v for k, v in model.named_buffers() if v.is_floating_point() and k not in qnames}


# ================================================================================================ upload buffer
def uplink_generator(seed: int, client_id: int, round_num: int) -> torch.Generator:
    """CPU generator of the int8 stochastic rounding, a deterministic function of (seed, client, round)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(client_id) & 0xFFFFFFFF, int(round_num), 0x75706C]).generate_state(1)
    return torch.Generator().manual_seed(int(state[0]))


class UploadBuffer:
    """The client's upload, encoded tensor by tensor as the values are produced (``--uplink-bits``).

    Entries follow :mod:`fedaqt.quant.uplink` exactly (so the server decodes them with ``decode_update``):

    * 32: ``key`` -> float32 tensor; 16: ``key`` -> float16 tensor;
    * 8: ``key`` -> int8 codes (unbiased stochastic rounding, ``E[s*q] = value``) + ``key::scale`` -> float32
      scale, per channel (``[out]``) for tensors with >= 2 dims, per tensor for 0-d/1-D tensors. Tensors with
      >= 2 dims are encoded in blocks of whole rows with :func:`encode_tensor_uplink` (identical per-channel
      scales; the float64 temporaries of the rounding stay below ``chunk_elems * 8`` bytes each);
    * 4: ``key`` -> int4 codes (unbiased stochastic rounding, ``t = 7``) packed two per byte, uint8
      ``[ceil(numel/2)]``, + ``key::scale`` float32 with the 8-bit per-channel / per-tensor rule; encoded in the
      same blocks of whole rows (an even number of codes per block, so each block packs on its own);
    * final codes (FedAvg, :meth:`add_final_codes`): ``key`` -> the layer's int8 codes (a 4-bit layer: its packed
      uint8 buffer) + ``key::scale`` float32.

    Values stay torch tensors (so the memory profile sees them) until :meth:`to_array_record`.

    Args:
        uplink_bits: 32, 16, 8 or 4.
        generator: CPU generator for the 8/4-bit rounding.
        probe: optional :class:`MemoryProbe`; encoded tensors are accounted as gradients.
        chunk_elems: block size of the 8/4-bit encoding (elements).

    Raises:
        ValueError: bad ``uplink_bits``.
    """

    def __init__(self, uplink_bits: int, generator: Optional[torch.Generator] = None,
                 probe: Optional[MemoryProbe] = None, chunk_elems: int = 1 << 14) -> None:
        if isinstance(uplink_bits, bool) or uplink_bits not in (32, 16, 8, 4):
            raise ValueError(f"uplink_bits must be one of (32, 16, 8, 4), got {uplink_bits!r}")
        self.uplink_bits = int(uplink_bits)
        self.generator = generator
        self.probe = probe
        self.chunk_elems = int(chunk_elems)
        self.entries: dict[str, dict[str, torch.Tensor]] = {}
        self.shapes: dict[str, torch.Size] = {}
        self._rows_done: dict[str, int] = {}
        self.final_code_keys: list[str] = []

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def keys(self) -> list[str]:
        return list(self.entries)

    # ------------------------------------------------------------------ encoding
    def _encode(self, key: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
        t = t.detach()
        if not t.dtype.is_floating_point:
            raise ValueError(f"{key}: expected a floating tensor, got {t.dtype}")
        if self.uplink_bits == 32:
            return {key: t.to("cpu", torch.float32)}
        if self.uplink_bits == 16:
            return {key: t.to("cpu", torch.float16)}
        if self.uplink_bits == 4:
            return self._encode4(key, t)
        if t.dim() < 2:
            enc = encode_tensor_uplink(t, 8, self.generator, key=key)
            return {k: torch.from_numpy(a) for k, a in enc.items()}
        rows = t.shape[0]
        per_row = max(1, t[0].numel()) if rows else 1
        step = max(1, self.chunk_elems // per_row)
        codes = torch.empty(t.shape, dtype=torch.int8)
        scale = torch.empty((rows,), dtype=torch.float32)
        for i in range(0, rows, step):
            enc = encode_tensor_uplink(t[i:i + step], 8, self.generator, key=key)
            codes[i:i + step] = torch.from_numpy(enc[key])
            scale[i:i + step] = torch.from_numpy(enc[key + SCALE_SUFFIX])
            del enc
        return {key: codes, key + SCALE_SUFFIX: scale}

    def _encode4(self, key: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
        """Packed int4 entry: stochastic rounding per block of whole rows (each block an even number of codes but
        the last, so its packed bytes land at ``offset / 2``); never an unpacked copy of the whole tensor."""
        try:
            if t.dim() < 2:
                codes, s = stochastic_round_int4(t, self.generator)
                return {key: pack_int4(codes), key + SCALE_SUFFIX: s}
            rows = t.shape[0]
            per_row = t[0].numel() if rows else 0
            packed = torch.empty(packed_int4_nbytes(t.numel()), dtype=torch.uint8)
            scale = torch.empty((rows,), dtype=torch.float32)
            step = max(1, self.chunk_elems // max(1, per_row))
            if per_row % 2 and step % 2:
                step += 1
            for i in range(0, rows, step):
                codes, s = stochastic_round_int4(t[i:i + step], self.generator)
                p = pack_int4(codes)
                off = (i * per_row) // 2
                packed[off:off + p.numel()] = p
                scale[i:i + step] = s
                del codes, p
            return {key: packed, key + SCALE_SUFFIX: scale}
        except ValueError as e:
            raise ValueError(f"{key}: {e}") from None

    def decode(self, key: str) -> torch.Tensor:
        """The float32 value of one entry (``scale * codes`` for int8 entries)."""
        e = self.entries[key]
        v = e[key]
        if v.dtype == torch.uint8:  # packed int4
            shape = self.shapes[key]
            v = unpack_int4_fast(v, shape.numel()).reshape(shape)
        if v.dtype == torch.int8:
            s = e[key + SCALE_SUFFIX].to(torch.float32)
            if v.dim() >= 2:
                s = s.reshape((-1,) + (1,) * (v.dim() - 1))
            return v.to(torch.float32) * s
        return v.to(torch.float32)

    def add(self, key: str, value: torch.Tensor) -> None:
        """Encode ``value`` (float, any dtype) under ``key``; a second value for the same key is added to the
        first (decode, add, re-encode: still unbiased with 8 bits).

        Raises:
            ValueError: ``key`` ends with ``::scale``, non-floating or (8 bits) non-finite values.
        """
        if key.endswith(SCALE_SUFFIX):
            raise ValueError(f"update key {key!r} ends with the reserved suffix {SCALE_SUFFIX!r}")
        if key in self.entries:
            if key in self.final_code_keys:
                raise ValueError(f"{key}: already uploaded as final codes")
            value = self.decode(key) + value.detach().to("cpu", torch.float32)
            del self.entries[key]
        self.shapes[key] = torch.Size(value.shape)
        enc = self._encode(key, value)
        self.entries[key] = enc
        if self.probe is not None:
            self.probe.mark_gradient(*enc.values())

    def row_multiple(self, shape: tuple[int, ...]) -> int:
        """Rows per encoding block of a tensor of ``shape`` (1 for float uplinks): :meth:`add_rows` blocks that are
        multiples of it (but the last) encode exactly as :meth:`add` of the whole tensor, same random draws."""
        if self.uplink_bits in (32, 16) or len(shape) < 2:
            return 1
        per_row = max(1, int(torch.Size(shape[1:]).numel()))
        step = max(1, self.chunk_elems // per_row)
        if self.uplink_bits == 4 and per_row % 2 and step % 2:
            step += 1
        return step

    def add_rows(self, key: str, rows: torch.Tensor, r0: int, shape: tuple[int, ...]) -> None:
        """Encode rows ``r0 : r0 + len(rows)`` of a tensor of ``shape`` (a row block of a weight gradient,
        :meth:`fedaqt.quant.layers.QuantLayer.set_weight_grad_hook` with ``row_multiple=row_multiple(shape)``).
        Blocks arrive in increasing ``r0``; when they are multiples of :meth:`row_multiple` the entry is bitwise the
        one :meth:`add` makes of the whole tensor. A block for rows already complete (a layer used twice in one
        backward) is added to them (decode, add, re-encode those rows; still unbiased).

        Raises:
            ValueError: ``key`` ends with ``::scale``, a block outside ``shape``, non-floating or non-finite values.
        """
        shape = torch.Size(shape)
        n = int(rows.shape[0])
        if r0 == 0 and n == shape[0] and key not in self.entries:
            self.add(key, rows.reshape(shape))
            return
        if key.endswith(SCALE_SUFFIX):
            raise ValueError(f"update key {key!r} ends with the reserved suffix {SCALE_SUFFIX!r}")
        if len(shape) < 2 or tuple(rows.shape[1:]) != tuple(shape[1:]) or r0 < 0 or r0 + n > shape[0]:
            raise ValueError(f"{key}: row block [{r0}:{r0 + n}] of shape {tuple(rows.shape)} does not fit "
                             f"{tuple(shape)}")
        if key in self.final_code_keys:
            raise ValueError(f"{key}: already uploaded as final codes")
        rows = rows.detach()
        if not rows.dtype.is_floating_point:
            raise ValueError(f"{key}: expected a floating tensor, got {rows.dtype}")
        done = self._rows_done.get(key)
        if key not in self.entries:
            self.shapes[key] = shape
            if self.uplink_bits in (32, 16):
                dtype = torch.float32 if self.uplink_bits == 32 else torch.float16
                entry = {key: torch.zeros(shape, dtype=dtype)}
            else:
                nb = shape.numel() if self.uplink_bits == 8 else packed_int4_nbytes(shape.numel())
                entry = {key: torch.zeros(nb if self.uplink_bits == 4 else shape,
                                          dtype=torch.uint8 if self.uplink_bits == 4 else torch.int8),
                         key + SCALE_SUFFIX: torch.zeros((shape[0],), dtype=torch.float32)}
            self.entries[key] = entry
            done = self._rows_done[key] = 0
            if self.probe is not None:
                self.probe.mark_gradient(*entry.values())
        if done is None or r0 < done:  # rows already complete: accumulate
            rows = self._decode_rows(key, r0, r0 + n) + rows.to("cpu", torch.float32)
        entry = self.entries[key]
        if self.uplink_bits in (32, 16):
            entry[key][r0:r0 + n] = rows.to("cpu", entry[key].dtype)
        else:
            enc = self._encode(key, rows)
            per_row = int(shape[1:].numel())
            if self.uplink_bits == 8:
                entry[key][r0:r0 + n] = enc[key]
            else:
                if (r0 * per_row) % 2:
                    raise ValueError(f"{key}: a packed int4 row block must start on a byte (row {r0})")
                b0 = (r0 * per_row) // 2
                entry[key][b0:b0 + enc[key].numel()] = enc[key]
            entry[key + SCALE_SUFFIX][r0:r0 + n] = enc[key + SCALE_SUFFIX]
            del enc
        if done is not None and r0 >= done:
            self._rows_done[key] = r0 + n
            if r0 + n == shape[0]:
                del self._rows_done[key]

    def _decode_rows(self, key: str, r0: int, r1: int) -> torch.Tensor:
        """float32 rows ``r0:r1`` of an entry."""
        return self.decode(key)[r0:r1]

    def add_zeros(self, key: str, shape: tuple[int, ...]) -> None:
        """A zero entry (a parameter that received no gradient), without a float temporary for 8 bits."""
        if key in self.entries:
            return
        self.shapes[key] = torch.Size(shape)
        if self.uplink_bits == 4:
            packed = torch.zeros(packed_int4_nbytes(self.shapes[key].numel()), dtype=torch.uint8)
            scale = torch.zeros((shape[0],) if len(shape) >= 2 else (), dtype=torch.float32)
            self.entries[key] = {key: packed, key + SCALE_SUFFIX: scale}
        elif self.uplink_bits == 8:
            codes = torch.zeros(shape, dtype=torch.int8)
            scale = torch.zeros((shape[0],) if len(shape) >= 2 else (), dtype=torch.float32)
            self.entries[key] = {key: codes, key + SCALE_SUFFIX: scale}
        else:
            dtype = torch.float32 if self.uplink_bits == 32 else torch.float16
            self.entries[key] = {key: torch.zeros(shape, dtype=dtype)}
        if self.probe is not None:
            self.probe.mark_gradient(*self.entries[key].values())

    def add_final_codes(self, key: str, layer: QuantLayer) -> None:
        """Upload a quantized layer's final weight as its int8 codes + float32 scale (FedAvg; the server
        subtracts what it sent). A per-tensor scale is repeated per output channel (``[out]``), the shape
        ``decode_update`` expects for tensors with >= 2 dims. The codes are the layer's buffer itself (no copy):
        for a packed 4-bit layer its uint8 ``packed`` buffer (two codes per byte, issue 17)."""
        codes = layer.stored_codes().detach()
        shape = torch.Size(layer.weight_shape)
        self.shapes[key] = shape
        s = layer.scale.detach().to(torch.float32)
        if len(shape) >= 2 and s.dim() == 0:
            s = s.expand(shape[0]).clone()
        elif len(shape) < 2 and s.dim() != 0:
            raise ValueError(f"{key}: a per-channel scale needs codes with >= 2 dims")
        self.entries[key] = {key: codes, key + SCALE_SUFFIX: s}
        self.final_code_keys.append(key)
        if self.probe is not None:
            self.probe.mark_gradient(s)

    # ------------------------------------------------------------------ output
    def tensors(self) -> dict[str, torch.Tensor]:
        """All arrays of the upload (``key`` and ``key::scale`` entries), as torch tensors."""
        return {k: v for e in self.entries.values() for k, v in e.items()}

    def nbytes(self) -> int:
        """Payload bytes of the upload (array data, without the ~128 B ``.npy`` header per array)."""
        return sum(int(v.numel() * v.element_size()) for v in self.tensors().values())

    def to_array_record(self, release: bool = False, probe: Optional[MemoryProbe] = None) -> ArrayRecord:
        """The reply's ArrayRecord (``.npy`` arrays; the serialization copies each tensor once).

        Args:
            release: drop each tensor from the buffer as soon as its ``.npy`` bytes exist, so the upload is never
                held twice (tensors + bytes); the buffer is empty afterwards (``entries == {}``).
            probe: count the serialized bytes (and the transient of the array being written: its bytes plus
                numpy's write chunk of at most 16 MiB) as ``wire`` memory named ``"reply"``.
        """
        arrays: dict[str, Array] = {}
        done = 0
        for key in list(self.entries):
            entry = self.entries[key]
            for k in list(entry):
                v = entry[k]
                raw = int(v.numel() * v.element_size())
                if probe is not None:  # while np.save runs: the growing bytes + one write chunk
                    probe.hold_bytes("reply", done + raw + min(raw, _NPY_WRITE_CHUNK))
                arrays[k] = Array(np.asarray(v.contiguous().numpy()))
                done += len(arrays[k].data)
                if probe is not None:
                    probe.hold_bytes("reply", done)
                if release:
                    del entry[k], v
            if release:
                del self.entries[key]
                self.shapes.pop(key, None)
        return ArrayRecord(arrays)

    def decoded(self, sent: Optional[dict[str, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
        """Float32 values of every entry; final-code entries become deltas when ``sent`` (the dequantized
        broadcast, by key) is given."""
        out = {k: self.decode(k) for k in self.entries}
        if sent is not None:
            for k in self.final_code_keys:
                out[k] = out[k] - sent[k].to(torch.float32)
        return out


def final_codes_arrays(update: dict[str, torch.Tensor], sent: dict[str, torch.Tensor],
                       final_code_keys: list[str]) -> dict[str, torch.Tensor]:
    """Server side of the FedAvg final-codes upload: ``delta_k = decoded_k - sent_k`` for the listed keys.

    Args:
        update: ``decode_update`` output (float32 by key).
        sent: the dequantized broadcast ``s_0 * q_0`` by key (float).
        final_code_keys: keys uploaded as final codes.

    Raises:
        ValueError: a listed key missing from ``update`` or ``sent``.
    """
    out = dict(update)
    for k in final_code_keys:
        if k not in update or k not in sent:
            raise ValueError(f"{k}: final codes for a key that was not broadcast quantized")
        out[k] = update[k] - sent[k].to(update[k].dtype)
    return out


# ================================================================================================ the round
@dataclass
class RoundResult:
    """What a client sends back.

    Attributes:
        upload: the encoded update (:class:`UploadBuffer`; FedSGD gradients, FedAvg deltas or final codes).
        num_examples: examples the round trained on.
        metrics: ``train_loss``, ``seconds``, ``changed_fraction``, ``upload_bytes`` and the memory metrics
            (:meth:`MemoryProfile.metrics`).
        memory: the round's :class:`MemoryProfile`.
    """

    upload: UploadBuffer
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    memory: Optional[MemoryProfile] = None

    @property
    def update(self) -> dict[str, torch.Tensor]:
        """Float32 values of the upload (final-code entries are final weights, not deltas)."""
        return self.upload.decoded()

    @property
    def final_code_keys(self) -> list[str]:
        return list(self.upload.final_code_keys)


def _batch_tensors(batches: list[Any]) -> list[torch.Tensor]:
    leaves, _ = tree_flatten(batches)
    return [t for t in leaves if isinstance(t, torch.Tensor)]


_ALGORITHM_CLASSES: dict[str, type[ClientAlgorithm]] = {}


def algorithm_class(name: str) -> type[ClientAlgorithm]:
    """:func:`fedaqt.plugins.get_algorithm_class`, cached per process (entry-point discovery scans every installed
    distribution; a Ray actor runs many rounds).

    Raises:
        UnknownPluginError / PluginLoadError: as :func:`fedaqt.plugins.get_algorithm_class`.
    """
    if name not in _ALGORITHM_CLASSES:
        _ALGORITHM_CLASSES[name] = get_algorithm_class(name)
    return _ALGORITHM_CLASSES[name]


def get_algorithm(config: RunConfig) -> ClientAlgorithm:
    """The client algorithm of ``config`` (:func:`algorithm_class`), options parsed.

    Raises:
        UnknownPluginError: unknown ``config.algorithm``. ConfigError: a bad option value.
    """
    return algorithm_class(config.algorithm)(config)


def client_round(
    workload: Workload,
    model: nn.Module,
    config: RunConfig,
    client_id: int,
    round_num: int,
    proximal_mu: float = 0.0,
    profile: Optional[bool] = None,
    final_codes: bool = False,
    probe: Optional[MemoryProbe] = None,
    uplink_bits: Optional[int] = None,
) -> RoundResult:
    """Train the already-loaded client ``model`` for one round with the client algorithm ``config.algorithm``
    (:mod:`fedaqt.algorithms`) and encode the upload.

    The algorithm chooses the round's batches and does the local computation (FedSGD: one batch, the gradient;
    FedAvg: local SGD with re-quantization, the delta or, with ``final_codes``, the final codes + scales of
    quantized layers; optional FedProx term ``proximal_mu * (w - w_0)``). This function does the plumbing: the
    seed, the memory probe, the upload buffer, the change of float buffers (BatchNorm statistics, uploaded by
    every algorithm), the removal of hooks and the metrics.

    Args:
        profile: measure memory with MemTracker (None: :func:`fedaqt.client.memory.profiling_requested`).
        final_codes: the server accepts final codes (algorithms with ``upload == "delta"``).
        probe: an entered :class:`MemoryProbe` of the caller that spans more than the training (decoding the
            broadcast, serializing the reply: :func:`fedaqt.client.app.handle_train`); the caller then reads
            the memory metrics from it after it exits and ``profile`` is ignored. None: the round measures
            itself (training only, no message bytes).
        uplink_bits: encode the upload at these bits instead of ``config.uplink_bits`` (SecAgg+ clients take the
            float32 update and encode it themselves, :mod:`fedaqt.client.secagg`).

    Returns:
        RoundResult; ``metrics`` hold ``train_loss``, ``seconds``, ``changed_fraction``, ``upload_bytes``, the
        algorithm's own metrics and, without ``probe``, the memory profile (``rss_peak_mib`` always;
        ``peak_mib``, ``mem_<category>_mib``, ``train_peak_mib``, ``saved_<group>_mib`` when profiled).

    Raises:
        RuntimeError: with FedAvg, a quantized layer used twice in one forward pass (its codes change during
            backward; autograd reports the in-place modification).
        UnknownPluginError / ConfigError: unknown algorithm or bad algorithm option.
    """
    t0 = time.perf_counter()
    torch.manual_seed(hash((config.seed, client_id, round_num)) % (2**31))
    algorithm = get_algorithm(config)
    model.train()
    workload.set_checkpointing(model, config.checkpointing)
    with (probe.paused() if probe is not None else nullcontext()):  # feature extraction is not the model
        batches = algorithm.batches(workload, client_id, round_num)
    own_probe = probe is None
    if own_probe:
        enabled = profiling_requested(config) if profile is None else bool(profile)
        probe = MemoryProbe(model, enabled, inputs=_batch_tensors(batches))
    else:
        probe.track(*_batch_tensors(batches))
    bits = config.uplink_bits if uplink_bits is None else int(uplink_bits)
    upload = UploadBuffer(bits, uplink_generator(config.seed, client_id, round_num), probe)
    ctx = LocalContext(
        workload=workload, model=model, config=config, client_id=client_id, round_num=round_num,
        qlayers=quant_layers(model), params={k: p for k, p in model.named_parameters() if p.requires_grad},
        upload=upload, probe=probe, generator=algorithm_generator(config.seed, client_id, round_num),
        lr=float(config.lr), proximal_mu=float(proximal_mu), final_codes=bool(final_codes),
    )
    with (probe if own_probe else nullcontext()), probe.training():
        try:
            buffers0 = {k: v.detach().clone() for k, v in float_buffers(model).items()}
            local = algorithm.local_round(ctx, batches)
            for key, v in float_buffers(model).items():
                upload.add(key, v.detach() - buffers0[key])
            del buffers0
        finally:
            for h in ctx.handles:
                h.remove()
            for layer in ctx.qlayers.values():
                layer.set_weight_grad_hook(None)
    if not ctx.losses:
        raise RuntimeError(f"algorithm {config.algorithm!r} recorded no training loss (LocalContext.losses)")
    metrics = {
        "train_loss": float(sum(ctx.losses) / len(ctx.losses)),
        "seconds": time.perf_counter() - t0,
        "changed_fraction": float(local.changed_fraction),
        "upload_bytes": float(upload.nbytes()),
    }
    for k, v in local.metrics.items():
        metrics.setdefault(k, float(v))
    if own_probe:
        metrics.update(probe.profile.metrics())
    return RoundResult(upload=upload, num_examples=int(local.num_examples), metrics=metrics, memory=probe.profile)
