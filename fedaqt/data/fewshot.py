"""Few-shot data (spec §5.1): class pools, the N-way K-shot episode sampler, and readers of the standard layouts.

A :class:`ClassPool` is one split: uint8 images ``[M, C, H, W]`` and labels ``0..n_classes-1``. Sources:

* ``glyphs`` -- the rendered glyph set (:mod:`fedaqt.data.glyphs`), splits background / validation / evaluation;
* ``fmnist`` -- Fashion-MNIST with a class-disjoint 5 + 5 split: classes 0-4 (T-shirt, trouser, pullover, dress,
  coat) are background, 5-9 (sandal, shirt, sneaker, bag, ankle boot) are novel (``evaluation``); train and test
  images of a class are pooled;
* ``omniglot`` -- the standard folder layout ``ROOT/images_background/ALPHABET/characterNN/*.png`` and
  ``ROOT/images_evaluation/...`` (evaluation = ``images_evaluation``; validation = the last 20% of the background
  alphabets, sorted by name);
* ``cifarfs`` / ``miniimagenet`` -- the MetaOptNet pickles (``CIFAR_FS_{train,val,test}.pickle``,
  ``miniImageNet_category_split_{train_phase_train,val,test}.pickle``: dicts with ``data`` uint8 ``[M, H, W, 3]``
  and ``labels``), or for mini-ImageNet the Ravi & Larochelle csv layout ``ROOT/{train,val,test}.csv``
  (``filename,label``) + ``ROOT/images/FILENAME``.
"""

from __future__ import annotations

import csv
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

SPLIT_ALIASES = {"background": "background", "train": "background", "validation": "validation", "val": "validation",
                 "evaluation": "evaluation", "test": "evaluation"}
FMNIST_BACKGROUND = (0, 1, 2, 3, 4)
FMNIST_NOVEL = (5, 6, 7, 8, 9)


@dataclass
class ClassPool:
    """One class-disjoint split.

    Attributes:
        images: uint8 ``[M, C, H, W]``.
        labels: int64 ``[M]`` in ``0..n_classes-1``.
        names: class names (length ``n_classes``).
    """

    images: torch.Tensor
    labels: torch.Tensor
    names: list[str]

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.shape[0] != self.labels.shape[0]:
            raise ValueError(f"images {list(self.images.shape)} must be [M, C, H, W] with one label each "
                             f"(got {self.labels.shape[0]} labels)")
        lab = self.labels.numpy()
        self.by_class = [np.nonzero(lab == c)[0] for c in range(len(self.names))]

    @property
    def n_classes(self) -> int:
        return len(self.names)

    def subset(self, classes: np.ndarray | list[int]) -> "ClassPool":
        """The pool restricted to ``classes`` (relabelled ``0..len-1`` in the given order)."""
        classes = [int(c) for c in classes]
        idx = np.concatenate([self.by_class[c] for c in classes])
        remap = {c: i for i, c in enumerate(classes)}
        lab = torch.tensor([remap[int(v)] for v in self.labels[idx]], dtype=torch.int64)
        return ClassPool(self.images[idx], lab, [self.names[c] for c in classes])


@dataclass
class Episode:
    """One N-way K-shot task: support ``x_s [N*K, C, H, W]`` uint8, ``y_s [N*K]``; query ``x_q [N*Q, ...]``,
    ``y_q [N*Q]``; labels in ``[0, N)`` (a fresh random relabelling); ``classes`` the pool classes, where
    ``classes[n]`` got episode label n."""

    x_s: torch.Tensor
    y_s: torch.Tensor
    x_q: torch.Tensor
    y_q: torch.Tensor
    classes: np.ndarray


def _episode(pool: ClassPool, s_idx: list, q_idx: list, n_way: int, k_shot: int, q_query: int,
             classes: np.ndarray) -> Episode:
    """The class-major Episode of per-class support / query index arrays (labels ``0..N-1`` in list order)."""
    s = np.concatenate(s_idx)
    q = np.concatenate(q_idx) if q_query else np.zeros(0, np.int64)
    ys = torch.arange(n_way).repeat_interleave(k_shot)
    yq = torch.arange(n_way).repeat_interleave(q_query)
    return Episode(pool.images[s], ys, pool.images[q], yq, classes)


def sample_episode(pool: ClassPool, n_way: int, k_shot: int, q_query: int, rng: np.random.Generator,
                   classes: Optional[np.ndarray] = None) -> Episode:
    """Sample one episode (spec §5.1): N distinct classes, K + Q distinct images per class without replacement,
    labels ``0..N-1`` in a random order.

    Args:
        pool: the split to draw from.
        n_way, k_shot, q_query: N, K, Q (all >= 1; Q may be 0 for a support-only task).
        rng: numpy generator (the only randomness).
        classes: restrict the class draw to these pool classes (e.g. a client's own classes).

    Raises:
        ValueError: N larger than the classes available, or a class with fewer than K + Q images (named).
    """
    if n_way < 1 or k_shot < 1 or q_query < 0:
        raise ValueError(f"n_way={n_way}, k_shot={k_shot} must be >= 1 and q_query={q_query} >= 0")
    avail = np.arange(pool.n_classes) if classes is None else np.asarray(classes)
    if n_way > len(avail):
        raise ValueError(f"n_way={n_way} exceeds the {len(avail)} classes available")
    chosen = rng.choice(avail, size=n_way, replace=False)  # order = the random relabelling
    s_idx, q_idx = [], []
    for c in chosen:
        members = pool.by_class[int(c)]
        if len(members) < k_shot + q_query:
            raise ValueError(f"class {pool.names[int(c)]!r} has {len(members)} images < k_shot + q_query = "
                             f"{k_shot + q_query}")
        pick = rng.choice(members, size=k_shot + q_query, replace=False)
        s_idx.append(pick[:k_shot])
        q_idx.append(pick[k_shot:])
    return _episode(pool, s_idx, q_idx, n_way, k_shot, q_query, chosen)


def sample_rotation_episode(pool: ClassPool, n_way: int, k_shot: int, q_query: int, rng: np.random.Generator,
                            classes: Optional[np.ndarray] = None) -> tuple[Episode, np.ndarray]:
    """An N-way episode whose classes are ``(class, angle)`` pairs drawn from the expanded pool of
    ``classes x {0, 90, 180, 270}`` (large rotation as task augmentation, spec §6.1 [CHOICE]): the same base class may
    appear at two angles, then as two episode classes with disjoint images.

    Pairs are drawn one at a time, uniformly among the pairs not yet drawn whose base class still has ``K + Q`` unused
    images, so any pool that :func:`sample_episode` accepts works. The images come back **unrotated**:
    ``angles[n]`` (int64 in ``0..3``, quarter turns) is the rotation of episode class ``n``, applied by the
    ``task:rotation`` technique (:mod:`fedaqt.data.augment`). ``Episode.classes[n]`` is class n's base class.

    Raises:
        ValueError: as :func:`sample_episode`.
    """
    if n_way < 1 or k_shot < 1 or q_query < 0:
        raise ValueError(f"n_way={n_way}, k_shot={k_shot} must be >= 1 and q_query={q_query} >= 0")
    avail = np.arange(pool.n_classes) if classes is None else np.asarray(classes)
    if n_way > len(avail):
        raise ValueError(f"n_way={n_way} exceeds the {len(avail)} classes available")
    need = k_shot + q_query
    for c in avail:
        if len(pool.by_class[int(c)]) < need:
            raise ValueError(f"class {pool.names[int(c)]!r} has {len(pool.by_class[int(c)])} images < k_shot + "
                             f"q_query = {need}")
    unused = {int(c): rng.permutation(pool.by_class[int(c)]) for c in avail}  # images left per base class
    taken: set[int] = set()
    bases, angles, s_idx, q_idx = [], [], [], []
    for _ in range(n_way):
        feasible = [p for p in range(4 * len(avail)) if p not in taken and len(unused[int(avail[p // 4])]) >= need]
        p = feasible[int(rng.integers(len(feasible)))]
        taken.add(p)
        c = int(avail[p // 4])
        pick, unused[c] = unused[c][:need], unused[c][need:]
        bases.append(c)
        angles.append(p % 4)
        s_idx.append(pick[:k_shot])
        q_idx.append(pick[k_shot:])
    return _episode(pool, s_idx, q_idx, n_way, k_shot, q_query, np.asarray(bases)), np.asarray(angles, dtype=np.int64)


def eval_episode_indices(by_class: list[np.ndarray], n_way: int, shots: int, queries: int, episodes: int,
                         rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    """``episodes`` N-way evaluation episodes as (support, query) index arrays (int64 ``[N*shots]``,
    ``[N*queries]``) into a pool whose class ``c`` holds the images ``by_class[c]``: N distinct classes, then per
    class ``shots + queries`` distinct images; class-major, so the labels are ``arange(N).repeat_interleave(...)``.

    Raises:
        ValueError: ``n_way`` above the number of classes, or a class with fewer than ``shots + queries`` images.
    """
    if n_way > len(by_class):
        raise ValueError(f"n_way={n_way} exceeds the {len(by_class)} classes of the pool")
    few = min(len(m) for m in by_class)
    if few < shots + queries:
        raise ValueError(f"shots + queries = {shots + queries} exceeds the {few} images of the smallest class")
    out = []
    for _ in range(episodes):
        chosen = rng.choice(len(by_class), size=n_way, replace=False)
        picks = [rng.choice(by_class[int(c)], size=shots + queries, replace=False) for c in chosen]
        out.append((np.concatenate([p[:shots] for p in picks]), np.concatenate([p[shots:] for p in picks])))
    return out


def sample_class_batch(pool: ClassPool, n_classes: int, per_class: int, rng: np.random.Generator,
                       classes: Optional[np.ndarray] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A classical-training batch of ``n_classes`` classes x ``per_class`` images (class-major order), with the
    pool labels (spec §5.5: C classes, N = 2 images each). Returns (uint8 images, int64 labels)."""
    ep = sample_episode(pool, n_classes, per_class, 0, rng, classes)
    return ep.x_s, torch.as_tensor(ep.classes, dtype=torch.int64).repeat_interleave(per_class)


# ------------------------------------------------------------------------------------------- sources
def fmnist_pool(split: str, root: Optional[str] = None) -> ClassPool:
    """Fashion-MNIST classes 0-4 (``background``) or 5-9 (``evaluation``/``validation``: the novel classes),
    train + test images pooled (7,000 per class)."""
    from fedaqt.data.images import FASHION_MNIST_ROOT, load_fashion_mnist

    split = _split(split)
    r = root or FASHION_MNIST_ROOT
    xs, ys = zip(*(load_fashion_mnist(r, s, normalize=False) for s in ("train", "test")))
    x, y = torch.cat(xs), torch.cat(ys)
    classes = FMNIST_BACKGROUND if split == "background" else FMNIST_NOVEL
    names = ["T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
    keep = torch.isin(y, torch.tensor(classes))
    remap = torch.full((10,), -1, dtype=torch.int64)
    remap[list(classes)] = torch.arange(len(classes))
    return ClassPool(x[keep], remap[y[keep]], [names[c] for c in classes])


def glyph_pool(split: str, root: str) -> ClassPool:
    """A split of the rendered glyph set under ``root`` (:func:`fedaqt.data.glyphs.load_glyphs`)."""
    from fedaqt.data.glyphs import load_glyphs

    x, y, names = load_glyphs(root, _split(split))
    return ClassPool(x, y, names)


def _split(split: str) -> str:
    if split not in SPLIT_ALIASES:
        raise ValueError(f"split={split!r} is not allowed; choose one of {sorted(SPLIT_ALIASES)}")
    return SPLIT_ALIASES[split]


def _read_image(path: Path, channels: int, size: Optional[int]) -> np.ndarray:
    from PIL import Image

    img = Image.open(path).convert("L" if channels == 1 else "RGB")
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    a = np.asarray(img, dtype=np.uint8)
    return a[None] if channels == 1 else a.transpose(2, 0, 1)


def omniglot_pool(root: str, split: str, size: int = 28) -> ClassPool:
    """Omniglot from its standard folders (``images_background`` / ``images_evaluation``, alphabet/character/png).
    Images are inverted (white strokes on black, like the glyph set) and resized to ``size``.

    Raises:
        FileNotFoundError: the split's folder is missing (names the path).
    """
    split = _split(split)
    sub = Path(root) / ("images_evaluation" if split == "evaluation" else "images_background")
    if not sub.is_dir():
        raise FileNotFoundError(f"Omniglot folder {str(sub)!r} not found (expected ROOT/images_background and "
                                "ROOT/images_evaluation with ALPHABET/characterNN/*.png)")
    alphabets = sorted(p for p in sub.iterdir() if p.is_dir())
    if split != "evaluation":
        cut = max(1, int(round(len(alphabets) * 0.8))) if len(alphabets) > 1 else 1
        alphabets = alphabets[:cut] if split == "background" else alphabets[cut:]
    imgs, labels, names = [], [], []
    for a in alphabets:
        for ch in sorted(p for p in a.iterdir() if p.is_dir()):
            files = sorted(ch.glob("*.png"))
            if not files:
                continue
            for f in files:
                imgs.append(255 - _read_image(f, 1, size))
                labels.append(len(names))
            names.append(f"{a.name}/{ch.name}")
    if not names:
        raise FileNotFoundError(f"no character folders with .png images under {str(sub)!r} for split {split!r}")
    return ClassPool(torch.from_numpy(np.stack(imgs)), torch.tensor(labels), names)


_PICKLES = {
    "cifarfs": {"background": "CIFAR_FS_train.pickle", "validation": "CIFAR_FS_val.pickle",
                "evaluation": "CIFAR_FS_test.pickle"},
    "miniimagenet": {"background": "miniImageNet_category_split_train_phase_train.pickle",
                     "validation": "miniImageNet_category_split_val.pickle",
                     "evaluation": "miniImageNet_category_split_test.pickle"},
}


def pickle_pool(root: str, dataset: str, split: str) -> ClassPool:
    """CIFAR-FS / mini-ImageNet from the MetaOptNet pickles in ``root`` (``data`` uint8 ``[M, H, W, 3]``,
    ``labels`` any class ids, renumbered in sorted order), or mini-ImageNet from the csv layout.

    Raises:
        FileNotFoundError: neither layout found (names the files looked for).
        ValueError: unknown dataset, or a pickle without ``data``/``labels``.
    """
    if dataset not in _PICKLES:
        raise ValueError(f"dataset={dataset!r}: pickle readers exist for {sorted(_PICKLES)}")
    split = _split(split)
    path = Path(root) / _PICKLES[dataset][split]
    if path.exists():
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="latin1")
        if not isinstance(d, dict) or "data" not in d or "labels" not in d:
            raise ValueError(f"{str(path)!r} must hold a dict with 'data' and 'labels'")
        data, lab = np.asarray(d["data"], dtype=np.uint8), np.asarray(d["labels"])
        classes = sorted(set(lab.tolist()))
        remap = {c: i for i, c in enumerate(classes)}
        return ClassPool(torch.from_numpy(data.transpose(0, 3, 1, 2).copy()),
                         torch.tensor([remap[v] for v in lab.tolist()]), [str(c) for c in classes])
    csv_path = Path(root) / f"{ {'background': 'train', 'validation': 'val', 'evaluation': 'test'}[split] }.csv"
    if dataset == "miniimagenet" and csv_path.exists():
        with open(csv_path, newline="") as f:
            rows = [r for r in csv.reader(f)]
        rows = rows[1:] if rows and rows[0][:2] == ["filename", "label"] else rows
        classes = sorted({r[1] for r in rows})
        remap = {c: i for i, c in enumerate(classes)}
        imgs = [_read_image(Path(root) / "images" / r[0], 3, 84) for r in rows]
        return ClassPool(torch.from_numpy(np.stack(imgs)), torch.tensor([remap[r[1]] for r in rows]), classes)
    raise FileNotFoundError(f"{dataset} split {split!r}: neither {str(path)!r}"
                            + (f" nor {str(csv_path)!r} (+ images/)" if dataset == "miniimagenet" else "")
                            + " found")


def load_pool(dataset: str, split: str, data_dir: str = "") -> ClassPool:
    """The pool of ``dataset`` (glyphs, fmnist, omniglot, cifarfs, miniimagenet) and ``split``.

    Raises:
        ValueError: unknown dataset or split; FileNotFoundError: data missing (says how to get it).
    """
    if dataset == "glyphs":
        return glyph_pool(split, data_dir or "data/glyphs")
    if dataset == "fmnist":
        return fmnist_pool(split, data_dir or None)
    if dataset == "omniglot":
        return omniglot_pool(_need(data_dir, dataset), split)
    if dataset in _PICKLES:
        return pickle_pool(_need(data_dir, dataset), dataset, split)
    raise ValueError(f"dataset={dataset!r} is not one of glyphs, fmnist, omniglot, cifarfs, miniimagenet")


def _need(data_dir: str, dataset: str) -> str:
    if not data_dir:
        raise ValueError(f"dataset={dataset!r} needs -o data_dir=DIR (its standard on-disk layout)")
    return data_dir
