"""Flower ServerApp: float global model, quantized broadcast, evaluation, checkpoints, run directory.

The round loop is ours rather than ``Strategy.start``: ``start`` always begins at round 1 and has no per-round
hook, while a run here must write ``rounds.csv``/``clients.csv`` and an atomic checkpoint after every round and
resume from the last complete one. Each round still calls the strategy's own ``configure_train`` /
``aggregate_train`` exactly as ``start`` does, and ``grid.send_and_receive`` in between.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from torch import nn

from fedaqt.config import RunConfig
from fedaqt.plugins import get_strategy_plugin, get_workload_class
from fedaqt.quant.convert import quantized_weight_keys
from fedaqt.report.rundir import RunDir, write_json_atomic
from fedaqt.strategies.quantized import BroadcastSpec
from fedaqt.workloads.base import Workload

log = logging.getLogger("fedaqt.server")

ProgressFn = Callable[[int, dict[str, Any]], None]


def float_state_split(model: nn.Module) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(trainable parameters, floating-point buffers) of the float model as numpy arrays."""
    params = {k: p.detach().cpu().numpy().copy() for k, p in model.named_parameters()}
    buffers = {k: b.detach().cpu().numpy().copy() for k, b in model.named_buffers() if b.is_floating_point()}
    return params, buffers


def make_spec(config: RunConfig, workload: Workload, model: nn.Module) -> BroadcastSpec:
    params, buffers = float_state_split(model)
    qkeys = quantized_weight_keys(model, workload.quantize_filter) if config.bits < 32 else []
    extra = workload.broadcast_quantized_keys(model) if config.bits < 32 and hasattr(workload, "broadcast_quantized_keys") else []
    return BroadcastSpec(
        bits=config.bits,
        granularity=config.granularity,
        quantized_keys=frozenset(list(qkeys) + list(extra)),
        param_shapes={k: tuple(v.shape) for k, v in params.items()},
        buffer_shapes={k: tuple(v.shape) for k, v in buffers.items()},
        update_kind="gradient" if config.algorithm == "fedsgd" else "delta",
    )


def load_into(model: nn.Module, params: dict[str, np.ndarray], buffers: dict[str, np.ndarray]) -> None:
    state = {k: torch.from_numpy(np.asarray(v)) for k, v in {**params, **buffers}.items()}
    model.load_state_dict(state, strict=False)


class Server:
    """Drives the rounds of one run. ``grid`` is Flower's Grid (or any object with ``get_node_ids`` and
    ``send_and_receive``)."""

    def __init__(self, config: RunConfig, run_dir: str | Path, progress: ProgressFn | None = None) -> None:
        self.config = config
        self.run = RunDir(run_dir)
        self.progress = progress
        self.workload: Workload = get_workload_class(config.workload)(config)
        self.model = self.workload.build_model()
        self.spec = make_spec(config, self.workload, self.model)
        plugin = get_strategy_plugin(config.strategy)
        self.strategy = plugin.factory(config)
        params, buffers = float_state_split(self.model)
        self.strategy.setup_quantized(
            self.spec, buffers, config.seed, config.num_clients, config.clients_per_round, budget_fn=self.budget_fn()
        )
        self.arrays = ArrayRecord({k: Array(v) for k, v in params.items()})
        self.start_round = 1
        self.history: list[dict[str, Any]] = []

    def budget_fn(self) -> Any:
        """Memory-budget check of replies (``--device-profile``); None admits every client."""
        if not self.config.device_profile:
            return None
        from fedaqt.sim.devices import make_budget_fn

        return make_budget_fn(self.config)

    def evaluate(self, round_num: int) -> dict[str, float]:
        params = {k: a.numpy() for k, a in self.arrays.items()}
        load_into(self.model, params, self.strategy.buffers)
        return self.workload.evaluate(self.model, round_num)

    def should_evaluate(self, rnd: int) -> bool:
        return rnd == 1 or rnd == self.config.rounds or rnd % self.config.eval_every == 0

    def run_rounds(self, grid: Any) -> dict[str, Any]:
        cfg = self.config
        train_config = ConfigRecord({"run-config": json.dumps(cfg.to_dict(), sort_keys=True)})
        for rnd in range(self.start_round, cfg.rounds + 1):
            t0 = time.perf_counter()
            messages = list(self.strategy.configure_train(rnd, self.arrays, ConfigRecord(dict(train_config)), grid))
            replies = list(grid.send_and_receive(messages, timeout=float(cfg.options.get("round_timeout", 3600))))
            new_arrays, metrics = self.strategy.aggregate_train(rnd, replies)
            if new_arrays is not None:
                self.arrays = new_arrays
            else:
                log.warning("round %d: no client update was aggregated; the global model is unchanged", rnd)
            stats = dict(self.strategy.last_round_stats)
            row: dict[str, Any] = {
                "round": rnd,
                "train_loss": float(metrics["train_loss"]) if metrics is not None else math.nan,
                "bytes_down": int(stats.pop("bytes_down", 0)),
                "bytes_up": int(stats.pop("bytes_up", 0)),
                "clients_ok": int(stats.pop("clients_ok", 0)),
                "clients_sampled": len(messages),
            }
            row.update(stats)
            if self.should_evaluate(rnd):
                row.update(self.evaluate(rnd))
            row["seconds"] = time.perf_counter() - t0
            self.run.rounds.append([row])
            self.run.clients.append([r.as_dict() for r in self.strategy.last_client_rows])
            self.history.append(row)
            if self.progress:
                self.progress(rnd, row)
        return self.finish()

    def finish(self) -> dict[str, Any]:
        import pandas as pd

        rounds = pd.read_csv(self.run.rounds.path)
        clients = pd.read_csv(self.run.clients.path)
        summary: dict[str, Any] = {
            "rounds_completed": int(rounds["round"].max()) if len(rounds) else 0,
            "config": self.config.to_dict(),
            "workload": self.workload.describe(),
            "num_parameters": int(sum(p.numel() for p in self.model.parameters())),
            "num_quantized_tensors": len(self.spec.quantized_keys),
            "participation_rate": float((clients["status"] == "ok").mean()) if len(clients) else 0.0,
            "client_status_counts": clients["status"].value_counts().to_dict() if len(clients) else {},
            "total_bytes_down": int(rounds["bytes_down"].sum()),
            "total_bytes_up": int(rounds["bytes_up"].sum()),
            "wall_seconds": float(rounds["seconds"].sum()),
        }
        evals = rounds.dropna(subset=[c for c in self.workload.eval_columns[:1] if c in rounds])
        if len(evals):
            first, last = evals.iloc[0], evals.iloc[-1]
            for col in self.workload.eval_columns:
                if col in rounds:
                    summary[f"first_{col}"] = _num(first.get(col))
                    summary[f"final_{col}"] = _num(last.get(col))
        write_json_atomic(self.run.summary_path, summary)
        return summary


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def make_server_app(config: RunConfig, run_dir: str | Path, progress: ProgressFn | None = None, result: dict | None = None) -> ServerApp:
    """A ServerApp bound to ``config``; the run summary is stored in ``result["summary"]`` when given."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        server = Server(config, run_dir, progress)
        summary = server.run_rounds(grid)
        if result is not None:
            result["summary"] = summary

    return app
