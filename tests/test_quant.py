"""Spec/METHODS.md section 1.3: uniform symmetric quantization, STE, scale gradient (eqs. 3.2/3.3), int4 packing."""

from __future__ import annotations

import pytest
import torch

from fedaqt.quant import (
    compute_scale,
    dequantize,
    fake_quant,
    max_abs_mask,
    pack_int4,
    qmax,
    quantize,
    quantize_activation,
    ste_round,
    unpack_int4,
)



BITS = [8, 4]
GRANS = ["tensor", "channel"]
SHAPES = [(6, 5), (4, 3, 5)]  # Linear [out, in], Conv1d [out, in, k]


def _w(shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype)


def _bscale(s, w):
    return s if s.dim() == 0 else s.reshape((-1,) + (1,) * (w.dim() - 1))


def test_qmax_values_and_errors():
    assert qmax(8) == 127 and qmax(4) == 7
    for bad in (2, 16, 0, True):
        with pytest.raises(ValueError, match=repr(bad)):
            qmax(bad)
    with pytest.raises(ValueError, match="granularity"):
        quantize(_w((2, 2)), 8, "row")


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("gran", GRANS)
@pytest.mark.parametrize("shape", SHAPES)
def test_codes_grid_argmax_and_error_bound(bits, gran, shape):
    w = _w(shape, seed=1)
    t = qmax(bits)
    q, s = quantize(w, bits, gran)
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert s.dtype == w.dtype
    assert s.shape == (() if gran == "tensor" else (shape[0],))
    assert int(q.abs().max()) <= t
    # integer-valued: the container is int8, and w/s rounds to exactly q
    sb = _bscale(s, w)
    assert torch.equal(torch.round(w / sb).clamp(-t, t), q.double())
    # argmax entry (per tensor / per channel) -> exactly ±t_b with the sign of w
    if gran == "tensor":
        i = w.abs().argmax()
        assert int(q.reshape(-1)[i]) == t * int(torch.sign(w.reshape(-1)[i]))
    else:
        flat_w, flat_q = w.reshape(shape[0], -1), q.reshape(shape[0], -1)
        idx = flat_w.abs().argmax(dim=1)
        r = torch.arange(shape[0])
        assert torch.equal(flat_q[r, idx].long(), (t * torch.sign(flat_w[r, idx])).long())
    # |w - Q(w)| <= s/2 elementwise (float64 rounding slack 1e-12 relative)
    err = (w - dequantize(q, s)).abs()
    assert bool((err <= sb / 2 * (1 + 1e-12)).all())
    # scale is max|w| / t_b
    amax = w.abs().amax() if gran == "tensor" else w.abs().reshape(shape[0], -1).amax(1)
    torch.testing.assert_close(s, amax / t, rtol=0, atol=0)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("gran", GRANS)
def test_idempotence(bits, gran):
    w = _w((7, 9), seed=2)
    qw = dequantize(*quantize(w, bits, gran))
    qqw = dequantize(*quantize(qw, bits, gran))
    assert (qqw - qw).abs().max().item() <= 1e-12
    assert torch.equal(quantize(qw, bits, gran)[0], quantize(w, bits, gran)[0])


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", SHAPES)
def test_per_channel_equals_per_tensor_per_slice(bits, shape):
    w = _w(shape, seed=3)
    q, s = quantize(w, bits, "channel")
    for c in range(shape[0]):
        qc, sc = quantize(w[c], bits, "tensor")
        assert torch.equal(q[c], qc)
        assert torch.equal(s[c], sc)


def _hand_grad(g, w, bits, gran):
    """Eq. 3.2/3.3 written out independently of the library: g + (g_s/t_b) M ⊙ sign(w), unique max assumed."""
    t = qmax(bits)
    if gran == "tensor":
        s = w.abs().max() / t
        qw = s * torch.clamp(torch.round(w / s), -t, t)
        g_s = (g * (qw - w) / s).sum()
        m = (w.abs() == w.abs().max()).double()
        return g + (g_s / t) * m * torch.sign(w)
    out = torch.empty_like(w)
    for c in range(w.shape[0]):
        out[c] = _hand_grad(g[c], w[c], bits, "tensor")
    return out


def _plain_autograd_fq(w, bits, gran):
    """Spec 1.2 literally: s = amax|w|/t_b (differentiable), STE round ``u + (round(u) - u).detach()``."""
    t = qmax(bits)
    if gran == "tensor":
        s = w.abs().amax() / t
    else:
        s = w.abs().amax(dim=tuple(range(1, w.dim())), keepdim=True) / t
    u = w / s
    return ste_round(u) * s


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("gran", GRANS)
@pytest.mark.parametrize("shape", SHAPES)
def test_hand_formula_equals_autograd(bits, gran, shape):
    w = _w(shape, seed=4).requires_grad_(True)
    g = _w(shape, seed=5)
    (fake_quant(w, bits, gran, scale_grad=True) * g).sum().backward()
    hand = _hand_grad(g, w.detach(), bits, gran)
    assert (w.grad - hand).abs().max().item() <= 1e-10
    # the scale term is really there (not a trivially passing test)
    assert (w.grad - g).abs().max().item() > 1e-3
    # plain autograd through s = amax/t_b and the STE round (no custom Function) agrees too
    w2 = w.detach().clone().requires_grad_(True)
    (_plain_autograd_fq(w2, bits, gran) * g).sum().backward()
    assert (w2.grad - hand).abs().max().item() <= 1e-10
    # same forward values as quantize/dequantize
    assert torch.equal(fake_quant(w.detach(), bits, gran, True), dequantize(*quantize(w.detach(), bits, gran)))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("gran", GRANS)
def test_hand_formula_nonlinear_loss(bits, gran):
    """g = dL/dQ(w) from a nonlinear loss; autograd through s(w) still equals eq. 3.2."""
    w = _w((5, 4), seed=6).requires_grad_(True)
    x = _w((4, 3), seed=7)
    wq = fake_quant(w, bits, gran, scale_grad=True)
    wq.retain_grad()
    torch.sin(wq @ x).pow(2).sum().backward()
    hand = _hand_grad(wq.grad, w.detach(), bits, gran)
    assert (w.grad - hand).abs().max().item() <= 1e-10


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("gran", GRANS)
def test_detached_mode_is_identity_and_modes_differ_only_at_max(bits, gran):
    w = _w((6, 8), seed=8)
    g = _w((6, 8), seed=9)
    w1 = w.clone().requires_grad_(True)
    (fake_quant(w1, bits, gran, scale_grad=False) * g).sum().backward()
    assert torch.equal(w1.grad, g)
    w2 = w.clone().requires_grad_(True)
    (fake_quant(w2, bits, gran, scale_grad=True) * g).sum().backward()
    diff = w2.grad - w1.grad
    at_max = max_abs_mask(w, gran) > 0
    assert bool((diff[~at_max] == 0).all())
    assert bool((diff[at_max] != 0).all())
    assert int(at_max.sum()) == (1 if gran == "tensor" else w.shape[0])


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("gran", GRANS)
def test_int_matmul_equals_fake_quant_matmul(bits, gran):
    x = _w((9, 16), seed=10)
    w = _w((5, 16), seed=11)
    qx, sx = quantize_activation(x)
    qw, sw = quantize(w, bits, gran)
    acc = qx.long() @ qw.long().t()  # exact int64 accumulation
    y_int = acc.double() * (sx * sw)
    y_ref = fake_quant(x, 8, "tensor", False) @ fake_quant(w, bits, gran, False).t()
    torch.testing.assert_close(y_int, y_ref, rtol=1e-13, atol=1e-13)
    assert qx.dtype == torch.int8 and sx.dim() == 0 and not sx.requires_grad


@pytest.mark.parametrize("n", [1, 2, 15, 16, 31])
def test_int4_pack_roundtrip_every_value(n):
    vals = torch.arange(-7, 8, dtype=torch.int8)
    codes = vals.repeat((n + 14) // 15)[:n] if n < 15 else vals.repeat(n // 15 + 1)[:n]
    codes = codes[torch.randperm(n, generator=torch.Generator().manual_seed(n))]
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == ((n + 1) // 2,)
    assert torch.equal(unpack_int4(packed, n), codes)


def test_int4_pack_all_values_all_positions_and_shapes():
    vals = torch.arange(-8, 8, dtype=torch.int8)
    # every ordered pair (low nibble, high nibble)
    pairs = torch.cartesian_prod(vals, vals).reshape(-1)
    assert torch.equal(unpack_int4(pack_int4(pairs), pairs.numel()), pairs)
    # multi-dimensional, odd count
    codes = torch.randint(-7, 8, (3, 5, 3), generator=torch.Generator().manual_seed(0)).to(torch.int8)
    packed = pack_int4(codes)
    assert packed.shape == (23,)
    assert torch.equal(unpack_int4(packed, codes.numel()).reshape(codes.shape), codes)
    assert unpack_int4(pack_int4(torch.zeros(0, dtype=torch.int8)), 0).numel() == 0


def test_int4_pack_errors():
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(torch.tensor([0, 8], dtype=torch.int8))
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(torch.tensor([-9], dtype=torch.int8))
    with pytest.raises(ValueError, match="int8"):
        pack_int4(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="expected"):
        unpack_int4(torch.zeros(3, dtype=torch.uint8), 8)
    with pytest.raises(ValueError, match="uint8"):
        unpack_int4(torch.zeros(3, dtype=torch.int8), 6)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("gran", GRANS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_all_zero_tensor_finite_grads(bits, gran, dtype):
    w = torch.zeros(4, 3, dtype=dtype)
    w[1] = torch.tensor([0.5, -1.0, 0.25], dtype=dtype)  # one nonzero channel next to all-zero ones
    for ww in (torch.zeros(4, 3, dtype=dtype), w):
        for sg in (True, False):
            x = ww.clone().requires_grad_(True)
            y = fake_quant(x, bits, gran, scale_grad=sg)
            (y * torch.ones_like(y)).sum().backward()
            assert bool(torch.isfinite(y).all()) and bool(torch.isfinite(x.grad).all())
        q, s = quantize(ww, bits, gran)
        assert bool(torch.isfinite(s).all()) and bool((s > 0).all())
        assert bool((dequantize(q, s)[ww == 0] == 0).all())
    eps = 1e-12 if dtype == torch.float64 else 1e-8
    assert compute_scale(torch.zeros(3, dtype=dtype), bits, "tensor").item() == pytest.approx(eps)


def test_dequantize_shape_errors():
    q = torch.zeros(3, 4, dtype=torch.int8)
    with pytest.raises(ValueError, match="scale shape"):
        dequantize(q, torch.ones(4))
    with pytest.raises(ValueError, match="per-channel"):
        quantize(torch.tensor(1.0), 8, "channel")
