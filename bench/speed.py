"""Speed and scale regression check (issue 16): ``fedaqt run`` against the same client computations run
in-process ("ideal") and against a plain Flower 1.42 app, in one invocation, with the same model, data, seeds and
concurrency. Prints start-up, steady round and whole-process time with their ratios.

Workload: the ASR workload (:mod:`fedaqt.workloads.asr`) from random weights (``fedaqt run --from-scratch``), the
corpus in ``data/speech``, FedSGD, the configuration ``fedaqt run`` resolves with the flags below (tiny Conformer,
32 clients, batch 8, gradient checkpointing on, seed 0, float32 uplink), ``--num-cpus`` cores, one core per client.
Every arm is a fresh subprocess (so its start-up is measured):

* ``ideal``: one process tree, no Flower, no Ray: a ``multiprocessing`` pool of ``--num-cpus`` workers (spawned once,
  ``torch.set_num_threads(1)``), each building the workload and model once; per round the sampled clients are dealt
  round-robin to the lanes (the model sent once per lane, each lane returns its ``n_k``-weighted sums), each client's
  FedSGD step (the client's batch from ``Workload.client_batches``, the seeding of
  :func:`fedaqt.client.trainer.client_round`, forward, backward, the gradient) packed on those lanes, then the
  ``n_k``-weighted mean and the server SGD step with momentum (``--server-lr``, ``--server-momentum`` as fedaqt's
  FedSGD strategy). Clients: :func:`fedaqt.server.app.sample_partitions`' schedule (the same formula, written out
  here so that this arm imports no Flower).
* ``flower``: a plain Flower 1.42 app as Flower's docs show: ``ServerApp`` + ``@app.main()`` running
  ``flwr.serverapp.strategy.FedAvg(fraction_train=C/N, fraction_evaluate=0).start(grid, initial_arrays=ArrayRecord
  (state_dict), num_rounds=R)``, ``ClientApp`` + ``@app.train()`` (partition = ``node_config["partition-id"]``, the
  same per-client computation, returns ``params - server_lr * grad`` as an ArrayRecord and a MetricRecord with
  ``num-examples``), ``run_simulation(num_supernodes=N, backend_config={"client_resources": {"num_cpus": 1},
  "init_args": {"num_cpus": --num-cpus, ...}})``. Flower samples the clients itself (``random.sample``, seeded),
  so its partitions differ from the other arms' (same distribution of batch sizes, lengths differ); no server
  momentum (FedAvg of the stepped weights).
* ``fedaqt``: ``.venv/bin/fedaqt run --workload asr --strategy fedsgd --algorithm fedsgd --bits B --from-scratch
  --no-real-eval -o eval_max=1`` for each ``--bits``.

Same work in every arm: fedaqt always evaluates after the first and the last round (``Server.should_evaluate``);
here that is the cheapest evaluation it offers (``-o eval_max=1``: one utterance of each of the 8 held-out speakers,
no real speech), and the ideal and Flower arms run the same ``ASRWorkload.evaluate`` after rounds 1 and R. Not in
the other arms: fedaqt's rounds.csv/clients.csv rows, checkpoint, memory probe, reply validation, summary + figure.

Times (wall clock, ``time.time()``): *start-up to first steady round* = from spawning the process to the end of
round 1 (Ray/pool start, model build, round 1 with its evaluation); *steady round* = median over rounds 2..R of the
time between consecutive round ends; *whole process* = spawn to exit. A round ends: ideal after the server step and
evaluation; Flower at the end of ``evaluate_fn`` (called after every round's aggregation); fedaqt when its rounds.csv
row is written (file mtime, polled), i.e. after aggregation and evaluation, before clients.csv and the checkpoint (so
a round's checkpoint is in the next round's interval). fedaqt's own rounds.csv ``seconds`` (configure_round to the
end of evaluation, without the CSV/checkpoint writes: fedaqt/server/app.py ``run_rounds``) is shown as ``csv_s``.

Usage: ``python bench/speed.py [--clients-per-round 2,8] [--rounds 6] [--repeats 2] [--bits 32,8,4]
[--arms ideal,flower,fedaqt] [--num-cpus 2] [--json PATH]``. Prints min and median over repeats and the ratios
against the issue's targets (steady round <= 0.8x Flower and <= 1.2x ideal; start-up <= 0.6x Flower); asserts
nothing. Needs the corpus (``bash scripts/setup.sh``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FEDAQT = str(Path(sys.executable).parent / "fedaqt")  # the venv's console script
#: the issue's must-show targets: (quantity, reference arm, the largest fedaqt/reference ratio)
TARGETS = (("steady", "flower", 0.8), ("steady", "ideal", 1.2), ("startup", "flower", 0.6))


# ---------------------------------------------------------------------------------------------- the configuration
def run_config(clients_per_round: int, rounds: int, num_cpus: int, bits: int = 32):
    """The RunConfig ``fedaqt run`` resolves for the fedaqt arm's flags (no preset, --from-scratch)."""
    from fedaqt.config import resolve_config

    return resolve_config(None, None, {
        "workload": "asr", "strategy": "fedsgd", "algorithm": "fedsgd", "bits": bits, "rounds": rounds,
        "clients_per_round": clients_per_round, "num_cpus": num_cpus,
        "options": {"real_eval": False, "eval_max": 1},
    })


def fedaqt_flags(cfg) -> list[str]:
    return ["--workload", "asr", "--strategy", "fedsgd", "--algorithm", "fedsgd", "--bits", str(cfg.bits),
            "--rounds", str(cfg.rounds), "--clients-per-round", str(cfg.clients_per_round),
            "--num-cpus", str(cfg.num_cpus), "--from-scratch", "--no-real-eval", "-o", "eval_max=1"]


def sample_clients(seed: int, rnd: int, num_clients: int, clients_per_round: int) -> list[int]:
    """fedaqt's schedule (fedaqt/server/app.py ``sample_partitions``, no device trace), written out so that the
    ideal arm imports no Flower."""
    import numpy as np

    rng = np.random.default_rng([seed, 7919, rnd])
    return sorted(rng.choice(num_clients, size=clients_per_round, replace=False).tolist())


# ---------------------------------------------------------------------------------------------- the client step
_CLIENT: dict = {}


def _client_state(cfg_json: str):
    """(config, workload, model) of this process, built once (as fedaqt's client caches them)."""
    if cfg_json not in _CLIENT:
        import torch

        from fedaqt.config import RunConfig
        from fedaqt.plugins import get_workload_class

        torch.set_num_threads(1)
        cfg = RunConfig.from_mapping(json.loads(cfg_json))
        wl = get_workload_class(cfg.workload)(cfg)
        _CLIENT[cfg_json] = (cfg, wl, wl.build_model())
    return _CLIENT[cfg_json]


def client_step(cfg_json: str, state: dict, client_id: int, rnd: int):
    """One FedSGD client round on float weights ``state`` (name -> numpy array or tensor): returns (gradient of the
    parameters, change of the float buffers, examples, loss), numpy float32."""
    import torch

    cfg, wl, model = _client_state(cfg_json)
    model.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()}, strict=False)
    torch.manual_seed(hash((cfg.seed, client_id, rnd)) % (2**31))  # as fedaqt.client.trainer.client_round
    model.train()
    wl.set_checkpointing(model, cfg.checkpointing)
    batch = wl.client_batches(client_id, rnd, 1, cfg.batch_size)[0]
    bufs0 = {k: b.detach().clone() for k, b in model.named_buffers() if b.is_floating_point()}
    model.zero_grad(set_to_none=True)
    loss, n = wl.loss(model, batch)
    loss.backward()
    grads = {k: (p.grad if p.grad is not None else torch.zeros_like(p)).numpy().copy()
             for k, p in model.named_parameters()}
    bdelta = {k: (b.detach() - bufs0[k]).numpy() for k, b in model.named_buffers() if k in bufs0}
    return grads, bdelta, int(n), float(loss.detach())


def _round_done(log_path: str, rnd: int) -> None:
    with open(log_path, "a") as f:
        f.write(f"{rnd},{time.time():.6f}\n")


# ---------------------------------------------------------------------------------------------- arm (a): ideal
def _ideal_init(cfg_json: str) -> None:
    _client_state(cfg_json)


def _ideal_lane(args):
    """One lane's clients of a round, one after another: (sum n_k * gradient_k, sum n_k * buffer change_k, sum n_k),
    float64, so that the model travels once per lane and round, not once per client."""
    import numpy as np

    cfg_json, state, clients, rnd = args
    gsum: dict = {}
    bsum: dict = {}
    total = 0
    for c in clients:
        grads, bdelta, n, _ = client_step(cfg_json, state, c, rnd)
        for acc, part in ((gsum, grads), (bsum, bdelta)):
            for k, v in part.items():
                acc[k] = acc.get(k, 0.0) + v.astype(np.float64) * n
        total += n
    return gsum, bsum, total


def worker_ideal(cfg_json: str, log_path: str) -> None:
    import multiprocessing as mp

    import numpy as np
    import torch

    torch.set_num_threads(1)
    cfg, wl, model = _client_state(cfg_json)  # the server's copy (evaluation)
    params = {k: p.detach().numpy().copy() for k, p in model.named_parameters()}
    buffers = {k: b.detach().numpy().copy() for k, b in model.named_buffers() if b.is_floating_point()}
    velocity = {k: np.zeros_like(v) for k, v in params.items()}
    with mp.get_context("spawn").Pool(cfg.num_cpus, initializer=_ideal_init, initargs=(cfg_json,)) as pool:
        for rnd in range(1, cfg.rounds + 1):
            clients = sample_clients(cfg.seed, rnd, cfg.num_clients, cfg.clients_per_round)
            state = {**params, **buffers}
            lanes = [clients[i::cfg.num_cpus] for i in range(cfg.num_cpus) if clients[i::cfg.num_cpus]]
            results = pool.map(_ideal_lane, [(cfg_json, state, lane, rnd) for lane in lanes], chunksize=1)
            total = sum(n for _, _, n in results)
            for k in params:  # weighted mean gradient, server SGD with momentum (fedaqt's FedSGD strategy)
                g = sum(r[0][k] for r in results) / total
                velocity[k] = cfg.server_momentum * velocity[k] + g.astype(np.float32)
                params[k] = params[k] - cfg.server_lr * velocity[k]
            for k in buffers:
                buffers[k] = buffers[k] + (sum(r[1][k] for r in results) / total).astype(buffers[k].dtype)
            if rnd == 1 or rnd == cfg.rounds:
                model.load_state_dict({k: torch.from_numpy(v) for k, v in {**params, **buffers}.items()}, strict=False)
                wl.evaluate(model, rnd)
            _round_done(log_path, rnd)


# ---------------------------------------------------------------------------------------------- the driver
def _env(ray_tmp: Path) -> dict:
    env = dict(os.environ)
    env.update({"PYTHONPATH": str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""),
                "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "FLWR_TELEMETRY_ENABLED": "0",
                "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0", "RAY_TMPDIR": str(ray_tmp)})
    return env


def _times(spawn: float, ends: dict[int, float], exit_t: float, rounds: int) -> dict:
    if sorted(ends) != list(range(1, rounds + 1)):
        raise RuntimeError(f"round ends recorded for rounds {sorted(ends)}, expected 1..{rounds}")
    gaps = [ends[r] - ends[r - 1] for r in range(2, rounds + 1)]
    return {"startup": ends[1] - spawn, "steady": statistics.median(gaps) if gaps else float("nan"),
            "whole": exit_t - spawn, "round_gaps": gaps}


def run_arm(arm: str, cfg, work: Path, ray_root: Path, timeout: float) -> dict:
    """Spawn one arm (``ideal``, ``flower`` or ``fedaqt``) and time it; raises RuntimeError when it fails or runs
    past ``timeout`` seconds (its process group is then killed)."""
    work.mkdir(parents=True, exist_ok=True)
    log_path, out = work / "rounds.log", work / "run"
    # Ray's sockets live under RAY_TMPDIR/ray/session_<date>_<pid>/sockets/ (AF_UNIX paths <= 107 bytes): a short dir
    ray_tmp = Path(tempfile.mkdtemp(prefix="r", dir=ray_root))
    if arm == "fedaqt":
        cmd = [FEDAQT, "run", *fedaqt_flags(cfg), "--out", str(out)]
    else:
        cmd = [sys.executable, __file__, "--worker", arm, "--worker-config", json.dumps(cfg.to_dict()),
               "--worker-log", str(log_path)]
    ends: dict[int, float] = {}
    csv_path = out / "rounds.csv"
    with open(work / "stdout.txt", "w") as so:
        spawn = time.time()
        proc = subprocess.Popen(cmd, env=_env(ray_tmp), stdout=so, stderr=subprocess.STDOUT, cwd=ROOT,
                                start_new_session=True)  # its own process group: killed whole on a timeout
        while proc.poll() is None:
            if time.time() - spawn > timeout:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                shutil.rmtree(ray_tmp, ignore_errors=True)
                raise RuntimeError(f"{arm} ran past --arm-timeout {timeout:g} s (killed); its output: {work / 'stdout.txt'}")
            if arm == "fedaqt" and csv_path.exists():  # a rounds.csv row is written when a round ends
                st = csv_path.stat()
                n = max(0, csv_path.read_text().count("\n") - 1)
                for r in range(len(ends) + 1, n + 1):
                    ends[r] = st.st_mtime
            time.sleep(0.01)
        exit_t = time.time()
    shutil.rmtree(ray_tmp, ignore_errors=True)
    if proc.returncode != 0:
        tail = (work / "stdout.txt").read_text()[-3000:]
        raise RuntimeError(f"{arm} failed ({proc.returncode}): {' '.join(cmd[:4])} ...\n{tail}")
    rec: dict = {}
    if arm == "fedaqt":
        import pandas as pd

        rows = pd.read_csv(csv_path)
        n = len(rows)
        for r in range(len(ends) + 1, n + 1):  # rows written in the last poll interval
            ends[r] = csv_path.stat().st_mtime
        rec["csv_s"] = float(rows.loc[rows["round"] >= 2, "seconds"].median()) if n > 1 else float("nan")
    else:
        for line in log_path.read_text().splitlines():
            r, t = line.split(",")
            ends[int(r)] = float(t)
    rec.update(_times(spawn, ends, exit_t, cfg.rounds))
    return rec


def _fmt(v: float) -> str:
    return f"{v:.2f}" if v == v else "nan"


def report(cpr: int, runs: list[dict], arms: list[str]) -> list[str]:
    """Lines of the table of one clients/round setting; ``runs`` are the run records of that setting."""
    from common import markdown  # bench/common.py
    import pandas as pd

    by_arm: dict[str, dict[str, list[float]]] = {}
    for r in runs:
        d = by_arm.setdefault(r["arm_label"], {"startup": [], "steady": [], "whole": [], "csv_s": []})
        for k in d:
            if k in r:
                d[k].append(r[k])
    table, med = [], {}
    for label in arms:
        if label not in by_arm:
            continue
        d = by_arm[label]
        row = {"arm": label, "n": len(d["whole"])}
        for k in ("startup", "steady", "whole"):
            row[f"{k} min"], row[f"{k} med"] = min(d[k]), statistics.median(d[k])
        row["csv_s med"] = statistics.median(d["csv_s"]) if d["csv_s"] else float("nan")
        med[label] = row
        table.append(row)
    lines = [f"\n### {cpr} clients/round (seconds; min and median over repeats)\n", markdown(pd.DataFrame(table), ".2f")]
    ratio_rows = []
    for label in arms:
        if not label.startswith("fedaqt") or label not in med:
            continue
        row = {"arm": label}
        for q, ref, limit in (("startup", "flower", 0.6), ("startup", "ideal", None), ("steady", "flower", 0.8),
                              ("steady", "ideal", 1.2), ("whole", "flower", None), ("whole", "ideal", None)):
            if ref not in med:
                continue
            m = med[label][f"{q} med"] / med[ref][f"{q} med"]
            mn = med[label][f"{q} min"] / med[ref][f"{q} min"]
            cell = f"{m:.2f} ({mn:.2f})"
            if limit is not None:
                cell += f" <= {limit}: {'MET' if m <= limit else 'NOT MET'}"
            row[f"{q}/{ref}"] = cell
        ratio_rows.append(row)
    if ratio_rows:
        lines += ["\nratios fedaqt/reference: median (min); targets judged on the medians\n",
                  markdown(pd.DataFrame(ratio_rows))]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients-per-round", default="2,8", help="comma-separated clients per round (default 2,8)")
    ap.add_argument("--rounds", type=int, default=6, help="rounds per run (>= 2; default 6)")
    ap.add_argument("--repeats", type=int, default=2, help="runs of every arm per setting (default 2)")
    ap.add_argument("--bits", default="32,8,4", help="fedaqt broadcast bit-widths (default 32,8,4)")
    ap.add_argument("--arms", default="ideal,flower,fedaqt", help="subset of ideal,flower,fedaqt")
    ap.add_argument("--num-cpus", type=int, default=2, help="cores given to every arm (one per client; default 2)")
    ap.add_argument("--work", default="", help="scratch directory (default: a fresh temp dir, removed)")
    ap.add_argument("--arm-timeout", type=float, default=1800.0, help="kill an arm's run after this many seconds")
    ap.add_argument("--json", default="", help="write every run's record here")
    ap.add_argument("--worker", choices=("ideal", "flower"), help=argparse.SUPPRESS)
    ap.add_argument("--worker-config", help=argparse.SUPPRESS)
    ap.add_argument("--worker-log", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        if args.worker == "ideal":
            worker_ideal(args.worker_config, args.worker_log)
        else:  # an importable module, so that Ray pickles the ClientApp by reference (as fedaqt's own)
            from bench.speed_flower import worker_flower

            worker_flower(args.worker_config, args.worker_log)
        return

    def ints(s: str, name: str) -> list[int]:
        try:
            out = [int(x) for x in s.split(",") if x.strip()]
        except ValueError:
            raise SystemExit(f"--{name} {s!r}: expected comma-separated integers") from None
        if not out:
            raise SystemExit(f"--{name} {s!r}: empty")
        return out

    cprs, bits = ints(args.clients_per_round, "clients-per-round"), ints(args.bits, "bits")
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = [a for a in arms if a not in ("ideal", "flower", "fedaqt")]
    if bad or not arms:
        raise SystemExit(f"--arms {args.arms!r}: unknown arm(s) {bad}; choose from ideal, flower, fedaqt")
    if [b for b in bits if b not in (32, 8, 4)]:
        raise SystemExit(f"--bits {args.bits!r}: each must be 32, 8 or 4")
    if args.rounds < 2:
        raise SystemExit(f"--rounds {args.rounds}: need >= 2 (round 1 is start-up, the steady round is rounds 2..R)")
    if args.repeats < 1 or args.num_cpus < 1:
        raise SystemExit(f"--repeats {args.repeats} / --num-cpus {args.num_cpus}: must be >= 1")
    from fedaqt.config import ConfigError
    from fedaqt.launch.runner import preflight

    try:  # bad input (clients/round over the population, missing corpus) fails here, before any run
        for c in cprs:
            for b in bits:
                preflight(run_config(c, args.rounds, args.num_cpus, b))
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from None

    labels = [a for a in arms if a != "fedaqt"] + ([f"fedaqt-{b}" for b in bits] if "fedaqt" in arms else [])
    ray_root = Path(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir())
    ray_root.mkdir(parents=True, exist_ok=True)
    if len(str(ray_root.resolve())) > 40:
        raise SystemExit(f"RAY_TMPDIR={ray_root} is too long for Ray's unix sockets (107 bytes); use <= 40 characters")
    work = Path(args.work or tempfile.mkdtemp(prefix="speed-", dir=ray_root))
    cfg0 = run_config(cprs[0], args.rounds, args.num_cpus)
    print(f"# bench/speed.py: ASR {cfg0.options.get('model_size', 'tiny')} Conformer from scratch, FedSGD, "
          f"{cfg0.num_clients} clients, batch {cfg0.batch_size}, {args.rounds} rounds, --num-cpus {args.num_cpus} "
          f"(1 core per client), {args.repeats} repeat(s), arms {', '.join(labels)}")
    print("# start-up = process spawn -> end of round 1 (the first steady round follows); steady = median of round "
          "2..R intervals; whole = spawn -> exit.\n# every arm evaluates after rounds 1 and R (8 held-out utterances); "
          "excluded from ideal/Flower: fedaqt's CSV rows, checkpoints, reply validation, summary/figure.")
    load0 = os.getloadavg()
    print(f"# load average before: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f} (1/5/15 min; {os.cpu_count()} CPUs)")
    records, lines = [], []
    for c in cprs:
        runs = []
        for rep in range(args.repeats):
            for label in labels:
                arm, b = (label.split("-")[0], int(label.split("-")[1])) if label.startswith("fedaqt") else (label, 32)
                cfg = run_config(c, args.rounds, args.num_cpus, b)
                la = os.getloadavg()[0]
                rec = run_arm(arm, cfg, work / f"c{c}-r{rep}-{label}", ray_root, args.arm_timeout)
                rec.update({"arm_label": label, "arm": arm, "bits": b, "clients_per_round": c, "repeat": rep,
                            "load1_before": la, "load1_after": os.getloadavg()[0]})
                print(f"  cpr {c} repeat {rep + 1} {label}: start-up {rec['startup']:.2f} s, steady {rec['steady']:.2f} s"
                      f", whole {rec['whole']:.2f} s (load {la:.2f})", flush=True)
                runs.append(rec)
        records += runs
        lines += report(c, runs, labels)
    load1 = os.getloadavg()
    print("\n".join(lines))
    print(f"\n# load average after: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    if args.json:
        from common import write_json  # bench/common.py (the script's folder is on sys.path)

        write_json(args.json, records)  # one row per run, with the 1-min load average before and after it
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
