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


# ---------------------------------------------------------------------------------------------------------------
# Issue 9 item 1: the relay must use the codes + float32 scale that went on the wire. Float32 server weights of
# realistic size (512x2048, nn.Linear init) are quantized by the real broadcast encoder; the reference is plain
# autograd of sum(g * Q(W)) with s = amax|w|/t_b differentiable and an STE round (tests/qat_reference.py), whose
# forward values are the float32 broadcast's and whose backward runs in float64.


def _wire(w32, bits, gran):
    from fedaqt.quant.wire import decode_broadcast, encode_broadcast

    arrays, meta = encode_broadcast({"enc.weight": w32}, ["enc.weight"], bits, gran)
    return decode_broadcast(arrays, meta)["enc.weight"]


def _big_case(bits, gran):
    torch.manual_seed(0)
    w32 = torch.nn.Linear(2048, 512).weight.detach().clone()
    # a gradient shaped like a linear layer's: rank-few outer products plus noise, float64 like the server mean
    gen = torch.Generator().manual_seed(1)
    a, x = torch.randn(512, 5, generator=gen, dtype=torch.float64), torch.randn(5, 2048, generator=gen, dtype=torch.float64)
    g = 1e-2 * (a @ x) / 5 + 1e-3 * torch.randn(512, 2048, generator=gen, dtype=torch.float64)
    return w32, g, _wire(w32, bits, gran)


def _reference_correction(w32, g, bits, gran):
    from qat_reference import wire_quant

    W = w32.double().requires_grad_(True)
    q = wire_quant(W, bits, gran)
    (q * g).sum().backward()
    return q.detach(), W.grad - g


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("gran", GRANS)
def test_relay_with_broadcast_codes_exact_on_float32_512x2048(bits, gran):
    from qat_reference import float64_code_mismatches, max_abs_positions

    w32, g, qt = _big_case(bits, gran)
    q_ref, corr_ref = _reference_correction(w32, g, bits, gran)
    # the reference is quantized as the broadcast does: its Q(W) is what the clients decode, bit for bit
    assert torch.equal(q_ref.float(), qt.dequantize())
    corr = relay_correction(g, w32, bits, gran, scale=qt.scale, codes=qt.codes)
    at_max = max_abs_positions(w32, gran)
    assert corr.dtype == torch.float64 and bool((corr[~at_max] == 0).all())
    per = corr_ref[at_max].abs()
    err = (corr - corr_ref)[at_max].abs()
    print(f"\n{bits}-bit {gran}: max |corr - ref| = {float(err.max()):.2e}, max |corr| = {float(per.max()):.2e}, "
          f"float64 code mismatches = {float64_code_mismatches(w32, bits, gran)}")
    # float64 rounding only: 1e-10 of the correction of that tensor/channel
    assert float(per.min()) > 0
    assert bool((err <= 1e-10 * per + 1e-15).all()), float((err / per).max())


@pytest.mark.parametrize("bits", BITS)
def test_float64_requantization_differs_from_the_wire(bits):
    """Why the codes must come from the wire: recomputing Q(w) in float64 (the pre-fix relay) is off by far more
    than float64 rounding on these weights (int8: codes differ; int4: the float32 scale differs in its last bits)."""
    from qat_reference import float64_code_mismatches, max_abs_positions

    for gran in GRANS:
        w32, g, qt = _big_case(bits, gran)
        _, corr_ref = _reference_correction(w32, g, bits, gran)
        old = relay_correction(g, w32.double(), bits, gran)
        at_max = max_abs_positions(w32, gran)
        rel = ((old - corr_ref)[at_max].abs() / corr_ref[at_max].abs()).max()
        assert rel > 1e-8, (gran, float(rel))
        if bits == 8:
            assert float64_code_mismatches(w32, bits, gran) > 0


def test_relay_correction_rejects_bad_wire_inputs():
    w = _t((4, 6), 40).float()
    g = _t((4, 6), 41)
    codes, s = torch.zeros(4, 6, dtype=torch.int8), torch.full((4,), 0.1)
    with pytest.raises(ValueError, match="without the scale"):
        relay_correction(g, w, 8, "channel", codes=codes)
    with pytest.raises(ValueError, match=r"scale shape \(3,\)"):
        relay_correction(g, w, 8, "channel", scale=s[:3], codes=codes)
    with pytest.raises(ValueError, match=r"scale shape \(4,\)"):
        relay_correction(g, w, 8, "tensor", scale=s, codes=codes)
    with pytest.raises(ValueError, match="finite and > 0.*nan"):
        relay_correction(g, w, 8, "channel", scale=torch.tensor([0.1, float("nan"), 0.1, 0.1]), codes=codes)
    with pytest.raises(ValueError, match="finite and > 0.*-0.5"):
        relay_correction(g, w, 8, "channel", scale=torch.tensor([0.1, -0.5, 0.1, 0.1]), codes=codes)
    with pytest.raises(ValueError, match="integer tensor, got torch.float32"):
        relay_correction(g, w, 8, "channel", scale=s, codes=codes.float())
    with pytest.raises(ValueError, match=r"codes shape \(4, 5\)"):
        relay_correction(g, w, 8, "channel", scale=s, codes=codes[:, :5])
    with pytest.raises(ValueError, match=r"\[-7, 7\].*\[0, 8\]"):
        relay_correction(g, w, 4, "channel", scale=s, codes=codes + torch.eye(4, 6, dtype=torch.int8) * 8)
