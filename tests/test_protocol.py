"""The message contract (fedaqt.protocol) and the round loop that owns it (issue 10, CONTRACT).

References are independent of the module under test: raw records built by hand with flwr's RecordDict /
ConfigRecord / MetricRecord and literal key strings, Flower's own strategies for the keys Flower writes, numpy for
the final-codes deltas and the buffer average, and Python's ast for "no constant defined twice".
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import MessageType

from fedaqt import protocol
from fedaqt.config import RunConfig
from fedaqt.protocol import BroadcastSpec, ReplyExpectation
from fedaqt.quant.wire import QTensor
from fedaqt.server.app import Server
from fakegrid import FakeGrid
from toy import ToyNet, ToyWorkload

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"a.weight": (3, 4), "a.bias": (3,)}


def _reply_msg(content: RecordDict, node: int = 1001, partition: int = 1) -> Message:
    """A reply to a train message sent to ``node`` (Flower sets src = the replying node)."""
    sent = Message(content=RecordDict({"config": ConfigRecord({"partition-id": partition})}), dst_node_id=node,
                   message_type=MessageType.TRAIN)
    return Message(content=content, reply_to=sent)


# ---------------------------------------------------------------------------------------------- train message
def test_encode_train_matches_hand_built_record_and_decodes_back():
    arrays = ArrayRecord({"a.weight": Array(np.arange(12, dtype=np.float32).reshape(3, 4))})
    meta = ConfigRecord({"quant.keys": []})
    run_config = RunConfig(seed=5, num_clients=4, clients_per_round=2).to_dict()
    base = ConfigRecord({"run-config": json.dumps(run_config, sort_keys=True), "server-round": 7, "proximal-mu": 0.25})
    content = protocol.encode_train(arrays, meta, base, partition_id=3, accept_final_codes=True)
    # the same message written by hand with the literal keys
    raw = RecordDict({"arrays": arrays, "quant": meta,
                      "config": ConfigRecord({"run-config": json.dumps(run_config, sort_keys=True), "server-round": 7,
                                              "proximal-mu": 0.25, "partition-id": 3, "accept-final-codes": True})})
    assert set(content.keys()) == set(raw.keys()) == {"arrays", "quant", "config"}
    assert content["arrays"] is arrays and content["quant"] is meta
    assert dict(content["config"]) == dict(raw["config"])
    assert "partition-id" not in base  # the caller's config is not modified
    for c in (content, raw):
        instr = protocol.decode_train(c)
        assert instr.partition_id == 3 and instr.server_round == 7 and instr.proximal_mu == 0.25
        assert instr.accept_final_codes is True and instr.run_config == run_config
    # optional fields: no partition (the node's own partition-id is the fallback), no FedProx, no final codes
    plain = RecordDict({"arrays": arrays, "quant": meta,
                        "config": ConfigRecord({"run-config": json.dumps(run_config), "server-round": 2})})
    instr = protocol.decode_train(plain, fallback_partition=9)
    assert (instr.partition_id, instr.server_round, instr.proximal_mu, instr.accept_final_codes) == (9, 2, 0.0, False)
    assert "accept-final-codes" not in protocol.encode_train(arrays, meta, {"server-round": 1}, 0)["config"]
    assert protocol.train_config(run_config)["run-config"] == json.dumps(run_config, sort_keys=True)


def test_decode_train_errors_name_the_problem():
    cfg = ConfigRecord({"run-config": "{not json", "server-round": 1, "partition-id": 4})
    content = RecordDict({"config": cfg})
    with pytest.raises(ValueError):
        protocol.decode_train(content)
    assert protocol.train_partition_id(content) == 4  # still known, for the error reply
    with pytest.raises(KeyError):
        protocol.decode_train(RecordDict({"config": ConfigRecord({"run-config": "{}"})}))
    assert protocol.train_partition_id(RecordDict({}), 2) == 2


def test_flower_writes_the_keys_the_protocol_reads():
    """``server-round`` (FedAvg.configure_train) and ``proximal-mu`` (FedProx) are Flower's own keys."""
    from flwr.serverapp.strategy import FedProx

    class Grid:
        def get_node_ids(self):
            return [11, 12]

    msgs = list(FedProx(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=2, min_train_nodes=2,
                        proximal_mu=0.5).configure_train(4, ArrayRecord(), ConfigRecord(), Grid()))
    cfg = msgs[0].content["config"]
    assert cfg[protocol.SERVER_ROUND] == 4 and cfg[protocol.PROXIMAL_MU] == 0.5


# ---------------------------------------------------------------------------------------------- reply
def _update(rng) -> dict[str, np.ndarray]:
    return {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


def test_encode_reply_matches_hand_built_record_and_validates_field_by_field():
    rng = np.random.default_rng(0)
    upd = _update(rng)
    arrays = ArrayRecord({k: Array(v) for k, v in upd.items()})
    metrics = {"partition-id": 1, "num-examples": 6, "train_loss": 0.75, "seconds": 1.5, "rss_peak_mib": 12.5}
    node = ConfigRecord({"ray_node_id": "abc", "hostname": "h"})
    content = protocol.encode_reply(arrays, metrics, nodeinfo=node)
    raw = RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics), "nodeinfo": node})
    assert set(content.keys()) == set(raw.keys())
    assert dict(content["metrics"]) == dict(raw["metrics"]) and content["arrays"] is arrays
    spec = BroadcastSpec(bits=8, granularity="tensor", quantized_keys=frozenset(), param_shapes=SHAPES)
    for c in (content, raw):
        row, update, n = protocol.validate_reply(_reply_msg(c, node=1001),
                                                 ReplyExpectation(round=3, partition=1, spec=spec, max_examples=6))
        assert (row.round, row.client_id, row.node_id, row.status, row.error) == (3, 1, 1001, "ok", "")
        assert (row.num_examples, row.train_loss, row.seconds, n) == (6, 0.75, 1.5, 6)
        assert row.extra == {"rss_peak_mib": 12.5}
        assert row.bytes_up == sum(len(a.data) for a in arrays.values())
        assert set(update) == set(SHAPES)
        for k, v in upd.items():
            assert update[k].dtype == torch.float32 and np.array_equal(update[k].numpy(), v)
    # the same reply against other expectations: another assigned partition, a lower example bound
    row, update, _ = protocol.validate_reply(_reply_msg(raw), ReplyExpectation(round=3, partition=2, spec=spec))
    assert row.status == "rejected" and "assigned partition 2" in row.error and update is None
    row, _, _ = protocol.validate_reply(_reply_msg(raw), ReplyExpectation(round=3, partition=1, spec=spec, max_examples=5))
    assert row.status == "rejected" and "exceeds the 5 examples" in row.error
    row, _, _ = protocol.validate_reply(_reply_msg(raw), ReplyExpectation(
        round=3, partition=1, spec=spec, budget_fn=lambda cid, c: f"client {cid} too big"))
    assert (row.status, row.error) == ("over_budget", "client 1 too big")


def test_error_replies():
    spec = BroadcastSpec(bits=8, granularity="tensor", quantized_keys=frozenset(), param_shapes=SHAPES)
    content = protocol.encode_error_reply(2, "ValueError: boom (at x.py:1 in f)")
    raw = RecordDict({"metrics": MetricRecord({"partition-id": 2, "num-examples": 0}),
                      "error": ConfigRecord({"error": "ValueError: boom (at x.py:1 in f)"})})
    assert dict(content["metrics"]) == dict(raw["metrics"]) and dict(content["error"]) == dict(raw["error"])
    row, update, n = protocol.validate_reply(_reply_msg(content), ReplyExpectation(round=1, partition=2, spec=spec))
    assert (row.status, row.error, row.client_id, update, n) == ("error", "ValueError: boom (at x.py:1 in f)", 2, None, 0)
    from flwr.app import Error

    sent = Message(content=RecordDict(), dst_node_id=1001, message_type=MessageType.TRAIN)
    died = Message(Error(code=1, reason="ClientActorDied: the client process exited"), reply_to=sent)
    row, _, _ = protocol.validate_reply(died, ReplyExpectation(round=1, partition=0, spec=spec))
    assert row.status == "died" and row.client_id == 0
    other = Message(Error(code=1, reason="timeout somewhere"), reply_to=sent)
    assert protocol.validate_reply(other, ReplyExpectation(round=1, partition=0, spec=spec))[0].status == "error"


def test_final_codes_reply_forms_the_delta_against_what_was_sent():
    """delta = s_T q_T - s_0 q_0 for the named keys (numpy), float delta for the others; refused when the round
    did not offer final codes."""
    rng = np.random.default_rng(1)
    q0 = rng.integers(-127, 128, size=(3, 4)).astype(np.int8)
    s0 = np.float32(0.02)
    qT = rng.integers(-127, 128, size=(3, 4)).astype(np.int8)
    sT = rng.uniform(0.01, 0.03, size=3).astype(np.float32)  # the reply's per-channel float32 scales
    bias_delta = rng.normal(size=3).astype(np.float32)
    raw = RecordDict({
        "arrays": ArrayRecord({"a.weight": Array(qT), "a.weight::scale": Array(sT), "a.bias": Array(bias_delta)}),
        "metrics": MetricRecord({"partition-id": 0, "num-examples": 4, "train_loss": 1.0}),
        "update": ConfigRecord({"format": "final-codes", "keys": ["a.weight"]}),
    })
    spec = BroadcastSpec(bits=8, granularity="tensor", quantized_keys=frozenset({"a.weight"}), param_shapes=SHAPES,
                         update_kind="delta", final_code_keys=frozenset({"a.weight"}))
    sent = {"a.weight": QTensor(codes=torch.from_numpy(q0), scale=torch.tensor(s0), bits=8, granularity="tensor")}
    row, update, n = protocol.validate_reply(_reply_msg(raw, partition=0),
                                             ReplyExpectation(round=1, partition=0, spec=spec, sent_quantized=sent))
    assert row.status == "ok", row.error
    want = qT.astype(np.float32) * sT[:, None] - q0.astype(np.float32) * s0
    np.testing.assert_allclose(update["a.weight"].numpy(), want, rtol=0, atol=1e-7)
    assert np.array_equal(update["a.bias"].numpy(), bias_delta)
    row, update, _ = protocol.validate_reply(_reply_msg(raw, partition=0),
                                             ReplyExpectation(round=1, partition=0, spec=spec))
    assert row.status == "rejected" and "did not request them" in row.error and update is None


# ---------------------------------------------------------------------------------------------- one definition
#: every key constant of the contract and its value; no other fedaqt module may define one of them
CONSTANTS = ("BROADCAST_KEY", "QUANT_META_KEY", "CONFIG_KEY", "UPDATE_KEY", "METRICS_KEY", "ERROR_KEY",
             "ACCEPT_FINAL_CODES", "UPDATE_META_KEY", "FINAL_CODES_FORMAT", "RUN_CONFIG", "SERVER_ROUND",
             "PARTITION_ID", "PROXIMAL_MU", "NUM_EXAMPLES", "NODEINFO_KEY", "CLIENT_DIED_MARK")
#: values distinctive enough that any string literal equal to one (outside docstrings) is a second definition
DISTINCT = ("accept-final-codes", "final-codes", "run-config", "server-round", "proximal-mu", "partition-id",
            "num-examples", "nodeinfo", "ClientActorDied")


def _code_strings_and_assignments(path: Path) -> tuple[set[str], set[str]]:
    tree = ast.parse(path.read_text())
    docstrings = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
    strings = {n.value for n in ast.walk(tree)
               if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings}
    assigned = set()
    for n in ast.walk(tree):
        targets = n.targets if isinstance(n, ast.Assign) else [n.target] if isinstance(n, ast.AnnAssign) else []
        for t in targets:
            for el in (t.elts if isinstance(t, ast.Tuple) else [t]):
                if isinstance(el, ast.Name):
                    assigned.add(el.id)
    return strings, assigned


def test_every_contract_constant_is_defined_once_in_protocol():
    assert {getattr(protocol, c) for c in CONSTANTS} >= set(DISTINCT)
    offenders = []
    for path in sorted((ROOT / "fedaqt").rglob("*.py")):
        if path.name == "protocol.py" and path.parent.name == "fedaqt":
            continue
        strings, assigned = _code_strings_and_assignments(path)
        offenders += [f"{path.relative_to(ROOT)}: literal {v!r}" for v in DISTINCT if v in strings]
        offenders += [f"{path.relative_to(ROOT)}: defines {c}" for c in CONSTANTS if c in assigned]
    assert not offenders, offenders


# ---------------------------------------------------------------------------------------------- the round loop
class StrictStrategy:
    """Wraps a strategy; any attribute but the public names of the server-strategy contract fails loudly
    (an AssertionError, which ``getattr(obj, name, default)`` / ``hasattr`` do not swallow): the four methods plus
    the optional streaming hooks (``accepts_mean_reply``, ``aggregate_mean``; DP's ``clip_update`` /
    ``aggregate_streamed``)."""

    ALLOWED = ("configure_train", "aggregate_train", "state_dict", "load_state_dict", "accepts_mean_reply",
               "clip_update", "aggregate_streamed", "aggregate_mean")

    def __init__(self, inner):
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "seen", [])

    def __getattr__(self, name):
        if name not in StrictStrategy.ALLOWED:
            raise AssertionError(f"the server read strategy attribute {name!r}")
        self.seen.append(name)
        return getattr(self._inner, name)

    def __setattr__(self, name, value):
        raise AssertionError(f"the server set strategy attribute {name!r}")


@pytest.mark.usefixtures("toy_registered")
@pytest.mark.parametrize("strategy,algorithm,bits", [("relay", "fedsgd", 4), ("fedadam", "fedavg", 4),
                                                     ("fedavgm", "fedavg", 8)])
def test_server_never_reads_strategy_internals(tmp_path, strategy, algorithm, bits):
    kw = {"local_steps": 2} if algorithm == "fedavg" else {}
    cfg = RunConfig(workload="toy", strategy=strategy, algorithm=algorithm, bits=bits, num_clients=4,
                    clients_per_round=3, rounds=2, lr=0.1, out=str(tmp_path / "strict"), seed=1, **kw)
    ref = Server(cfg, tmp_path / "ref")
    ref.run_rounds(FakeGrid(4))
    server = Server(cfg, tmp_path / "strict")
    server.strategy = StrictStrategy(server.strategy)
    server.run_rounds(FakeGrid(4))
    seen = set(server.strategy.seen)
    assert {"configure_train", "state_dict"} <= seen <= set(StrictStrategy.ALLOWED)
    assert seen & {"aggregate_train", "aggregate_mean"}  # a streamed round hands in the mean itself
    for k, a in ref.arrays.items():  # the wrapper changed nothing
        assert np.array_equal(a.numpy(), server.arrays[k].numpy()), k
    clients = pd.read_csv(tmp_path / "strict" / "clients.csv")
    assert list(clients.status) == ["ok"] * 6
    # resume goes through load_state_dict only
    resumed = Server(cfg, tmp_path / "strict", resume=True)
    inner = resumed.strategy
    resumed.strategy = StrictStrategy(inner)
    resumed.restore()
    assert "load_state_dict" in resumed.strategy.seen


class BNWorkload(__import__("toy").ToyWorkload):
    """The toy network with a BatchNorm1d after enc1: float running statistics travel as buffers."""

    name = "toybn"

    def build_model(self):
        model = super().build_model()
        torch.manual_seed(self.config.seed)
        model.enc1 = torch.nn.Sequential(model.enc1, torch.nn.BatchNorm1d(8).double())
        return model


def test_server_averages_the_float_buffers_itself(tmp_path, monkeypatch):
    """FedAvg round with BatchNorm: new buffers = old + sum_k n_k d_k / sum_k n_k over the replies' buffer deltas
    (numpy, float64), kept in the checkpoint; the strategy never receives buffer keys."""
    import fedaqt.plugins as plugins

    monkeypatch.setitem(plugins._BUILTIN_WORKLOADS, "toybn", "test_protocol:BNWorkload")
    cfg = RunConfig(workload="toybn", strategy="fedavg", algorithm="fedavg", bits=8, num_clients=3, clients_per_round=3,
                    rounds=1, local_steps=2, lr=0.1, out=str(tmp_path), seed=0)
    server = Server(cfg, tmp_path)
    b0 = {k: np.array(v, copy=True) for k, v in server.buffers.items()}
    assert {"enc1.1.running_mean", "enc1.1.running_var"} <= set(b0)
    seen = []
    real, real_mean = server.strategy.aggregate_train, server.strategy.aggregate_mean

    def spy(rnd, replies):
        replies = list(replies)
        seen.extend(set(r.content["arrays"].keys()) for r in replies)
        return real(rnd, replies)

    def spy_mean(rnd, mean, total):  # a streamed round hands the strategy the mean itself
        seen.append(set(mean))
        return real_mean(rnd, mean, total)

    server.strategy.aggregate_train, server.strategy.aggregate_mean = spy, spy_mean
    grid = FakeGrid(3)
    server.run_rounds(grid)
    assert seen and all(keys == set(server.spec.param_shapes) for keys in seen)
    n = np.array([float(r.content["metrics"]["num-examples"]) for r in grid.replies])
    for k, v in b0.items():
        if v.dtype.kind != "f":
            continue
        d = sum(nk * r.content["arrays"][k].numpy().astype(np.float64) for nk, r in zip(n, grid.replies)) / n.sum()
        np.testing.assert_allclose(server.buffers[k], v + d, rtol=1e-12, atol=1e-12, err_msg=k)
        assert not np.allclose(server.buffers[k], v), k  # they moved
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    for k, v in server.buffers.items():
        assert np.array_equal(ckpt["buffers"][k].numpy(), v), k


def test_protocol_imports_only_the_quant_core():
    """fedaqt.protocol may import fedaqt.quant (and flwr, torch, numpy), nothing else of fedaqt."""
    import subprocess
    import sys

    code = ("import sys; import fedaqt.protocol; "
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('fedaqt'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                         timeout=120).stdout.split()
    assert "fedaqt.protocol" in out
    others = [m for m in out if m not in ("fedaqt", "fedaqt.protocol") and not m.startswith("fedaqt.quant")]
    assert not others, others


# ---------------------------------------------------------------------------------------------- strategy registry
def test_strategy_plugins_declare_upload_and_old_declarations_still_load():
    from flwr.serverapp.strategy import FedAvg

    from fedaqt.strategies.quantized import QuantizedMixin
    from fedaqt.strategies.registry import BUILTIN_STRATEGIES, StrategyPlugin, as_strategy_plugin, plugin_from_class

    want = {"fedsgd": "gradient", "relay": "gradient", "fedavg": "delta", "fedprox": "delta", "fedavgm": "",
            "fedadam": "", "fedyogi": ""}
    assert {n: p.upload for n, p in BUILTIN_STRATEGIES.items()} == want

    class Old(QuantizedMixin, FedAvg):
        """old style: algorithm attribute"""
        algorithm = "fedsgd"

    class New(QuantizedMixin, FedAvg):
        """new style"""
        upload = "delta"

    assert plugin_from_class(Old).upload == "gradient" and plugin_from_class(New).upload == "delta"

    class Legacy:
        factory, algorithm, description = staticmethod(lambda cfg, spec: None), "fedavg", "x"

    assert as_strategy_plugin(Legacy()).upload == "delta"
    with pytest.raises(ValueError, match="upload='fedavg'"):
        StrategyPlugin(lambda c, s: None, "fedavg", "x")

    class OneArg(QuantizedMixin, FedAvg):
        @classmethod
        def from_config(cls, cfg):
            return cls()

    with pytest.raises(TypeError, match=r"from_config\(cls, cfg, spec\)"):
        plugin_from_class(OneArg)
    # built complete: spec and seed are constructor arguments, no setup phase
    spec = BroadcastSpec(bits=32, granularity="tensor", quantized_keys=frozenset(), param_shapes=SHAPES)
    s = plugin_from_class(New).factory(RunConfig(num_clients=4, clients_per_round=2, seed=9), spec)
    assert s.spec is spec and s.seed == 9 and (s.min_train_nodes, s.fraction_train) == (2, 0.5)
    with pytest.raises(TypeError, match="spec"):
        New(fraction_train=1.0)


class _ScalarNet(torch.nn.Module):
    """tests/toy.py's net times a learnable temperature of shape ``shape`` (``()`` = a 0-d parameter)."""

    def __init__(self, shape):
        super().__init__()
        self.net = ToyNet()
        self.temp = torch.nn.Parameter(torch.full(shape, 1.5))

    def forward(self, x):
        return self.net(x) * self.temp


class Scalar0dWorkload(ToyWorkload):
    """:class:`_ScalarNet` with a 0-d temperature (registered by name in the test below)."""

    shape: tuple = ()

    def build_model(self):
        torch.manual_seed(self.config.seed)
        return _ScalarNet(self.shape).double()

    def quantize_filter(self, name, module):
        return name.startswith("net.enc")


class Scalar1dWorkload(Scalar0dWorkload):
    shape = (1,)


@pytest.mark.parametrize("strategy,algorithm,bits,uplink", [("fedavgm", "fedavg", 8, 32), ("fedavgm", "fedavg", 32, 8),
                                                            ("fedsgd", "fedsgd", 4, 32)])
def test_a_0d_parameter_trains_like_a_1_element_one(tmp_path, monkeypatch, strategy, algorithm, bits, uplink):
    """A model with a 0-d parameter runs the real round loop (broadcast, client round, normalized reply, strategy
    step; it crashed with "output with shape [] doesn't match the broadcast shape [1]": the normalized reply turned
    0-d arrays into shape (1,)) and ends bitwise where the same model with that parameter as shape (1,) ends."""
    import fedaqt.plugins as plugins

    finals = {}
    for shape in ((), (1,)):
        name = f"scalar{len(shape)}d"
        monkeypatch.setitem(plugins._BUILTIN_WORKLOADS, name, f"test_protocol:Scalar{len(shape)}dWorkload")
        out = tmp_path / name
        cfg = RunConfig(workload=name, strategy=strategy, algorithm=algorithm, bits=bits, uplink_bits=uplink,
                        local_steps=2, lr=0.1, server_lr=0.5, server_momentum=0.9, num_clients=6,
                        clients_per_round=3, rounds=2, eval_every=1, seed=2, out=str(out))
        server = Server(cfg, out)
        server.run_rounds(FakeGrid(6))
        finals[shape] = {k: np.asarray(a.numpy()) for k, a in server.arrays.items()}
    assert finals[()]["temp"].shape == () and finals[(1,)]["temp"].shape == (1,)
    assert finals[()]["temp"] != 1.5  # it trained
    for k, v in finals[(1,)].items():
        np.testing.assert_array_equal(finals[()][k].reshape(v.shape), v, err_msg=k)
