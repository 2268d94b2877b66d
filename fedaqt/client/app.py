"""Flower ClientApp: decode the quantized broadcast, run one client round, reply with the encoded update.

A client that raises does not lose the round for the others: it replies with an ``error`` ConfigRecord that the
server records in ``clients.csv`` (status ``error``) and does not aggregate.

The message contract (record keys, encode/decode) is :mod:`fedaqt.protocol`. Reply content (train): ``arrays``
(ArrayRecord, the update encoded at ``uplink_bits``, see :class:`fedaqt.client.trainer.UploadBuffer`), ``metrics``
(MetricRecord: ``partition-id``, ``num-examples``, ``train_loss``, ``seconds``, ``changed_fraction``,
``upload_bytes``, ``pid`` and the memory profile ``rss_peak_mib`` [+ ``peak_mib``, ``mem_<category>_mib`` when
profiled], all written to ``clients.csv``), ``nodeinfo``, and for a FedAvg final-codes upload a ConfigRecord
``update`` = ``{"format": "final-codes", "keys": [...]}`` naming the keys whose arrays are final weights (codes +
scales) rather than deltas. The client sends final codes only when the train config says
``accept-final-codes = True`` (a server that forms the delta from what it sent).
"""

from __future__ import annotations

import logging
import os
import sysconfig
import traceback
from typing import Any, Iterator

import torch
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedaqt.client.memory import MemoryProbe, profiling_requested
from fedaqt.client.trainer import algorithm_class, client_round, get_client_model, get_workload, load_broadcast
from fedaqt.config import RunConfig
from fedaqt.protocol import (
    BROADCAST_KEY,
    CONFIG_KEY,
    NUM_EXAMPLES,
    PARTITION_ID,
    QUANT_META_KEY,
    decode_train,
    encode_error_reply,
    encode_reply,
    train_partition_id,
)
from fedaqt.quant.wire import QTensor, iter_decode_broadcast, record_nbytes
from fedaqt.client.nodeinfo import reply_nodeinfo
from fedaqt.client.secagg import is_secagg_message, secagg_mod

log = logging.getLogger("fedaqt.client")

app = ClientApp()


def handle_train(content: RecordDict, node_partition: int | None = None, profile: bool | None = None,
                 release_broadcast: bool = False, secagg: bool = False) -> RecordDict:
    """Process one train message's content and return the reply content (never raises).

    The broadcast is decoded one tensor at a time straight into the model (never a second full copy); with
    ``release_broadcast`` each received array is deleted from ``content`` once decoded, so the received bytes are
    freed before training. The reply is serialized tensor by tensor, each upload tensor dropped as soon as its
    bytes exist. The memory profile (``peak_mib``) spans all of it: received bytes while held, decoding,
    training, serialized reply (module docstring of :mod:`fedaqt.client.memory`).

    Args:
        content: the train message content (broadcast, quant metadata, train config).
        node_partition: fallback partition id (the node's ``partition-id``).
        profile: force (True) or suppress (False) the MemTracker profile; None follows the run config
            (:func:`fedaqt.client.memory.profiling_requested`).
        release_broadcast: the caller owns ``content`` (a delivered message): free the broadcast arrays as they
            are decoded. False (in-process callers that share the content): the bytes stay and are counted as
            held for the whole round.
        secagg: a SecAgg+ round (:mod:`fedaqt.client.secagg`): the update is computed at float32 and returned in
            the legacy ``FitRes`` layout that Flower's ``secaggplus_mod`` masks; a failure *raises* (Flower reports
            the node as failed, SecAgg+ treats it as a dropout) instead of returning an error record.
    """
    pid = train_partition_id(content, node_partition)
    try:
        instr = decode_train(content, node_partition)
        config = RunConfig.from_mapping(instr.run_config, source="broadcast")
        torch.set_num_threads(max(1, int(config.client_num_cpus)))
        workload = get_workload(config)
        model = get_client_model(workload, config)
        enabled = profiling_requested(config) if profile is None else bool(profile)
        arrays = content[BROADCAST_KEY]
        probe = MemoryProbe(model, enabled)
        with probe:
            probe.hold_bytes("broadcast", record_nbytes(arrays))
            decoded = iter_decode_broadcast(arrays, content[QUANT_META_KEY], release=release_broadcast)
            load_broadcast(model, _counted(decoded, probe, arrays if release_broadcast else None))
            del decoded
            final_codes = (algorithm_class(config.algorithm).upload == "delta" and config.bits < 16
                           and instr.accept_final_codes and not secagg)
            result = client_round(
                workload,
                model,
                config,
                client_id=pid,
                round_num=instr.server_round,
                proximal_mu=instr.proximal_mu,
                final_codes=final_codes,
                probe=probe,
                uplink_bits=32 if secagg else None,
            )
            final_code_keys = result.final_code_keys
            if secagg:
                from fedaqt.client.secagg import secagg_reply

                update = result.upload.decoded()
                metrics = {PARTITION_ID: pid, NUM_EXAMPLES: result.num_examples, "pid": os.getpid(), **result.metrics}
                return secagg_reply(content[CONFIG_KEY], update, result.num_examples, metrics, config, pid,
                                    instr.server_round, nodeinfo=reply_nodeinfo())
            update_record = result.upload.to_array_record(release=True, probe=probe if probe.active else None)
        metrics = {PARTITION_ID: pid, NUM_EXAMPLES: result.num_examples, "pid": os.getpid(), **result.metrics,
                   **probe.profile.metrics()}
        # nodeinfo: Ray node id + hostname -> clients.csv ray_node_id
        return encode_reply(update_record, metrics, final_code_keys, nodeinfo=reply_nodeinfo())
    except Exception as exc:  # noqa: BLE001 - reported to the server, which records and skips this client
        log.error("client %s failed: %s", pid, traceback.format_exc())
        if secagg:
            raise RuntimeError(f"client {pid}: {error_text(exc)}") from exc
        return encode_error_reply(pid, error_text(exc))


def _counted(decoded: Iterator[tuple[str, Any]], probe: MemoryProbe, released: Any) -> Iterator[tuple[str, Any]]:
    """Pass ``decoded`` items through, counting each decoded tensor while it lives and, when the record is being
    released (``released`` is the ArrayRecord), the received bytes still held."""
    for key, value in decoded:
        if probe.active:
            probe.track(*([value.storage(), value.scale] if isinstance(value, QTensor) else [value]))
            if released is not None:
                probe.hold_bytes("broadcast", record_nbytes(released))
        yield key, value
        del value


def error_text(exc: BaseException, limit: int = 400) -> str:
    """``"Type: message (at file.py:123 in func)"`` naming the innermost traceback frame outside installed
    libraries (site-packages / the standard library: a plugin's own line rather than pydantic's), or the innermost
    frame when every frame is a library's; at most ``limit`` characters (the message is cut, the location kept)."""
    where = ""
    tb = traceback.extract_tb(exc.__traceback__)
    if tb:
        libs = tuple(p for p in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"],
                                 sysconfig.get_paths()["stdlib"]} if p)
        own = [f for f in tb if not os.path.abspath(f.filename).startswith(libs) and "site-packages" not in f.filename]
        f = (own or tb)[-1]
        where = f" (at {os.path.basename(f.filename)}:{f.lineno} in {f.name})"
    head = f"{type(exc).__name__}: {exc}"
    room = max(20, limit - len(where))
    if len(head) > room:
        head = head[: room - 3] + "..."
    return head + where


@app.train(mods=[secagg_mod])  # Flower's secaggplus_mod for SecAgg+ messages only (fedaqt.client.secagg)
def train(msg: Message, context: Context) -> Message:
    node_partition = context.node_config.get(PARTITION_ID)  # Flower's node-config key of the same name
    # the delivered message is this client's own copy: free the broadcast as it is decoded into the model
    reply = handle_train(msg.content, int(node_partition) if node_partition is not None else None,
                         release_broadcast=True, secagg=is_secagg_message(msg.content))
    return Message(content=reply, reply_to=msg)
