"""LSA latency and accuracy (spec §4, issue 14): the chapter's latency story measured on this CPU, then accuracy.

Part 1, latency (float32, eval mode, ``torch.no_grad``, ``--threads`` torch threads; median of ``--repeats``
forward passes after one warm-up; includes the mixer's reshapes/permutes/padding, excludes data loading):

* one stage-3 token mixer of the small model (C = 64, 2 heads of 32) on a ``[B, 64, S, S]`` map, for global MHSA,
  window attention (7x7 windows by reshape/permute, no shift, padding + key mask when S % 7 != 0) and LSA
  (M = 49, row-major; padding + key mask when S*S % 49 != 0), at S*S = 196, 784, 3136 and 4096 tokens (4096 is not
  divisible by 49), batch 1 and 8; printed as ms and as the ratio to global attention, next to the analytic MACs of
  eq. 4.4 (``4LC^2 + 2mLC``, m = L for global, m = 49 for LSA and windows, padded tokens not counted);
* the whole small model (``mixers`` CCAA / CCWW / CCLL with M = 49) at the input sizes giving those stage-3
  token counts (56, 112, 224, 256 px; stage 4 has a quarter of the tokens).

A log-log slope of latency vs tokens is fitted over the three largest sizes: ~1 means linear, ~2 quadratic.

Part 2, accuracy: the small model trained centrally (one process, SGD momentum 0.9, lr 0.05, batch 32, ``--steps``
steps on Fashion-MNIST train images, the metaformer workload's data pipeline) and scored on ``--eval-size``
Fashion-MNIST test images, for mixers CCCC / CCCA / CCLL (Table 4.3 analog; stage 3 is 7x7 = 49 tokens at 28 px,
stage 4 is 4x4), then the train-M x test-M table (Table 4.7 analog: CCLL trained at M = 49 (= global), 14
(padded), 7 and scored at every M' <= M without fine-tuning). ``--ablation`` adds no-swap / no-bias rows
(Table 4.9 analog). The full run trains 5 models (about 10-25 minutes on 1-2 busy cores); ``--quick`` trains
fewer steps and scores fewer images (about 3-5 minutes).

Usage: ``python bench/lsa.py [--quick] [--part latency|accuracy|all] [--threads 1] [--repeats 5]``.
It prints tables; it asserts nothing.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np
import torch

from fedaqt.config import RunConfig
from fedaqt.models.metaformer import (
    GlobalSelfAttention,
    LocalSelfAttention,
    WindowAttention,
    attention_macs,
    build_metaformer,
    set_local_length,
)
from fedaqt.workloads.metaformer import MetaFormerWorkload

TOKENS = (196, 784, 3136, 4096)
C3 = 64
M = 49


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _slope(xs, ys) -> float:
    """Least-squares slope of log(y) vs log(x)."""
    lx, ly = np.log(np.asarray(xs, float)), np.log(np.asarray(ys, float))
    return float(np.polyfit(lx, ly, 1)[0])


def latency(repeats: int, batches: tuple[int, ...], tokens: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    mixers = {"global": GlobalSelfAttention(C3).eval(), "window7": WindowAttention(C3, 7).eval(),
              f"lsa{M}": LocalSelfAttention(C3, M).eval()}
    print(f"\n## stage-3 token mixer, C={C3}, heads={C3 // 32}, float32, median of {repeats} (ms); ratio = t / t_global")
    print(f"{'B':>2} {'L':>5} {'S':>3} | {'global':>9} {'window7':>9} {'lsa49':>9} | {'win/glob':>8} {'lsa/glob':>8} |"
          f" {'MACs glob':>10} {'MACs lsa':>10} {'MAC ratio':>9}")
    series: dict[tuple[int, str], list[float]] = {}
    for b in batches:
        for L in tokens:
            s = int(math.isqrt(L))
            x = torch.randn(b, C3, s, s)
            ms = {}
            with torch.no_grad():
                for name, mod in mixers.items():
                    ms[name] = _median_ms(lambda: mod(x), repeats)
                    series.setdefault((b, name), []).append(ms[name])
            mg, ml = attention_macs(L, C3) * b, attention_macs(L, C3, M) * b
            print(f"{b:>2} {L:>5} {s:>3} | {ms['global']:9.2f} {ms['window7']:9.2f} {ms[f'lsa{M}']:9.2f} | "
                  f"{ms['window7'] / ms['global']:8.3f} {ms[f'lsa{M}'] / ms['global']:8.3f} | "
                  f"{mg / 1e6:9.1f}M {ml / 1e6:9.1f}M {ml / mg:9.4f}")
    _print_slopes(series, tokens, "mixer")

    print(f"\n## whole small model (CCAA / CCWW / CCLL, M={M}), 1 input channel, 10 classes, median of {repeats} (ms)")
    models = {}
    for mix in ("CCAA", "CCWW", "CCLL"):
        torch.manual_seed(0)
        models[mix] = build_metaformer("small", in_channels=1, num_classes=10, mixers=mix, local_len=M).eval()
    print(f"{'B':>2} {'L3':>5} {'px':>4} | {'CCAA':>9} {'CCWW':>9} {'CCLL':>9} | {'WW/AA':>7} {'LL/AA':>7}")
    series = {}
    for b in batches:
        for L in tokens:
            px = 4 * int(math.isqrt(L))
            x = torch.randn(b, 1, px, px)
            ms = {}
            with torch.no_grad():
                for mix, model in models.items():
                    ms[mix] = _median_ms(lambda: model(x), repeats)
                    series.setdefault((b, mix), []).append(ms[mix])
            print(f"{b:>2} {L:>5} {px:>4} | {ms['CCAA']:9.2f} {ms['CCWW']:9.2f} {ms['CCLL']:9.2f} | "
                  f"{ms['CCWW'] / ms['CCAA']:7.3f} {ms['CCLL'] / ms['CCAA']:7.3f}")
    _print_slopes(series, tokens, "model")


def _print_slopes(series, tokens, what: str) -> None:
    print(f"log-log slope of {what} latency vs stage-3 tokens over L={tokens[-3:]} (1 = linear, 2 = quadratic); "
          "ms per 1000 tokens between the two largest sizes:")
    for (b, name), ys in series.items():
        per_k = 1e3 * (ys[-1] - ys[-2]) / (tokens[-1] - tokens[-2])
        print(f"  B={b} {name:>8}: slope {_slope(tokens[-3:], ys[-3:]):.2f}   {per_k:8.2f} ms / 1k tokens")


def _train(mixers: str, local_len: int, steps: int, eval_size: int, seed: int, swap: bool = True,
           bias: bool = True):
    cfg = RunConfig(workload="metaformer", bits=32, num_clients=1, seed=seed,
                    options={"mixers": mixers, "local_len": local_len, "eval_size": eval_size, "swap": swap,
                             "bias": bias})
    wl = MetaFormerWorkload(cfg)
    model = wl.build_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    t0 = time.perf_counter()
    for i, batch in enumerate(wl.client_batches(0, 0, steps, 32)):
        loss, _ = wl.loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return wl, model, time.perf_counter() - t0


def accuracy(steps: int, eval_size: int, seed: int, ablation: bool) -> None:
    print(f"\n## accuracy: small model on Fashion-MNIST, {steps} SGD steps of batch 32 (centrally), "
          f"{eval_size} test images, seed {seed}")
    print(f"{'mixers':>8} {'M':>3} {'swap':>5} {'bias':>5} | {'top-1':>6} {'eval loss':>9} | train s")
    trained = {}
    rows = [("CCCC", 7, True, True), ("CCCA", 7, True, True), ("CCLL", 7, True, True)]
    if ablation:
        rows += [("CCLL", 7, False, False), ("CCLL", 7, True, False)]
    for mix, m, swap, bias in rows:
        wl, model, secs = _train(mix, m, steps, eval_size, seed, swap, bias)
        r = wl.score(model)
        if mix == "CCLL" and swap and bias:
            trained[m] = (wl, model)
        print(f"{mix:>8} {m if 'L' in mix else '-':>3} {str(swap):>5} {str(bias):>5} | "
              f"{100 * r['eval_accuracy']:6.2f} {r['eval_loss']:9.4f} | {secs:6.0f}")
    train_ms = (49, 14, 7)
    test_ms = (49, 14, 7, 4)
    for m in train_ms:
        if m not in trained:
            wl, model, _ = _train("CCLL", m, steps, eval_size, seed)
            trained[m] = (wl, model)
    print("\n## train M x test M (Table 4.7 analog; CCLL, top-1 %; stage 3 = 49 tokens, stage 4 = 16; "
          "M=49 is global attention; no fine-tuning)")
    head = "train\\test"
    print(f"{head:>10} " + " ".join(f"{m:>6}" for m in test_ms))
    for m in train_ms:
        wl, model = trained[m]
        cells = []
        for tm in test_ms:
            if tm > m:
                cells.append(f"{'-':>6}")
                continue
            set_local_length(model, tm)
            cells.append(f"{100 * wl.score(model)['eval_accuracy']:6.2f}")
        set_local_length(model, m)
        print(f"{m:>10} " + " ".join(cells))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", default="all", choices=("latency", "accuracy", "all"))
    ap.add_argument("--quick", action="store_true", help="fewer repeats / steps / test images (a few minutes)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=0, help="latency repeats (default 5, quick 3)")
    ap.add_argument("--steps", type=int, default=0, help="training steps per model (default 400, quick 120)")
    ap.add_argument("--eval-size", type=int, default=0, help="test images (default 2000, quick 1000)")
    ap.add_argument("--ablation", action="store_true", help="also no-swap / no-bias rows")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    repeats = a.repeats or (3 if a.quick else 5)
    steps = a.steps or (120 if a.quick else 400)
    eval_size = a.eval_size or (1000 if a.quick else 2000)
    print(f"torch {torch.__version__}, {a.threads} thread(s)")
    t0 = time.perf_counter()
    if a.part in ("latency", "all"):
        latency(repeats, (1, 8), TOKENS)
    if a.part in ("accuracy", "all"):
        accuracy(steps, eval_size, a.seed, a.ablation)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
