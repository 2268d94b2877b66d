"""What packing int4 codes two per byte costs (issue 17): time per layer type, side by side with unpacked int4 and
float, and the memory each choice holds.

For each layer type (Linear, Conv1d pointwise and depthwise, Conv2d, self-attention MHA) three versions run the same
forward + backward on the same input (one CPU thread, median of ``--repeats`` timed runs after a warm-up):

* ``float``: torch's own layer (``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``, ``nn.MultiheadAttention``), float32;
* ``int4 unpacked``: the native quantized layer holding one int8 per code (``pack_int4_codes = False``; the layout
  before issue 17);
* ``int4 packed``: the native quantized layer as shipped, codes packed two per byte, unpacked transiently (once in
  forward, once in backward) per layer.

Memory columns (KiB, per layer): ``held`` is what the layer keeps between rounds for its weight (float: 4 B per
parameter; int4: codes + float32 scale). ``transient`` is the weight-derived temporary the quantized layer creates
inside its forward/backward, computed from the code's structure (not measured): Conv layers materialize the whole
float weight (4 B/param; packed: + the unpacked int8 codes, 1 B/param); ``QuantLinear`` (MHA: its largest
projection) materializes at most ``WEIGHT_BLOCK_ELEMS`` float elements at once (packed: + the unpacked int8 codes in
backward, 1 B/param). All are freed before the layer returns. Activations and gradients are the same for the two
int4 versions and not included (FedSGD receives large Linear weight gradients in row blocks, not included here). Time ratios include everything the layer does (activation
quantization, integer-valued matmuls in float32, the weight-gradient delivery).

Usage: ``nice -n 10 python bench/int4_packed.py [--repeats 20] [--threads 1]``. It prints ratios; it asserts
nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from fedaqt.quant import QuantConv1d, QuantConv2d, QuantLinear, QuantMultiheadAttention


class _Unpacked:
    pack_int4_codes = False


class ULinear(_Unpacked, QuantLinear):
    pass


class UConv1d(_Unpacked, QuantConv1d):
    pass


class UConv2d(_Unpacked, QuantConv2d):
    pass


def _cases():
    """(name, float layer, input shape, weight numel, builder(float layer, packed) -> quantized layer)."""
    def lin(f, packed):
        return (QuantLinear if packed else ULinear).from_float(f, 4, "channel", "w")

    def c1(f, packed):
        return (QuantConv1d if packed else UConv1d).from_float(f, 4, "channel", "w")

    def c2(f, packed):
        return (QuantConv2d if packed else UConv2d).from_float(f, 4, "channel", "w")

    def mha(f, packed):
        m = QuantMultiheadAttention.from_float(f, 4, "channel", prefix="a.")
        if not packed:
            m.in_proj = ULinear.from_float_weight(f.in_proj_weight, None, 4, "channel")
            m.out_proj = ULinear.from_float(f.out_proj, 4, "channel")
            m.set_prefix("a.")
        return m

    torch.manual_seed(0)
    return [
        ("Linear 512->2048", nn.Linear(512, 2048), (2, 200, 512), lin),
        ("Conv1d pointwise 512->1024", nn.Conv1d(512, 1024, 1), (2, 512, 200), c1),
        ("Conv1d depthwise 512 k31", nn.Conv1d(512, 512, 31, padding=15, groups=512), (2, 512, 200), c1),
        ("Conv2d 64->64 3x3", nn.Conv2d(64, 64, 3, padding=1), (2, 64, 32, 32), c2),
        ("MHA E=512 H=8", nn.MultiheadAttention(512, 8), (200, 2, 512), mha),
    ]


def _step(layer, x, is_mha):
    x = x.detach().requires_grad_(True)
    if is_mha:
        y, _ = layer(x, x, x, need_weights=False)
    else:
        y = layer(x)
    y.sum().backward()


def _time(layer, x, is_mha, repeats):
    qls = [m for m in layer.modules() if hasattr(m, "set_weight_grad_hook")]
    for m in qls:
        m.set_weight_grad_hook(lambda l, g: None)  # as FedSGD: the gradient is taken and dropped
    for _ in range(2):
        _step(layer, x, is_mha)
        layer.zero_grad(set_to_none=True)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _step(layer, x, is_mha)
        ts.append(time.perf_counter() - t0)
        layer.zero_grad(set_to_none=True)
    return statistics.median(ts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    console = Console(width=max(Console().width, 170))
    t = Table(title=f"forward + backward per layer, median of {args.repeats}, {args.threads} thread(s); "
                    "memory per layer in KiB (held between rounds / extra weight-sized transient)")
    for c in ("layer", "params", "float ms", "unpacked ms", "packed ms", "packed/unpacked", "packed/float",
              "held float", "held unpacked", "held packed", "transient unpacked", "transient packed"):
        t.add_column(c, justify="left" if c == "layer" else "right")
    for name, f, shape, build in _cases():
        is_mha = isinstance(f, nn.MultiheadAttention)
        x = torch.randn(shape)
        numel = sum(p.numel() for n, p in f.named_parameters() if "weight" in n)
        nscale = sum(p.shape[0] for n, p in f.named_parameters() if "weight" in n)
        tf = _time(f, x, is_mha, args.repeats)
        tu = _time(build(f, False), x, is_mha, args.repeats)
        tp = _time(build(f, True), x, is_mha, args.repeats)
        kib = 1024.0
        largest = max(p.numel() for n, p in f.named_parameters() if "weight" in n)
        if isinstance(f, (nn.Linear, nn.MultiheadAttention)):
            from fedaqt.quant.layers import WEIGHT_BLOCK_ELEMS

            tr_u, tr_p = 4 * min(largest, WEIGHT_BLOCK_ELEMS), 4 * min(largest, WEIGHT_BLOCK_ELEMS) + largest
        else:
            tr_u, tr_p = 4 * largest, 5 * largest
        t.add_row(name, f"{numel}", f"{1e3 * tf:.2f}", f"{1e3 * tu:.2f}", f"{1e3 * tp:.2f}", f"{tp / tu:.3f}",
                  f"{tp / tf:.3f}", f"{4 * numel / kib:.0f}", f"{(numel + 4 * nscale) / kib:.0f}",
                  f"{((numel + 1) // 2 + 4 * nscale) / kib:.0f}", f"{tr_u / kib:.0f}",
                  f"{tr_p / kib:.0f}")
    console.print(t)
    return 0


if __name__ == "__main__":
    sys.exit(main())
