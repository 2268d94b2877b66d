"""Few-shot benchmark (spec §5, issue 12): 5-way 1-/5-shot accuracy +- 95% CI on novel classes, Tables 5.2/5.3
analog.

For each dataset (the glyph evaluation split; Fashion-MNIST novel classes 5-9 after training on 0-4) and each
method, a Conv-4 (width ``--width``, float32) is trained centrally (one process, one "client" holding every
background class, the fewshot workload's data pipeline and losses) for ``--steps`` steps, then scored by the
workload's own evaluation (``FewShotWorkload.evaluate``: ``--episodes`` novel-class episodes per shot count,
10 queries per class, mean and ``1.96 * std / sqrt(n)``; SVM with ``--svm-episodes`` because every episode
solves a qpth QP) and its backbone's R_FC / R_HV on evaluation features (lower = more clustered / less
hyperplane variation).

Methods and training (Adam lr ``--adam-lr`` unless noted; episodes 5-way 5-shot 10-query):

* ``protonet``, ``r2d2``, ``svm``: one episode per step, query CE of the head;
* ``fomaml`` (first-order MAML; second order is not benchmarked): 5 inner SGD steps lr 0.05 of the whole network
  on the support set, the query gradient at the adapted weights -> Adam on the meta-parameters; evaluation
  adapts the 5-way classifier on the support features (``eval_adapt=head``, the workload's default: 100 gradient
  steps of size 1/L on the support-centred features, :func:`fedaqt.models.fewshot.adapt_classifier`);
* ``reptile``: 5 inner SGD steps lr 0.05 on minibatches of 10 images of one episode, ``theta += eps (theta~ -
  theta)`` with eps decayed linearly 1.0 -> 0.1; evaluated like FOMAML;
* ``classical`` (+ ``R_FC`` weight ``--reg-weight``, + ``R_HV``): CE over all background classes on batches of
  32 classes x 2 images; evaluated by nearest prototype on the backbone features.

Usage: ``python bench/fewshot.py [--quick] [--datasets glyphs,fmnist] [--methods ...]``; ``--quick`` is a smoke
run (few steps and episodes). Needs ``fedaqt data glyphs --out data/glyphs`` (``--glyph-dir``) and
Fashion-MNIST (``apt-get install dataset-fashion-mnist``). Prints the table (and writes it as JSON with
``--json``); asserts nothing.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from common import write_json  # bench/common.py (the script's folder is on sys.path)
import torch.nn.functional as F

from fedaqt.config import RunConfig
from fedaqt.workloads.fewshot import FewShotWorkload

METHODS = ("protonet", "r2d2", "svm", "fomaml", "reptile", "classical", "classical+rfc", "classical+rhv")


def make_workload(dataset: str, method: str, args) -> FewShotWorkload:
    opts = {"dataset": dataset, "width": args.width, "eval_episodes": args.svm_episodes if method == "svm"
            else args.episodes, "k_shot": 5, "q_query": 10, "eval_query": 10}
    if dataset == "glyphs":
        opts["data_dir"] = args.glyph_dir
    alg = "fedsgd"
    if method in ("fomaml", "reptile"):
        opts["method"], alg = "maml", method
    elif method.startswith("classical"):
        opts["method"] = "classical"
        opts["r_fc_weight"] = args.reg_weight if method == "classical+rfc" else 0.0
        opts["r_hv_weight"] = args.reg_weight if method == "classical+rhv" else 0.0
    else:
        opts["method"] = method
    cfg = RunConfig(workload="fewshot", algorithm=alg, num_clients=1, batch_size=64, lr=0.05, seed=args.seed,
                    options=opts)
    wl = FewShotWorkload(cfg)
    wl.prepare()
    return wl


def _inner_sgd(model: torch.nn.Module, batches, lr: float) -> torch.nn.Module:
    """A copy of ``model`` after plain SGD steps (lr) on ``batches`` of (x, y) (BatchNorm statistics update as in
    the clients' FedAvg path)."""
    m = copy.deepcopy(model)
    opt = torch.optim.SGD(m.parameters(), lr=lr)
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()
    return m


def train(wl: FewShotWorkload, method: str, steps: int, adam_lr: float) -> tuple[torch.nn.Module, float]:
    """Central training of ``method`` for ``steps`` steps; returns the model and the seconds it took."""
    from fedaqt.algorithms.meta import _task_minibatches

    model = wl.build_model()
    model.train()
    t0 = time.perf_counter()
    opt = torch.optim.Adam(model.parameters(), lr=adam_lr) if method != "reptile" else None
    for step in range(steps):
        if method == "reptile":  # theta += eps (theta~ - theta), eps 1.0 -> 0.1
            task = wl.client_task(0, step + 1, 0)
            adapted = _inner_sgd(model, _task_minibatches(task, 5, 10, step), 0.05)
            eps = 1.0 - 0.9 * step / max(1, steps - 1)
            with torch.no_grad():
                for p, q in zip(model.parameters(), adapted.parameters()):
                    p.add_(eps * (q - p))
                for b, c in zip(model.buffers(), adapted.buffers()):
                    b.copy_(c)
            continue
        opt.zero_grad()
        if method == "fomaml":  # grad of the query loss at the adapted weights, applied to theta
            xs, ys, xq, yq = wl.client_task(0, step + 1, 0)
            adapted = _inner_sgd(model, [(xs, ys)] * 5, 0.05)
            F.cross_entropy(adapted(xq), yq).backward()
            for p, q in zip(model.parameters(), adapted.parameters()):
                p.grad = q.grad
            with torch.no_grad():  # BatchNorm statistics of the adapted copy (the clients upload their change)
                for b, c in zip(model.buffers(), adapted.buffers()):
                    b.copy_(c)
        else:
            batch = wl.client_batches(0, step + 1, 1, wl.config.batch_size)[0]
            loss, _ = wl.loss(model, batch)
            loss.backward()
        opt.step()
    return model, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 20 steps, 60 episodes")
    ap.add_argument("--datasets", default="glyphs,fmnist")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--glyph-dir", default="data/glyphs")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--episodes", type=int, default=600)
    ap.add_argument("--svm-episodes", type=int, default=200)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--adam-lr", type=float, default=1e-3)
    ap.add_argument("--reg-weight", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.episodes, args.svm_episodes = 20, 60, 20
    torch.set_num_threads(args.threads)
    rows = []
    print(f"# fewshot bench: Conv-4 width {args.width}, {args.steps} training steps, 5-way, 10 queries/class, "
          f"{args.episodes} episodes (svm {args.svm_episodes}), seed {args.seed}", flush=True)
    hdr = (f"{'dataset':8} {'method':14} {'1-shot acc ± CI95':>18} {'5-shot acc ± CI95':>18} {'R_FC':>8} "
           f"{'R_HV':>6} {'train s':>8} {'eval s':>7}")
    print(hdr, flush=True)
    for dataset in args.datasets.split(","):
        for method in args.methods.split(","):
            wl = make_workload(dataset, method, args)
            model, t_train = train(wl, method, args.steps, args.adam_lr)
            t0 = time.perf_counter()
            out = wl.evaluate(model, args.steps)
            t_eval = time.perf_counter() - t0
            row = {"dataset": dataset, "method": method, **out, "train_s": t_train, "eval_s": t_eval,
                   "episodes": wl.options.eval_episodes}
            rows.append(row)
            print(f"{dataset:8} {method:14} {100 * out['eval_acc_1shot']:8.2f} ± {100 * out['eval_ci95_1shot']:5.2f}%"
                  f" {100 * out['eval_acc_5shot']:8.2f} ± {100 * out['eval_ci95_5shot']:5.2f}% {out['r_fc']:8.3f} "
                  f"{out['r_hv']:6.3f} {t_train:8.1f} {t_eval:7.1f}", flush=True)
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
