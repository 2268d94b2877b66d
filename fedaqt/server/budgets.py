"""Device memory budgets (``--device-profile FILE``, issue 4).

A device profile is a CSV with a header and one of two layouts:

* per client: columns ``client_id`` (int, ``0 <= id < num_clients``, every client listed exactly once) and
  ``memory_mib`` (> 0), optional ``speed``;
* per tier: columns ``tier`` (unique, non-empty names) and ``memory_mib``, optional ``speed`` and ``fraction``
  (share of the clients in that tier, >= 0; default equal shares). Clients are dealt to tiers deterministically
  from the run seed: the client ids are shuffled with ``numpy.random.default_rng([seed, 0xDE71CE]).permutation``,
  tier ``t`` receives ``count_t`` clients by largest remainder of ``fraction_t * num_clients`` (ties to the earlier
  tier), and the shuffled ids are cut into consecutive runs of ``count_0, count_1, ...`` in file order.

``memory_mib`` is the budget for the client's *measured* peak memory of a whole round (``peak_mib`` in the reply,
:mod:`fedaqt.client.memory`: tensors plus the received broadcast while held and the serialized reply), in MiB
(2**20 bytes). ``speed`` is a relative compute speed (> 0) that is
validated and kept with the budget for reports; the budget check does not use it.

A client whose peak exceeds its budget is recorded with ``status=over_budget`` and the reason, e.g.
``"peak 812.3 MiB > budget 600 MiB (tier phone)"``, and its update is not aggregated (the strategy calls the
function from :func:`make_budget_fn` for every otherwise valid reply). Clients measure their peak whenever a device
profile is set (:func:`fedaqt.client.memory.profiling_requested`).

Errors (a :class:`fedaqt.config.ConfigError` naming the file, the row and the bad value) are raised by
:func:`validate_device_profile` before any work starts.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from fedaqt.config import ConfigError

__all__ = [
    "DeviceBudget",
    "DeviceProfile",
    "load_device_profile",
    "assign_tiers",
    "validate_device_profile",
    "make_budget_fn",
    "over_budget_reason",
]

ALLOWED_COLUMNS = ("client_id", "tier", "memory_mib", "speed", "fraction")
_TIER_SALT = 0xDE71CE

BudgetFn = Callable[[int, Any], Optional[str]]


@dataclass(frozen=True)
class DeviceBudget:
    """The budget of one client: ``memory_mib`` (MiB), ``speed`` (relative, or None) and its ``tier`` (None in the
    per-client layout)."""

    client_id: int
    memory_mib: float
    speed: Optional[float] = None
    tier: Optional[str] = None


@dataclass(frozen=True)
class DeviceProfile:
    """Parsed device profile: ``layout`` is ``"client_id"`` or ``"tier"``; ``budgets`` maps every client id."""

    path: str
    layout: str
    budgets: dict[int, DeviceBudget]

    def budget(self, client_id: int) -> Optional[DeviceBudget]:
        return self.budgets.get(int(client_id))

    def tier_counts(self) -> dict[str, int]:
        """Clients per tier (tier layout) in file order."""
        out: dict[str, int] = {}
        for b in self.budgets.values():
            if b.tier is not None:
                out[b.tier] = out.get(b.tier, 0) + 1
        return out


def _num(value: str, what: str, where: str, allow_zero: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {what}={value!r} is not a number") from None
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise ConfigError(f"{where}: {what}={value!r} must be a finite number {'>= 0' if allow_zero else '> 0'}")
    return v


def assign_tiers(fractions: list[float], num_clients: int, seed: int) -> list[int]:
    """Tier index of every client (see module docstring): ``result[client_id] = tier index``.

    Args:
        fractions: non-negative shares per tier (normalized here; sum > 0).
        num_clients: number of clients.
        seed: the run seed.

    Raises:
        ValueError: empty or all-zero fractions.
    """
    f = np.asarray(fractions, dtype=np.float64)
    if f.size == 0 or not f.sum() > 0:
        raise ValueError("tier fractions must contain a positive value")
    f = f / f.sum()
    exact = f * num_clients
    counts = np.floor(exact).astype(np.int64)
    rest = int(num_clients - counts.sum())
    order = sorted(range(len(f)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[:rest]:
        counts[i] += 1
    perm = np.random.default_rng([int(seed) & 0xFFFFFFFF, _TIER_SALT]).permutation(num_clients)
    tiers = [0] * num_clients
    start = 0
    for t, c in enumerate(counts.tolist()):
        for cid in perm[start:start + c].tolist():
            tiers[cid] = t
        start += c
    return tiers


def load_device_profile(path: str | Path, num_clients: int, seed: int = 0) -> DeviceProfile:
    """Read and validate a device profile CSV (module docstring).

    Raises:
        ConfigError: missing/unreadable file, no header, unknown or missing columns, both ``client_id`` and
            ``tier``, a bad number, a duplicate or unknown client id, clients without a budget, duplicate tiers,
            ``fraction`` in the per-client layout. The message names the file, row and value.
    """
    p = Path(path)
    name = str(p)
    if not p.is_file():
        raise ConfigError(f"device profile {name!r} does not exist")
    try:
        with p.open(newline="", encoding="utf-8-sig") as f:  # a UTF-8 BOM (spreadsheet export) is not a column name
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            rows = [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ConfigError(f"device profile {name!r} cannot be read: {exc}") from exc
    if not header:
        raise ConfigError(f"device profile {name!r} is empty; expected a header with client_id or tier, and memory_mib")
    unknown = [h for h in header if h not in ALLOWED_COLUMNS]
    if unknown:
        raise ConfigError(f"device profile {name!r}: unknown column(s) {unknown}; allowed: {', '.join(ALLOWED_COLUMNS)}")
    has_id, has_tier = "client_id" in header, "tier" in header
    if has_id == has_tier:
        raise ConfigError(f"device profile {name!r} needs exactly one of the columns 'client_id' or 'tier' "
                          f"(got columns {header})")
    if "memory_mib" not in header:
        raise ConfigError(f"device profile {name!r} is missing the column 'memory_mib' (got columns {header})")
    rows = [r for r in rows if any(v for v in r.values())]
    if not rows:
        raise ConfigError(f"device profile {name!r} has no rows")
    budgets: dict[int, DeviceBudget] = {}
    if has_id:
        if "fraction" in header:
            raise ConfigError(f"device profile {name!r}: 'fraction' is only meaningful with the 'tier' column")
        for i, r in enumerate(rows, start=2):
            where = f"device profile {name!r} line {i}"
            raw = r.get("client_id", "")
            try:
                cid = int(raw)
            except ValueError:
                raise ConfigError(f"{where}: client_id={raw!r} is not an integer") from None
            if not 0 <= cid < num_clients:
                raise ConfigError(f"{where}: unknown client_id {cid}; this run has clients 0..{num_clients - 1}")
            if cid in budgets:
                raise ConfigError(f"{where}: client_id {cid} is listed twice")
            mem = _num(r.get("memory_mib", ""), "memory_mib", where)
            speed = _num(r["speed"], "speed", where) if r.get("speed") else None
            budgets[cid] = DeviceBudget(cid, mem, speed, None)
        missing = [c for c in range(num_clients) if c not in budgets]
        if missing:
            more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
            raise ConfigError(f"device profile {name!r} has no budget for client_id(s) {missing[:10]}{more}; list "
                              f"every client 0..{num_clients - 1}, or use the 'tier' layout")
        return DeviceProfile(name, "client_id", budgets)
    tiers: list[tuple[str, float, Optional[float], float]] = []
    seen: set[str] = set()
    for i, r in enumerate(rows, start=2):
        where = f"device profile {name!r} line {i}"
        tier = r.get("tier", "")
        if not tier:
            raise ConfigError(f"{where}: empty tier name")
        if tier in seen:
            raise ConfigError(f"{where}: tier {tier!r} is listed twice")
        seen.add(tier)
        mem = _num(r.get("memory_mib", ""), "memory_mib", where)
        speed = _num(r["speed"], "speed", where) if r.get("speed") else None
        frac = _num(r["fraction"], "fraction", where, allow_zero=True) if r.get("fraction") else 1.0
        tiers.append((tier, mem, speed, frac))
    if not sum(t[3] for t in tiers) > 0:
        raise ConfigError(f"device profile {name!r}: the tier fractions sum to 0")
    assignment = assign_tiers([t[3] for t in tiers], num_clients, seed)
    for cid, ti in enumerate(assignment):
        tier, mem, speed, _ = tiers[ti]
        budgets[cid] = DeviceBudget(cid, mem, speed, tier)
    return DeviceProfile(name, "tier", budgets)


def validate_device_profile(config: Any) -> Optional[DeviceProfile]:
    """Preflight check of ``config.device_profile`` (None when no profile is set).

    Raises:
        ConfigError: see :func:`load_device_profile`.
    """
    if not getattr(config, "device_profile", ""):
        return None
    return load_device_profile(config.device_profile, int(config.num_clients), int(config.seed))


def over_budget_reason(peak_mib: float, budget: DeviceBudget) -> Optional[str]:
    """``"peak 812.3 MiB > budget 600 MiB (tier phone)"`` when ``peak_mib > budget.memory_mib``, else None."""
    if peak_mib > budget.memory_mib:
        tier = f" (tier {budget.tier})" if budget.tier is not None else ""
        return f"peak {peak_mib:.1f} MiB > budget {budget.memory_mib:g} MiB{tier}"
    return None


def make_budget_fn(config: Any) -> BudgetFn:
    """``budget_fn(client_id, reply_content) -> reason or None`` for the strategy (``Server.budget_fn``).

    The reply's MetricRecord ``metrics`` must carry ``peak_mib`` (clients measure it whenever a device profile is
    set); a reply without it, or from a client id without a budget, is refused with a reason saying so.

    Raises:
        ConfigError: a bad device profile (see :func:`load_device_profile`).
    """
    from fedaqt.protocol import METRICS_KEY

    profile = validate_device_profile(config)
    if profile is None:
        raise ConfigError("make_budget_fn needs config.device_profile to be set")

    def budget_fn(client_id: int, content: Any) -> Optional[str]:
        budget = profile.budget(client_id)
        if budget is None:
            return f"client {client_id} has no budget in device profile {profile.path!r}"
        metrics = content.metric_records.get(METRICS_KEY) if content is not None else None
        if metrics is None or "peak_mib" not in metrics:
            return "reply has no measured peak_mib (the client did not profile its memory)"
        peak = float(metrics["peak_mib"])
        if not math.isfinite(peak):
            return f"measured peak_mib={peak} is not finite"
        return over_budget_reason(peak, budget)

    budget_fn.profile = profile  # type: ignore[attr-defined]
    return budget_fn
