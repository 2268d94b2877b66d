"""Issue 9 items 7, 8, 14 with hand-built replies (no Ray): no reply can crash or poison a round, a non-finite
global model is never accepted, a failing server-side evaluate stops with one line naming cause and --resume.

Reference for "the round equals one in which the bad client never replied": a direct numpy computation from the
good clients' own float32 gradients, ``W1 = W0 - sum_k n_k g_k / sum_k n_k`` (FedSGD, server lr 1, no momentum).
"""

import io
import zipfile

import numpy as np
import pandas as pd
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedaqt.config import ConfigError, RunConfig
from fedaqt.server.app import RunAborted, Server
from fakegrid import FakeGrid

pytestmark = pytest.mark.usefixtures("toy_registered")

BAD = 1  # the tampered client's partition
KEY = "enc1.weight"
WEIGHT_SHAPE = (8, 6)  # tests/toy.py: enc1 = nn.Linear(6, 8)


def _cfg(tmp_path, **kw):
    base = dict(workload="toy", strategy="fedsgd", bits=8, num_clients=3, clients_per_round=3, rounds=1,
                server_lr=1.0, server_momentum=0.0, out=str(tmp_path), seed=0)
    base.update(kw)
    return RunConfig(**base)


def _with_metric(content, **changes):
    m = dict(content["metrics"])
    for k, v in changes.items():
        if v is _DEL:
            m.pop(k, None)
        else:
            m[k] = v
    return _replace(content, metrics=MetricRecord(m))


def _replace(content, **records):
    d = {name: content[name] for name in content.keys()}
    d.update(records)
    return RecordDict(d)


def _with_payload(content, data: bytes):
    arrays = {k: a for k, a in content["arrays"].items()}
    a = arrays[KEY]
    arrays[KEY] = Array(dtype=a.dtype, shape=a.shape, stype=a.stype, data=data)
    return _replace(content, arrays=ArrayRecord(arrays))


def _npz_bytes():
    buf = io.BytesIO()
    np.savez(buf, x=np.zeros((8, 6), dtype=np.float32))
    return buf.getvalue()


_DEL = object()

METRIC_CASES = {
    "num-examples nan": ({"num-examples": float("nan")}, "num-examples"),
    "num-examples inf": ({"num-examples": float("inf")}, "num-examples"),
    "num-examples list": ({"num-examples": [1, 2]}, "num-examples"),
    "num-examples 1e12": ({"num-examples": int(1e12)}, "num-examples"),
    "num-examples fraction": ({"num-examples": 2.5}, "num-examples"),
    "train_loss nan": ({"train_loss": float("nan")}, "train_loss"),
    "train_loss inf": ({"train_loss": float("inf")}, "train_loss"),
    "train_loss list": ({"train_loss": [0.5]}, "train_loss"),
    "partition-id nan": ({"partition-id": float("nan")}, "partition-id"),
    "partition-id list": ({"partition-id": [1]}, "partition-id"),
    "partition-id other": ({"partition-id": 2}, "partition-id"),
    "seconds nan": ({"seconds": float("nan")}, "seconds"),
    "seconds inf": ({"seconds": float("-inf")}, "seconds"),
    "seconds list": ({"seconds": [1.0]}, "seconds"),
    "seconds negative": ({"seconds": -1.0}, "seconds"),
    "column status": ({"status": 1.0}, "status"),
    "column round": ({"round": 99}, "round"),
    "extra list": ({"rss_peak_mib": [1.0, 2.0]}, "rss_peak_mib"),
}

PAYLOAD_CASES = {
    "not npy": (b"this is not an npy file", KEY),
    "zip": (_npz_bytes(), KEY),
    "empty": (b"", KEY),
}


def _reference_step(grid, w0, exclude):
    """Independent: numpy weighted mean of the good replies' float32 gradients, one SGD step of size 1."""
    good = [r for m, r in zip(grid.sent, grid.replies) if int(m.content["config"]["partition-id"]) != exclude]
    n = np.array([float(r.content["metrics"]["num-examples"]) for r in good])
    out = {}
    for k, w in w0.items():
        g = sum(nk * r.content["arrays"][k].numpy().astype(np.float64) for nk, r in zip(n, good)) / n.sum()
        out[k] = w - g
    return out


def _run_tampered(tmp_path, tamper, **kw):
    cfg = _cfg(tmp_path, **kw)
    server = Server(cfg, tmp_path)
    w0 = {k: a.numpy().copy() for k, a in server.arrays.items()}
    grid = FakeGrid(3, tamper=lambda pid, c: tamper(c) if pid == BAD else c)
    summary = server.run_rounds(grid)
    w1 = {k: a.numpy() for k, a in server.arrays.items()}
    return server, grid, w0, w1, summary


def _assert_rejected_and_equal_to_reference(tmp_path, grid, w0, w1, needle, status="rejected"):
    clients = pd.read_csv(tmp_path / "clients.csv")
    bad = clients[clients.client_id == BAD]
    assert len(bad) == 1, clients
    assert bad.iloc[0].status == status and needle in str(bad.iloc[0].error), bad.iloc[0].to_dict()
    assert list(clients[clients.client_id != BAD].status) == ["ok", "ok"]
    ref = _reference_step(grid, w0, exclude=BAD)
    for k in ref:
        np.testing.assert_allclose(w1[k], ref[k], rtol=0, atol=1e-12, err_msg=k)


@pytest.mark.parametrize("case", list(METRIC_CASES))
def test_bad_metric_value_is_rejected_not_averaged(tmp_path, case):
    changes, needle = METRIC_CASES[case]
    _, grid, w0, w1, _ = _run_tampered(tmp_path, lambda c: _with_metric(c, **changes))
    _assert_rejected_and_equal_to_reference(tmp_path, grid, w0, w1, needle)
    if case.startswith("column"):  # the real column was not overwritten by the reply's metric
        clients = pd.read_csv(tmp_path / "clients.csv")
        assert set(clients["round"]) == {1} and set(clients.status) == {"ok", "rejected"}


@pytest.mark.parametrize("case", list(PAYLOAD_CASES))
def test_bad_array_payload_is_rejected_not_crashing(tmp_path, case):
    data, needle = PAYLOAD_CASES[case]
    _, grid, w0, w1, _ = _run_tampered(tmp_path, lambda c: _with_payload(c, data))
    _assert_rejected_and_equal_to_reference(tmp_path, grid, w0, w1, needle)


def test_num_examples_bound_is_what_the_client_was_asked(tmp_path):
    """batch_size 5 with FedSGD: at most 5 examples; the toy clients train 2, 3, 5 (accepted), a claim of 6 is not."""
    _, _, _, _, _ = _run_tampered(tmp_path / "ok", lambda c: c, batch_size=5)
    clients = pd.read_csv(tmp_path / "ok" / "clients.csv")
    assert list(clients.status) == ["ok"] * 3
    _, grid, w0, w1, _ = _run_tampered(tmp_path / "bad", lambda c: _with_metric(c, **{"num-examples": 6}), batch_size=5)
    _assert_rejected_and_equal_to_reference(tmp_path / "bad", grid, w0, w1, "exceeds the 5 examples")


# ---------------------------------------------------------------------------------------------- final codes (FedAvg)
def _fedavg_cfg(tmp_path, bits):
    return _cfg(tmp_path, algorithm="fedavg", strategy="fedavg", bits=bits, local_steps=2, lr=0.1)


def _final_codes_round(tmp_path, bits, tamper):
    cfg = _fedavg_cfg(tmp_path, bits)
    server = Server(cfg, tmp_path)
    grid = FakeGrid(3, tamper=lambda pid, c: tamper(c) if pid == BAD else c)
    server.run_rounds(grid)
    return server, grid, pd.read_csv(tmp_path / "clients.csv")


def _codes_out_of_range(content, unpacked: bool = False):
    """4-bit final codes travel packed two per byte (issue 17): put the nibble 8 (= -8, outside [-7, 7]) into the
    first byte; with ``unpacked`` send the codes as int8 (also accepted) with one code of 100."""
    arrays = {k: a for k, a in content["arrays"].items()}
    q = arrays[KEY].numpy().copy()
    assert q.dtype == np.uint8
    if unpacked:
        lo, hi = (q & 0xF).astype(np.int16), (q >> 4).astype(np.int16)  # independent numpy unpack (two's complement)
        codes = np.stack([lo, hi], axis=1).reshape(-1)
        codes = np.where(codes > 7, codes - 16, codes).astype(np.int8)[: int(np.prod(WEIGHT_SHAPE))]
        q = codes.reshape(WEIGHT_SHAPE)
        q.flat[0] = 100  # a valid int8 code, but outside [-7, 7] of a 4-bit run
    else:
        q.flat[0] = (int(q.flat[0]) & 0xF0) | 0x08
    arrays[KEY] = Array(q)
    return _replace(content, arrays=ArrayRecord(arrays))


def _meta(content, keys):
    return _replace(content, update=ConfigRecord({"format": "final-codes", "keys": keys}))


@pytest.mark.parametrize("defect", ["codes beyond 4 bits", "int8 codes beyond 4 bits", "duplicate key", "missing key"])
def test_bad_final_codes_are_rejected(tmp_path, defect):
    def tamper(c):
        keys = list(c["update"]["keys"])
        assert keys == ["enc1.weight", "enc2.weight"]
        if defect.endswith("codes beyond 4 bits"):
            return _codes_out_of_range(c, unpacked=defect.startswith("int8"))
        if defect == "duplicate key":
            return _meta(c, keys + [keys[0]])
        return _meta(c, keys[1:])

    _, _, clients = _final_codes_round(tmp_path, 4, tamper)
    bad = clients[clients.client_id == BAD].iloc[0]
    needle = {"codes beyond 4 bits": "-8", "int8 codes beyond 4 bits": "outside [-7, 7]", "duplicate key": "more than once",
              "missing key": "missing from the final-codes keys"}[defect]
    assert bad.status == "rejected" and needle in bad.error, bad.error
    assert list(clients[clients.client_id != BAD].status) == ["ok", "ok"]


def test_final_codes_of_a_good_reply_are_accepted_at_4_bits(tmp_path):
    _, _, clients = _final_codes_round(tmp_path, 4, lambda c: c)
    assert list(clients.status) == ["ok"] * 3


# ---------------------------------------------------------------------------------------------- item 8: non-finite
class Toy32Workload(__import__("toy").ToyWorkload):
    """The toy workload in float32 (a float64 model cannot overflow from float32 gradients)."""

    name = "toy32"

    def build_model(self):
        return super().build_model().float()

    def data(self, client_id, round_num=1):
        x, y = super().data(client_id, round_num)
        return x.float(), y


def _huge(content):
    """Client 1's enc1.weight gradient set to 3.4e38: finite on the wire, but the server step (lr 10) overflows."""
    arrays = {k: Array(np.full(a.shape, 3.4e38, dtype=np.float32)) if k == KEY else a
              for k, a in content["arrays"].items()}
    return _replace(content, arrays=ArrayRecord(arrays))


class _HugeInRounds13(FakeGrid):
    def __init__(self, n):
        super().__init__(n)
        self.rnd = 0

    def send_and_receive(self, messages, timeout=None):
        self.rnd += 1
        self.tamper = None if self.rnd == 2 else (lambda pid, c: _huge(c) if pid == BAD else c)
        return super().send_and_receive(messages, timeout)


def test_nonfinite_global_model_is_refused_and_run_stops_after_n(tmp_path, monkeypatch):
    import fedaqt.plugins as plugins

    monkeypatch.setitem(plugins._BUILTIN_WORKLOADS, "toy32", "test_reply_faults:Toy32Workload")
    cfg = _cfg(tmp_path, rounds=4, workload="toy32", bits=32, server_lr=10.0, options={"max_nonfinite_rounds": 2})
    server = Server(cfg, tmp_path)
    w0 = {k: a.numpy().copy() for k, a in server.arrays.items()}
    grid = _HugeInRounds13(3)
    with pytest.raises(RunAborted, match=r"not finite in 2 rounds .*max_nonfinite_rounds=2.*--resume"):
        server.run_rounds(grid)
    rounds = pd.read_csv(tmp_path / "rounds.csv")
    assert list(rounds["round"]) == [1, 2, 3]
    assert list(rounds["update_rejected"]) == [1, 0, 1]
    # every reply was well-formed (finite): the refusal is of the aggregate, and no later client was poisoned
    clients = pd.read_csv(tmp_path / "clients.csv")
    assert list(clients.status) == ["ok"] * 9
    import torch

    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["round"] == 3
    final = {k: t.numpy() for k, t in ckpt["params"].items()}
    # round 1 kept the initial model, round 2 (untampered) stepped from it, round 3 kept round 2's model:
    # recompute round 2's step independently from its replies (numpy, float64)
    r2 = grid.replies[3:6]
    n = np.array([float(r.content["metrics"]["num-examples"]) for r in r2])
    for k in w0:
        g = sum(nk * r.content["arrays"][k].numpy().astype(np.float64) for nk, r in zip(n, r2)) / n.sum()
        np.testing.assert_allclose(final[k], w0[k] - 10.0 * g, rtol=0, atol=1e-5, err_msg=k)
    assert [u["round"] for u in server.rejected_updates] == [1, 3]
    assert KEY in server.rejected_updates[0]["reason"]


def test_round_options_are_validated_in_preflight(toy_registered):
    from fedaqt.launch.runner import preflight

    for key, bad in (("round_timeout", 0), ("round_timeout", "soon"), ("round_timeout", float("inf")),
                     ("max_nonfinite_rounds", 0), ("max_nonfinite_rounds", 1.5), ("max_nonfinite_rounds", True)):
        with pytest.raises(ConfigError, match=f"option {key}=.* \\(core\\) is not allowed"):
            preflight(RunConfig(workload="toy", strategy="fedavgm", algorithm="fedavg", num_clients=6,
                                clients_per_round=3, options={key: bad}))
    preflight(RunConfig(workload="toy", strategy="fedavgm", algorithm="fedavg", num_clients=6, clients_per_round=3,
                        options={"round_timeout": 2.5, "max_nonfinite_rounds": 1}))


# ---------------------------------------------------------------------------------------------- item 14
def test_failing_server_evaluate_names_cause_and_resume(tmp_path, monkeypatch):
    import toy

    def boom(self, model, round_num):
        if round_num == 2:
            raise ZeroDivisionError("eval set is empty")
        return {"eval_loss": 0.0}

    monkeypatch.setattr(toy.ToyWorkload, "evaluate", boom)
    cfg = _cfg(tmp_path, rounds=3)
    server = Server(cfg, tmp_path)
    with pytest.raises(RunAborted) as info:
        server.run_rounds(FakeGrid(3))
    msg = str(info.value)
    assert "\n" not in msg
    assert "round 2" in msg and "ZeroDivisionError: eval set is empty" in msg and "test_reply_faults.py" in msg
    assert f"fedaqt run --resume {tmp_path}" in msg
    assert list(pd.read_csv(tmp_path / "rounds.csv")["round"]) == [1]  # round 2 is redone on resume


def test_stop_unfinished_prints_one_line_with_cause(tmp_path, capsys):
    from fedaqt.launch.runner import _stop_unfinished

    try:
        try:
            raise RunAborted("round 2: server-side evaluate failed: KeyError: 'x'; continue with `fedaqt run --resume D`")
        except RunAborted as inner:
            raise RuntimeError("An error was encountered. Ending simulation.") from inner
    except RuntimeError as outer:
        with pytest.raises(RuntimeError):
            _stop_unfinished(tmp_path, False, outer)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: round 2: server-side evaluate failed: KeyError: 'x'; continue with `fedaqt run --resume D`"]
