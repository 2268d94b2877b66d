"""Issue 15, must-show 4: Flower's fixed-clipping central DP around the quantized strategies (fedaqt.strategies.dp).

* at noise 0 and a clip no update reaches, a DP run's rounds.csv and final model equal the non-DP run's;
* ``dp_epsilon`` per round equals opacus's RDP accountant computed here for the same (q, sigma, steps, delta);
* a client update larger than the clip is scaled to norm C (numpy reference), the mean gets the seeded noise
  N(0, (sigma C max_k w_k)^2), and the relay's correction is applied after it (strategy level, real Messages).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fakegrid import FakeGrid
from fedaqt import protocol
from fedaqt.config import ConfigError, RunConfig
from fedaqt.protocol import BroadcastSpec
from fedaqt.server.app import Server, build_strategy
from fedaqt.strategies.dp import QuantizedDPFixedClipping, rdp_epsilon
from fedaqt.strategies.registry import BUILTIN_STRATEGIES

SHAPES = {"enc.weight": (6, 4), "enc.bias": (6,), "dec.weight": (3, 6)}
NODES = [101, 102, 103]


class NodeGrid:
    def get_node_ids(self):
        return list(NODES)


def _spec(kind: str) -> BroadcastSpec:
    return BroadcastSpec(bits=32, granularity="tensor", quantized_keys=frozenset(), param_shapes=SHAPES,
                         update_kind=kind)


def _normalized(update: dict[str, np.ndarray], n: int, node: int) -> Message:
    return protocol.normalized_reply({k: torch.from_numpy(v) for k, v in update.items()}, list(SHAPES), n, node)


def _round(strategy, w: dict[str, np.ndarray], updates: list[dict[str, np.ndarray]], ns: list[int], rnd: int = 1):
    list(strategy.configure_train(rnd, ArrayRecord({k: Array(v) for k, v in w.items()}), ConfigRecord({}), NodeGrid()))
    replies = [_normalized(u, n, node) for u, n, node in zip(updates, ns, NODES)]
    arrays, metrics = strategy.aggregate_train(rnd, replies)
    return {k: np.asarray(a.numpy()) for k, a in arrays.items()}, metrics


def _cfg(**kw) -> RunConfig:
    base = dict(num_clients=6, clients_per_round=3, algorithm="fedavg", strategy="fedavg", seed=5)
    base.update(kw)
    return RunConfig(**base)


def test_clipping_scales_a_large_update_to_norm_c_and_noise_is_the_seeded_gaussian():
    rng = np.random.default_rng(0)
    w = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    updates = [{k: (rng.normal(size=s) * scale).astype(np.float32) for k, s in SHAPES.items()} for scale in (0.01, 3.0, 0.02)]
    ns = [4, 4, 4]
    C, sigma = 1.0, 0.0
    norms = [np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in u.values())) for u in updates]
    assert norms[0] < C < norms[1] and norms[2] < C  # only the second client is clipped

    cfg = _cfg(options={"dp_clip": C, "dp_noise": sigma})
    dp = build_strategy(cfg, _spec("delta"))
    assert isinstance(dp, QuantizedDPFixedClipping)
    got, metrics = _round(dp, w, updates, ns)
    clipped = [{k: v * min(1.0, C / nrm) for k, v in u.items()} for u, nrm in zip(updates, norms)]
    for k in SHAPES:  # FedAvg: W + mean of the clipped deltas
        ref = w[k].astype(np.float64) + np.mean([c[k].astype(np.float64) for c in clipped], axis=0)
        np.testing.assert_allclose(got[k], ref, rtol=1e-5, atol=1e-6)
    assert np.isclose(np.sqrt(sum(np.sum(clipped[1][k] ** 2) for k in SHAPES)), C)
    assert metrics["dp_clipped"] == pytest.approx(1 / 3) and metrics["dp_noise_std"] == 0.0

    # with noise: the noisy mean is the clipped mean + default_rng([seed, 0xD9, round]).normal(0, sigma C / m)
    sigma = 0.7
    dp = build_strategy(_cfg(options={"dp_clip": C, "dp_noise": sigma}), _spec("delta"))
    got, metrics = _round(dp, w, updates, ns, rnd=3)
    noise_rng = np.random.default_rng([5, 0xD9, 3])
    std = sigma * C / 3
    assert metrics["dp_noise_std"] == pytest.approx(std)
    for k, s in SHAPES.items():
        ref = (w[k].astype(np.float64) + np.mean([c[k].astype(np.float64) for c in clipped], axis=0)
               + noise_rng.normal(0.0, std, size=s))
        np.testing.assert_allclose(got[k], ref, rtol=1e-5, atol=1e-5)
    # unequal weights: the noise std is sigma C max_k w_k (the weighted mean's sensitivity)
    dp = build_strategy(_cfg(options={"dp_clip": C, "dp_noise": sigma}), _spec("delta"))
    _, metrics = _round(dp, w, updates, [2, 3, 5])
    assert metrics["dp_noise_std"] == pytest.approx(sigma * C * 5 / 10)


def test_fedsgd_momentum_steps_on_the_noisy_clipped_mean():
    """FedSGD (FedAvgM): noise goes on the mean gradient, before the momentum step."""
    rng = np.random.default_rng(1)
    w = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    grads = [{k: (rng.normal(size=s) * 2).astype(np.float32) for k, s in SHAPES.items()} for _ in NODES]
    C, sigma, lr = 0.5, 0.3, 0.2
    cfg = _cfg(algorithm="fedsgd", strategy="fedsgd", server_lr=lr, server_momentum=0.0,
               options={"dp_clip": C, "dp_noise": sigma})
    got, _ = _round(build_strategy(cfg, _spec("gradient")), w, grads, [4, 4, 4], rnd=2)
    noise = np.random.default_rng([5, 0xD9, 2])
    for k, s in SHAPES.items():
        clipped = []
        for g in grads:
            nrm = np.sqrt(sum(np.sum(g[j].astype(np.float64) ** 2) for j in SHAPES))
            clipped.append(g[k] * min(1.0, C / nrm))
        mean = np.mean(clipped, axis=0) + noise.normal(0.0, sigma * C / 3, size=s)
        np.testing.assert_allclose(got[k], w[k] - lr * mean, rtol=1e-5, atol=1e-5)


def test_epsilon_is_opacus_rdp():
    from opacus.accountants import RDPAccountant

    for sigma, q, steps, delta in [(1.1, 0.25, 10, 1e-5), (0.8, 1.0, 3, 1e-6), (2.0, 0.05, 200, 1e-5)]:
        acc = RDPAccountant()
        for _ in range(steps):
            acc.step(noise_multiplier=sigma, sample_rate=q)
        assert rdp_epsilon(sigma, q, steps, delta) == pytest.approx(acc.get_epsilon(delta=delta), rel=1e-9)
    assert rdp_epsilon(0.0, 0.5, 4, 1e-5) == float("inf")


def test_dp_options_are_validated():
    with pytest.raises(ValueError, match="dp_clip"):
        build_strategy(_cfg(options={"dp_noise": 1.0}), _spec("delta"))
    from fedaqt.plugins import check_options

    with pytest.raises(ConfigError, match="dp_delta"):
        check_options(_cfg(options={"dp_clip": 1.0, "dp_delta": 2.0}))
    with pytest.raises(ConfigError, match="dp_clip"):
        check_options(_cfg(options={"dp_clip": -1.0}))


@pytest.mark.usefixtures("toy_registered")
def test_noise_zero_huge_clip_equals_the_non_dp_run_and_reports_epsilon(tmp_path):
    """Server round loop (toy workload, FakeGrid): DP at noise 0 / clip 1e9 = the plain run, model and rounds.csv;
    a DP run with noise reports ε per round = opacus's value for (q = 3/6, sigma, round, delta)."""
    base = dict(workload="toy", strategy="fedavgm", algorithm="fedavg", bits=8, local_steps=2, lr=0.1, server_lr=0.3,
                server_momentum=0.9, num_clients=6, clients_per_round=3, rounds=3, eval_every=1, seed=2)
    plain = Server(RunConfig(**base, out=str(tmp_path / "a")), tmp_path / "a")
    plain.run_rounds(FakeGrid(6))
    dp0 = Server(RunConfig(**base, out=str(tmp_path / "b"), options={"dp_clip": 1e9, "dp_noise": 0.0}), tmp_path / "b")
    dp0.run_rounds(FakeGrid(6))
    a, b = pd.read_csv(tmp_path / "a" / "rounds.csv"), pd.read_csv(tmp_path / "b" / "rounds.csv")
    cols = [c for c in a.columns if c not in ("seconds", "server_rss_peak_mib")]  # wall clock, process RSS
    pd.testing.assert_frame_equal(a[cols], b[cols])
    assert (b["dp_clipped"] == 0).all() and np.isinf(b["dp_epsilon"]).all()
    for k, arr in plain.arrays.items():
        np.testing.assert_array_equal(np.asarray(arr.numpy()), np.asarray(dp0.arrays[k].numpy()))

    sigma, delta = 1.3, 1e-5
    noisy = Server(RunConfig(**base, out=str(tmp_path / "c"),
                             options={"dp_clip": 0.05, "dp_noise": sigma, "dp_delta": delta}), tmp_path / "c")
    noisy.run_rounds(FakeGrid(6))
    c = pd.read_csv(tmp_path / "c" / "rounds.csv")
    from opacus.accountants import RDPAccountant

    for r, eps in zip(c["round"], c["dp_epsilon"]):
        acc = RDPAccountant()
        acc.history = [(sigma, 0.5, int(r))]
        assert eps == pytest.approx(acc.get_epsilon(delta=delta), rel=1e-9)
    assert c["dp_epsilon"].is_monotonic_increasing and (c["dp_clipped"] > 0).any()
    assert not np.allclose(np.asarray(noisy.arrays[next(iter(noisy.arrays.keys()))].numpy()),
                           np.asarray(plain.arrays[next(iter(plain.arrays.keys()))].numpy()))


@pytest.mark.usefixtures("toy_registered")
def test_streamed_dp_round_equals_the_held_replies_round(tmp_path):
    """Streaming aggregation with DP (each update clipped as it arrives, noise from max n_k / sum n_k) = the
    held-replies path through Flower's-style list aggregation (noise > 0, some clients clipped)."""
    base = dict(workload="toy", strategy="fedavgm", algorithm="fedavg", bits=8, local_steps=2, lr=0.1, server_lr=0.3,
                server_momentum=0.9, num_clients=6, clients_per_round=3, rounds=3, eval_every=1, seed=2)
    opts = {"dp_clip": 0.05, "dp_noise": 0.7}
    runs = {}
    for mode in (True, False):
        out = tmp_path / str(mode)
        srv = Server(RunConfig(**base, out=str(out), options={**opts, "stream_aggregation": mode}), out)
        srv.run_rounds(FakeGrid(6))
        runs[mode] = (srv, pd.read_csv(out / "rounds.csv"))
    (s, a), (h, b) = runs[True], runs[False]
    assert (a["dp_clipped"] > 0).any()
    for c in ("dp_clipped", "dp_noise_std", "dp_epsilon", "clients_ok"):
        np.testing.assert_allclose(a[c], b[c], rtol=1e-12)
    np.testing.assert_allclose(a["train_loss"], b["train_loss"], rtol=1e-5)
    for k, arr in h.arrays.items():
        np.testing.assert_allclose(np.asarray(s.arrays[k].numpy()), np.asarray(arr.numpy()), rtol=1e-5, atol=1e-7)
