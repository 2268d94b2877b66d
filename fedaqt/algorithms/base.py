"""The client-algorithm plugin interface (issue 10).

A client algorithm owns what a client computes in one round on its native quantized model (codes + scales, no
float weight) and declares what it uploads, so the server, the strategies and :mod:`fedaqt.client.trainer` need
no ``if algorithm == ...``. The hooks follow the shape of apple/pfl-research's ``FederatedAlgorithm``
(``simulate_one_user``): the trainer does the round's plumbing (seeding, loading the broadcast, the memory
probe, the upload buffer, float-buffer deltas, metrics) and calls, in order,

1. :meth:`ClientAlgorithm.batches` -- the round's training batches (default: ``num_batches()`` batches of
   ``--batch-size`` from :meth:`Workload.client_batches`);
2. :meth:`ClientAlgorithm.local_round` -- the local computation; it fills ``ctx.upload`` (an
   :class:`~fedaqt.client.trainer.UploadBuffer`) with one entry per quantized-layer weight key and per model
   parameter and returns a :class:`LocalResult`;

and the server calls :meth:`ClientAlgorithm.max_examples` to bound a reply's ``num-examples`` claim.

``upload`` is ``"gradient"`` (the server treats the update as dL/dw, e.g. the relay strategy) or ``"delta"``
(final - received weights; a server that announces ``accept-final-codes`` then receives the final codes +
scales of quantized layers instead, see ``ctx.final_codes``).

A third-party algorithm subclasses :class:`ClientAlgorithm` (or a built-in, e.g.
:class:`fedaqt.algorithms.fedavg.FedAvg`) and registers the class under the ``fedaqt.algorithms`` entry-point
group of its own package; ``--algorithm NAME`` then selects it without any change to fedaqt.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import numpy as np
import torch
from pydantic import BaseModel
from torch import nn

from fedaqt.config import RunConfig
from fedaqt.options import NoOptions

if TYPE_CHECKING:  # annotations only: the client package imports this one
    from fedaqt.client.memory import MemoryProbe
    from fedaqt.client.trainer import UploadBuffer
    from fedaqt.quant.layers import QuantLayer
    from fedaqt.workloads.base import Workload

UPLOAD_KINDS = ("gradient", "delta")


@dataclass
class LocalContext:
    """What :meth:`ClientAlgorithm.local_round` works on (built by :func:`fedaqt.client.trainer.client_round`).

    Attributes:
        workload: the client's workload (``loss(model, batch) -> (mean loss 0-d tensor, examples)``).
        model: the loaded client model (native quantized layers with ``bits`` 8/4; float with 32).
        config: the run configuration.
        client_id, round_num: the partition and the server round (1-based).
        qlayers: ``weight_key -> QuantLayer`` of the model (:func:`fedaqt.quant.convert.quant_layers`).
        params: trainable float parameters by ``named_parameters`` key.
        upload: the reply's :class:`~fedaqt.client.trainer.UploadBuffer` to fill.
        probe: the round's :class:`~fedaqt.client.memory.MemoryProbe` (``saved_activations()`` around the
            forward pass, ``next_step()`` between local steps, ``mark_*`` for tensors the algorithm keeps).
        generator: CPU ``torch.Generator`` of the algorithm's own randomness, seeded per (seed, client, round)
            (:func:`algorithm_generator`); e.g. FedAvg's stochastic re-quantization.
        lr: client learning rate (``--lr``).
        proximal_mu: FedProx coefficient the strategy sent (0 without FedProx).
        final_codes: the server accepts final codes + scales of quantized layers (``upload == "delta"`` only).
        handles: hook handles the trainer removes after the round (append what you register).
        losses: per-step training losses (floats); the trainer reports their mean as ``train_loss``.
    """

    workload: "Workload"
    model: nn.Module
    config: RunConfig
    client_id: int
    round_num: int
    qlayers: "dict[str, QuantLayer]"
    params: dict[str, nn.Parameter]
    upload: "UploadBuffer"
    probe: "MemoryProbe"
    generator: torch.Generator
    lr: float
    proximal_mu: float = 0.0
    final_codes: bool = False
    handles: list[Any] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)


@dataclass
class LocalResult:
    """What :meth:`ClientAlgorithm.local_round` returns.

    Attributes:
        num_examples: examples processed in the round (the reply's ``num-examples``, the aggregation weight of
            weighted strategies); at most :meth:`ClientAlgorithm.max_examples`.
        changed_fraction: fraction of quantized codes changed per local step (0 when nothing is re-quantized).
        metrics: further scalar metrics of the algorithm (clients.csv columns; names must not collide with
            fedaqt's own columns).
    """

    num_examples: int
    changed_fraction: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)


def algorithm_generator(seed: int, client_id: int, round_num: int) -> torch.Generator:
    """CPU generator of a client algorithm's randomness, a deterministic function of (seed, client, round) and
    independent of the uplink encoder's generator (:func:`fedaqt.client.trainer.uplink_generator`)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(client_id) & 0xFFFFFFFF, int(round_num),
                                    0x616C67]).generate_state(1)
    return torch.Generator().manual_seed(int(state[0]))


def grad_hook(fn: Callable[[str, torch.Tensor], None], key: str) -> Callable[[torch.Tensor], None]:
    """A post-accumulate-grad hook for parameter ``key`` that hands ``p.grad`` to ``fn(key, grad)`` and drops
    it at once (no float gradient of the model is kept)."""

    def hook(p: torch.Tensor) -> None:
        g = p.grad
        p.grad = None
        if g is not None:
            fn(key, g)

    return hook


class ClientAlgorithm(ABC):
    """Base of client algorithms (see the module docstring).

    Class attributes:
        name: registry name (``--algorithm NAME``).
        description: one line for ``fedaqt plugins list``.
        upload: ``"gradient"`` or ``"delta"`` (what :meth:`local_round` puts in the upload).
        Options: a ``pydantic.BaseModel`` (``extra="forbid"``, every field with a default and a one-line
            ``description``) of the algorithm's ``-o KEY=VALUE`` options.

    Args:
        config: the run configuration.
        options: the parsed ``Options``; None parses them from ``config.options``.

    Raises:
        ConfigError: an option value outside what ``Options`` allows (names key, value, allowed range).
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    upload: ClassVar[str] = "delta"
    Options: ClassVar[type[BaseModel]] = NoOptions

    def __init__(self, config: RunConfig, options: BaseModel | None = None) -> None:
        self.config = config
        self.options = options if options is not None else self.parse_options(config)

    # ---------------------------------------------------------------- configuration (server and client)
    @classmethod
    def parse_options(cls, config: RunConfig) -> BaseModel:
        """The algorithm's ``Options`` from the keys of ``config.options`` it declares (other keys belong to
        the workload, the strategy or the core and are ignored here).

        Raises:
            ConfigError: a bad value, naming the key, the value, the allowed range and the algorithm.
        """
        from fedaqt.options import options_for

        return options_for(cls.Options, config.options, f"algorithm {cls.name}")

    @classmethod
    def validate(cls, config: RunConfig) -> None:
        """Check that ``config`` suits the algorithm (runs before Ray starts). Default: parse the options.

        Raises:
            ConfigError: naming the bad key and value.
        """
        cls.parse_options(config)

    @classmethod
    def max_examples(cls, config: RunConfig, workload: "Workload", client_id: int) -> int:
        """The most examples a reply of client ``client_id`` may claim (the server rejects more). Default:
        ``num_batches(config) * batch_size``."""
        return int(cls.num_batches(config) * config.batch_size)

    @classmethod
    def num_batches(cls, config: RunConfig) -> int:
        """Batches of ``--batch-size`` per round for the default :meth:`batches`: ``--local-steps``."""
        return int(config.local_steps)

    # ---------------------------------------------------------------- the round (client)
    def batches(self, workload: "Workload", client_id: int, round_num: int) -> list[Any]:
        """The round's training batches (loaded before the memory probe measures training). Default:
        ``workload.client_batches(client_id, round_num, num_batches(config), batch_size)``."""
        return workload.client_batches(client_id, round_num, self.num_batches(self.config), self.config.batch_size)

    @abstractmethod
    def local_round(self, ctx: LocalContext, batches: list[Any]) -> LocalResult:
        """Train on ``batches`` and fill ``ctx.upload`` with an entry for every key of ``ctx.qlayers`` and every
        ``model.named_parameters()`` key (float buffers are added by the trainer)."""
