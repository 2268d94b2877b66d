"""The server's side of "which Ray node ran a client": recorded per client and round in ``clients.csv``
(column ``ray_node_id``).

Two sources, in this order:

1. the reply's ConfigRecord ``"nodeinfo"`` written by the client (:func:`fedaqt.client.nodeinfo.reply_nodeinfo`),
   read by :func:`nodeinfo_of`;
2. otherwise the server maps the reply's ``pid`` metric to the node of the live Ray actor with that process id in
   the current job (:class:`ActorNodeMap`, one GCS query per unknown pid). A pid that two nodes of the job share
   is left unresolved rather than guessed.

Outside Ray (tests with an in-process grid) both give ``""``.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from fedaqt.protocol import NODEINFO_KEY  # noqa: F401 - the reply record key, defined once

log = logging.getLogger("fedaqt.server")


def nodeinfo_of(content: Any) -> str:
    """``ray_node_id`` from a reply's ``nodeinfo`` ConfigRecord; ``""`` when absent."""
    try:
        rec = content.config_records.get(NODEINFO_KEY)
    except Exception:  # noqa: BLE001
        return ""
    return str(rec.get("ray_node_id", "")) if rec is not None else ""


class ActorNodeMap:
    """pid -> Ray node id of the live actors of the current Ray job (the simulation's client actors)."""

    def __init__(self) -> None:
        self._map: dict[int, str] = {}
        self._ambiguous: set[int] = set()
        self._available = True

    def _refresh(self) -> None:
        ray = sys.modules.get("ray")
        try:
            if ray is None or not ray.is_initialized():
                self._available = False
                return
            from ray._private import state

            job = ray.get_runtime_context().get_job_id()
            table = state.actors(job_id=ray.JobID.from_hex(job), actor_state_name="ALIVE")
        except Exception as exc:  # noqa: BLE001 - informative only; stop asking after a failure
            log.info("cannot read Ray's actor table (%s); ray_node_id from pids is unavailable", exc)
            self._available = False
            return
        seen: dict[int, set[str]] = {}
        for info in table.values():
            pid = int(info.get("Pid") or 0)
            node = str(info.get("Address", {}).get("NodeID", ""))
            if pid and node:
                seen.setdefault(pid, set()).add(node)
        for pid, nodes in seen.items():
            if len(nodes) == 1:
                self._map[pid] = next(iter(nodes))
            else:
                self._ambiguous.add(pid)

    def node_of(self, pid: int) -> str:
        """Node id hex of the actor with process id ``pid``; ``""`` if unknown or ambiguous."""
        if pid <= 0 or pid in self._ambiguous:
            return ""
        if pid not in self._map and self._available:
            self._refresh()
        return self._map.get(pid, "")
