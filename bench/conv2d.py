"""QuantConv2d vs float nn.Conv2d: bytes saved for backward and forward+backward time, side by side.

Saved bytes are counted with ``torch.autograd.graph.saved_tensors_hooks`` (everything autograd keeps for backward);
the time is the median of ``--repeats`` forward+backward passes. The float layer is float32 ``nn.Conv2d``; the
quantized layer saves int8 input codes + int8 kernel codes + two scales, so its saved bytes are ~0.25x. This prints
ratios; it asserts nothing.

Usage: ``python bench/conv2d.py [--batch 8] [--size 32] [--repeats 5] [--threads 1] [--device cpu]``
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from fedaqt.quant import QuantConv2d

CASES = {
    "3x3 64->64": dict(in_channels=64, out_channels=64, kernel_size=3, padding=1),
    "3x3 s2 64->128": dict(in_channels=64, out_channels=128, kernel_size=3, stride=2, padding=1),
    "depthwise 5x5 64": dict(in_channels=64, out_channels=64, kernel_size=5, padding=2, groups=64),
    "pointwise 64->128": dict(in_channels=64, out_channels=128, kernel_size=1),
}


def _saved_bytes(layer: nn.Module, x: torch.Tensor) -> int:
    seen: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t) or t, lambda t: t):
        layer(x)
    return sum(t.numel() * t.element_size() for t in seen)


def _time(layer: nn.Module, x: torch.Tensor, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):
        if x.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        layer(x).sum().backward()
        if x.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])  # first pass is warm-up


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=32, help="input height = width")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bits", type=int, default=8, choices=(8, 4))
    ap.add_argument("--granularity", default="channel", choices=("tensor", "channel"))
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    print(f"batch={a.batch} size={a.size} bits={a.bits} granularity={a.granularity} device={a.device} "
          f"threads={a.threads}")
    print(f"{'case':<20} {'float KiB':>10} {'quant KiB':>10} {'bytes ratio':>11} {'float ms':>9} {'quant ms':>9} "
          f"{'time ratio':>10}")
    for name, kw in CASES.items():
        f = nn.Conv2d(**kw).to(a.device)
        q = QuantConv2d.from_float(nn.Conv2d(**kw), a.bits, a.granularity, "c.weight").to(a.device)
        x = torch.randn(a.batch, kw["in_channels"], a.size, a.size, device=a.device, requires_grad=True)
        bf, bq = _saved_bytes(f, x), _saved_bytes(q, x)
        tf, tq = _time(f, x, a.repeats), _time(q, x, a.repeats)
        print(f"{name:<20} {bf / 1024:>10.1f} {bq / 1024:>10.1f} {bq / bf:>11.3f} {1e3 * tf:>9.2f} "
              f"{1e3 * tq:>9.2f} {tq / tf:>10.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
