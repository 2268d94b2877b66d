"""Client compute at 32 / 8 / 4 bits (issue 16 must-show 1, last part): per quantized layer type and per workload.

Per layer type (Linear, Conv1d pointwise and depthwise, Conv2d, MHA; the shapes of ``bench/int4_packed.py``): the
same forward + backward on the same input, one CPU thread, median of ``--repeats`` timed runs after two warm-ups:
``float`` = torch's own layer (float32), ``int8`` / ``int4`` = fedaqt's native quantized layer as shipped
(``from_float(layer, bits, "channel")``; int4 codes packed two per byte), the weight gradient taken and dropped as
in FedSGD (``set_weight_grad_hook``).

Per workload (``asr`` tiny Conformer from random weights, ``wrapnet``, ``metaformer`` with its preset's options):
the real client path, :func:`fedaqt.client.trainer.client_round` (FedSGD: the client's batch, forward, backward,
the gradient, the upload encoding) on the model :func:`~fedaqt.client.trainer.build_client_model` builds for
``--bits`` 32 / 8 / 4, median over ``--rounds`` client-rounds of the same clients, one thread. Excluded: Flower/Ray
dispatch, broadcast decoding, the server. The workloads need their data (``bash scripts/setup.sh``); a workload
whose data is missing is skipped with the reason.

Prints ``int8/float`` and ``int4/float`` ratios against the issue's <= 1.5 target; asserts nothing.

Usage: ``python bench/layer_bits.py [--repeats 20] [--rounds 6] [--threads 1] [--workloads asr,wrapnet,metaformer]
[--json PATH]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_json  # noqa: E402
from int4_packed import _step  # noqa: E402  (the same forward + backward as the int4 bench)

from fedaqt.quant import QuantConv1d, QuantConv2d, QuantLinear, QuantMultiheadAttention  # noqa: E402

TARGET = 1.5
LAYERS = [
    ("Linear 512->2048", lambda: nn.Linear(512, 2048), (2, 200, 512), QuantLinear),
    ("Conv1d pointwise 512->1024", lambda: nn.Conv1d(512, 1024, 1), (2, 512, 200), QuantConv1d),
    ("Conv1d depthwise 512 k31", lambda: nn.Conv1d(512, 512, 31, padding=15, groups=512), (2, 512, 200), QuantConv1d),
    ("Conv2d 64->64 3x3", lambda: nn.Conv2d(64, 64, 3, padding=1), (2, 64, 32, 32), QuantConv2d),
    ("MHA E=512 H=8", lambda: nn.MultiheadAttention(512, 8), (200, 2, 512), QuantMultiheadAttention),
]
WORKLOAD_OPTIONS = {
    "asr": {"options": {"real_eval": False}},
    "wrapnet": {},
    "metaformer": {"options": {"variant": "small", "mixers": "CCLL"}},
}


def _quantized(cls, f: nn.Module, bits: int) -> nn.Module:
    if cls is QuantMultiheadAttention:
        return cls.from_float(f, bits, "channel", prefix="a.")
    return cls.from_float(f, bits, "channel", "w")


def _time_layer(layer: nn.Module, x: torch.Tensor, is_mha: bool, repeats: int) -> float:
    for m in layer.modules():
        if hasattr(m, "set_weight_grad_hook"):
            m.set_weight_grad_hook(lambda l, g: None)  # FedSGD: the gradient is taken and dropped
    ts = []
    for i in range(repeats + 2):
        t0 = time.perf_counter()
        _step(layer, x, is_mha)
        if i >= 2:
            ts.append(time.perf_counter() - t0)
        layer.zero_grad(set_to_none=True)
    return statistics.median(ts)


def layer_rows(repeats: int) -> list[dict]:
    rows = []
    for name, make, shape, cls in LAYERS:
        torch.manual_seed(0)
        f = make()
        x = torch.randn(shape)
        is_mha = isinstance(f, nn.MultiheadAttention)
        row = {"kind": "layer", "name": name, "float_ms": 1e3 * _time_layer(f, x, is_mha, repeats)}
        for bits in (8, 4):
            row[f"int{bits}_ms"] = 1e3 * _time_layer(_quantized(cls, f, bits), x, is_mha, repeats)
        rows.append(row)
    return rows


def workload_rows(names: list[str], rounds: int) -> list[dict]:
    from fedaqt.client.trainer import build_client_model, client_round
    from fedaqt.config import resolve_config
    from fedaqt.plugins import get_workload_class

    rows = []
    out = tempfile.TemporaryDirectory(prefix="layer-bits-")  # RunConfig needs a run directory; nothing is written
    for name in names:
        row: dict = {"kind": "workload", "name": name}
        try:
            for bits in (32, 8, 4):
                cfg = resolve_config(None, None, {"workload": name, "strategy": "fedsgd", "algorithm": "fedsgd",
                                                  "bits": bits, "seed": 0, "out": out.name,
                                                  **WORKLOAD_OPTIONS.get(name, {})})
                workload = get_workload_class(name)(cfg)
                workload.prepare()
                model = build_client_model(workload, cfg)
                ts = []
                for r in range(1, rounds + 3):
                    t0 = time.perf_counter()
                    client_round(workload, model, cfg, client_id=r % 4, round_num=r, profile=False)
                    if r > 2:  # two warm-up rounds (first batch, feature caches)
                        ts.append(time.perf_counter() - t0)
                row["float_ms" if bits == 32 else f"int{bits}_ms"] = 1e3 * statistics.median(ts)
        except (FileNotFoundError, OSError) as exc:
            row["skipped"] = f"{type(exc).__name__}: {exc}"
        rows.append(row)
    out.cleanup()
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20, help="timed runs per layer")
    ap.add_argument("--rounds", type=int, default=6, help="timed client-rounds per workload and bit-width")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workloads", default="asr,wrapnet,metaformer")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# bench/layer_bits.py: {args.threads} thread(s); load average {os.getloadavg()} (1/5/15 min, "
          f"{os.cpu_count()} CPUs)")
    rows = layer_rows(args.repeats)
    rows += workload_rows([w for w in args.workloads.split(",") if w], args.rounds)
    console = Console(width=max(Console().width, 150))
    t = Table(title=f"client forward + backward: layers median of {args.repeats}, workloads (client_round, FedSGD) "
                    f"median of {args.rounds}; target int8/float and int4/float <= {TARGET}")
    for c in ("", "name", "float ms", "int8 ms", "int4 ms", "int8/float", "int4/float"):
        t.add_column(c, justify="left" if c in ("", "name") else "right")
    for r in rows:
        if "skipped" in r:
            t.add_row(r["kind"], r["name"], "skipped", "", "", "", r["skipped"][:60])
            continue
        ratios = [r[f"int{b}_ms"] / r["float_ms"] for b in (8, 4)]
        r.update({"int8_ratio": ratios[0], "int4_ratio": ratios[1]})
        t.add_row(r["kind"], r["name"], f"{r['float_ms']:.2f}", f"{r['int8_ms']:.2f}", f"{r['int4_ms']:.2f}",
                  *(f"{v:.2f}" + ("" if v <= TARGET else " NOT MET") for v in ratios))
    console.print(t)
    print(f"# load average after {os.getloadavg()}")
    write_json(args.json or "", rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
