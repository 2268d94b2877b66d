"""``--ray-address`` on a two-node Ray cluster started on this machine (issue 5).

``ray start --head`` plus ``ray start --address HEAD`` with resources of its own make two Ray nodes (1 CPU each),
so the two concurrent client actors must run one on each node. ``fedaqt run --ray-address`` attaches to the
cluster (Flower's backend ``init_args``); ``clients.csv`` must name both node ids, and the metrics must equal
the local run's (same seed). Both nodes run with ``--block`` as children of this test, so the teardown stops
exactly them (SIGTERM, then SIGKILL by pid): ``ray stop`` would stop every Ray process on the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest

from test_repro import (
    ASR_ARGS,
    baseline_asr_run,
    cli_env,
    kill_marked_processes,
    metrics,
    need_speech,
    run_cli,
    schedule,
    short_tmpdir,
)

RAY = str(Path(sys.executable).parent / "ray")
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_ports() -> list[str]:
    """Fresh ports for every service a node would otherwise put on a fixed default port."""
    names = ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
             "runtime-env-agent-port", "metrics-export-port")
    return [f"--{n}={free_port()}" for n in names]


def wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    raise AssertionError(f"Ray node did not start ({path}):\n{path.read_text(errors='replace')[-3000:] if path.exists() else ''}")


@pytest.fixture
def two_node_cluster():
    """(address, node ids) of a head node + one worker node, both on 127.0.0.1, stopped on teardown."""
    need_speech()
    tmp = short_tmpdir("fqc-")
    mark = uuid.uuid4().hex
    env = cli_env(mark)
    env.pop("RAY_ADDRESS", None)
    port = free_port()
    address = f"127.0.0.1:{port}"
    common = ["--block", "--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0", "--object-store-memory=150000000",
              f"--temp-dir={tmp}", "--disable-usage-stats"]
    procs: list[subprocess.Popen] = []
    try:
        head_log = tmp / "head.log"
        procs.append(subprocess.Popen(
            [RAY, "start", "--head", f"--port={port}", "--include-dashboard=false", f"--dashboard-port={free_port()}",
             f"--ray-client-server-port={free_port()}", *common, *node_ports()],
            env=env, stdout=head_log.open("w"), stderr=subprocess.STDOUT, start_new_session=True))
        wait_for(head_log, "Ray runtime started", procs[0])
        worker_log = tmp / "worker.log"
        procs.append(subprocess.Popen(
            [RAY, "start", f"--address={address}", '--resources={"fedaqt_second_node": 1}', *common, *node_ports()],
            env=env, stdout=worker_log.open("w"), stderr=subprocess.STDOUT, start_new_session=True))
        wait_for(worker_log, "Ray runtime started", procs[1])
        probe = subprocess.run(
            [PY, "-c", "import ray, json; ray.init(address='%s', logging_level='ERROR'); "
                       "print(json.dumps([[n['NodeID'], n['Resources']] for n in ray.nodes() if n['Alive']]))" % address],
            env=env, capture_output=True, text=True, timeout=120)
        assert probe.returncode == 0, probe.stderr[-2000:]
        nodes = json.loads(probe.stdout.strip().splitlines()[-1])
        assert len(nodes) == 2 and sum("fedaqt_second_node" in r for _, r in nodes) == 1
        yield address, {n for n, _ in nodes}, mark
    finally:
        for p in reversed(procs):  # worker first, then head
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(procs):
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
        kill_marked_processes(mark, str(tmp))
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.slow
def test_run_attaches_to_two_node_cluster_and_records_node_ids(two_node_cluster):
    address, node_ids, mark = two_node_cluster
    out = short_tmpdir("fqa-") / "run"
    res = run_cli(["run", *ASR_ARGS, "--ray-address", address, "--out", str(out)], cli_env(mark))
    assert res.returncode == 0, res.stdout[-4000:]
    clients = pd.read_csv(out / "clients.csv", dtype={"ray_node_id": str})
    assert (clients.status == "ok").all()
    used = set(clients["ray_node_id"].dropna())
    assert used == node_ids, f"clients ran on {used}, cluster nodes are {node_ids}"
    # every worker process stays on its node
    assert (clients.groupby("pid")["ray_node_id"].nunique() == 1).all()
    # the same seed gives the same metrics on the cluster as on the local Ray instance
    reference = baseline_asr_run()
    pd.testing.assert_frame_equal(metrics(reference), metrics(out))
    pd.testing.assert_frame_equal(schedule(reference), schedule(out))
    assert not (out / "ray").exists()  # attached: no local Ray temp dir


def test_clients_csv_takes_node_id_from_reply_nodeinfo(tmp_path, monkeypatch):
    """A reply's ``nodeinfo`` ConfigRecord (written by clients with ``reply_nodeinfo()``) fills ``ray_node_id``;
    without Ray and without the record the column stays empty."""
    import torch
    from flwr.app import ConfigRecord, RecordDict

    import fedaqt.plugins as plugins
    from fakegrid import FakeGrid
    from fedaqt.config import RunConfig
    from fedaqt.server.app import Server
    from fedaqt.protocol import NODEINFO_KEY
    from fedaqt.client.nodeinfo import reply_nodeinfo, runtime_node_id

    monkeypatch.setitem(plugins._BUILTIN_WORKLOADS, "toy", "toy:ToyWorkload")
    torch.set_num_threads(1)
    assert runtime_node_id() == "" and reply_nodeinfo()["ray_node_id"] == ""

    def tamper(pid, content):
        records = dict(content.items())
        if pid % 2 == 0:
            records[NODEINFO_KEY] = ConfigRecord({"ray_node_id": f"node-{pid}", "hostname": "h"})
        return RecordDict(records)

    cfg = RunConfig(workload="toy", strategy="fedsgd", num_clients=6, clients_per_round=4, rounds=2, out=str(tmp_path))
    Server(cfg, tmp_path).run_rounds(FakeGrid(6, tamper=tamper))
    clients = pd.read_csv(tmp_path / "clients.csv", dtype={"ray_node_id": str})
    for _, row in clients.iterrows():
        want = f"node-{row.client_id}" if row.client_id % 2 == 0 else None
        assert (row.ray_node_id if isinstance(row.ray_node_id, str) else None) == want
