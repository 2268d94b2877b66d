"""Device traces and the simulated clock (issue 15, must-show 2): stragglers past the deadline are recorded and not
aggregated; simulated round time follows t_k = seconds/compute_speed + 8*(bytes_down+bytes_up)/(bandwidth_mbps*1e6),
recomputed here independently from the messages FakeGrid delivered; the report figure is written."""

import numpy as np
import pandas as pd
import pytest
import torch

from fedaqt.config import ConfigError, RunConfig
from fedaqt.quant.wire import record_nbytes
from fedaqt.protocol import BROADCAST_KEY
from fedaqt.server.app import Server, sample_partitions
from fedaqt.server.clock import load_device_trace, validate_device_trace
from fakegrid import FakeGrid

N = 4
@pytest.fixture(autouse=True)
def _toy(toy_registered):
    torch.set_num_threads(1)


BW = 0.002  # Mbit/s: the transfer term dominates the (jittery) measured compute time


def cfg(tmp_path, trace, deadline=0.0, rounds=2):
    return RunConfig(workload="toy", strategy="fedsgd", bits=32, num_clients=N, clients_per_round=N, rounds=rounds,
                     server_lr=0.5, server_momentum=0.0, seed=0, out=str(tmp_path),
                     options={"device_trace": str(trace), "deadline_s": deadline})


def write_trace(tmp_path):
    p = tmp_path / "trace.csv"
    # clients 2, 3: a 4x slower device (compute and link), so their simulated time is exactly 4x
    p.write_text("# test trace\nclient_id,compute_speed,bandwidth_mbps\n"
                 f"0,1.0,{BW}\n1,1.0,{BW}\n2,0.25,{BW / 4}\n3,0.25,{BW / 4}\n")
    return p


def test_stragglers_formula_and_figure(tmp_path):
    torch.set_num_threads(1)
    trace = write_trace(tmp_path)
    grid = FakeGrid(N)
    Server(cfg(tmp_path / "free", trace), tmp_path / "free").run_rounds(grid)
    clients = pd.read_csv(tmp_path / "free" / "clients.csv")
    rounds = pd.read_csv(tmp_path / "free" / "rounds.csv")
    assert (clients.status == "ok").all()
    down = {int(m.metadata.dst_node_id): record_nbytes(m.content[BROADCAST_KEY]) for m in grid.sent}
    speed = {0: 1.0, 1: 1.0, 2: 0.25, 3: 0.25}
    bw = {0: BW, 1: BW, 2: BW / 4, 3: BW / 4}
    for _, r in clients.iterrows():
        want = r.seconds / speed[r.client_id] + 8 * (down[r.node_id] + r.bytes_up) / (bw[r.client_id] * 1e6)
        assert r.sim_seconds == pytest.approx(want, rel=1e-9)
    for rnd, g in clients.groupby("round"):
        assert rounds.set_index("round").sim_seconds[rnd] == pytest.approx(g.sim_seconds.max())
    assert rounds.sim_time.iloc[-1] == pytest.approx(rounds.sim_seconds.sum())
    fast = clients[clients.client_id < 2].sim_seconds.max()
    slow = clients[clients.client_id >= 2].sim_seconds.min()
    assert slow > 2 * fast
    deadline = float(np.sqrt(fast * slow))

    run = tmp_path / "dl"
    Server(cfg(run, trace, deadline), run).run_rounds(FakeGrid(N))
    c2, r2 = pd.read_csv(run / "clients.csv"), pd.read_csv(run / "rounds.csv")
    assert sorted(c2[c2.status == "straggler"].client_id.unique()) == [2, 3]
    assert (c2[c2.client_id < 2].status == "ok").all()
    assert (r2.clients_ok == 2).all() and (r2.stragglers == 2).all()
    assert r2.sim_seconds.tolist() == pytest.approx([deadline] * 2)

    from fedaqt.report.figures import plot_clock

    out = plot_clock(r2, c2, run / "figures" / "clock.png")
    assert out.exists() and out.stat().st_size > 1000


def test_straggler_not_aggregated(tmp_path):
    """With clients 2, 3 straggling, the aggregated model equals the mean of clients 0, 1's gradients only."""
    torch.set_num_threads(1)
    trace = write_trace(tmp_path)
    s = Server(cfg(tmp_path / "a", trace, deadline=1e-9 + 0.0, rounds=1), tmp_path / "a")
    # deadline tiny: everyone straggles -> the model is unchanged
    before = {k: a.numpy().copy() for k, a in s.arrays.items()}
    s.run_rounds(FakeGrid(N))
    after = {k: a.numpy() for k, a in s.arrays.items()}
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert (pd.read_csv(tmp_path / "a" / "clients.csv").status == "straggler").all()


def test_availability_and_validation(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("tier,fraction,compute_speed,bandwidth_mbps,on_probability\nhi,1,1,10,1\nlo,1,0.5,5,0.5\n")
    tr = load_device_trace(p, 40, seed=3)
    on = tr.available(3, 7)
    u = np.random.default_rng([3, 0xA7A11, 7]).random(40)
    assert on == [c for c in range(40) if tr.device(c).tier == "hi" or u[c] < 0.5]
    parts = sample_partitions(3, 7, 40, 30, on)
    assert set(parts) <= set(on) and len(parts) == min(30, len(on))
    assert sample_partitions(0, 1, 8, 4) == sample_partitions(0, 1, 8, 4, None)
    bad = tmp_path / "bad.csv"
    bad.write_text("client_id,compute_speed,bandwidth_mbps\n0,-1,3\n")
    with pytest.raises(ConfigError, match="compute_speed='-1'"):
        load_device_trace(bad, 1)
    with pytest.raises(ConfigError, match="deadline_s=5 needs a device trace"):
        validate_device_trace(RunConfig(options={"deadline_s": 5}))
    with pytest.raises(ConfigError, match="on_probability"):
        p.write_text("tier,compute_speed,bandwidth_mbps,on_probability\nhi,1,1,1.5\n")
        load_device_trace(p, 4)
