"""Subprocess helper of tests/test_true_peak.py: one real client round (``handle_train``) of a 64 MiB float32
model, measured two ways. Prints one JSON line: the probe's tracked peak and the process's RSS (``VmRSS`` before
the round, ``VmHWM`` after it; the probe resets the high-water mark when the round starts).

Run with ``MALLOC_MMAP_THRESHOLD_`` set low so that every large block is an ``mmap`` given back on ``free``: the
RSS then follows the live bytes instead of the allocator's free lists.

Usage: ``python tests/_rss_round.py {release|keep} {32|8}`` (release the broadcast as it is decoded or keep it;
client bits).
"""

from __future__ import annotations

import json
import sys

import torch

import fedaqt.plugins as plugins
from test_budget import WideNet, WideWorkload


class BigWorkload(WideWorkload):
    """16 float32 1024x1024 layers: 64 MiB of weights, activations negligible (batch 4)."""

    name = "bigwide"

    def build_model(self):
        torch.manual_seed(self.config.seed)
        return WideNet(depth=16, width=1024)


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def content_for(cfg, workload):
    from flwr.app import ConfigRecord, RecordDict

    from fedaqt.quant.convert import quantized_weight_keys
    from fedaqt.quant.wire import encode_broadcast
    from fedaqt.protocol import BROADCAST_KEY, CONFIG_KEY, QUANT_META_KEY

    model = workload.build_model()
    qkeys = list(quantized_weight_keys(model, workload.quantize_filter)) if cfg.bits < 16 else []
    state = {k: p.detach() for k, p in model.named_parameters()}
    arrays, meta = encode_broadcast(state, qkeys, cfg.bits if cfg.bits < 16 else 32, cfg.granularity)
    del state, model
    train_cfg = ConfigRecord({"run-config": json.dumps(cfg.to_dict(), sort_keys=True), "partition-id": 0,
                              "server-round": 1})
    return RecordDict({BROADCAST_KEY: arrays, QUANT_META_KEY: meta, CONFIG_KEY: train_cfg})


def main(mode: str, bits: int) -> None:
    from fedaqt.client.app import handle_train
    from fedaqt.config import RunConfig
    from fedaqt.protocol import BROADCAST_KEY, METRICS_KEY

    torch.set_num_threads(1)
    plugins._BUILTIN_WORKLOADS["wide"] = "test_budget:WideWorkload"
    plugins._BUILTIN_WORKLOADS["bigwide"] = "_rss_round:BigWorkload"
    base = dict(strategy="fedsgd", uplink_bits=32, num_clients=4, clients_per_round=4, seed=0)
    warm = RunConfig(workload="wide", bits=bits, **base)  # warm-up: lazy imports, kernels, allocator arenas
    handle_train(content_for(warm, WideWorkload(warm)), profile=True, release_broadcast=True)
    cfg = RunConfig(workload="bigwide", bits=bits, **base)
    content = content_for(cfg, BigWorkload(cfg))
    received = sum(len(a.data) for a in content[BROADCAST_KEY].values())
    rss0 = status_kib("VmRSS") * 1024
    reply = handle_train(content, profile=True, release_broadcast=(mode == "release"))
    hwm = status_kib("VmHWM") * 1024
    m = dict(reply.metric_records[METRICS_KEY])
    print(json.dumps({"peak_mib": m["peak_mib"], "train_peak_mib": m["train_peak_mib"], "rss0": rss0, "hwm": hwm,
                      "received": received, "wire_mib": m["mem_wire_mib"]}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
