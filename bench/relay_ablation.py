"""Gradient relay ablation on the default fine-tuning job: int4 FedSGD with and without the relay, same seed.

Both arms are the default `fedaqt run` scenario (bench/common.py ``default_scenario``: the `fedaqt pretrain`
checkpoint, clients on the speakers it did not see, 8 clients x batch 8 per round, seed 0) at ``--bits`` with
the server optimizer the relay is defined for (spec §2.3: server SGD with momentum, ``--server-lr``,
``--server-momentum``, cosine decay of the rate), and only the strategy differs (``relay`` vs ``fedsgd``), so the
client schedule and batches are identical. Prints held-out WER/CER per evaluated round and the relay's
correction size (``relay_norm_ratio``).

Run: .venv/bin/python bench/relay_ablation.py [--rounds 200] [--eval-every 25] [--out runs/bench_relay]
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
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--server-lr", type=float, default=0.05, help="server SGD learning rate (both arms)")
    ap.add_argument("--server-momentum", type=float, default=0.9, help="server SGD momentum (both arms)")
    add_common_args(ap, "runs/bench_relay")
    args = ap.parse_args()
    out = Path(args.out)
    curves, cfg = {}, None
    for strategy in ("fedsgd", "relay"):
        cfg = default_scenario(bits=args.bits, strategy=strategy, server_lr=args.server_lr,
                               server_momentum=args.server_momentum, rounds=args.rounds, eval_every=args.eval_every,
                               granularity=args.granularity, seed=args.seed, out=str(out / strategy),
                               options={"server_lr_schedule": "cosine", "real_eval": False})
        print(f"== int{args.bits} FedSGD, strategy={strategy}, server SGD lr {cfg.server_lr} momentum "
              f"{cfg.server_momentum} (cosine), {cfg.rounds} rounds", flush=True)
        run_or_reuse(cfg)
        curves[strategy] = pd.read_csv(out / strategy / "rounds.csv").set_index("round")
    table = pd.DataFrame({
        "eval_wer (no relay)": curves["fedsgd"]["eval_wer"],
        "eval_wer (relay)": curves["relay"]["eval_wer"],
        "eval_cer (no relay)": curves["fedsgd"]["eval_cer"],
        "eval_cer (relay)": curves["relay"]["eval_cer"],
        "relay_norm_ratio": curves["relay"]["relay_norm_ratio"],
    }).dropna(subset=["eval_wer (relay)"])
    pre = pretrained_eval(cfg)
    print()
    print(f"int{args.bits} {cfg.granularity} FedSGD on the default fine-tuning job, seed {cfg.seed} (pretrained: "
          f"held-out WER {pre.get('eval_wer', float('nan')):.3f}, CER {pre.get('eval_cer', float('nan')):.3f})")
    print(markdown(table, ".4f", index=True))
    table.to_csv(out / "table.csv")


if __name__ == "__main__":
    main()
