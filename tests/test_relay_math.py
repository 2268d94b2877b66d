"""Spec/METHODS.md 2.2 step 6 (eq. 3.4) and 2.3: the gradient-relay correction, as pure math on tensors."""

from __future__ import annotations

import pytest
import torch

from fedaqt.quant import compute_scale, fake_quant, max_abs_mask, relay_correction, ste_round



BITS = [8, 4]
GRANS = ["tensor", "channel"]
SHAPES = [(7, 6), (5, 3, 4)]


def _t(shape, seed, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _autograd(w, g, bits, gran, scale_grad):
    x = w.detach().clone().requires_grad_(True)
    (fake_quant(x, bits, gran, scale_grad=scale_grad) * g).sum().backward()
    return x.grad


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("gran", GRANS)
@pytest.mark.parametrize("shape", SHAPES)
def test_relay_equals_autograd_difference(bits, gran, shape):
    w, g = _t(shape, 1), _t(shape, 2)
    corr = relay_correction(g, w, bits, gran)
    ref = _autograd(w, g, bits, gran, True) - _autograd(w, g, bits, gran, False)
    assert corr.shape == w.shape and corr.dtype == torch.float64
    assert (corr - ref).abs().max().item() <= 1e-12
    assert corr.abs().max().item() > 1e-3  # non-trivial


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("gran", GRANS)
def test_relay_nonzero_only_at_max_abs(bits, gran):
    w, g = _t((9, 8), 3), _t((9, 8), 4)
    corr = relay_correction(g, w, bits, gran)
    at_max = max_abs_mask(w, gran) > 0
    assert bool((corr[~at_max] == 0).all())
    assert bool((corr[at_max] != 0).all())
    # it pushes along sign(w) with the sign of g_s: corr * sign(w) has one sign per tensor/channel
    n = 1 if gran == "tensor" else w.shape[0]
    assert int(at_max.sum()) == n


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("gran", GRANS)
def test_relay_is_linear(bits, gran):
    w = _t((6, 5), 5)
    gs = [_t((6, 5), 10 + k) for k in range(4)]
    a = [0.2, 0.3, 0.5, -1.5]
    lhs = sum(ak * relay_correction(gk, w, bits, gran) for ak, gk in zip(a, gs))
    rhs = relay_correction(sum(ak * gk for ak, gk in zip(a, gs)), w, bits, gran)
    assert (lhs - rhs).abs().max().item() <= 1e-12


@pytest.mark.parametrize("gran", GRANS)
def test_relay_ties_split_like_amax(gran):
    w = _t((3, 6), 6)
    w[:, 1] = 5.0
    w[:, 4] = -5.0  # two tied max-abs entries per channel, six in the whole tensor
    g = _t((3, 6), 7)
    corr = relay_correction(g, w, 8, gran)
    ref = _autograd(w, g, 8, gran, True) - _autograd(w, g, 8, gran, False)
    assert (corr - ref).abs().max().item() <= 1e-12
    m = max_abs_mask(w, gran)
    assert torch.allclose(m.sum(), torch.tensor(1.0 if gran == "tensor" else 3.0, dtype=torch.float64))


def test_relay_all_zero_and_float32_and_explicit_scale():
    z = torch.zeros(4, 4, dtype=torch.float64)
    g = _t((4, 4), 8)
    for gran in GRANS:
        c = relay_correction(g, z, 8, gran)
        assert bool(torch.isfinite(c).all()) and bool((c == 0).all())
    w = _t((4, 4), 9)
    c64 = relay_correction(g, w, 4, "channel")
    c32 = relay_correction(g.float(), w.float(), 4, "channel")
    assert c32.dtype == torch.float32
    torch.testing.assert_close(c32.double(), c64, rtol=1e-4, atol=1e-5)
    # passing the scale explicitly (e.g. the broadcast one) gives the same result for the max-abs scale
    s = compute_scale(w, 4, "channel")
    assert torch.equal(relay_correction(g, w, 4, "channel", scale=s), c64)
    with pytest.raises(ValueError, match="shape"):
        relay_correction(g[:2], w, 8, "tensor")


def test_ste_round():
    u = torch.tensor([-1.5, -0.5, 0.49, 0.5, 1.5, 2.6], dtype=torch.float64, requires_grad=True)
    r = ste_round(u)
    assert torch.equal(r.detach(), torch.round(u.detach()))
    r.sum().backward()
    assert torch.equal(u.grad, torch.ones_like(u))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("gran", GRANS)
def test_relayed_weighted_mean_equals_centralized(bits, gran):
    """Spec 2.3 in miniature: sum_k (n_k/N) [g_k + corr(g_k)] == ḡ + corr(ḡ) == autograd with s(w)."""
    w = _t((5, 4), 20)
    xs = [_t((n, 4), 30 + n) for n in (2, 3, 5)]
    n_tot = sum(x.shape[0] for x in xs)
    wq = fake_quant(w, bits, gran, scale_grad=False)
    # clients: g_k = dL_k/dQ(w) at Q(w)
    gks = []
    for x in xs:
        q = wq.detach().clone().requires_grad_(True)
        torch.tanh(x @ q.t()).pow(2).mean().backward()
        gks.append(q.grad)
    g_bar = sum(x.shape[0] / n_tot * gk for x, gk in zip(xs, gks))
    relayed = g_bar + relay_correction(g_bar, w, bits, gran)
    # centralized QAT reference: autograd of sum_k (n_k/N) L_k(Q(W)), s differentiable
    ww = w.clone().requires_grad_(True)
    wqd = fake_quant(ww, bits, gran, scale_grad=True)
    sum(x.shape[0] / n_tot * torch.tanh(x @ wqd.t()).pow(2).mean() for x in xs).backward()
    assert (relayed - ww.grad).abs().max().item() <= 1e-12
