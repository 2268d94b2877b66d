"""Flower 1.42's Ray backend, made robust to hung and dead clients (used by :func:`fedaqt.launch.runner.run_experiment`).

Why our own backend: in Flower 1.42 (``flwr/server/superlink/fleet/vce/backend/raybackend.py`` and
``flwr/simulation/ray_transport/ray_actor.py``) each Simulation Runtime worker thread pops an actor from
``BasicActorPool``, submits the message and blocks in ``ray.get(future)`` without a timeout; on any exception
``RayBackend.process_message`` puts the actor back into the pool. Two consequences:

* a client that hangs blocks its worker thread forever. ``run_api`` leaves its ``ThreadPoolExecutor`` only when every
  worker returns, so after the ServerApp's last round ``run_simulation`` never returns (the driver does not exit until
  the hung client does);
* a client whose process dies (``os._exit``, OOM kill) leaves a *dead* actor in the pool: every later message
  submitted to it fails at once with ``RayActorError``, losing healthy client-rounds.

:class:`RobustRayBackend` subclasses ``RayBackend`` and replaces ``process_message``: it waits for the result in
short ``ray.wait`` slices and

* replaces a dead actor by a fresh one (only the client-round that ran on it is lost; the reply is a Flower error
  whose reason holds :data:`fedaqt.protocol.CLIENT_DIED_MARK`, recorded as status ``died``);
* kills (``ray.kill``) and replaces the actor of a message the server no longer waits for: the server calls
  :func:`abandon_before` after every round's ``send_and_receive`` with the time it stopped waiting, and every message
  created before it that is still running is abandoned (the server has already recorded it as ``timeout``);
* at the end of the run (:func:`stop`, called when the ServerApp returns or fails) kills what still runs, so
  ``run_simulation`` returns and Ray is torn down.

:func:`installed` patches the attribute ``RayBackend`` of Flower's ``raybackend`` module for the duration of a run
(``vce_api.start_vce`` imports the class from there each time it builds the backend) and restores it afterwards.
Only messages are affected; Flower's pool sizing, actor class and resources are reused unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from typing import Any, Iterator

log = logging.getLogger("fedaqt.launch")

#: marker in the error reason of a message whose actor died (the message contract's constant)
from fedaqt.protocol import CLIENT_DIED_MARK  # noqa: E402

_state_lock = threading.Lock()
_cutoff = -math.inf  # messages created before this time (time.time()) are no longer awaited
_stopped = threading.Event()
_POLL_S = 0.2


class ClientActorDied(RuntimeError):
    """The Ray actor running a client's message died (its process exited or was killed)."""


class ClientAbandoned(RuntimeError):
    """The server stopped waiting for this message (round timeout or end of run); its actor was killed."""


def reset() -> None:
    """Start of a run: nothing abandoned, not stopped."""
    global _cutoff
    with _state_lock:
        _cutoff = -math.inf
    _stopped.clear()


def abandon_before(t: float) -> None:
    """The server no longer waits for messages created before ``t`` (seconds, ``time.time()``)."""
    global _cutoff
    with _state_lock:
        _cutoff = max(_cutoff, float(t))


def stop() -> None:
    """The ServerApp has finished: abandon every in-flight message."""
    abandon_before(math.inf)
    _stopped.set()


def _abandoned(created_at: float) -> bool:
    with _state_lock:
        return created_at < _cutoff


def _make_class(base: type) -> type:
    import ray
    from flwr.common.constant import PARTITION_ID_KEY

    class RobustRayBackend(base):  # type: ignore[misc, valid-type]
        """``RayBackend`` whose ``process_message`` survives dead and hung actors (see the module docstring)."""

        _pool_lock = threading.Lock()

        def _replace_actor(self, actor: Any, kill: bool) -> None:
            if kill:
                with contextlib.suppress(Exception):
                    ray.kill(actor, no_restart=True)
            if _stopped.is_set():  # the run is over: do not start new actors
                with self._pool_lock:
                    self.pool.num_actors -= 1
                return
            fresh = self.pool.create_actor_fn()
            with self._pool_lock:
                self.pool.pool.append(fresh)

        def process_message(self, message: Any, context: Any) -> tuple[Any, Any]:
            if self.pool is None or self.app_fn is None:
                return super().process_message(message, context)
            partition_id = context.node_config[PARTITION_ID_KEY]
            with self._pool_lock:
                actor = self.pool.pool.pop()  # one worker thread per actor: one is always idle here
            future = actor.run.remote(self.app_fn, message, str(partition_id), context)
            created = float(message.metadata.created_at)
            while True:
                ready, _ = ray.wait([future], timeout=_POLL_S)
                if ready:
                    break
                if _abandoned(created):
                    self._replace_actor(actor, kill=True)
                    raise ClientAbandoned(f"partition {partition_id}: the server stopped waiting; actor killed")
            try:
                _, out_mssg, updated_context = ray.get(future)
            except ray.exceptions.RayActorError as exc:
                self._replace_actor(actor, kill=True)
                log.error("client of partition %s: its Ray actor died (%s); replaced by a new one",
                          partition_id, type(exc).__name__)
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ClientActorDied(f"{CLIENT_DIED_MARK}: the client process of partition {partition_id} "
                                      f"died ({first[:200]})") from None
            except Exception:
                with self._pool_lock:
                    self.pool.pool.append(actor)
                raise
            with self._pool_lock:
                self.pool.pool.append(actor)
            return out_mssg, updated_context

    return RobustRayBackend


#: longest sleep of the message extractor between scans when nothing wakes it (Flower's own poll interval)
EXTRACTOR_IDLE_S = 0.1


def add_messages_to_queue(state: Any, queue: Any, nodes_mapping: Any, f_stop: threading.Event) -> None:
    """Flower 1.42's ``vce_api.add_messages_to_queue`` (the Simulation Runtime thread that hands the messages the
    ServerApp pushed to the backend's workers), woken when a message is stored instead of only every 0.1 s.

    Why: Flower's loop scans every node, then sleeps a fixed 0.1 s, so each round's broadcast waits on average
    50 ms (up to 100 ms) before any client starts: on a 2-client round of the tiny Conformer (~0.4 s) that is
    ~12% of the round. Here ``state.store_message_ins`` (the method the Grid's ``push_messages`` calls; the
    in-memory LinkState is one object per run) is wrapped on this run's state instance to set an event, and the
    loop sleeps on that event (at most :data:`EXTRACTOR_IDLE_S`, so ``f_stop`` is still seen as soon as Flower's
    loop would); a scan that found messages is repeated at once (Flower takes one message per node per scan).
    Same messages, same order per node; only the latency changes."""
    wake = threading.Event()
    store = state.store_message_ins

    def store_and_wake(*args: Any, **kwargs: Any) -> Any:
        try:
            return store(*args, **kwargs)
        finally:
            wake.set()

    state.store_message_ins = store_and_wake
    try:
        while not f_stop.is_set():
            wake.clear()  # before the scan: a message stored during the scan wakes the next wait at once
            found = False
            for node_id in list(nodes_mapping.keys()):
                for msg in state.get_message_ins(node_id=node_id, limit=1):
                    queue.put(msg)
                    found = True
            if not found:
                wake.wait(EXTRACTOR_IDLE_S)
    finally:
        try:
            del state.store_message_ins  # the class's method again
        except AttributeError:
            pass


@contextlib.contextmanager
def installed() -> Iterator[None]:
    """Use :class:`RobustRayBackend` and the event-driven :func:`add_messages_to_queue` for the ``run_simulation``
    calls inside the block (see module docstring); both of Flower's originals are restored afterwards."""
    import flwr.server.superlink.fleet.vce.backend.raybackend as rb
    import flwr.server.superlink.fleet.vce.vce_api as vce

    original, extractor = rb.RayBackend, vce.add_messages_to_queue
    reset()
    rb.RayBackend = _make_class(original)
    vce.add_messages_to_queue = add_messages_to_queue  # run_api looks the name up when it starts the thread
    try:
        yield
    finally:
        stop()
        rb.RayBackend = original
        vce.add_messages_to_queue = extractor

