"""Per-client memory profile of one training round (issue 4; DESIGN "client/": memory profile).

What is measured: the memory of the whole client round, from the received train message to the finished reply
(:func:`fedaqt.client.app.handle_train`): the received broadcast bytes while the client holds them, decoding them
(one tensor at a time, straight into the model), forward + backward + local update + encoding of the upload, and
the serialization of the reply into ``.npy`` bytes. ``peak_mib`` (what device budgets compare) is the peak of all
of it; ``train_peak_mib`` is the peak of the training part alone (the ``peak_mib`` of earlier versions, plus the
broadcast bytes if the caller keeps them). The counter is ``torch.distributed._tools.mem_tracker.MemTracker``
(a ``TorchDispatchMode`` that sees every tensor storage created by a torch op, plus the model's parameters and
buffers registered with ``track_external``), extended with the non-tensor message bytes (``wire``). It reports the
peak of the tracked total and, at that peak, the bytes per category:

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
``opt``         optimizer state (none in FedSGD; FedAvg's momentum buffers with ``momentum > 0``)
``other``       the batch inputs, decoded broadcast tensors until loaded and, in FedAvg, the copy of the
                received weights kept for the delta or the FedProx term
``wire``        message bytes: the received broadcast (``len`` of its ``.npy`` arrays) while held, and the
                reply's ``.npy`` bytes built so far plus the array being written (its bytes + numpy's
                16 MiB write chunk)
==============  =========================================================================================

The categories of the peak snapshot sum to ``peak`` (bytes). Storages are counted at their in-memory size
(``numel * element_size``), so int4 codes in their int8 container count one byte per code. The split between
``acts`` and ``temps`` follows MemTracker's rules: tensors created outside a backward pass count as activations
(e.g. FedAvg's delta after the last step), and during the recomputation of a checkpointed block temporaries may be
counted as activations (a documented MemTracker limitation). Not counted: the Python/torch runtime, loading the
batch (feature extraction runs with the tracker paused; the batch tensors are then counted), the transient copy
inside ``Array.numpy()`` of one received array, and the transport's own buffers outside the ClientApp. A delivered
message is the client's own copy, so :func:`fedaqt.client.app.train` frees each broadcast array once decoded
(``release_broadcast``); in-process callers that share the content (tests' FakeGrid) keep it and it is counted
for the whole round. Cross-check: ``tests/test_true_peak.py`` matches ``peak_mib`` to the RSS peak of a real round
of a 64 MiB model within 4% (measured 1-2%).

Saved activations: ``saved_<group>_mib`` (groups float32, float16, int8, other) are the bytes that autograd saves
for backward in the forward pass (``torch.autograd.graph.saved_tensors_hooks``; distinct storages; the model's
parameters and buffers excluded; with checkpointing only what is saved outside checkpointed blocks). Only the
quantized layers' inputs are saved as int8; LayerNorm, SiLU/GLU, softmax, attention and the float layers save
float32.

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
CATEGORIES: tuple[str, ...] = ("params", "buffers", "grads", "acts", "temps", "opt", "other", "wire")
_REFTYPE_TO_CATEGORY = {
    "Parameter": "params",
    "Buffer": "buffers",
    "Gradient": "grads",
    "Activation": "acts",
    "Temp": "temps",
    "Optstate": "opt",
    "Other": "other",
    "Wire": "wire",
}
#: snapshot key of the non-tensor bytes the probe holds (:meth:`MemoryProbe.hold_bytes`)
_WIRE_KEY = "Wire"
#: saved-activation dtype groups reported as ``saved_<group>_mib``
SAVED_GROUPS: tuple[str, ...] = ("float32", "float16", "int8", "other")


def metric_columns() -> list[str]:
    """Names of the memory metrics in a reply / ``clients.csv``: ``peak_mib``, ``mem_<category>_mib``,
    ``train_peak_mib``, ``saved_<dtype>_mib``, ``rss_peak_mib`` (all MiB = 2**20 bytes)."""
    return (["peak_mib"] + [f"mem_{c}_mib" for c in CATEGORIES] + ["train_peak_mib"]
            + [f"saved_{g}_mib" for g in SAVED_GROUPS] + ["rss_peak_mib"])


def profiling_requested(config: Any, force: bool = False) -> bool:
    """Whether a client round runs the MemTracker (see module docstring for why it is not always on).

    True when ``force``, ``config.options["profile_memory"]`` is truthy, or ``config.device_profile`` is set.
    """
    if force:
        return True
    from fedaqt.options import core_options

    return core_options(config).profile_memory or bool(getattr(config, "device_profile", ""))


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


#: public names (the server records its own round peak: rounds.csv ``server_rss_peak_mib``)
read_vmhwm_kib, reset_vmhwm = _read_vmhwm_kib, _reset_vmhwm


def _ru_maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) if sys.platform == "darwin" else int(r) * 1024


# ------------------------------------------------------------------------------------------------ profile
@dataclass
class MemoryProfile:
    """Memory of one client round.

    Attributes:
        tracked: whether the MemTracker ran (else only ``rss_peak_bytes`` is meaningful).
        peak_bytes: peak of the tracked memory over the whole client round (bytes): tensors plus the ``wire``
            bytes (received broadcast while held, serialized reply); 0 when not tracked.
        categories: bytes per :data:`CATEGORIES` entry at that peak (they sum to ``peak_bytes``).
        train_peak_bytes: peak over the training part only (forward, backward, encoding of the upload; the
            ``peak_mib`` of earlier versions), bytes.
        saved_bytes: bytes saved for backward by the forward pass(es), by :data:`SAVED_GROUPS` dtype group
            (distinct storages; the model's own parameters and buffers excluded); the maximum over local steps.
        rss_peak_bytes: process resident-set peak over the round (bytes).
        rss_round_local: True if the RSS peak was reset at the start of the round (else lifetime maximum).
    """

    tracked: bool
    peak_bytes: int = 0
    categories: dict[str, int] = field(default_factory=dict)
    train_peak_bytes: int = 0
    saved_bytes: dict[str, int] = field(default_factory=dict)
    rss_peak_bytes: int = 0
    rss_round_local: bool = False

    def metrics(self) -> dict[str, float]:
        """Reply metrics (MiB floats): ``rss_peak_mib`` always; ``peak_mib``, ``mem_<category>_mib``,
        ``train_peak_mib`` and ``saved_<group>_mib`` if tracked."""
        out: dict[str, float] = {}
        if self.tracked:
            out["peak_mib"] = self.peak_bytes / MIB
            for c in CATEGORIES:
                out[f"mem_{c}_mib"] = self.categories.get(c, 0) / MIB
            out["train_peak_mib"] = self.train_peak_bytes / MIB
            for g in SAVED_GROUPS:
                out[f"saved_{g}_mib"] = self.saved_bytes.get(g, 0) / MIB
        out["rss_peak_mib"] = self.rss_peak_bytes / MIB
        return out


def _lean_tracker() -> Any:
    """A MemTracker that keeps only the global peak: its per-op update of every module's local peak (a loop over
    all modules plus snapshot copies, which we never read) is skipped. The global peak, the categories and the
    activation-checkpointing state are MemTracker's own.

    It also counts ``held_bytes``: non-tensor CPU bytes (message buffers) that the probe declares, added to the CPU
    total (snapshot key ``"Wire"``) whenever the peak is compared."""
    from copy import deepcopy

    from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker

    cpu = torch.device("cpu")

    class _LeanMemTracker(MemTracker):
        held_bytes = 0

        def _update_peak_stats(self, peak_state: Any = None) -> None:  # noqa: ARG002 - MemTracker's signature
            devs = list(self._curr_mem_snap)
            if self.held_bytes and cpu not in self._curr_mem_snap:
                devs.append(cpu)
            for dev in devs:
                dev_snap = self._curr_mem_snap.get(dev, {_TOTAL_KEY: 0})
                extra = self.held_bytes if dev == cpu else 0
                total = dev_snap[_TOTAL_KEY] + extra
                if self._peak_mem.get(dev, 0) < total:
                    self._peak_mem[dev] = total
                    snap = deepcopy(dev_snap)
                    if extra:
                        snap[_WIRE_KEY] = extra
                        snap[_TOTAL_KEY] = total
                    self._peak_mem_snap[dev] = snap

        def current_total(self) -> int:
            return sum(d.get(_TOTAL_KEY, 0) for d in self._curr_mem_snap.values()) + self.held_bytes

    return _LeanMemTracker()


def _snapshot_bytes(snap: dict) -> tuple[int, dict[str, int]]:
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
    return peak, cats


class MemoryProbe:
    """Context manager measuring one client round (see module docstring).

    Usage::

        probe = MemoryProbe(model, enabled=True)
        with probe:
            probe.hold_bytes("broadcast", n)      # received message bytes the client holds
            ... decode into the model, probe.hold_bytes("broadcast", 0) once freed ...
            probe.track(*batch_tensors)           # tensors made outside torch ops (loaded batches)
            with probe.training():                # the part reported as train_peak_mib
                ... forward (inside probe.saved_activations()), backward, encode ...
                probe.mark_gradient(upload_tensor)   # account encoded uploads as gradients
                probe.next_step()                     # between FedAvg local steps
            ... serialize the reply, probe.hold_bytes("reply", bytes so far) ...
        profile = probe.profile

    Args:
        model: the client model (its parameters and buffers are counted from the start).
        enabled: run the MemTracker; when False only the RSS peak is measured (every other method is a no-op).
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
        self._held: dict[str, int] = {}
        self._train_peak = 0

    @property
    def active(self) -> bool:
        """True inside ``with probe`` when the MemTracker runs."""
        return self._mt is not None

    def __enter__(self) -> "MemoryProbe":
        self._rss_reset = _reset_vmhwm()
        if self.enabled:
            self._mt = _lean_tracker()
            self._mt.track_external(self.model, *self.inputs)
            self._mt.__enter__()
            self._mt._update_peak_stats()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._mt is not None:
            self._mt._update_peak_stats()
            self._mt.__exit__(*exc)
            if exc[0] is None:
                self._collect()
            self._mt = None
        hwm = _read_vmhwm_kib() if self._rss_reset else None
        self.profile.rss_peak_bytes = hwm * 1024 if hwm is not None else _ru_maxrss_bytes()
        self.profile.rss_round_local = hwm is not None

    def _collect(self) -> None:
        peak, cats = _snapshot_bytes(self._mt.get_tracker_snapshot("peak"))
        self.profile.peak_bytes = peak
        self.profile.categories = cats
        self.profile.train_peak_bytes = self._train_peak or peak

    # ------------------------------------------------------------------ non-tensor bytes
    def hold_bytes(self, name: str, nbytes: int) -> None:
        """Declare that ``nbytes`` (int >= 0) of non-tensor CPU memory named ``name`` (received broadcast,
        serialized reply) are alive from now on, replacing the previous value of ``name``; category ``wire``.

        Raises:
            ValueError: ``nbytes`` negative or not an int.
        """
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
            raise ValueError(f"hold_bytes({name!r}): nbytes must be an int >= 0, got {nbytes!r}")
        if self._mt is None:
            return
        self._held[name] = nbytes
        self._mt.held_bytes = sum(self._held.values())
        self._mt._update_peak_stats()

    def paused(self) -> Any:
        """Context manager: stop tracking inside (loading the batch runs feature modules that MemTracker would
        take for forward passes of the model); the peak so far is kept. Tensors made inside are not counted
        unless passed to :meth:`track`."""
        from contextlib import contextmanager

        @contextmanager
        def _paused() -> Any:
            mt = self._mt
            if mt is None:
                yield
                return
            saved = (dict(mt._peak_mem), dict(mt._peak_mem_snap))
            mt.__exit__(None, None, None)
            try:
                yield
            finally:
                mt.__enter__()
                mt._peak_mem, mt._peak_mem_snap = saved
                mt._update_peak_stats()

        return _paused()

    def held_bytes(self, name: str) -> int:
        """Bytes currently declared under ``name`` (0 if none or not tracking)."""
        return self._held.get(name, 0)

    # ------------------------------------------------------------------ phases
    def training(self) -> "_TrainingPhase":
        """Context manager around the training part; its peak is ``train_peak_bytes``."""
        return _TrainingPhase(self)

    def saved_activations(self) -> Any:
        """Context manager for a forward pass: records the bytes autograd saves for backward by dtype group
        (``profile.saved_bytes``, maximum over calls). A no-op context when not tracking."""
        if self._mt is None:
            from contextlib import nullcontext

            return nullcontext()
        return _SavedActivations(self)

    # ------------------------------------------------------------------ accounting
    def _mark(self, reftype_name: str, tensors: tuple[torch.Tensor, ...]) -> None:
        if self._mt is None:
            return
        from torch.distributed._tools.mem_tracker import _MemRefType

        reftype = getattr(_MemRefType, reftype_name)
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.numel():
                self._mt._update_and_maybe_create_winfos(t, reftype)
        self._mt._update_peak_stats()

    def track(self, *tensors: torch.Tensor) -> None:
        """Count ``tensors`` made outside torch ops (``torch.from_numpy``, loaded batches) as ``other`` while
        they live (tensors already counted keep their category)."""
        if self._mt is None:
            return
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.numel() and t.untyped_storage() not in self._mt._WINFO:
                self._mark("OTH", (t,))

    def mark_gradient(self, *tensors: torch.Tensor) -> None:
        """Account ``tensors`` (encoded uploads, float weight gradients) as ``grads`` from now on."""
        self._mark("GRAD", tensors)

    def mark_other(self, *tensors: torch.Tensor) -> None:
        """Account ``tensors`` (e.g. FedAvg's copy of the received weights) as ``other`` from now on."""
        self._mark("OTH", tensors)

    def mark_optimizer_state(self, *tensors: torch.Tensor) -> None:
        """Account ``tensors`` (client optimizer state, e.g. FedAvg's momentum buffers) as ``opt`` from now on."""
        self._mark("OPT", tensors)

    def next_step(self) -> None:
        """Call between local steps (FedAvg): MemTracker refuses a second forward of the root module otherwise.
        The peak over all steps is kept."""
        self._steps += 1
        if self._mt is not None and self._steps > 1:
            self._mt.reset_mod_stats()


class _TrainingPhase:
    def __init__(self, probe: MemoryProbe) -> None:
        self.probe = probe
        self._outer: dict = {}

    def __enter__(self) -> None:
        mt = self.probe._mt
        if mt is None:
            return
        # measure this phase's own peak: start it at the current total, restore the running maximum afterwards
        mt._update_peak_stats()
        self._outer = (dict(mt._peak_mem), dict(mt._peak_mem_snap))
        mt._peak_mem = {}
        mt._peak_mem_snap = {}
        mt._update_peak_stats()

    def __exit__(self, *exc: Any) -> None:
        mt = self.probe._mt
        if mt is None:
            return
        mt._update_peak_stats()
        self.probe._train_peak = sum(mt._peak_mem.values())
        outer_mem, outer_snap = self._outer
        if sum(outer_mem.values()) > sum(mt._peak_mem.values()):
            mt._peak_mem, mt._peak_mem_snap = outer_mem, outer_snap


class _SavedActivations:
    """``saved_tensors_hooks`` that sum distinct saved storages by dtype group (parameters/buffers excluded)."""

    def __init__(self, probe: MemoryProbe) -> None:
        self.probe = probe
        self.seen: dict[int, tuple[str, int]] = {}
        self.exclude = {t.untyped_storage().data_ptr() for t in list(probe.model.parameters())
                        + list(probe.model.buffers()) if t.numel()}
        self._ctx: Any = None

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        try:
            st = t.untyped_storage()
            ptr = st.data_ptr()
        except (RuntimeError, NotImplementedError):
            return t
        if ptr and ptr not in self.exclude and ptr not in self.seen:
            if t.dtype == torch.float32:
                group = "float32"
            elif t.dtype in (torch.float16, torch.bfloat16):
                group = "float16"
            elif t.dtype in (torch.int8, torch.uint8):
                group = "int8"
            else:
                group = "other"
            self.seen[ptr] = (group, int(st.nbytes()))
        return t

    def __enter__(self) -> None:
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self._ctx.__exit__(*exc)
        by = dict.fromkeys(SAVED_GROUPS, 0)
        for group, n in self.seen.values():
            by[group] += n
        prof = self.probe.profile
        if sum(by.values()) >= sum(prof.saved_bytes.values()):
            prof.saved_bytes = by
