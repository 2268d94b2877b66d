"""Issue 17: native int4 layers hold their codes packed two per byte; the int4 uplink (unbiased stochastic rounding,
packed); FedAvg final codes and the broadcast at 4 bits stay packed.

References are independent of the code under test: the unpacked int4 path (the same layers holding one int8 per
code, ``pack_int4_codes = False``, i.e. the implementation before issue 17, itself checked against fake-quant and
torch's layers in tests/test_quant_layers.py), plain float autograd on ``ŵ = s*q``, and a numpy nibble decoder.
"""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import Array, ArrayRecord
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.checkpoint import checkpoint

from fedaqt.client.trainer import UploadBuffer
from fedaqt.quant import (
    QuantConv1d,
    QuantConv2d,
    QuantLinear,
    QuantMultiheadAttention,
    decode_broadcast,
    decode_update,
    encode_broadcast,
    encode_tensor_uplink,
    quant_layers,
)
from fedaqt.quant.wire import QTensor, load_client_broadcast

GRANS = ["tensor", "channel"]


# ------------------------------------------------------------------------------------------------ helpers
class _Unpacked:
    """Mixin: the same layer holding int4 codes one int8 per code (the pre-issue-17 layout)."""

    pack_int4_codes = False


class ULinear(_Unpacked, QuantLinear):
    pass


class UConv1d(_Unpacked, QuantConv1d):
    pass


class UConv2d(_Unpacked, QuantConv2d):
    pass


def _np_unpack(a: np.ndarray, numel: int) -> np.ndarray:
    """Independent nibble decoder: low nibble first, two's complement."""
    a = np.asarray(a, dtype=np.uint8)
    out = np.empty(2 * a.size, dtype=np.int64)
    out[0::2] = a & 0xF
    out[1::2] = a >> 4
    out[out >= 8] -= 16
    return out[:numel]


def _grads(layer, x, gy):
    """Forward + backward; returns (y, grad_x, grad_w, grad_bias)."""
    x = x.detach().clone().requires_grad_(True)
    layer.zero_weight_grad()
    if layer.bias is not None:
        layer.bias.grad = None
    y = layer(x)
    y.backward(gy)
    return y.detach(), x.grad, layer.weight_grad, None if layer.bias is None else layer.bias.grad.clone()


def _pair(kind, gran, seed=0):
    """(packed int4 layer, unpacked int4 twin with the same codes/scale/bias, input, float layer)."""
    torch.manual_seed(seed)
    if kind == "linear":
        f = nn.Linear(13, 7).double()  # odd numel (91): the packed buffer ends in a padding nibble
        p = QuantLinear.from_float(f, 4, gran, "w")
        u = ULinear.from_float(f, 4, gran, "w")
        x = torch.randn(3, 5, 13, dtype=torch.float64)
    elif kind == "conv1d":
        f = nn.Conv1d(6, 9, 5, stride=2, padding=2, groups=3).double()
        p = QuantConv1d.from_float(f, 4, gran, "c")
        u = UConv1d.from_float(f, 4, gran, "c")
        x = torch.randn(2, 6, 17, dtype=torch.float64)
    else:
        f = nn.Conv2d(4, 6, 3, stride=(2, 1), padding=1, dilation=(1, 2), bias=True).double()
        p = QuantConv2d.from_float(f, 4, gran, "c2")
        u = UConv2d.from_float(f, 4, gran, "c2")
        x = torch.randn(2, 4, 9, 11, dtype=torch.float64)
    return p, u, x, f


# ------------------------------------------------------------------------------------------------ storage
@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d"])
@pytest.mark.parametrize("gran", GRANS)
def test_packed_layer_holds_half_a_byte_per_code(kind, gran):
    p, u, _, f = _pair(kind, gran)
    n = f.weight.numel()
    assert "codes" not in p._buffers and p.packed.dtype == torch.uint8 and p.packed.numel() == (n + 1) // 2
    assert u.codes.dtype == torch.int8 and u.codes.numel() == n  # the twin: one byte per code
    # the packed bytes decode (independently) to exactly the twin's codes
    assert np.array_equal(_np_unpack(p.packed.numpy(), n), u.codes.reshape(-1).numpy().astype(np.int64))
    assert torch.equal(p.codes, u.codes)  # ``codes`` of a packed layer: the unpacked view on access
    assert torch.equal(p.scale, u.scale)


# ------------------------------------------------------------------------------------------------ gradients
@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d"])
@pytest.mark.parametrize("gran", GRANS)
def test_packed_gradients_bitwise_equal_unpacked_and_match_float_autograd(kind, gran):
    p, u, x, _ = _pair(kind, gran)
    gy = torch.randn_like(p(x))
    yp, gxp, gwp, gbp = _grads(p, x, gy)
    yu, gxu, gwu, gbu = _grads(u, x, gy)
    for a, b in ((yp, yu), (gxp, gxu), (gwp, gwu), (gbp, gbu)):
        assert a.dtype == b.dtype and torch.equal(a, b)
    # independent reference: plain autograd through ŵ = s*q (numpy-decoded codes) and the int8 activation
    codes = torch.from_numpy(_np_unpack(p.packed.numpy(), p.weight_shape.numel())).reshape(p.weight_shape)
    s = p.scale.reshape((-1,) + (1,) * (len(p.weight_shape) - 1)) if gran == "channel" else p.scale
    w = (codes.double() * s).requires_grad_(True)
    sx = x.abs().max() / 127
    xh = (torch.clamp(torch.round(x / sx), -127, 127) * sx).requires_grad_(True)
    b = p.bias.detach().clone().requires_grad_(True)
    if kind == "linear":
        y = F.linear(xh, w, b)
    elif kind == "conv1d":
        y = F.conv1d(xh, w, b, p.stride, p.padding, p.dilation, p.groups)
    else:
        y = F.conv2d(xh, w, b, p.stride, p.padding, p.dilation, p.groups)
    y.backward(gy)
    tol = dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(yp, y.detach(), **tol)
    torch.testing.assert_close(gxp, xh.grad, **tol)  # STE through the activation quantizer
    torch.testing.assert_close(gwp, w.grad, **tol)
    torch.testing.assert_close(gbp, b.grad, **tol)


@pytest.mark.parametrize("gran", GRANS)
def test_packed_mha_bitwise_equal_unpacked(gran):
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(12, 3, dtype=torch.float64)
    p = QuantMultiheadAttention.from_float(mha, 4, gran, prefix="a.")
    u = QuantMultiheadAttention.from_float(mha, 4, gran, prefix="a.")
    u.in_proj = ULinear.from_float_weight(mha.in_proj_weight, None, 4, gran)
    u.out_proj = ULinear.from_float(mha.out_proj, 4, gran)
    u.set_prefix("a.")
    assert all(l.packs_codes for l in p.quant_children()) and not any(l.packs_codes for l in u.quant_children())
    x = torch.randn(5, 2, 12, dtype=torch.float64)
    outs = []
    for m in (p, u):
        xx = x.clone().requires_grad_(True)
        y, _ = m(xx, xx, xx, need_weights=False)
        y.backward(torch.ones_like(y))
        outs.append((y.detach(), xx.grad, m.in_proj.weight_grad, m.out_proj.weight_grad, m.in_proj_bias.grad))
        m.in_proj_bias.grad = None
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_packed_gradients_under_checkpointing_equal_and_delivered_once():
    p, u, x, _ = _pair("linear", "channel")
    calls = []
    p.set_weight_grad_hook(lambda layer, g: calls.append(g))
    xx = x.clone().requires_grad_(True)
    y = checkpoint(p, xx, use_reentrant=False)  # the recomputation unpacks again
    y.sum().backward()
    assert len(calls) == 1
    _, gxu, gwu, _ = _grads(u, x, torch.ones_like(y))
    assert torch.equal(calls[0], gwu) and torch.equal(xx.grad, gxu)


def test_packed_requantize_and_load_quantized():
    p, u, _, f = _pair("linear", "tensor")
    w = torch.randn_like(f.weight) * 3
    gen_p, gen_u = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    p.requantize_(w, gen_p)
    u.requantize_(w, gen_u)
    assert torch.equal(p.codes, u.codes) and torch.equal(p.scale, u.scale)
    # a packed broadcast array loads as is; unpacked int8 codes load too (packed on the way in)
    q = QuantLinear(13, 7, bits=4, dtype=torch.float64)
    q.weight_key = "w"
    q.load_quantized(p.packed.clone(), p.scale, packed=True)
    assert torch.equal(q.packed, p.packed)
    q2 = QuantLinear(13, 7, bits=4, dtype=torch.float64)
    q2.load_quantized(u.codes, u.scale)
    assert torch.equal(q2.packed, p.packed)
    bad = p.packed.clone()
    bad[0] = (bad[0] & 0xF0) | 0x8  # a code of -8: outside [-7, 7]
    with pytest.raises(ValueError, match=r"w: .*\[-7, 7\]"):
        q.load_quantized(bad, p.scale, packed=True)
    pad = p.packed.clone()
    pad[-1] = pad[-1] | 0x10  # 91 codes: the last high nibble is padding and must be 0
    with pytest.raises(ValueError, match="padding nibble"):
        q.load_quantized(pad, p.scale, packed=True)
    with pytest.raises(ValueError, match="8-bit layer"):
        QuantLinear(13, 7, bits=8).load_quantized(p.packed, p.scale.float(), packed=True)


# ------------------------------------------------------------------------------------------------ liveness
class _LiveStorages(TorchDispatchMode):
    """Weak references to the storages of every op output (to ask which are still alive later)."""

    def __init__(self):
        super().__init__()
        self.refs: list[tuple[weakref.ref, torch.dtype, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                self.refs.append((weakref.ref(st), t.dtype, st.nbytes()))
        return out

    def alive(self):
        gc.collect()
        return [(dt, nb) for r, dt, nb in self.refs if r() is not None]


def _packed_model(g0: str = "channel"):
    torch.manual_seed(2)
    # weight numels 210, 45, 175: unlike every activation's (80, 168, 280, 40)
    return nn.Sequential(
        QuantLinear.from_float(nn.Linear(10, 21), 4, g0, "l0"),
        nn.Unflatten(2, (3, 7)), nn.Flatten(0, 1),
        QuantConv1d.from_float(nn.Conv1d(3, 5, 3, padding=1), 4, "tensor", "c1"),
        nn.Flatten(1), QuantLinear.from_float(nn.Linear(35, 5), 4, "tensor", "l2"),
    )


@pytest.mark.parametrize("ckpt", [False, True])
def test_no_unpacked_codes_or_float_weight_alive_between_layers(ckpt):
    model = _packed_model()
    layers = list(quant_layers(model).values())
    numels = {l.weight_shape.numel() for l in layers}
    x = torch.randn(4, 2, 10)
    mode = _LiveStorages()
    leaks = []

    def check(*_):
        for dt, nb in mode.alive():
            if dt == torch.int8 and nb in numels:
                leaks.append(("unpacked codes", nb))
            if dt.is_floating_point and nb // dt.itemsize in numels:
                leaks.append(("float weight", nb))

    delivered = []
    for l in layers:  # as FedSGD does: each weight gradient is taken (encoded) and dropped at once
        l.set_weight_grad_hook(lambda layer, g: delivered.append(layer.weight_key))
    hooks = []
    for l in layers:  # between layers: before each layer's forward and after each layer's backward
        hooks.append(l.register_forward_pre_hook(check))
        hooks.append(l.register_full_backward_hook(check))
    saved = []
    with mode, torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = checkpoint(model, x, use_reentrant=False) if ckpt else model(x)
        check()
        y.sum().backward()
        check()
    for h in hooks:
        h.remove()
    assert not leaks, leaks
    assert sorted(delivered) == sorted(l.weight_key for l in layers)
    # autograd saves each layer's packed buffer itself (no copy), never unpacked codes or a float weight
    packed_ptrs = {l.packed.data_ptr() for l in layers}
    assert not ckpt or len(saved) == 1  # checkpointing: only the block's input
    if not ckpt:
        assert packed_ptrs <= {t.data_ptr() for t in saved if t.dtype == torch.uint8}
        for t in saved:
            assert not (t.dtype == torch.int8 and t.numel() in numels), tuple(t.shape)
            assert not (t.dtype.is_floating_point and t.numel() in numels), tuple(t.shape)


def test_memtracker_counts_packed_buffers():
    from torch.distributed._tools.mem_tracker import MemTracker

    model = _packed_model()
    layers = quant_layers(model).values()
    mt = MemTracker()
    mt.track_external(model)
    with mt:
        model(torch.randn(4, 2, 10)).sum().backward()
    snap = mt.get_tracker_snapshot("current")
    buffers = sum(v.get("Buffer", 0) for v in snap.values())
    assert buffers == sum((l.weight_shape.numel() + 1) // 2 + l.scale.numel() * 4 for l in layers)


# ------------------------------------------------------------------------------------------------ broadcast
def test_broadcast_decodes_straight_into_packed_buffers():
    model = _packed_model("tensor")
    layers = quant_layers(model)
    float_state = {k: torch.randn(l.weight_shape) for k, l in layers.items()}
    float_state.update({n: p.detach().clone().float() for n, p in model.named_parameters()})
    arrays, meta = encode_broadcast(float_state, list(layers), 4, "tensor")
    numels = {l.weight_shape.numel() for l in layers.values()}
    for l in layers.values():
        l.scale.data = l.scale.data.float()
    mode = _LiveStorages()
    with mode:
        decoded = decode_broadcast(arrays, meta)
        for k in layers:
            assert isinstance(decoded[k], QTensor) and decoded[k].packed is not None
        load_client_broadcast(model, decoded)
    made_int8 = [nb for _, dt, nb in mode.refs if dt == torch.int8 and nb in numels]
    assert made_int8 == []  # not one unpacked copy of any weight's codes
    for k, l in layers.items():
        assert np.array_equal(l.packed.numpy(), arrays[k].numpy())


# ------------------------------------------------------------------------------------------------ uplink
def test_int4_uplink_unbiased_and_decoded_exactly():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(6, 5, dtype=torch.float64) * torch.tensor([1e-3, 1.0, 30.0, 0.1, 2.0, 5.0]).reshape(6, 1)
    t[3, 2] = 0.0
    bias = torch.randn(7)
    shapes = {"w": (6, 5), "b": (7,)}
    n = 3000
    acc = {"w": torch.zeros(6, 5, dtype=torch.float64), "b": torch.zeros(7, dtype=torch.float64)}
    for _ in range(n):
        enc = {**encode_tensor_uplink(t, 4, g, key="w"), **encode_tensor_uplink(bias, 4, g, key="b")}
        rec = ArrayRecord({k: Array(v) for k, v in enc.items()})
        dec = decode_update(rec, shapes, uplink_bits=4)
        for k, shape in shapes.items():
            a, s = enc[k], enc[k + "::scale"]
            assert a.dtype == np.uint8 and a.shape == ((int(np.prod(shape)) + 1) // 2,)
            codes = _np_unpack(a, int(np.prod(shape))).reshape(shape)
            assert np.abs(codes).max() <= 7
            ss = s.reshape(-1, 1) if len(shape) == 2 else s
            assert np.array_equal(dec[k].numpy(), (codes.astype(np.float32) * ss).astype(np.float32))  # exact
            acc[k] += dec[k].double()
    for k, ref in (("w", t), ("b", bias.double())):
        s = np.abs(ref.numpy()).reshape(ref.shape[0], -1).max(1, keepdims=True) / 7 if k == "w" else \
            np.abs(ref.numpy()).max() / 7
        sd = torch.as_tensor(s).reshape(-1, 1) / (2 * n ** 0.5) if k == "w" else float(s) / (2 * n ** 0.5)
        err = (acc[k] / n - ref).abs()
        assert bool((err <= 5 * sd + 1e-12).all()), (k, float((err / sd).max()))


@pytest.mark.parametrize("shape,chunk", [((9, 3), 4), ((8, 4), 5), ((5,), 4), ((3, 2, 3), 1)])
def test_upload_buffer_int4_blocks_pack_and_decode(shape, chunk):
    """Blocks of whole rows (odd row lengths, blocks of several rows) land at the right packed offset."""
    t = torch.randn(shape)
    buf = UploadBuffer(4, torch.Generator().manual_seed(1), chunk_elems=chunk)
    buf.add("k", t)
    enc = buf.entries["k"]
    a, s = enc["k"].numpy(), enc["k::scale"].numpy()
    codes = _np_unpack(a, t.numel()).reshape(shape)
    ss = s.reshape((-1,) + (1,) * (len(shape) - 1)) if len(shape) >= 2 else s
    approx = codes * ss
    # stochastic rounding moves each value by less than one step of its channel's scale
    assert np.all(np.abs(approx - t.numpy()) <= ss * (1 + 1e-6))
    rec = buf.to_array_record()
    dec = decode_update(rec, {"k": shape}, uplink_bits=4)
    assert np.array_equal(dec["k"].numpy(), (codes.astype(np.float32) * ss).astype(np.float32))
    assert buf.nbytes() == (t.numel() + 1) // 2 + 4 * s.size


def test_decode_update_rejects_bad_int4():
    g = torch.Generator().manual_seed(0)
    enc = encode_tensor_uplink(torch.randn(4, 3), 4, g, key="w")
    good = dict(enc)
    with pytest.raises(ValueError, match="w: packed int4 codes need the expected shape"):
        decode_update(ArrayRecord({k: Array(v) for k, v in good.items()}))
    bad = dict(enc, w=np.full(6, 0x88, np.uint8))  # codes -8
    with pytest.raises(ValueError, match=r"w: .*\[-7, 7\]"):
        decode_update(ArrayRecord({k: Array(v) for k, v in bad.items()}), {"w": (4, 3)})
    short = dict(enc, w=enc["w"][:5])
    with pytest.raises(ValueError, match=r"w: packed int4 codes of shape \(5,\)"):
        decode_update(ArrayRecord({k: Array(v) for k, v in short.items()}), {"w": (4, 3)})
    noscale = {"w": enc["w"]}
    with pytest.raises(ValueError, match="w: packed int4 codes without"):
        decode_update(ArrayRecord({k: Array(v) for k, v in noscale.items()}), {"w": (4, 3)})
    with pytest.raises(ValueError, match="expected uplink_bits=8"):
        decode_update(ArrayRecord({k: Array(v) for k, v in good.items()}), {"w": (4, 3)}, uplink_bits=8)


def test_profile_rows_carry_the_physical_limit_estimate():
    from fedaqt.report.memory_table import add_ratios, rich_table

    rows = [{"workload": "asr", "bits": b, "uplink_bits": u, "algorithm": "fedsgd", "checkpointing": "on",
             "peak_mib": p, "mem_buffers_mib": 1.0, "rss_peak_mib": 1.0, "upload_mib": 1.0}
            for b, u, p in ((32, 32, 100.0), (8, 8, 26.0), (4, 4, 15.0), (4, 8, 20.0))]
    add_ratios(rows)
    assert [r["limit_ratio"] for r in rows] == [1.0, 0.25, 0.125, 0.1875]  # (b_w + b_up) / 64
    assert [round(r["ratio"], 6) for r in rows] == [1.0, 0.26, 0.15, 0.2]
    cols = [c.header for c in rich_table(rows, "t").columns]
    assert cols.index("limit") == cols.index("ratio") + 1


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape", [(300, 260), (301, 259), (520, 131)])
@pytest.mark.parametrize("gran", GRANS)
def test_blocked_linear_equals_unblocked_bitwise(monkeypatch, bits, shape, gran):
    """QuantLinear materializes at most WEIGHT_BLOCK_ELEMS weight elements in float at once; the blocks change
    which outputs one matmul computes, not the bits (reference: the unblocked path, one block)."""
    import fedaqt.quant.layers as L

    out_f, in_f = shape
    torch.manual_seed(4)
    f = nn.Linear(in_f, out_f)
    x = torch.randn(3, 11, in_f)
    gy = torch.randn(3, 11, out_f)
    res = []
    for elems in (1 << 30, 128 * 128):
        monkeypatch.setattr(L, "WEIGHT_BLOCK_ELEMS", elems)
        q = QuantLinear.from_float(f, bits, gran, "w")
        assert (L._block_rows(out_f, in_f) < out_f) == (elems < 1 << 30)
        assert (L._block_rows(in_f, out_f) < in_f) == (elems < 1 << 30 and in_f > L.MIN_BLOCK)
        res.append(_grads(q, x, gy))
    for a, b in zip(*res):
        assert torch.equal(a, b)


@pytest.mark.parametrize("uplink", [32, 16, 8, 4])
@pytest.mark.parametrize("in_f", [256, 129])
def test_row_block_delivery_encodes_like_the_whole_gradient(monkeypatch, uplink, in_f):
    """FedSGD's row-block hook (large Linear layers): the upload entry is bitwise the one of the whole gradient
    (same values, same stochastic-rounding draws), and the layer never hands over the whole float gradient."""
    import fedaqt.quant.layers as L

    monkeypatch.setattr(L, "WEIGHT_BLOCK_ELEMS", 128 * 128)
    torch.manual_seed(5)
    f = nn.Linear(in_f, 600)
    x = torch.randn(2, 9, in_f)
    entries, sizes = [], []
    for rows_mode in (False, True):
        q = QuantLinear.from_float(f, 4, "channel", "w")
        buf = UploadBuffer(uplink, torch.Generator().manual_seed(3), chunk_elems=1792)  # 7 or 14 rows
        if rows_mode:
            q.set_weight_grad_hook(lambda l, g, r0: (sizes.append(g.shape[0]), buf.add_rows("w", g, r0, l.weight_shape)),
                                   row_multiple=buf.row_multiple(tuple(q.weight_shape)))
        else:
            q.set_weight_grad_hook(lambda l, g: buf.add("w", g))
        q(x).sum().backward()
        entries.append({k: v.clone() for k, v in buf.entries["w"].items()})
    assert len(sizes) > 1 and max(sizes) < 600 and sum(sizes) == 600
    assert entries[0].keys() == entries[1].keys()
    for k in entries[0]:
        assert torch.equal(entries[0][k], entries[1][k]), k
