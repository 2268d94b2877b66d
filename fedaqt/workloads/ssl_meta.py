"""Meta-learning as self-supervised learning (spec §7, dissertation chapter 7) as a workload: ``ssl-meta``.

Clients hold unlabeled shards of the training images (a seed permutation of the image indices cut into
``num_clients`` chunks; labels are never read on the client side). One training batch is one b-way task
(Algorithm 6): ``--batch-size`` = b base images, each drawn ``views_support + views_query`` times through SimCLR-style
augmentations (random resized crop, horizontal flip, brightness/contrast jitter; plain torch ops, kornia is not
installed); class = base image. ``-o method``: ``protonet`` (query CE against support prototypes), ``r2d2`` (ridge
head), ``simclr`` (NT-Xent baseline, temperature ``tau``, views 1+1). ``-o task_rotation=true``: one angle in
{0, 90, 180, 270} per base image for all its views (§7.2). ``-o rot_loss_weight``: auxiliary 4-way rotation loss on
all 4 rotations of ``rot_fraction`` of the base images (§7.3).

Evaluation (server, labeled held-out data), the backbone frozen (eval-mode BatchNorm) and the projection dropped:

* ``linear_acc``: a multinomial logistic regression fitted by L-BFGS on ``linear_train`` labeled training images'
  standardized features, top-1 on the test split (the first ``linear_test`` images);
* ``fewshot_acc_1shot`` / ``fewshot_acc_5shot`` (+ ``fewshot_ci95_*``, ``1.96 * std / sqrt(n)``): few-shot
  evaluation, ``fewshot_episodes`` seed-fixed ``n_way``-way episodes with ``fewshot_query`` queries per class over
  the same test images (all 10 classes: the backbone never saw a label), each query assigned to the nearest
  support-class mean of the backbone features (:func:`fedaqt.models.ssl.prototype_accuracies`).
  ``fewshot_episodes=0`` skips it.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from fedaqt.config import ConfigError, RunConfig
from fedaqt.data.images import load_fashion_mnist
from fedaqt.data import views
from fedaqt.data.fewshot import eval_episode_indices
from fedaqt.models.fewshot import build_backbone
from fedaqt.models.ssl import SSLNet, linear_eval, nt_xent, prototype_accuracies, ssl_logits
from fedaqt.options import BaseOptions
from fedaqt.workloads.base import Workload


class SSLMetaOptions(BaseOptions):
    """Options of the ssl-meta workload (``-o KEY=VALUE``; ``fedaqt plugins show ssl-meta``)."""

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
    fewshot_episodes: int = Field(600, ge=0, le=100000, description="few-shot evaluation episodes per shot count "
                                  "(1 and 5; nearest class mean on the frozen backbone); 0 = off")
    n_way: int = Field(5, ge=2, le=10, description="N classes of a few-shot evaluation episode")
    fewshot_query: int = Field(15, ge=1, le=100, description="query images per class of a few-shot episode")


class SSLMetaWorkload(Workload):
    """Meta-learning as SSL (spec §7); see the module docstring."""

    name = "ssl-meta"
    description = "meta-learning as self-supervised learning (spec §7): ProtoNet/R2-D2 on augmented views, SimCLR"
    Options = SSLMetaOptions
    eval_columns = ("linear_acc", "fewshot_acc_1shot", "fewshot_acc_5shot", "fewshot_ci95_1shot",
                    "fewshot_ci95_5shot")
    default_eval_every = 5

    #: options each method reads beyond the common ones: an explicitly set option the method ignores is refused
    _METHOD_OPTIONS = {"protonet": {"views_support", "views_query", "normalize", "tau"},
                       "r2d2": {"views_support", "views_query", "r2d2_lambda"},
                       "simclr": {"tau"}}

    def __init__(self, config: RunConfig) -> None:
        super().__init__(config)
        o = self.options
        if config.batch_size < 2:
            raise ConfigError(f"batch_size={config.batch_size}: an SSL task needs b >= 2 base images (with one, every "
                              "view has the same label and the loss is 0)")
        method_only = set().union(*self._METHOD_OPTIONS.values())
        ignored = sorted(k for k in (config.options or {}) if k in method_only - self._METHOD_OPTIONS[o.method])
        if o.method == "protonet" and not o.normalize and "tau" in (config.options or {}):
            ignored.append("tau (protonet uses it only with normalize=true)")
        if ignored:
            raise ConfigError(f"options {ignored} are not used by method={o.method!r}; drop them (simclr: 1+1 views, "
                              "tau; protonet: views, normalize, tau; r2d2: views, r2d2_lambda)")
        self._train = None
        self._test = None
        self._shards: list[np.ndarray] | None = None

    def data(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Fashion-MNIST ``split`` (``train`` / ``test``): uint8 images ``[N, 1, 28, 28]``, int64 labels (cached)."""
        if split == "train":
            if self._train is None:
                self._train = load_fashion_mnist(split="train", normalize=False)
            return self._train
        if self._test is None:
            self._test = load_fashion_mnist(split="test", normalize=False)
        return self._test

    def prepare(self) -> None:
        """Load Fashion-MNIST train/test (FileNotFoundError names ``apt-get install dataset-fashion-mnist``).

        Raises:
            ValueError: a client shard smaller than ``--batch-size`` base images; few-shot evaluation that the
                first ``linear_test`` test images cannot fill (fewer than ``n_way`` classes, or a class with fewer
                than ``5 + fewshot_query`` images).
        """
        o = self.options
        ntr, nte = len(self.data("train")[1]), len(self.data("test")[1])
        _, yte = self.data("test")
        if o.linear_train > ntr or o.linear_test > nte:
            raise ValueError(f"linear_train={o.linear_train} / linear_test={o.linear_test} exceed the {ntr} training / "
                             f"{nte} test images")
        small = min(len(s) for s in self.shards())
        if small < self.config.batch_size:
            raise ValueError(f"num_clients={self.config.num_clients}: a client holds {small} images < batch_size="
                             f"{self.config.batch_size} base images per task")
        if o.fewshot_episodes:
            counts = np.bincount(yte[: o.linear_test].numpy())
            counts = counts[counts > 0]
            if len(counts) < o.n_way or counts.min() < 5 + o.fewshot_query:
                raise ValueError(f"few-shot evaluation: the first linear_test={o.linear_test} test images hold "
                                 f"{len(counts)} classes (need n_way={o.n_way}) with at least {counts.min()} images "
                                 f"each (need 5 + fewshot_query = {5 + o.fewshot_query}); raise linear_test, lower "
                                 "fewshot_query or set fewshot_episodes=0")

    def shards(self) -> list[np.ndarray]:
        """Training-image indices of every client: a seed permutation cut into ``num_clients`` chunks (cached)."""
        if self._shards is None:
            n = int(self.data("train")[0].shape[0])
            perm = np.random.default_rng([self.config.seed, 0x55]).permutation(n)
            self._shards = np.array_split(perm, self.config.num_clients)
        return self._shards

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

    @staticmethod
    def to_input(x: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, 1, 28, 28]`` -> float32 in [0, 1]."""
        return x.to(torch.float32) / 255.0

    def client_batches(self, client_id: int, round_num: int, num_batches: int, batch_size: int) -> list[Any]:
        """``num_batches`` b-way SSL tasks ``(x_s float32 [b*m_s, 1, 28, 28], y_s int64 [b*m_s], x_q [b*m_q, ...],
        y_q [b*m_q])`` from client ``client_id``'s unlabeled shard, b = ``batch_size`` base images (labels = base
        index; simclr: m_s = m_q = 1); a deterministic function of (seed, client, round, index)."""
        o = self.options
        shard = self.shards()[client_id]
        out = []
        for i in range(num_batches):
            rng = np.random.default_rng([self.config.seed, client_id, round_num, i, 0x5A])
            idx = rng.choice(shard, size=min(batch_size, len(shard)), replace=False)
            gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
            m_s, m_q = (1, 1) if o.method == "simclr" else (o.views_support, o.views_query)
            xs, ys, xq, yq, angles = views.ssl_episode(self.to_input(self.data("train")[0][torch.from_numpy(idx)]),
                                                       m_s, m_q, gen, o.task_rotation)
            out.append((xs, ys, xq, yq, angles))
        return out

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, int]:
        """SSL loss of one task ``(x_s, y_s, x_q, y_q, angles)`` (:meth:`client_batches`; spec §7.1 step 6: query
        CE against the base-image index; simclr: NT-Xent) plus ``rot_loss_weight * CE`` of the 4-way rotation head on
        all 4 rotations ``r`` of the first ``rot_fraction`` of the support views (§7.3), labelled by the view's total
        quarter turns from the upright image, ``(angles[base] + r) mod 4`` (task rotation already turned it by
        ``angles[base]``); weight b (base images).

        One forward of the model over all views and rotated copies (BatchNorm statistics over all of them): a
        second forward of the same quantized layers inside one graph would see their codes re-quantized in place
        by FedAvg's step during backward."""
        o = self.options
        xs, ys, xq, yq = batch[:4]
        angles = batch[4] if len(batch) > 4 else torch.zeros(int(ys.max()) + 1, dtype=torch.int64)
        b = int(ys.max()) + 1
        parts = [xs, xq]
        if o.rot_loss_weight:
            k = max(1, int(round(o.rot_fraction * len(xs))))
            parts += [torch.rot90(xs[:k], r, dims=(-2, -1)) for r in range(4)]
            yr = torch.cat([(angles[ys[:k]] + r) % 4 for r in range(4)])
        z = model(torch.cat(parts))
        zs, zq = z[: len(ys)], z[len(ys): len(ys) + len(yq)]
        if o.method == "simclr":
            loss = nt_xent(zs, zq, o.tau)
        else:
            loss = F.cross_entropy(ssl_logits(zs, ys, zq, b, o.method, o.normalize, o.tau, o.r2d2_lambda), yq)
        if o.rot_loss_weight:
            loss = loss + o.rot_loss_weight * F.cross_entropy(model.rot_head(z[len(ys) + len(yq):]), yr)
        return loss, int(b)

    @torch.no_grad()
    def features(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Backbone features ``[N, D]`` of uint8 images ``x`` (eval-mode BatchNorm, mode restored after)."""
        was = model.training
        model.eval()
        try:
            return torch.cat([model.backbone(self.to_input(x[i:i + 1000])) for i in range(0, len(x), 1000)])
        finally:
            model.train(was)

    def evaluate(self, model: nn.Module, round_num: int) -> dict[str, float]:
        """``linear_acc`` in [0, 1] (:func:`fedaqt.models.ssl.linear_eval` on the frozen backbone's features of
        ``linear_train`` seed-chosen labeled training images, scored on the first ``linear_test`` test images) and,
        unless ``fewshot_episodes=0``, the few-shot accuracies (fractions in [0, 1]) and CI95 half-widths over those
        test images' features (see the module docstring)."""
        o = self.options
        xtr, ytr = self.data("train")
        xte, yte = self.data("test")
        rng = np.random.default_rng([self.config.seed, 0x1E])
        itr = torch.from_numpy(rng.choice(len(ytr), size=min(o.linear_train, len(ytr)), replace=False))
        ite = torch.arange(min(o.linear_test, len(yte)))
        fte = self.features(model, xte[ite])
        out = {"linear_acc": linear_eval(self.features(model, xtr[itr]), ytr[itr], fte, yte[ite], o.linear_iters)}
        if o.fewshot_episodes:
            lab = yte[ite].numpy()
            by_class = [np.nonzero(lab == c)[0] for c in np.unique(lab)]
            for shots in (1, 5):
                eps = eval_episode_indices(by_class, o.n_way, shots, o.fewshot_query, o.fewshot_episodes,
                                           np.random.default_rng([self.config.seed, 0xF5, shots]))
                accs = prototype_accuracies(fte, eps, o.n_way)
                out[f"fewshot_acc_{shots}shot"] = float(accs.mean())
                out[f"fewshot_ci95_{shots}shot"] = float(1.96 * accs.std() / np.sqrt(len(accs)))
        return out
