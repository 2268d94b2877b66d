"""Server (driver) memory benchmark (issue 16, must-show 2): the driver process's peak RSS per round, measured side by
side with streaming aggregation (the default) and with every reply held until the round ends
(``-o stream_aggregation=false``, the pre-issue-16 path), for growing clients per round and for a large population.

Each arm is one ``fedaqt run`` subprocess (a fresh driver; Ray and its workers are other processes and are not
counted). The number is rounds.csv ``server_rss_peak_mib``: the driver's ``VmHWM`` over one round, reset at the
round's start (``/proc/self/clear_refs``; the driver runs with ``MALLOC_MMAP_THRESHOLD_=131072`` so freed large
blocks leave the RSS), so it covers the server, Flower's in-memory state and the simulation
engine's threads of that round -- the driver's whole peak, not only what the aggregation holds. The first round
(Ray start, an evaluation) and the last (an evaluation) are excluded: the figure is the max over rounds 2..R-1,
rounds without an evaluation (``--eval-every`` past the run).

A. ``--clients-per-round 8, 32, 128`` of 128 clients: WrapNet VGG-7 at width 0.45 (3.6x the default channels) on Fashion-MNIST (~2M parameters,
   the size of the tiny ASR Conformer, whose corpus has only 80 training speakers = at most 80 clients), FedSGD batch
   4, int8 broadcast, float32 uplink (the update one reply holds is the model size, printed).
B. ``--num-clients 100`` vs ``10000``, 100 clients per round: WrapNet VGG-7 on Fashion-MNIST (FedSGD, batch 4,
   float32), a small model; the population costs no per-client state on the server (one SuperNode per client of a
   round, not per client of the population).

Usage: ``python bench/server_memory.py [--quick] [--parts A,B] [--rounds 3]``. Prints the tables (``--json``
writes them); asserts nothing. Needs ``bash scripts/setup.sh`` (corpus) and Fashion-MNIST.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
from common import write_json  # bench/common.py (the script's folder is on sys.path)

FEDAQT = [str(Path(sys.executable).parent / "fedaqt")]  # the venv's console script


def run_arm(args_list: list[str], out: Path, stream: bool, env: dict) -> dict:
    cmd = [*FEDAQT, "run", *args_list, "--out", str(out), "-o", f"stream_aggregation={'true' if stream else 'false'}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    rounds = pd.read_csv(out / "rounds.csv")
    summary = json.loads((out / "summary.json").read_text())
    steady = rounds[(rounds["round"] >= 2) & (rounds["round"] < rounds["round"].max())]
    return {"peak_mib": float(steady["server_rss_peak_mib"].max()),
            "round1_mib": float(rounds.loc[rounds["round"] == 1, "server_rss_peak_mib"].iloc[0]),
            "clients_ok": int(rounds["clients_ok"].sum()), "clients_sampled": int(rounds["clients_sampled"].sum()),
            "update_mib": float(rounds["bytes_up"].iloc[-1]) / max(1, int(rounds["clients_ok"].iloc[-1])) / 2**20,
            "params": int(summary["num_parameters"]), "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: cpr 4/8 and populations 20/200, 2 rounds")
    ap.add_argument("--parts", default="A,B")
    ap.add_argument("--rounds", type=int, default=3, help=">= 3: rounds 2..R-1 are measured")
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    # large blocks as mmaps that free() gives back, so the RSS follows the live bytes, not glibc's free lists
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
    env.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="ray_srvmem_"))
    rounds = 3 if args.quick else max(3, args.rounds)
    common = ["--rounds", str(rounds), "--eval-every", str(rounds + 100), "--seed", "0", "--num-cpus",
              str(args.num_cpus), "--strategy", "fedsgd", "--algorithm", "fedsgd"]
    print(f"# server_memory bench: driver peak RSS per round (max over rounds 2..{rounds - 1}), fedaqt run subprocesses, "
          f"--num-cpus {args.num_cpus}, load {os.getloadavg()[0]:.1f}", flush=True)
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="srvmem_"))
    if "A" in args.parts:
        cprs = (4, 8) if args.quick else (8, 32, 128)
        n = max(cprs)
        print(f"\n## A: WrapNet VGG-7 width 0.45 on Fashion-MNIST (about the tiny ASR model's size; the speech corpus has "
              f"only 80 training speakers), {n} clients, FedSGD batch 4, int8 broadcast, float32 uplink", flush=True)
        print(f"{'clients/round':>13} {'update MiB':>10} {'streamed MiB':>12} {'held MiB':>9} {'held - streamed':>15} "
              f"{'ok':>7}", flush=True)
        for cpr in cprs:
            arm = ["--workload", "wrapnet", "--bits", "8", "--uplink-bits", "32", "--num-clients", str(n),
                   "--clients-per-round", str(cpr), "--batch-size", "4", "-o", "width=0.45", "-o", "eval_size=200",
                   "-o", "calib_size=64", *common]
            res = {m: run_arm(arm, tmp / f"A{cpr}{m}", m == "stream", env) for m in ("stream", "held")}
            rows.append({"part": "A", "clients_per_round": cpr, "num_clients": n, **{f"{m}_{k}": v for m, r in
                         res.items() for k, v in r.items()}})
            s, h = res["stream"], res["held"]
            print(f"{cpr:13d} {s['update_mib']:10.2f} {s['peak_mib']:12.1f} {h['peak_mib']:9.1f} "
                  f"{h['peak_mib'] - s['peak_mib']:15.1f} {s['clients_ok']:3d}/{s['clients_sampled']:<3d}", flush=True)
        a = [r for r in rows if r["part"] == "A"]
        grow = a[-1]["stream_peak_mib"] - a[0]["stream_peak_mib"]
        print(f"streamed: growth from {a[0]['clients_per_round']} to {a[-1]['clients_per_round']} clients/round "
              f"{grow:+.1f} MiB = {grow / a[0]['stream_update_mib']:+.2f} model sizes "
              f"(held: {(a[-1]['held_peak_mib'] - a[0]['held_peak_mib']) / a[0]['held_update_mib']:+.2f})", flush=True)
    if "B" in args.parts:
        pops = (20, 200) if args.quick else (100, 10000)
        cpr = min(pops) if args.quick else 100
        print(f"\n## B: WrapNet VGG-7 on Fashion-MNIST, {cpr} clients/round, FedSGD batch 4, float32", flush=True)
        print(f"{'num_clients':>11} {'update MiB':>10} {'streamed MiB':>12} {'ok':>9}", flush=True)
        got = []
        for pop in pops:
            arm = ["--workload", "wrapnet", "--bits", "32", "--num-clients", str(pop), "--clients-per-round",
                   str(cpr), "--batch-size", "4", "-o", "eval_size=200", "-o", "calib_size=64", *common]
            r = run_arm(arm, tmp / f"B{pop}", True, env)
            got.append(r)
            rows.append({"part": "B", "clients_per_round": cpr, "num_clients": pop, **{f"stream_{k}": v
                         for k, v in r.items()}})
            print(f"{pop:11d} {r['update_mib']:10.2f} {r['peak_mib']:12.1f} {r['clients_ok']:4d}/{r['clients_sampled']:<4d}",
                  flush=True)
        print(f"population {pops[1]} vs {pops[0]}: {got[1]['peak_mib'] / got[0]['peak_mib']:.3f}x driver peak", flush=True)
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
