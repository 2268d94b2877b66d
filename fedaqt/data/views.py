"""Augmented views for self-supervised episodes (spec §7.1, Algorithm 6): SimCLR-style random views and the b-way
SSL task built from them (class = base image), with large rotation as task augmentation (§7.2).

kornia/torchvision are not installed here: the views use ``F.affine_grid`` / ``F.grid_sample`` and tensor
arithmetic.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def simclr_views(x: torch.Tensor, m: int, gen: torch.Generator) -> torch.Tensor:
    """``m`` random views of each image of ``x [b, C, H, W]`` float in [0, 1]: ``[b, m, C, H, W]``.
    Random resized crop (area U(0.2, 1), log-uniform aspect 3/4..4/3, bilinear), flip p 0.5, brightness and
    contrast jitter (factors U(0.6, 1.4)) with p 0.8."""
    b, c, h, w = x.shape
    n = b * m
    xr = x.unsqueeze(1).expand(b, m, c, h, w).reshape(n, c, h, w)
    area = torch.empty(n).uniform_(0.2, 1.0, generator=gen)
    logr = torch.empty(n).uniform_(math.log(3 / 4), math.log(4 / 3), generator=gen)
    sx = torch.sqrt(area * torch.exp(logr)).clamp(max=1.0)
    sy = torch.sqrt(area / torch.exp(logr)).clamp(max=1.0)
    tx = (torch.rand(n, generator=gen) * 2 - 1) * (1 - sx)
    ty = (torch.rand(n, generator=gen) * 2 - 1) * (1 - sy)
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx * flip, tx, sy, ty
    grid = F.affine_grid(theta, [n, c, h, w], align_corners=False)
    v = F.grid_sample(xr, grid, align_corners=False)
    jit = torch.rand(n, generator=gen) < 0.8
    bright = torch.where(jit, torch.empty(n).uniform_(0.6, 1.4, generator=gen), torch.ones(n)).view(n, 1, 1, 1)
    contrast = torch.where(jit, torch.empty(n).uniform_(0.6, 1.4, generator=gen), torch.ones(n)).view(n, 1, 1, 1)
    mean = v.mean(dim=(1, 2, 3), keepdim=True)
    v = ((v - mean) * contrast + mean) * bright
    return v.clamp(0, 1).reshape(b, m, c, h, w)


def ssl_episode(x: torch.Tensor, m_s: int, m_q: int, gen: torch.Generator, task_rotation: bool = False):
    """Algorithm 6: ``(x_s [b*m_s, ...], y_s, x_q [b*m_q, ...], y_q, angles [b])``, class-major, label = base-image
    index; with ``task_rotation`` every view of base image i is turned by ``rot90`` ``angles[i]`` times."""
    b = x.shape[0]
    v = simclr_views(x, m_s + m_q, gen)
    angles = torch.randint(0, 4, (b,), generator=gen) if task_rotation else torch.zeros(b, dtype=torch.int64)
    if task_rotation:
        v = torch.stack([torch.rot90(v[i], int(angles[i]), dims=(-2, -1)) for i in range(b)])
    xs = v[:, :m_s].reshape(b * m_s, *x.shape[1:])
    xq = v[:, m_s:].reshape(b * m_q, *x.shape[1:])
    return xs, torch.arange(b).repeat_interleave(m_s), xq, torch.arange(b).repeat_interleave(m_q), angles
