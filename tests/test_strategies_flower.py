"""Each built-in strategy at ``--bits 32`` equals Flower's own strategy on the same client results (issue 5).

Flower's strategy receives replies holding the clients' float models ``w_k``; ours receives, through real
``Message``s, what fedaqt clients send: the float32 delta ``w_k - W`` (FedAvg family) or the gradient
``-(w_k - W)`` (FedSGD family, server lr = step on the mean gradient). Both run ``configure_train`` then
``aggregate_train`` for three rounds, each from its own current model, and the new global models must agree.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx, FedYogi

from fedaqt import protocol
from fedaqt.config import RunConfig
from fedaqt.protocol import BroadcastSpec
from fedaqt.quant.wire import decode_broadcast
from fedaqt.strategies.registry import BUILTIN_STRATEGIES, sampling_kwargs

SHAPES = {"enc.weight": (6, 4), "enc.bias": (6,), "dec.weight": (3, 6)}
NODES = [101, 102, 103]
NUM_EXAMPLES = {101: 2, 102: 3, 103: 5}


class NodeGrid:
    """Just enough Grid for configure_train: the connected node ids."""

    def get_node_ids(self):
        return list(NODES)


# name -> (RunConfig overrides, Flower strategy built from the same config, update kind)
CASES = {
    "fedavg": (dict(algorithm="fedavg"), lambda c: FedAvg(**sampling_kwargs(c)), "delta"),
    "fedavgm": (
        dict(algorithm="fedavg", server_lr=0.7, server_momentum=0.9),
        lambda c: FedAvgM(**sampling_kwargs(c), server_learning_rate=0.7, server_momentum=0.9),
        "delta",
    ),
    "fedsgd": (
        dict(algorithm="fedsgd", server_lr=0.3, server_momentum=0.9),
        lambda c: FedAvgM(**sampling_kwargs(c), server_learning_rate=0.3, server_momentum=0.9),
        "gradient",
    ),
    "relay": (  # no quantized tensors at 32 bits: the relay adds nothing
        dict(algorithm="fedsgd", server_lr=0.3, server_momentum=0.5),
        lambda c: FedAvgM(**sampling_kwargs(c), server_learning_rate=0.3, server_momentum=0.5),
        "gradient",
    ),
    "fedprox": (
        dict(algorithm="fedavg", options={"proximal_mu": 0.25}),
        lambda c: FedProx(**sampling_kwargs(c), proximal_mu=0.25),
        "delta",
    ),
    "fedadam": (
        dict(algorithm="fedavg", server_lr=0.05, lr=0.02, options={"tau": 1e-3}),
        lambda c: FedAdam(**sampling_kwargs(c), eta=0.05, eta_l=0.02, tau=1e-3),
        "delta",
    ),
    "fedyogi": (
        dict(algorithm="fedavg", server_lr=0.05, lr=0.02, options={"tau": 1e-3, "beta_1": 0.8, "beta_2": 0.95}),
        lambda c: FedYogi(**sampling_kwargs(c), eta=0.05, eta_l=0.02, tau=1e-3, beta_1=0.8, beta_2=0.95),
        "delta",
    ),
}


def _spec(kind: str) -> BroadcastSpec:
    return BroadcastSpec(bits=32, granularity="tensor", quantized_keys=frozenset(), param_shapes=SHAPES, update_kind=kind)


def _ours(name: str, cfg: RunConfig, kind: str):
    return BUILTIN_STRATEGIES[name].factory(cfg, _spec(kind))


def _reply(msg: Message, arrays: dict[str, np.ndarray], n: int, partition: int | None = None) -> Message:
    metrics = {"num-examples": n, "train_loss": 1.0}
    if partition is not None:
        metrics["partition-id"] = partition
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


def _numpy(rec: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: np.asarray(a.numpy()) for k, a in rec.items()}


def test_every_builtin_strategy_is_covered():
    assert set(CASES) == set(BUILTIN_STRATEGIES)


@pytest.mark.parametrize("name,schedule", [(n, "constant") for n in sorted(CASES)]
                         + [("fedadam", "cosine"), ("fedsgd", "cosine")])
def test_builtin_strategy_matches_flower_at_32_bits(name, schedule):
    overrides, flower_factory, kind = CASES[name]
    overrides = {**overrides, "options": {**overrides.get("options", {}), "server_lr_schedule": schedule}}
    cfg = RunConfig(strategy=name, bits=32, num_clients=3, clients_per_round=3, seed=4, rounds=3, **overrides)
    ours, theirs = _ours(name, cfg, kind), flower_factory(cfg)
    lr_attr = "eta" if name == "fedadam" else "server_learning_rate"
    base_lr = getattr(theirs, lr_attr, None)
    rng = np.random.default_rng(0)
    w0 = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    w_ours = ArrayRecord({k: Array(v.copy()) for k, v in w0.items()})
    w_flwr = ArrayRecord({k: Array(v.copy()) for k, v in w0.items()})
    grid = NodeGrid()
    for rnd in (1, 2, 3):
        msgs_o = list(ours.configure_train(rnd, w_ours, ConfigRecord(), grid))
        msgs_f = list(theirs.configure_train(rnd, w_flwr, ConfigRecord(), grid))
        assert sorted(m.metadata.dst_node_id for m in msgs_o) == sorted(m.metadata.dst_node_id for m in msgs_f) == NODES
        # the 32-bit broadcast is the float model itself, and Flower's train config (server-round, proximal-mu) is kept
        for m in msgs_o:
            decoded = decode_broadcast(m.content["arrays"], m.content["quant"])
            for k, v in _numpy(w_ours).items():
                np.testing.assert_array_equal(decoded[k].numpy(), v.astype(np.float32))
            cfg_o, cfg_f = m.content["config"], msgs_f[0].content["config"]
            assert cfg_o["server-round"] == cfg_f["server-round"] == rnd
            if name == "fedprox":
                assert cfg_o["proximal-mu"] == cfg_f["proximal-mu"] == 0.25
        # the same client training results: local model w_k = W + d_k
        deltas = {n: {k: (0.1 * rng.normal(size=s)).astype(np.float32) for k, s in SHAPES.items()} for n in NODES}
        cur_o, cur_f = _numpy(w_ours), _numpy(w_flwr)
        replies_f = [
            _reply(m, {k: cur_f[k] + deltas[m.metadata.dst_node_id][k] for k in SHAPES}, NUM_EXAMPLES[m.metadata.dst_node_id])
            for m in msgs_f
        ]
        replies_o = []
        sign = 1.0 if kind == "delta" else -1.0
        for pid, m in enumerate(msgs_o):
            node = m.metadata.dst_node_id
            local = {k: cur_o[k] + deltas[node][k] for k in SHAPES}
            update = {k: (sign * (local[k] - cur_o[k])).astype(np.float32) for k in SHAPES}
            replies_o.append(_reply(m, update, NUM_EXAMPLES[node], pid))
        # what the round loop does: validate each reply, hand the strategy the accepted ones, normalized
        expect = [protocol.ReplyExpectation(round=rnd, partition=pid, spec=_spec(kind)) for pid in range(len(msgs_o))]
        checked = [protocol.validate_reply(r, e) for r, e in zip(replies_o, expect)]
        rows = [row for row, _, _ in checked]
        assert [r.status for r in rows] == ["ok"] * 3, [r.error for r in rows]
        normalized = [protocol.normalized_reply(u, list(SHAPES), n, row.node_id) for row, u, n in checked]
        if schedule == "cosine":  # the cosine decay written out: 1, 0.75, 0.25 of the base rate over 3 rounds
            setattr(theirs, lr_attr, base_lr * {1: 1.0, 2: 0.75, 3: 0.25}[rnd])
        new_o, metrics_o = ours.aggregate_train(rnd, normalized)
        new_f, _ = theirs.aggregate_train(rnd, replies_f)
        if schedule == "cosine":
            assert metrics_o["server_lr"] == pytest.approx(getattr(theirs, lr_attr))
        assert new_o is not None and new_f is not None
        assert metrics_o["num-examples"] == sum(NUM_EXAMPLES.values())
        a_o, a_f = _numpy(new_o), _numpy(new_f)
        assert set(a_o) == set(a_f) == set(SHAPES)
        for k in SHAPES:
            assert a_o[k].dtype == a_f[k].dtype  # (Flower's FedAdam returns float64: so do we)
            np.testing.assert_allclose(a_o[k], a_f[k], rtol=1e-5, atol=2e-6, err_msg=f"{name} round {rnd} {k}")
            assert not np.allclose(a_o[k], cur_o[k])  # the model moved
        w_ours, w_flwr = new_o, new_f
    assert [r.status for r in rows] == ["ok"] * 3


def test_fedavg_ignores_server_lr_fedavgm_uses_it():
    cfg = RunConfig(strategy="fedavg", algorithm="fedavg", server_lr=0.05, server_momentum=0.9, num_clients=3, clients_per_round=3)
    assert type(BUILTIN_STRATEGIES["fedavg"].factory(cfg, _spec("delta"))).__mro__[2] is FedAvg
    m = BUILTIN_STRATEGIES["fedavgm"].factory(cfg, _spec("delta"))
    assert (m.server_learning_rate, m.server_momentum) == (0.05, 0.9)


def test_cosine_schedule_refuses_a_strategy_without_a_server_learning_rate():
    cfg = RunConfig(strategy="fedavg", algorithm="fedavg", num_clients=3, clients_per_round=3,
                    options={"server_lr_schedule": "cosine"})
    with pytest.raises(ValueError, match="server_lr_schedule='cosine'.*no server learning rate"):
        BUILTIN_STRATEGIES["fedavg"].factory(cfg, _spec("delta"))
