"""The client's side of "which Ray node ran a client" (``clients.csv`` column ``ray_node_id``).

The client's reply carries a ConfigRecord ``"nodeinfo"`` with ``{"ray_node_id": runtime_node_id(),
"hostname": ...}`` (:func:`reply_nodeinfo`; a MetricRecord cannot hold strings). The server reads it back, or
falls back to the reply's ``pid`` (:mod:`fedaqt.server.nodes`). Outside Ray (in-process grid) the id is ``""``.
"""

from __future__ import annotations

import socket
import sys
from typing import Any

from fedaqt.protocol import NODEINFO_KEY  # noqa: F401 - the reply record key, defined once in the contract


def runtime_node_id() -> str:
    """Hex id of the Ray node this process runs on; ``""`` when Ray is not initialized here (never raises)."""
    ray = sys.modules.get("ray")  # not imported -> not initialized; don't pay for the import
    try:
        if ray is None or not ray.is_initialized():
            return ""
        return str(ray.get_runtime_context().get_node_id() or "")
    except Exception:  # noqa: BLE001 - node ids are informative only
        return ""


def reply_nodeinfo() -> Any:
    """ConfigRecord for a client's reply: ``ray_node_id`` (hex or "") and ``hostname``."""
    from flwr.app import ConfigRecord

    return ConfigRecord({"ray_node_id": runtime_node_id(), "hostname": socket.gethostname()})
