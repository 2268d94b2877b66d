"""WrapNet networks: :class:`WrapVGG7` and :class:`WrapResNet20` for 28x28x1 and 32x32x3 inputs, first and last
layers full precision (spec §3.1), width configurable; :func:`build_wrapnet` by name."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .layers import WrapConv2d, WrapLinear


# ============================================================================ networks
def _ch(base: int, width: float) -> int:
    return max(1, int(round(base * width)))


class WrapVGG7(nn.Module):
    """VGG-7 (2x(128-C3) MP2 2x(256-C3) MP2 2x(512-C3) MP2 1024-FC 10-FC; TWN/WrapNet CIFAR net) with WrapNet layers.

    Channels are multiplied by ``width`` (default 0.125 -> 16-16-32-32-64-64, FC 128, fast on CPU). ``conv1`` and
    the classifier ``fc2`` are full precision (spec §3.1); ``conv2..conv6`` and ``fc1`` are WrapNet layers, each
    followed by BatchNorm and ReLU (ReLU after BN, Table 2.9).

    Input float ``[B, in_channels, image_size, image_size]`` (28x28x1 Fashion-MNIST or 32x32x3 CIFAR-10);
    output logits ``[B, num_classes]``.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28, width: float = 0.125,
                 weight_quant: str = "binary", b: int = 8, k: float = 2.0, act_bits: int = 8,
                 persistent_step_sizes: bool = True) -> None:
        super().__init__()
        c = [_ch(v, width) for v in (128, 128, 256, 256, 512, 512)]
        fc = _ch(1024, width)
        kw = dict(weight_quant=weight_quant, b=b, k=k, act_bits=act_bits, persistent_step_sizes=persistent_step_sizes)
        self.conv1 = nn.Conv2d(in_channels, c[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c[0])
        self.conv2 = WrapConv2d(c[0], c[1], **kw)
        self.bn2 = nn.BatchNorm2d(c[1])
        self.conv3 = WrapConv2d(c[1], c[2], **kw)
        self.bn3 = nn.BatchNorm2d(c[2])
        self.conv4 = WrapConv2d(c[2], c[3], **kw)
        self.bn4 = nn.BatchNorm2d(c[3])
        self.conv5 = WrapConv2d(c[3], c[4], **kw)
        self.bn5 = nn.BatchNorm2d(c[4])
        self.conv6 = WrapConv2d(c[4], c[5], **kw)
        self.bn6 = nn.BatchNorm2d(c[5])
        side = image_size // 8
        self.fc1 = WrapLinear(c[5] * side * side, fc, **kw)
        self.bn7 = nn.BatchNorm1d(fc)
        self.fc2 = nn.Linear(fc, num_classes)
        self.checkpointing = False  # accepted for the workload interface; the nets are small, no checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.relu(self.bn3(self.conv3(x)))
        x = F.max_pool2d(F.relu(self.bn4(self.conv4(x))), 2)
        x = F.relu(self.bn5(self.conv5(x)))
        x = F.max_pool2d(F.relu(self.bn6(self.conv6(x))), 2)
        x = F.relu(self.bn7(self.fc1(x.flatten(1))))
        return self.fc2(x)


class _BasicBlock(nn.Module):
    """ResNet basic block with WrapNet convs and an option-A (subsample + zero-pad, parameter-free) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int, kw: dict) -> None:
        super().__init__()
        self.conv1 = WrapConv2d(cin, cout, stride=stride, **kw)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = WrapConv2d(cout, cout, **kw)
        self.bn2 = nn.BatchNorm2d(cout)
        self.stride, self.pad = stride, cout - cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        sc = x[:, :, :: self.stride, :: self.stride] if self.stride > 1 else x
        if self.pad:
            sc = F.pad(sc, (0, 0, 0, 0, 0, self.pad))
        return F.relu(out + sc)


class WrapResNet20(nn.Module):
    """ResNet-20 (He et al. 2016 CIFAR variant: 3 stages x 3 basic blocks, 16/32/64 channels x ``width``) with
    WrapNet convolutions in every block; stem conv and classifier full precision (spec §3.1).

    Input ``[B, in_channels, H, W]`` (28x28x1 or 32x32x3), output logits ``[B, num_classes]``.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28, width: float = 1.0,
                 weight_quant: str = "binary", b: int = 8, k: float = 2.0, act_bits: int = 8,
                 persistent_step_sizes: bool = True, blocks_per_stage: int = 3) -> None:
        super().__init__()
        del image_size  # global average pooling makes the net size-agnostic
        kw = dict(weight_quant=weight_quant, b=b, k=k, act_bits=act_bits, persistent_step_sizes=persistent_step_sizes)
        widths = [_ch(v, width) for v in (16, 32, 64)]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages, cin = [], widths[0]
        for i, cout in enumerate(widths):
            blocks = []
            for j in range(blocks_per_stage):
                blocks.append(_BasicBlock(cin, cout, 2 if (i > 0 and j == 0) else 1, kw))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(cin, num_classes)
        self.checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def build_wrapnet(arch: str = "vgg7", **kwargs: Any) -> nn.Module:
    """``arch`` in {"vgg7", "resnet20"}; keyword arguments go to :class:`WrapVGG7` / :class:`WrapResNet20`."""
    if arch == "vgg7":
        return WrapVGG7(**kwargs)
    if arch == "resnet20":
        return WrapResNet20(**kwargs)
    raise ValueError(f"arch={arch!r} is not allowed; choose vgg7 or resnet20")
