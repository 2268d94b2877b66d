"""Arm (b) of bench/speed.py: a plain Flower 1.42 app written as Flower's docs show (``ServerApp`` + ``@app.main()``
running ``FedAvg.start``, ``ClientApp`` + ``@app.train()``, ``run_simulation`` on the Ray backend).

A module of its own (imported as ``bench.speed_flower``, the repository root on ``PYTHONPATH``) so that the Ray
actors unpickle the ClientApp by reference, as they do fedaqt's ``fedaqt.client.app.app``. The client's computation
is :func:`bench.speed.client_step` (the same as the ideal arm's); the run's configuration travels as JSON in the
train ConfigRecord (key ``cfg``), the client's partition is ``context.node_config["partition-id"]``.
"""

from __future__ import annotations

import os
import random
import sys
import traceback

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation

from bench.speed import _client_state, _round_done, client_step

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One FedSGD step: the received weights minus ``lr`` times the gradient of the client's batch."""
    conf = msg.content["config"]
    state = msg.content["arrays"].to_torch_state_dict()
    grads, bdelta, n, loss = client_step(conf["cfg"], state, int(context.node_config["partition-id"]),
                                         int(conf["server-round"]))
    lr = float(conf["lr"])
    new = {k: (v - lr * torch.from_numpy(grads[k])) if k in grads else
           (v + torch.from_numpy(bdelta[k]) if k in bdelta else v) for k, v in state.items()}
    content = RecordDict({"arrays": ArrayRecord(new), "metrics": MetricRecord({"train_loss": loss, "num-examples": n})})
    return Message(content=content, reply_to=msg)


def worker_flower(cfg_json: str, log_path: str) -> None:
    """Run the Flower arm for the RunConfig ``cfg_json``; appends ``round,time.time()`` to ``log_path`` at the end
    of every round (the end of ``evaluate_fn``, which ``Strategy.start`` calls after each round's aggregation)."""
    cfg, wl, model = _client_state(cfg_json)
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        random.seed(cfg.seed)  # Flower samples nodes with the global random module

        def evaluate(rnd: int, arrays: ArrayRecord) -> MetricRecord | None:
            if rnd == 0:  # Strategy.start evaluates the initial model too; fedaqt does not
                return None
            res = None
            if rnd == 1 or rnd == cfg.rounds:  # the evaluations fedaqt runs
                model.load_state_dict(arrays.to_torch_state_dict())
                res = MetricRecord(wl.evaluate(model, rnd))
            _round_done(log_path, rnd)
            return res

        strategy = FedAvg(fraction_train=cfg.clients_per_round / cfg.num_clients, fraction_evaluate=0.0,
                          min_available_nodes=cfg.num_clients)
        strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=cfg.rounds,
                       train_config=ConfigRecord({"lr": float(cfg.server_lr), "cfg": cfg_json}),
                       evaluate_fn=evaluate)

    try:
        run_simulation(server_app=server_app, client_app=app, num_supernodes=cfg.num_clients,
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                       "init_args": {"num_cpus": cfg.num_cpus, "num_gpus": 0,
                                                     "include_dashboard": False,
                                                     "object_store_memory": 256 * 1024 * 1024}})
    except BaseException:  # noqa: BLE001 - a crashed Simulation Runtime leaves the ServerApp thread waiting: exit
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)
