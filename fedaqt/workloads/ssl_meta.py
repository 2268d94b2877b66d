"""Meta-learning as self-supervised learning (spec §7, dissertation chapter 7) as a workload: ``ssl-meta``.

WIP (issue 13): not registered as an entry point yet, no tests yet.

Clients hold unlabeled shards of the training images (a seed permutation of the image indices cut into
``num_clients`` chunks; labels are never read on the client side). One training batch is one b-way task
(Algorithm 6): ``--batch-size`` = b base images, each drawn ``views_support + views_query`` times through SimCLR-style
augmentations (random resized crop, horizontal flip, brightness/contrast jitter; plain torch ops, kornia is not
installed); class = base image. ``-o method``: ``protonet`` (query CE against support prototypes), ``r2d2`` (ridge
head), ``simclr`` (NT-Xent baseline, temperature ``tau``, views 1+1). ``-o task_rotation=true``: one angle in
{0, 90, 180, 270} per base image for all its views (§7.2). ``-o rot_loss_weight``: auxiliary 4-way rotation loss on
all 4 rotations of ``rot_fraction`` of the base images (§7.3).

Evaluation (server, labeled held-out data): ``linear_acc``: the backbone frozen (eval-mode BatchNorm), the
projection dropped, a multinomial logistic regression fitted by L-BFGS on ``linear_train`` labeled training images'
standardized features, top-1 on the test split.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from fedaqt.config import RunConfig
from fedaqt.data.images import load_fashion_mnist
from fedaqt.models.fewshot import build_backbone, protonet_logits, r2d2_logits
from fedaqt.options import BaseOptions
from fedaqt.workloads.base import Workload


class SSLMetaOptions(BaseOptions):
    method: Literal["protonet", "r2d2", "simclr"] = Field("protonet", description="protonet | r2d2 | simclr")
    width: int = Field(32, ge=1, le=256, description="Conv-4 width")
    proj_dim: int = Field(128, ge=2, le=2048, description="projection output dimension")
    views_support: int = Field(1, ge=1, le=16, description="m_s support views per base image")
    views_query: int = Field(1, ge=1, le=16, description="m_q query views per base image")
    task_rotation: bool = Field(False, description="one random 90-degree multiple per base image, all its views")
    rot_loss_weight: float = Field(0.0, ge=0, allow_inf_nan=False, description="auxiliary rotation loss weight")
    rot_fraction: float = Field(0.25, gt=0, le=1, allow_inf_nan=False, description="base images in the rot loss")
    normalize: bool = Field(False, description="L2-normalize embeddings, logits / tau (ProtoNet)")
    tau: float = Field(0.5, gt=0, allow_inf_nan=False, description="temperature (simclr; protonet with normalize)")
    r2d2_lambda: float = Field(50.0, gt=0, allow_inf_nan=False, description="R2-D2 ridge lambda")
    linear_train: int = Field(5000, ge=10, description="labeled training images for linear evaluation")
    linear_test: int = Field(10000, ge=10, description="test images for linear evaluation")
    linear_iters: int = Field(100, ge=1, le=10000, description="L-BFGS iterations of linear evaluation")


class SSLNet(nn.Module):
    """Backbone h, projection g (``D -> D -> proj_dim``, ReLU), rotation head (``proj_dim -> 4``)."""

    def __init__(self, backbone: nn.Module, feat_dim: int, proj_dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = nn.Sequential(nn.Linear(feat_dim, feat_dim), nn.ReLU(), nn.Linear(feat_dim, proj_dim))
        self.rot_head = nn.Linear(proj_dim, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))


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


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    """SimCLR's NT-Xent over 2b views (Chen et al. 2020, eq. 1): cosine similarity / tau, self excluded."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    b = z1.shape[0]
    sim = z @ z.t() / tau
    sim = sim.masked_fill(torch.eye(2 * b, dtype=torch.bool), float("-inf"))
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)])
    return F.cross_entropy(sim, target)


class SSLMetaWorkload(Workload):
    name = "ssl-meta"
    description = "meta-learning as self-supervised learning (spec §7): ProtoNet/R2-D2 on augmented views, SimCLR"
    Options = SSLMetaOptions
    eval_columns = ("linear_acc",)
    default_eval_every = 5

    def __init__(self, config: RunConfig) -> None:
        super().__init__(config)
        self._train = None
        self._test = None

    def data(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if split == "train":
            if self._train is None:
                self._train = load_fashion_mnist(split="train", normalize=False)
            return self._train
        if self._test is None:
            self._test = load_fashion_mnist(split="test", normalize=False)
        return self._test

    def prepare(self) -> None:
        self.data("train"), self.data("test")

    def shards(self) -> list[np.ndarray]:
        n = int(self.data("train")[0].shape[0])
        perm = np.random.default_rng([self.config.seed, 0x55]).permutation(n)
        return np.array_split(perm, self.config.num_clients)

    def num_partitions(self) -> int:
        return self.config.num_clients

    def build_model(self) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            bb = build_backbone("conv4", 1, self.options.width)
            with torch.no_grad():
                dim = int(bb.eval()(torch.zeros(2, 1, 28, 28)).shape[1])
            bb.train()
            return SSLNet(bb, dim, self.options.proj_dim)

    def quantize_filter(self, name: str, module: nn.Module) -> bool:
        return isinstance(module, (nn.Conv2d, nn.Linear)) and name.startswith("backbone.")

    def _images(self, idx: np.ndarray) -> torch.Tensor:
        x = self.data("train")[0][torch.from_numpy(idx)]
        if x.ndim == 3:
            x = x.unsqueeze(1)
        return x.to(torch.float32) / 255.0

    def client_batches(self, client_id: int, round_num: int, num_batches: int, batch_size: int) -> list[Any]:
        o = self.options
        shard = self.shards()[client_id]
        out = []
        for i in range(num_batches):
            rng = np.random.default_rng([self.config.seed, client_id, round_num, i, 0x5A])
            idx = rng.choice(shard, size=min(batch_size, len(shard)), replace=False)
            gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
            m_s, m_q = (1, 1) if o.method == "simclr" else (o.views_support, o.views_query)
            xs, ys, xq, yq, _ = ssl_episode(self._images(idx), m_s, m_q, gen, o.task_rotation)
            out.append((xs, ys, xq, yq))
        return out

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, int]:
        o = self.options
        xs, ys, xq, yq = batch
        b = int(ys.max()) + 1
        z = model(torch.cat([xs, xq]))
        zs, zq = z[: len(ys)], z[len(ys):]
        if o.method == "simclr":
            loss = nt_xent(zs, zq, o.tau)
        elif o.method == "protonet":
            if o.normalize:
                zs, zq = F.normalize(zs, dim=1), F.normalize(zq, dim=1)
                protos = torch.zeros(b, zs.shape[1]).index_add_(0, ys, zs) / torch.bincount(ys, minlength=b).unsqueeze(1)
                logits = -(zq.unsqueeze(1) - protos.unsqueeze(0)).pow(2).sum(-1) / o.tau
            else:
                logits = protonet_logits(zs, ys, zq, b, torch.ones(1), False)
            loss = F.cross_entropy(logits, yq)
        else:
            loss = F.cross_entropy(r2d2_logits(zs, ys, zq, b, o.r2d2_lambda, torch.ones(1), torch.zeros(1)), yq)
        if o.rot_loss_weight:
            k = max(1, int(round(o.rot_fraction * len(xs))))
            x = xs[:k]
            xr = torch.cat([torch.rot90(x, r, dims=(-2, -1)) for r in range(4)])
            yr = torch.arange(4).repeat_interleave(k)
            loss = loss + o.rot_loss_weight * F.cross_entropy(model.rot_head(model(xr)), yr)
        return loss, int(b)

    @torch.no_grad()
    def features(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        was = model.training
        model.eval()
        try:
            if x.ndim == 3:
                x = x.unsqueeze(1)
            return torch.cat([model.backbone(x[i:i + 1000].to(torch.float32) / 255.0) for i in range(0, len(x), 1000)])
        finally:
            model.train(was)

    def evaluate(self, model: nn.Module, round_num: int) -> dict[str, float]:
        o = self.options
        xtr, ytr = self.data("train")
        xte, yte = self.data("test")
        rng = np.random.default_rng([self.config.seed, 0x1E])
        itr = torch.from_numpy(rng.choice(len(ytr), size=min(o.linear_train, len(ytr)), replace=False))
        ite = torch.arange(min(o.linear_test, len(yte)))
        ftr, fte = self.features(model, xtr[itr]).double(), self.features(model, xte[ite]).double()
        mu, sd = ftr.mean(0), ftr.std(0).clamp_min(1e-6)
        ftr, fte = (ftr - mu) / sd, (fte - mu) / sd
        n_cls = int(ytr.max()) + 1
        lin = nn.Linear(ftr.shape[1], n_cls).double()
        opt = torch.optim.LBFGS(lin.parameters(), max_iter=o.linear_iters, line_search_fn="strong_wolfe")
        y = ytr[itr].long()

        def closure():
            opt.zero_grad()
            with torch.enable_grad():
                loss = F.cross_entropy(lin(ftr), y) + 1e-4 * lin.weight.pow(2).sum()
                loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        acc = float((lin(fte).argmax(1) == yte[ite].long()).double().mean())
        return {"linear_acc": acc}
