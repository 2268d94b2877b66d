"""Flower ClientApp: decode the quantized broadcast, run one client round, reply with the float update.

A client that raises does not lose the round for the others: it replies with an ``error`` ConfigRecord that the
server records in ``clients.csv`` (status ``error``) and does not aggregate.
"""

from __future__ import annotations

import json
import logging
import os
import traceback

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedaqt.client.trainer import client_round, get_client_model, get_workload, load_broadcast
from fedaqt.config import RunConfig
from fedaqt.quant.uplink import encode_update
from fedaqt.quant.wire import decode_broadcast
from fedaqt.strategies.quantized import BROADCAST_KEY, CONFIG_KEY, ERROR_KEY, METRICS_KEY, QUANT_META_KEY, UPDATE_KEY

log = logging.getLogger("fedaqt.client")

app = ClientApp()


def handle_train(content: RecordDict, node_partition: int | None = None) -> RecordDict:
    """Process one train message's content and return the reply content (never raises)."""
    cfg_rec = content[CONFIG_KEY]
    pid = int(cfg_rec.get("partition-id", node_partition if node_partition is not None else -1))
    try:
        config = RunConfig.from_mapping(json.loads(str(cfg_rec["run-config"])), source="broadcast")
        torch.set_num_threads(max(1, int(config.client_num_cpus)))
        workload = get_workload(config)
        model = get_client_model(workload, config)
        load_broadcast(model, decode_broadcast(content[BROADCAST_KEY], content[QUANT_META_KEY]))
        result = client_round(
            workload,
            model,
            config,
            client_id=pid,
            round_num=int(cfg_rec["server-round"]),
            proximal_mu=float(cfg_rec.get("proximal-mu", 0.0)),
        )
        generator = torch.Generator().manual_seed(hash((config.seed, pid, int(cfg_rec["server-round"]), "uplink")) % (2**31))
        update = encode_update(result.update, config.uplink_bits, generator)
        metrics = {"partition-id": pid, "num-examples": result.num_examples, "pid": os.getpid(), **result.metrics}
        return RecordDict({UPDATE_KEY: update, METRICS_KEY: MetricRecord(metrics)})
    except Exception as exc:  # noqa: BLE001 - reported to the server, which records and skips this client
        log.error("client %s failed: %s", pid, traceback.format_exc())
        return RecordDict(
            {
                METRICS_KEY: MetricRecord({"partition-id": pid, "num-examples": 0}),
                ERROR_KEY: ConfigRecord({"error": f"{type(exc).__name__}: {exc}"}),
            }
        )


@app.train()
def train(msg: Message, context: Context) -> Message:
    node_partition = context.node_config.get("partition-id")
    reply = handle_train(msg.content, int(node_partition) if node_partition is not None else None)
    return Message(content=reply, reply_to=msg)
