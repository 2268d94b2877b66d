"""Spec/METHODS.md 2.2 step 2 and 2.6: native quantized layers vs the fake-quant oracle, saved-tensor memory,
model conversion of a torchaudio Conformer, weight-gradient delivery, gradient checkpointing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fedaqt.quant import (
    QuantConv1d,
    QuantLayer,
    QuantLinear,
    QuantMultiheadAttention,
    convert_to_quantized,
    dequantize,
    fake_quant,
    fake_quant_activation,
    model_gradients,
    quant_layers,
    quantize,
    quantized_weight_keys,
    zero_quant_grads,
)



BITS = [8, 4]
GRANS = ["tensor", "channel"]
TOL = dict(rtol=1e-12, atol=1e-12)


def _t(shape, seed, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _fq(w, bits, gran):
    return fake_quant(w, bits, gran, scale_grad=False)


# ----------------------------------------------------------------------------------------- Linear
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("gran", GRANS)
def test_quant_linear_matches_fake_quant(bits, gran):
    torch.manual_seed(0)
    lin = nn.Linear(12, 7).double()
    W = lin.weight.detach().clone().requires_grad_(True)
    b = lin.bias.detach().clone().requires_grad_(True)
    q = QuantLinear.from_float(lin, bits, gran, weight_key="fc.weight")
    assert q.codes.dtype == torch.int8 and torch.equal(q.codes, quantize(W.detach(), bits, gran)[0])
    x = _t((2, 3, 12), 1).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    gy = _t((2, 3, 7), 2)

    y = q(x)
    (y * gy).sum().backward()
    y_ref = fake_quant_activation(x_ref) @ _fq(W, bits, gran).t() + b
    (y_ref * gy).sum().backward()

    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(x.grad, x_ref.grad, **TOL)
    torch.testing.assert_close(q.weight_grad, W.grad, **TOL)
    torch.testing.assert_close(q.bias.grad, b.grad, **TOL)
    assert q.weight_grad.shape == (7, 12) and q.weight_grad.dtype == torch.float64


def test_quant_linear_weight_grad_without_input_grad_or_bias():
    """grad_w is produced even when neither the input nor a bias requires grad (first layer, no bias)."""
    lin = nn.Linear(5, 3, bias=False).double()
    q = QuantLinear.from_float(lin, 8, "tensor", "w")
    x = _t((4, 5), 3)
    q(x).sum().backward()
    ref = torch.ones(4, 3, dtype=torch.float64).t() @ fake_quant_activation(x)
    torch.testing.assert_close(q.weight_grad, ref, **TOL)
    # accumulation over two backward passes, and reset
    q(x).sum().backward()
    torch.testing.assert_close(q.weight_grad, 2 * ref, **TOL)
    q.zero_weight_grad()
    assert q.weight_grad is None
    # frozen layer: no grad_w, and no graph at all when nothing else requires grad
    q.weight_requires_grad = False
    assert not q(x).requires_grad
    # no_grad: no graph
    q.weight_requires_grad = True
    with torch.no_grad():
        assert not q(x).requires_grad


def test_layer_state_methods():
    lin = nn.Linear(6, 4).double()
    q = QuantLinear.from_float(lin, 4, "channel", "fc.weight")
    codes, s = quantize(lin.weight.detach(), 4, "channel")
    torch.testing.assert_close(q.dequantized_weight(), dequantize(codes, s), rtol=0, atol=0)
    w_new = _t((6, 4), 4).t().contiguous()
    q.requantize_(w_new)
    c2, s2 = quantize(w_new, 4, "channel")
    assert torch.equal(q.codes, c2) and torch.equal(q.scale, s2)
    assert int(q.codes.abs().max()) == 7
    q.load_quantized(codes, s.float())
    assert torch.equal(q.codes, codes)
    with pytest.raises(ValueError, match="fc.weight"):
        q.load_quantized(codes[:2], s)
    with pytest.raises(ValueError, match=r"\[-7, 7\]"):
        q.load_quantized(codes.clamp(-7, 7) * 2, s)
    with pytest.raises(ValueError, match="scale shape"):
        q.load_quantized(codes, s[0])
    with pytest.raises(ValueError, match="finite"):
        q.load_quantized(codes, s * float("nan"))
    with pytest.raises(ValueError, match="weight shape"):
        q.requantize_(w_new.t())
    assert "bits=4" in repr(q) and "fc.weight" in repr(q)


# ----------------------------------------------------------------------------------------- Conv1d
CONV_CASES = [
    dict(in_channels=6, out_channels=8, kernel_size=1),  # pointwise
    dict(in_channels=6, out_channels=6, kernel_size=7, padding=3, groups=6),  # depthwise (Conformer)
    dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=2, dilation=2, groups=2),
]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("gran", GRANS)
@pytest.mark.parametrize("case", range(len(CONV_CASES)))
def test_quant_conv1d_matches_fake_quant(bits, gran, case):
    kw = CONV_CASES[case]
    torch.manual_seed(case)
    conv = nn.Conv1d(**kw).double()
    W = conv.weight.detach().clone().requires_grad_(True)
    b = conv.bias.detach().clone().requires_grad_(True)
    q = QuantConv1d.from_float(conv, bits, gran, weight_key="conv.weight")
    x = _t((3, kw["in_channels"], 11), 10 + case).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)

    y = q(x)
    y_ref = F.conv1d(fake_quant_activation(x_ref), _fq(W, bits, gran), b, conv.stride, conv.padding,
                     conv.dilation, conv.groups)
    gy = _t(tuple(y_ref.shape), 20 + case)
    (y * gy).sum().backward()
    (y_ref * gy).sum().backward()
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(x.grad, x_ref.grad, **TOL)
    torch.testing.assert_close(q.weight_grad, W.grad, **TOL)
    torch.testing.assert_close(q.bias.grad, b.grad, **TOL)


def test_quant_conv1d_unbatched_and_padding_same():
    conv = nn.Conv1d(4, 4, 5, padding="same", groups=4).double()
    q = QuantConv1d.from_float(conv, 8, "tensor", "c.weight")
    assert q.padding == (2,)
    x = _t((4, 9), 5)
    y = q(x)
    assert y.shape == (4, 9)
    torch.testing.assert_close(y, q(x.unsqueeze(0)).squeeze(0), rtol=0, atol=0)
    with pytest.raises(ValueError, match="padding_mode"):
        QuantConv1d.from_float(nn.Conv1d(2, 2, 3, padding=1, padding_mode="reflect"), 8, "tensor")


# ----------------------------------------------------------------------------------------- MHA
def _ref_mha(x, Win, bin_, Wout, bout, H, kpm, fq_w, fq_a):
    """nn.MultiheadAttention self-attention written out; fq_w / fq_a = weight / activation quantizers."""
    T, B, E = x.shape
    qkv = fq_a(x) @ fq_w(Win).t() + bin_
    q, k, v = qkv.chunk(3, dim=-1)
    heads = lambda t: t.reshape(T, B, H, E // H).permute(1, 2, 0, 3)  # noqa: E731
    mask = None
    if kpm is not None:
        mask = torch.zeros(B, 1, 1, T, dtype=x.dtype).masked_fill(kpm.reshape(B, 1, 1, T), float("-inf"))
    o = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=mask)
    o = o.permute(2, 0, 1, 3).reshape(T, B, E)
    return fq_a(o) @ fq_w(Wout).t() + bout


def test_reference_mha_equals_torch_mha():
    """The written-out reference (no quantization) is nn.MultiheadAttention, masks and head split included."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2).double().eval()
    x = _t((5, 3, 8), 1)
    kpm = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] * 4 + [True]])
    ident = lambda t: t  # noqa: E731
    ref = _ref_mha(x, mha.in_proj_weight, mha.in_proj_bias, mha.out_proj.weight, mha.out_proj.bias, 2, kpm,
                   ident, ident)
    out = mha(x, x, x, key_padding_mask=kpm, need_weights=False)[0]
    torch.testing.assert_close(ref, out, **TOL)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("gran", GRANS)
def test_quant_mha_matches_fake_quant(bits, gran):
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(8, 2).double()
    Win = mha.in_proj_weight.detach().clone().requires_grad_(True)
    bin_ = mha.in_proj_bias.detach().clone().requires_grad_(True)
    Wout = mha.out_proj.weight.detach().clone().requires_grad_(True)
    bout = mha.out_proj.bias.detach().clone().requires_grad_(True)
    qm = QuantMultiheadAttention.from_float(mha, bits, gran, prefix="attn.")
    assert qm.in_proj.weight_key == "attn.in_proj_weight" and qm.out_proj.weight_key == "attn.out_proj.weight"
    assert sorted(n for n, _ in qm.named_parameters()) == ["in_proj_bias", "out_proj.bias"]

    x = _t((5, 3, 8), 2).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    kpm = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] * 4 + [True]])
    gy = _t((5, 3, 8), 3)
    out, wts = qm(query=x, key=x, value=x, key_padding_mask=kpm, need_weights=False)
    assert wts is None
    ref = _ref_mha(x_ref, Win, bin_, Wout, bout, 2, kpm, lambda w: _fq(w, bits, gran), fake_quant_activation)
    (out * gy).sum().backward()
    (ref * gy).sum().backward()
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(x.grad, x_ref.grad, **TOL)
    torch.testing.assert_close(qm.in_proj.weight_grad, Win.grad, **TOL)
    torch.testing.assert_close(qm.out_proj.weight_grad, Wout.grad, **TOL)
    torch.testing.assert_close(qm.in_proj_bias.grad, bin_.grad, **TOL)
    torch.testing.assert_close(qm.out_proj.bias.grad, bout.grad, **TOL)


def test_quant_mha_need_weights_batch_first_and_errors():
    torch.manual_seed(2)
    mha = nn.MultiheadAttention(8, 4, batch_first=True).double()
    qm = QuantMultiheadAttention.from_float(mha, 8, "tensor")
    x = _t((2, 6, 8), 4)
    kpm = torch.zeros(2, 6, dtype=torch.bool)
    kpm[1, 4:] = True
    o1, w = qm(x, x, x, key_padding_mask=kpm, need_weights=True)
    o2, _ = qm(x, x, x, key_padding_mask=kpm, need_weights=False)
    torch.testing.assert_close(o1, o2, **TOL)
    assert w.shape == (2, 6, 6)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 6, dtype=torch.float64), **TOL)
    assert bool((w[1, :, 4:] == 0).all())
    # close to the float module (int8 quantization error only)
    ref = mha(x, x, x, key_padding_mask=kpm, need_weights=False)[0]
    assert (o2 - ref).abs().max().item() < 0.05 * ref.abs().max().item()
    with pytest.raises(NotImplementedError, match="self-attention"):
        qm(x, x.clone(), x)


# ----------------------------------------------------------------------------------------- saved tensors
def _saved(fn):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return saved, out


def _nbytes(ts):
    return sum(t.numel() * t.element_size() for t in ts)


@pytest.mark.parametrize("gran", GRANS)
@pytest.mark.parametrize("kind", ["linear", "pointwise", "depthwise"])
def test_saved_tensors_are_int8_codes_or_scales(gran, kind):
    torch.manual_seed(3)
    if kind == "linear":
        ref_layer = nn.Linear(128, 96)
        x = torch.randn(4, 32, 128, requires_grad=True)
        qlayer = QuantLinear.from_float(nn.Linear(128, 96), 8, gran, "l.weight")
    else:
        kw = dict(in_channels=64, out_channels=64, kernel_size=1) if kind == "pointwise" else dict(
            in_channels=64, out_channels=64, kernel_size=15, padding=7, groups=64)
        ref_layer = nn.Conv1d(**kw)
        x = torch.randn(4, 64, 200, requires_grad=True)
        qlayer = QuantConv1d.from_float(nn.Conv1d(**kw), 8, gran, "c.weight")
    ref_saved, _ = _saved(lambda: ref_layer(x))
    q_saved, y = _saved(lambda: qlayer(x))
    out = qlayer.out_dim
    for t in q_saved:
        is_codes = t.dtype == torch.int8
        is_scale = t.dtype.is_floating_point and t.numel() <= out and t.dim() <= 1
        assert is_codes or is_scale, (t.dtype, tuple(t.shape))
    assert sum(t.dtype == torch.int8 for t in q_saved) == 2  # activation codes + weight codes
    ratio = _nbytes(q_saved) / _nbytes(ref_saved)
    assert ratio <= 0.3, ratio
    y.sum().backward()  # the saved tensors suffice for backward
    assert qlayer.weight_grad is not None and x.grad is not None


# ----------------------------------------------------------------------------------------- Conformer
def _conformer():
    from torchaudio.models import Conformer

    torch.manual_seed(0)
    return Conformer(input_dim=32, num_heads=2, ffn_dim=64, num_layers=2, depthwise_conv_kernel_size=7,
                     use_group_norm=True)


def _conformer_input():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 12, 32, generator=g), torch.tensor([12, 9])


@pytest.mark.parametrize("bits", BITS)
def test_converted_conformer(bits):
    fm = _conformer()
    float_state = fm.state_dict()
    float_params = {n: tuple(p.shape) for n, p in fm.named_parameters()}
    include = lambda name, m: True  # noqa: E731
    qkeys = quantized_weight_keys(fm, include)
    assert len(qkeys) == 2 * 9  # per block: 2 FFNs x 2 Linear, in_proj, out_proj, 3 convs
    qm = convert_to_quantized(fm, bits, "channel", include)
    layers = quant_layers(qm)
    assert sorted(layers) == sorted(qkeys)

    # no floating-point weight tensor anywhere in the quantized layers
    for key, layer in layers.items():
        assert [n for n, _ in layer.named_parameters(recurse=False)] in ([], ["bias"])
        assert layer.codes.dtype == torch.int8 and tuple(layer.codes.shape) == tuple(float_state[key].shape)
        assert layer.scale.dtype == torch.float32 and layer.scale.shape == (layer.out_dim,)
        for v in list(vars(layer).values()) + list(layer._buffers.values()) + list(layer._parameters.values()):
            if isinstance(v, torch.Tensor) and v.dtype.is_floating_point:
                assert v.numel() == layer.out_dim, (key, tuple(v.shape))
    for m in qm.modules():
        assert not isinstance(m, (nn.Linear, nn.Conv1d, nn.MultiheadAttention))

    # float parameter names are exactly the float model's non-quantized parameter names
    qnames = {n for n, _ in qm.named_parameters()}
    assert qnames <= set(float_state)
    assert qnames == set(float_params) - set(qkeys)
    assert not set(qm.state_dict()) & set(qkeys)

    x, lengths = _conformer_input()
    out, _ = qm(x, lengths)
    assert out.shape == (2, 12, 32) and bool(torch.isfinite(out).all())
    out.pow(2).mean().backward()
    grads = model_gradients(qm)
    assert set(grads) == set(float_params)
    for k, g in grads.items():
        assert tuple(g.shape) == float_params[k] and bool(torch.isfinite(g).all())
    assert all(layers[k].weight_grad is not None and layers[k].weight_grad.abs().sum() > 0 for k in qkeys)
    zero_quant_grads(qm)
    assert all(layer.weight_grad is None for layer in layers.values())


def _run_layers(qm, x, lengths, use_ckpt):
    from torchaudio.models.conformer import _lengths_to_padding_mask

    mask = _lengths_to_padding_mask(lengths)
    h = x.transpose(0, 1)
    for layer in qm.conformer_layers:
        h = checkpoint(layer, h, mask, use_reentrant=False) if use_ckpt else layer(h, mask)
    return h.transpose(0, 1)


def test_weight_grad_hook_once_per_backward_and_checkpointing():
    qm = convert_to_quantized(_conformer(), 8, "tensor")
    layers = quant_layers(qm)
    x, lengths = _conformer_input()
    results = {}
    for use_ckpt in (False, True):
        calls: dict[str, list[torch.Tensor]] = {k: [] for k in layers}

        def hook(layer, grad_w):
            calls[layer.weight_key].append(grad_w.clone())

        for layer in layers.values():
            layer.set_weight_grad_hook(hook)
        qm.zero_grad(set_to_none=True)
        _run_layers(qm, x, lengths, use_ckpt).pow(2).mean().backward()
        assert all(len(v) == 1 for v in calls.values()), {k: len(v) for k, v in calls.items()}
        assert all(layer.weight_grad is None for layer in layers.values())  # hook replaces accumulation
        results[use_ckpt] = ({k: v[0] for k, v in calls.items()},
                             {n: p.grad.clone() for n, p in qm.named_parameters()})
    # gradients with and without checkpointing are identical (deterministic CPU)
    for k in layers:
        assert torch.equal(results[False][0][k], results[True][0][k]), k
    for n in results[False][1]:
        assert torch.equal(results[False][1][n], results[True][1][n]), n
    for layer in layers.values():
        layer.set_weight_grad_hook(None)
    _run_layers(qm, x, lengths, True).pow(2).mean().backward()
    for k, layer in layers.items():
        assert torch.equal(layer.weight_grad, results[True][0][k])


def test_convert_include_filter_and_mha_children():
    fm = _conformer()
    only_ffn = lambda name, m: ".ffn" in name  # noqa: E731
    keys = quantized_weight_keys(fm, only_ffn)
    assert len(keys) == 8 and all(".ffn" in k and k.endswith(".weight") for k in keys)
    # out_proj alone is never converted (nn.MultiheadAttention reads its weight directly)
    assert quantized_weight_keys(fm, lambda n, m: n.endswith("out_proj")) == []
    attn_keys = quantized_weight_keys(fm, lambda n, m: n.endswith("self_attn"))
    assert attn_keys == [f"conformer_layers.{i}.self_attn.{s}" for i in range(2)
                         for s in ("in_proj_weight", "out_proj.weight")]
    qm = convert_to_quantized(fm, 4, "tensor", only_ffn)
    assert sorted(quant_layers(qm)) == sorted(keys)
    x, lengths = _conformer_input()
    out, _ = qm(x, lengths)
    assert bool(torch.isfinite(out).all())


def test_load_float_state_requantizes_and_copies():
    fm = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    other = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    qm = convert_to_quantized(fm, 8, "channel", lambda n, m: n == "0")
    state = other.state_dict()
    from fedaqt.quant import load_float_state

    load_float_state(qm, state)
    layer = quant_layers(qm)["0.weight"]
    assert torch.equal(layer.dequantized_weight(), fake_quant(state["0.weight"], 8, "channel", False))
    assert torch.equal(qm[0].bias, state["0.bias"]) and torch.equal(qm[2].weight, state["2.weight"])
    with pytest.raises(ValueError, match="missing"):
        load_float_state(qm, {k: v for k, v in state.items() if k != "2.bias"})
    with pytest.raises(ValueError, match="nope"):
        load_float_state(qm, {**state, "nope": torch.zeros(1)})
