"""LSA token mixer and MetaFormer backbone (issue 14, spec §4.6): checks against independent references
(torch's nn.MultiheadAttention, an explicit per-chunk attention loop, index formulas written out here,
torch's FlopCounterMode)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from fedaqt.models import metaformer as mf
from fedaqt.models.metaformer import (
    GlobalSelfAttention,
    LocalSelfAttention,
    WindowAttention,
    build_metaformer,
    partition_tokens,
    set_local_length,
    unpartition_tokens,
)


def _lsa(dim=64, M=49, swap=False, bias=True, seed=0, random_bias=False, dtype=torch.float64):
    torch.manual_seed(seed)
    m = LocalSelfAttention(dim, M, swap=swap, bias=bias).to(dtype)
    if random_bias and m.rel_bias is not None:
        with torch.no_grad():
            m.rel_bias.normal_()
    return m


def _mha_reference(lsa: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """torch's own nn.MultiheadAttention with the LSA's weights, over all H*W tokens (row-major)."""
    B, C, H, W = x.shape
    mha = nn.MultiheadAttention(C, lsa.heads, batch_first=True).to(x.dtype)
    with torch.no_grad():
        mha.in_proj_weight.copy_(lsa.qkv.weight)
        mha.in_proj_bias.copy_(lsa.qkv.bias)
        mha.out_proj.weight.copy_(lsa.proj.weight)
        mha.out_proj.bias.copy_(lsa.proj.bias)
    t = x.flatten(2).transpose(1, 2)
    y, _ = mha(t, t, t, need_weights=False)
    return y.transpose(1, 2).reshape(B, C, H, W)


def _order(H: int, W: int, swap: bool) -> np.ndarray:
    """seq[k] = row-major index h*W+w of the token at sequence position k (the spec's flatten orders)."""
    hh, ww = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    pos = (ww * H + hh) if swap else (hh * W + ww)  # sequence position of (h, w)
    seq = np.empty(H * W, dtype=np.int64)
    seq[pos.reshape(-1)] = (hh * W + ww).reshape(-1)
    return seq


def _chunk_reference(lsa: LocalSelfAttention, x: torch.Tensor) -> torch.Tensor:
    """Explicit loop: per image, per chunk of real tokens, softmax(q k^T / sqrt(d) + b[i-j+M-1]) v, then proj."""
    B, C, H, W = x.shape
    L = H * W
    m = min(lsa.local_len, L)
    seq = _order(H, W, lsa.swap)
    d = lsa.head_dim
    out = torch.zeros(B, L, C, dtype=x.dtype)
    tokens = x.flatten(2).transpose(1, 2)  # [B, L, C] row-major
    for b in range(B):
        for start in range(0, L, m):
            ids = seq[start : start + m]
            t = tokens[b, ids]  # [n, C] real tokens only
            n = len(ids)
            q, k, v = lsa.qkv(t).split(C, dim=-1)
            heads = []
            for h in range(lsa.heads):
                sl = slice(h * d, (h + 1) * d)
                s = q[:, sl] @ k[:, sl].T / math.sqrt(d)
                if lsa.rel_bias is not None:
                    for i in range(n):
                        for j in range(n):
                            s[i, j] = s[i, j] + lsa.rel_bias[i - j + lsa.table_len - 1, h]
                heads.append(torch.softmax(s, dim=-1) @ v[:, sl])
            out[b, ids] = lsa.proj(torch.cat(heads, dim=-1))
    return out.transpose(1, 2).reshape(B, C, H, W)


# ------------------------------------------------------------------------------------------ M == L is global MHSA
@pytest.mark.parametrize("H,W", [(7, 7), (4, 6)])
def test_lsa_with_m_equal_l_is_global_mhsa(H, W):
    x = torch.randn(2, 64, H, W, dtype=torch.float64)
    for swap in (False, True):
        lsa = _lsa(M=H * W, swap=swap, bias=True)  # zero-initialized bias table
        assert torch.count_nonzero(lsa.rel_bias) == 0
        ref = _mha_reference(lsa, x)
        with torch.no_grad():
            torch.testing.assert_close(lsa(x), ref, atol=1e-6, rtol=0)
    # float32 as used in training, same tolerance
    lsa = _lsa(M=H * W, dtype=torch.float32)
    x32 = x.float()
    with torch.no_grad():
        torch.testing.assert_close(lsa(x32), _mha_reference(lsa, x32), atol=1e-6, rtol=0)
    # M > L falls back to global attention too; swap and no-swap agree without bias
    a, b = _lsa(M=1000, swap=False, bias=False), _lsa(M=1000, swap=True, bias=False)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), atol=1e-10, rtol=0)
        torch.testing.assert_close(a(x), _mha_reference(a, x), atol=1e-6, rtol=0)


def test_global_and_window_mixers_match_mhsa_when_one_window_covers_the_map():
    x = torch.randn(2, 64, 7, 7, dtype=torch.float64)
    torch.manual_seed(1)
    g = GlobalSelfAttention(64).double()
    wa = WindowAttention(64, window=7).double()
    wa.load_state_dict(g.state_dict(), strict=False)
    with torch.no_grad():
        torch.testing.assert_close(g(x), _mha_reference(g, x), atol=1e-6, rtol=0)
        torch.testing.assert_close(wa(x), _mha_reference(g, x), atol=1e-6, rtol=0)


def test_window_attention_structure_with_padding():
    """Window (reshape-based, no shift) on 5x9 with w=4: output (h, w) depends on input (h', w') iff same window."""
    torch.manual_seed(2)
    wa = WindowAttention(32, window=4).double()
    H, W = 5, 9
    x = torch.randn(1, 32, H, W, dtype=torch.float64)
    with torch.no_grad():
        base = wa(x)
        assert base.shape == x.shape
        for j in range(H * W):
            xp = x.clone()
            xp[0, :, j // W, j % W] += 1.0
            changed = (wa(xp) - base).abs().amax(dim=1)[0].reshape(-1) > 1e-9
            hj, wj = divmod(j, W)
            expect = np.array([(h // 4, w // 4) == (hj // 4, wj // 4) for h in range(H) for w in range(W)])
            assert np.array_equal(changed.numpy(), expect), j


# ------------------------------------------------------------------------------------------ partition structure
@pytest.mark.parametrize("H,W,M", [(6, 6, 9), (4, 6, 5), (6, 4, 8), (3, 7, 7), (5, 3, 4)])
@pytest.mark.parametrize("swap", [False, True])
def test_perturbing_a_token_changes_exactly_its_chunk(H, W, M, swap):
    lsa = _lsa(dim=32, M=M, swap=swap, random_bias=True, seed=3)
    x = torch.randn(1, 32, H, W, dtype=torch.float64)
    with torch.no_grad():
        base = lsa(x)
        for j in range(H * W):
            hj, wj = divmod(j, W)
            xp = x.clone()
            xp[0, :, hj, wj] += 1.0
            changed = (lsa(xp) - base).abs().amax(dim=1)[0].reshape(-1) > 1e-9
            if swap:
                chunk = lambda h, w: (w * H + h) // M  # noqa: E731
            else:
                chunk = lambda h, w: (h * W + w) // M  # noqa: E731
            expect = np.array([chunk(h, w) == chunk(hj, wj) for h in range(H) for w in range(W)])
            assert np.array_equal(changed.numpy(), expect), (j, changed.numpy().astype(int), expect.astype(int))


@pytest.mark.parametrize("H,W,M", [(6, 6, 9), (4, 6, 5), (6, 4, 8), (7, 7, 49), (2, 3, 100)])
@pytest.mark.parametrize("swap", [False, True])
def test_partition_round_trip_and_chunk_contents(H, W, M, swap):
    x = torch.randn(2, 3, H, W)
    chunks, m, pad = partition_tokens(x, M, swap)
    L = H * W
    assert m == min(M, L) and pad == (-L) % m and chunks.shape == (2 * (L + pad) // m, m, 3)
    # chunk p, position i holds the token at sequence position p*m+i (per image), zeros past the end
    seq = _order(H, W, swap)
    flat = x.flatten(2).transpose(1, 2)  # [B, L, C] row-major
    expect = torch.zeros(2, L + pad, 3)
    expect[:, :L] = flat[:, seq]
    assert torch.equal(chunks, expect.reshape(-1, m, 3))
    back = unpartition_tokens(chunks, x.shape, pad, swap)
    assert torch.equal(back, x)


# ------------------------------------------------------------------------------------------ padding
@pytest.mark.parametrize("H,W,M,swap", [(4, 6, 5, False), (4, 6, 5, True), (7, 7, 16, True), (3, 5, 4, False)])
def test_padding_does_not_touch_real_outputs(H, W, M, swap, monkeypatch):
    lsa = _lsa(dim=64, M=M, swap=swap, random_bias=True, seed=4)
    x = torch.randn(2, 64, H, W, dtype=torch.float64)
    assert (H * W) % M != 0
    with torch.no_grad():
        y = lsa(x)
        assert y.shape == x.shape
        torch.testing.assert_close(y, _chunk_reference(lsa, x), atol=1e-10, rtol=0)
        # the padded tokens hold 1e3 instead of zeros: real outputs are unchanged
        orig_pad = F.pad
        monkeypatch.setattr(mf.F, "pad", lambda t, p, *a, **k: orig_pad(t, p, value=1e3))
        torch.testing.assert_close(lsa(x), y, atol=1e-10, rtol=0)


def test_lsa_matches_the_chunk_loop_on_divisible_maps():
    for swap in (False, True):
        lsa = _lsa(dim=64, M=6, swap=swap, random_bias=True, seed=5)
        x = torch.randn(1, 64, 4, 6, dtype=torch.float64)
        with torch.no_grad():
            torch.testing.assert_close(lsa(x), _chunk_reference(lsa, x), atol=1e-10, rtol=0)


# ------------------------------------------------------------------------------------------ relative bias
def test_bias_table_shape_and_toeplitz():
    M = 7
    lsa = _lsa(dim=96, M=M, random_bias=True)
    assert lsa.rel_bias.shape == (2 * M - 1, 3)
    b = lsa.bias_matrix(M).detach()  # [heads, M, M]
    assert b.shape == (3, M, M)
    t = lsa.rel_bias.detach()
    for i in range(M):
        for j in range(M):
            assert torch.equal(b[:, i, j], t[i - j + M - 1])
            if i + 1 < M and j + 1 < M:
                assert torch.equal(b[:, i + 1, j + 1], b[:, i, j])  # depends only on i - j
    # every entry of the table is used exactly once per diagonal (2M-1 distinct diagonals)
    diag = {i - j for i in range(M) for j in range(M)}
    assert len(diag) == 2 * M - 1
    # no table without bias; zeros at init
    assert _lsa(bias=False).rel_bias is None
    assert torch.count_nonzero(LocalSelfAttention(64, 49).rel_bias) == 0


def test_bias_table_does_not_depend_on_resolution_and_test_m_can_shrink():
    lsa = _lsa(dim=32, M=8, random_bias=True)
    n = sum(p.numel() for p in lsa.parameters())
    x1, x2 = torch.randn(1, 32, 4, 4, dtype=torch.float64), torch.randn(1, 32, 8, 12, dtype=torch.float64)
    with torch.no_grad():
        assert lsa(x1).shape == x1.shape and lsa(x2).shape == x2.shape
        set_local_length(lsa, 4)  # test at a shorter M (Table 4.7): same table, chunks of 4
        torch.testing.assert_close(lsa(x2), _chunk_reference(lsa, x2), atol=1e-10, rtol=0)
    assert sum(p.numel() for p in lsa.parameters()) == n
    with pytest.raises(ValueError, match="M=0"):
        set_local_length(lsa, 0)


# ------------------------------------------------------------------------------------------ MACs (eq. 4.4)
def _counted_macs(module: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates torch's FlopCounterMode sees (mm/bmm/addmm), SDPA on its math backend so QK^T and AV
    are counted as bmm."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), counter:
        module(x)
    return counter.get_total_flops() // 2


@pytest.mark.parametrize("H,W,M,C", [(14, 14, 49, 64), (8, 8, 16, 96), (7, 7, 49, 64), (4, 6, 6, 32)])
def test_attention_macs_equal_4lc2_plus_2mlc(H, W, M, C):
    L = H * W
    lsa = LocalSelfAttention(C, M)
    x = torch.randn(1, C, H, W)
    assert _counted_macs(lsa, x) == 4 * L * C * C + 2 * M * L * C
    assert mf.attention_macs(L, C, M) == 4 * L * C * C + 2 * M * L * C
    g = GlobalSelfAttention(C)
    assert _counted_macs(g, x) == 4 * L * C * C + 2 * L * L * C == mf.attention_macs(L, C)


# ------------------------------------------------------------------------------------------ configurations
@pytest.mark.parametrize("variant,target", [("s12", 16.6), ("s18", 22.5), ("s24", 30.6), ("swins", 51.3)])
def test_imagenet_parameter_counts(variant, target):
    with torch.device("meta"):
        model = build_metaformer(variant, in_channels=3, num_classes=1000)
    n = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(n - target) / target < 0.01, n


def test_s12_shapes_at_224_and_stage_layout():
    model = build_metaformer("s12")
    mixers = [type(b.mixer).__name__ for s in model.stages for b in s]
    assert mixers == ["DWConvMixer"] * 4 + ["LocalSelfAttention"] * 8
    swaps = [b.mixer.swap for s in model.stages[2:] for b in s]
    assert swaps == [False, True] * 3 + [False, True]
    norms = [type(b.norm1).__name__ for s in model.stages for b in s]
    assert norms == ["BatchNorm2d"] * 4 + ["ChannelLayerNorm"] * 8
    with torch.no_grad():
        feats = []
        h = model.stem(torch.randn(1, 3, 224, 224))
        for i, st in enumerate(model.stages):
            if i:
                h = model.downsamples[i - 1](h)
            h = st(h)
            feats.append(tuple(h.shape[1:]))
    assert feats == [(64, 56, 56), (128, 28, 28), (320, 14, 14), (512, 7, 7)]


def test_small_variant_and_bad_configs():
    m = build_metaformer("small", in_channels=1, num_classes=10, mixers="CCCA")
    assert m(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert mf.stage3_size(28, m.cfg) == 7 and mf.stage3_size(64, m.cfg) == 16
    assert not any(isinstance(x, LocalSelfAttention) for x in m.modules())
    with pytest.raises(ValueError, match="mixers='CCX'"):
        build_metaformer("small", mixers="CCX")
    with pytest.raises(ValueError, match="variant='s99'"):
        build_metaformer("s99")
    with pytest.raises(ValueError, match="local_len M=0"):
        build_metaformer("small", local_len=0)
    with pytest.raises(ValueError, match="48 channels"):
        build_metaformer("small", channels=(16, 32, 48, 96), mixers="CCLL")
