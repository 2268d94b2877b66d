"""Readers for the image datasets users bring or install: Fashion-MNIST/MNIST idx(.gz) and CIFAR-10 binary.

* idx (LeCun's MNIST format, also used by Fashion-MNIST): a 4-byte big-endian magic ``0x00 0x00 TYPE NDIM``,
  then ``NDIM`` big-endian uint32 dimensions, then the data in C order. Images are ``0x00000803`` (ubyte, 3 dims),
  labels ``0x00000801`` (ubyte, 1 dim). Files may be gzip-compressed (``.gz``) or raw.
* CIFAR-10 binary (``cifar-10-batches-bin/``): ``data_batch_{1..5}.bin`` and ``test_batch.bin``, each a
  sequence of 3073-byte records: one label byte (0..9), then 3072 pixel bytes (1024 red, 1024 green, 1024 blue,
  each a 32x32 image in row-major order).

Fashion-MNIST is installed offline by the Debian package ``dataset-fashion-mnist`` into
``/usr/share/datasets/fashion-mnist`` (see shared DATA.md). All readers validate magic numbers and sizes and raise
``ValueError`` naming the file and what was expected.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
_INSTALL_HINT = "apt-get install dataset-fashion-mnist"

# idx type code -> numpy big-endian dtype
_IDX_TYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
IDX_IMAGES_MAGIC = 0x00000803
IDX_LABELS_MAGIC = 0x00000801

CIFAR10_RECORD_BYTES = 1 + 3 * 32 * 32
CIFAR10_DIR = "cifar-10-batches-bin"


def _open(path: Path):
    with open(path, "rb") as fh:
        head = fh.read(2)
    return gzip.open(path, "rb") if head == b"\x1f\x8b" else open(path, "rb")


def read_idx(path: str | os.PathLike, expected_magic: int | None = None) -> np.ndarray:
    """Read one idx file (raw or gzip) into a numpy array of its stored shape and dtype.

    Args:
        path: the ``.idx*-ubyte`` or ``.idx*-ubyte.gz`` file.
        expected_magic: if given, the whole 32-bit magic number the file must have (e.g. ``0x00000803`` for
            image files, ``0x00000801`` for label files).

    Returns:
        np.ndarray with the dimensions from the header (e.g. uint8 ``[N, 28, 28]`` for images, ``[N]`` labels).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: bad magic (first two bytes not zero, unknown type code, or not ``expected_magic``), or the
            payload size does not match the header's dimensions (truncated or trailing data).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"idx file {str(p)!r} does not exist")
    with _open(p) as fh:
        raw = fh.read()
    if len(raw) < 4:
        raise ValueError(f"{str(p)!r} is not an idx file: only {len(raw)} bytes")
    magic = int.from_bytes(raw[:4], "big")
    zero, type_code, ndim = raw[0:2], raw[2], raw[3]
    if zero != b"\x00\x00" or type_code not in _IDX_TYPES or ndim == 0:
        raise ValueError(
            f"{str(p)!r} has bad idx magic 0x{magic:08X}; expected 0x0000TTDD with type TT in "
            f"{{{', '.join(f'0x{t:02X}' for t in _IDX_TYPES)}}} and DD>=1 dimensions"
        )
    if expected_magic is not None and magic != expected_magic:
        raise ValueError(f"{str(p)!r} has idx magic 0x{magic:08X}; expected 0x{expected_magic:08X}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{str(p)!r}: header truncated ({len(raw)} bytes, need {header} for {ndim} dimensions)")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    dtype = _IDX_TYPES[type_code]
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{str(p)!r}: header says shape {dims} ({expected} data bytes) but the file holds {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _find(root: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (root / name).exists():
            return root / name
    return None


def load_fashion_mnist(
    root: str | os.PathLike = FASHION_MNIST_ROOT, split: str = "train", normalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load Fashion-MNIST (or MNIST: same file names and layout) from idx files.

    Looks for ``{train,t10k}-images-idx3-ubyte[.gz]`` and ``{train,t10k}-labels-idx1-ubyte[.gz]`` in ``root``.

    Args:
        root: directory with the four idx files.
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000 images; files prefixed ``t10k``).
        normalize: True gives float32 in [0, 1] (pixel/255); False gives the raw uint8 pixels.

    Returns:
        (images, labels): images float32 ``[N, 1, 28, 28]`` in [0, 1] (uint8 if ``normalize=False``),
        labels int64 ``[N]`` with values 0..9.

    Raises:
        ValueError: ``split`` not in {"train", "test"}; bad magic/size; image and label counts differ.
        FileNotFoundError: a file is missing; the message says to ``apt-get install dataset-fashion-mnist``.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r} is not allowed; choose 'train' or 'test'")
    prefix = "train" if split == "train" else "t10k"
    r = Path(root)
    img_path = _find(r, f"{prefix}-images-idx3-ubyte")
    lab_path = _find(r, f"{prefix}-labels-idx1-ubyte")
    if img_path is None or lab_path is None:
        missing = [n for n, pth in ((f"{prefix}-images-idx3-ubyte.gz", img_path), (f"{prefix}-labels-idx1-ubyte.gz", lab_path)) if pth is None]
        raise FileNotFoundError(
            f"Fashion-MNIST {split} split not found in {str(r)!r} (missing {', '.join(missing)}); "
            f"install it with `{_INSTALL_HINT}` (files go to {FASHION_MNIST_ROOT}) or pass the directory "
            "that holds your own idx files"
        )
    images = read_idx(img_path, IDX_IMAGES_MAGIC)
    labels = read_idx(lab_path, IDX_LABELS_MAGIC)
    if images.ndim != 3:
        raise ValueError(f"{str(img_path)!r}: expected 3 dimensions [N, H, W], got shape {list(images.shape)}")
    if labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"{str(img_path)!r} holds {images.shape[0]} images but {str(lab_path)!r} holds {labels.shape[0]} labels"
        )
    x = torch.from_numpy(images.copy()).unsqueeze(1)
    if normalize:
        x = x.to(torch.float32).div_(255.0)
    return x, torch.from_numpy(labels.astype(np.int64))


load_mnist = load_fashion_mnist  # MNIST uses the same idx file names and layout.


def read_cifar10_batch(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 binary batch file.

    Returns:
        (pixels uint8 ``[N, 3, 32, 32]``, labels int64 ``[N]``).

    Raises:
        FileNotFoundError: missing file.
        ValueError: the size is not a positive multiple of 3073 bytes, or a label byte is > 9.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"CIFAR-10 batch {str(p)!r} does not exist")
    raw = np.fromfile(p, dtype=np.uint8)
    if raw.size == 0 or raw.size % CIFAR10_RECORD_BYTES:
        raise ValueError(
            f"{str(p)!r} has {raw.size} bytes, not a positive multiple of the {CIFAR10_RECORD_BYTES}-byte CIFAR-10 "
            "record (1 label byte + 3072 pixel bytes); is this the binary version (cifar-10-binary.tar.gz)?"
        )
    rec = raw.reshape(-1, CIFAR10_RECORD_BYTES)
    labels = rec[:, 0].astype(np.int64)
    if labels.max() > 9:
        bad = int(np.argmax(labels > 9))
        raise ValueError(f"{str(p)!r}: record {bad} has label {int(labels[bad])}; CIFAR-10 labels are 0..9")
    return rec[:, 1:].reshape(-1, 3, 32, 32), labels


def load_cifar10(
    root: str | os.PathLike, split: str = "train", normalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load CIFAR-10 from the standard binary layout.

    Args:
        root: either the ``cifar-10-batches-bin`` directory itself or a directory containing it.
        split: ``"train"`` (``data_batch_1..5.bin``, 50,000 images) or ``"test"`` (``test_batch.bin``).
        normalize: True gives float32 in [0, 1]; False gives uint8.

    Returns:
        (images float32 ``[N, 3, 32, 32]`` in [0, 1] (uint8 if not normalized), labels int64 ``[N]``).

    Raises:
        ValueError: bad split, bad file size or label.
        FileNotFoundError: a batch file is missing (the message lists the expected names).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r} is not allowed; choose 'train' or 'test'")
    r = Path(root)
    if (r / CIFAR10_DIR).is_dir():
        r = r / CIFAR10_DIR
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] if split == "train" else ["test_batch.bin"]
    missing = [n for n in names if not (r / n).exists()]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10 {split} split not found in {str(r)!r}: missing {', '.join(missing)}; expected the binary "
            f"layout {CIFAR10_DIR}/{{data_batch_1..5.bin, test_batch.bin}}"
        )
    xs, ys = zip(*(read_cifar10_batch(r / n) for n in names))
    x = torch.from_numpy(np.concatenate(xs))
    if normalize:
        x = x.to(torch.float32).div_(255.0)
    return x, torch.from_numpy(np.concatenate(ys))
