"""Meta-learning as SSL benchmark (spec §7, issue 13): linear-evaluation accuracy of the ssl-meta backbone
(ProtoNet / R2-D2 heads on augmented views) vs a SimCLR contrastive baseline with the same backbone and budget, with
and without large rotation as task augmentation (the seed's Tables 7.1 / 7.5 analog).

Every arm trains the ssl-meta workload's Conv-4 (width ``--width``, float32, projection to 128) centrally (one
process; the workload's own views, episodes and losses, ``client_batches`` of client 0 of 1) on the unlabeled
Fashion-MNIST training images for ``--steps`` Adam steps (lr ``--lr``) of ``--batch`` base images x 2 views
(1 support + 1 query: SimCLR's m = 2), then scores the frozen backbone by the workload's linear evaluation
(L-BFGS logistic regression on ``--linear-train`` labeled training images' features, top-1 on the 10,000 test
images) and by the workload's few-shot evaluation (600 seed-fixed 5-way 1-/5-shot episodes, 15 queries per
class, over the test images: nearest class mean of the frozen backbone's features; the CI covers the evaluation
episodes only). ``untrained`` is the randomly initialized backbone under the same evaluation. Rotation arms add
``task_rotation=true`` (one angle per base image for all its views); ``+rotloss`` adds the auxiliary 4-way rotation
loss (weight 1, 25% of the base images). Prints the table (``--json``); asserts nothing.

Usage: ``python bench/ssl_meta.py [--quick] [--arms ...]``. Needs ``apt-get install dataset-fashion-mnist``.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from common import write_json  # bench/common.py (the script's folder is on sys.path)

from fedaqt.config import RunConfig
from fedaqt.workloads.ssl_meta import SSLMetaWorkload

ARMS = {
    "untrained": None,
    "simclr": {"method": "simclr"},
    "protonet": {"method": "protonet"},
    "r2d2": {"method": "r2d2"},
    "simclr+rot": {"method": "simclr", "task_rotation": True},
    "protonet+rot": {"method": "protonet", "task_rotation": True},
    "r2d2+rot": {"method": "r2d2", "task_rotation": True},
    "protonet+rotloss": {"method": "protonet", "rot_loss_weight": 1.0},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 20 steps, 1000 linear-eval images")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--linear-train", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.linear_train = 20, 1000
    torch.set_num_threads(args.threads)
    print(f"# ssl_meta bench: Fashion-MNIST, Conv-4 width {args.width}, {args.steps} Adam steps lr {args.lr} of "
          f"{args.batch} base images x 2 views, linear eval on {args.linear_train} labeled train images -> 10000 test, "
          f"seed {args.seed}, load {os.getloadavg()[0]:.1f}", flush=True)
    print(f"{'arm':18} {'linear acc':>10} {'5w1s acc ± CI95':>16} {'5w5s acc ± CI95':>16} {'train s':>8}",
          flush=True)
    rows = []
    for arm in args.arms.split(","):
        opts = {"width": args.width, "linear_train": args.linear_train, **(ARMS[arm] or {})}
        wl = SSLMetaWorkload(RunConfig(workload="ssl-meta", num_clients=1, batch_size=args.batch, seed=args.seed,
                                       options=opts))
        wl.prepare()
        model = wl.build_model()
        t0 = time.perf_counter()
        if ARMS[arm] is not None:
            opt = torch.optim.Adam(model.parameters(), lr=args.lr)
            for step in range(args.steps):
                opt.zero_grad()
                loss, _ = wl.loss(model, wl.client_batches(0, step + 1, 1, args.batch)[0])
                loss.backward()
                opt.step()
        t_train = time.perf_counter() - t0
        out = wl.evaluate(model, args.steps)
        rows.append({"arm": arm, **out, "train_s": t_train})
        print(f"{arm:18} {100 * out['linear_acc']:9.2f}% {100 * out['fewshot_acc_1shot']:7.2f} ± "
              f"{100 * out['fewshot_ci95_1shot']:4.2f}% {100 * out['fewshot_acc_5shot']:7.2f} ± "
              f"{100 * out['fewshot_ci95_5shot']:4.2f}% {t_train:8.1f}", flush=True)
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
