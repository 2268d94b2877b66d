"""The workload plugin interface: model + data + loss + metrics + which layers are quantized.

A workload knows nothing about strategies; ``client/`` and ``server/`` combine the two. Third-party workloads
subclass :class:`Workload` and register under the ``fedaqt.workloads`` entry-point group (see README).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Sequence

import torch
from torch import nn

from fedaqt.config import RunConfig
from fedaqt.options import NoOptions, options_for


class Workload(ABC):
    """One federated task.

    Lifecycle: the server process calls :meth:`prepare` (validate data, fail fast with instructions) before Ray
    starts; every process (server and each client actor) builds the workload from the same :class:`RunConfig`,
    so everything it derives (partitions, model init) must be a deterministic function of the config and seed.

    Attributes:
        name: registry name (``--workload NAME``).
        description: one line for ``fedaqt plugins list``.
        eval_columns: metric names :meth:`evaluate` returns (written to ``rounds.csv``).
        default_eval_every: evaluation period in rounds when the user does not set ``--eval-every``.
        Options: the workload's ``-o KEY=VALUE`` options, a pydantic model (``extra="forbid"``, every field with a
            default and ``Field(description=...)``); ``fedaqt plugins show NAME`` prints it. The instance for the
            run is :attr:`options` (typed: ``-o eval_max=8`` arrives as the int 8).
    """

    #: this workload's typed options (default: none); subclasses declare ``class Options(BaseOptions): ...``
    Options: type = NoOptions

    name: str = ""
    description: str = ""
    eval_columns: Sequence[str] = ()
    #: evaluate every N rounds when ``--eval-every`` is 0 (its default); the first and last rounds always are
    default_eval_every: int = 1

    def __init__(self, config: RunConfig) -> None:
        """Keep ``config`` and build :attr:`options` from ``config.options`` (the keys :attr:`Options` declares).

        Raises:
            ConfigError: a declared option has a bad value (naming the key, the value and what is allowed).
        """
        self.config = config
        self.options = options_for(type(self).Options, config.options, f"workload {self.name or type(self).__name__}")

    # ---------------------------------------------------------------- server side
    def prepare(self) -> None:
        """Check that the data exists; raise FileNotFoundError/ValueError that says how to fix it."""

    @abstractmethod
    def build_model(self) -> nn.Module:
        """Return the float model, initialized deterministically from ``config.seed``."""

    def quantize_filter(self, name: str, module: nn.Module) -> bool:
        """True if the module at qualified ``name`` becomes a native quantized layer on clients (spec §2.1)."""
        return False

    def convert_client_model(self, model: nn.Module, bits: int, granularity: str) -> nn.Module:
        """Turn the float model from :meth:`build_model` into the client's native quantized model (``bits`` 8/4).

        Default: :func:`fedaqt.quant.convert.convert_to_quantized` with :meth:`quantize_filter`. A workload whose
        layers quantize themselves (WrapNet) overrides it to keep those weights as codes + scales too.

        Returns:
            the converted model (may be ``model`` itself, modified in place).
        """
        from fedaqt.quant.convert import convert_to_quantized

        return convert_to_quantized(model, bits, granularity, self.quantize_filter)

    def broadcast_quantized_keys(self, model: nn.Module) -> list[str]:
        """Float-state keys sent as codes + scales although clients keep them as float parameters (dequantized on
        arrival): weights of layers that quantize themselves, e.g. WrapNet's. Default: none."""
        return []

    @abstractmethod
    def evaluate(self, model: nn.Module, round_num: int) -> dict[str, float]:
        """Server-side evaluation of the float global model; keys are a subset of :attr:`eval_columns`."""

    # ---------------------------------------------------------------- client side
    @abstractmethod
    def num_partitions(self) -> int:
        """How many clients (data partitions) the workload offers."""

    @abstractmethod
    def client_batches(self, client_id: int, round_num: int, num_batches: int, batch_size: int) -> list[Any]:
        """The ``num_batches`` training batches of client ``client_id`` for ``round_num`` (deterministic)."""

    def partition_size(self, client_id: int) -> int:
        """Examples in client ``client_id``'s partition (``-o local_epochs``: one epoch covers them once).

        Raises:
            NotImplementedError: the workload does not support ``local_epochs`` (default).
        """
        raise NotImplementedError(
            f"workload {self.name or type(self).__name__!r} does not implement partition_size/client_epoch_batches: "
            "local_epochs is unsupported; use --local-steps"
        )

    def client_epoch_batches(self, client_id: int, round_num: int, epoch: int, batch_size: int) -> list[Any]:
        """One pass over client ``client_id``'s partition (``-o local_epochs``): every example exactly once, in
        a permutation that is a deterministic function of (``config.seed``, client, round, epoch), cut into
        ``ceil(partition_size / batch_size)`` batches (the last one may be smaller).

        Raises:
            NotImplementedError: the workload does not support ``local_epochs`` (default).
        """
        raise NotImplementedError(
            f"workload {self.name or type(self).__name__!r} does not implement client_epoch_batches: "
            "local_epochs is unsupported; use --local-steps"
        )

    @abstractmethod
    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, int]:
        """Mean loss over the batch (0-d float tensor) and the number of examples it covers."""

    def set_checkpointing(self, model: nn.Module, enabled: bool) -> None:
        """Turn gradient checkpointing of the model's blocks on/off (no-op where the model has none)."""
        if hasattr(model, "checkpointing"):
            model.checkpointing = enabled

    def describe(self) -> dict[str, Any]:
        """Facts to store in ``summary.json`` (sizes of partitions, parameter counts, ...)."""
        return {}

    def batch_label(self) -> str:
        """What one training batch is, for reports (``fedaqt profile``): ``"batch N"`` (``--batch-size``) unless
        the workload's batches are something else (e.g. few-shot episodes)."""
        return f"batch {self.config.batch_size}"
