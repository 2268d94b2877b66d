"""Device traces and the simulated clock (``--device-trace FILE``, ``--deadline-s S``; issue 15).

A device trace is a CSV (FedScale-style) with a header and one of two layouts:

* per client: ``client_id`` (int, every client ``0..num_clients-1`` exactly once), ``compute_speed`` (> 0),
  ``bandwidth_mbps`` (> 0), optional ``memory_mib`` (> 0) and ``on_probability`` (in (0, 1], default 1);
* per tier: ``tier`` (unique, non-empty names), ``compute_speed``, ``bandwidth_mbps``, optional ``memory_mib``,
  ``on_probability`` and ``fraction`` (share of the clients, >= 0, default equal shares). Clients are dealt to
  tiers exactly as device profiles deal them (:func:`fedaqt.server.budgets.assign_tiers`: seeded shuffle, largest
  remainder); lines starting with ``#`` are comments (the source of the numbers goes there).

Units: ``compute_speed`` is relative to the machine running the simulation (1.0 = as fast, 0.25 = four times
slower); ``bandwidth_mbps`` is megabits per second (10**6 bit/s), used for the downlink and the uplink alike;
``memory_mib`` is MiB (recorded in clients.csv; memory *budgets* are enforced by ``--device-profile``).

The clock. A sampled client ``k`` that replied has the simulated round time

    t_k = seconds_k / compute_speed_k + 8 * (bytes_down_k + bytes_up_k) / (bandwidth_mbps_k * 1e6)

where ``seconds_k`` is the client's measured wall time of its round (the reply's ``seconds`` metric),
``bytes_down_k`` the size of its broadcast message (:func:`fedaqt.quant.wire.record_nbytes`) and ``bytes_up_k`` its
reply's update bytes. With a deadline ``D`` (``deadline_s > 0``) a client with ``t_k > D`` is a straggler:
clients.csv ``status=straggler``, not aggregated. The round's simulated time is ``D`` when a straggler was dropped
(the server waited until the deadline), else the largest ``t_k`` of the clients that replied (0 when none did);
rounds.csv gets ``sim_seconds`` and the running total ``sim_time``.

Availability. In round ``r`` client ``k`` is on when ``u_k < on_probability_k`` with
``u = numpy.random.default_rng([seed, 0xA7A11, r]).random(num_clients)``; only clients that are on are sampled
(:func:`fedaqt.server.app.sample_partitions` draws ``min(clients_per_round, #on)`` of them). rounds.csv gets
``clients_available``.

Errors are :class:`fedaqt.config.ConfigError` naming the file, the line and the bad value, raised by
:func:`validate_device_trace` in preflight, before any work starts.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from fedaqt.config import ConfigError

__all__ = ["DeviceState", "DeviceTrace", "load_device_trace", "validate_device_trace", "simulated_seconds",
           "ALLOWED_TRACE_COLUMNS"]

ALLOWED_TRACE_COLUMNS = ("client_id", "tier", "fraction", "memory_mib", "compute_speed", "bandwidth_mbps",
                         "on_probability")
REQUIRED_TRACE_COLUMNS = ("compute_speed", "bandwidth_mbps")
_AVAIL_SALT = 0xA7A11


@dataclass(frozen=True)
class DeviceState:
    """One client's device: ``compute_speed`` (relative), ``bandwidth_mbps`` (Mbit/s), ``memory_mib`` (MiB or None),
    ``on_probability`` (per round) and ``tier`` (None in the per-client layout)."""

    client_id: int
    compute_speed: float
    bandwidth_mbps: float
    memory_mib: Optional[float] = None
    on_probability: float = 1.0
    tier: Optional[str] = None


def simulated_seconds(seconds: float, bytes_down: int, bytes_up: int, device: DeviceState) -> float:
    """``seconds / compute_speed + 8 * (bytes_down + bytes_up) / (bandwidth_mbps * 1e6)`` in seconds (module doc).

    Raises:
        ValueError: ``seconds`` or a byte count negative or not finite.
    """
    if not (math.isfinite(seconds) and seconds >= 0) or bytes_down < 0 or bytes_up < 0:
        raise ValueError(f"simulated_seconds: bad input seconds={seconds!r} bytes_down={bytes_down} bytes_up={bytes_up}")
    return float(seconds) / device.compute_speed + 8.0 * (int(bytes_down) + int(bytes_up)) / (device.bandwidth_mbps * 1e6)


@dataclass(frozen=True)
class DeviceTrace:
    """A parsed trace: ``layout`` ``"client_id"`` or ``"tier"``, ``devices`` maps every client id."""

    path: str
    layout: str
    devices: dict[int, DeviceState]

    def device(self, client_id: int) -> DeviceState:
        return self.devices[int(client_id)]

    def available(self, seed: int, server_round: int) -> list[int]:
        """Sorted ids of the clients that are on in ``server_round`` (module docstring)."""
        n = len(self.devices)
        u = np.random.default_rng([int(seed) & 0xFFFFFFFFFFFFFFFF, _AVAIL_SALT, int(server_round)]).random(n)
        return [c for c in range(n) if u[c] < self.devices[c].on_probability]


def _num(value: str, what: str, where: str, allow_zero: bool = False, at_most: float | None = None) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {what}={value!r} is not a number") from None
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero) or (at_most is not None and v > at_most):
        rng = f"in (0, {at_most:g}]" if at_most is not None else (">= 0" if allow_zero else "> 0")
        raise ConfigError(f"{where}: {what}={value!r} must be a finite number {rng}")
    return v


def load_device_trace(path: str | Path, num_clients: int, seed: int = 0) -> DeviceTrace:
    """Read and validate a device trace CSV (module docstring).

    Raises:
        ConfigError: missing/unreadable file, unknown or missing columns, both or neither of ``client_id`` /
            ``tier``, a bad number, a duplicate/unknown/missing client id, duplicate tiers, ``fraction`` in the
            per-client layout; the message names the file, the line and the value.
    """
    p = Path(path)
    name = str(p)
    if not p.is_file():
        raise ConfigError(f"device_trace {name!r} does not exist")
    try:
        lines = p.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"device_trace {name!r} cannot be read: {exc}") from exc
    numbered = [(i, ln) for i, ln in enumerate(lines, start=1) if ln.strip() and not ln.lstrip().startswith("#")]
    if not numbered:
        raise ConfigError(f"device_trace {name!r} is empty; expected a header with client_id or tier, "
                          f"{', '.join(REQUIRED_TRACE_COLUMNS)}")
    try:
        parsed = list(csv.reader(io.StringIO("\n".join(ln for _, ln in numbered))))
    except csv.Error as exc:
        raise ConfigError(f"device_trace {name!r} cannot be read: {exc}") from exc
    header = [h.strip() for h in parsed[0]]
    unknown = [h for h in header if h not in ALLOWED_TRACE_COLUMNS]
    if unknown:
        raise ConfigError(f"device_trace {name!r}: unknown column(s) {unknown}; allowed: {', '.join(ALLOWED_TRACE_COLUMNS)}")
    has_id, has_tier = "client_id" in header, "tier" in header
    if has_id == has_tier:
        raise ConfigError(f"device_trace {name!r} needs exactly one of the columns 'client_id' or 'tier' (got {header})")
    missing_cols = [c for c in REQUIRED_TRACE_COLUMNS if c not in header]
    if missing_cols:
        raise ConfigError(f"device_trace {name!r} is missing the column(s) {missing_cols} (got {header})")
    if has_id and "fraction" in header:
        raise ConfigError(f"device_trace {name!r}: 'fraction' is only meaningful with the 'tier' column")
    rows = []
    for (line_no, _), values in zip(numbered[1:], parsed[1:]):
        if len(values) != len(header):
            raise ConfigError(f"device_trace {name!r} line {line_no}: {len(values)} values for {len(header)} columns")
        rows.append((line_no, {h: v.strip() for h, v in zip(header, values)}))
    if not rows:
        raise ConfigError(f"device_trace {name!r} has no rows")

    def state(r: dict[str, str], where: str, cid: int, tier: Optional[str]) -> DeviceState:
        return DeviceState(
            client_id=cid,
            compute_speed=_num(r["compute_speed"], "compute_speed", where),
            bandwidth_mbps=_num(r["bandwidth_mbps"], "bandwidth_mbps", where),
            memory_mib=_num(r["memory_mib"], "memory_mib", where) if r.get("memory_mib") else None,
            on_probability=_num(r["on_probability"], "on_probability", where, at_most=1.0) if r.get("on_probability") else 1.0,
            tier=tier,
        )

    devices: dict[int, DeviceState] = {}
    if has_id:
        for line_no, r in rows:
            where = f"device_trace {name!r} line {line_no}"
            try:
                cid = int(r["client_id"])
            except ValueError:
                raise ConfigError(f"{where}: client_id={r['client_id']!r} is not an integer") from None
            if not 0 <= cid < num_clients:
                raise ConfigError(f"{where}: unknown client_id {cid}; this run has clients 0..{num_clients - 1}")
            if cid in devices:
                raise ConfigError(f"{where}: client_id {cid} is listed twice")
            devices[cid] = state(r, where, cid, None)
        missing = [c for c in range(num_clients) if c not in devices]
        if missing:
            raise ConfigError(f"device_trace {name!r} has no row for client_id(s) {missing[:10]}"
                              f"{' ...' if len(missing) > 10 else ''}; list every client 0..{num_clients - 1} or use tiers")
        return DeviceTrace(name, "client_id", devices)
    tiers: list[tuple[str, dict[str, str], str, float]] = []
    seen: set[str] = set()
    for line_no, r in rows:
        where = f"device_trace {name!r} line {line_no}"
        tier = r["tier"]
        if not tier:
            raise ConfigError(f"{where}: empty tier name")
        if tier in seen:
            raise ConfigError(f"{where}: tier {tier!r} is listed twice")
        seen.add(tier)
        state(r, where, 0, tier)  # every value checked even for a tier that receives no client
        frac = _num(r["fraction"], "fraction", where, allow_zero=True) if r.get("fraction") else 1.0
        tiers.append((tier, r, where, frac))
    if not sum(t[3] for t in tiers) > 0:
        raise ConfigError(f"device_trace {name!r}: the tier fractions sum to 0")
    from fedaqt.server.budgets import assign_tiers

    for cid, ti in enumerate(assign_tiers([t[3] for t in tiers], num_clients, seed)):
        tier, r, where, _ = tiers[ti]
        devices[cid] = state(r, where, cid, tier)
    return DeviceTrace(name, "tier", devices)


def validate_device_trace(config: Any) -> Optional[DeviceTrace]:
    """Preflight check of the core options ``device_trace`` / ``deadline_s`` (None when no trace is set).

    Raises:
        ConfigError: a bad trace (:func:`load_device_trace`), or ``deadline_s > 0`` without a trace.
    """
    from fedaqt.options import core_options

    core = core_options(config)
    if not core.device_trace:
        if core.deadline_s > 0:
            raise ConfigError(f"deadline_s={core.deadline_s:g} needs a device trace (--device-trace FILE): "
                              "simulated round times come from its compute_speed and bandwidth_mbps")
        return None
    return load_device_trace(core.device_trace, int(config.num_clients), int(config.seed))
