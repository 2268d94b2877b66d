"""Streaming aggregation (issue 16): the running weighted sum is the exactly rounded sum (reference: math.fsum per
element) and does not depend on the order the replies arrive in; a naive float64 running sum does (negative
control); stream_replies yields every reply of Flower's grid calls and stops at the timeout."""

from __future__ import annotations

import itertools
import math
import time

import numpy as np
import pytest

from fedaqt.server.stream import WeightedSum, stream_replies


def _updates(k=5, d=400, seed=0):
    rng = np.random.default_rng(seed)
    us = [(rng.normal(size=d) * 10.0 ** rng.integers(-5, 5, size=d)).astype(np.float32) for _ in range(k)]
    us[1] = (-us[0] * np.float32(1.0000001)).astype(np.float32)  # near-cancellation
    return us, [int(v) for v in rng.integers(1, 300, size=k)]


def test_weighted_sum_is_the_exactly_rounded_mean_in_every_order():
    us, ns = _updates()
    total = sum(ns)
    ref = np.array([math.fsum(float(u[i]) * n for u, n in zip(us, ns)) for i in range(len(us[0]))]) / total
    means, naive = [], []
    for perm in itertools.permutations(range(len(us))):
        acc = WeightedSum({"w": (len(us[0]),)})
        run = np.zeros(len(us[0]))
        for j in perm:
            acc.add({"w": us[j]}, ns[j])
            run += us[j].astype(np.float64) * ns[j]
        assert acc.total == total and acc.count == len(us)
        means.append(acc.mean()["w"])
        naive.append(run / total)
    for m in means:
        assert np.array_equal(m, means[0])  # bitwise, all 120 orders
    np.testing.assert_array_equal(means[0], ref)
    assert any(not np.array_equal(m, naive[0]) for m in naive)  # negative control: plain float64 is order-dependent


def test_weighted_sum_rejects_bad_updates_without_adding():
    acc = WeightedSum({"a": (2,), "b": (3,)})
    acc.add({"a": np.ones(2, np.float32), "b": np.ones(3, np.float32)}, 2)
    for bad, n in (({"a": np.ones(2)}, 1), ({"a": np.ones(3), "b": np.ones(3)}, 1),
                   ({"a": np.ones(2), "b": np.ones(3)}, 0)):
        with pytest.raises(ValueError):
            acc.add(bad, n)
    assert acc.count == 1 and acc.total == 2
    np.testing.assert_array_equal(acc.mean()["b"], np.ones(3))
    with pytest.raises(ValueError, match="no update"):
        WeightedSum({"a": (1,)}).mean()


class _Meta:
    def __init__(self, reply_to):
        self.reply_to_message_id = reply_to


class _Reply:
    def __init__(self, reply_to):
        self.metadata = _Meta(reply_to)


class _SlowGrid:
    """Flower's two grid calls; message i's reply becomes available at t0 + delays[i] (None: never)."""

    def __init__(self, delays):
        self.delays, self.t0, self.pulls = delays, None, 0

    def push_messages(self, messages):
        self.t0 = time.time()
        self.left = {f"m{i}": d for i, d in enumerate(self.delays)}
        return list(self.left)

    def pull_messages(self, ids):
        self.pulls += 1
        now = time.time() - self.t0
        ready = [m for m in ids if m in self.left and self.left[m] is not None and self.left[m] <= now]
        for m in ready:
            del self.left[m]
        return [_Reply(m) for m in ready]


def test_stream_replies_yields_as_replies_arrive_and_stops_at_the_timeout():
    grid = _SlowGrid([0.0, 0.05, None])
    t0 = time.time()
    got = [r.metadata.reply_to_message_id for r in stream_replies(grid, [object()] * 3, timeout=0.3)]
    assert sorted(got) == ["m0", "m1"] and 0.3 <= time.time() - t0 < 2.0
    grid = _SlowGrid([0.0, 0.0])
    got = list(stream_replies(grid, [object()] * 2, timeout=30))
    assert len(got) == 2 and grid.pulls == 1  # all answered: no waiting for the timeout
