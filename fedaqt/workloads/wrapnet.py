"""WrapNet workload (spec §3): a binary/ternary-weight VGG-7 on Fashion-MNIST trained for an 8-bit accumulator.

The federated model is WrapNet's fine-tuning stage (spec §3.6 stage 4): cyclic activation in, quantized weights
and quantized activations, with the per-layer activation step sizes chosen once at build time by the overflow-rate
search of §3.4 on a fixed calibration batch (deterministic from ``config.seed``, batch statistics in BatchNorm
because the model is untrained). Clients minimize ``CE + λ_o R_o`` (§3.3).

The server evaluates the network the clients hold, on a fixed test subset, in three accumulator settings that are
three different forward paths (not one path read twice):

* ``eval_accuracy``: 32-bit accumulator, no wrap and no cyclic fold: the exact integer network (the seed's
  "32-bit accumulator" column of Table 2.1);
* ``eval_accuracy_acc{b}`` (b = ``acc_bits``, default 8): b-bit two's-complement wrapping accumulator followed by
  the cyclic activation (WrapNet as deployed; equals the cyclic 32-bit network by periodicity, spec §3.9);
* ``eval_accuracy_acc{b}_nocyclic``: b-bit wrapping accumulator without the cyclic activation (plain overflow:
  the "8-bit accumulator" collapse of Table 2.1).

``overflow_rate`` is the mean over quantized layers of the fraction of accumulator values outside the strict
b-bit range, on the b-bit cyclic pass; ``overflow_rate_<layer>`` per layer.

Quantized broadcast (``--bits 8/4``): the WrapNet weights travel as int8/int4 codes + float32 scales; the client
model keeps exactly those codes + scales (:func:`fedaqt.models.wrapnet.quantize_wrap_layers`, no float copy) and
binarizes/ternarizes ``ŵ = s*q``. The server evaluates that same network: it encodes and decodes its float
weights exactly as a broadcast and evaluates a client-format copy, so the binary/ternary weights and scales it
evaluates are bit for bit those the clients train (with ``--bits 32`` both sides use the float weights).

``config.options`` keys (all optional; see also ``fedaqt plugins show wrapnet``):

=============  =========  ============================================================================
key            default    meaning
=============  =========  ============================================================================
arch           "vgg7"     "vgg7" or "resnet20"
width          0.125      channel multiplier (VGG-7: 0.125 -> 16..64 channels, FC 128; ResNet-20: 1.0)
weight_quant   "binary"   "binary" (XNOR), "ternary" (TWN) or "int2".."int8"
act_bits       8          largest activation bit-width of the §3.4 grid (a = act_bits..1)
p              0.05       target overflow rate of the §3.4 search (1.0 forces act_bits everywhere)
k              2.0        cyclic slope (§3.2)
acc_bits       8          accumulator bits b (cyclic period, penalty, evaluation)
cyclic         true       insert the cyclic activation
lambda_o       0.01       overflow-penalty weight λ_o
eval_size      2000       test images used by ``evaluate`` (a fixed subset of the 10,000)
calib_size     256        calibration images for §3.4
train_size     0          use only this many training images (0 = all 60,000)
data_root      (auto)     directory with the Fashion-MNIST idx files; default ``options.data_dir`` if it holds
                          them, else /usr/share/datasets/fashion-mnist
data_dir       ""         ``--data-dir``: see data_root
partition      "iid"      "iid" or "dirichlet" (shared :class:`fedaqt.data.partition.PartitionOptions`)
alpha          0.5        Dirichlet concentration for partition=dirichlet
=============  =========  ============================================================================

The typed model is :class:`WrapNetOptions` (``fedaqt plugins show wrapnet``).

Data: the Fashion-MNIST train split across ``config.num_clients`` clients by ``options.partition`` ("iid", or
"dirichlet" with ``options.alpha``; :func:`fedaqt.data.partition.partition_indices`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from fedaqt.config import RunConfig
from fedaqt.data.images import FASHION_MNIST_ROOT, load_fashion_mnist
from fedaqt.data.partition import PartitionOptions, partition_indices
from fedaqt.models.wrapnet import (
    build_wrapnet,
    evaluate as evaluate_wrapnet,
    model_overflow_penalty,
    quantize_wrap_layers,
    select_step_sizes,
    set_wrapnet_mode,
    wrap_layers,
)
from fedaqt.options import options_for
from fedaqt.workloads.base import Workload

_WIDTH_DEFAULT = {"vgg7": 0.125, "resnet20": 1.0}
_EVAL_BATCH = 500
WEIGHT_QUANTS = ("binary", "ternary", "int2", "int3", "int4", "int5", "int6", "int7", "int8")


class WrapNetOptions(PartitionOptions):
    """Options of the WrapNet workload (``-o KEY=VALUE``; ``fedaqt plugins show wrapnet``)."""

    arch: Literal["vgg7", "resnet20"] = Field("vgg7", description="network: vgg7 or resnet20")
    width: Optional[float] = Field(
        None, gt=0, description="channel multiplier (null = per arch: vgg7 0.125 -> 16..64 channels, resnet20 1.0)"
    )
    weight_quant: Literal[WEIGHT_QUANTS] = Field(  # type: ignore[valid-type]
        "binary", description="weights: binary (XNOR), ternary (TWN) or int2..int8"
    )
    act_bits: int = Field(8, ge=1, le=8, description="largest activation bit-width of the §3.4 grid (act_bits..1)")
    p: float = Field(0.05, ge=0, le=1, description="target overflow rate of the §3.4 search (1.0 forces act_bits)")
    k: float = Field(2.0, gt=0, description="cyclic slope (§3.2)")
    acc_bits: int = Field(8, ge=2, le=31, description="accumulator bits b (cyclic period, penalty, evaluation)")
    cyclic: bool = Field(True, description="insert the cyclic activation")
    lambda_o: float = Field(0.01, ge=0, description="overflow-penalty weight λ_o")
    eval_size: int = Field(2000, ge=1, le=10000, description="test images evaluate() uses (fixed subset of 10,000)")
    calib_size: int = Field(256, ge=1, description="calibration images for the §3.4 step-size search")
    train_size: int = Field(0, ge=0, description="use only this many training images (0 = all 60,000)")
    data_root: str = Field("", description="directory with the Fashion-MNIST idx files ('' = data_dir, else the Debian package's)")
    data_dir: str = Field("", description="dataset directory (--data-dir); used when it holds the idx files and data_root is ''")


#: option defaults (``width`` None = per-arch default), as the typed model declares them
DEFAULTS: dict[str, Any] = {k: f.default for k, f in WrapNetOptions.model_fields.items()
                            if k not in ("partition", "alpha", "data_dir")}


def resolve_options(options: dict[str, Any]) -> dict[str, Any]:
    """The WrapNet options of ``options`` (a run's flat ``-o`` table) as a plain dict, typed, ``width`` resolved.

    Raises:
        ConfigError: a WrapNet option has a bad value (the message names the key, the value and what is allowed).
    """
    o = options_for(WrapNetOptions, options, "workload wrapnet").model_dump()
    if o["width"] is None:
        o["width"] = _WIDTH_DEFAULT[o["arch"]]
    return o


class WrapNetWorkload(Workload):
    """WrapNet on Fashion-MNIST (spec §3); see the module docstring for options and metrics."""

    name = "wrapnet"
    description = "WrapNet (spec §3): binary/ternary VGG-7 on Fashion-MNIST with a cyclic activation for 8-bit accumulators"

    Options = WrapNetOptions

    def __init__(self, config: RunConfig) -> None:
        super().__init__(config)
        self.opts = resolve_options(dict(config.options))
        self.acc_bits: int = self.opts["acc_bits"]
        self.layer_names = [n for n, _ in wrap_layers(self._new_model())]
        self.acc_column = f"eval_accuracy_acc{self.acc_bits}"
        self.nocyclic_column = f"eval_accuracy_acc{self.acc_bits}_nocyclic"
        self.eval_columns = (
            "eval_accuracy",
            self.acc_column,
            "overflow_rate",
            self.nocyclic_column,
            *[f"overflow_rate_{self._col(n)}" for n in self.layer_names],
        )
        self._train: tuple[torch.Tensor, torch.Tensor] | None = None
        self._partitions: list[np.ndarray] | None = None
        self._eval: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._steps: dict[str, Any] = {}
        self._eval_client_model: nn.Module | None = None

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _col(layer_name: str) -> str:
        return layer_name.replace(".", "_")

    def data_root(self) -> Path:
        """Directory with the idx files: ``options.data_root``, else ``options.data_dir`` if it holds them, else
        the Debian package location."""
        if self.opts["data_root"]:
            return Path(self.opts["data_root"])
        d = Path(self.opts["data_dir"]) if self.opts["data_dir"] else None
        if d is not None and ((d / "train-images-idx3-ubyte.gz").exists() or (d / "train-images-idx3-ubyte").exists()):
            return d
        return Path(FASHION_MNIST_ROOT)

    def _new_model(self) -> nn.Module:
        o = self.opts
        return build_wrapnet(o["arch"], in_channels=1, num_classes=10, image_size=28, width=o["width"],
                             weight_quant=o["weight_quant"], b=o["acc_bits"], k=o["k"], act_bits=o["act_bits"],
                             persistent_step_sizes=False)

    def _train_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images ``[N, 1, 28, 28]`` and int64 labels of the (optionally truncated) train split."""
        if self._train is None:
            x, y = load_fashion_mnist(self.data_root(), "train", normalize=False)
            n = self.opts["train_size"]
            if n:
                keep = np.sort(np.random.default_rng([self.config.seed, 1]).permutation(len(y))[:n])
                x, y = x[keep], y[keep]
            self._train = (x, y)
        return self._train

    def partitions(self) -> list[np.ndarray]:
        """Index arrays (into the train split) of every client; deterministic from the config."""
        if self._partitions is None:
            _, y = self._train_data()
            self._partitions = partition_indices(self.options, y, self.config.num_clients, self.config.seed)
        return self._partitions

    @staticmethod
    def _to_float(x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.float32).div_(255.0)

    def _calibration_batch(self) -> torch.Tensor:
        x, _ = self._train_data()
        n = min(self.opts["calib_size"], len(x))
        idx = np.sort(np.random.default_rng([self.config.seed, 2]).permutation(len(x))[:n])
        return self._to_float(x[idx])

    def _eval_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self._eval is None:
            x, y = load_fashion_mnist(self.data_root(), "test", normalize=False)
            n = self.opts["eval_size"]
            idx = np.sort(np.random.default_rng([self.config.seed, 3]).permutation(len(y))[:n])
            x, y = self._to_float(x[idx]), y[idx]
            self._eval = [(x[i : i + _EVAL_BATCH], y[i : i + _EVAL_BATCH]) for i in range(0, len(y), _EVAL_BATCH)]
        return self._eval

    # ------------------------------------------------------------------ server side
    def prepare(self) -> None:
        """Check the Fashion-MNIST files and the partition settings.

        Raises:
            FileNotFoundError: the idx files are missing (the message says ``apt-get install dataset-fashion-mnist``).
            ValueError: more clients than training images, bad alpha.
        """
        load_fashion_mnist(self.data_root(), "test", normalize=False)
        self.partitions()

    def build_model(self) -> nn.Module:
        """The WrapNet model in its fine-tuning configuration, deterministic from ``config.seed``.

        Weights are initialized under ``torch.manual_seed(config.seed)`` (global RNG state restored afterwards);
        step sizes come from §3.4 on the calibration batch (``p``, grid ``act_bits..1``, b = ``acc_bits``) and are
        non-persistent buffers (every process recomputes the same values). Modes: ``act_quant=True``,
        ``cyclic=options.cyclic``, 32-bit (no-wrap) accumulator for training.
        """
        o = self.opts
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            model = self._new_model()
        steps = select_step_sizes(model, [self._calibration_batch()], b=o["acc_bits"], p=o["p"],
                                  bit_grid=tuple(range(o["act_bits"], 0, -1)), use_batch_stats=True)
        self._steps = {n: {"a": c.a, "s_x": c.s_x, "rate": c.rate} for n, c in steps.items()}
        set_wrapnet_mode(model, act_quant=True, cyclic=o["cyclic"], acc_bits=32)
        model.train()
        return model

    def quantize_filter(self, name: str, module: nn.Module) -> bool:
        """False: the generic converter has no WrapNet layer (they quantize their own weights to binary/ternary
        inside forward); :meth:`convert_client_model` gives them codes + scales instead."""
        return False

    def convert_client_model(self, model: nn.Module, bits: int, granularity: str) -> nn.Module:
        """Client model for ``bits`` 8/4: every WrapNet weight becomes int codes + float32 scale
        (:func:`fedaqt.models.wrapnet.quantize_wrap_layers`; no float copy), the rest stays float.

        Raises:
            ValueError: bad ``bits``/``granularity``.
        """
        return quantize_wrap_layers(super().convert_client_model(model, bits, granularity), bits, granularity)

    def broadcast_quantized_keys(self, model: nn.Module) -> list[str]:
        """Weights of the WrapNet layers (``"<layer>.weight"``): broadcast as int8/int4 codes + float32 scales and
        held by the client as exactly those codes + scales (:meth:`convert_client_model`)."""
        params = dict(model.named_parameters())
        return [f"{n}.weight" for n, _ in wrap_layers(model) if f"{n}.weight" in params and params[f"{n}.weight"].dim() > 1]

    def evaluated_model(self, model: nn.Module) -> nn.Module:
        """The network :meth:`evaluate` scores for the server's float ``model``: ``model`` itself with
        ``--bits 32``; otherwise a client-format copy (codes + scales) filled from ``model`` through the broadcast
        encoder and the client's loader (``encode_broadcast`` -> ``decode_broadcast`` -> ``load_client_broadcast``), so
        its weights are bit for bit those the clients receive and train."""
        bits = self.config.bits
        if bits >= 16:
            return model
        from fedaqt.quant.wire import decode_broadcast, encode_broadcast, load_client_broadcast

        if self._eval_client_model is None:
            with torch.random.fork_rng(devices=[]):  # the skeleton's init must not move the server's RNG
                skeleton = self._new_model()
            self._eval_client_model = self.convert_client_model(skeleton, bits, self.config.granularity)
        qmodel = self._eval_client_model
        state = {k: p.detach() for k, p in model.named_parameters()}
        state.update({k: b.detach() for k, b in model.named_buffers() if b.is_floating_point()})
        arrays, meta = encode_broadcast(state, self.broadcast_quantized_keys(model), bits, self.config.granularity)
        load_client_broadcast(qmodel, decode_broadcast(arrays, meta))
        for (_, src), (_, dst) in zip(wrap_layers(model), wrap_layers(qmodel)):
            for key in ("act_quant", "cyclic", "acc_bits", "k", "b", "track_carries", "carry_mode", "carry_correct"):
                setattr(dst, key, getattr(src, key))
        return qmodel

    def evaluate(self, model: nn.Module, round_num: int) -> dict[str, float]:
        """Accuracy with a 32-bit accumulator (no wrap, no fold), a b-bit wrapping accumulator with the cyclic
        activation, and a b-bit wrapping accumulator without it; overflow rates of the b-bit cyclic pass.

        Scores :meth:`evaluated_model` (the clients' network) on the fixed test subset, quantized activations.

        Returns:
            {"eval_accuracy", "eval_accuracy_acc{b}", "eval_accuracy_acc{b}_nocyclic", "overflow_rate",
            "overflow_rate_<layer>"...}, fractions in [0, 1].
        """
        batches = self._eval_batches()
        net = self.evaluated_model(model)
        exact = evaluate_wrapnet(net, batches, act_quant=True, cyclic=False, acc_bits=32)
        low = evaluate_wrapnet(net, batches, act_quant=True, cyclic=True, acc_bits=self.acc_bits)
        raw = evaluate_wrapnet(net, batches, act_quant=True, cyclic=False, acc_bits=self.acc_bits)
        out = {"eval_accuracy": exact["accuracy"], self.acc_column: low["accuracy"],
               self.nocyclic_column: raw["accuracy"], "overflow_rate": low["overflow_rate"]}
        for n, r in low["overflow_rates"].items():
            out[f"overflow_rate_{self._col(n)}"] = r
        return out

    # ------------------------------------------------------------------ client side
    def num_partitions(self) -> int:
        return self.config.num_clients

    def client_batches(self, client_id: int, round_num: int, num_batches: int, batch_size: int) -> list[Any]:
        """``num_batches`` batches ``(x float32 [B, 1, 28, 28] in [0, 1], y int64 [B])`` drawn without replacement
        (cycling if the client has fewer than ``num_batches * batch_size`` images) from client ``client_id``'s
        partition, deterministic in (``config.seed``, client, round).

        Raises:
            ValueError: ``client_id`` outside ``0..num_clients-1``, or non-positive counts.
        """
        if not 0 <= client_id < self.config.num_clients:
            raise ValueError(f"client_id={client_id} is out of range 0..{self.config.num_clients - 1}")
        if num_batches < 1 or batch_size < 1:
            raise ValueError(f"num_batches={num_batches} and batch_size={batch_size} must be >= 1")
        x, y = self._train_data()
        part = self.partitions()[client_id]
        rng = np.random.default_rng([self.config.seed, client_id, round_num])
        need = num_batches * batch_size
        reps = -(-need // len(part))
        order = np.concatenate([rng.permutation(part) for _ in range(reps)])[:need]
        idx = torch.from_numpy(order)
        xb, yb = self._to_float(x[idx]), y[idx]
        return [(xb[i * batch_size : (i + 1) * batch_size], yb[i * batch_size : (i + 1) * batch_size])
                for i in range(num_batches)]

    def partition_size(self, client_id: int) -> int:
        """Images in client ``client_id``'s partition.

        Raises:
            ValueError: ``client_id`` outside ``0..num_clients-1``.
        """
        if not 0 <= client_id < self.config.num_clients:
            raise ValueError(f"client_id={client_id} is out of range 0..{self.config.num_clients - 1}")
        return int(len(self.partitions()[client_id]))

    def client_epoch_batches(self, client_id: int, round_num: int, epoch: int, batch_size: int) -> list[Any]:
        """One pass over client ``client_id``'s partition: every image once, permuted by (seed, client, round,
        epoch), as batches ``(x float32 [B, 1, 28, 28], y int64 [B])`` of ``batch_size`` (the last may be smaller).

        Raises:
            ValueError: ``client_id`` out of range or ``batch_size < 1``.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.partition_size(client_id)
        x, y = self._train_data()
        part = np.asarray(self.partitions()[client_id])
        order = np.random.default_rng([self.config.seed, client_id, round_num, epoch, 0x45504F]).permutation(part)
        idx = torch.from_numpy(order)
        xb, yb = self._to_float(x[idx]), y[idx]
        return [(xb[i : i + batch_size], yb[i : i + batch_size]) for i in range(0, len(order), batch_size)]

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, int]:
        """``CE + λ_o R_o`` (spec §3.3; R_o is recorded by the layers in training mode only). Returns (mean loss,
        batch size)."""
        x, y = batch
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        if self.opts["lambda_o"]:
            loss = loss + self.opts["lambda_o"] * model_overflow_penalty(model).to(loss.dtype)
        return loss, int(y.numel())

    def describe(self) -> dict[str, Any]:
        parts = self.partitions()
        model = self._new_model()
        return {
            "dataset": "fashion-mnist",
            "data_root": str(self.data_root()),
            "partition": self.options.partition,
            "partition_sizes": [int(len(p)) for p in parts],
            "num_parameters": int(sum(p.numel() for p in model.parameters())),
            "options": {k: v for k, v in self.opts.items()},
            "quantized_layers": self.layer_names,
            "step_sizes": self._steps,
        }
