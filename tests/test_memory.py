"""Per-client memory profile (issue 4, must-show 2): categories sum to the tracked peak, quantized layers are
counted as codes + scales (int4 codes at their in-memory size), and the profile reaches ``clients.csv``;
``fedaqt profile`` writes memory.csv / memory.png with ratios to the reference row.
"""

import math

import numpy as np
import pandas as pd
import pytest
import torch

import fedaqt.plugins as plugins
from fedaqt.client.memory import CATEGORIES, MIB, MemoryProbe, metric_columns, profiling_requested
from fedaqt.client.trainer import build_client_model, client_round
from fedaqt.config import RunConfig
from fedaqt.quant.convert import quant_layers
from fedaqt.report.memory_table import add_ratios, dominant, reference_index, write_outputs
from fedaqt.server.app import Server
from fakegrid import FakeGrid
from toy import ToyWorkload

ROOT_DATA = __import__("conftest").DEFAULT_SPEECH


pytestmark = pytest.mark.usefixtures("toy_registered")


def nbytes(t):
    return t.numel() * t.element_size()


@pytest.mark.parametrize("workload", ["toy", "wide"])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_quantized_layers_count_as_codes_plus_scales(workload, bits, granularity):
    cfg = RunConfig(workload=workload, bits=bits, granularity=granularity, uplink_bits=8, num_clients=3,
                    clients_per_round=3)
    wl = plugins.get_workload_class(workload)(cfg)
    model = build_client_model(wl, cfg)
    res = client_round(wl, model, cfg, client_id=0, round_num=1, profile=True)
    prof = res.memory
    # categories of the peak snapshot sum to the tracked total (bytes, exactly) and so do the MiB metrics
    assert sum(prof.categories.values()) == prof.peak_bytes > 0
    assert math.isclose(sum(res.metrics[f"mem_{c}_mib"] for c in CATEGORIES), res.metrics["peak_mib"], rel_tol=1e-12)
    layers = quant_layers(model)
    codes = sum(nbytes(l.stored_codes()) for l in layers.values())
    scales = sum(nbytes(l.scale) for l in layers.values())
    floats = sum(nbytes(p) for p in model.parameters())
    # one byte per int8 code; int4 codes packed two per byte (issue 17): ceil(numel / 2) bytes per layer
    assert codes == sum(l.weight_shape.numel() if bits == 8 else (l.weight_shape.numel() + 1) // 2
                        for l in layers.values())
    assert prof.categories["buffers"] == codes + scales
    assert prof.categories["params"] + prof.categories["buffers"] == floats + codes + scales
    # ... and not the float sizes of those weights
    float_weights = sum(l.codes.numel() * l.scale.element_size() for l in layers.values())
    assert prof.categories["buffers"] < float_weights / 3
    assert prof.categories["opt"] == 0  # no optimizer state on a FedSGD client


def test_float16_client_model_counts_two_bytes_per_parameter():
    cfg = RunConfig(workload="wide", bits=16, uplink_bits=16, num_clients=3, clients_per_round=3)
    wl = plugins.get_workload_class("wide")(cfg)
    model = build_client_model(wl, cfg)
    res = client_round(wl, model, cfg, client_id=0, round_num=1, profile=True)
    n = sum(p.numel() for p in model.parameters())
    assert res.memory.categories["params"] == 2 * n
    assert all(v.dtype == torch.float16 for v in res.upload.tensors().values())
    assert math.isfinite(res.metrics["train_loss"])


def test_profile_reaches_clients_csv_only_when_requested(tmp_path):
    for opt in (True, False):
        out = tmp_path / f"p{opt}"
        cfg = RunConfig(workload="toy", strategy="fedsgd", bits=8, uplink_bits=8, num_clients=3, clients_per_round=3,
                        rounds=1, server_lr=1.0, server_momentum=0.0, out=str(out), seed=0,
                        options={"profile_memory": opt})
        Server(cfg, out).run_rounds(FakeGrid(3))
        clients = pd.read_csv(out / "clients.csv")
        assert (clients.status == "ok").all()
        assert (clients.rss_peak_mib > 0).all()  # cheap, always there
        if opt:
            for c in metric_columns():
                assert c in clients.columns, c
            cats = [f"mem_{c}_mib" for c in CATEGORIES]
            np.testing.assert_allclose(clients[cats].sum(axis=1), clients.peak_mib, rtol=1e-9)
            assert (clients.mem_buffers_mib > 0).all()
        else:
            assert "peak_mib" not in clients.columns


def test_profiling_requested():
    assert not profiling_requested(RunConfig())
    assert profiling_requested(RunConfig(options={"profile_memory": True}))
    assert profiling_requested(RunConfig(options={"profile_memory": "on"}))
    assert profiling_requested(RunConfig(device_profile="devices.csv"))
    assert profiling_requested(RunConfig(), force=True)


def test_probe_disabled_measures_rss_only():
    model = torch.nn.Linear(4, 4)
    with MemoryProbe(model, enabled=False) as probe:
        model(torch.randn(2, 4)).sum().backward()
    m = probe.profile.metrics()
    assert set(m) == {"rss_peak_mib"} and m["rss_peak_mib"] > 0


def _row(bits, up, ckpt, peak, alg="fedsgd"):
    r = {"workload": "asr", "bits": bits, "uplink_bits": up, "algorithm": alg, "checkpointing": ckpt,
         "peak_mib": peak, "rss_peak_mib": 900.0, "upload_mib": 1.0}
    for i, c in enumerate(CATEGORIES):
        r[f"mem_{c}_mib"] = peak / 2 if i < 2 else 0.0
    return r


def test_reference_row_and_outputs(tmp_path):
    rows = [_row(8, 8, "on", 80.0), _row(32, 8, "off", 190.0), _row(32, 32, "off", 300.0), _row(4, 8, "on", 75.0)]
    i, note = reference_index(rows)
    assert i == 2 and "32-bit, no checkpointing" in note
    add_ratios(rows)
    assert rows[0]["ratio"] == pytest.approx(80 / 300)
    rows2 = [_row(32, 32, "on", 280.0), _row(8, 8, "on", 80.0)]
    i, note = reference_index(rows2)
    assert i == 0 and "not requested" in note
    add_ratios(rows2)
    csv, png = write_outputs(rows, tmp_path)
    df = pd.read_csv(csv)
    assert list(df.columns[:6]) == ["workload", "bits", "uplink_bits", "algorithm", "checkpointing", "peak_mib"]
    assert [f"mem_{c}_mib" for c in CATEGORIES] == list(df.columns[6:6 + len(CATEGORIES)])
    assert png.stat().st_size > 1000
    assert dominant(rows[0]).startswith("params 50%")


@pytest.mark.skipif(not (ROOT_DATA / "train").is_dir(), reason="speech corpus not built (fedaqt data speech)")
def test_profile_command_fresh_processes(tmp_path):
    from typer.testing import CliRunner

    from fedaqt.cli import app

    out = tmp_path / "prof"
    result = CliRunner().invoke(app, ["profile", "--model-size", "tiny", "--bits", "4", "--uplink-bits", "8",
                                      "--data-dir", str(ROOT_DATA), "--out", str(out)])
    assert result.exit_code == 0, result.output
    df = pd.read_csv(out / "memory.csv")
    assert df.bits.tolist() == [4] and (df.uplink_bits == 8).all() and df.checkpointing.tolist() == ["on"]
    cats = [f"mem_{c}_mib" for c in CATEGORIES]
    np.testing.assert_allclose(df[cats].sum(axis=1), df.peak_mib, rtol=1e-9)
    assert df.ratio.iloc[0] == 1.0 and df.mem_buffers_mib.iloc[0] > 0
    assert (out / "memory.png").exists()
    assert "not requested" in result.output


def test_lean_tracker_keeps_memtrackers_global_peak():
    from torch.distributed._tools.mem_tracker import MemTracker

    from fedaqt.client.memory import _lean_tracker

    peaks = []
    for mt in (MemTracker(), _lean_tracker()):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8))
        x = torch.randn(16, 32)
        mt.track_external(model, x)
        with mt:
            model(x).square().sum().backward()
        peaks.append({str(k): v for d in mt.get_tracker_snapshot("peak").values() for k, v in d.items()})
    assert peaks[0] == peaks[1] and peaks[0]["Total"] > 0


# ---------------------------------------------------------------- issue 9 item 5: the peak is made of the right parts
def _reply_round(bits, uplink_bits, release):
    from _rss_round import content_for

    from fedaqt.client.app import handle_train
    from fedaqt.client.trainer import get_client_model, get_workload
    from fedaqt.protocol import BROADCAST_KEY, METRICS_KEY, UPDATE_KEY

    cfg = RunConfig(workload="wide", strategy="fedsgd", bits=bits, uplink_bits=uplink_bits, num_clients=4,
                    clients_per_round=4, seed=0)
    content = content_for(cfg, get_workload(cfg))
    received = sum(len(a.data) for a in content[BROADCAST_KEY].values())
    largest = max(len(a.data) for a in content[BROADCAST_KEY].values())
    reply = handle_train(content, profile=True, release_broadcast=release)
    model = get_client_model(get_workload(cfg), cfg)
    state = sum(nbytes(t) for t in list(model.parameters()) + list(model.buffers()))
    upload = sum(len(a.data) for a in reply[UPDATE_KEY].values())
    return dict(reply[METRICS_KEY]), received, largest, state, upload


@pytest.mark.parametrize("bits, uplink_bits", [(32, 32), (8, 8)])
def test_peak_counts_broadcast_model_and_reply_once(bits, uplink_bits):
    """Independent sizes (model tensors, ``len`` of the received and sent ``.npy`` bytes) bound the peak of a
    round whose caller keeps the broadcast: at the end of serialization the model, the received bytes and the
    whole reply coexist; nothing else of that size is alive (activations of a batch of 4 are ~0.1 MiB)."""
    m, received, largest, state, upload = _reply_round(bits, uplink_bits, release=False)
    peak = m["peak_mib"] * MIB
    assert peak >= state + received + upload  # fails if the broadcast or the reply is not counted
    if bits == 32:  # float32: the peak is at serialization (8 bits: in backward, float weight temporaries)
        # fails if a part is counted twice (e.g. the upload tensors and their bytes at once)
        assert peak <= state + received + upload + 2 * largest + 0.5 * MIB
    assert m["mem_params_mib"] * MIB + m["mem_buffers_mib"] * MIB == state  # at the peak the model is all there
    assert m["mem_wire_mib"] * MIB >= received
    assert m["train_peak_mib"] <= m["peak_mib"]  # equal for 8 bits: the peak is in backward


def test_released_broadcast_is_freed_before_training():
    """With ``release_broadcast`` (a delivered message) the received bytes are gone before the training: the
    training peak holds no wire bytes, and the whole peak is below model + received + reply."""
    m, received, largest, state, upload = _reply_round(32, 32, release=True)
    keep, *_ = _reply_round(32, 32, release=False)
    peak = m["peak_mib"] * MIB
    assert peak < state + received + upload
    assert keep["peak_mib"] * MIB - peak >= received - largest  # the broadcast is what the release saved
    assert m["train_peak_mib"] == pytest.approx(keep["train_peak_mib"] - received / MIB, abs=0.05)


def test_saved_activations_by_dtype():
    """Saved-for-backward bytes by dtype against an independent ``saved_tensors_hooks`` count of the same forward:
    WideNet (12 quantized 256x256 layers, tanh) with a batch of 4 saves, per layer, its int8 input codes and the
    float32 tanh output."""
    cfg = RunConfig(workload="wide", bits=8, uplink_bits=8, num_clients=4, clients_per_round=4)
    wl = plugins.get_workload_class("wide")(cfg)
    model = build_client_model(wl, cfg)
    res = client_round(wl, model, cfg, client_id=0, round_num=1, profile=True)
    seen = {}
    own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}

    def pack(t):
        p = t.untyped_storage().data_ptr()
        if p not in own:
            seen[p] = (t.dtype, t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        wl.loss(model, wl.client_batches(0, 1, 1, cfg.batch_size)[0])
    by = {}
    for dt, n in seen.values():
        by[dt] = by.get(dt, 0) + n
    assert res.metrics["saved_float32_mib"] * MIB == by.get(torch.float32, 0) > 0
    assert res.metrics["saved_int8_mib"] * MIB == by.get(torch.int8, 0) > 0
    # the quantized layers' inputs are int8, the tanh outputs float32 (the README sentence)
    assert by[torch.int8] < by[torch.float32]
