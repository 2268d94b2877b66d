"""Gradient relay ablation: int4 FedSGD with and without the relay, same seed, eval CER per round.

Both runs start from the same centrally pretrained checkpoint (first half of the speakers) and fine-tune on the
other half; only the strategy differs (``relay`` vs ``fedsgd``), so the client schedule and batches are identical.

Run: .venv/bin/python bench/relay_ablation.py [--rounds 60] [--eval-every 10] [--out runs/bench_relay]
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
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--bits", type=int, default=4)
    add_common_args(ap, "runs/bench_relay")
    args = ap.parse_args()
    out = Path(args.out)
    half = 16
    ckpt, pre = pretrain_central(Path(args.pretrain_dir), half, args.pretrain_steps, args.pretrain_batch, 1e-3, args.seed, args.data_dir)
    print(f"pretrained model: eval CER {pre['eval_cer']:.3f}, WER {pre['eval_wer']:.3f}")
    curves = {}
    for strategy in ("fedsgd", "relay"):
        cfg = RunConfig(
            bits=args.bits, granularity=args.granularity, strategy=strategy, algorithm="fedsgd",
            num_clients=half, clients_per_round=8, rounds=args.rounds, batch_size=2,
            server_lr=args.server_lr, server_momentum=0.9, seed=args.seed, eval_every=args.eval_every,
            out=str(out / strategy),
            options={"speaker_offset": half, "init_checkpoint": str(ckpt), "data_dir": args.data_dir, "real_eval": False},
        )
        print(f"== int{args.bits} FedSGD, strategy={strategy}")
        run_or_reuse(cfg)
        r = pd.read_csv(out / strategy / "rounds.csv")
        curves[strategy] = r.set_index("round")
    table = pd.DataFrame({
        "eval_cer (no relay)": curves["fedsgd"]["eval_cer"],
        "eval_cer (relay)": curves["relay"]["eval_cer"],
        "eval_wer (no relay)": curves["fedsgd"]["eval_wer"],
        "eval_wer (relay)": curves["relay"]["eval_wer"],
        "relay_norm_ratio": curves["relay"]["relay_norm_ratio"],
    }).dropna(subset=["eval_cer (relay)"])
    print()
    print(f"int{args.bits} {args.granularity} FedSGD from a pretrained model, seed {args.seed} (pretrained CER {pre['eval_cer']:.3f})")
    print(markdown(table, ".4f", index=True))
    table.to_csv(out / "table.csv")


if __name__ == "__main__":
    main()
