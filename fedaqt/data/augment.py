"""Episode augmentation for meta-learning (spec §6.1-6.3, dissertation chapter 6): the four modes (support, query,
task, shot), the technique pool, and frozen augmentation draws for Meta-MaxUp.

kornia/torchvision are not installed here: every image op is written with plain torch tensor ops (``torch.rot90``,
``torch.flip``, ``F.pad``, ``F.affine_grid``/``F.grid_sample``, slicing).

An :class:`AugTask` is one episode after augmentation: float images ``[n, C, H, W]`` in [0, 1], support labels,
query labels, the number of classes (task ``combine`` lowers it) and, when a label-mixing query technique ran
(CutMix / MixUp), the partner labels ``y_q2`` and per-query weights ``lam_q``: the outer loss is
``lam * CE(y_q) + (1 - lam) * CE(y_q2)`` (:func:`mixed_ce`).

A :class:`Draw` is a combination of ``(mode, technique)`` items plus one integer seed; every random parameter
(boxes, lambdas, angles, partners) is a function of the seed, so applying a draw twice gives bitwise the same task
(the "frozen parameters" of Meta-MaxUp, spec §6.3). Order of application: task, support, query, shot (in listed
order within a mode).

The ``augment`` option (:func:`parse_augment`): ``MODE:TECH[+MODE:TECH...][,ELEMENT...]`` or a named pool
(``medium``, ``large``, ``single``, ``cutmix``; spec §6.3). Modes: ``support``/``s``, ``query``/``q``, ``task``/``t``,
``shot``/``k``. :data:`TECHNIQUES` lists the techniques allowed per mode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

MODES = ("task", "support", "query", "shot")
_MODE_ALIASES = {"s": "support", "support": "support", "q": "query", "query": "query", "t": "task", "task": "task",
                 "k": "shot", "shot": "shot"}
#: techniques allowed in each mode (spec §6.1/§6.2). support cannot mix labels (the heads need hard support labels).
TECHNIQUES = {
    "support": ("selfmix", "erase", "rotation", "flip", "crop", "randrot", "drop_channel", "solarize"),
    "query": ("cutmix", "mixup", "selfmix", "erase", "rotation", "flip", "crop", "randrot", "drop_channel",
              "solarize"),
    "task": ("rotation", "mixup", "cutmix", "combine", "erase", "drop_channel"),
    "shot": ("flip", "crop", "randrot", "erase", "selfmix", "solarize"),
}
#: techniques without a random parameter: repeating one in an element is refused
_DETERMINISTIC = ("flip", "solarize")
_MEDIUM = ("query:cutmix", "query:erase", "support:selfmix", "task:rotation", "query:cutmix+task:rotation",
           "query:erase+task:rotation")
#: named Meta-MaxUp pools (spec §6.3)
POOLS = {
    "medium": _MEDIUM,
    "large": _MEDIUM + ("query:erase+support:erase", "query:cutmix+support:erase", "query:cutmix+query:erase",
                        "query:cutmix+support:selfmix"),
    "single": ("query:cutmix", "query:erase", "support:selfmix", "task:rotation"),
    "cutmix": ("query:cutmix",),
}

Element = tuple[tuple[str, str], ...]


def parse_augment(spec: str) -> list[Element]:
    """Parse the ``augment`` option into pool elements (each a tuple of ``(mode, technique)``).

    Returns ``[]`` for ``""``/``"none"``.

    Raises:
        ValueError: unknown mode or technique, a technique not allowed in its mode, or two label-mixing query
            techniques in one element (the bad item is named).
    """
    spec = spec.strip()
    if spec in ("", "none"):
        return []
    if spec in POOLS:
        return [parse_augment(e)[0] for e in POOLS[spec]]
    out = []
    for elem in spec.split(","):
        items = []
        for item in elem.split("+"):
            mode, sep, tech = item.strip().partition(":")
            mode, tech = mode.strip(), tech.strip()
            if not sep or mode not in _MODE_ALIASES:
                raise ValueError(f"augment item {item.strip()!r}: expected MODE:TECHNIQUE with MODE one of "
                                 f"{sorted(_MODE_ALIASES)} (or a named pool {sorted(POOLS)})")
            mode = _MODE_ALIASES[mode]
            if tech not in TECHNIQUES[mode]:
                raise ValueError(f"augment item {item.strip()!r}: technique {tech!r} is not allowed in {mode} mode; "
                                 f"choose one of {list(TECHNIQUES[mode])}")
            if (mode, tech) in items and tech in _DETERMINISTIC:
                raise ValueError(f"augment element {elem.strip()!r}: {mode}:{tech} twice; {tech} has no random "
                                 "parameter, so the second gives the same images again (or undoes the first)")
            items.append((mode, tech))
        if sum(1 for m, t in items if m == "query" and t in ("cutmix", "mixup")) > 1:
            raise ValueError(f"augment element {elem!r}: at most one label-mixing query technique (cutmix/mixup)")
        out.append(tuple(items))
    return out


@dataclass
class AugTask:
    """An episode after augmentation: ``x_s [n_s, C, H, W]`` / ``x_q [n_q, C, H, W]`` float in [0, 1], ``y_s [n_s]``
    / ``y_q [n_q]`` int64 in ``[0, n_way)``; ``y_q2``/``lam_q [n_q]`` set by query CutMix / MixUp (else None)."""

    x_s: torch.Tensor
    y_s: torch.Tensor
    x_q: torch.Tensor
    y_q: torch.Tensor
    n_way: int
    y_q2: Optional[torch.Tensor] = None
    lam_q: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class Draw:
    """One frozen augmentation: ``items`` (``(mode, technique)`` pairs) and the ``seed`` of all its random
    parameters; ``angles`` (quarter turns per episode class) when the episode was drawn from the expanded
    ``(class, angle)`` pool (:func:`fedaqt.data.fewshot.sample_rotation_episode`): ``task:rotation`` then applies
    those angles instead of drawing them. :meth:`apply` is deterministic."""

    items: Element
    seed: int
    angles: Optional[tuple[int, ...]] = None

    def apply(self, task: AugTask) -> AugTask:
        """The augmented task (inputs are not modified). See :func:`apply_items`."""
        return apply_items(task, self.items, np.random.default_rng(self.seed), self.angles)


def sample_draws(pool: list[Element], m: int, rng: np.random.Generator) -> list[Draw]:
    """``m`` draws from ``pool`` with replacement (spec §6.3 step 2); draw ``j`` comes from the ``j``-th spawned
    child of ``rng``, so the first draw does not depend on ``m`` (``m = 1`` is random augmentation under the same
    seed).

    Raises:
        ValueError: an empty pool or ``m < 1``.
    """
    if not pool or m < 1:
        raise ValueError(f"sample_draws needs a non-empty pool and m >= 1 (pool of {len(pool)}, m={m})")
    draws = []
    for child in rng.spawn(m):
        draws.append(Draw(pool[int(child.integers(len(pool)))], int(child.integers(2**62))))
    return draws


def mixed_ce(logits: torch.Tensor, task: AugTask) -> torch.Tensor:
    """Outer loss: mean over queries of ``lam * CE(y_q) + (1 - lam) * CE(y_q2)`` (plain CE without mixing)."""
    if task.y_q2 is None:
        return F.cross_entropy(logits, task.y_q)
    ce_a = F.cross_entropy(logits, task.y_q, reduction="none")
    ce_b = F.cross_entropy(logits, task.y_q2, reduction="none")
    lam = task.lam_q.to(logits.dtype)
    return (lam * ce_a + (1 - lam) * ce_b).mean()


# ----------------------------------------------------------------------------------------------- primitives
def cut_box(h: int, w: int, lam: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """CutMix box ``(y0, y1, x0, x1)`` of area fraction about ``1 - lam`` (Yun et al. 2019), centre uniform,
    clipped to the image."""
    r = math.sqrt(1.0 - lam)
    ch, cw = int(round(h * r)), int(round(w * r))
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    return (max(cy - ch // 2, 0), min(cy + (ch - ch // 2), h), max(cx - cw // 2, 0), min(cx + (cw - cw // 2), w))


def erase_box(h: int, w: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """Random-erase box with torchvision's defaults: area scale U(0.02, 0.33), log-uniform aspect ratio in
    (0.3, 3.3); 10 tries, then the whole image is left (an empty box)."""
    for _ in range(10):
        area = h * w * rng.uniform(0.02, 0.33)
        ratio = math.exp(rng.uniform(math.log(0.3), math.log(3.3)))
        eh, ew = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
        if 0 < eh < h and 0 < ew < w:
            y0, x0 = int(rng.integers(h - eh + 1)), int(rng.integers(w - ew + 1))
            return y0, y0 + eh, x0, x0 + ew
    return 0, 0, 0, 0


def _selfmix(img: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    h, w = img.shape[-2:]
    y0, y1, x0, x1 = cut_box(h, w, float(rng.uniform()), rng)
    bh, bw = y1 - y0, x1 - x0
    out = img.clone()
    if bh and bw:
        sy, sx = int(rng.integers(h - bh + 1)), int(rng.integers(w - bw + 1))
        out[..., y0:y1, x0:x1] = img[..., sy:sy + bh, sx:sx + bw]
    return out


def _crop(img: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    h, w = img.shape[-2:]
    pad = max(1, h // 8)
    p = F.pad(img.unsqueeze(0), (pad, pad, pad, pad)).squeeze(0)
    y, x = int(rng.integers(2 * pad + 1)), int(rng.integers(2 * pad + 1))
    return p[..., y:y + h, x:x + w].clone()


def _randrot(img: torch.Tensor, rng: np.random.Generator, max_deg: float = 30.0) -> torch.Tensor:
    a = math.radians(rng.uniform(-max_deg, max_deg))
    theta = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]], dtype=img.dtype)
    grid = F.affine_grid(theta.unsqueeze(0), [1, *img.shape], align_corners=False)
    return F.grid_sample(img.unsqueeze(0), grid, align_corners=False).squeeze(0)


def _per_image(tech: str, x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """A label-preserving technique applied to every image of ``x [n, C, H, W]`` with its own parameters."""
    out = []
    h, w = x.shape[-2:]
    for img in x:
        if tech == "rotation":
            img = torch.rot90(img, int(rng.integers(1, 4)), dims=(-2, -1))
        elif tech == "flip":
            img = torch.flip(img, dims=(-1,))
        elif tech == "crop":
            img = _crop(img, rng)
        elif tech == "randrot":
            img = _randrot(img, rng)
        elif tech == "erase":
            y0, y1, x0, x1 = erase_box(h, w, rng)
            img = img.clone()
            img[..., y0:y1, x0:x1] = 0.0
        elif tech == "selfmix":
            img = _selfmix(img, rng)
        elif tech == "drop_channel":
            img = img.clone()
            img[int(rng.integers(img.shape[0]))] = 0.0
        elif tech == "solarize":
            img = torch.where(img >= 0.5, 1.0 - img, img)
        else:  # pragma: no cover - guarded by parse_augment
            raise ValueError(f"technique {tech!r} is not a per-image technique")
        out.append(img)
    return torch.stack(out) if out else x.clone()


def _task(tech: str, t: AugTask, rng: np.random.Generator, angles: Optional[tuple[int, ...]] = None) -> AugTask:
    n = t.n_way
    if tech == "rotation":  # every class gets one angle for all its images: (class, angle) is the new class
        if angles is not None and len(angles) != n:
            raise ValueError(f"task:rotation got {len(angles)} angles for an {n}-way episode")
        ks = rng.integers(0, 4, size=n) if angles is None else np.asarray(angles)
        xs, xq = t.x_s.clone(), t.x_q.clone()
        for c in range(n):
            for x, y in ((xs, t.y_s), (xq, t.y_q)):
                m = y == c
                if m.any():
                    x[m] = torch.rot90(x[m], int(ks[c]), dims=(-2, -1))
        return replace(t, x_s=xs, x_q=xq)
    if tech == "combine":  # merge class b into class a; labels above b shift down by one
        if n < 3:
            raise ValueError(f"task:combine needs n_way >= 3 (got {n}): merging would leave one class")
        a, b = (int(v) for v in rng.choice(n, size=2, replace=False))
        def relabel(y: torch.Tensor) -> torch.Tensor:
            y = torch.where(y == b, torch.full_like(y, a), y)
            return torch.where(y > b, y - 1, y)
        return replace(t, y_s=relabel(t.y_s), y_q=relabel(t.y_q), n_way=n - 1,
                       y_q2=None if t.y_q2 is None else relabel(t.y_q2))
    if tech in ("mixup", "cutmix"):  # class a becomes "A + B": each of its images mixed with a random image of b
        a, b = (int(v) for v in rng.choice(n, size=2, replace=False))
        h, w = t.x_s.shape[-2:]
        box = cut_box(h, w, 0.5, rng)
        xs, xq = t.x_s.clone(), t.x_q.clone()
        for x, y in ((xs, t.y_s), (xq, t.y_q)):
            ia, ib = torch.nonzero(y == a).flatten(), torch.nonzero(y == b).flatten()
            if not len(ia) or not len(ib):
                continue
            partner = ib[torch.from_numpy(rng.integers(len(ib), size=len(ia)))]
            if tech == "mixup":
                x[ia] = 0.5 * x[ia] + 0.5 * x[partner]
            else:
                y0, y1, x0, x1 = box
                x[ia, :, y0:y1, x0:x1] = x[partner, :, y0:y1, x0:x1]
        return replace(t, x_s=xs, x_q=xq)
    # erase / drop_channel per class: one box / channel shared by all images of a class
    h, w = t.x_s.shape[-2:]
    xs, xq = t.x_s.clone(), t.x_q.clone()
    for c in range(n):
        if tech == "erase":
            y0, y1, x0, x1 = erase_box(h, w, rng)
        else:
            ch = int(rng.integers(t.x_s.shape[1]))
        for x, y in ((xs, t.y_s), (xq, t.y_q)):
            idx = torch.nonzero(y == c).flatten()
            if tech == "erase":
                x[idx, :, y0:y1, x0:x1] = 0.0
            else:
                x[idx, ch] = 0.0
    return replace(t, x_s=xs, x_q=xq)


def _query_mix(tech: str, t: AugTask, rng: np.random.Generator) -> AugTask:
    """Query CutMix / MixUp (spec §6.2): partners = a random permutation of the same task's queries,
    ``lam ~ Beta(1, 1)``; CutMix sets ``lam`` to the kept area fraction of its box."""
    nq = t.x_q.shape[0]
    perm = torch.from_numpy(rng.permutation(nq))
    lam = float(rng.beta(1.0, 1.0))
    if tech == "mixup":
        x = lam * t.x_q + (1 - lam) * t.x_q[perm]
    else:
        h, w = t.x_q.shape[-2:]
        y0, y1, x0, x1 = cut_box(h, w, lam, rng)
        x = t.x_q.clone()
        x[:, :, y0:y1, x0:x1] = t.x_q[perm][:, :, y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)
    return replace(t, x_q=x, y_q2=t.y_q[perm].clone(), lam_q=torch.full((nq,), lam, dtype=torch.float64))


def apply_items(task: AugTask, items: Element, rng: np.random.Generator,
                angles: Optional[tuple[int, ...]] = None) -> AugTask:
    """Apply ``items`` in the order task, support, query, shot (spec §6.1). Support mode leaves the query tensors
    untouched and vice versa; shot mode appends one augmented copy of the support set per shot technique
    (``n_s -> n_s * (1 + copies)``, labels duplicated). ``angles``: the quarter turns of each class for
    ``task:rotation`` (episodes from the expanded ``(class, angle)`` pool); None = one random angle per class.

    Raises:
        ValueError: ``task:combine`` with ``n_way < 3``; ``angles`` not of length ``n_way``.
    """
    t = task
    for mode in MODES:
        for m, tech in items:
            if m != mode:
                continue
            if mode == "task":
                t = _task(tech, t, rng, angles)
            elif mode == "support":
                t = replace(t, x_s=_per_image(tech, t.x_s, rng))
            elif mode == "query":
                t = _query_mix(tech, t, rng) if tech in ("cutmix", "mixup") else replace(
                    t, x_q=_per_image(tech, t.x_q, rng))
    shot = [tech for m, tech in items if m == "shot"]
    if shot:
        xs, ys = [t.x_s], [t.y_s]
        for tech in shot:
            xs.append(_per_image(tech, t.x_s, rng))
            ys.append(t.y_s.clone())
        t = replace(t, x_s=torch.cat(xs), y_s=torch.cat(ys))
    return t
