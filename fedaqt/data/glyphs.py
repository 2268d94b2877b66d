"""An Omniglot-like many-class few-shot set rendered from the Debian ``fonts-noto-core`` fonts (spec §5, DATA.md).

One class per character (a Unicode letter code point), classes grouped by script (the "alphabets", from the first
word of the character's Unicode name: LATIN, GREEK, CYRILLIC, ARMENIAN, ...). Instances: the character drawn by the
different font files that cover it (Pillow), each followed by a random affine (rotation, scale, shear, translation)
and a smooth elastic displacement, then resized to 28x28 grayscale (white glyph on black, like inverted Omniglot).
Splits are class-disjoint *by script*: every script goes whole to ``background`` (meta-training), ``validation`` or
``evaluation``. Everything is a deterministic function of the arguments (``seed``).

Output (``build_glyphs(out)``): ``OUT/glyphs.npz`` (``images`` uint8 ``[N, 28, 28]``, ``labels`` int64 ``[N]``
class ids, ``class_char`` int64 code points, ``class_script`` int64 script ids, ``class_split`` int64 0/1/2,
``scripts`` str) and ``OUT/manifest.json`` (counts per split, scripts per split, fonts, settings).

We render ourselves (Pillow + fontTools cmap look-up) because no package ships a printed many-class set.
"""

from __future__ import annotations

import json
import time
import unicodedata
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

NOTO_DIR = "/usr/share/fonts/truetype/noto"
SPLITS = ("background", "validation", "evaluation")
_INSTALL_HINT = "apt-get install -y fonts-noto-core"
_CANVAS = 64  # render side before distortion and resize


def _letter_scripts(min_fonts_by_char: dict[int, list[int]]) -> dict[str, list[int]]:
    by_script: dict[str, list[int]] = {}
    for cp in sorted(min_fonts_by_char):
        name = unicodedata.name(chr(cp), "")
        if not name:
            continue
        by_script.setdefault(name.split(" ")[0], []).append(cp)
    return by_script


def _font_files(font_dir: str) -> list[Path]:
    files = sorted(p for p in Path(font_dir).glob("*.ttf") if not any(s in p.name for s in ("Music", "Symbols",
                                                                                              "Math", "Emoji")))
    if not files:
        raise FileNotFoundError(f"no .ttf fonts in {font_dir!r}; install them with `{_INSTALL_HINT}`")
    return files


def _coverage(files: list[Path]) -> dict[int, list[int]]:
    """code point -> indices of the font files whose cmap has it (letters only: Unicode category L*)."""
    from fontTools.ttLib import TTFont

    cov: dict[int, list[int]] = {}
    for i, f in enumerate(files):
        try:
            cmap = TTFont(str(f), lazy=True, fontNumber=0).getBestCmap() or {}
        except Exception:  # a font fontTools cannot read is skipped, not fatal
            continue
        for cp in cmap:
            if cp > 0x20 and unicodedata.category(chr(cp)) in ("Lu", "Ll", "Lo"):
                cov.setdefault(cp, []).append(i)
    return cov


def _render(ch: str, font: Any) -> Optional[np.ndarray]:
    """The glyph centred on a ``_CANVAS`` square (float32 [0, 1]); None when the font draws nothing."""
    from PIL import Image, ImageDraw

    img = Image.new("L", (_CANVAS * 2, _CANVAS * 2), 0)
    d = ImageDraw.Draw(img)
    d.text((_CANVAS, _CANVAS), ch, fill=255, font=font, anchor="mm")
    a = np.asarray(img, dtype=np.float32) / 255.0
    ys, xs = np.nonzero(a > 0.1)
    if len(ys) < 4:
        return None
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    crop = a[y0:y1, x0:x1]
    side = int(max(crop.shape) * 1.25) + 2
    sq = np.zeros((side, side), np.float32)
    oy, ox = (side - crop.shape[0]) // 2, (side - crop.shape[1]) // 2
    sq[oy : oy + crop.shape[0], ox : ox + crop.shape[1]] = crop
    t = torch.from_numpy(sq)[None, None]
    return F.interpolate(t, size=(_CANVAS, _CANVAS), mode="area")[0, 0].numpy()


def distort(x: torch.Tensor, generator: torch.Generator, size: int = 28, rotate_deg: float = 12.0,
            scale: tuple[float, float] = (0.85, 1.1), shear: float = 0.15, shift: float = 0.08,
            elastic: float = 0.04) -> torch.Tensor:
    """Random affine + smooth elastic distortion of a batch of glyphs, resized to ``size``.

    Args:
        x: float32 ``[B, 1, S, S]`` in [0, 1].
        generator: CPU generator (the only randomness).
        rotate_deg, scale, shear, shift: affine ranges (degrees; scale factor range; shear and shift as fractions
            of the half-side).
        elastic: amplitude of the displacement field (fraction of the half-side), smoothed by a 9x9 average.

    Returns:
        float32 ``[B, 1, size, size]`` in [0, 1].
    """
    b = x.shape[0]
    u = lambda *s: torch.rand(*s, generator=generator)  # noqa: E731
    ang = (u(b) * 2 - 1) * rotate_deg * np.pi / 180
    sc = scale[0] + u(b) * (scale[1] - scale[0])
    sh = (u(b) * 2 - 1) * shear
    tx, ty = (u(b) * 2 - 1) * shift, (u(b) * 2 - 1) * shift
    cos, sin = torch.cos(ang) / sc, torch.sin(ang) / sc
    theta = torch.stack([torch.stack([cos, -sin + sh, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    s = x.shape[-1]
    field = torch.randn(b, 2, s // 4, s // 4, generator=generator)
    field = F.interpolate(field, size=(s, s), mode="bilinear", align_corners=False)
    field = F.avg_pool2d(field, 9, stride=1, padding=4)
    field = field / field.flatten(1).abs().amax(1).clamp_min(1e-6).view(b, 1, 1, 1) * elastic
    grid = grid + field.permute(0, 2, 3, 1)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return F.interpolate(out, size=(size, size), mode="area").clamp_(0, 1)


def build_glyphs(out: str | Path, font_dir: str = NOTO_DIR, instances: int = 20, max_classes_per_script: int = 40,
                 min_classes_per_script: int = 10, min_fonts: int = 2, fonts_per_class: int = 6, split_fractions: tuple[float, float] = (0.6, 0.15),
                 seed: int = 0, progress: Optional[Callable[[int, int], None]] = None) -> dict[str, Any]:
    """Render the glyph set into ``out`` (see the module docstring) and return the manifest.

    Args:
        out: output directory (created).
        font_dir: directory of ``.ttf`` fonts (Debian ``fonts-noto-core``).
        instances: images per class (font x distortion; fonts are cycled).
        max_classes_per_script: at most this many characters per script (a seeded choice).
        min_classes_per_script: scripts with fewer eligible characters are dropped.
        min_fonts: a character needs at least this many covering font files.
        fonts_per_class: render each character with at most this many of its fonts (a seeded choice).
        split_fractions: fractions of scripts for background and validation; the rest is evaluation.
        seed: everything random (class choice, script split, distortions) derives from it.
        progress: ``progress(done_classes, total_classes)``.

    Raises:
        FileNotFoundError: no fonts (says ``apt-get install -y fonts-noto-core``).
        ValueError: a bad count or fraction (named), or too few scripts for three splits.
    """
    for k, v in (("instances", instances), ("max_classes_per_script", max_classes_per_script),
                 ("min_classes_per_script", min_classes_per_script), ("min_fonts", min_fonts), ("fonts_per_class", fonts_per_class)):
        if int(v) < 1:
            raise ValueError(f"{k}={v} must be >= 1")
    fb, fv = split_fractions
    if not (0 < fb < 1 and 0 < fv < 1 and fb + fv < 1):
        raise ValueError(f"split_fractions={split_fractions} must be two fractions in (0, 1) with sum < 1")
    from PIL import ImageFont

    t0 = time.time()
    files = _font_files(font_dir)
    t_cov = time.time()
    cov = {cp: fs for cp, fs in _coverage(files).items() if len(fs) >= min_fonts}
    t_cov = time.time() - t_cov
    by_script = {s: cps for s, cps in _letter_scripts(cov).items() if len(cps) >= min_classes_per_script}
    scripts = sorted(by_script)
    if len(scripts) < 3:
        raise ValueError(f"only {len(scripts)} scripts with >= {min_classes_per_script} characters in {font_dir!r}")
    rng = np.random.default_rng([seed, 0x676C])
    chosen: list[tuple[int, int]] = []  # (script id, code point)
    for si, s in enumerate(scripts):
        cps = by_script[s]
        pick = sorted(rng.choice(len(cps), size=min(len(cps), max_classes_per_script), replace=False))
        chosen += [(si, cps[i]) for i in pick]
    order = rng.permutation(len(scripts))
    nb, nv = max(1, round(fb * len(scripts))), max(1, round(fv * len(scripts)))
    script_split = np.empty(len(scripts), np.int64)
    script_split[order[:nb]], script_split[order[nb : nb + nv]], script_split[order[nb + nv :]] = 0, 1, 2
    fonts: dict[int, Any] = {}
    gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    srcs: list[np.ndarray] = []
    labels, class_char, class_script = [], [], []
    for ci, (si, cp) in enumerate(chosen):
        base = []
        fis = cov[cp]
        if len(fis) > fonts_per_class:  # a seeded subset: Latin letters are covered by ~100 font files
            fis = [fis[i] for i in sorted(rng.choice(len(fis), size=fonts_per_class, replace=False))]
        for fi in fis:
            if fi not in fonts:
                fonts[fi] = ImageFont.truetype(str(files[fi]), 40)
            g = _render(chr(cp), fonts[fi])
            if g is not None:
                base.append(g)
        if len(base) < min_fonts:
            continue
        cid = len(class_char)
        srcs.extend(base[i % len(base)] for i in range(instances))
        labels.append(np.full(instances, cid, np.int64))
        class_char.append(cp)
        class_script.append(si)
        if progress is not None:
            progress(ci + 1, len(chosen))
    # distort in large chunks: per-call overhead dominated when done per class
    images = []
    for i in range(0, len(srcs), 4096):
        img = distort(torch.from_numpy(np.stack(srcs[i : i + 4096]))[:, None], gen)
        images.append((img[:, 0] * 255).round().to(torch.uint8).numpy())
    class_script_a = np.asarray(class_script, np.int64)
    class_split = script_split[class_script_a]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "glyphs.npz", images=np.concatenate(images), labels=np.concatenate(labels),
                        class_char=np.asarray(class_char, np.int64), class_script=class_script_a,
                        class_split=class_split, scripts=np.asarray(scripts))
    manifest: dict[str, Any] = {
        "format": "fedaqt-glyphs-1", "seed": seed, "instances_per_class": instances, "image_size": 28,
        "font_dir": font_dir, "font_files": len(files), "min_fonts": min_fonts, "fonts_per_class": fonts_per_class,
        "max_classes_per_script": max_classes_per_script, "seconds": round(time.time() - t0, 1),
        "seconds_cmap": round(t_cov, 1),
        "splits": {},
    }
    for k, name in enumerate(SPLITS):
        sc = [scripts[i] for i in range(len(scripts)) if script_split[i] == k and (class_script_a == i).any()]
        n_cls = int((class_split == k).sum())
        manifest["splits"][name] = {"scripts": sc, "num_scripts": len(sc), "num_classes": n_cls,
                                    "num_images": n_cls * instances}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def load_glyphs(root: str | Path, split: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """One split of a built glyph set.

    Returns:
        (images uint8 ``[N, 1, 28, 28]``, labels int64 ``[N]`` renumbered ``0..C-1`` within the split, class names
        ``["SCRIPT U+XXXX", ...]``).

    Raises:
        ValueError: ``split`` not one of background/validation/evaluation.
        FileNotFoundError: ``root/glyphs.npz`` missing (says to run ``fedaqt data glyphs --out ROOT``).
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not allowed; choose one of {SPLITS}")
    path = Path(root) / "glyphs.npz"
    if not path.exists():
        raise FileNotFoundError(f"{str(path)!r} not found; build the glyph set with `fedaqt data glyphs --out {root}`"
                                f" (needs `{_INSTALL_HINT}`)")
    z = np.load(path)
    keep_cls = np.nonzero(z["class_split"] == SPLITS.index(split))[0]
    remap = -np.ones(len(z["class_split"]), np.int64)
    remap[keep_cls] = np.arange(len(keep_cls))
    lab = z["labels"]
    m = remap[lab] >= 0
    names = [f"{z['scripts'][z['class_script'][c]]} U+{int(z['class_char'][c]):04X}" for c in keep_cls]
    return torch.from_numpy(z["images"][m]).unsqueeze(1), torch.from_numpy(remap[lab[m]]), names
