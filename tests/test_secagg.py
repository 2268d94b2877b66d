"""Issue 15, must-show 3: Flower's SecAgg+ (SecAggPlusWorkflow + secaggplus_mod) around fedaqt's FedSGD rounds.

Fast tests run the real round loop (:class:`fedaqt.server.app.Server`) on the toy workload (3 clients with batch
sizes 2, 3, 5: unequal weights) and deliver every message through fedaqt's real ClientApp with its mods
(``tests/secagg_grid.py``), so all four SecAgg+ stages, the key agreement, the masks and the unmasking are Flower's.
The reference is a plain run of the same seed (same partitions, broadcast and gradients): the numpy weighted mean of
its clients' float32 updates.

* ``--uplink-bits 32``: the SecAgg+ mean equals the numpy mean within the bound of Flower's quantizer, computed
  here: ``m (2C/T) / sum dq_k`` (stochastic rounding, one level per client) + ``sum_k |dq_k/sum dq - n_k/sum n| |u_k|``
  (the weights rounded to 1/T);
* ``--uplink-bits 8`` (shared scale): the SecAgg+ mean equals ``s_t sum n_k q_k / sum n_k`` of the clients' own
  int8 codes to float64 rounding (the masked integer sum is exact), and the float mean within ``s_t`` (no clipping);
* the relay's result (model after the server step) with SecAgg+ equals the relay's without it within the bound
  carried through the (linear) relay correction;
* a masked reply whose plaintext metrics fail validation is withheld before the sum: SecAgg+ recovers the other
  clients' sum from the secret shares and the mean equals the plain mean of those clients;
* combinations that cannot work are refused before any work starts.

``test_secagg_ray_end_to_end`` (slow) runs the tiny ASR job on Ray (``run_experiment``) with and without SecAgg+.
"""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import ConfigRecord

from fakegrid import FakeGrid
from fedaqt.config import ConfigError, RunConfig
from fedaqt.protocol import METRICS_KEY, NUM_EXAMPLES, SECAGG_KEYS, SECAGG_SCALES, UPDATE_KEY
from fedaqt.quant.quantize import qmax, relay_correction
from fedaqt.server.app import Server
from secagg_grid import AppGrid
from toy import BATCH_SIZES

pytestmark = pytest.mark.usefixtures("toy_registered")

W = 6  # batch_size = max_weight: the toy clients' batches are 2, 3, 5 examples


def _cfg(tmp_path, name, uplink=32, secagg=True, strategy="fedsgd", **opts) -> RunConfig:
    options = {"secagg": True, **opts} if secagg else dict(opts)
    return RunConfig(workload="toy", strategy=strategy, bits=8, uplink_bits=uplink, num_clients=3, clients_per_round=3,
                     rounds=1, batch_size=W, eval_every=1, seed=3, server_lr=0.5, out=str(tmp_path / name),
                     options=options)


def _run(cfg: RunConfig, grid) -> tuple[Server, list[list[tuple[dict[str, np.ndarray], int]]]]:
    """Run ``cfg`` on ``grid``; returns the server and, per round, what its strategy's aggregate_train received."""
    server = Server(cfg, cfg.out)
    seen: list = []
    inner = server.strategy.aggregate_train

    def spy(rnd, replies):
        replies = list(replies)
        seen.append([({k: np.asarray(a.numpy(), dtype=np.float64) for k, a in m.content[UPDATE_KEY].items()},
                      int(m.content[METRICS_KEY][NUM_EXAMPLES])) for m in replies])
        return inner(rnd, replies)

    server.strategy.aggregate_train = spy
    server.run_rounds(grid)
    return server, seen


def _plain_updates(tmp_path, strategy="fedsgd"):
    """The clients' float32 updates of round 1 (partition order) from a plain run of the same seed."""
    # held replies: the spy on aggregate_train sees every client's update (streaming would hand it only the mean)
    server, seen = _run(_cfg(tmp_path, f"plain-{strategy}", 32, secagg=False, strategy=strategy,
                             stream_aggregation=False), FakeGrid(3))
    ups = seen[0]
    assert [n for _, n in ups] == list(BATCH_SIZES[:3])
    return server, ups


def _numpy_mean(ups):
    total = sum(n for _, n in ups)
    return {k: sum(u[k] * (n / total) for u, n in ups) for k in ups[0][0]}


def _float_bound(ups, clip, levels):
    """Per-element bound of |SecAgg+ mean - numpy weighted mean| at float32 (module docstring)."""
    ns = np.array([n for _, n in ups], dtype=np.float64)
    dq = np.array([round(n / W * levels) / levels for n in ns])
    wq, w = dq / dq.sum(), ns / ns.sum()
    return {k: len(ups) * (2 * clip / levels) / dq.sum() + sum(abs(a - b) * np.abs(u[k]) for a, b, (u, _) in
                                                                zip(wq, w, ups))
            for k in ups[0][0]}


def test_float32_secagg_mean_equals_the_plain_mean_within_the_quantizer_bound(tmp_path):
    _, ups = _plain_updates(tmp_path)
    ref = _numpy_mean(ups)
    server, seen = _run(_cfg(tmp_path, "sa32", 32), AppGrid(3))
    assert len(seen[0]) == 1  # the strategy got the securely aggregated mean only
    mean, total = seen[0][0]
    assert total == sum(BATCH_SIZES[:3])
    bound = _float_bound(ups, 8.0, 2**22)
    for k in ref:
        err = np.abs(mean[k] - ref[k])
        assert (err <= bound[k]).all(), (k, float(err.max()), float(bound[k].max()))
        assert float(bound[k].max()) < 2e-5  # 3 levels of 16/2^22 over sum dq = 10/6, plus the weight rounding
    rounds = pd.read_csv(tmp_path / "sa32" / "rounds.csv")
    clients = pd.read_csv(tmp_path / "sa32" / "clients.csv")
    assert (clients.status == "ok").all() and (clients.secagg_clipped == 0).all()
    assert list(clients.num_examples) == list(BATCH_SIZES[:3])
    # the masked vector travels as int64: 8 bytes per element (+ the weight and .npy headers)
    numel = sum(v.size for v in ref.values())
    assert rounds.secagg_masked_bytes[0] >= 3 * 8 * (numel + 1)
    assert rounds.bytes_up[0] > rounds.secagg_masked_bytes[0]  # + public keys, encrypted shares, unmask shares


def test_int8_shared_scale_sum_is_exact_and_within_one_step_of_the_float_mean(tmp_path):
    from fedaqt.client.secagg import secagg_reply
    from flwr.common import parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat

    _, ups = _plain_updates(tmp_path)
    ref = _numpy_mean(ups)
    amax = max(float(np.abs(u[k]).max()) for u, _ in ups for k in u)
    init = 1.05 * amax  # round-1 element range: no code is clipped
    cfg = _cfg(tmp_path, "sa8", 8, secagg_scale_init=init)
    server, seen = _run(cfg, AppGrid(3))
    mean, total = seen[0][0]
    keys, scales = server.secagg.keys, server.secagg.scales
    assert scales == pytest.approx([init / 127] * len(keys), rel=1e-12)
    # the clients' own codes: what each handed to secaggplus_mod (same seed -> the same stochastic rounding)
    train_cfg = ConfigRecord({SECAGG_KEYS: keys, SECAGG_SCALES: scales})
    codes = []
    for pid, (u, n) in enumerate(ups):
        rd = secagg_reply(train_cfg, {k: torch.from_numpy(u[k].astype(np.float32)) for k in keys}, n, {}, cfg, pid, 1)
        arrs = parameters_to_ndarrays(compat.recorddict_to_fitres(rd, keep_input=True).parameters)
        codes.append(dict(zip(keys, arrs)))
    for i, k in enumerate(keys):
        q = np.stack([c[k] for c in codes])
        assert np.array_equal(q, np.round(q)) and np.abs(q).max() <= 127
        exact = scales[i] * sum(n * c[k] for (_, n), c in zip(ups, codes)) / total
        np.testing.assert_allclose(mean[k], exact, rtol=0, atol=1e-12 * scales[i])  # the masked integer sum is exact
        err = np.abs(mean[k] - ref[k])
        assert (err < scales[i]).all(), (k, float(err.max()), scales[i])  # one shared step, unbiased rounding
    clients = pd.read_csv(tmp_path / "sa8" / "clients.csv")
    assert (clients.secagg_clipped == 0).all() and (clients.status == "ok").all()
    # the next round's shared scale: headroom x max|this round's mean| / 127
    server.secagg.update_scales(mean)
    nxt = server.secagg.shared_scales()
    assert nxt == pytest.approx([4.0 * float(np.abs(mean[k]).max()) / 127 for k in keys], rel=1e-12)


@pytest.mark.parametrize("uplink", [32, 8])
def test_relay_with_secagg_equals_the_relay_without_it(tmp_path, uplink):
    plain, ups = _plain_updates(tmp_path, strategy="relay")
    amax = max(float(np.abs(u[k]).max()) for u, _ in ups for k in u)
    opts = {"secagg_scale_init": 1.05 * amax} if uplink == 8 else {}
    sec, seen = _run(_cfg(tmp_path, f"relay{uplink}", uplink, strategy="relay", **opts), AppGrid(3))
    if uplink == 8:
        bound = {k: np.full(np.shape(v), s) for (k, v), s in zip(_numpy_mean(ups).items(), sec.secagg.scales)}
    else:
        bound = _float_bound(ups, 8.0, 2**22)
    lr = 0.5
    sent = plain.strategy.sent_quantized  # round 1's broadcast codes + scales (the same in both runs)
    assert sent and set(sent) == set(sec.strategy.sent_quantized)
    rel = pd.read_csv(tmp_path / f"relay{uplink}" / "rounds.csv")
    assert rel.relay_norm_ratio[0] > 0
    w0 = {k: np.asarray(v, dtype=np.float64) for k, v in sec.strategy.current_float.items()}
    for k in w0:
        a = np.asarray(plain.arrays[k].numpy(), dtype=np.float64)
        b = np.asarray(sec.arrays[k].numpy(), dtype=np.float64)
        # |relay(g1) - relay(g2)| = |d + corr(d)| <= B + |corr(B sign(Q(w) - w))| (corr is linear, |d| <= B)
        extra = 0.0
        if k in sent:
            qt = sent[k]
            qw = qt.dequantize().to(torch.float64)
            worst = torch.from_numpy(bound[k]) * torch.sign(qw - torch.from_numpy(w0[k]))
            extra = np.abs(relay_correction(worst, torch.from_numpy(w0[k]).float(), 8, "tensor", scale=qt.scale,
                                            codes=qt.codes).numpy())
            assert np.abs(extra).max() > 0
        tol = lr * (bound[k] + extra) + 4 * np.finfo(np.float32).eps * np.abs(a)  # + float32 rounding of the model
        assert (np.abs(a - b) <= tol).all(), (k, float(np.abs(a - b).max()), float(np.max(tol)))
        assert not np.array_equal(a, w0[k])


def test_a_reply_that_fails_validation_is_left_out_and_secagg_recovers_the_others(tmp_path):
    """Client 1 claims more examples than it was asked for: refused before the masked sum; SecAgg+ (threshold 2 of
    3 shares) removes its masks and the mean is the plain mean of clients 0 and 2."""
    _, ups = _plain_updates(tmp_path)

    def tamper(stage, node, reply):
        content = reply.content
        if stage == 2 and "fitres.metrics" in content.config_records:
            m = content.config_records["fitres.metrics"]
            if int(m["partition-id"]) == 1:
                m[NUM_EXAMPLES] = 99
        return reply

    cfg = _cfg(tmp_path, "drop", 32, secagg_num_shares=3, secagg_threshold=2)
    server, seen = _run(cfg, AppGrid(3, tamper=tamper))
    mean, total = seen[0][0]
    kept = [ups[0], ups[2]]
    assert total == BATCH_SIZES[0] + BATCH_SIZES[2]
    ref, bound = _numpy_mean(kept), _float_bound(kept, 8.0, 2**22)
    for k in ref:
        assert (np.abs(mean[k] - ref[k]) <= bound[k]).all(), k
    clients = pd.read_csv(tmp_path / "drop" / "clients.csv").set_index("client_id")
    assert clients.loc[1, "status"] == "rejected" and "exceeds" in clients.loc[1, "error"]
    assert (clients.loc[[0, 2], "status"] == "ok").all()
    assert pd.read_csv(tmp_path / "drop" / "rounds.csv").clients_ok[0] == 2


def test_too_few_clients_for_the_threshold_halts_the_round_and_keeps_the_model(tmp_path):
    cfg = _cfg(tmp_path, "halt", 32)  # threshold = all 3 shares
    drop = lambda stage, node: stage == 2 and node == 2000  # noqa: E731 - one client never sends its masked vector
    server = Server(cfg, cfg.out)
    w0 = {k: np.asarray(a.numpy()).copy() for k, a in server.arrays.items()}
    server.run_rounds(AppGrid(3, drop=drop))
    for k, a in server.arrays.items():
        np.testing.assert_array_equal(np.asarray(a.numpy()), w0[k])
    clients = pd.read_csv(tmp_path / "halt" / "clients.csv")
    assert (clients.status != "ok").all() and pd.read_csv(tmp_path / "halt" / "rounds.csv").clients_ok[0] == 0


def test_int8_run_resumed_after_a_crash_equals_the_uninterrupted_one(tmp_path):
    """The shared scales of round r come from round r-1's mean: they are checkpointed, so a resumed int8 SecAgg+
    run computes the same rounds bitwise (the masked integer sums are exact, the rounding is seeded)."""
    from fedaqt.server.app import read_checkpoint

    class Crash(RuntimeError):
        pass

    class CrashingGrid(AppGrid):
        def send_and_receive(self, messages, timeout=None):
            if self.calls == 8:  # round 3's first SecAgg+ stage (4 stages per round)
                raise Crash("killed")
            return super().send_and_receive(messages, timeout)

    def cfg(name):
        return _cfg(tmp_path, name, 8).override({"rounds": 4})

    full = Server(cfg("full"), tmp_path / "full")
    full.run_rounds(AppGrid(3))
    first = Server(cfg("cut"), tmp_path / "cut")
    with pytest.raises(Crash):
        first.run_rounds(CrashingGrid(3))
    assert read_checkpoint(tmp_path / "cut" / "checkpoint.pt")["secagg"]["prev_amax"] == first.secagg.prev_amax
    second = Server(cfg("cut"), tmp_path / "cut", resume=True)
    assert second.start_round == 3 and second.secagg.prev_amax == first.secagg.prev_amax
    second.run_rounds(AppGrid(3))
    a, b = (pd.read_csv(tmp_path / n / "rounds.csv") for n in ("full", "cut"))
    cols = [c for c in a.columns if c not in ("seconds", "server_rss_peak_mib")]  # wall clock, process RSS
    pd.testing.assert_frame_equal(a[cols], b[cols])
    for k, v in full.arrays.items():
        assert np.array_equal(v.numpy(), second.arrays[k].numpy()), k


@pytest.mark.parametrize("change,match", [
    (dict(uplink_bits=4), "uplink-bits 32 or 8"),
    (dict(uplink_bits=16), "uplink-bits 32 or 8"),
    (dict(algorithm="fedavg", strategy="fedavg"), "FedSGD"),
    (dict(options={"secagg": True, "dp_clip": 1.0}), "central DP"),
    (dict(options={"secagg": True, "device_trace": "examples/traces/phone-tiers.csv"}), "device_trace"),
    (dict(clients_per_round=1), "clients_per_round >= 2"),
    (dict(options={"secagg": True, "secagg_num_shares": 5}), "exceeds clients_per_round"),
    (dict(options={"secagg": True, "secagg_quantization_range": 2**31}), "overflows"),
])
def test_combinations_that_cannot_work_are_refused_before_the_run(tmp_path, change, match):
    from fedaqt.launch.runner import preflight

    base = dict(workload="toy", strategy="fedsgd", bits=8, uplink_bits=32, num_clients=3, clients_per_round=3,
                rounds=1, batch_size=W, out=str(tmp_path / "x"), options={"secagg": True})
    base.update(change)
    with pytest.raises(ConfigError, match=match):
        preflight(RunConfig(**base))
    assert not (tmp_path / "x").exists()


def test_secagg_options_are_typed():
    from fedaqt.plugins import check_options

    for bad, key in [({"secagg_num_shares": 2.5}, "secagg_num_shares"), ({"secagg_threshold": 1.5}, "secagg_threshold"),
                     ({"secagg_clipping_range": 0}, "secagg_clipping_range"), ({"secagg": "maybe"}, "secagg"),
                     ({"secagg_clipping_range": 1e30}, "secagg_clipping_range"),
                     ({"secagg_scale_init": 1e30}, "secagg_scale_init"), ({"secagg_headroom": 1e4}, "secagg_headroom")]:
        with pytest.raises(ConfigError, match=key):
            check_options(RunConfig(workload="toy", options={"secagg": True, **bad}))


# ---------------------------------------------------------------------------------------------- on Ray (slow)
from test_simulation import speech_dir  # noqa: E402,F401 - the session fixture (default corpus or a tiny one)


@pytest.mark.slow
def test_secagg_ray_end_to_end(tmp_path, speech_dir):  # noqa: F811
    """``run_experiment`` (Ray backend) of the tiny ASR job, relay strategy, int8 broadcast, 3 clients, 1 round:
    without SecAgg+ (float32 uplink), with SecAgg+ at ``--uplink-bits 32`` and at ``8`` (shared scale). The model
    after the round (relay step on the mean) of each SecAgg+ run equals the plain one within the bound: ``B`` per
    element of the mean (32: ``2C/T``, equal weights; 8: the shared scale ``s = secagg_scale_init / 127``), carried
    through the relay correction, times ``server_lr``; the BatchNorm statistics (securely averaged deltas) within
    ``B``."""
    from fedaqt.launch.runner import run_experiment
    from fedaqt.quant.wire import QTensor, decode_broadcast, encode_broadcast
    from fedaqt.server.app import read_checkpoint

    init = 2.0
    base = dict(num_clients=3, clients_per_round=3, rounds=1, batch_size=2, bits=8, strategy="relay", eval_every=1,
                server_momentum=0.0, seed=11)
    opts = {"eval_max": 4, "data_dir": str(speech_dir), "real_eval": False}
    runs = {"plain": (32, {}), "sa32": (32, {"secagg": True}), "sa8": (8, {"secagg": True, "secagg_scale_init": init})}
    out = {}
    for name, (uplink, extra) in runs.items():
        cfg = RunConfig(**base, uplink_bits=uplink, out=str(tmp_path / name), options={**opts, **extra})
        run_experiment(cfg)
        out[name] = read_checkpoint(tmp_path / name / "checkpoint.pt")
        clients = pd.read_csv(tmp_path / name / "clients.csv")
        assert (clients.status == "ok").all() and len(clients) == 3
        if extra:
            assert (clients.secagg_clipped == 0).all()
            rounds = pd.read_csv(tmp_path / name / "rounds.csv")
            plain_up = pd.read_csv(tmp_path / "plain" / "rounds.csv").bytes_up[0]
            # int64 masked vectors: twice the float32 upload (fewer .npy headers, + a few kB of key agreement)
            assert 1.99 * plain_up <= rounds.bytes_up[0] < 2.01 * plain_up
    cfg = RunConfig(**base, uplink_bits=32, out=str(tmp_path / "w0"), options=opts)
    w0_server = Server(cfg, tmp_path / "w0")
    w0 = {k: np.asarray(a.numpy(), dtype=np.float32) for k, a in w0_server.arrays.items()}
    qkeys = w0_server.spec.quantized_keys
    arrays, meta = encode_broadcast({k: torch.from_numpy(v) for k, v in w0.items()}, qkeys, 8, "tensor")
    sent = {k: v for k, v in decode_broadcast(arrays, meta).items() if isinstance(v, QTensor)}
    lr = cfg.server_lr
    for name, b in (("sa32", 2 * 8.0 / 2**22), ("sa8", init / 127)):
        for k, v in w0.items():
            a = out["plain"]["params"][k].numpy().astype(np.float64)
            s = out[name]["params"][k].numpy().astype(np.float64)
            extra = 0.0
            if k in sent:
                qt = sent[k]
                worst = b * torch.sign(qt.dequantize().to(torch.float64) - torch.from_numpy(v).to(torch.float64))
                extra = np.abs(relay_correction(worst, torch.from_numpy(v), 8, "tensor", scale=qt.scale,
                                                codes=qt.codes).numpy())
            tol = lr * (b + extra) + 4 * np.finfo(np.float32).eps * np.abs(a)
            assert (np.abs(a - s) <= tol).all(), (name, k, float(np.abs(a - s).max()), float(np.max(tol)))
        for k, v in out["plain"]["buffers"].items():
            if v.is_floating_point():
                d = np.abs(v.numpy().astype(np.float64) - out[name]["buffers"][k].numpy().astype(np.float64))
                assert (d <= b + 4 * np.finfo(np.float32).eps * np.abs(v.numpy())).all(), (name, k)
    changed = sum(int((out["plain"]["params"][k].numpy() != w0[k]).sum()) for k in w0)
    assert changed > 0.5 * sum(v.size for v in w0.values())


@pytest.mark.slow
def test_secagg_on_the_deployment_engine_equals_the_simulation(tmp_path, speech_dir):  # noqa: F811
    """SecAgg+ at ``--uplink-bits 8`` through ``flwr run`` on a SuperLink with two SuperNodes (subprocesses, stopped by
    their process-group ids): each SecAgg+ stage runs in a fresh ``flwr-clientapp`` process, the mod's state lives in
    the SuperNode's context between them. The masked integer sum is exact and the rounding seeded, so rounds.csv
    equals the Simulation Engine run of the same configuration on every deterministic column."""
    from fedaqt.launch.runner import run_experiment
    from test_deployment import flwr_run_on_superlink

    tiny = dict(num_clients=2, clients_per_round=2, rounds=1, batch_size=2, bits=8, eval_every=1, uplink_bits=8)
    opts = {"eval_max": 4, "data_dir": str(speech_dir), "real_eval": False, "secagg": True}
    sim_out = tmp_path / "sim"
    run_experiment(RunConfig(**tiny, out=str(sim_out), options=opts))

    dep_out = tmp_path / "dep"
    flwr_run_on_superlink(tmp_path, tiny, opts, dep_out)
    sim, dep = pd.read_csv(sim_out / "rounds.csv"), pd.read_csv(dep_out / "rounds.csv")
    cols = ["round", "train_loss", "eval_loss", "eval_wer", "eval_cer", "bytes_up", "clients_ok",
            "secagg_masked_bytes"]
    pd.testing.assert_frame_equal(dep[cols], sim[cols])
    a = read_checkpoint_params(sim_out)
    b = read_checkpoint_params(dep_out)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def read_checkpoint_params(run_dir):
    from fedaqt.server.app import read_checkpoint

    return {k: t.numpy() for k, t in read_checkpoint(run_dir / "checkpoint.pt")["params"].items()}


def test_shared_scale_rounding_is_unbiased_and_counts_clipping():
    from fedaqt.quant.uplink import stochastic_round_shared

    g = torch.Generator().manual_seed(0)
    t = torch.tensor([0.0, 0.25, -0.25, 1.0, 2.6, -3.0], dtype=torch.float64)
    s = 0.1
    draws = torch.stack([stochastic_round_shared(t, s, g, tmax=20)[0].double() for _ in range(4000)])
    u, d = (t / s).numpy()[:4], draws.numpy()[:, :4]  # the unclipped elements
    assert ((d == np.floor(u)) | (d == np.ceil(u))).all()  # one of the two neighbouring codes
    np.testing.assert_allclose(d.mean(0) * s, t.numpy()[:4], atol=4 * s / np.sqrt(4000))  # unbiased
    assert (draws.numpy()[:, 4:] == [20, -20]).all()
    q, clipped = stochastic_round_shared(t, s, g, tmax=20)
    assert clipped == 2 and q[4] == 20 and q[5] == -20  # |u| = 26, 30 > 20: clipped and counted
    with pytest.raises(ValueError, match="shared scale"):
        stochastic_round_shared(t, 0.0)
