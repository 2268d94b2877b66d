"""Gradient-relay exactness on float32 server weights of realistic size (issue 9 item 1).

One relayed FedSGD round (3 clients, batch sizes 2/3/5, server lr 1, no momentum) of a float32 model with one
quantized OUTxIN Linear (default 512x2048) runs through the real Server, strategy and client code on the
in-process FakeGrid (tests/fakegrid.py). For every case (int8/int4 x per tensor/per channel) it prints

* ``f64 codes``: how many codes a float64 re-quantization of the float32 server weight gets differently from the
  float32 broadcast (what the relay did before it used the wire codes + scales);
* ``max|corr|``: size of the relay correction (reference), at the max-abs entries;
* ``err relay``: max |relayed mean gradient the server applies - reference| over the quantized weight (float64,
  before the float32 weight update), and ``rel corr err``: ||corr - corr_ref|| / ||corr_ref|| over the max-abs
  entries (L2);
* ``err old`` / ``rel corr err old``: the same for the pre-fix relay (``relay_correction`` re-quantizing ``w`` in
  float64, on the same client mean);
* ``err step``: max |W0 - W1 - reference| of the float32 server step (includes the float32 storage of W1).

The reference is autograd of sum_k (n_k/N) L_k(Q(W)) with s = amax|w|/t_b differentiable and an STE round
(tests/qat_reference.py; float32 forward values as the broadcast computes them, float64 backward). The remaining
error of the fixed relay is the clients' float32 arithmetic.

Run: .venv/bin/python bench/relay_exactness.py [--shape 512x2048]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="512x2048", help="OUTxIN of the quantized Linear (default 512x2048)")
    args = ap.parse_args()
    try:
        out_f, in_f = (int(v) for v in args.shape.lower().split("x"))
        if out_f <= 0 or in_f <= 0:
            raise ValueError
    except ValueError:
        ap.error(f"--shape must be OUTxIN with positive integers, got {args.shape!r}")

    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    torch.set_num_threads(1)
    import fedaqt.plugins as plugins
    import test_relay_strategy as T
    from fedaqt.quant.quantize import relay_correction
    from fedaqt.strategies.relay import GradientRelayMixin
    from qat_reference import float64_code_mismatches, max_abs_positions

    T.BIG_OUT, T.BIG_IN = out_f, in_f
    plugins._BUILTIN_WORKLOADS["big32"] = "test_relay_strategy:BigWorkload"
    applied: dict[str, torch.Tensor] = {}
    original = GradientRelayMixin.correct_mean_update

    def recording(self, server_round, mean):
        out = original(self, server_round, mean)
        applied.update(out)
        return out

    GradientRelayMixin.correct_mean_update = recording
    key = "enc.weight"
    header = (f"| case ({out_f}x{in_f} float32) | f64 codes | max abs corr | err relay | rel corr err | err old "
              f"| rel corr err old | err step |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    with tempfile.TemporaryDirectory() as tmp:
        for bits in (8, 4):
            for gran in ("tensor", "channel"):
                applied.clear()
                update, g_bar, ref, plain, w0 = T.big_round(Path(tmp) / f"{bits}{gran}", bits, gran)
                w = torch.from_numpy(w0[key])
                at = max_abs_positions(w, gran)
                corr_ref = (ref[key] - plain[key])[at]
                old = g_bar[key] + relay_correction(g_bar[key], w.double(), bits, gran)  # the pre-fix relay
                rel = lambda step: float(((step - g_bar[key])[at] - corr_ref).norm() / corr_ref.norm())  # noqa: E731
                print(f"| int{bits} per {gran} | {float64_code_mismatches(w, bits, gran)} "
                      f"| {float(corr_ref.abs().max()):.3e} | {float((applied[key] - ref[key]).abs().max()):.2e} "
                      f"| {rel(applied[key]):.1e} | {float((old - ref[key]).abs().max()):.2e} | {rel(old):.1e} "
                      f"| {float((update[key] - ref[key]).abs().max()):.2e} |")


if __name__ == "__main__":
    main()
