"""Seed Table 3.1 analog: the default fine-tuning job at 32/8/4-bit broadcast (and int8 uplink), side by side.

Every arm is the job `fedaqt run` runs with no options (bench/common.py ``default_scenario``: the `fedaqt pretrain`
checkpoint, clients on the 32 speakers it did not see, server Adam 1e-3 with cosine decay, 200 rounds x 8
clients x batch 8, seed 0) with only ``--bits`` / ``--uplink-bits`` changed, so the clients, batches and
sampling are identical. Prints WER/CER on the held-out speakers and on real recorded speech (Asterisk
prompts) for the pretrained model and after FL, plus MiB on the wire per round.

Run: .venv/bin/python bench/asr_bits.py [--rounds 200] [--out runs/bench_asr_bits]
     .venv/bin/python bench/asr_bits.py --bits 4/32,4/8,4/4   # int4 weights at uplink 32, 8 and 4 (BITS/UPLINK)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_common_args, default_scenario, markdown, pretrained_eval, run_or_reuse  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", default="32,8,4,8/8",
                    help="comma-separated arms: BITS (float32 upload) or BITS/UPLINK_BITS, e.g. 32,8,4 or 4/32,4/8,4/4")
    add_common_args(ap, "runs/bench_asr_bits")
    args = ap.parse_args()
    out = Path(args.out)
    arms = []
    for arm in args.bits.split(","):
        b, _, u = arm.strip().partition("/")
        try:
            arms.append((int(b), int(u) if u else 32))
        except ValueError:
            ap.error(f"--bits arm {arm!r} is not BITS or BITS/UPLINK_BITS")
    rows, cfg = [], None
    for bits, uplink in arms:
        name = f"bits{bits}" if uplink == 32 else f"bits{bits}_up{uplink}"
        cfg = default_scenario(bits=bits, uplink_bits=uplink, rounds=args.rounds, eval_every=args.eval_every,
                               granularity=args.granularity, seed=args.seed, out=str(out / name))
        print(f"== {name}: {cfg.strategy} server lr {cfg.server_lr}, {cfg.rounds} rounds x {cfg.clients_per_round} "
              f"clients x batch {cfg.batch_size}, from {cfg.options['init_checkpoint']}", flush=True)
        summary = run_or_reuse(cfg)
        rounds = pd.read_csv(out / name / "rounds.csv")
        rows.append({
            "weights": ("float32" if bits == 32 else f"int{bits}") + (" + float32 uplink" if uplink == 32 else f" + int{uplink} uplink"),
            "eval_wer": summary.get("final_eval_wer"), "eval_cer": summary.get("final_eval_cer"),
            "real_wer": summary.get("final_real_wer"), "real_cer": summary.get("final_real_cer"),
            "MiB_down/round": rounds["bytes_down"].mean() / 2**20,
            "MiB_up/round": rounds["bytes_up"].mean() / 2**20,
            "seconds": float(rounds["seconds"].sum()),
        })
    pre = pretrained_eval(cfg)
    rows.insert(0, {"weights": "pretrained (before FL)", "eval_wer": pre.get("eval_wer"), "eval_cer": pre.get("eval_cer"),
                    "real_wer": pre.get("real_wer"), "real_cer": pre.get("real_cer"), "MiB_down/round": 0.0,
                    "MiB_up/round": 0.0, "seconds": 0.0})
    table = pd.DataFrame(rows)
    fp32 = table.loc[table["weights"] == "float32 + float32 uplink", "eval_wer"]
    if len(fp32):
        table["eval_wer - float32"] = table["eval_wer"] - float(fp32.iloc[0])
    print()
    print(f"the default fine-tuning job ({cfg.strategy}, {cfg.rounds} rounds x {cfg.clients_per_round} clients x batch "
          f"{cfg.batch_size}, seed {cfg.seed}, {cfg.granularity} scales); WER/CER as fractions, lower is better; "
          f"seconds = sum of the rounds' wall time (excludes Ray start-up)")
    print(markdown(table))
    table.to_csv(out / "table.csv", index=False)


if __name__ == "__main__":
    main()
