"""QuantConv2d (native int8/int4 Conv2d) and the quantizable-layer registry (issue 10, spec 2.1/2.2).

The reference for every gradient is written here with plain torch ops in float64: quantize-dequantize the weight
with a straight-through estimator, quantize-dequantize the input the same way (scale detached), ``F.conv2d``, and
ordinary autograd. It uses none of fedaqt's quantizers.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fedaqt.quant import (
    LayerHandler,
    QuantConv2d,
    QuantHandler,
    QuantLinear,
    convert_to_quantized,
    decode_broadcast,
    encode_broadcast,
    handler_for,
    load_broadcast,
    load_float_state,
    model_gradients,
    quant_layers,
    quantized_weight_keys,
    register_quantized_layer,
    registered_quantized_layers,
    unregister_quantized_layer,
)
from fedaqt.quant.registry import MultiheadAttentionHandler

BITS = [8, 4]
GRANS = ["tensor", "channel"]
TOL = dict(rtol=1e-12, atol=1e-12)


def _t(shape, seed, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ----------------------------------------------------------------------------------------- independent reference
def _ref_scale(w, bits, gran):
    """max|w| / (2^(b-1) - 1), per tensor (0-d) or per output channel (axis 0), guarded, detached."""
    t = 2 ** (bits - 1) - 1
    a = w.detach().abs()
    amax = a.max() if gran == "tensor" else a.reshape(a.shape[0], -1).max(dim=1).values
    s = (amax / t).clamp_min(1e-12 if w.dtype == torch.float64 else 1e-8)
    return s if gran == "tensor" else s.reshape((-1,) + (1,) * (w.dim() - 1))


def _ref_codes(w, bits, gran):
    t = 2 ** (bits - 1) - 1
    return torch.clamp(torch.round(w.detach() / _ref_scale(w, bits, gran)), -t, t)


def _ref_fq(w, bits, gran):
    """s * STE(clamp(round(w / s))): forward the quantize-dequantize, backward identity in w."""
    s = _ref_scale(w, bits, gran)
    u = w / s
    return (u + (_ref_codes(w, bits, gran) - u).detach()) * s


def _bcast(s, ndim):
    return s if s.dim() == 0 else s.reshape((-1,) + (1,) * (ndim - 1))


def _ref_conv2d(x, W, b, bits, gran, stride, padding, dilation, groups):
    return F.conv2d(_ref_fq(x, 8, "tensor"), _ref_fq(W, bits, gran), b, stride, padding, dilation, groups)


CASES = [
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=1),  # standard 3x3
    dict(in_channels=4, out_channels=6, kernel_size=(3, 5), stride=2, padding=(1, 2), dilation=(1, 2)),
    dict(in_channels=6, out_channels=6, kernel_size=3, padding=1, groups=6),  # depthwise
    dict(in_channels=4, out_channels=8, kernel_size=3, stride=(2, 1), padding=(2, 0), groups=2, bias=False),
    dict(in_channels=5, out_channels=3, kernel_size=1),  # pointwise
]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("gran", GRANS)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_quant_conv2d_matches_independent_fake_quant(bits, gran, case):
    kw = CASES[case]
    torch.manual_seed(case)
    conv = nn.Conv2d(**kw).double()
    W = conv.weight.detach().clone().requires_grad_(True)
    b = conv.bias.detach().clone().requires_grad_(True) if conv.bias is not None else None
    q = QuantConv2d.from_float(conv, bits, gran, weight_key="c.weight")
    assert q.codes.dtype == torch.int8 and torch.equal(q.codes.double(), _ref_codes(W, bits, gran))
    assert int(q.codes.abs().max()) == 2 ** (bits - 1) - 1
    torch.testing.assert_close(_bcast(q.scale, 4), _ref_scale(W, bits, gran).double(), **TOL)

    x = _t((2, kw["in_channels"], 7, 9), 10 + case).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    y = q(x)
    y_ref = _ref_conv2d(x_ref, W, b, bits, gran, conv.stride, conv.padding, conv.dilation, conv.groups)
    assert y.shape == y_ref.shape == conv(x).shape
    gy = _t(tuple(y_ref.shape), 20 + case)
    (y * gy).sum().backward()
    (y_ref * gy).sum().backward()
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(x.grad, x_ref.grad, **TOL)
    assert q.weight_grad.shape == W.shape and q.weight_grad.dtype == torch.float64
    torch.testing.assert_close(q.weight_grad, W.grad, **TOL)
    if b is not None:
        torch.testing.assert_close(q.bias.grad, b.grad, **TOL)
    else:
        assert q.bias is None


def test_quant_conv2d_grad_w_without_input_grad_accumulates_and_freezes():
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False).double()
    W = conv.weight.detach().clone().requires_grad_(True)
    q = QuantConv2d.from_float(conv, 8, "channel", "c.weight")
    x = _t((2, 3, 5, 5), 1)
    q(x).sum().backward()
    _ref_conv2d(x, W, None, 8, "channel", 1, 1, 1, 1).sum().backward()
    torch.testing.assert_close(q.weight_grad, W.grad, **TOL)
    q(x).sum().backward()
    torch.testing.assert_close(q.weight_grad, 2 * W.grad, **TOL)
    q.zero_weight_grad()
    q.weight_requires_grad = False
    assert not q(x).requires_grad
    q.weight_requires_grad = True
    with torch.no_grad():
        assert not q(x).requires_grad


def test_quant_conv2d_padding_strings_unbatched_and_errors():
    conv = nn.Conv2d(3, 3, (3, 5), padding="same", dilation=(2, 1), groups=3).double()
    q = QuantConv2d.from_float(conv, 8, "tensor", "c.weight")
    assert q.padding == (2, 2)
    x = _t((3, 6, 7), 2)
    y = q(x)
    assert y.shape == (3, 6, 7)
    torch.testing.assert_close(y, q(x.unsqueeze(0)).squeeze(0), rtol=0, atol=0)
    assert QuantConv2d.from_float(nn.Conv2d(2, 2, 3, padding="valid"), 8, "tensor").padding == (0, 0)
    with pytest.raises(ValueError, match="padding_mode 'reflect'"):
        QuantConv2d.from_float(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), 8, "tensor", "x.weight")
    with pytest.raises(ValueError, match="asymmetric"):
        QuantConv2d.from_float(nn.Conv2d(2, 2, 4, padding="same"), 8, "tensor")
    with pytest.raises(ValueError, match=r"expected input \[B, 3, H, W\]"):
        q(_t((1, 4, 5, 5), 3))
    with pytest.raises(ValueError, match="groups=2"):
        QuantConv2d(3, 4, 3, groups=2)
    with pytest.raises(ValueError, match="bits"):
        QuantConv2d(3, 4, 3, bits=3)
    with pytest.raises(ValueError, match="stride must be >= 1"):
        QuantConv2d(3, 4, 3, stride=0)
    with pytest.raises(ValueError, match="integer padding"):
        QuantConv2d(3, 4, 3, padding="same")
    assert "kernel_size=(3, 5)" in repr(q) and "groups=3" in repr(q) and "c.weight" in repr(q)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("gran", GRANS)
def test_quant_conv2d_holds_no_float_weight(bits, gran):
    conv = nn.Conv2d(4, 6, 3, padding=1)
    q = QuantConv2d.from_float(conv, bits, gran, "c.weight")
    assert not hasattr(q, "weight")
    assert [n for n, _ in q.named_parameters()] == ["bias"] and q.bias is conv.bias
    # issue 17: 4-bit codes live packed two per byte (uint8 [ceil(numel/2)]); ``q.codes`` unpacks them on access
    assert set(q.state_dict()) == {"packed" if bits == 4 else "codes", "scale", "bias"}
    if bits == 4:
        assert q.packed.dtype == torch.uint8 and tuple(q.packed.shape) == ((conv.weight.numel() + 1) // 2,)
    assert q.codes.dtype == torch.int8 and q.codes.shape == conv.weight.shape
    assert int(q.codes.abs().max()) <= 2 ** (bits - 1) - 1
    for v in list(vars(q).values()) + list(q._buffers.values()) + list(q._parameters.values()):
        if isinstance(v, torch.Tensor) and v.dtype.is_floating_point:
            assert v.numel() <= q.out_dim and v.dim() <= 1, tuple(v.shape)


# ----------------------------------------------------------------------------------------- saved tensors
@pytest.mark.parametrize("gran", GRANS)
@pytest.mark.parametrize("kind", ["dense", "depthwise", "strided"])
def test_quant_conv2d_saves_only_int8_codes_and_scales(gran, kind):
    kw = {"dense": dict(in_channels=32, out_channels=32, kernel_size=3, padding=1),
          "depthwise": dict(in_channels=32, out_channels=32, kernel_size=5, padding=2, groups=32),
          "strided": dict(in_channels=32, out_channels=48, kernel_size=3, stride=2, padding=1)}[kind]
    torch.manual_seed(3)
    ref_layer = nn.Conv2d(**kw)
    q = QuantConv2d.from_float(nn.Conv2d(**kw), 8, gran, "c.weight")
    x = torch.randn(4, 32, 24, 24, requires_grad=True)

    def saved(fn):
        out = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: out.append(t) or t, lambda t: t):
            y = fn()
        return out, y

    ref_saved, _ = saved(lambda: ref_layer(x))
    q_saved, y = saved(lambda: q(x))
    for t in q_saved:
        is_codes = t.dtype == torch.int8
        is_scale = t.dtype.is_floating_point and t.dim() <= 1 and t.numel() <= q.out_dim
        assert is_codes or is_scale, (t.dtype, tuple(t.shape))
    codes = sorted((tuple(t.shape) for t in q_saved if t.dtype == torch.int8), key=len)
    assert codes == [tuple(q.codes.shape), tuple(x.shape)] or codes == [tuple(x.shape), tuple(q.codes.shape)]
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    ratio = nbytes(q_saved) / nbytes(ref_saved)
    assert 0.2 <= ratio <= 0.3, ratio  # int8 vs float32 input + weight
    y.sum().backward()  # the saved tensors suffice for backward
    assert q.weight_grad is not None and x.grad is not None


# ----------------------------------------------------------------------------------------- hooks, checkpointing
class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8)
        self.c3 = nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(4, 2)

    def block(self, x):
        return self.c3(torch.relu(self.c2(torch.relu(self.bn(self.c1(x))))))

    def forward(self, x, ckpt=False):
        h = checkpoint(self.block, x, use_reentrant=False) if ckpt else self.block(x)
        return self.fc(h.mean(dim=(2, 3)))


def test_conv2d_model_conversion_hook_once_and_checkpointing():
    torch.manual_seed(0)
    fm = _ConvNet().double()
    include = lambda n, m: n.startswith("c") or n == "bn"  # noqa: E731  (bn: 1-D params only -> fine)
    keys = quantized_weight_keys(fm, include)
    assert keys == ["c1.weight", "c2.weight", "c3.weight"]
    float_params = {n for n, _ in fm.named_parameters()}
    qm = convert_to_quantized(fm, 4, "channel", include)
    assert all(isinstance(qm.get_submodule(n), QuantConv2d) for n in ("c1", "c2", "c3"))
    assert type(qm.fc) is nn.Linear
    assert list(quant_layers(qm)) == keys
    assert {n for n, _ in qm.named_parameters()} == float_params - set(keys)
    x = _t((2, 3, 8, 8), 5)
    results = {}
    for ckpt in (False, True):
        calls = {k: [] for k in keys}
        for layer in quant_layers(qm).values():
            layer.set_weight_grad_hook(lambda lyr, g: calls[lyr.weight_key].append(g.clone()))
        qm.zero_grad(set_to_none=True)
        qm(x, ckpt).pow(2).sum().backward()
        assert all(len(v) == 1 for v in calls.values()), {k: len(v) for k, v in calls.items()}
        results[ckpt] = {k: v[0] for k, v in calls.items()}
    for k in keys:
        assert torch.equal(results[False][k], results[True][k]), k
    for layer in quant_layers(qm).values():
        layer.set_weight_grad_hook(None)
    qm(x).pow(2).sum().backward()
    grads = model_gradients(qm)
    assert set(grads) == float_params
    assert torch.equal(grads["c2.weight"], results[False]["c2.weight"])


def test_conv2d_broadcast_round_trip_and_load_float_state():
    torch.manual_seed(1)
    fm, other = _ConvNet(), _ConvNet()
    include = lambda n, m: isinstance(m, nn.Conv2d)  # noqa: E731
    keys = quantized_weight_keys(fm, include)
    state = other.state_dict()
    qm = convert_to_quantized(fm, 8, "channel", include)
    arrays, meta = encode_broadcast(state, keys, 8, "channel")
    load_broadcast(qm, decode_broadcast(arrays, meta))
    for k in keys:
        layer = quant_layers(qm)[k]
        assert torch.equal(layer.codes.double(), _ref_codes(state[k], 8, "channel")), k
    load_float_state(qm, _ConvNet().state_dict())
    with pytest.raises(ValueError, match="c2.weight"):
        load_float_state(qm, {**state, "c2.weight": torch.zeros(8, 1, 2, 2)})


# ----------------------------------------------------------------------------------------- registry
class _WithUnhandled(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.odd = nn.Conv3d(2, 2, 1) if kind == "conv3d" else nn.Embedding(10, 4)


@pytest.mark.parametrize("kind,type_name", [("conv3d", "Conv3d"), ("embedding", "Embedding")])
def test_selected_but_unhandled_module_raises_naming_it(kind, type_name):
    m = _WithUnhandled(kind)
    before = {n: type(x) for n, x in m.named_modules()}
    select_all = lambda n, mod: True  # noqa: E731
    with pytest.raises(TypeError, match=rf"'odd' of type torch\.nn\.modules\.\w+\.{type_name} is selected"):
        quantized_weight_keys(m, select_all)
    with pytest.raises(TypeError, match=rf"'odd' of type .*{type_name}.*register_quantized_layer"):
        convert_to_quantized(m, 8, "tensor", select_all)
    assert {n: type(x) for n, x in m.named_modules()} == before  # nothing converted before the error
    # not selected -> stays float; include=None converts only covered types; norms (1-D params) may be selected
    assert quantized_weight_keys(m, lambda n, mod: n != "odd") == ["lin.weight"]
    assert quantized_weight_keys(m) == ["lin.weight"]
    convert_to_quantized(m, 8, "tensor")
    assert type(m.odd) is before["odd"] and isinstance(m.lin, QuantLinear)


class _FancyConv(nn.Conv2d):  # overrides forward: a Conv2d handler must not silently replace it
    def forward(self, x):
        return super().forward(x) * 2


class _PlainConv(nn.Conv2d):  # keeps nn.Conv2d.forward: covered by the Conv2d handler
    pass


def test_subclass_overriding_forward_is_not_covered():
    m = nn.Sequential(_FancyConv(2, 2, 1), _PlainConv(2, 2, 1))
    assert handler_for(m[0]) is None and handler_for(m[1]) is registered_quantized_layers()[nn.Conv2d]
    with pytest.raises(TypeError, match=r"'0' of type .*_FancyConv.*overrides forward"):
        quantized_weight_keys(m, lambda n, mod: True)
    assert quantized_weight_keys(m) == ["1.weight"]
    assert quantized_weight_keys(m, lambda n, mod: n == "1") == ["1.weight"]


def test_wrapnet_layers_are_not_converted():
    """WrapNet's WrapConv2d/WrapLinear subclass nn.Conv2d/nn.Linear but quantize themselves (own forward): the
    workload's filter selects nothing, and no filter can turn them into QuantConv2d/QuantLinear silently."""
    from fedaqt.models.wrapnet import WrapConv2d, WrapLinear, WrapVGG7, wrap_layers
    from fedaqt.workloads.wrapnet import WrapNetWorkload

    model = WrapVGG7(width=0.0625)
    wl = WrapNetWorkload.__new__(WrapNetWorkload)  # quantize_filter needs no config or data
    assert quantized_weight_keys(model, wl.quantize_filter) == []
    names = [n for n, _ in wrap_layers(model)]
    assert names and handler_for(WrapConv2d) is None and handler_for(WrapLinear) is None
    with pytest.raises(TypeError, match=rf"'{names[0]}' of type .*WrapConv2d.*overrides forward"):
        quantized_weight_keys(model, lambda n, m: isinstance(m, nn.Conv2d))
    assert not set(quantized_weight_keys(model)) & {f"{n}.weight" for n in names}


def test_mha_rules_and_builtin_registry():
    reg = registered_quantized_layers()
    assert list(reg) == [nn.Linear, nn.Conv1d, nn.Conv2d, nn.MultiheadAttention]
    assert reg[nn.Conv2d] == LayerHandler(QuantConv2d) and isinstance(reg[nn.MultiheadAttention],
                                                                      MultiheadAttentionHandler)
    m = nn.Sequential(nn.MultiheadAttention(8, 2), nn.Linear(8, 8))
    # out_proj is never converted alone, and the MHA covers its children also when it is not selected
    assert quantized_weight_keys(m, lambda n, mod: n == "0.out_proj") == []
    assert quantized_weight_keys(m, lambda n, mod: n == "0") == ["0.in_proj_weight", "0.out_proj.weight"]


# ----------------------------------------------------------------------------------------- plugin handler
class ScaledLinear(nn.Module):
    """A custom float layer a plugin might bring: ``y = gain * (x @ W^T + b)``."""

    def __init__(self, n_in, n_out, gain):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in ** 0.5)
        self.bias = nn.Parameter(torch.randn(n_out))
        self.gain = gain

    def forward(self, x):
        return self.gain * F.linear(x, self.weight, self.bias)


class QuantScaledLinear(QuantLinear):
    def forward(self, x):
        return self.gain * super().forward(x)


class ScaledLinearHandler(QuantHandler):
    def __eq__(self, other):
        return type(other) is type(self)

    def __hash__(self):
        return 0

    def convert(self, module, config, prefix):
        q = QuantScaledLinear.from_float_weight(module.weight, module.bias, config.bits, config.granularity,
                                                weight_key=f"{prefix}weight")
        q.gain = module.gain
        return q


@pytest.fixture
def scaled_linear_registered():
    register_quantized_layer(ScaledLinear, ScaledLinearHandler())
    yield
    unregister_quantized_layer(ScaledLinear)


def test_plugin_registered_handler_converts_custom_layer(scaled_linear_registered):
    torch.manual_seed(4)
    fm = nn.Sequential(ScaledLinear(5, 3, gain=1.5), nn.Tanh()).double()
    W = fm[0].weight.detach().clone().requires_grad_(True)
    b = fm[0].bias.detach().clone().requires_grad_(True)
    include = lambda n, m: n == "0"  # noqa: E731
    assert quantized_weight_keys(fm, include) == ["0.weight"]
    qm = convert_to_quantized(fm, 4, "tensor", include)
    assert isinstance(qm[0], QuantScaledLinear) and list(quant_layers(qm)) == ["0.weight"]
    x = _t((4, 5), 6).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    y = qm(x)
    y_ref = torch.tanh(1.5 * F.linear(_ref_fq(x_ref, 8, "tensor"), _ref_fq(W, 4, "tensor"), b))
    y.sum().backward()
    y_ref.sum().backward()
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(x.grad, x_ref.grad, **TOL)
    torch.testing.assert_close(qm[0].weight_grad, W.grad, **TOL)
    torch.testing.assert_close(qm[0].bias.grad, b.grad, **TOL)
    register_quantized_layer(ScaledLinear, ScaledLinearHandler())  # an equal handler again: no-op
    with pytest.raises(ValueError, match="already registered for ScaledLinear"):
        register_quantized_layer(ScaledLinear, LayerHandler(QuantLinear))


def test_unregistered_custom_layer_selected_raises():
    m = nn.Sequential(ScaledLinear(5, 3, gain=2.0))
    with pytest.raises(TypeError, match=r"'0' of type .*ScaledLinear is selected"):
        convert_to_quantized(m, 8, "tensor", lambda n, mod: True)


def test_register_validates_arguments():
    with pytest.raises(TypeError, match="nn.Module subclass"):
        register_quantized_layer(int, LayerHandler(QuantLinear))
    with pytest.raises(TypeError, match="convert"):
        register_quantized_layer(ScaledLinear, object())
    assert ScaledLinear not in registered_quantized_layers()


class _BadKeyHandler(QuantHandler):
    def convert(self, module, config, prefix):
        return QuantLinear.from_float_weight(module.weight, module.bias, config.bits, config.granularity,
                                             weight_key="wrong.weight")


class _DropsBiasHandler(QuantHandler):
    def convert(self, module, config, prefix):
        return QuantLinear.from_float_weight(module.weight, None, config.bits, config.granularity,
                                             weight_key=f"{prefix}weight")


@pytest.mark.parametrize("handler,match", [(_BadKeyHandler(), "wrong.weight"), (_DropsBiasHandler(), "bias")])
def test_handler_contract_is_checked(handler, match):
    register_quantized_layer(ScaledLinear, handler)
    try:
        with pytest.raises(TypeError, match=match):
            convert_to_quantized(nn.Sequential(ScaledLinear(3, 2, 1.0)), 8, "tensor")
    finally:
        unregister_quantized_layer(ScaledLinear)
