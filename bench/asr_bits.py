"""Seed Table 3.1 analog: FedSGD fine-tuning at 32/8/4-bit broadcast, side by side, same seed.

1. Pretrain the float Conformer centrally (Adam) on the first half of the training speakers.
2. From that checkpoint, FedSGD fine-tune on the other half of the speakers (one speaker per client) with the
   broadcast at 32, 8 and 4 bits (server SGD, identical seed and client schedule).
3. Print WER/CER on the held-out speakers and on real recorded speech, plus bytes on the wire.

Run: .venv/bin/python bench/asr_bits.py [--rounds 60] [--pretrain-steps 300] [--out runs/bench_asr_bits]
     .venv/bin/python bench/asr_bits.py --bits 4/32,4/8,4/4   # int4 weights at uplink 32, 8 and 4 (BITS/UPLINK)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_common_args, markdown, pretrain_central, run_or_reuse  # noqa: E402

from fedaqt.config import RunConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients-per-round", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=2, help="client batch size (the dissertation used 2)")
    ap.add_argument("--bits", default="32,8,4",
                    help="comma-separated arms: BITS (float32 upload) or BITS/UPLINK_BITS, e.g. 32,8,4 or 4/32,4/8,4/4")
    add_common_args(ap, "runs/bench_asr_bits")
    args = ap.parse_args()

    out = Path(args.out)
    speakers_total = 32
    half = speakers_total // 2
    print(f"== pretraining centrally on speakers 0..{half - 1} ({args.pretrain_steps} Adam steps, batch {args.pretrain_batch})")
    ckpt, pre = pretrain_central(Path(args.pretrain_dir), half, args.pretrain_steps, args.pretrain_batch, 1e-3, args.seed, args.data_dir)
    rows = [{"weights": "pretrained (no FL)", "eval_wer": pre["eval_wer"], "eval_cer": pre["eval_cer"],
             "real_wer": pre.get("real_wer"), "real_cer": pre.get("real_cer"), "MiB_down/round": 0.0,
             "MiB_up/round": 0.0}]
    arms = []
    for arm in args.bits.split(","):
        b, _, u = arm.strip().partition("/")
        try:
            arms.append((int(b), int(u) if u else 32))
        except ValueError:
            ap.error(f"--bits arm {arm!r} is not BITS or BITS/UPLINK_BITS")
    for bits, uplink in arms:
        name = f"bits{bits}" if uplink == 32 else f"bits{bits}_up{uplink}"
        print(f"== FedSGD fine-tuning on speakers {half}..{speakers_total - 1} at {bits} bits, uplink {uplink}, "
              f"{args.rounds} rounds")
        cfg = RunConfig(
            bits=bits, granularity=args.granularity, strategy="fedsgd", algorithm="fedsgd",
            num_clients=half, clients_per_round=args.clients_per_round, rounds=args.rounds,
            batch_size=args.batch_size, server_lr=args.server_lr, server_momentum=0.9, seed=args.seed,
            uplink_bits=uplink, eval_every=args.rounds, out=str(out / name),
            options={"speaker_offset": half, "init_checkpoint": str(ckpt), "data_dir": args.data_dir},
        )
        summary = run_or_reuse(cfg)
        rounds = pd.read_csv(out / name / "rounds.csv")
        rows.append({
            "weights": ("float32" if bits == 32 else f"int{bits}") + ("" if uplink == 32 else f"+up{uplink}"),
            "eval_wer": summary.get("final_eval_wer"), "eval_cer": summary.get("final_eval_cer"),
            "real_wer": summary.get("final_real_wer"), "real_cer": summary.get("final_real_cer"),
            "MiB_down/round": rounds["bytes_down"].mean() / 2**20,
            "MiB_up/round": rounds["bytes_up"].mean() / 2**20,
        })
    table = pd.DataFrame(rows)
    print()
    print(f"FedSGD fine-tuning, {args.rounds} rounds x {args.clients_per_round} clients x batch {args.batch_size}, "
          f"seed {args.seed}, {args.granularity} scales (WER/CER as fractions; lower is better)")
    print(markdown(table))
    table.to_csv(out / "table.csv", index=False)


if __name__ == "__main__":
    main()
