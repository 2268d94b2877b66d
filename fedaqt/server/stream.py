"""Streaming aggregation (issue 16): replies are validated and folded into a running weighted sum as they arrive,
so the server holds O(model) per round instead of every accepted client's decoded update.

Why our own code: Flower's strategies (``FedAvg.aggregate_train``) take the list of all replies of a round, and its
``Grid.send_and_receive`` returns that list only when the round ends. We keep Flower's strategies for the server
step (they receive the streamed mean as one reply of weight ``sum n_k``, as under SecAgg+) and Flower's grid for
transport (:meth:`Grid.push_messages` / :meth:`Grid.pull_messages`, the two calls ``send_and_receive`` is made of).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

#: seconds between two pulls that found nothing (Flower's InMemoryGrid sleeps its pull_interval, 0.1 s, after every
#: pull, also when replies came)
PULL_INTERVAL_S = 0.01


class WeightedSum:
    """Running ``S = sum_k n_k * u_k`` per key and ``N = sum_k n_k``; :meth:`mean` is ``S / N`` in float64.

    The sum is kept as a float64 double-double (``hi + lo``, Knuth's TwoSum error of every addition accumulated in
    ``lo``): every term ``n_k * u_k`` of a float32 ``u_k`` and ``n_k < 2**29`` is exact in float64, and the double-
    double sum carries ~106 bits, so the float64 mean does not depend on the order the replies arrived in (a naive
    float64 running sum does: same-seed runs would differ in the last bits). Memory: two float64 arrays per key.

    Args:
        shapes: ``{key: shape}`` of the summed tensors.
    """

    def __init__(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        self.shapes = {k: tuple(s) for k, s in shapes.items()}
        self.hi = {k: np.zeros(s, dtype=np.float64) for k, s in self.shapes.items()}
        self.lo = {k: np.zeros(s, dtype=np.float64) for k, s in self.shapes.items()}
        self.total = 0
        self.count = 0

    def add(self, update: Mapping[str, Any], n: int) -> None:
        """Fold ``n * update[key]`` into the sum for every key (tensors or arrays of the key's shape).

        Raises:
            ValueError: ``n < 1``, a missing key or a shape that differs (nothing is added then).
        """
        if int(n) < 1:
            raise ValueError(f"num_examples={n} must be >= 1")
        terms = {}
        for key, shape in self.shapes.items():
            if key not in update:
                raise ValueError(f"the update has no {key!r}")
            v = update[key]
            v = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
            if tuple(v.shape) != shape:
                raise ValueError(f"update {key!r} has shape {list(v.shape)}, expected {list(shape)}")
            terms[key] = v
        for key, v in terms.items():
            t = v.astype(np.float64) * float(n)
            hi = self.hi[key]
            s = hi + t
            bp = s - hi
            err = hi - (s - bp)  # TwoSum: the exact rounding error of hi + t is (hi - (s - bp)) + (t - bp)
            t -= bp
            err += t
            self.lo[key] += err
            self.hi[key] = s
        self.total += int(n)
        self.count += 1

    def mean(self) -> dict[str, np.ndarray]:
        """``{key: S / N}`` float64 (``ValueError`` when nothing was added)."""
        if self.total <= 0:
            raise ValueError("no update was added")
        # np.asarray: a 0-d key's arithmetic gives a numpy scalar, callers need an array (torch.from_numpy)
        return {k: np.asarray((self.hi[k] + self.lo[k]) / self.total, dtype=np.float64) for k in self.hi}


def stream_replies(grid: Any, messages: list[Any], timeout: float,
                   pull_interval: float = PULL_INTERVAL_S) -> Iterator[Any]:
    """Push ``messages`` through Flower's ``grid`` and yield each reply as soon as a pull returns it, until every
    message is answered or ``timeout`` seconds passed (what ``Grid.send_and_receive`` does, without holding the
    replies). The caller should drop each reply's content once it has been folded in."""
    if not hasattr(grid, "push_messages"):  # a duck-typed grid with send_and_receive only (Flower's Grid has both)
        yield from grid.send_and_receive(messages, timeout=timeout)
        return
    pending = set(grid.push_messages(messages))
    end = time.time() + timeout
    while pending and time.time() < end:
        got = list(grid.pull_messages(pending))
        for msg in got:
            pending.discard(msg.metadata.reply_to_message_id)
        if not got:
            time.sleep(pull_interval)
        yield from got
        del got
