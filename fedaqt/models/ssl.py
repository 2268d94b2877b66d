"""Self-supervised meta-learning model pieces (spec §7): the backbone + projection + rotation-head network, the
b-way SSL task logits (ProtoNet / R2-D2), SimCLR's NT-Xent baseline and linear evaluation of frozen features."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedaqt.models.fewshot import prototypes, r2d2_logits


class SSLNet(nn.Module):
    """Backbone h, projection g (``D -> D -> proj_dim``, ReLU), rotation head (``proj_dim -> 4``)."""

    def __init__(self, backbone: nn.Module, feat_dim: int, proj_dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = nn.Sequential(nn.Linear(feat_dim, feat_dim), nn.ReLU(), nn.Linear(feat_dim, proj_dim))
        self.rot_head = nn.Linear(proj_dim, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    """SimCLR's NT-Xent over 2b views (Chen et al. 2020, eq. 1): cosine similarity / tau, self excluded."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    b = z1.shape[0]
    sim = z @ z.t() / tau
    sim = sim.masked_fill(torch.eye(2 * b, dtype=torch.bool), float("-inf"))
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)])
    return F.cross_entropy(sim, target)


def ssl_logits(zs: torch.Tensor, ys: torch.Tensor, zq: torch.Tensor, b: int, method: str, normalize: bool = False,
               tau: float = 0.5, lam: float = 50.0) -> torch.Tensor:
    """Query logits ``[n_q, b]`` of a b-way SSL task (spec §7.1 step 5) from embeddings ``zs [b*m_s, P]`` (labels
    ``ys``) and ``zq [n_q, P]``. ``protonet``: ``-||z_q - p_c||^2`` to the support means (``normalize``: of
    L2-normalized embeddings, divided by ``tau``; with ``tau = 1`` and ``m_s = 1`` this is ``cos / 0.5``, SimCLR's
    query-to-support InfoNCE at temperature 0.5). ``r2d2``: the ridge head (``lam``; D x D or n x n solve,
    whichever is smaller: :func:`fedaqt.models.fewshot.r2d2_logits`)."""
    if method == "r2d2":
        return r2d2_logits(zs, ys, zq, b, lam, torch.ones(1, dtype=zs.dtype), torch.zeros(1, dtype=zs.dtype))
    if normalize:
        zs, zq = F.normalize(zs, dim=1), F.normalize(zq, dim=1)
    d2 = (zq.unsqueeze(1) - prototypes(zs, ys, b).unsqueeze(0)).pow(2).sum(-1)
    return -d2 / tau if normalize else -d2


def linear_eval(ftr: torch.Tensor, ytr: torch.Tensor, fte: torch.Tensor, yte: torch.Tensor, iters: int = 100,
                weight_decay: float = 1e-4) -> float:
    """Top-1 accuracy of a multinomial logistic regression (float64, L2 ``weight_decay``) fitted by L-BFGS
    (strong Wolfe) on frozen features ``ftr [n, D]`` standardized by their own mean/std, scored on ``fte``.
    Only the linear layer is optimized; the features carry no graph (spec §7.4)."""
    ftr, fte = ftr.detach().double(), fte.detach().double()
    mu, sd = ftr.mean(0), ftr.std(0).clamp_min(1e-6)
    ftr, fte = (ftr - mu) / sd, (fte - mu) / sd
    lin = nn.Linear(ftr.shape[1], int(max(ytr.max(), yte.max())) + 1).double()
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=iters, line_search_fn="strong_wolfe")
    y = ytr.long()

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(lin(ftr), y) + weight_decay * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return float((lin(fte).argmax(1) == yte.long()).double().mean())


def prototype_accuracies(feats: torch.Tensor, episodes: list[tuple[np.ndarray, np.ndarray]], n_way: int) -> np.ndarray:
    """Few-shot evaluation of frozen features (spec §7 "few-shot evaluation of the learned backbone"; the
    ProtoNet rule, Snell et al. 2017): per episode, each query goes to the nearest support-class mean (squared
    Euclidean) of ``feats [M, D]``; ``episodes`` are class-major (support, query) index arrays
    (:func:`fedaqt.data.fewshot.eval_episode_indices`). Returns the query accuracy of each episode, float64
    ``[len(episodes)]`` in [0, 1]."""
    accs = np.empty(len(episodes))
    with torch.no_grad():
        for i, (s, q) in enumerate(episodes):
            ys = torch.arange(n_way).repeat_interleave(len(s) // n_way)
            yq = torch.arange(n_way).repeat_interleave(len(q) // n_way)
            fq = feats[torch.from_numpy(q)]
            d2 = (fq.unsqueeze(1) - prototypes(feats[torch.from_numpy(s)], ys, n_way).unsqueeze(0)).pow(2).sum(-1)
            accs[i] = float((d2.argmin(1) == yq).double().mean())
    return accs
