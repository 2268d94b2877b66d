"""Client side of secure aggregation with Flower's SecAgg+ (issue 15, must-show 3; server: :mod:`fedaqt.server.secagg`).

:func:`secagg_mod` is a ClientApp mod: a train message that carries Flower's SecAgg+ ConfigRecord
(``secaggplus_configs``) goes through Flower's own ``secaggplus_mod`` (key agreement, Shamir shares, masking:
``flwr.client.mod.secure_aggregation.secaggplus_mod``); any other message reaches fedaqt's train function unchanged,
so one ClientApp serves runs with and without SecAgg+.

In the stage ``collect_masked_vectors`` ``secaggplus_mod`` calls the train function and reads its reply as a legacy
``FitRes`` (``compat.recorddict_to_fitres``): :func:`secagg_reply` builds it from the client round's float32 update.
The arrays are the update tensors in the order the server named in the train config (``SECAGG_KEYS``: the
parameters, then the float buffers' deltas), as float64 (Flower's quantizer then computes in float64):

* ``--uplink-bits 32``: the float update itself; Flower clips every element to ``[-R, R]``
  (``secagg_clipping_range``) and rounds it stochastically onto ``secagg_quantization_range`` levels;
* ``--uplink-bits 8``: int8 codes ``q = SR(u / s_t)`` in ``[-127, 127]`` on the round's *shared* per-tensor scale
  ``s_t`` (``SECAGG_SCALES``; :func:`fedaqt.quant.uplink.stochastic_round_shared`), as float64 integers; the server
  runs Flower's quantizer with ``clipping_range = 128`` and ``quantization_range = 256 * max_weight``, which maps
  ``n_k q_k / max_weight`` to the integer ``n_k q_k + 128 max_weight``, so the masked integer sum is exact.

The reply's metrics (``partition-id``, ``num-examples``, ``train_loss``, ... and ``secagg_clipped``, the fraction of
elements that were clipped) travel in plaintext (``fitres.metrics``); the arrays are cleared by ``secaggplus_mod``
and only the masked vector leaves the client. A client that fails raises (no error record): Flower then reports
the node as failed and SecAgg+ treats it as a dropout.

Flower's quantizer draws its stochastic rounding from numpy's *global* generator: it is seeded here from
``(seed, client, round)`` so a run is reproducible (the masks themselves come from ``os.urandom`` and cancel).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from fedaqt.config import RunConfig
from fedaqt.options import core_options
from fedaqt.protocol import NODEINFO_KEY, SECAGG_KEYS, SECAGG_SCALES
from fedaqt.quant.uplink import stochastic_round_shared

__all__ = ["secagg_mod", "is_secagg_message", "secagg_reply"]


def is_secagg_message(content: RecordDict) -> bool:
    """True when ``content`` carries Flower's SecAgg+ ConfigRecord (a SecAgg+ stage message)."""
    return RECORD_KEY_CONFIGS in content.config_records


def secagg_mod(msg: Message, ctxt: Context, call_next: Any) -> Message:
    """Flower's ``secaggplus_mod`` for SecAgg+ train messages, a pass-through for every other message."""
    if msg.metadata.message_type == MessageType.TRAIN and is_secagg_message(msg.content):
        from flwr.client.mod import secaggplus_mod

        return secaggplus_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)


def _generator(seed: int, client_id: int, round_num: int, tag: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(client_id) & 0xFFFFFFFF, int(round_num), tag])


def secagg_reply(train_cfg: ConfigRecord, update: Mapping[str, torch.Tensor], num_examples: int,
                 metrics: Mapping[str, Any], config: RunConfig, client_id: int, round_num: int,
                 nodeinfo: ConfigRecord | None = None) -> RecordDict:
    """The legacy ``FitRes`` reply that ``secaggplus_mod`` masks (module docstring).

    Args:
        train_cfg: the train message's config record (``SECAGG_KEYS``, at 8 bits ``SECAGG_SCALES``).
        update: the round's float32 update by key (parameters and buffer deltas).
        num_examples: the aggregation weight n_k (``FitRes.num_examples``).
        metrics: the reply metrics (plaintext ``FitRes.metrics``); ``secagg_clipped`` is added.
        config: the run configuration (``uplink_bits`` 32 or 8, the seed, ``secagg_clipping_range``).
        client_id, round_num: seed the stochastic rounding (ours at 8 bits, Flower's global numpy one at 32).
        nodeinfo: the ``NODEINFO_KEY`` record, kept next to the FitRes records (plaintext).

    Raises:
        ValueError: the train config names other keys than the update has, the scales do not match the keys, a
            scale that is not finite and > 0, or an ``uplink_bits`` other than 32/8.
    """
    keys = [str(k) for k in train_cfg.get(SECAGG_KEYS, [])]
    if sorted(keys) != sorted(update) or len(set(keys)) != len(keys):
        raise ValueError(f"SecAgg+: the train config names update keys {keys[:4]}... ({len(keys)}), the update has "
                         f"{len(update)} other keys")
    total = sum(int(update[k].numel()) for k in keys)
    clipped = 0
    arrays: list[np.ndarray] = []
    if config.uplink_bits == 8:
        scales = [float(s) for s in train_cfg.get(SECAGG_SCALES, [])]
        if len(scales) != len(keys):
            raise ValueError(f"SecAgg+ at 8 bits: {len(scales)} shared scales for {len(keys)} update keys")
        seq = _generator(config.seed, client_id, round_num, 0x5ECA8)
        gen = torch.Generator().manual_seed(int(seq.generate_state(1)[0]))
        for key, scale in zip(keys, scales):
            try:
                q, c = stochastic_round_shared(update[key], scale, gen)
            except ValueError as exc:
                raise ValueError(f"{key}: {exc}") from None
            arrays.append(q.numpy().astype(np.float64))
            clipped += c
    elif config.uplink_bits == 32:
        r = core_options(config).secagg_clipping_range
        for key in keys:
            a = update[key].detach().cpu().numpy().astype(np.float64)
            clipped += int((np.abs(a) > r).sum())
            arrays.append(a)
    else:
        raise ValueError(f"SecAgg+ needs uplink_bits 32 or 8, got {config.uplink_bits!r}")
    # Flower's quantizer (flwr.common.secure_aggregation.quantization) rounds with numpy's global generator
    np.random.seed(int(_generator(config.seed, client_id, round_num, 0x5ECA32).generate_state(1)[0]))
    out_metrics = {**dict(metrics), "secagg_clipped": float(clipped / max(1, total))}
    fitres = FitRes(status=Status(code=Code.OK, message=""), parameters=ndarrays_to_parameters(arrays),
                    num_examples=int(num_examples), metrics=out_metrics)
    content = compat.fitres_to_recorddict(fitres, keep_input=False)
    if nodeinfo is not None:
        content.config_records[NODEINFO_KEY] = nodeinfo
    return content
