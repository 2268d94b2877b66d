"""Client algorithms as plugins (issue 10): the registry, FedSGD's rule, FedAvg's local epochs, momentum / weight
decay, stochastic re-quantization, and a third-party algorithm from the example plugin.

References are independent of the code under test: ``torch.optim.SGD`` on a float copy, plain autograd with a
quantizer written here (``ref_quantize``, ``ref_act`` from test_fedavg_requant), counts of the examples a
workload's loss actually saw, and Bernoulli statistics for the stochastic rounding.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import fedaqt.plugins as plugins
from fedaqt.algorithms.base import ClientAlgorithm
from fedaqt.algorithms.fedavg import FedAvg
from fedaqt.algorithms.fedsgd import FedSGD
from fedaqt.client.trainer import build_client_model, client_round
from fedaqt.config import ConfigError, RunConfig
from fedaqt.quant.convert import quant_layers
from fedaqt.quant.layers import QuantLinear
from fedaqt.quant.quantize import dequantize, quantize
from test_fedavg_requant import ref_act, ref_quantize
from toy import BATCH_SIZES, ToyWorkload

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "fedaqt-example-plugin"
VENV_BIN = Path(sys.executable).parent


def toy_cfg(**kw) -> RunConfig:
    base = dict(workload="toy", strategy="fedavg", algorithm="fedavg", bits=8, num_clients=3, clients_per_round=3,
                rounds=1, seed=0, batch_size=4)
    options = kw.pop("options", {})
    base.update(kw)
    return RunConfig(options=options, **base)


class EpochToy(ToyWorkload):
    """The toy model on a fixed partition of ``SIZES[c]`` examples per client; every example's first feature is
    its id, and :meth:`loss` records the ids it trains on (independent of the algorithm's bookkeeping)."""

    SIZES = (10, 7, 13)

    def __init__(self, config):
        super().__init__(config)
        self.seen: list[list[int]] = []

    def _partition(self, client_id):
        n = self.SIZES[client_id]
        g = torch.Generator().manual_seed(77 + client_id)
        x = torch.randn(n, 6, generator=g, dtype=torch.float64) * 0.1
        x[:, 0] = torch.arange(n, dtype=torch.float64) + 1000 * client_id
        return x, torch.randint(0, 3, (n,), generator=g)

    def partition_size(self, client_id):
        return self.SIZES[client_id]

    def client_epoch_batches(self, client_id, round_num, epoch, batch_size):
        x, y = self._partition(client_id)
        order = torch.from_numpy(np.random.default_rng([self.config.seed, client_id, round_num, epoch]).permutation(len(y)))
        return [(x[order[i:i + batch_size]], y[order[i:i + batch_size]]) for i in range(0, len(y), batch_size)]

    def loss(self, model, batch):
        x, y = batch
        self.seen.append([int(v) for v in x[:, 0]])
        x = x.clone()
        x[:, 0] = 0.0  # the id is bookkeeping, not a feature
        return F.cross_entropy(model(x), y), int(x.shape[0])


# ============================================================================================== registry
def test_builtin_algorithms_are_registered_with_their_upload_kind():
    assert {"fedsgd", "fedavg"} <= set(plugins.algorithm_names())
    assert plugins.get_algorithm_class("fedsgd") is FedSGD and FedSGD.upload == "gradient"
    assert plugins.get_algorithm_class("fedavg") is FedAvg and FedAvg.upload == "delta"
    rows = {(p.name, p.kind): p for p in plugins.list_plugins()}
    for name in ("fedsgd", "fedavg"):
        assert rows[(name, "algorithm")].source == "fedaqt" and rows[(name, "algorithm")].description
    with pytest.raises(plugins.UnknownPluginError) as e:
        plugins.get_algorithm_class("fedsdg")
    assert "fedsdg" in str(e.value) and "fedavg" in str(e.value) and "fedsgd" in str(e.value)
    with pytest.raises(ConfigError, match="algorithm"):
        RunConfig(algorithm="fedsdg").validate(known_algorithms=plugins.algorithm_names())


def test_a_registered_non_algorithm_is_a_clear_error(tmp_path, monkeypatch):
    info = tmp_path / "bad_algo-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: bad-algo\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[fedaqt.algorithms]\nnotalgo = json:dumps\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(plugins.PluginLoadError, match="bad-algo.*not a subclass"):
        plugins.get_algorithm_class("notalgo")
    rows = {(p.name, p.kind): p for p in plugins.list_plugins()}
    assert "failed to load" in rows[("notalgo", "algorithm")].description


def test_fedsgd_rejects_local_steps_through_the_algorithm():
    cfg = toy_cfg(algorithm="fedsgd", local_steps=3)
    cfg.validate(known_algorithms=["fedsgd", "fedavg"])  # the core config no longer knows FedSGD's rule
    with pytest.raises(ConfigError, match="local_steps=3"):
        FedSGD.validate(cfg)
    FedSGD.validate(toy_cfg(algorithm="fedsgd", local_steps=1))
    FedAvg.validate(toy_cfg(local_steps=3))


@pytest.mark.parametrize("options, key, value", [
    ({"momentum": 1.5}, "momentum", "1.5"),
    ({"momentum": -0.1}, "momentum", "-0.1"),
    ({"local_epochs": -1}, "local_epochs", "-1"),
    ({"weight_decay": -1e-4}, "weight_decay", "-0.0001"),
    ({"weight_decay": float("inf")}, "weight_decay", "inf"),
    ({"stochastic_rounding": "maybe"}, "stochastic_rounding", "maybe"),
    ({"local_epochs": 2.5}, "local_epochs", "2.5"),
    ({"local_epochs": 10**9}, "local_epochs", "1000000000"),  # every epoch's batches are built up front: bounded
])
def test_bad_fedavg_options_name_key_value_and_range(options, key, value):
    with pytest.raises(ConfigError) as e:
        FedAvg.validate(toy_cfg(options=options))
    msg = str(e.value)
    assert key in msg and value in msg and "fedavg" in msg, msg


def test_fedavg_options_parse_and_local_epochs_exclude_local_steps():
    opts = FedAvg.parse_options(toy_cfg(options={"momentum": "0.9", "local_epochs": 2, "stochastic_rounding": False,
                                                 "proximal_mu": 0.3}))  # other owners' keys are ignored here
    assert (opts.momentum, opts.local_epochs, opts.weight_decay, opts.stochastic_rounding) == (0.9, 2, 0.0, False)
    with pytest.raises(ConfigError, match="local_epochs=2 and local_steps=4"):
        FedAvg.validate(toy_cfg(local_steps=4, options={"local_epochs": 2}))
    assert FedAvg(toy_cfg(bits=4)).stochastic_rounding_on() and not FedAvg(toy_cfg(bits=8)).stochastic_rounding_on()
    assert FedAvg(toy_cfg(bits=8, options={"stochastic_rounding": True})).stochastic_rounding_on()
    assert not FedAvg(toy_cfg(bits=4, options={"stochastic_rounding": "false"})).stochastic_rounding_on()


# ============================================================================================== local epochs
@pytest.mark.parametrize("epochs", [1, 3])
@pytest.mark.parametrize("client_id", [0, 2])
def test_local_epochs_cover_the_partition_exactly_that_many_times(epochs, client_id):
    cfg = toy_cfg(bits=4, options={"local_epochs": epochs})
    wl = EpochToy(cfg)
    res = client_round(wl, build_client_model(wl, cfg), cfg, client_id=client_id, round_num=2)
    n = EpochToy.SIZES[client_id]
    per_epoch = math.ceil(n / cfg.batch_size)
    assert len(wl.seen) == epochs * per_epoch  # one local step per batch
    ids = [i for batch in wl.seen for i in batch]
    own = set(range(1000 * client_id, 1000 * client_id + n))
    assert len(ids) == epochs * n and set(ids) == own
    for e in range(epochs):  # each epoch: every example exactly once, the last batch smaller
        epoch_ids = [i for batch in wl.seen[e * per_epoch:(e + 1) * per_epoch] for i in batch]
        assert sorted(epoch_ids) == sorted(own), e
        assert [len(b) for b in wl.seen[e * per_epoch:(e + 1) * per_epoch]][-1] == n - (per_epoch - 1) * cfg.batch_size
    if epochs > 1:  # a fresh permutation per epoch
        assert wl.seen[:per_epoch] != wl.seen[per_epoch:2 * per_epoch]
    # the aggregation weight is the examples processed: epochs x partition size, and that is the reply bound
    assert res.num_examples == epochs * n == FedAvg.max_examples(cfg, wl, client_id)
    assert FedAvg.max_examples(toy_cfg(local_steps=5), wl, client_id) == 5 * 4


def test_workloads_epoch_batches_cover_their_partitions():
    """WrapNet (synthetic images) and the default partition facility: every index once per epoch."""
    from test_wrapnet import _synthetic_wrapnet

    cfg = RunConfig(workload="wrapnet", bits=32, num_clients=3, clients_per_round=1, batch_size=16, seed=4,
                    options={"width": 0.0625, "calib_size": 64})
    wl = _synthetic_wrapnet(cfg, n=100)
    x_all = (wl._train[0].to(torch.float32) / 255.0).reshape(100, -1)
    for c in range(3):
        part = wl.partitions()[c]
        assert wl.partition_size(c) == len(part)
        orders = []
        for epoch in range(2):
            batches = wl.client_epoch_batches(c, 5, epoch, 16)
            assert [len(b[1]) for b in batches][:-1] == [16] * (len(batches) - 1)
            xs = torch.cat([b[0] for b in batches]).reshape(-1, x_all.shape[1])
            ys = torch.cat([b[1] for b in batches])
            # match every batch row to its image: exactly the partition, once each
            idx = [int(torch.nonzero((x_all == row).all(1))[0]) for row in xs]
            assert sorted(idx) == sorted(int(i) for i in part)
            assert torch.equal(ys, wl._train[1][idx])
            orders.append(idx)
        assert orders[0] != orders[1]
    with pytest.raises(ValueError, match="out of range"):
        wl.partition_size(3)


def test_asr_epoch_batches_cover_the_client_utterances():
    from fedaqt.workloads.asr import ASRWorkload

    cfg = RunConfig(num_clients=8, clients_per_round=2)
    wl = ASRWorkload(cfg)
    try:
        wl.prepare()
    except FileNotFoundError as exc:
        pytest.skip(f"speech data missing: {exc}")
    utts = wl.client_utterances(3)
    batches = wl.client_epoch_batches(3, 1, 0, 5)
    assert wl.partition_size(3) == len(utts) == sum(len(b["texts"]) for b in batches)
    assert sorted(t for b in batches for t in b["texts"]) == sorted(u.transcript for u in utts)
    assert len(batches) == math.ceil(len(utts) / 5)


def test_workload_without_epochs_says_local_epochs_is_unsupported():
    cfg = toy_cfg(options={"local_epochs": 1})
    wl = ToyWorkload(cfg)
    with pytest.raises(NotImplementedError, match="'toy'.*local_epochs"):
        client_round(wl, build_client_model(wl, cfg), cfg, client_id=0, round_num=1)


# ============================================================================================== momentum, weight decay
@pytest.mark.parametrize("momentum, weight_decay", [(0.9, 0.01), (0.5, 0.0), (0.0, 0.05)])
def test_momentum_and_weight_decay_equal_torch_sgd_at_32_bits(momentum, weight_decay):
    cfg = toy_cfg(bits=32, local_steps=5, lr=0.2, options={"momentum": momentum, "weight_decay": weight_decay})
    wl = ToyWorkload(cfg)
    res = client_round(wl, build_client_model(wl, cfg), cfg, client_id=1, round_num=3)
    ref = wl.build_model()
    start = {k: p.detach().clone() for k, p in ref.named_parameters()}
    opt = torch.optim.SGD(ref.parameters(), lr=cfg.lr, momentum=momentum, weight_decay=weight_decay)
    for batch in wl.client_batches(1, 3, cfg.local_steps, cfg.batch_size):
        opt.zero_grad()
        wl.loss(ref, batch)[0].backward()
        opt.step()
    assert set(res.update) == set(start)
    for k, p in ref.named_parameters():
        delta = p.detach() - start[k]
        assert delta.abs().max() > 1e-3, k
        # the upload is float32 (--uplink-bits 32): its rounding is the only difference
        torch.testing.assert_close(res.update[k].double(), delta, atol=1e-8, rtol=1e-7, msg=k)
    assert res.num_examples == cfg.local_steps * BATCH_SIZES[1]  # examples processed: the aggregation weight


def test_momentum_and_weight_decay_on_quantized_layers_match_plain_reference():
    """At 8 bits (nearest rounding) the momentum/weight-decay step acts on ŵ = s q and is re-quantized after every
    step: plain autograd + SGD-with-momentum formulas + a max-abs quantizer written here."""
    m, wd, lr, steps = 0.9, 0.02, 0.3, 4
    cfg = toy_cfg(bits=8, granularity="channel", local_steps=steps, lr=lr,
                  options={"momentum": m, "weight_decay": wd})
    wl = ToyWorkload(cfg)
    res = client_round(wl, build_client_model(wl, cfg), cfg, client_id=2, round_num=1, profile=True)
    state = {k: v.detach().clone() for k, v in wl.build_model().state_dict().items()}
    qkeys = ("enc1.weight", "enc2.weight")
    cur = {}
    for k, v in state.items():
        if k in qkeys:
            q, s = ref_quantize(v, 8, "channel")
            cur[k] = q * s
        else:
            cur[k] = v.clone()
    start = {k: v.clone() for k, v in cur.items()}
    bufs: dict[str, torch.Tensor] = {}
    for x, y in wl.client_batches(2, 1, steps, cfg.batch_size):
        P = {k: v.clone().requires_grad_(True) for k, v in cur.items()}
        h = x
        for name in ("enc1", "enc2"):
            h = torch.tanh(ref_act(h) @ P[f"{name}.weight"].T + P[f"{name}.bias"])
        F.cross_entropy(h @ P["dec.weight"].T + P["dec.bias"], y).backward()
        with torch.no_grad():
            for k in cur:
                g = P[k].grad + wd * cur[k]
                bufs[k] = g.clone() if k not in bufs else m * bufs[k] + g
                w = cur[k] - lr * bufs[k]
                if k in qkeys:
                    q, s = ref_quantize(w, 8, "channel")
                    w = q * s
                cur[k] = w
    for k in cur:
        ref = cur[k] - start[k]
        assert ref.abs().max() > 1e-3, k
        torch.testing.assert_close(res.update[k].double(), ref, atol=1e-6, rtol=0, msg=k)
    # the momentum buffers are optimizer state in the memory profile
    assert res.metrics["mem_opt_mib"] > 0
    no_m = client_round(wl, build_client_model(wl, toy_cfg(bits=8, local_steps=steps, lr=lr)),
                        toy_cfg(bits=8, local_steps=steps, lr=lr), client_id=2, round_num=1, profile=True)
    assert no_m.metrics["mem_opt_mib"] == 0


# ============================================================================================== stochastic rounding
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_stochastic_quantize_is_unbiased(bits, granularity):
    """Mean of s*q over N independent draws -> w, within 6 standard errors of the Bernoulli rounding per element;
    nearest rounding's error is far outside that bound."""
    torch.manual_seed(0)
    w = torch.randn(6, 9, dtype=torch.float64)
    n = 3000
    gen = torch.Generator().manual_seed(123)
    draws = []
    for _ in range(n):
        q, s = quantize(w, bits, granularity, generator=gen)
        t = 2 ** (bits - 1) - 1
        assert q.dtype == torch.int8 and int(q.abs().max()) <= t
        draws.append(dequantize(q, s))
    mean = torch.stack(draws).mean(0)
    s_b = s.reshape(-1, 1) if s.dim() else s
    frac = w / s_b - torch.floor(w / s_b)
    se = s_b * torch.sqrt(frac * (1 - frac) / n)
    assert ((mean - w).abs() <= 6 * se + 1e-12).all()
    qn, sn = quantize(w, bits, granularity)
    nearest_err = (dequantize(qn, sn) - w).abs()
    assert (nearest_err > 6 * se + 1e-12).float().mean() > 0.5  # the test can tell the two roundings apart
    # codes on the grid stay exactly where they are
    on_grid = dequantize(qn, sn)
    q2, _ = quantize(on_grid, bits, granularity, generator=torch.Generator().manual_seed(5))
    assert torch.equal(q2, qn)


def _one_step_reference(wl, cfg, client_id, round_num):
    """(ŵ_0, gradient at ŵ_0) of the quantized toy layers, plain autograd (nearest quantization written here)."""
    state = {k: v.detach().clone() for k, v in wl.build_model().state_dict().items()}
    qkeys = ("enc1.weight", "enc2.weight")
    w_hat = {}
    for k in qkeys:
        q, s = ref_quantize(state[k], cfg.bits, cfg.granularity)
        w_hat[k] = q * s
    P = {k: (w_hat[k] if k in qkeys else v).clone().requires_grad_(True) for k, v in state.items()}
    x, y = wl.client_batches(client_id, round_num, 1, cfg.batch_size)[0]
    h = x
    for name in ("enc1", "enc2"):
        h = torch.tanh(ref_act(h) @ P[f"{name}.weight"].T + P[f"{name}.bias"])
    F.cross_entropy(h @ P["dec.weight"].T + P["dec.bias"], y).backward()
    return w_hat, {k: P[k].grad for k in qkeys}


def test_fedavg_stochastic_step_is_unbiased(monkeypatch):
    """Over many generator seeds, the mean re-quantized weight after one FedAvg step at 4 bits equals the float
    step ŵ - lr g although the step is smaller than half a code: per element within 6 standard errors of the
    Bernoulli rounding, and over all elements a signed z statistic |Z| < 5, which nearest rounding fails."""
    import fedaqt.client.trainer as trainer

    n = 250
    cfg = toy_cfg(bits=4, granularity="tensor", local_steps=1, lr=0.01)
    wl = ToyWorkload(cfg)
    w_hat, grads = _one_step_reference(wl, cfg, 1, 1)
    seeds = iter(range(10**6))
    monkeypatch.setattr(trainer, "algorithm_generator", lambda *a: torch.Generator().manual_seed(next(seeds)))
    def run(config):  # a fresh client model each time: every draw starts from the same ŵ_0 and float weights
        return client_round(wl, build_client_model(wl, config), config, client_id=1, round_num=1).update

    acc = {k: torch.zeros_like(v) for k, v in w_hat.items()}
    for _ in range(n):
        upd = run(cfg)
        for k in acc:
            acc[k] += upd[k].double()
    nearest = run(cfg.override({"options": {"stochastic_rounding": False}}))
    num = {"sr": 0.0, "nearest": 0.0}
    var = 0.0
    for k in acc:
        step = -cfg.lr * grads[k]
        w_new = w_hat[k] + step
        s_new = w_new.abs().max() / 7  # the fresh max-abs scale of the re-quantized weight (deterministic)
        assert step.abs().max() < 0.5 * s_new  # nearest rounding would round every element of this step away
        frac = w_new / s_new - torch.floor(w_new / s_new)
        se = s_new * torch.sqrt(frac * (1 - frac) / n)
        mean = acc[k] / n
        assert ((mean - step).abs() <= 6 * se + 1e-6 * s_new).all(), k
        num["sr"] += float(((mean - step) * step.sign()).sum())
        num["nearest"] += float(((nearest[k].double() - step) * step.sign()).sum())
        var += float((se ** 2).sum())
    z = {m: v / math.sqrt(var) for m, v in num.items()}
    print("z statistics", z)
    assert abs(z["sr"]) < 5, z
    assert abs(z["nearest"]) > 10, z  # the statistic tells nearest rounding apart


class WideToy(ToyWorkload):
    """A float32 MLP of typical width (Linear 64 -> 256 quantized, tanh, Linear 256 -> 10 float) on random data:
    at lr 0.01 a local step moves each quantized weight by much less than half a code."""

    def build_model(self):
        torch.manual_seed(self.config.seed)
        return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 10))

    def quantize_filter(self, name, module):
        return name == "0"

    def client_batches(self, client_id, round_num, num_batches, batch_size):
        g = torch.Generator().manual_seed(1000 * client_id + round_num)
        return [(torch.randn(batch_size, 64, generator=g), torch.randint(0, 10, (batch_size,), generator=g))
                for _ in range(num_batches)]


@pytest.mark.parametrize("bits", [8, 4])
def test_stochastic_requantization_changes_codes_where_nearest_changes_none(bits):
    """A typical client lr of 0.01: nearest re-quantization changes no code in a round, stochastic changes some."""
    base = dict(bits=bits, granularity="channel", local_steps=4, lr=0.01, batch_size=32)
    changed = {}
    for sr in (False, True):
        cfg = toy_cfg(**base, options={"stochastic_rounding": sr})
        wl = WideToy(cfg)
        model = build_client_model(wl, cfg)
        codes0 = {k: l.codes.clone() for k, l in quant_layers(model).items()}
        res = client_round(wl, model, cfg, client_id=2, round_num=1)
        moved = sum(int((l.codes != codes0[k]).sum()) for k, l in quant_layers(model).items())
        changed[sr] = (moved, res.metrics["changed_fraction"])
    assert changed[False] == (0, 0.0), changed
    assert changed[True][0] > 0 and changed[True][1] > 0, changed


def test_stochastic_requantization_is_deterministic_per_client_and_round():
    cfg = toy_cfg(bits=4, local_steps=3, lr=0.05)
    wl = ToyWorkload(cfg)
    a = client_round(wl, build_client_model(wl, cfg), cfg, client_id=1, round_num=2).update
    b = client_round(wl, build_client_model(wl, cfg), cfg, client_id=1, round_num=2).update
    c = client_round(wl, build_client_model(wl, cfg), cfg, client_id=1, round_num=3).update
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in ("enc1.weight", "enc2.weight"))


def test_requantize_with_generator_on_a_layer():
    lin = torch.nn.Linear(5, 4)
    q = QuantLinear.from_float(lin, 4, "tensor")
    w = q.dequantized_weight() + 0.2 * q.scale  # every element 0.2 codes above its grid point
    draws = []
    for seed in range(400):
        q.requantize_(w, torch.Generator().manual_seed(seed))
        draws.append(q.dequantized_weight())
    torch.testing.assert_close(torch.stack(draws).mean(0), w, atol=float(6 * q.scale * 0.4 / 20), rtol=0)
    q.requantize_(w)
    assert torch.equal(q.dequantized_weight(), dequantize(*ref_quantize_pair(w, 4)))


def ref_quantize_pair(w, bits):
    q, s = ref_quantize(w.double(), bits, "tensor")
    return q.to(torch.int8), s.to(w.dtype)


# ============================================================================================== third-party algorithm
def test_example_algorithm_is_found_and_its_step_matches_plain_torch(with_example):
    """The installed plugin's ``localprox``: w -= lr (g + mu (w - w_0)) per step, checked at 32 bits against a plain
    torch loop; its ``prox_sq_dist`` metric equals the reference's mean ||w_t - w_0||^2."""
    algo = plugins.get_algorithm_class("localprox")
    assert issubclass(algo, ClientAlgorithm) and algo.upload == "delta" and algo.__module__ == "fedaqt_example_plugin"
    rows = {(p.name, p.kind): p for p in plugins.list_plugins()}
    assert rows[("localprox", "algorithm")].source == "fedaqt-example-plugin"
    with pytest.raises(ConfigError, match="prox_mu"):
        algo.validate(RunConfig(workload="blobs", algorithm="localprox", options={"prox_mu": -1}))
    mu, lr, steps = 0.7, 0.3, 4
    cfg = RunConfig(workload="blobs", algorithm="localprox", strategy="fedavg", bits=32, local_steps=steps, lr=lr,
                    batch_size=8, num_clients=4, clients_per_round=2, options={"prox_mu": mu})
    wl = plugins.get_workload_class("blobs")(cfg)
    res = client_round(wl, build_client_model(wl, cfg), cfg, client_id=1, round_num=2)
    ref = wl.build_model()
    p0 = {k: p.detach().clone() for k, p in ref.named_parameters()}
    sq = 0.0
    for x, y in wl.client_batches(1, 2, steps, cfg.batch_size):
        ref.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        with torch.no_grad():
            for k, p in ref.named_parameters():
                sq += float(((p - p0[k]) ** 2).sum())
                p -= lr * (p.grad + mu * (p - p0[k]))
    for k, p in ref.named_parameters():
        torch.testing.assert_close(res.update[k], (p.detach() - p0[k]).float(), atol=1e-6, rtol=1e-5, msg=k)
    assert res.metrics["prox_sq_dist"] > 0
    assert res.metrics["prox_sq_dist"] == pytest.approx(sq / steps, rel=1e-5)
    # the proximal term matters: plain FedAvg moves further
    plain = client_round(wl, build_client_model(wl, cfg), cfg.override({"algorithm": "fedavg", "options": {}}),
                         client_id=1, round_num=2)
    assert sum(float(v.norm()) for v in plain.update.values()) > sum(float(v.norm()) for v in res.update.values())


@pytest.mark.slow
def test_example_algorithm_runs_on_ray(example_site):
    """`fedaqt run --algorithm localprox` with the plugin installed (no change to fedaqt): Ray actors import it,
    its local epochs and metric show in clients.csv."""
    out = Path(tempfile.mkdtemp(prefix="fqa-", dir="/tmp"))  # short: Ray's sockets live in out/ray
    env = dict(os.environ, COLUMNS="250", FLWR_TELEMETRY_ENABLED="0")
    env["PYTHONPATH"] = os.pathsep.join([str(example_site)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    try:
        res = subprocess.run(
            [str(VENV_BIN / "fedaqt"), "run", "--workload", "blobs", "--strategy", "fedavg", "--algorithm", "localprox",
             "-o", "prox_mu=0.5", "-o", "local_epochs=2", "--bits", "4", "--lr", "0.1", "--batch-size", "16",
             "--num-clients", "4", "--clients-per-round", "2", "--rounds", "2", "--eval-every", "1", "--out", str(out)],
            env=env, capture_output=True, text=True, timeout=300, start_new_session=True,
        )
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        rounds = pd.read_csv(out / "rounds.csv")
        clients = pd.read_csv(out / "clients.csv")
        assert list(rounds["round"]) == [1, 2] and rounds["eval_accuracy"].notna().all()
        assert (clients.status == "ok").all() and len(clients) == 4, clients.to_string()
        assert (clients.num_examples == 2 * 64).all()  # local_epochs=2 over a partition of 64
        assert (clients.prox_sq_dist > 0).all() and np.isfinite(clients.prox_sq_dist).all()
        assert (clients.changed_fraction > 0).all()  # stochastic re-quantization at 4 bits moves codes
    finally:
        shutil.rmtree(out, ignore_errors=True)


def test_preflight_checks_the_algorithm_before_ray(toy_registered, tmp_path):
    """preflight: the strategy's upload kind against the algorithm's, the algorithm's own rules and options, and
    local_epochs on a workload without partitions -- all ConfigError before any work starts."""
    from fedaqt.launch.runner import preflight

    base = dict(workload="toy", num_clients=3, clients_per_round=3, out=str(tmp_path / "r"))
    preflight(RunConfig(strategy="fedavg", algorithm="fedavg", options={"momentum": 0.9}, **base))
    with pytest.raises(ConfigError, match="local_epochs is unsupported"):
        preflight(RunConfig(strategy="fedavg", algorithm="fedavg", options={"local_epochs": 2}, **base))
    with pytest.raises(ConfigError, match="FedSGD only"):
        preflight(RunConfig(strategy="relay", algorithm="fedavg", **base))
    with pytest.raises(ConfigError, match="local_steps=2"):
        preflight(RunConfig(strategy="fedsgd", algorithm="fedsgd", local_steps=2, **base))
    with pytest.raises(ConfigError, match="weight_decay"):
        preflight(RunConfig(strategy="fedavg", algorithm="fedavg", options={"weight_decay": -1}, **base))
