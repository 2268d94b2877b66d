"""The fewshot workload (issue 12) on a tiny fake glyph set: registration, class-disjoint client partitions,
evaluation columns and the CI formula against numpy + a per-episode reference loop, native quantized backbones,
the MAML-family algorithms through the real client round (Reptile's delta against plain torch SGD, FOMAML's
upload against plain autograd), config rejections, and one small Ray run (slow)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from fedaqt import plugins
from fedaqt.config import ConfigError, RunConfig
from fedaqt.quant import QuantConv2d
from fedaqt.workloads.fewshot import EVAL_COLUMNS, FewShotWorkload, ci95

SPLIT_CLASSES = (12, 3, 6)  # background, validation, evaluation
PER_CLASS = 16


def _fake_glyphs(root: Path, split_classes: tuple[int, int, int] = SPLIT_CLASSES) -> Path:
    """A glyphs.npz in the format of :mod:`fedaqt.data.glyphs`; pixel (0, 0) of every image holds its global class
    id (so tests can tell which class an image came from), the rest is a class-dependent pattern + noise."""
    rng = np.random.default_rng(0)
    images, labels, split = [], [], []
    c = 0
    for s, n in enumerate(split_classes):
        for _ in range(n):
            base = rng.integers(0, 200, size=(28, 28))
            for _ in range(PER_CLASS):
                img = np.clip(base + rng.integers(0, 40, size=(28, 28)), 0, 255).astype(np.uint8)
                img[0, 0] = c
                images.append(img)
                labels.append(c)
            split.append(s)
            c += 1
    root.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(root / "glyphs.npz", images=np.stack(images), labels=np.asarray(labels, np.int64),
                        class_char=np.arange(c, dtype=np.int64) + 0x41, class_script=np.zeros(c, np.int64),
                        class_split=np.asarray(split, np.int64), scripts=np.asarray(["FAKE"]))
    return root


@pytest.fixture(scope="module")
def glyph_dir(tmp_path_factory) -> str:
    return str(_fake_glyphs(tmp_path_factory.mktemp("glyphs")))


def _cfg(glyph_dir: str, **kw) -> RunConfig:
    opts = {"data_dir": glyph_dir, "eval_episodes": 30, "q_query": 3, "k_shot": 2, "eval_query": 3, "width": 8,
            "metric_classes": 6, "metric_per_class": 4}
    opts.update(kw.pop("options", {}))
    base = dict(workload="fewshot", num_clients=2, clients_per_round=1, batch_size=4, seed=0, options=opts)
    base.update(kw)
    return RunConfig(**base)


def test_registered_and_listed():
    assert plugins.get_workload_class("fewshot") is FewShotWorkload
    for name in ("fomaml", "maml", "reptile", "consensus_reptile"):
        assert name in plugins.algorithm_names()
        assert plugins.get_algorithm_class(name).name == name
    text = Path(__file__).resolve().parents[1].joinpath("pyproject.toml").read_text()
    assert 'fewshot = "fedaqt.workloads.fewshot:FewShotWorkload"' in text
    assert 'reptile = "fedaqt.algorithms.meta:Reptile"' in text


def test_missing_glyphs_names_the_build_command(tmp_path):
    wl = FewShotWorkload(RunConfig(workload="fewshot", options={"data_dir": str(tmp_path / "none")}))
    with pytest.raises(FileNotFoundError, match="fedaqt data glyphs --out"):
        wl.prepare()


def test_clients_hold_disjoint_background_classes(glyph_dir):
    wl = FewShotWorkload(_cfg(glyph_dir, num_clients=2))
    wl.prepare()
    parts = wl.client_classes()
    assert sorted(np.concatenate(parts).tolist()) == list(range(SPLIT_CLASSES[0]))
    assert not set(parts[0]) & set(parts[1])
    # background class b of the split is global class b (background comes first in the fake file)
    for cid in (0, 1):
        for r in (1, 2, 3):
            xs, ys, xq, yq = wl.client_task(cid, r, 0)
            seen = {int(round(float(v) * 255)) for v in torch.cat([xs, xq])[:, 0, 0, 0]}
            assert seen <= set(parts[cid].tolist()) and len(seen) == 5
            assert xs.shape == (5 * 2, 1, 28, 28) and xq.shape == (5 * 3, 1, 28, 28)
            assert ys.tolist() == torch.arange(5).repeat_interleave(2).tolist()
    a, b = wl.client_task(0, 1, 0), FewShotWorkload(_cfg(glyph_dir, num_clients=2)).client_task(0, 1, 0)
    assert all(torch.equal(u, v) for u, v in zip(a, b))  # deterministic in (seed, client, round, index)
    with pytest.raises(ValueError, match="n_way=5"):
        FewShotWorkload(_cfg(glyph_dir, num_clients=4)).prepare()  # 3 classes per client < 5-way


@pytest.mark.parametrize("method", ["protonet", "r2d2", "svm", "classical"])
def test_eval_columns_and_ci_against_a_per_episode_loop(glyph_dir, method):
    from fedaqt.models.fewshot import prototypes

    wl = FewShotWorkload(_cfg(glyph_dir, options={"method": method, "eval_episodes": 12 if method == "svm" else 30}))
    wl.prepare()
    model = wl.build_model()
    out = wl.evaluate(model, 1)
    assert tuple(wl.eval_columns) == EVAL_COLUMNS and set(out) == set(EVAL_COLUMNS)
    feats = wl.pool_features(model)
    for shots in (1, 5):
        ys, yq = torch.arange(5).repeat_interleave(shots), torch.arange(5).repeat_interleave(3)
        ref = []
        with torch.no_grad():
            for s, q in wl.eval_episode_indices(shots):
                fs, fq = feats[torch.from_numpy(s)], feats[torch.from_numpy(q)]
                if method == "classical":
                    logits = -torch.cdist(fq, prototypes(fs, ys, 5)) ** 2
                else:
                    logits = model.head(fs, ys, fq, 5)
                ref.append(float((logits.argmax(1) == yq).double().mean()))
        ref = np.asarray(ref)
        assert out[f"eval_acc_{shots}shot"] == pytest.approx(ref.mean(), abs=1e-12)
        assert out[f"eval_ci95_{shots}shot"] == pytest.approx(1.96 * np.std(ref) / np.sqrt(len(ref)), abs=1e-12)
    assert out["r_fc"] > 0 and 0 <= out["r_hv"] <= 1
    assert ci95(np.array([0.0, 1.0])) == pytest.approx(1.96 * 0.5 / np.sqrt(2))


def test_maml_head_evaluation_against_plain_torch_per_episode(glyph_dir, monkeypatch):
    """``method=maml`` evaluation (``eval_adapt=head``, chunked batches) equals, episode by episode, plain torch SGD
    of an ``nn.Linear`` from the model's classifier on the support features centred on their mean, step 1/L from
    a numpy eigen-solve (the accuracies and CIs to 1e-12)."""
    import torch.nn.functional as F

    import fedaqt.workloads.fewshot as fsw

    monkeypatch.setattr(fsw, "_EVAL_CHUNK", 7)  # 30 episodes in 5 chunks
    wl = FewShotWorkload(_cfg(glyph_dir, algorithm="fomaml", options={"adapt_steps": 8}))
    wl.prepare()
    model = wl.build_model()
    out = wl.evaluate(model, 1)
    feats = wl.pool_features(model).double()
    for shots in (1, 5):
        ys, yq = torch.arange(5).repeat_interleave(shots), torch.arange(5).repeat_interleave(3)
        ref = []
        for s, q in wl.eval_episode_indices(shots):
            fs, fq = feats[torch.from_numpy(s)], feats[torch.from_numpy(q)]
            mu = fs.mean(0)
            xa = np.concatenate([(fs - mu).numpy(), np.ones((len(s), 1))], 1)
            lin = nn.Linear(fs.shape[1], 5).double()
            with torch.no_grad():
                lin.weight.copy_(model.classifier.weight)
                lin.bias.copy_(model.classifier.bias + model.classifier.weight.double() @ mu)
            opt = torch.optim.SGD(lin.parameters(), lr=1.0 / (0.5 * np.linalg.eigvalsh(xa.T @ xa / len(s))[-1]))
            for _ in range(8):
                opt.zero_grad()
                F.cross_entropy(lin(fs - mu), ys).backward()
                opt.step()
            with torch.no_grad():
                ref.append(float((lin(fq - mu).argmax(1) == yq).double().mean()))
        assert out[f"eval_acc_{shots}shot"] == pytest.approx(np.mean(ref), abs=1e-12)
        assert out[f"eval_ci95_{shots}shot"] == pytest.approx(ci95(np.asarray(ref)), abs=1e-12)


def _client(wl: FewShotWorkload, cfg: RunConfig):
    from fedaqt.client.trainer import build_client_model, load_broadcast
    from fedaqt.quant.wire import decode_broadcast, encode_broadcast
    from fedaqt.server.app import float_state_split, make_spec

    model = wl.build_model()
    spec = make_spec(cfg, wl, model)
    client = build_client_model(wl, cfg)
    params, buffers = float_state_split(model)
    state = {k: torch.from_numpy(v) for k, v in {**params, **buffers}.items()}
    load_broadcast(client, decode_broadcast(*encode_broadcast(state, spec.quantized_keys, cfg.bits, cfg.granularity)))
    return model, spec, client


@pytest.mark.parametrize("algorithm,method", [("fedsgd", "protonet"), ("fedavg", "classical"), ("fomaml", "auto"),
                                              ("reptile", "auto")])
def test_quantized_backbone_is_native_and_trains(glyph_dir, algorithm, method):
    from fedaqt.client.trainer import client_round

    cfg = _cfg(glyph_dir, bits=8, algorithm=algorithm, options={"method": method, "inner_steps": 2}
               if algorithm in ("fomaml", "reptile") else {"method": method})
    wl = FewShotWorkload(cfg)
    model, spec, client = _client(wl, cfg)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(n.startswith("backbone.") for n in convs)
    assert spec.quantized_keys == {f"{n}.weight" for n in convs}
    assert all(isinstance(client.get_submodule(n), QuantConv2d) for n in convs)
    if client.head is not None:
        assert isinstance(client.head.scale, nn.Parameter) and client.head.scale.dtype == torch.float32
    if client.classifier is not None:
        assert type(client.classifier) is nn.Linear
    res = client_round(wl, client, cfg, client_id=1, round_num=1)
    assert np.isfinite(res.metrics["train_loss"])


def test_reptile_and_fomaml_uploads_match_plain_torch(glyph_dir):
    """--bits 32: Reptile's upload is theta~ - theta of plain torch SGD on the same minibatches; FOMAML's is the
    query gradient after plain SGD on the support set (FedSGD upload = dL/dw)."""
    import torch.nn.functional as F

    from fedaqt.algorithms.meta import FOMAML, Reptile
    from fedaqt.client.trainer import client_round

    for cls in (Reptile, FOMAML):
        cfg = _cfg(glyph_dir, bits=32, algorithm=cls.name, lr=0.1, options={"inner_steps": 3})
        wl = FewShotWorkload(cfg)
        model, _, client = _client(wl, cfg)
        ref = wl.build_model()
        ref.load_state_dict(model.state_dict())
        batches = cls(cfg).batches(wl, 0, 1)
        opt = torch.optim.SGD(ref.parameters(), lr=0.1)
        theta = {k: v.detach().clone() for k, v in ref.named_parameters()}
        inner = batches if cls is Reptile else batches[:-1]
        for x, y in inner:
            opt.zero_grad()
            F.cross_entropy(ref(x), y).backward()
            opt.step()
        if cls is FOMAML:
            opt.zero_grad()
            F.cross_entropy(ref(batches[-1][0]), batches[-1][1]).backward()
            want = {k: p.grad for k, p in ref.named_parameters()}
        else:
            want = {k: p.detach() - theta[k] for k, p in ref.named_parameters()}
        res = client_round(wl, client, cfg, client_id=0, round_num=1)
        for k, w in want.items():
            torch.testing.assert_close(res.upload.decode(k).to(w.dtype), w, atol=1e-5, rtol=1e-4)


def test_batched_reptile_is_fedavgm_with_server_lr_eps_through_the_server(glyph_dir, tmp_path):
    """Must-show 1, end to end: ``--algorithm reptile --strategy fedavgm --server-lr EPS --server-momentum 0`` run by
    the real server loop (Flower's FedAvgM under fedaqt's quantized strategy, in-process grid) equals batched
    Reptile computed with plain torch: per round, every sampled client's ``inner_steps`` SGD steps from theta on its
    minibatches, then ``theta + EPS * mean_p(theta~_p - theta)`` (2 rounds, --bits 32)."""
    import copy

    import torch.nn.functional as F

    from fakegrid import FakeGrid
    from fedaqt.algorithms.meta import Reptile
    from fedaqt.server.app import Server, sample_partitions

    eps, lr = 0.3, 0.1
    cfg = _cfg(glyph_dir, bits=32, algorithm="reptile", strategy="fedavgm", server_lr=eps, server_momentum=0.0,
               lr=lr, num_clients=3, clients_per_round=2, rounds=2, eval_every=100, out=str(tmp_path),
               options={"inner_steps": 3, "inner_batch": 5, "eval_episodes": 5, "n_way": 3})
    server = Server(cfg, tmp_path)
    server.run_rounds(FakeGrid(3))
    got = {k: torch.from_numpy(np.asarray(a.numpy())) for k, a in server.arrays.items()}

    wl = FewShotWorkload(cfg)
    model = wl.build_model()
    theta = {k: p.detach().clone() for k, p in model.named_parameters()}
    for rnd in (1, 2):
        deltas = []
        for cid in sample_partitions(cfg.seed, rnd, cfg.num_clients, cfg.clients_per_round):
            m = copy.deepcopy(model)
            with torch.no_grad():
                for k, p in m.named_parameters():
                    p.copy_(theta[k])
            opt = torch.optim.SGD(m.parameters(), lr=lr)
            for x, y in Reptile(cfg).batches(wl, cid, rnd):
                opt.zero_grad()
                F.cross_entropy(m(x), y).backward()
                opt.step()
            deltas.append({k: p.detach() - theta[k] for k, p in m.named_parameters()})
        theta = {k: theta[k] + eps * sum(d[k] for d in deltas) / len(deltas) for k in theta}
    assert set(got) == set(theta)
    for k in theta:
        torch.testing.assert_close(got[k], theta[k], atol=1e-6, rtol=1e-5)
    assert max(float((got[k] - model.state_dict()[k]).abs().max()) for k in theta) > 1e-3  # it moved


def test_consensus_reptile_client_at_zero_coefficient_is_reptile_of_plain_torch(glyph_dir):
    """Must-show 1 through the client round: ``consensus_reptile`` with ``beta_eff=0`` uploads
    ``mean_p(theta~_p - theta)`` of plain torch SGD (lr, one step per minibatch, BatchNorm on batch statistics) on
    each of its ``tasks_per_client`` tasks -- batched Reptile; with ``beta_eff > 0`` the upload differs."""
    import copy

    import torch.nn.functional as F

    from fedaqt.algorithms.meta import ConsensusReptile
    from fedaqt.client.trainer import client_round

    ups = {}
    for beta in (0.0, 0.5):
        cfg = _cfg(glyph_dir, bits=32, algorithm="consensus_reptile", strategy="fedavg", lr=0.1,
                   options={"inner_steps": 3, "inner_batch": 5, "tasks_per_client": 3, "beta_eff": beta})
        wl = FewShotWorkload(cfg)
        model, _, client = _client(wl, cfg)
        res = client_round(wl, client, cfg, client_id=1, round_num=2)
        ups[beta] = {k: res.upload.decode(k) for k, _ in model.named_parameters()}
    deltas = []
    for mbs in ConsensusReptile(cfg).batches(wl, 1, 2):
        m = copy.deepcopy(model)
        m.train()
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        for x, y in mbs:
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()
        deltas.append({k: p.detach() - dict(model.named_parameters())[k].detach() for k, p in m.named_parameters()})
    for k, u in ups[0.0].items():
        torch.testing.assert_close(u, sum(d[k] for d in deltas) / len(deltas), atol=1e-6, rtol=1e-5)
    assert max(float((ups[0.5][k] - ups[0.0][k]).abs().max()) for k in ups[0.0]) > 1e-6


def test_maml_client_uploads_the_second_order_meta_gradient_of_plain_autograd(glyph_dir):
    """The ``maml`` client round (``torch.func``) uploads d L_Q(theta'_S) / d theta of plain ``torch.autograd``
    double backward through ``inner_steps`` SGD steps on the support set (BatchNorm on batch statistics)."""
    import copy

    import torch.nn.functional as F
    from torch.func import functional_call

    from fedaqt.algorithms.meta import MAML
    from fedaqt.client.trainer import client_round

    cfg = _cfg(glyph_dir, bits=32, algorithm="maml", strategy="fedsgd", lr=0.1, options={"inner_steps": 2})
    wl = FewShotWorkload(cfg)
    model, _, client = _client(wl, cfg)
    xs, ys, xq, yq = MAML(cfg).batches(wl, 0, 1)[0]
    ref = copy.deepcopy(model).train()
    theta = {k: p.detach().clone().requires_grad_(True) for k, p in ref.named_parameters()}
    p = dict(theta)
    for _ in range(2):
        g = torch.autograd.grad(F.cross_entropy(functional_call(ref, p, (xs,)), ys), list(p.values()),
                                create_graph=True)
        p = {k: v - 0.1 * gk for (k, v), gk in zip(p.items(), g)}
    want = dict(zip(theta, torch.autograd.grad(F.cross_entropy(functional_call(ref, p, (xq,)), yq),
                                               list(theta.values()))))
    res = client_round(wl, client, cfg, client_id=0, round_num=1)
    for k, w in want.items():
        torch.testing.assert_close(res.upload.decode(k), w, atol=1e-6, rtol=1e-4)


def test_bad_configs_are_refused_in_preflight(glyph_dir):
    from fedaqt.launch.runner import preflight

    with pytest.raises(ConfigError, match="bits=8.*second-order MAML"):
        preflight(_cfg(glyph_dir, bits=8, algorithm="maml"))
    with pytest.raises(ConfigError, match="bits=4.*consensus_reptile"):
        preflight(_cfg(glyph_dir, bits=4, algorithm="consensus_reptile", strategy="fedavg"))
    with pytest.raises(ConfigError, match="method='protonet'.*fomaml"):
        preflight(_cfg(glyph_dir, algorithm="fomaml", options={"method": "protonet"}))
    with pytest.raises(ConfigError, match="method='maml'"):
        preflight(_cfg(glyph_dir, algorithm="fedsgd", options={"method": "maml"}))
    with pytest.raises(ConfigError, match="local_epochs=2"):
        preflight(_cfg(glyph_dir, algorithm="reptile", strategy="fedavg", options={"local_epochs": 2}))
    with pytest.raises(ConfigError, match="inner_steps"):
        preflight(_cfg(glyph_dir, algorithm="fomaml", options={"inner_steps": 0}))
    with pytest.raises(ConfigError, match="method"):
        preflight(_cfg(glyph_dir, options={"method": "matchingnet"}))
    preflight(_cfg(glyph_dir, bits=32, algorithm="maml"))  # second order is fine at 32 bits


def test_profile_names_the_episode_and_the_parameter_count(tmp_path):
    """``fedaqt profile --workload fewshot`` (one real client round in a fresh process): the header and title say
    what a batch is (an episode: "episode 5-way 2-shot 3-query (25 images)", not "batch 2") and the parameter
    count in digits (a Conv-4 of width 8 is ~1.9k parameters; "0.0M" said nothing)."""
    from typer.testing import CliRunner

    from fedaqt.cli import app

    glyph_dir = str(_fake_glyphs(tmp_path / "glyphs", (160, 1, 6)))  # profile's 32 clients need 5 classes each
    wl = FewShotWorkload(_cfg(glyph_dir, num_clients=32))
    n = sum(p.numel() for p in wl.build_model().parameters())
    res = CliRunner().invoke(app, ["profile", "--workload", "fewshot", "--bits", "8", "--uplink-bits", "32",
                                   "--out", str(tmp_path / "prof"), "-o", f"data_dir={glyph_dir}", "-o", "width=8",
                                   "-o", "k_shot=2", "-o", "q_query=3"])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "episode 5-way 2-shot 3-query (25 images)" in text and "batch 2" not in text
    assert f"({n:,} parameters)" in text and "0.0M" not in text
    assert wl.batch_label() == "episode 5-way 2-shot 3-query (25 images)"
    assert FewShotWorkload(_cfg(glyph_dir, batch_size=8, options={"method": "classical"})).batch_label() == \
        "batch 8 (4 classes x 2)"


@pytest.mark.slow
def test_fewshot_ray_run_reports_fewshot_accuracy(tmp_path, glyph_dir):
    """``fedaqt run --workload fewshot`` (ProtoNet, int8) on Ray in its own process group."""
    import signal
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0",
               PYTHONPATH=os.pathsep.join([str(root)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    out = tmp_path / "run"
    args = [str(Path(sys.executable).parent / "fedaqt"), "run", "--workload", "fewshot", "--bits", "8",
            "--num-clients", "2", "--clients-per-round", "2", "--rounds", "2", "--num-cpus", "2", "--out", str(out),
            "-o", f"data_dir={glyph_dir}", "-o", "eval_episodes=20", "-o", "width=8", "-o", "k_shot=2",
            "-o", "q_query=3", "-o", "eval_query=3", "-o", "metric_classes=6"]
    proc = subprocess.Popen(args, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=400)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        raise AssertionError(f"fedaqt run timed out:\n{log[-4000:]}")
    assert proc.returncode == 0, log[-4000:]
    rounds = pd.read_csv(out / "rounds.csv")
    assert len(rounds) == 2 and rounds[list(EVAL_COLUMNS)].notna().all().all()


@pytest.mark.parametrize("algorithm", ["maml", "consensus_reptile"])
def test_torch_func_algorithms_run_on_batchnorm_backbones(glyph_dir, algorithm):
    """Second-order MAML and consensus Reptile (torch.func) on the Conv-4 with BatchNorm at --bits 32: the round
    finishes, uploads finite non-zero values and leaves the BatchNorm running statistics as received."""
    from fedaqt.client.trainer import client_round

    opts = {"inner_steps": 2} if algorithm == "maml" else {"inner_steps": 2, "tasks_per_client": 2}
    cfg = _cfg(glyph_dir, bits=32, algorithm=algorithm, options=opts)
    wl = FewShotWorkload(cfg)
    _, _, client = _client(wl, cfg)
    stats0 = client.backbone.features[1].running_mean.clone()
    res = client_round(wl, client, cfg, client_id=0, round_num=1)
    up = res.upload.decode("backbone.features.0.weight")
    assert torch.isfinite(up).all() and up.abs().sum() > 0
    assert torch.equal(client.backbone.features[1].running_mean, stats0)


def test_adapt_lr_has_an_upper_bound():
    """adapt_lr=1e6 made every logit NaN and reported chance accuracy without a word (fault-injection run)."""
    from fedaqt.plugins import check_options

    with pytest.raises(ConfigError, match="adapt_lr"):
        check_options(RunConfig(workload="fewshot", algorithm="fomaml", options={"adapt_lr": 1e6}))
    check_options(RunConfig(workload="fewshot", algorithm="fomaml", options={"adapt_lr": 0.5}))
