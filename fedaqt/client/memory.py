"""Per-client memory profile of one training round (issue 4; DESIGN "client/": memory profile).

What is measured: the tensor memory of the client's training round, i.e. forward + backward + local update +
encoding of the upload, from the moment the batches are ready until the upload buffer is complete. The counter is
``torch.distributed._tools.mem_tracker.MemTracker`` (a ``TorchDispatchMode`` that sees every tensor storage
created by a torch op, plus the model's parameters and buffers registered with ``track_external``). It reports
the peak of the tracked total and, at that peak, the bytes per category:

==============  =========================================================================================
category        what it holds
==============  =========================================================================================
``params``      ``nn.Parameter`` storages (float weights of unquantized layers, biases, norms)
``buffers``     module buffers: the int8 weight codes (int4 codes too: one byte each in memory) + scales
``grads``       gradients: float ``.grad`` of parameters, the float ``weight_grad`` of quantized layers and
                the upload buffer (encoded gradient / delta, float32, float16 or int8 codes + scales)
``acts``        tensors created in the forward pass (and in the recomputation of checkpointed blocks)
``temps``       tensors created in the backward pass that are not gradients (transient dequantized
                weights, ``grad_x``, encoding temporaries)
``opt``         optimizer state (none in FedSGD; the fedaqt client never builds an optimizer)
``other``       the batch inputs (they exist before the round) and, in FedAvg, the copy of the received
                weights kept for the delta or the FedProx term
==============  =========================================================================================

The categories of the peak snapshot sum to ``peak`` exactly (bytes). Storages are counted at their in-memory size
(``numel * element_size``), so int4 codes in their int8 container count one byte per code. The total is exact; the
split between ``acts`` and ``temps`` follows MemTracker's rules: tensors created outside a backward pass count as
activations (e.g. FedAvg's delta after the last step), and during the recomputation of a checkpointed block
temporaries may be counted as activations (a documented MemTracker limitation). Not part of the round: loading
the batch (features), and Flower's serialization of the finished upload into ``.npy`` bytes (one more copy, done
after the round; a device would stream it; the RSS peak of the next round does not see it either).

Peak RSS: the process's resident-set high-water mark over the round. On Linux it is reset at the start of the
round (``/proc/self/clear_refs`` = 5, then ``VmHWM`` of ``/proc/self/status``), so it is the round's own peak;
elsewhere it falls back to ``getrusage`` (the process-lifetime maximum). RSS includes the Python/torch runtime,
the received message buffers and allocator slack, so it is always far above the tensor peak; it is cheap and is
reported for every round.

Cost: MemTracker intercepts every torch op in Python. With the per-module peak bookkeeping turned off (we only
read the global peak, :func:`_lean_tracker`), a FedSGD round of the default ``tiny`` ASR client takes about 1.5-2x
as long (float32 upload) and about 3x (int8 upload, whose chunked encoding runs many small ops); without the lean
tracker it was 4x and 17x. So the client runs it only when asked (:func:`profiling_requested`): the run option
``profile_memory`` is true (``fedaqt run -o profile_memory=true``), a device profile is set (budgets need the
measured peak), or ``fedaqt profile`` runs the round. Every reply carries ``rss_peak_mib`` (cost: two small file
operations per round).
"""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

__all__ = [
    "CATEGORIES",
    "MIB",
    "MemoryProfile",
    "MemoryProbe",
    "profiling_requested",
    "metric_columns",
    "tensor_bytes",
]

MIB = float(2**20)

#: report categories, in column order; each maps to one ``_MemRefType`` value of MemTracker
CATEGORIES: tuple[str, ...] = ("params", "buffers", "grads", "acts", "temps", "opt", "other")
_REFTYPE_TO_CATEGORY = {
    "Parameter": "params",
    "Buffer": "buffers",
    "Gradient": "grads",
    "Activation": "acts",
    "Temp": "temps",
    "Optstate": "opt",
    "Other": "other",
}


def metric_columns() -> list[str]:
    """Names of the memory metrics in a reply / ``clients.csv``: ``peak_mib``, ``mem_<category>_mib``,
    ``rss_peak_mib`` (all MiB = 2**20 bytes)."""
    return ["peak_mib"] + [f"mem_{c}_mib" for c in CATEGORIES] + ["rss_peak_mib"]


def profiling_requested(config: Any, force: bool = False) -> bool:
    """Whether a client round runs the MemTracker (see module docstring for why it is not always on).

    True when ``force``, ``config.options["profile_memory"]`` is truthy, or ``config.device_profile`` is set.
    """
    if force:
        return True
    opt = getattr(config, "options", {}).get("profile_memory", False)
    if isinstance(opt, str):
        opt = opt.strip().lower() in ("1", "true", "yes", "on")
    return bool(opt) or bool(getattr(config, "device_profile", ""))


def tensor_bytes(t: torch.Tensor) -> int:
    """In-memory bytes of a tensor's elements (``numel * element_size``)."""
    return int(t.numel() * t.element_size())


# ------------------------------------------------------------------------------------------------ RSS
def _read_vmhwm_kib() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_vmhwm() -> bool:
    """Reset the RSS high-water mark (Linux >= 4.0). Returns False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _ru_maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) if sys.platform == "darwin" else int(r) * 1024


# ------------------------------------------------------------------------------------------------ profile
@dataclass
class MemoryProfile:
    """Memory of one client round.

    Attributes:
        tracked: whether the MemTracker ran (else only ``rss_peak_bytes`` is meaningful).
        peak_bytes: peak of the tracked tensor memory (bytes); 0 when not tracked.
        categories: bytes per :data:`CATEGORIES` entry at that peak (they sum to ``peak_bytes``).
        rss_peak_bytes: process resident-set peak over the round (bytes).
        rss_round_local: True if the RSS peak was reset at the start of the round (else lifetime maximum).
    """

    tracked: bool
    peak_bytes: int = 0
    categories: dict[str, int] = field(default_factory=dict)
    rss_peak_bytes: int = 0
    rss_round_local: bool = False

    def metrics(self) -> dict[str, float]:
        """Reply metrics (MiB floats): ``rss_peak_mib`` always; ``peak_mib`` + ``mem_<category>_mib`` if tracked."""
        out: dict[str, float] = {}
        if self.tracked:
            out["peak_mib"] = self.peak_bytes / MIB
            for c in CATEGORIES:
                out[f"mem_{c}_mib"] = self.categories.get(c, 0) / MIB
        out["rss_peak_mib"] = self.rss_peak_bytes / MIB
        return out


def _lean_tracker() -> Any:
    """A MemTracker that keeps only the global peak: its per-op update of every module's local peak (a loop over
    all modules plus snapshot copies, which we never read) is skipped. The global peak, the categories and the
    activation-checkpointing state are MemTracker's own."""
    from copy import deepcopy

    from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker

    class _LeanMemTracker(MemTracker):
        def _update_peak_stats(self, peak_state: Any) -> None:  # noqa: ARG002 - same signature as MemTracker
            for dev, dev_snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < dev_snap[_TOTAL_KEY]:
                    self._peak_mem[dev] = dev_snap[_TOTAL_KEY]
                    self._peak_mem_snap[dev] = deepcopy(dev_snap)

    return _LeanMemTracker()


class MemoryProbe:
    """Context manager measuring one client round (see module docstring).

    Usage::

        probe = MemoryProbe(model, enabled=True, inputs=[batch tensors])
        with probe:
            ... forward, backward, encode ...
            probe.mark_gradient(upload_tensor)   # account encoded uploads as gradients
            probe.next_step()                     # between FedAvg local steps
        profile = probe.profile

    Args:
        model: the client model (its parameters and buffers are counted from the start).
        enabled: run the MemTracker; when False only the RSS peak is measured.
        inputs: tensors that exist before the round and belong to it (the batches), counted as ``other``.
    """

    def __init__(self, model: nn.Module, enabled: bool, inputs: Iterable[torch.Tensor] = ()) -> None:
        self.model = model
        self.enabled = bool(enabled)
        self.inputs = [t for t in inputs if isinstance(t, torch.Tensor)]
        self.profile = MemoryProfile(tracked=self.enabled)
        self._mt: Any = None
        self._rss_reset = False
        self._steps = 0

    def __enter__(self) -> "MemoryProbe":
        self._rss_reset = _reset_vmhwm()
        if self.enabled:
            self._mt = _lean_tracker()
            self._mt.track_external(self.model, *self.inputs)
            self._mt.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._mt is not None:
            self._mt.__exit__(*exc)
            if exc[0] is None:
                self._collect()
        hwm = _read_vmhwm_kib() if self._rss_reset else None
        self.profile.rss_peak_bytes = hwm * 1024 if hwm is not None else _ru_maxrss_bytes()
        self.profile.rss_round_local = hwm is not None

    def _collect(self) -> None:
        snap = self._mt.get_tracker_snapshot("peak")
        cats = dict.fromkeys(CATEGORIES, 0)
        peak = 0
        for dev_snap in snap.values():
            for k, v in dev_snap.items():
                name = getattr(k, "value", k)
                if name == "Total":
                    peak += int(v)
                elif name in _REFTYPE_TO_CATEGORY:
                    cats[_REFTYPE_TO_CATEGORY[name]] += int(v)
                else:  # an unknown MemTracker category: keep the sum consistent
                    cats["other"] += int(v)
        self.profile.peak_bytes = peak
        self.profile.categories = cats

    def _mark(self, reftype_name: str, tensors: tuple[torch.Tensor, ...]) -> None:
        if self._mt is None:
            return
        from torch.distributed._tools.mem_tracker import _MemRefType

        reftype = getattr(_MemRefType, reftype_name)
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.numel():
                self._mt._update_and_maybe_create_winfos(t, reftype)

    def mark_gradient(self, *tensors: torch.Tensor) -> None:
        """Account ``tensors`` (encoded uploads, float weight gradients) as ``grads`` from now on."""
        self._mark("GRAD", tensors)

    def mark_other(self, *tensors: torch.Tensor) -> None:
        """Account ``tensors`` (e.g. FedAvg's copy of the received weights) as ``other`` from now on."""
        self._mark("OTH", tensors)

    def next_step(self) -> None:
        """Call between local steps (FedAvg): MemTracker refuses a second forward of the root module otherwise.
        The peak over all steps is kept."""
        self._steps += 1
        if self._mt is not None and self._steps > 1:
            self._mt.reset_mod_stats()
