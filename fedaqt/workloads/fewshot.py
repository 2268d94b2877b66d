"""Federated few-shot meta-learning (spec §5) as a workload: ProtoNet / R2-D2 / MetaOptNet-SVM heads, classical
training with R_FC / R_HV, and the MAML family (``--algorithm fomaml|maml|reptile|consensus_reptile``).

Data (``-o dataset``, :func:`fedaqt.data.fewshot.load_pool`): ``glyphs`` (default; ``-o data_dir``, default
``data/glyphs``, built by ``fedaqt data glyphs --out DIR`` -- :meth:`FewShotWorkload.prepare` fails with that
command when it is missing, nothing is built lazily), ``fmnist`` (5 background + 5 novel classes), ``omniglot``,
``cifarfs``, ``miniimagenet`` (standard layouts under ``data_dir``).

Federated setting: the background split's classes are permuted by ``config.seed`` and cut into
``config.num_clients`` disjoint, contiguous chunks; client c draws its training episodes only from its own
classes (a deterministic function of (seed, client, round, index)).

Methods (``-o method``):

* ``protonet`` / ``r2d2`` / ``svm`` -- backbone + :class:`~fedaqt.models.fewshot.EpisodeHead`; one training batch
  is one N-way K-shot episode (``n_way``, ``k_shot``, ``q_query``), the loss is the query cross-entropy of the
  head's logits; ``--batch-size`` is not used (an episode's aggregation weight ``num-examples`` is 1).
* ``classical`` -- backbone + a linear classifier over all background classes; a batch is ``--batch-size``
  images, ``batch_size // 2`` classes x 2 images (class-major, spec §5.5), loss CE ``+ r_fc_weight * R_FC``
  (the plain ratio) ``+ r_hv_weight * R_HV``; evaluated by nearest prototype on the backbone features.
* ``maml`` -- backbone + an N-way linear classifier trained by a MAML-family client algorithm (the algorithm's
  tasks come from :meth:`FewShotWorkload.client_task`). ``method=auto`` (default) picks ``maml`` for those
  algorithms and ``protonet`` otherwise.

Quantized clients (``--bits 8/4``): every ``Conv2d``/``Linear`` under ``backbone`` is a native quantized layer;
BatchNorm, the head's learnable scale / bias / lambda and the classifier stay float.

Evaluation (``rounds.csv``) of the server's float model on novel-class episodes of the ``evaluation`` split:
``eval_acc_1shot``, ``eval_acc_5shot`` (mean query accuracy over ``eval_episodes`` episodes, default 600, each
``n_way``-way with ``eval_query`` queries per class) and ``eval_ci95_1shot``/``eval_ci95_5shot``
(``1.96 * std / sqrt(n)``, numpy's population std, ``ddof=0``); ``r_fc`` (with the ``C/N`` factor) and ``r_hv``
of the backbone features of ``metric_classes`` evaluation classes x ``metric_per_class`` images. Features of the
evaluation pool are computed once per evaluation (BatchNorm in eval mode, running statistics) and the episodes
are drawn over them, so ProtoNet / R2-D2 / classical evaluations cost one pass over the pool. SVM episodes each
solve a qpth QP. ``maml`` evaluates by ``-o eval_adapt=head`` (default: the classifier, from its meta-learned
initialization, takes ``adapt_steps`` (100) full-batch gradient steps on the support features centred on their
mean, step ``1 / L`` per episode unless ``adapt_lr > 0``: :func:`~fedaqt.models.fewshot.adapt_classifier`, all
episodes batched) or ``eval_adapt=full`` (the whole network adapts per episode with SGD of lr ``adapt_lr`` or
``--lr``, BatchNorm on batch statistics: MAML's protocol, much slower).
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any, Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from fedaqt.config import ConfigError, RunConfig
from fedaqt.data.augment import AugTask, Draw, mixed_ce, parse_augment, sample_draws
from fedaqt.data.fewshot import (ClassPool, eval_episode_indices, load_pool, sample_class_batch, sample_episode,
                                 sample_rotation_episode)
from fedaqt.models.fewshot import (EpisodeHead, FewShotNet, adapt_classifier, build_backbone, prototypes, r_fc,
                                   r_hv_batch)
from fedaqt.options import BaseOptions
from fedaqt.workloads.base import Workload

#: client algorithms that train the full network by inner loops on :meth:`FewShotWorkload.client_task`
META_ALGORITHMS = ("fomaml", "maml", "reptile", "consensus_reptile")
EVAL_COLUMNS = ("eval_acc_1shot", "eval_acc_5shot", "eval_ci95_1shot", "eval_ci95_5shot", "r_fc", "r_hv")
_CHANNELS = {"glyphs": 1, "fmnist": 1, "omniglot": 1, "cifarfs": 3, "miniimagenet": 3}
_FEAT_BATCH = 500
_EVAL_CHUNK = 100  # evaluation episodes per batched head computation


class FewShotOptions(BaseOptions):
    """Options of the fewshot workload (``-o KEY=VALUE``; ``fedaqt plugins show fewshot``)."""

    method: Literal["auto", "protonet", "r2d2", "svm", "classical", "maml"] = Field(
        "auto", description="protonet | r2d2 | svm (frozen-backbone heads), classical (+ r_fc/r_hv), maml (N-way "
                            "classifier for --algorithm fomaml/maml/reptile/consensus_reptile); auto = maml for "
                            "those algorithms, else protonet")
    backbone: Literal["conv4", "resnet12"] = Field("conv4", description="conv4 or resnet12")
    width: int = Field(32, ge=1, le=640, description="backbone width (conv4 filters; resnet12 base channels)")
    dataset: Literal["glyphs", "fmnist", "omniglot", "cifarfs", "miniimagenet"] = Field(
        "glyphs", description="glyphs (fedaqt data glyphs), fmnist (5+5 classes), omniglot, cifarfs, miniimagenet")
    data_dir: str = Field("", description="dataset directory (glyphs default: data/glyphs)")
    image_size: int = Field(0, ge=0, le=256, description="resize images to this side (0 = native)")
    n_way: int = Field(5, ge=2, le=100, description="N classes per training and evaluation episode")
    k_shot: int = Field(5, ge=1, le=100, description="K support images per class of training episodes")
    q_query: int = Field(10, ge=1, le=100, description="Q query images per class of training episodes")
    eval_episodes: int = Field(600, ge=1, le=100000, description="evaluation episodes per shot count (1 and 5)")
    eval_query: int = Field(10, ge=1, le=100, description="query images per class of evaluation episodes")
    r_fc_weight: float = Field(0.0, ge=0, allow_inf_nan=False, description="classical: weight of R_FC in the loss")
    r_hv_weight: float = Field(0.0, ge=0, allow_inf_nan=False, description="classical: weight of R_HV in the loss")
    r2d2_lambda: float = Field(50.0, gt=0, allow_inf_nan=False, description="R2-D2 ridge lambda (initial value)")
    learn_lambda: bool = Field(False, description="R2-D2: learn log(lambda)")
    svm_c: float = Field(0.1, gt=0, allow_inf_nan=False, description="MetaOptNet-SVM C")
    svm_iters: int = Field(15, ge=1, le=100, description="qpth interior-point iterations")
    eval_adapt: Literal["head", "full"] = Field("head", description="maml evaluation: adapt the classifier on "
                                                                   "frozen features (head) or the whole network")
    adapt_steps: int = Field(100, ge=0, le=1000, description="maml evaluation: gradient steps on the support set")
    adapt_lr: float = Field(0.0, ge=0, le=100, allow_inf_nan=False, description="maml evaluation: step size; 0 = auto "
                            "(head: 1/L per episode, L the support loss's Lipschitz constant; full: --lr, the "
                            "inner lr of meta-training)")
    metric_classes: int = Field(50, ge=2, description="r_fc/r_hv: evaluation classes used")
    metric_per_class: int = Field(5, ge=2, description="r_fc/r_hv: images per class")
    eval_max_per_class: int = Field(200, ge=1, description="images per evaluation class kept (fmnist has 7000)")
    augment: str = Field("", description="episode augmentation (spec §6.1/6.2), heads only: "
                         "MODE:TECH[+MODE:TECH...][,ELEMENT...] with MODE support|query|task|shot (s|q|t|k), e.g. "
                         "q:cutmix+t:rotation; or a Meta-MaxUp pool medium|large|single|cutmix; '' = none. "
                         "Techniques: support selfmix|erase|rotation|flip|crop|randrot|drop_channel|solarize; query "
                         "also cutmix|mixup; task rotation|mixup|cutmix|combine|erase|drop_channel; shot "
                         "flip|crop|randrot|erase|selfmix|solarize (one augmented copy of the support set each)")
    maxup: int = Field(1, ge=1, le=16, description="Meta-MaxUp (spec §6.3): draws per episode from the augment "
                       "pool; the episode trains on the draw with the largest outer loss (m+1 forwards, 1 "
                       "backward); 1 = one random draw (plain random augmentation)")
    rotation_pool: Literal["auto", "expanded", "per_class"] = Field(
        "auto", description="classes of task:rotation (spec §6.1 [CHOICE]): expanded = the N classes are (class, "
        "angle) pairs drawn from the client's classes x {0,90,180,270}, so one base class may appear at two angles; "
        "per_class = N distinct classes, each turned by one random angle. Expanded needs every augment element to "
        "contain task:rotation (Meta-MaxUp's draws share one sampled task); auto = expanded then, else per_class")
    eval_flip_shots: bool = Field(False, description="shot augmentation at test time (spec §6.1): every evaluation "
                                  "support image is joined by its horizontal flip (K -> 2K)")

    @field_validator("augment")
    @classmethod
    def _valid_augment(cls, v: str) -> str:
        parse_augment(v)  # ValueError naming the bad item
        return v


class FewShotWorkload(Workload):
    """Federated few-shot learning (spec §5); see the module docstring."""

    name = "fewshot"
    description = ("federated few-shot meta-learning (spec §5): ProtoNet/R2-D2/SVM heads, classical+R_FC/R_HV, "
                   "MAML family; 1-/5-shot accuracy +- CI on novel classes")
    Options = FewShotOptions
    eval_columns = EVAL_COLUMNS
    default_eval_every = 10

    def __init__(self, config: RunConfig) -> None:
        super().__init__(config)
        o = self.options
        meta = config.algorithm in META_ALGORITHMS
        self.method = o.method if o.method != "auto" else ("maml" if meta else "protonet")
        if meta and self.method != "maml":
            raise ConfigError(f"options.method={o.method!r} with --algorithm {config.algorithm}: the MAML family "
                              "trains an N-way classifier; use -o method=maml (or auto)")
        if self.method == "maml" and not meta:
            raise ConfigError(f"options.method='maml' needs a MAML-family client algorithm "
                              f"(--algorithm {'|'.join(META_ALGORITHMS)}), got {config.algorithm!r}")
        if self.method == "classical" and config.batch_size < 4:
            raise ConfigError(f"batch_size={config.batch_size}: method=classical draws batch_size // 2 classes x 2 "
                              "images and needs batch_size >= 4")
        self.aug_pool = parse_augment(o.augment)
        if self.aug_pool and self.method not in ("protonet", "r2d2", "svm"):
            raise ConfigError(f"options.augment={o.augment!r} needs an episode head (method protonet|r2d2|svm), got "
                              f"method={self.method!r}: classical batches are not episodes, and the MAML-family "
                              "algorithms compute their own hard-label query loss")
        if o.maxup > 1 and not self.aug_pool:
            raise ConfigError(f"options.maxup={o.maxup} needs an augmentation pool (options.augment, e.g. medium)")
        all_rotate = bool(self.aug_pool) and all(("task", "rotation") in e for e in self.aug_pool)
        if o.rotation_pool == "expanded" and not all_rotate:
            raise ConfigError(f"options.rotation_pool='expanded' needs every element of options.augment="
                              f"{o.augment!r} to contain task:rotation (an element without it would train on the "
                              "unrotated pairs, where one base class can be two labels); use auto or per_class")
        #: episodes drawn from the expanded (class, angle) pool (:func:`sample_rotation_episode`)
        self.expanded_rotation = all_rotate and o.rotation_pool != "per_class"
        combines = max((sum(1 for _, t in e if t == "combine") for e in self.aug_pool), default=0)
        if combines and o.n_way - combines < 2:
            raise ConfigError(f"options.augment: an element with task:combine x{combines} merges {o.n_way} classes "
                              f"into {o.n_way - combines}; it needs n_way >= {combines + 2} (got n_way={o.n_way})")
        if _CHANNELS[o.dataset] == 1 and any(t == "drop_channel" for e in self.aug_pool for _, t in e):
            raise ConfigError(f"options.augment drop_channel on {o.dataset} (1 channel) would blank whole images; it "
                              "needs colour data (cifarfs, miniimagenet)")
        if o.eval_flip_shots and self.method == "maml" and o.eval_adapt == "full":
            raise ConfigError("options.eval_flip_shots works on frozen features; it is not available with "
                              "eval_adapt=full")
        self.in_channels = _CHANNELS[o.dataset]
        self.data_dir = o.data_dir or ("data/glyphs" if o.dataset == "glyphs" else "")
        self._pools: dict[str, ClassPool] = {}
        self._client_classes: Optional[list[np.ndarray]] = None

    # ------------------------------------------------------------------ data
    def pool(self, split: str) -> ClassPool:
        """The ``background`` or ``evaluation`` pool (cached; evaluation capped at ``eval_max_per_class``)."""
        if split not in self._pools:
            p = load_pool(self.options.dataset, split, self.data_dir)
            if split == "evaluation":
                cap = self.options.eval_max_per_class
                if any(len(m) > cap for m in p.by_class):
                    rng = np.random.default_rng([self.config.seed, 0x45])
                    keep = np.sort(np.concatenate([rng.permutation(m)[:cap] for m in p.by_class]))
                    p = ClassPool(p.images[keep], p.labels[keep], p.names)
            self._pools[split] = p
        return self._pools[split]

    def client_classes(self) -> list[np.ndarray]:
        """Background class ids of every client: a seed permutation cut into ``num_clients`` disjoint chunks."""
        if self._client_classes is None:
            n = self.pool("background").n_classes
            perm = np.random.default_rng([self.config.seed, 0x46]).permutation(n)
            self._client_classes = [np.sort(c) for c in np.array_split(perm, self.config.num_clients)]
        return self._client_classes

    def to_input(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, C, H, W]`` -> float32 in [0, 1] (resized to ``image_size`` when set)."""
        x = x.to(torch.float32).div_(255.0)
        s = self.options.image_size
        if s and x.shape[-1] != s:
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False)
        return x

    def prepare(self) -> None:
        """Load the pools and check the class counts.

        Raises:
            FileNotFoundError: data missing (for glyphs: names ``fedaqt data glyphs --out DIR``).
            ValueError: a client with fewer than ``n_way`` classes, an evaluation split with fewer than ``n_way``
                classes, or classes with fewer images than an episode needs (values named).
        """
        o = self.options
        bg, ev = self.pool("background"), self.pool("evaluation")
        small = min(len(c) for c in self.client_classes())
        if self.method != "classical" and small < o.n_way:
            raise ValueError(f"num_clients={self.config.num_clients}: the {bg.n_classes} background classes of "
                             f"{o.dataset} give a client only {small} classes < n_way={o.n_way}")
        if small < 2:
            raise ValueError(f"num_clients={self.config.num_clients}: a client gets {small} background class(es)")
        need = o.k_shot + o.q_query
        few = min(len(m) for m in bg.by_class)
        if self.method != "classical" and few < need:
            raise ValueError(f"k_shot + q_query = {need} exceeds the {few} images of the smallest background class")
        if ev.n_classes < o.n_way:
            raise ValueError(f"the evaluation split has {ev.n_classes} classes < n_way={o.n_way}")
        few = min(len(m) for m in ev.by_class)
        if few < 5 + o.eval_query:
            raise ValueError(f"eval_query={o.eval_query}: 5-shot evaluation needs {5 + o.eval_query} images per "
                             f"class, the smallest evaluation class has {few}")

    # ------------------------------------------------------------------ model
    def new_model(self) -> FewShotNet:
        o = self.options
        backbone = build_backbone(o.backbone, self.in_channels, o.width)
        with torch.no_grad():
            side = o.image_size or int(self.pool("evaluation").images.shape[-1])
            dim = int(backbone.eval()(torch.zeros(2, self.in_channels, side, side)).shape[1])
        backbone.train()
        if self.method in ("protonet", "r2d2", "svm"):
            head = EpisodeHead(self.method, lam=o.r2d2_lambda, learn_lambda=o.learn_lambda, c_reg=o.svm_c,
                               svm_iters=o.svm_iters)
            return FewShotNet(backbone, dim, head=head)
        n_out = o.n_way if self.method == "maml" else self.pool("background").n_classes
        return FewShotNet(backbone, dim, n_out=n_out)

    def build_model(self) -> nn.Module:
        """The float model initialized under ``torch.manual_seed(config.seed)`` (global RNG restored)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            model = self.new_model()
        model.train()
        return model

    def quantize_filter(self, name: str, module: nn.Module) -> bool:
        """Conv2d / Linear layers of the backbone (the head's scalars and the classifier stay float)."""
        return isinstance(module, (nn.Conv2d, nn.Linear)) and name.startswith("backbone.")

    # ------------------------------------------------------------------ client side
    def num_partitions(self) -> int:
        return self.config.num_clients

    def _check_client(self, client_id: int) -> None:
        if not 0 <= client_id < self.config.num_clients:
            raise ValueError(f"client_id={client_id} is out of range 0..{self.config.num_clients - 1}")

    def _rng(self, client_id: int, round_num: int, index: int) -> np.random.Generator:
        return np.random.default_rng([self.config.seed, client_id, round_num, index, 0xFE])

    def client_task(self, client_id: int, round_num: int, index: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training episode ``index`` of client ``client_id`` in ``round_num``, from its own classes only:
        ``(x_s float32 [N*K, C, H, W], y_s int64 [N*K], x_q [N*Q, ...], y_q [N*Q])``, labels in ``[0, N)``.

        Raises:
            ValueError: ``client_id`` out of range.
        """
        self._check_client(client_id)
        o = self.options
        ep = sample_episode(self.pool("background"), o.n_way, o.k_shot, o.q_query,
                            self._rng(client_id, round_num, index), classes=self.client_classes()[client_id])
        return self.to_input(ep.x_s), ep.y_s, self.to_input(ep.x_q), ep.y_q

    def client_episode(self, client_id: int, round_num: int, index: int
                       ) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], Optional[np.ndarray]]:
        """:meth:`client_task` and ``None``, or with ``expanded_rotation`` an episode of ``(class, angle)`` pairs
        from the expanded pool (:func:`~fedaqt.data.fewshot.sample_rotation_episode`, images unrotated) and its
        ``angles [n_way]`` (quarter turns), applied by the draws' ``task:rotation``.

        Raises:
            ValueError: ``client_id`` out of range.
        """
        if not self.expanded_rotation:
            return self.client_task(client_id, round_num, index), None
        self._check_client(client_id)
        o = self.options
        ep, angles = sample_rotation_episode(self.pool("background"), o.n_way, o.k_shot, o.q_query,
                                             self._rng(client_id, round_num, index),
                                             classes=self.client_classes()[client_id])
        return (self.to_input(ep.x_s), ep.y_s, self.to_input(ep.x_q), ep.y_q), angles

    def episode_draws(self, client_id: int, round_num: int, index: int) -> list[Draw]:
        """The ``maxup`` frozen augmentation draws of training episode ``index`` (a deterministic function of
        (seed, client, round, index); the first draw does not depend on ``maxup``)."""
        rng = np.random.default_rng([self.config.seed, client_id, round_num, index, 0xA6])
        return sample_draws(self.aug_pool, self.options.maxup, rng)

    def episode_loss(self, model: nn.Module, task: AugTask) -> torch.Tensor:
        """Outer loss of one (augmented) episode: the head's query logits, :func:`~fedaqt.data.augment.mixed_ce`
        (plain CE unless a query CutMix / MixUp set partner labels)."""
        feats = model.backbone(torch.cat([task.x_s, task.x_q]))
        n_s = task.x_s.shape[0]
        logits = model.head(feats[:n_s], task.y_s, feats[n_s:], task.n_way)
        return mixed_ce(logits, task)

    def maxup_loss(self, model: nn.Module, task: AugTask, draws: list[Draw]) -> tuple[torch.Tensor, list[float], int]:
        """Meta-MaxUp (spec §6.3, Algorithm 5) for one episode: ``(loss with grad, candidate losses, chosen k)``.

        Every candidate ``draws[j].apply(task)`` is scored under ``torch.no_grad()`` from the same torch RNG state
        (dropout-style randomness is replayed) with BatchNorm running statistics saved before and restored after
        each pass; ``k = argmax_j loss_j`` is then recomputed with grad from the same RNG state, so the returned
        loss equals ``max_j loss_j`` and backward runs once. One draw: no selection pass (random augmentation).
        """
        if len(draws) == 1:
            return self.episode_loss(model, draws[0].apply(task)), [], 0
        rng_state = torch.get_rng_state()
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats]
        saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in norms]
        losses = []
        with torch.no_grad():
            for d in draws:
                torch.set_rng_state(rng_state)
                losses.append(float(self.episode_loss(model, d.apply(task))))
                for m, (mu, var, nb) in zip(norms, saved):
                    m.running_mean.copy_(mu), m.running_var.copy_(var), m.num_batches_tracked.copy_(nb)
        k = int(np.argmax(losses))
        torch.set_rng_state(rng_state)
        return self.episode_loss(model, draws[k].apply(task)), losses, k

    def task_examples(self) -> int:
        """Images of one training episode: ``n_way * (k_shot + q_query)``."""
        o = self.options
        return o.n_way * (o.k_shot + o.q_query)

    def client_batches(self, client_id: int, round_num: int, num_batches: int, batch_size: int) -> list[Any]:
        """``num_batches`` training batches of client ``client_id``: episodes ``(x_s, y_s, x_q, y_q)``
        (:meth:`client_task`) for the heads, class-major ``(x, y)`` batches of ``batch_size // 2`` classes x 2
        images (pool labels) for ``classical``. MAML-family algorithms call :meth:`client_task` themselves.

        Raises:
            ValueError: ``client_id`` out of range or ``num_batches < 1``.
        """
        self._check_client(client_id)
        if num_batches < 1:
            raise ValueError(f"num_batches={num_batches} must be >= 1")
        if self.method != "classical":
            if not self.aug_pool:
                return [self.client_task(client_id, round_num, i) for i in range(num_batches)]
            eps = []
            for i in range(num_batches):  # frozen Meta-MaxUp draws (spec §6.3 step 2), from their own seeded stream
                ep, angles = self.client_episode(client_id, round_num, i)
                draws = self.episode_draws(client_id, round_num, i)
                if angles is not None:
                    draws = [replace(d, angles=tuple(int(a) for a in angles)) for d in draws]
                eps.append((*ep, tuple(draws)))
            return eps
        classes = self.client_classes()[client_id]
        c = min(batch_size // 2, len(classes))
        out = []
        for i in range(num_batches):
            x, y = sample_class_batch(self.pool("background"), c, 2, self._rng(client_id, round_num, i), classes)
            out.append((self.to_input(x), y))
        return out

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, int]:
        """Episode ``(x_s, y_s, x_q, y_q)``: query CE of the head's logits, weight 1 (one episode); with a fifth
        item (the episode's augmentation draws, ``options.augment``): the Meta-MaxUp loss (:meth:`maxup_loss`). ``(x, y)``:
        classifier CE (classical: ``+ r_fc_weight * R_FC + r_hv_weight * R_HV`` on the class-major batch),
        weight ``len(y)``."""
        o = self.options
        if len(batch) in (4, 5):  # an episode; 5: with its Meta-MaxUp draws
            task = AugTask(*batch[:4], n_way=o.n_way)
            if len(batch) == 4:
                return self.episode_loss(model, task), 1
            return self.maxup_loss(model, task, list(batch[4]))[0], 1
        x, y = batch
        feats = model.backbone(x)
        loss = F.cross_entropy(model.classifier(feats), y)
        if self.method == "classical" and (o.r_fc_weight or o.r_hv_weight):
            c = len(y) // 2
            if o.r_fc_weight:
                loss = loss + o.r_fc_weight * r_fc(feats, c, 2, with_factor=False)
            if o.r_hv_weight:
                loss = loss + o.r_hv_weight * r_hv_batch(feats, c, 2)
        return loss, int(y.numel())

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def pool_features(self, model: nn.Module, flip: bool = False) -> torch.Tensor:
        """Backbone features ``[M, D]`` of the evaluation pool (eval mode, restored after); ``flip``: of the
        horizontally flipped images (test-time shot augmentation, ``eval_flip_shots``)."""
        pool = self.pool("evaluation")
        was = model.training
        model.eval()
        images = torch.flip(pool.images, dims=(-1,)) if flip else pool.images
        try:
            return torch.cat([model.backbone(self.to_input(images[i:i + _FEAT_BATCH]))
                              for i in range(0, len(pool.labels), _FEAT_BATCH)])
        finally:
            model.train(was)

    def eval_episode_indices(self, shots: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """``eval_episodes`` (support, query) index arrays into the evaluation pool for ``shots``-shot episodes,
        class-major with labels ``repeat_interleave`` (the same episodes every evaluation: seed-fixed)."""
        o = self.options
        return eval_episode_indices(self.pool("evaluation").by_class, o.n_way, shots, o.eval_query, o.eval_episodes,
                                    np.random.default_rng([self.config.seed, 0xE7, shots]))

    def episode_accuracies(self, model: nn.Module, shots: int, feats: Optional[torch.Tensor] = None,
                           feats_flip: Optional[torch.Tensor] = None) -> np.ndarray:
        """Query accuracy of each evaluation episode (``[eval_episodes]`` float64 in [0, 1]). With
        ``eval_flip_shots`` (``feats_flip``: :meth:`pool_features` with ``flip=True``, computed here when None)
        every support image's flipped copy joins its class: ``shots -> 2 * shots`` support rows per class."""
        o = self.options
        n = o.n_way
        eps = self.eval_episode_indices(shots)
        yq = torch.arange(n).repeat_interleave(o.eval_query)
        if self.method == "maml" and o.eval_adapt == "full":
            return self._full_adapt_accuracies(model, eps, torch.arange(n).repeat_interleave(shots), yq)
        if feats is None:
            feats = self.pool_features(model)
        if o.eval_flip_shots and feats_flip is None:
            feats_flip = self.pool_features(model, flip=True)
        s_idx = torch.from_numpy(np.stack([s for s, _ in eps]))
        q_idx = torch.from_numpy(np.stack([q for _, q in eps]))
        k = 2 * shots if o.eval_flip_shots else shots
        ys = torch.arange(n).repeat_interleave(k)
        accs = []
        with torch.no_grad():
            for i in range(0, len(eps), _EVAL_CHUNK):  # episodes batched: [E, n, D]
                si = s_idx[i:i + _EVAL_CHUNK]
                fs, fq = feats[si], feats[q_idx[i:i + _EVAL_CHUNK]]
                if o.eval_flip_shots:  # class-major: class c's K originals then their K flips
                    e, d = fs.shape[0], fs.shape[-1]
                    fs = torch.cat([fs.reshape(e, n, shots, d), feats_flip[si].reshape(e, n, shots, d)], 2)
                    fs = fs.reshape(e, n * k, d)
                if self.method == "maml":
                    w, b, mu = adapt_classifier(model.classifier.weight, model.classifier.bias, fs, ys, n,
                                                o.adapt_steps, o.adapt_lr)
                    logits = torch.baddbmm(b.unsqueeze(1), fq - mu, w.transpose(1, 2))
                else:
                    logits = self.batched_logits(model, fs, ys, fq, k)
                accs.append((logits.argmax(-1) == yq.unsqueeze(0)).double().mean(1))
        return torch.cat(accs).numpy()

    def batched_logits(self, model: nn.Module, fs: torch.Tensor, ys: torch.Tensor, fq: torch.Tensor,
                       shots: int) -> torch.Tensor:
        """Query logits ``[E, n_q, N]`` of E episodes at once from support features ``fs [E, N*shots, D]``
        (class-major, labels ``ys``) and query features ``fq [E, n_q, D]``: the same formulas as
        :class:`~fedaqt.models.fewshot.EpisodeHead` (ProtoNet, R2-D2 ridge via the Woodbury form, MetaOptNet-SVM
        as one batched qpth QP), nearest prototype for ``classical``."""
        n = self.options.n_way
        e, d = fs.shape[0], fs.shape[-1]
        if self.method in ("protonet", "classical"):
            p = fs.reshape(e, n, shots, d).mean(2)
            d2 = (fq.unsqueeze(2) - p.unsqueeze(1)).pow(2).sum(-1)
            if self.method == "classical":
                return -d2
            head = model.head
            return -head.scale * (d2 / d if head.normalize_by_dim else d2)
        head = model.head
        oh = F.one_hot(ys, n).to(fs.dtype)
        if self.method == "r2d2":
            lam = torch.exp(head.log_lambda if head.log_lambda is not None else head._log_lambda_fixed)
            ns = fs.shape[1]
            if ns < d:
                a = fs @ fs.transpose(1, 2) + lam * torch.eye(ns, dtype=fs.dtype)
                w = fs.transpose(1, 2) @ torch.linalg.solve(a, oh.expand(e, -1, -1))
            else:
                a = fs.transpose(1, 2) @ fs + lam * torch.eye(d, dtype=fs.dtype)
                w = torch.linalg.solve(a, fs.transpose(1, 2) @ oh)
            return head.scale * (fq @ w) + head.beta
        from qpth.qp import QPFunction, QPSolvers

        from fedaqt.models.fewshot import svm_qp

        parts = [svm_qp(fs[i], ys, n, head.c_reg, head.svm_ridge) for i in range(e)]
        q, p_, g, h, a, b = (torch.stack([pt[j] for pt in parts]) for j in range(6))
        alpha = QPFunction(verbose=-1, maxIter=head.svm_iters, solver=QPSolvers.PDIPM_BATCHED)(q, p_, g, h, a, b)
        w = alpha.reshape(e, -1, n).transpose(1, 2).to(fs.dtype) @ fs  # [E, N, D]
        return head.scale * (fq @ w.transpose(1, 2))

    def _full_adapt_accuracies(self, model: nn.Module, eps: list, ys: torch.Tensor, yq: torch.Tensor) -> np.ndarray:
        pool = self.pool("evaluation")
        lr = float(self.options.adapt_lr or self.config.lr)
        accs = []
        for s, q in eps:
            m = copy.deepcopy(model)
            m.train()
            xs, xq = self.to_input(pool.images[torch.from_numpy(s)]), self.to_input(pool.images[torch.from_numpy(q)])
            opt = torch.optim.SGD(m.parameters(), lr=lr)
            for _ in range(self.options.adapt_steps):
                opt.zero_grad()
                F.cross_entropy(m(xs), ys).backward()
                opt.step()
            with torch.no_grad():
                accs.append(float((m(xq).argmax(1) == yq).double().mean()))
        return np.asarray(accs, np.float64)

    @torch.no_grad()
    def feature_metrics(self, feats: torch.Tensor) -> dict[str, float]:
        """``r_fc`` (with the C/N factor) and ``r_hv`` of ``metric_classes`` x ``metric_per_class`` evaluation
        features (a seed-fixed class-major subset)."""
        o = self.options
        pool = self.pool("evaluation")
        rng = np.random.default_rng([self.config.seed, 0x4D])
        c = min(o.metric_classes, pool.n_classes)
        k = min(o.metric_per_class, min(len(m) for m in pool.by_class))
        classes = rng.choice(pool.n_classes, size=c, replace=False)
        idx = np.concatenate([rng.choice(pool.by_class[int(cl)], size=k, replace=False) for cl in classes])
        f = feats[torch.from_numpy(idx)].double()
        return {"r_fc": float(r_fc(f, c, k)), "r_hv": float(r_hv_batch(f, c, k))}

    def evaluate(self, model: nn.Module, round_num: int) -> dict[str, float]:
        """The six :data:`EVAL_COLUMNS` of the float model (accuracies and CIs as fractions in [0, 1])."""
        feats = self.pool_features(model)
        flips = self.pool_features(model, flip=True) if self.options.eval_flip_shots else None
        out = {}
        for shots in (1, 5):
            acc = self.episode_accuracies(model, shots, feats, flips)
            out[f"eval_acc_{shots}shot"] = float(acc.mean())
            out[f"eval_ci95_{shots}shot"] = ci95(acc)
        out.update(self.feature_metrics(feats))
        return out

    def batch_label(self) -> str:
        """``"episode 5-way 5-shot 10-query (75 images)"`` for the episode methods and the MAML family (whose
        algorithms cut the episode themselves), ``"batch N (N/2 classes x 2)"`` for ``classical``."""
        o = self.options
        if self.method == "classical":
            return f"batch {self.config.batch_size} ({self.config.batch_size // 2} classes x 2)"
        label = f"episode {o.n_way}-way {o.k_shot}-shot {o.q_query}-query ({self.task_examples()} images)"
        if self.aug_pool:
            label += f", augment {o.augment}" + (f", Meta-MaxUp m={o.maxup}" if o.maxup > 1 else "")
        return label

    def describe(self) -> dict[str, Any]:
        with torch.random.fork_rng(devices=[]):
            model = self.new_model()
        return {
            "dataset": self.options.dataset, "data_dir": self.data_dir, "method": self.method,
            "background_classes": int(self.pool("background").n_classes),
            "evaluation_classes": int(self.pool("evaluation").n_classes),
            "client_classes": [int(len(c)) for c in self.client_classes()],
            "num_parameters": int(sum(p.numel() for p in model.parameters())),
            "feature_dim": int(model.feat_dim),
        }


def ci95(acc: np.ndarray) -> float:
    """95% confidence half-width ``1.96 * std / sqrt(n)`` of per-episode accuracies (population std, ddof 0)."""
    acc = np.asarray(acc, np.float64)
    return float(1.96 * acc.std() / np.sqrt(len(acc)))
