"""MetaFormer with mobile-friendly local self-attention (LSA) (spec §4, dissertation chapter 4).

Token mixers (all take and return ``[B, C, H, W]``; the attention projections are ``nn.Linear`` so the quantized
client path, :func:`fedaqt.quant.convert.convert_to_quantized`, turns them into ``QuantLinear``):

* :class:`LocalSelfAttention` (``L``): flatten row-major (no swap, ``(h, w) -> h*W + w``) or column-major (swap,
  ``(h, w) -> w*H + h``), zero-pad to a multiple of the local length ``M`` (padded keys masked with -inf), cut into
  chunks of ``M`` tokens with one ``reshape``, multi-head attention per chunk with a 1-D relative position bias
  table ``[2M-1, heads]`` (entry ``(i, j)`` at ``i - j + M - 1``, zeros at init), drop the padding and invert the
  permute (§4.1-4.2). ``M >= L`` is global attention over the ``L`` tokens.
* :class:`GlobalSelfAttention` (``A``): multi-head self-attention over all ``H*W`` tokens (no bias table).
* :class:`WindowAttention` (``W``, for the latency bench): non-overlapping ``w x w`` windows by reshape/permute,
  no shift, zero padding + key mask to a multiple of ``w`` (Swin without shift, the "reshape trick").
* :class:`DWConvMixer` (``C``): 3x3 depthwise conv, stride 1.

Backbone (§4.3, Table 4.10): a stem of two 3x3 convs (each to ``C1``, BN + ReLU), four stages with a 3x3 stride-2
conv + BN between them, MetaBlocks ``x + ls1 * mixer(norm(x))``, ``x + ls2 * mlp(norm(x))`` (layer scale init
1e-5, MLP ratio 4 as two 1x1 convs with GELU), BatchNorm for conv-mixer stages and channel LayerNorm for attention
stages (the "BN-LN" hybrid), then channel LayerNorm, global average pooling and a ``Linear`` head. Inside a stage
block ``n`` uses ``swap = (n % 2 == 1)`` when swap is on. Head dimension 32 ([CHOICE] of §4.1).

Variants (:data:`VARIANTS`): ``s12``, ``s18``, ``s24``, ``swins`` at the ImageNet setting (stem stride 4, stages at
H/4..H/32, 1000 classes: 16.53/22.45/30.58/51.25 M parameters) and ``small`` for 28x28-64x64 inputs (channels
16/32/64/96, blocks 1/1/2/2, stem stride 2, no downsampling before stage 3: a 28x28 image has a 7x7 stage 3).

Complexity: :func:`attention_macs` (eq. 4.4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MIXERS",
    "VARIANTS",
    "MetaFormerConfig",
    "MetaFormer",
    "LocalSelfAttention",
    "GlobalSelfAttention",
    "WindowAttention",
    "DWConvMixer",
    "attention_macs",
    "build_metaformer",
    "set_local_length",
    "partition_tokens",
    "unpartition_tokens",
]

#: token mixer codes: C = DW-conv, A = global MHSA, L = LSA, W = window attention (bench)
MIXERS = ("C", "A", "L", "W")
HEAD_DIM = 32


# ============================================================================ partition helpers (§4.2)
def partition_tokens(x: torch.Tensor, local_len: int, swap: bool) -> tuple[torch.Tensor, int, int]:
    """``[B, C, H, W]`` -> chunks ``[B * L'/m, m, C]`` (spec §4.2 steps 1-3).

    ``m = min(local_len, L)`` with ``L = H*W``; tokens in row-major order (``swap=False``, ``h*W + w``) or
    column-major order (``swap=True``, ``w*H + h``); zero padding at the end of each image's sequence to
    ``L' = ceil(L/m)*m`` when ``L % m != 0``.

    Returns:
        (chunks, m, pad): ``pad = L' - L`` zero tokens were appended per image.

    Raises:
        ValueError: ``x`` is not 4-D or ``local_len < 1``.
    """
    if x.dim() != 4:
        raise ValueError(f"expected x of shape [B, C, H, W], got {list(x.shape)}")
    if local_len < 1:
        raise ValueError(f"local length M={local_len} must be >= 1")
    B, C, H, W = x.shape
    L = H * W
    m = min(int(local_len), L)
    t = x.permute(0, 3, 2, 1) if swap else x.permute(0, 2, 3, 1)  # [B, W, H, C] or [B, H, W, C]
    pad = (-L) % m
    if pad:
        t = F.pad(t.reshape(B, L, C), (0, 0, 0, pad))
    return t.reshape(-1, m, C), m, pad


def unpartition_tokens(chunks: torch.Tensor, shape: Sequence[int], pad: int, swap: bool) -> torch.Tensor:
    """Inverse of :func:`partition_tokens`: chunks ``[B * L'/m, m, C]`` -> ``[B, C, H, W]`` (padding dropped)."""
    B, C, H, W = shape
    t = chunks.reshape(B, H * W + pad, C)
    if pad:
        t = t[:, : H * W]
    if swap:
        return t.reshape(B, W, H, C).permute(0, 3, 2, 1)
    return t.reshape(B, H, W, C).permute(0, 3, 1, 2)


# ============================================================================ attention core
class _Attention(nn.Module):
    """Multi-head self-attention over ``[N, T, C]`` sequences with ``Linear`` projections (``qkv``: C -> 3C,
    ``proj``: C -> C), an optional additive bias ``[heads, T, T]`` and an additive key mask ``[N, 1, 1, T]``.

    Raises:
        ValueError: ``dim`` not a positive multiple of ``head_dim``.
    """

    def __init__(self, dim: int, head_dim: int = HEAD_DIM) -> None:
        super().__init__()
        if dim < 1 or head_dim < 1 or dim % head_dim:
            raise ValueError(f"attention dim={dim} must be a positive multiple of head_dim={head_dim}")
        self.dim = int(dim)
        self.heads = dim // head_dim
        self.head_dim = int(head_dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def attend(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None,
               key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        N, T, C = x.shape
        qkv = self.qkv(x).reshape(N, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # [N, heads, T, d]
        mask = None
        if bias is not None:
            mask = bias.unsqueeze(0).to(q.dtype)  # [1, heads, T, T]
        if key_mask is not None:
            mask = key_mask if mask is None else mask + key_mask
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(N, T, C))


class LocalSelfAttention(_Attention):
    """LSA token mixer (spec §4.1-4.2): ``[B, C, H, W]`` -> ``[B, C, H, W]``.

    Args:
        dim: channels ``C`` (a multiple of ``head_dim``); local_len: ``M`` (default 49; ``M >= H*W`` is global
            attention); swap: column-major flatten (the "dimension swap"); bias: learn the 1-D relative position
            bias table ``rel_bias [2M-1, heads]`` (zeros at init); head_dim: 32.

    The local length used at run time is :attr:`local_len` (change it with :func:`set_local_length` to test at
    another ``M``); the bias table keeps its trained size ``2*M_train - 1`` and offsets beyond ``±(M_train-1)``
    use the outermost entry (clamped), so test ``M <= M_train`` reads the trained entries only.

    Raises:
        ValueError: bad ``dim``/``head_dim``/``local_len``.
    """

    def __init__(self, dim: int, local_len: int = 49, swap: bool = False, bias: bool = True,
                 head_dim: int = HEAD_DIM) -> None:
        super().__init__(dim, head_dim)
        if int(local_len) < 1:
            raise ValueError(f"local length M={local_len} must be >= 1")
        self.local_len = int(local_len)
        self.table_len = int(local_len)
        self.swap = bool(swap)
        if bias:
            self.rel_bias = nn.Parameter(torch.zeros(2 * self.table_len - 1, self.heads))
        else:
            self.register_parameter("rel_bias", None)

    def bias_matrix(self, m: int) -> Optional[torch.Tensor]:
        """The additive bias ``[heads, m, m]``: entry ``(h, i, j) = rel_bias[i - j + M - 1, h]`` (None without a
        table)."""
        if self.rel_bias is None:
            return None
        idx = torch.arange(m, device=self.rel_bias.device)
        rel = (idx[:, None] - idx[None, :]).clamp(-(self.table_len - 1), self.table_len - 1) + self.table_len - 1
        return self.rel_bias[rel].permute(2, 0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        chunks, m, pad = partition_tokens(x, self.local_len, self.swap)
        key_mask = None
        if pad:
            real = torch.ones(B, H * W + pad, dtype=torch.bool, device=x.device)
            real[:, H * W :] = False
            key_mask = torch.zeros(real.shape, dtype=x.dtype, device=x.device).masked_fill_(~real, float("-inf"))
            key_mask = key_mask.reshape(-1, 1, 1, m)
        y = self.attend(chunks, self.bias_matrix(m), key_mask)
        return unpartition_tokens(y, (B, C, H, W), pad, self.swap)


class GlobalSelfAttention(_Attention):
    """Global MHSA token mixer (``A``): attention over all ``H*W`` tokens, ``[B, C, H, W]`` -> same shape."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        y = self.attend(x.flatten(2).transpose(1, 2))
        return y.transpose(1, 2).reshape(B, C, H, W)


class WindowAttention(_Attention):
    """Window attention without shift (``W``; Swin-style non-overlapping ``window x window`` windows by
    reshape/permute), zero padding + key mask to multiples of ``window``; ``[B, C, H, W]`` -> same shape."""

    def __init__(self, dim: int, window: int = 7, head_dim: int = HEAD_DIM) -> None:
        super().__init__(dim, head_dim)
        if window < 1:
            raise ValueError(f"window={window} must be >= 1")
        self.window = int(window)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        w = self.window
        ph, pw = (-H) % w, (-W) % w
        t = x.permute(0, 2, 3, 1)
        if ph or pw:
            t = F.pad(t, (0, 0, 0, pw, 0, ph))
        Hp, Wp = H + ph, W + pw
        t = t.reshape(B, Hp // w, w, Wp // w, w, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, C)
        key_mask = None
        if ph or pw:
            real = torch.zeros(Hp, Wp, dtype=torch.bool, device=x.device)
            real[:H, :W] = True
            real = real.reshape(Hp // w, w, Wp // w, w).permute(0, 2, 1, 3).reshape(-1, w * w)
            key_mask = torch.zeros(real.shape, dtype=x.dtype, device=x.device).masked_fill_(~real, float("-inf"))
            key_mask = key_mask.repeat(B, 1).reshape(-1, 1, 1, w * w)
        y = self.attend(t, None, key_mask)
        y = y.reshape(B, Hp // w, Wp // w, w, w, C).permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, C)
        return y[:, :H, :W].permute(0, 3, 1, 2)


class DWConvMixer(nn.Module):
    """3x3 depthwise conv token mixer, stride 1 (``C``); ``[B, C, H, W]`` -> same shape."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def attention_macs(L: int, C: int, M: Optional[int] = None) -> int:
    """Multiply-accumulates of one self-attention token mixer on ``L`` tokens of ``C`` channels (eq. 4.4).

    ``4*L*C^2`` for the q/k/v/output projections plus ``2*m*L*C`` for ``QK^T`` and ``AV`` with ``m = min(M, L)``
    (``M=None``: global, ``m = L``). Excludes softmax, bias, and padded tokens.
    """
    m = L if M is None else min(int(M), int(L))
    return 4 * L * C * C + 2 * m * L * C


# ============================================================================ backbone
class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channel axis of ``[B, C, H, W]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class MetaBlock(nn.Module):
    """``x + ls1 * mixer(norm1(x))`` then ``x + ls2 * mlp(norm2(x))`` (spec §4.3; layer scale as in MetaFormer)."""

    def __init__(self, dim: int, mixer: str, local_len: int, swap: bool, bias: bool, mlp_ratio: int = 4,
                 layer_scale: float = 1e-5, window: int = 7) -> None:
        super().__init__()
        if mixer == "C":
            self.norm1, self.norm2 = nn.BatchNorm2d(dim), nn.BatchNorm2d(dim)
            self.mixer: nn.Module = DWConvMixer(dim)
        else:
            self.norm1, self.norm2 = ChannelLayerNorm(dim), ChannelLayerNorm(dim)
            if mixer == "L":
                self.mixer = LocalSelfAttention(dim, local_len, swap=swap, bias=bias)
            elif mixer == "A":
                self.mixer = GlobalSelfAttention(dim)
            elif mixer == "W":
                self.mixer = WindowAttention(dim, window)
            else:
                raise ValueError(f"token mixer {mixer!r} is not one of {', '.join(MIXERS)}")
        hidden = dim * mlp_ratio
        self.mlp = nn.Sequential(nn.Conv2d(dim, hidden, 1), nn.GELU(), nn.Conv2d(hidden, dim, 1))
        self.ls1 = nn.Parameter(torch.full((dim, 1, 1), float(layer_scale)))
        self.ls2 = nn.Parameter(torch.full((dim, 1, 1), float(layer_scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1 * self.mixer(self.norm1(x))
        return x + self.ls2 * self.mlp(self.norm2(x))


@dataclass(frozen=True)
class MetaFormerConfig:
    """Architecture of one MetaFormer (spec §4.3, Table 4.10).

    Attributes:
        channels: C1..C4; depths: blocks per stage; mixers: one code per stage (``MIXERS``), e.g. ``"CCLL"``;
        local_len: LSA ``M``; swap: alternate the flatten order inside a stage; bias: LSA relative bias table;
        stem_strides: strides of the two stem convs; downsample: a stride-2 conv before stage i (i >= 1);
        mlp_ratio: 4; layer_scale: initial layer-scale value; window: window size of ``W`` mixers.
    """

    channels: tuple[int, int, int, int] = (64, 128, 320, 512)
    depths: tuple[int, int, int, int] = (2, 2, 6, 2)
    mixers: str = "CCLL"
    local_len: int = 49
    swap: bool = True
    bias: bool = True
    stem_strides: tuple[int, int] = (2, 2)
    downsample: tuple[bool, bool, bool] = (True, True, True)
    mlp_ratio: int = 4
    layer_scale: float = 1e-5
    window: int = 7

    def check(self) -> None:
        """Raises ValueError naming the bad field."""
        if len(self.channels) != 4 or len(self.depths) != 4:
            raise ValueError(f"channels={self.channels} and depths={self.depths} must have 4 entries")
        if len(self.mixers) != 4 or any(c not in MIXERS for c in self.mixers):
            raise ValueError(f"mixers={self.mixers!r} must be 4 letters from {''.join(MIXERS)} (one per stage)")
        for c, mx in zip(self.channels, self.mixers):
            if mx != "C" and c % HEAD_DIM:
                raise ValueError(f"stage with mixer {mx!r} has {c} channels; attention needs a multiple of {HEAD_DIM}")
        if self.local_len < 1:
            raise ValueError(f"local_len M={self.local_len} must be >= 1")
        if any(d < 1 for d in self.depths):
            raise ValueError(f"depths={self.depths} must be >= 1")


#: Table 4.10 (ImageNet setting) plus the small variant for 28x28-64x64 inputs
VARIANTS: dict[str, MetaFormerConfig] = {
    "s12": MetaFormerConfig((64, 128, 320, 512), (2, 2, 6, 2)),
    "s18": MetaFormerConfig((64, 128, 320, 512), (3, 4, 8, 3)),
    "s24": MetaFormerConfig((64, 128, 320, 512), (4, 4, 12, 4)),
    "swins": MetaFormerConfig((96, 192, 384, 768), (2, 2, 18, 2)),
    "small": MetaFormerConfig((16, 32, 64, 96), (1, 1, 2, 2), local_len=7, stem_strides=(2, 1),
                              downsample=(True, False, True)),
}


class MetaFormer(nn.Module):
    """MetaFormer backbone + classifier (spec §4.3). Input ``[B, in_channels, H, W]`` float -> logits
    ``[B, num_classes]``. ``stem`` / ``stages`` / ``downsamples`` / ``norm`` / ``head`` are the module names."""

    def __init__(self, cfg: MetaFormerConfig, in_channels: int = 3, num_classes: int = 1000) -> None:
        super().__init__()
        cfg.check()
        self.cfg = cfg
        c1 = cfg.channels[0]
        s1, s2 = cfg.stem_strides
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, stride=s1, padding=1), nn.BatchNorm2d(c1), nn.ReLU(),
            nn.Conv2d(c1, c1, 3, stride=s2, padding=1), nn.BatchNorm2d(c1), nn.ReLU(),
        )
        self.downsamples = nn.ModuleList()
        self.stages = nn.ModuleList()
        for i, (dim, depth, mx) in enumerate(zip(cfg.channels, cfg.depths, cfg.mixers)):
            if i > 0:
                prev = cfg.channels[i - 1]
                stride = 2 if cfg.downsample[i - 1] else 1
                self.downsamples.append(nn.Sequential(nn.Conv2d(prev, dim, 3, stride=stride, padding=1),
                                                      nn.BatchNorm2d(dim)))
            self.stages.append(nn.Sequential(*[
                MetaBlock(dim, mx, cfg.local_len, swap=cfg.swap and n % 2 == 1, bias=cfg.bias,
                          mlp_ratio=cfg.mlp_ratio, layer_scale=cfg.layer_scale, window=cfg.window)
                for n in range(depth)
            ]))
        self.norm = ChannelLayerNorm(cfg.channels[-1])
        self.head = nn.Linear(cfg.channels[-1], num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for i, stage in enumerate(self.stages):
            if i > 0:
                x = self.downsamples[i - 1](x)
            x = stage(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.forward_features(x)).mean(dim=(2, 3)))


def build_metaformer(variant: str = "small", in_channels: int = 3, num_classes: int = 1000,
                     **overrides) -> MetaFormer:
    """A :class:`MetaFormer` of ``variant`` (:data:`VARIANTS`) with config fields replaced by ``overrides``
    (e.g. ``mixers="CCCA"``, ``local_len=14``, ``swap=False``, ``bias=False``).

    Raises:
        ValueError: unknown variant or bad config value (named).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} is not one of {', '.join(VARIANTS)}")
    bad = set(overrides) - set(MetaFormerConfig.__dataclass_fields__)
    if bad:
        raise ValueError(f"unknown MetaFormer config field(s) {sorted(bad)}")
    return MetaFormer(replace(VARIANTS[variant], **overrides), in_channels, num_classes)


def set_local_length(model: nn.Module, local_len: int) -> None:
    """Set the run-time local length ``M`` of every LSA mixer in ``model`` (test at another M, Table 4.7)."""
    if local_len < 1:
        raise ValueError(f"local length M={local_len} must be >= 1")
    for mod in model.modules():
        if isinstance(mod, LocalSelfAttention):
            mod.local_len = int(local_len)


def stage3_size(image_size: int, cfg: MetaFormerConfig) -> int:
    """Side of stage 3's feature map for a square ``image_size`` input (3x3 convs with padding 1)."""
    s = image_size
    for st in cfg.stem_strides:
        s = math.floor((s + 2 - 3) / st) + 1
    for d in cfg.downsample[:2]:
        if d:
            s = math.floor((s + 2 - 3) / 2) + 1
    return s
