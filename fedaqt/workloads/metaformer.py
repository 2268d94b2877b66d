"""MetaFormer with local self-attention (spec §4) as a federated image-classification workload.

The model is :func:`fedaqt.models.metaformer.build_metaformer` (``-o variant=small`` by default: channels
16/32/64/96, blocks 1/1/2/2, a 7x7 stage 3 for 28x28 inputs, ~0.42 M parameters; ``s12``/``s18``/``s24``/``swins``
are the Table 4.10 configurations). Token mixer per stage with ``-o mixers=CCLL`` (``C`` DW-conv, ``A`` global
MHSA, ``L`` LSA, ``W`` window attention without shift), LSA local length ``-o local_len=M`` (default: the
variant's, small 7, others 49), ``-o swap=true|false``, ``-o bias=true|false``.

Quantized clients (``--bits 8/4``): every ``Conv2d`` and ``Linear`` weight outside the classifier ``head`` (stem,
downsampling convs, DW-conv mixers, MLP 1x1 convs, the LSA/MHSA ``qkv`` and ``proj`` projections) is a native
quantized layer on clients and travels as codes + float32 scales; biases, norms, layer scales, the relative bias
tables and the head stay float (spec §2.1 [CHOICE]).

Data: ``-o dataset=fmnist`` (Fashion-MNIST idx files: ``-o data_dir`` if it holds them, else the Debian package's
``/usr/share/datasets/fashion-mnist``) or ``-o dataset=cifar10 -o data_dir=DIR`` (the standard CIFAR-10 binary
layout, ``DIR`` = ``cifar-10-batches-bin`` or its parent). Images are scaled to [0, 1], normalized by the
dataset's channel mean/std and optionally resized (``-o image_size``, bilinear). The train split is spread over
``config.num_clients`` clients by ``-o partition=iid|dirichlet`` (``--partition``/``--alpha``,
:func:`fedaqt.data.partition.partition_indices`).

Metrics (``rounds.csv``): ``eval_loss`` and ``eval_accuracy`` of the server's float model on a fixed test subset
(``-o eval_size``, default 1000 images); with ``--bits 8/4`` also ``eval_accuracy_client``: the clients' model
(the float model converted to native quantized layers, weights re-quantized with fresh max-abs scales, int8
activations) on the same images. ``-o eval_local_len`` evaluates the LSA mixers at another local length (Table
4.7's test M; 0 = the trained one).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from fedaqt.config import RunConfig
from fedaqt.data.images import FASHION_MNIST_ROOT, load_cifar10, load_fashion_mnist
from fedaqt.data.partition import PartitionOptions, partition_indices
from fedaqt.models.metaformer import MIXERS, VARIANTS, build_metaformer, set_local_length
from fedaqt.workloads.base import Workload

_EVAL_BATCH = 250
#: dataset -> (channels, native side, per-channel mean, per-channel std) of [0, 1] pixels
_DATASETS = {
    "fmnist": (1, 28, (0.2860,), (0.3530,)),
    "cifar10": (3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}


class MetaFormerOptions(PartitionOptions):
    """Options of the metaformer workload (``-o KEY=VALUE``; ``fedaqt plugins show metaformer``)."""

    variant: Literal[tuple(VARIANTS)] = Field(  # type: ignore[valid-type]
        "small", description="architecture: small (28-64 px inputs), s12, s18, s24 or swins (Table 4.10)"
    )
    mixers: str = Field("CCLL", description="token mixer per stage, 4 letters: C dw-conv, A global MHSA, L LSA, "
                                            "W window attention (no shift)")
    # M beyond a stage's token count is global attention but still grows the [2M-1, heads] bias table, so M is
    # bounded by 4096 tokens (a 64x64 stage-3 grid, the largest size bench/lsa.py measures).
    local_len: int = Field(0, ge=0, le=4096,
                           description="LSA local length M (0 = the variant's: small 7, others 49; M >= tokens = global)")
    swap: bool = Field(True, description="alternate row-/column-major flatten between consecutive LSA blocks")
    bias: bool = Field(True, description="LSA 1-D relative position bias table [2M-1, heads]")
    layer_scale: float = Field(0.0, ge=0, description="initial layer scale (0 = the variant's: small 1.0, "
                                                      "others 1e-5)")
    dataset: Literal["fmnist", "cifar10"] = Field("fmnist", description="fmnist (installed) or cifar10 "
                                                                        "(binary layout under data_dir)")
    data_dir: str = Field("", description="dataset directory (--data-dir): Fashion-MNIST idx files or "
                                          "cifar-10-batches-bin (or its parent)")
    image_size: int = Field(0, ge=0, le=512, description="resize images to this side (0 = native: 28 or 32)")
    train_size: int = Field(0, ge=0, description="use only this many training images (0 = all)")
    eval_size: int = Field(1000, ge=1, description="test images used by evaluate (a fixed subset of the test split)")
    eval_client: bool = Field(True, description="with --bits 8/4 also score the clients' quantized model")
    eval_local_len: int = Field(0, ge=0, le=4096, description="evaluate LSA at this local length (0 = the trained one)")

    @field_validator("mixers")
    @classmethod
    def _mixers(cls, v: str) -> str:
        v = v.upper()
        if len(v) != 4 or any(c not in MIXERS for c in v):
            raise ValueError(f"mixers={v!r} must be 4 letters from {''.join(MIXERS)}, one per stage (e.g. CCLL)")
        return v


class MetaFormerWorkload(Workload):
    """MetaFormer + LSA image classification (spec §4); see the module docstring."""

    name = "metaformer"
    description = "MetaFormer with local self-attention (spec §4): federated Fashion-MNIST / CIFAR-10 classification"
    Options = MetaFormerOptions

    def __init__(self, config: RunConfig) -> None:
        super().__init__(config)
        o = self.options
        self.in_channels, self.native_size, mean, std = _DATASETS[o.dataset]
        self.image_size = o.image_size or self.native_size
        self._mean = torch.tensor(mean).view(1, -1, 1, 1)
        self._std = torch.tensor(std).view(1, -1, 1, 1)
        self.eval_columns = ("eval_accuracy", "eval_loss") + (("eval_accuracy_client",) if config.bits < 16 else ())
        self._train: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self._partitions: Optional[list[np.ndarray]] = None
        self._eval: Optional[list[tuple[torch.Tensor, torch.Tensor]]] = None

    # ------------------------------------------------------------------ data
    def data_root(self) -> Path:
        """Fashion-MNIST: ``data_dir`` if it holds the idx files, else the Debian location. CIFAR-10: ``data_dir``.

        Raises:
            ValueError: dataset=cifar10 without ``data_dir``.
        """
        o = self.options
        if o.dataset == "cifar10":
            if not o.data_dir:
                raise ValueError("dataset='cifar10' needs -o data_dir=DIR (the cifar-10-batches-bin directory or its "
                                 "parent, standard binary layout)")
            return Path(o.data_dir)
        d = Path(o.data_dir) if o.data_dir else None
        if d is not None and any((d / f"train-images-idx3-ubyte{s}").exists() for s in ("", ".gz")):
            return d
        return Path(FASHION_MNIST_ROOT)

    def _load(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if self.options.dataset == "cifar10":
            return load_cifar10(self.data_root(), split, normalize=False)
        return load_fashion_mnist(self.data_root(), split, normalize=False)

    def _train_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images ``[N, C, S, S]`` and int64 labels of the (optionally truncated) train split."""
        if self._train is None:
            x, y = self._load("train")
            n = self.options.train_size
            if n:
                keep = np.sort(np.random.default_rng([self.config.seed, 1]).permutation(len(y))[:n])
                x, y = x[keep], y[keep]
            self._train = (x, y)
        return self._train

    def to_input(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, C, S, S]`` -> normalized float32 ``[B, C, image_size, image_size]``."""
        x = x.to(torch.float32).div_(255.0)
        x = (x - self._mean) / self._std
        if x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return x

    def partitions(self) -> list[np.ndarray]:
        """Index arrays (into the train split) of every client; deterministic from the config."""
        if self._partitions is None:
            _, y = self._train_data()
            self._partitions = partition_indices(self.options, y, self.config.num_clients, self.config.seed)
        return self._partitions

    def eval_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The fixed test subset (``eval_size`` images chosen by the seed) as float batches of 250."""
        if self._eval is None:
            x, y = self._load("test")
            n = min(self.options.eval_size, len(y))
            idx = np.sort(np.random.default_rng([self.config.seed, 3]).permutation(len(y))[:n])
            x, y = self.to_input(x[idx]), y[idx]
            self._eval = [(x[i : i + _EVAL_BATCH], y[i : i + _EVAL_BATCH]) for i in range(0, len(y), _EVAL_BATCH)]
        return self._eval

    # ------------------------------------------------------------------ server side
    def prepare(self) -> None:
        """Check the dataset files and the partition settings.

        Raises:
            FileNotFoundError: dataset files missing (the message says how to install / where they are expected).
            ValueError: cifar10 without data_dir, more clients than images, bad alpha.
        """
        self._load("test")
        self.partitions()

    def new_model(self) -> nn.Module:
        """An untrained MetaFormer for this config (current torch RNG)."""
        o = self.options
        over: dict[str, Any] = {"mixers": o.mixers, "swap": o.swap, "bias": o.bias}
        if o.local_len:
            over["local_len"] = o.local_len
        over["layer_scale"] = o.layer_scale or (1.0 if o.variant == "small" else VARIANTS[o.variant].layer_scale)
        return build_metaformer(o.variant, in_channels=self.in_channels, num_classes=10, **over)

    def build_model(self) -> nn.Module:
        """The float model, initialized under ``torch.manual_seed(config.seed)`` (global RNG state restored).

        Raises:
            ValueError: a bad architecture setting (e.g. attention in a stage whose channels are not a multiple
                of 32), naming it.
        """
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            model = self.new_model()
        model.train()
        return model

    def quantize_filter(self, name: str, module: nn.Module) -> bool:
        """Conv2d / Linear layers outside the classifier head."""
        return isinstance(module, (nn.Conv2d, nn.Linear)) and not (name == "head" or name.startswith("head."))

    @torch.no_grad()
    def score(self, model: nn.Module) -> dict[str, float]:
        """Mean CE loss and accuracy of ``model`` (eval mode, restored after) on :meth:`eval_batches`."""
        was = model.training
        model.eval()
        if self.options.eval_local_len:
            set_local_length(model, self.options.eval_local_len)
        loss = correct = n = 0.0
        try:
            for x, y in self.eval_batches():
                logits = model(x)
                loss += float(F.cross_entropy(logits, y, reduction="sum"))
                correct += float((logits.argmax(1) == y).sum())
                n += len(y)
        finally:
            if self.options.eval_local_len:
                set_local_length(model, self.options.local_len or VARIANTS[self.options.variant].local_len)
            model.train(was)
        return {"eval_loss": loss / n, "eval_accuracy": correct / n}

    def client_format_model(self, model: nn.Module) -> nn.Module:
        """A copy of ``model`` converted to the clients' native quantized layers (``config.bits``, fresh max-abs
        scales, as a broadcast re-quantizes)."""
        from fedaqt.quant.convert import convert_to_quantized

        q = convert_to_quantized(copy.deepcopy(model), self.config.bits, self.config.granularity,
                                 self.quantize_filter)
        return q

    def evaluate(self, model: nn.Module, round_num: int) -> dict[str, float]:
        """``eval_loss`` / ``eval_accuracy`` of the float model; ``eval_accuracy_client`` (``--bits 8/4``) of
        :meth:`client_format_model`. Fractions in [0, 1], loss in nats."""
        out = self.score(model)
        if self.config.bits < 16 and self.options.eval_client:
            out["eval_accuracy_client"] = self.score(self.client_format_model(model))["eval_accuracy"]
        return out

    # ------------------------------------------------------------------ client side
    def num_partitions(self) -> int:
        return self.config.num_clients

    def _check_client(self, client_id: int) -> None:
        if not 0 <= client_id < self.config.num_clients:
            raise ValueError(f"client_id={client_id} is out of range 0..{self.config.num_clients - 1}")

    def client_batches(self, client_id: int, round_num: int, num_batches: int, batch_size: int) -> list[Any]:
        """``num_batches`` batches ``(x float32 [B, C, S, S], y int64 [B])`` drawn without replacement (cycling
        when the partition is smaller) from client ``client_id``'s partition, deterministic in (seed, client,
        round).

        Raises:
            ValueError: ``client_id`` out of range or non-positive counts.
        """
        self._check_client(client_id)
        if num_batches < 1 or batch_size < 1:
            raise ValueError(f"num_batches={num_batches} and batch_size={batch_size} must be >= 1")
        x, y = self._train_data()
        part = self.partitions()[client_id]
        rng = np.random.default_rng([self.config.seed, client_id, round_num])
        need = num_batches * batch_size
        order = np.concatenate([rng.permutation(part) for _ in range(-(-need // len(part)))])[:need]
        idx = torch.from_numpy(order)
        xb, yb = self.to_input(x[idx]), y[idx]
        return [(xb[i * batch_size : (i + 1) * batch_size], yb[i * batch_size : (i + 1) * batch_size])
                for i in range(num_batches)]

    def partition_size(self, client_id: int) -> int:
        self._check_client(client_id)
        return int(len(self.partitions()[client_id]))

    def client_epoch_batches(self, client_id: int, round_num: int, epoch: int, batch_size: int) -> list[Any]:
        """One pass over the partition (every image once, permuted by seed/client/round/epoch), batches of
        ``batch_size`` (the last may be smaller).

        Raises:
            ValueError: ``client_id`` out of range or ``batch_size < 1``.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self._check_client(client_id)
        x, y = self._train_data()
        part = np.asarray(self.partitions()[client_id])
        order = np.random.default_rng([self.config.seed, client_id, round_num, epoch, 0x4D46]).permutation(part)
        idx = torch.from_numpy(order)
        xb, yb = self.to_input(x[idx]), y[idx]
        return [(xb[i : i + batch_size], yb[i : i + batch_size]) for i in range(0, len(order), batch_size)]

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, int]:
        """Mean cross-entropy over the batch and its size."""
        x, y = batch
        return F.cross_entropy(model(x), y), int(y.numel())

    def describe(self) -> dict[str, Any]:
        with torch.random.fork_rng(devices=[]):
            model = self.new_model()
        return {
            "dataset": self.options.dataset,
            "data_root": str(self.data_root()),
            "image_size": self.image_size,
            "partition": self.options.partition,
            "partition_sizes": [int(len(p)) for p in self.partitions()],
            "num_parameters": int(sum(p.numel() for p in model.parameters())),
            "config": {k: getattr(model.cfg, k) for k in model.cfg.__dataclass_fields__},
        }
