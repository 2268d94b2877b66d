"""Device memory budgets (issue 4, must-show 3): over-budget clients are recorded, never aggregated.

A synthetic float32 model whose weights dominate memory (so fp32 and int8 client peaks are far apart) runs
through the real server loop and strategy on the in-process FakeGrid. Budgets are set from the peaks the clients
measure (MemTracker counts bytes exactly, so the peaks are deterministic).
"""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import MetricRecord, RecordDict
from torch import nn

import fedaqt.plugins as plugins
from fedaqt.client.trainer import build_client_model, client_round
from fedaqt.config import ConfigError, RunConfig
from fedaqt.server.app import Server
from fedaqt.server.budgets import assign_tiers, load_device_profile, make_budget_fn, validate_device_profile
from fakegrid import FakeGrid
from toy import ToyWorkload

N_CLIENTS = 4


class WideNet(nn.Module):
    """12 quantized 256x256 layers (3 MiB of float32 weights) and a float head."""

    def __init__(self, depth=12, width=256):
        super().__init__()
        self.enc_in = nn.Linear(16, width)
        self.enc = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.dec = nn.Linear(width, 3)

    def forward(self, x):
        h = torch.tanh(self.enc_in(x))
        for layer in self.enc:
            h = torch.tanh(layer(h))
        return self.dec(h)


class WideWorkload(ToyWorkload):
    """float32, weights >> activations (no single layer dominates); every client has a batch of 4."""

    name = "wide"

    def build_model(self):
        torch.manual_seed(self.config.seed)
        return WideNet()

    def num_partitions(self):
        return N_CLIENTS

    def data(self, client_id, round_num=1):
        g = torch.Generator().manual_seed(1000 * client_id + round_num)
        return torch.randn(4, 16, generator=g), torch.randint(0, 3, (4,), generator=g)

    def evaluate(self, model, round_num):
        with torch.no_grad():
            return {"eval_loss": float(self.loss(model, self.data(0, 0))[0])}


@pytest.fixture(autouse=True)
def wide_registered(monkeypatch):
    monkeypatch.setitem(plugins._BUILTIN_WORKLOADS, "wide", "test_budget:WideWorkload")
    torch.set_num_threads(1)


def config(tmp_path, bits, profile="", uplink_bits=32, **kw):
    return RunConfig(workload="wide", strategy="fedsgd", bits=bits, uplink_bits=uplink_bits, num_clients=N_CLIENTS,
                     clients_per_round=N_CLIENTS, rounds=2, server_lr=0.5, server_momentum=0.0,
                     out=str(tmp_path), seed=0, device_profile=str(profile), **kw)


def measured_peak(tmp_path, bits, uplink_bits):
    """The whole-round peak a client reports to the server (``handle_train`` as FakeGrid calls it: the broadcast
    stays with the caller, so it is counted for the whole round)."""
    from _rss_round import content_for

    from fedaqt.client.app import handle_train

    cfg = config(tmp_path / f"peak{bits}", bits, uplink_bits=uplink_bits)
    return float(handle_train(content_for(cfg, WideWorkload(cfg)), profile=True)["metrics"]["peak_mib"])


@pytest.mark.parametrize("uplink_bits", [32, 8])
def test_budget_admits_int8_but_not_fp32_clients(tmp_path, uplink_bits):
    p32, p8 = measured_peak(tmp_path, 32, uplink_bits), measured_peak(tmp_path, 8, uplink_bits)
    assert p8 < 0.8 * p32, (p8, p32)  # weights dominate: the int8 client is clearly smaller
    between = (p8 + p32) / 2
    csv = tmp_path / "devices.csv"
    # clients 0, 1: a device that fits int8 but not fp32; 2: fits everything; 3: fits nothing
    csv.write_text("client_id,memory_mib,speed\n"
                   f"0,{between:.6f},1.0\n1,{between:.6f},0.5\n2,{10 * p32:.6f},4\n3,{p8 / 2:.6f},0.25\n")
    out = {}
    for bits in (32, 8):
        run_dir = tmp_path / f"run{bits}"
        server = Server(config(run_dir, bits, csv, uplink_bits=uplink_bits), run_dir)
        summary = server.run_rounds(FakeGrid(N_CLIENTS))
        out[bits] = (pd.read_csv(run_dir / "clients.csv"), pd.read_csv(run_dir / "rounds.csv"), summary)

    clients, rounds, summary = out[32]
    status = clients.groupby("client_id").status.agg(set).to_dict()
    assert status == {0: {"over_budget"}, 1: {"over_budget"}, 2: {"ok"}, 3: {"over_budget"}}
    assert (rounds.clients_ok == 1).all()  # only the big device is aggregated
    assert summary["participation_rate"] == pytest.approx(0.25)
    over = clients[clients.status == "over_budget"]
    assert over.error.str.match(r"peak \d+\.\d MiB > budget [\d.]+ MiB").all()
    assert (over.peak_mib > p8).all()

    clients, rounds, summary = out[8]
    status = clients.groupby("client_id").status.agg(set).to_dict()
    assert status == {0: {"ok"}, 1: {"ok"}, 2: {"ok"}, 3: {"over_budget"}}
    assert (rounds.clients_ok == 3).all()
    assert summary["participation_rate"] == pytest.approx(0.75)
    reason = clients[clients.client_id == 3].error.iloc[0]
    assert reason.startswith("peak ") and "> budget" in reason
    # every reply carried its measured profile; the categories sum to the peak
    cats = [c for c in clients.columns if c.startswith("mem_")]
    assert len(cats) == 8  # 7 tensor categories + wire (message bytes, issue 9 item 2)
    np.testing.assert_allclose(clients[cats].sum(axis=1), clients.peak_mib, rtol=1e-9)
    assert (clients.peak_mib > 0).all() and (clients.rss_peak_mib > 0).all()
    status_counts = json.loads((tmp_path / "run8" / "summary.json").read_text())["client_status_counts"]
    assert status_counts == {"ok": 6, "over_budget": 2}


def test_budget_fn_reasons(tmp_path):
    csv = tmp_path / "d.csv"
    csv.write_text("tier,memory_mib\nphone,600\n")
    fn = make_budget_fn(RunConfig(num_clients=3, clients_per_round=3, device_profile=str(csv)))
    ok = RecordDict({"metrics": MetricRecord({"peak_mib": 599.5})})
    big = RecordDict({"metrics": MetricRecord({"peak_mib": 812.34})})
    none = RecordDict({"metrics": MetricRecord({"num-examples": 3})})
    assert fn(0, ok) is None
    assert fn(1, big) == "peak 812.3 MiB > budget 600 MiB (tier phone)"
    assert "no measured peak_mib" in fn(2, none)
    assert "no budget" in fn(7, ok)


def test_tier_assignment_is_deterministic_and_follows_fractions(tmp_path):
    csv = tmp_path / "tiers.csv"
    csv.write_text("tier,memory_mib,speed,fraction\nlow,300,0.5,0.5\nmid,800,1,0.3\nhigh,4000,2,0.2\n")
    a = load_device_profile(csv, 10, seed=3)
    b = load_device_profile(csv, 10, seed=3)
    c = load_device_profile(csv, 10, seed=4)
    assert a.tier_counts() == {"low": 5, "mid": 3, "high": 2}
    assert a.budgets == b.budgets
    assert [a.budgets[i].tier for i in range(10)] != [c.budgets[i].tier for i in range(10)]
    assert {a.budgets[i].memory_mib for i in range(10) if a.budgets[i].tier == "mid"} == {800.0}
    assert a.budgets[0].speed in (0.5, 1.0, 2.0)
    # equal shares without a fraction column, counts differ by at most one
    assert sorted(np.bincount(assign_tiers([1, 1, 1], 32, 0)).tolist()) == [10, 11, 11]


@pytest.mark.parametrize(
    "text, match",
    [
        ("client_id,memory\n0,100\n", "unknown column"),
        ("client_id,speed\n0,1\n", "missing the column 'memory_mib'"),
        ("memory_mib\n100\n", "exactly one of the columns"),
        ("client_id,tier,memory_mib\n0,a,100\n", "exactly one of the columns"),
        ("client_id,memory_mib\n0,100\n1,100\n2,100\n7,100\n", "unknown client_id 7"),
        ("client_id,memory_mib\n0,100\n1,100\n", r"no budget for client_id\(s\) \[2\]"),
        ("client_id,memory_mib\n0,100\n0,100\n1,1\n2,1\n", "listed twice"),
        ("client_id,memory_mib\nx,100\n", "not an integer"),
        ("client_id,memory_mib\n0,lots\n1,1\n2,1\n", "not a number"),
        ("client_id,memory_mib\n0,-5\n1,1\n2,1\n", "> 0"),
        ("tier,memory_mib,fraction\na,100,0\nb,100,0\n", "sum to 0"),
        ("tier,memory_mib\na,100\na,200\n", "listed twice"),
        ("", "empty"),
        ("client_id,memory_mib\n", "no rows"),
    ],
)
def test_bad_device_profiles_fail_before_work(tmp_path, text, match):
    csv = tmp_path / "bad.csv"
    csv.write_text(text)
    cfg = RunConfig(num_clients=3, clients_per_round=3, device_profile=str(csv))
    with pytest.raises(ConfigError, match=match):
        validate_device_profile(cfg)


def test_missing_device_profile_file(tmp_path):
    cfg = RunConfig(num_clients=3, clients_per_round=3, device_profile=str(tmp_path / "nope.csv"))
    with pytest.raises(ConfigError, match="does not exist"):
        validate_device_profile(cfg)
    assert validate_device_profile(RunConfig()) is None


def test_budget_between_training_peak_and_true_peak_rejects(tmp_path):
    """Issue 9 item 2: the budget is checked against the whole round's peak (received broadcast + reply
    included), not the training-only peak that ``peak_mib`` used to report. A device whose budget lies between
    the two is over budget."""
    from _rss_round import content_for

    from fedaqt.client.app import handle_train

    cfg = config(tmp_path / "m", 32)
    content = content_for(cfg, WideWorkload(cfg))
    received = sum(len(a.data) for a in content["arrays"].values()) / 2**20
    reply = handle_train(content, profile=True)
    m = dict(reply["metrics"])
    model = WideNet()
    # independent lower bound of the true peak: at the end of the reply's serialization the model, the
    # broadcast (held by the caller) and the reply's bytes all exist
    state = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    sent = sum(len(a.data) for a in reply["arrays"].values()) / 2**20
    true_lower = state + received + sent
    # the old peak_mib: tensors of the training only (train_peak_mib also counts the broadcast held meanwhile)
    old = m["train_peak_mib"] - received
    assert old < state + sent + 0.5  # model + float32 upload + ~0.1 MiB of activations
    between = state + sent + received / 2
    assert old < between < true_lower <= m["peak_mib"]
    csv = tmp_path / "devices.csv"
    csv.write_text("client_id,memory_mib\n" + "".join(f"{i},{between:.6f}\n" for i in range(N_CLIENTS)))
    run_dir = tmp_path / "run"
    Server(config(run_dir, 32, csv), run_dir).run_rounds(FakeGrid(N_CLIENTS))
    clients = pd.read_csv(run_dir / "clients.csv")
    assert (clients.status == "over_budget").all(), clients[["client_id", "status", "error"]]
    assert (clients.train_peak_mib - received < between).all() and (clients.peak_mib > between).all()
    assert clients.error.str.match(r"peak \d+\.\d MiB > budget [\d.]+ MiB").all()
