"""fedaqt.quant.npy against Flower's own Array(ndarray) / Array.numpy() (numpy's np.save / np.load) as the reference,
and the event-driven message extractor of fedaqt.launch.backend against Flower's delivery contract."""

from __future__ import annotations

import queue
import threading
import time

import numpy as np
import pytest
from flwr.app import Array

from fedaqt.quant import npy
from fedaqt.quant.npy import from_array, to_array

ARRAYS = [
    np.zeros((0,), np.float32),
    np.array(3.5, np.float32),  # 0-d
    np.arange(-6, 6, dtype=np.int8).reshape(3, 4),
    np.random.default_rng(0).random((5, 7)).astype(np.float16),
    np.random.default_rng(1).random((2, 3, 4)),  # float64
    np.zeros((2, 0, 3), np.float32),
    np.array([True, False]),
    np.arange(6, dtype=">i4"),  # big-endian
    np.arange(256, dtype=np.uint8),
]


@pytest.mark.parametrize("nd", ARRAYS, ids=lambda a: f"{a.dtype.str}{list(a.shape)}")
def test_to_array_is_byte_identical_to_flower_and_from_array_reads_it_back(nd):
    ref = Array(nd)
    for _ in range(2):  # the second call takes the cached header
        got = to_array(nd)
        assert (got.data, got.dtype, got.shape, got.stype) == (ref.data, ref.dtype, ref.shape, ref.stype)
        back, want = from_array(got), ref.numpy()
        assert back.dtype == want.dtype and back.shape == want.shape and np.array_equal(back, want)
        assert not back.flags.writeable or back.size == 0 or back.base is None  # a view of the record's bytes
        fresh = from_array(got, writable=True)
        assert fresh.flags.writeable and np.array_equal(fresh, want)


def test_non_contiguous_and_same_shape_other_dtype_take_the_right_header():
    f = np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4))
    assert to_array(f).data == Array(f).data  # Fortran order: through Flower, fortran_order header
    assert np.array_equal(from_array(Array(f)), f)
    a32, a64 = np.ones((4, 4), np.float32), np.ones((4, 4), np.float64)
    to_array(a32)
    assert to_array(a64).data == Array(a64).data and from_array(to_array(a64)).dtype == np.float64


def test_bad_payloads_raise_as_numpy_does():
    good = Array(np.arange(10, dtype=np.float32))
    short = Array(dtype=good.dtype, shape=good.shape, stype=good.stype, data=good.data[:-4])
    with pytest.raises(ValueError):
        short.numpy()
    with pytest.raises(ValueError):
        from_array(short)
    garbage = Array(dtype="float32", shape=(2,), stype="numpy.ndarray", data=b"not an npy payload")
    with pytest.raises(Exception) as ref:
        garbage.numpy()
    with pytest.raises(type(ref.value)):
        from_array(garbage)
    other = Array(dtype="float32", shape=(2,), stype="torch.Tensor", data=good.data)
    with pytest.raises(TypeError):
        from_array(other)


def test_header_caches_are_bounded(monkeypatch):
    monkeypatch.setattr(npy, "MAX_CACHED_HEADERS", 3)
    npy._encode_headers.clear()
    npy._decode_headers.clear()
    for n in range(1, 10):
        a = to_array(np.zeros((n,), np.float32))
        assert np.array_equal(from_array(a), np.zeros((n,), np.float32))
        assert len(npy._encode_headers) <= 3 and len(npy._decode_headers) <= 3


class _State:
    """The part of Flower's InMemoryLinkState the extractor uses: store_message_ins + get_message_ins(limit=1)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.pending: dict[int, list[str]] = {}

    def store_message_ins(self, node_id, msg):
        with self.lock:
            self.pending.setdefault(node_id, []).append(msg)

    def get_message_ins(self, node_id, limit):
        with self.lock:
            got = self.pending.get(node_id, [])[:limit]
            self.pending[node_id] = self.pending.get(node_id, [])[limit:]
            return got


def test_extractor_delivers_every_message_at_once_and_restores_the_state_method(monkeypatch):
    from fedaqt.launch import backend

    monkeypatch.setattr(backend, "EXTRACTOR_IDLE_S", 5.0)  # a poll would be seen as a 5 s delay
    state, q, stop = _State(), queue.Queue(), threading.Event()
    th = threading.Thread(target=backend.add_messages_to_queue, args=(state, q, {1: 0, 2: 1}, stop))
    th.start()
    try:
        time.sleep(0.2)  # the extractor is asleep now
        t0 = time.perf_counter()
        for m in ("a", "b", "c"):
            state.store_message_ins(1, m)  # two for one node: Flower takes one per scan
        state.store_message_ins(2, "d")
        got = [q.get(timeout=3.0) for _ in range(4)]
        waited = time.perf_counter() - t0
    finally:
        stop.set()
        th.join(timeout=10)
    assert not th.is_alive()
    assert sorted(got) == ["a", "b", "c", "d"] and [m for m in got if m != "d"] == ["a", "b", "c"]
    assert waited < 2.0  # woken by the store, not by the 5 s idle wait
    assert "store_message_ins" not in vars(state)  # the class's method again


def test_installed_patches_and_restores_flower():
    import flwr.server.superlink.fleet.vce.backend.raybackend as rb
    import flwr.server.superlink.fleet.vce.vce_api as vce

    from fedaqt.launch import backend

    before = (rb.RayBackend, vce.add_messages_to_queue)
    with backend.installed():
        assert vce.add_messages_to_queue is backend.add_messages_to_queue
    assert (rb.RayBackend, vce.add_messages_to_queue) == before
