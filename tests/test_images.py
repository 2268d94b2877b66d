"""Image readers: idx(.gz) (Fashion-MNIST/MNIST) and CIFAR-10 binary."""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np
import pytest
import torch

from fedaqt.data.images import load_cifar10, load_fashion_mnist, read_cifar10_batch, read_idx

FMNIST_ROOT = "/usr/share/datasets/fashion-mnist"


def _write_idx(path, array: np.ndarray, type_code: int = 0x08, compress: bool = True, magic: bytes | None = None):
    header = magic if magic is not None else bytes([0, 0, type_code, array.ndim])
    header += b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    if compress:
        with gzip.open(path, "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)


def _tiny_fmnist(root, n=5, split="train"):
    prefix = "train" if split == "train" else "t10k"
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
    _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return images, labels


def test_idx_reader_on_generated_files(tmp_path):
    images, labels = _tiny_fmnist(tmp_path, n=5)
    x, y = load_fashion_mnist(tmp_path, "train")
    assert x.shape == (5, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (5,) and y.dtype == torch.int64
    assert torch.equal(x[:, 0], torch.from_numpy(images).float() / 255)
    assert y.tolist() == labels.tolist()
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    raw, _ = load_fashion_mnist(tmp_path, "train", normalize=False)
    assert raw.dtype == torch.uint8 and torch.equal(raw[:, 0], torch.from_numpy(images))
    # uncompressed files and other element types
    arr = np.arange(12, dtype=np.int32).reshape(3, 4) - 5
    _write_idx(tmp_path / "ints.idx", arr, type_code=0x0C, compress=False)
    assert np.array_equal(read_idx(tmp_path / "ints.idx"), arr)


def test_idx_bad_magic_and_size(tmp_path):
    images = np.zeros((2, 28, 28), np.uint8)
    _write_idx(tmp_path / "bad.gz", images, magic=b"\x01\x02\x08\x03")
    with pytest.raises(ValueError, match="bad idx magic 0x01020803"):
        read_idx(tmp_path / "bad.gz")
    _write_idx(tmp_path / "lab.gz", np.zeros(3, np.uint8))
    with pytest.raises(ValueError, match="expected 0x00000803"):
        read_idx(tmp_path / "lab.gz", expected_magic=0x00000803)
    good = tmp_path / "trunc.idx"
    _write_idx(good, images, compress=False)
    good.write_bytes(good.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"header says shape \[2, 28, 28\]"):
        read_idx(good)
    # label/image count mismatch
    _tiny_fmnist(tmp_path, n=4, split="test")
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(3, np.uint8))
    with pytest.raises(ValueError, match="4 images but"):
        load_fashion_mnist(tmp_path, "test")


def test_missing_files_and_bad_split(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path, "train")
    with pytest.raises(ValueError, match="split='val'"):
        load_fashion_mnist(tmp_path, "val")


@pytest.mark.skipif(not os.path.exists(os.path.join(FMNIST_ROOT, "t10k-images-idx3-ubyte.gz")),
                    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist():
    x, y = load_fashion_mnist(FMNIST_ROOT, "test")
    assert x.shape == (10000, 1, 28, 28) and y.shape == (10000,)
    assert torch.bincount(y).tolist() == [1000] * 10
    assert float(x.max()) == 1.0 and float(x.min()) == 0.0
    xt, yt = load_fashion_mnist(FMNIST_ROOT, "train", normalize=False)
    assert xt.shape == (60000, 1, 28, 28) and xt.dtype == torch.uint8
    assert torch.bincount(yt).tolist() == [6000] * 10


def _write_cifar(path, labels, seed=0):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
    rec = np.concatenate([np.asarray(labels, np.uint8)[:, None], pixels], axis=1)
    path.write_bytes(rec.tobytes())
    return pixels.reshape(-1, 3, 32, 32)


def test_cifar10_binary_reader(tmp_path):
    root = tmp_path / "cifar-10-batches-bin"
    root.mkdir()
    expected = [_write_cifar(root / f"data_batch_{i}.bin", [i, 9, 0], seed=i) for i in range(1, 6)]
    test_pix = _write_cifar(root / "test_batch.bin", [3, 4])
    x, y = load_cifar10(tmp_path, "train")
    assert x.shape == (15, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert y.tolist() == [1, 9, 0, 2, 9, 0, 3, 9, 0, 4, 9, 0, 5, 9, 0]
    assert torch.equal((x * 255).round().to(torch.uint8), torch.from_numpy(np.concatenate(expected)))
    xt, yt = load_cifar10(root, "test", normalize=False)  # the batches directory itself also works
    assert yt.tolist() == [3, 4] and torch.equal(xt, torch.from_numpy(test_pix))
    # channel layout: first 1024 bytes are red
    pix, _ = read_cifar10_batch(root / "test_batch.bin")
    assert pix[0, 0, 0, 1] == test_pix[0, 0, 0, 1]


def test_cifar10_errors(tmp_path):
    bad = tmp_path / "test_batch.bin"
    bad.write_bytes(b"\x00" * 3000)
    with pytest.raises(ValueError, match="not a positive multiple of the 3073-byte"):
        read_cifar10_batch(bad)
    _write_cifar(bad, [12])
    with pytest.raises(ValueError, match="label 12"):
        read_cifar10_batch(bad)
    with pytest.raises(FileNotFoundError, match="data_batch_1.bin"):
        load_cifar10(tmp_path, "train")
