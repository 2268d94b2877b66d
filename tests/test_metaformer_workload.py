"""The metaformer workload (issue 14): plugin registration and options, data (Fashion-MNIST, a CIFAR-10 binary
directory written here), partitions, the quantized client path through the real broadcast, evaluation, and one
small Ray run (slow)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from fedaqt import plugins
from fedaqt.config import ConfigError, RunConfig
from fedaqt.data.images import FASHION_MNIST_ROOT
from fedaqt.models.metaformer import LocalSelfAttention
from fedaqt.quant import QuantConv2d, QuantLinear, quantized_weight_keys
from fedaqt.workloads.metaformer import MetaFormerWorkload

HAVE_FMNIST = Path(FASHION_MNIST_ROOT, "train-images-idx3-ubyte.gz").exists()
needs_fmnist = pytest.mark.skipif(not HAVE_FMNIST, reason="apt-get install dataset-fashion-mnist")


def _cifar_dir(tmp_path: Path, per_batch: int = 12) -> tuple[Path, np.ndarray, np.ndarray]:
    """A cifar-10-batches-bin directory of ``per_batch`` random records per file (labels cycle 0..9)."""
    root = tmp_path / "cifar-10-batches-bin"
    root.mkdir()
    rng = np.random.default_rng(0)
    train_px, train_y = [], []
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        px = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        y = (np.arange(per_batch) % 10).astype(np.uint8)
        np.concatenate([y[:, None], px], axis=1).tofile(root / name)
        if name != "test_batch.bin":
            train_px.append(px)
            train_y.append(y)
    return tmp_path, np.concatenate(train_px), np.concatenate(train_y)


# ------------------------------------------------------------------------------------------ plugin + options
def test_registered_as_builtin_and_listed():
    assert plugins.get_workload_class("metaformer") is MetaFormerWorkload
    assert "metaformer" in plugins.workload_names()
    rows = {(p.name, p.kind): p for p in plugins.list_plugins()}
    assert rows[("metaformer", "workload")].source == "fedaqt"
    text = Path(__file__).resolve().parents[1].joinpath("pyproject.toml").read_text()
    assert 'metaformer = "fedaqt.workloads.metaformer:MetaFormerWorkload"' in text


def test_bad_options_are_named():
    with pytest.raises(ConfigError, match="CCXL"):
        MetaFormerWorkload(RunConfig(workload="metaformer", options={"mixers": "CCXL"}))
    with pytest.raises(ConfigError, match="variant"):
        MetaFormerWorkload(RunConfig(workload="metaformer", options={"variant": "s99"}))
    with pytest.raises(ConfigError, match="local_len"):
        MetaFormerWorkload(RunConfig(workload="metaformer", options={"local_len": -1}))
    wl = MetaFormerWorkload(RunConfig(workload="metaformer", options={"dataset": "cifar10"}))
    with pytest.raises(ValueError, match="data_dir"):
        wl.prepare()
    wl = MetaFormerWorkload(RunConfig(workload="metaformer", options={"mixers": "ccla"}))
    assert wl.options.mixers == "CCLA"


def test_options_reach_the_model():
    wl = MetaFormerWorkload(RunConfig(workload="metaformer",
                                      options={"mixers": "CLAL", "local_len": 5, "swap": False, "bias": False}))
    m = wl.build_model()
    kinds = [type(s[0].mixer).__name__ for s in m.stages]
    assert kinds == ["DWConvMixer", "LocalSelfAttention", "GlobalSelfAttention", "LocalSelfAttention"]
    lsas = [x for x in m.modules() if isinstance(x, LocalSelfAttention)]
    assert all(x.local_len == 5 and not x.swap and x.rel_bias is None for x in lsas)
    m2 = MetaFormerWorkload(RunConfig(workload="metaformer")).build_model()
    assert [x.swap for x in m2.stages[3].modules() if isinstance(x, LocalSelfAttention)] == [False, True]
    assert all(x.local_len == 7 and x.rel_bias.shape == (13, x.heads)
               for x in m2.modules() if isinstance(x, LocalSelfAttention))


# ------------------------------------------------------------------------------------------ data
def test_cifar10_directory_batches_and_normalization(tmp_path):
    root, px, y = _cifar_dir(tmp_path)
    cfg = RunConfig(workload="metaformer", num_clients=3, seed=1,
                    options={"dataset": "cifar10", "data_dir": str(root), "eval_size": 10})
    wl = MetaFormerWorkload(cfg)
    wl.prepare()
    parts = wl.partitions()
    assert sorted(np.concatenate(parts).tolist()) == list(range(60))
    (xb, yb), = wl.client_batches(2, 4, 1, 5)
    assert xb.shape == (5, 3, 32, 32) and xb.dtype == torch.float32 and yb.dtype == torch.int64
    # independent reference: numpy decode of the records we wrote, then (x/255 - mean) / std per channel
    mean, std = np.array([0.4914, 0.4822, 0.4465]), np.array([0.2470, 0.2435, 0.2616])
    order = np.random.default_rng([1, 2, 4]).permutation(parts[2])[:5]
    ref = (px[order].reshape(5, 3, 32, 32) / 255.0 - mean[None, :, None, None]) / std[None, :, None, None]
    np.testing.assert_allclose(xb.numpy(), ref, rtol=0, atol=1e-5)
    assert yb.tolist() == y[order].tolist()
    assert wl.eval_batches()[0][0].shape == (10, 3, 32, 32)
    m = wl.build_model()
    loss, n = wl.loss(m, (xb, yb))
    assert n == 5 and torch.isfinite(loss)


@needs_fmnist
@pytest.mark.parametrize("partition", ["iid", "dirichlet"])
def test_fmnist_partitions_batches_are_deterministic(partition):
    opts = {"train_size": 600, "eval_size": 50, "partition": partition, "alpha": 0.3, "image_size": 32}
    cfg = RunConfig(workload="metaformer", num_clients=4, seed=3, options=opts)
    a, b = MetaFormerWorkload(cfg), MetaFormerWorkload(cfg)
    a.prepare()
    pa = a.partitions()
    assert sum(len(p) for p in pa) == 600 and len(np.unique(np.concatenate(pa))) == 600
    assert all(np.array_equal(p, q) for p, q in zip(pa, b.partitions()))
    ba, bb = a.client_batches(1, 2, 3, 4), b.client_batches(1, 2, 3, 4)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(ba, bb))
    assert ba[0][0].shape == (4, 1, 32, 32)  # resized
    ep = a.client_epoch_batches(1, 2, 0, 7)
    assert sum(len(yb) for _, yb in ep) == a.partition_size(1)
    with pytest.raises(ValueError, match="client_id=4"):
        a.client_batches(4, 0, 1, 1)


# ------------------------------------------------------------------------------------------ quantized client path
@needs_fmnist
@pytest.mark.parametrize("bits", [8, 4])
def test_client_model_quantizes_attention_projections_and_trains(bits):
    from fedaqt.client.trainer import build_client_model, client_round, load_broadcast
    from fedaqt.quant.wire import decode_broadcast, encode_broadcast
    from fedaqt.server.app import float_state_split, make_spec

    cfg = RunConfig(workload="metaformer", bits=bits, algorithm="fedsgd", num_clients=2, clients_per_round=1,
                    batch_size=4, seed=0, options={"train_size": 200, "eval_size": 40})
    wl = MetaFormerWorkload(cfg)
    model = wl.build_model()
    keys = set(quantized_weight_keys(model, wl.quantize_filter))
    for k in ("stages.2.0.mixer.qkv.weight", "stages.2.1.mixer.proj.weight", "stages.0.0.mixer.conv.weight",
              "stem.0.weight", "downsamples.0.0.weight", "stages.3.1.mlp.0.weight"):
        assert k in keys
    assert "head.weight" not in keys and not any("rel_bias" in k or "ls1" in k for k in keys)
    spec = make_spec(cfg, wl, model)
    assert spec.quantized_keys == keys
    client = build_client_model(MetaFormerWorkload(cfg), cfg)
    assert isinstance(client.stages[2][0].mixer.qkv, QuantLinear)
    assert isinstance(client.stages[0][0].mixer.conv, QuantConv2d)
    assert type(client.head) is nn.Linear
    params, buffers = float_state_split(model)
    state = {k: torch.from_numpy(v) for k, v in {**params, **buffers}.items()}
    load_broadcast(client, decode_broadcast(*encode_broadcast(state, spec.quantized_keys, bits, cfg.granularity)))
    res = client_round(wl, client, cfg, client_id=0, round_num=1)
    assert np.isfinite(res.metrics["train_loss"])
    # evaluation columns: the client-format model is scored too
    assert wl.eval_columns == ("eval_accuracy", "eval_loss", "eval_accuracy_client")
    out = wl.evaluate(model, 1)
    assert set(out) == set(wl.eval_columns) and all(0 <= out[c] <= 1 for c in ("eval_accuracy", "eval_accuracy_client"))
    assert MetaFormerWorkload(cfg.override({"bits": 32})).eval_columns == ("eval_accuracy", "eval_loss")


@needs_fmnist
def test_score_matches_a_direct_count_and_eval_local_len_is_restored():
    cfg = RunConfig(workload="metaformer", bits=32, num_clients=1, seed=0,
                    options={"train_size": 100, "eval_size": 300, "eval_local_len": 3})
    wl = MetaFormerWorkload(cfg)
    model = wl.build_model()
    out = wl.evaluate(model, 1)
    assert all(x.local_len == 7 for x in model.modules() if isinstance(x, LocalSelfAttention))
    assert model.training
    # direct count with the local length set by hand (an independent pass over the same images)
    model.eval()
    for x in model.modules():
        if isinstance(x, LocalSelfAttention):
            x.local_len = 3
    correct, loss, n = 0, 0.0, 0
    with torch.no_grad():
        for xb, yb in wl.eval_batches():
            logits = model(xb)
            correct += int((logits.argmax(1) == yb).sum())
            loss += float(torch.nn.functional.cross_entropy(logits, yb, reduction="sum"))
            n += len(yb)
    assert n == 300
    assert out["eval_accuracy"] == pytest.approx(correct / n, abs=1e-12)
    assert out["eval_loss"] == pytest.approx(loss / n, rel=1e-6)


# ------------------------------------------------------------------------------------------ Ray end to end
@needs_fmnist
@pytest.mark.slow
def test_metaformer_ray_run_reports_accuracy(tmp_path):
    """``fedaqt run --workload metaformer`` on Ray in its own process group (isolated from this process's Ray)."""
    import signal
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0",
               PYTHONPATH=os.pathsep.join([str(root)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    out = tmp_path / "run"
    args = [str(Path(sys.executable).parent / "fedaqt"), "run", "--workload", "metaformer", "--bits", "8",
            "--num-clients", "3", "--clients-per-round", "2", "--rounds", "2", "--batch-size", "4",
            "--partition", "dirichlet", "--alpha", "0.5", "--num-cpus", "2", "--out", str(out),
            "-o", "train_size=300", "-o", "eval_size=50"]
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
    assert len(rounds) == 2 and rounds["eval_accuracy"].notna().all() and rounds["eval_accuracy_client"].notna().all()
    summary = json.loads((out / "summary.json").read_text())
    assert "final_eval_accuracy" in summary


def test_local_len_beyond_4096_is_refused_naming_key_value_and_bound():
    """A huge M only grows the [2M-1, heads] bias table (M >= tokens is already global): refused before any work."""
    from fedaqt.config import ConfigError
    from fedaqt.options import options_for
    from fedaqt.workloads.metaformer import MetaFormerWorkload

    for key in ("local_len", "eval_local_len"):
        with pytest.raises(ConfigError, match=rf"{key}=1000000 .*<= 4096"):
            options_for(MetaFormerWorkload.Options, {key: 1000000}, "workload metaformer")
        assert getattr(options_for(MetaFormerWorkload.Options, {key: 4096}, "workload metaformer"), key) == 4096
