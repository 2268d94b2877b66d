"""Plugin discovery: workloads and strategies from Python entry points.

Groups: ``fedaqt.workloads`` (a :class:`fedaqt.workloads.base.Workload` subclass) and ``fedaqt.strategies`` (a
:class:`fedaqt.strategies.registry.StrategyPlugin`). fedaqt's built-ins register through the same groups in its
own ``pyproject.toml``; when the package metadata is unavailable (running from a source tree), the built-ins are
still found.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

log = logging.getLogger("fedaqt.plugins")

WORKLOAD_GROUP = "fedaqt.workloads"
STRATEGY_GROUP = "fedaqt.strategies"

_BUILTIN_WORKLOADS = {
    "asr": "fedaqt.workloads.asr:ASRWorkload",
    "wrapnet": "fedaqt.workloads.wrapnet:WrapNetWorkload",
}


@dataclass(frozen=True)
class PluginInfo:
    name: str
    kind: str
    source: str
    description: str


class UnknownPluginError(ValueError):
    """``--workload``/``--strategy`` named something not registered; the message lists the known names."""


def _load_ref(ref: str) -> Any:
    import importlib

    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def _entry_points(group: str) -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=group)}


def workload_names() -> list[str]:
    return sorted(set(_BUILTIN_WORKLOADS) | set(_entry_points(WORKLOAD_GROUP)))


def strategy_names() -> list[str]:
    from fedaqt.strategies.registry import BUILTIN_STRATEGIES

    return sorted(set(BUILTIN_STRATEGIES) | set(_entry_points(STRATEGY_GROUP)))


def get_workload_class(name: str) -> type:
    """Raises UnknownPluginError listing the known workloads."""
    eps = _entry_points(WORKLOAD_GROUP)
    if name in eps:
        return eps[name].load()
    if name in _BUILTIN_WORKLOADS:
        return _load_ref(_BUILTIN_WORKLOADS[name])
    raise UnknownPluginError(f"unknown workload {name!r}; known workloads: {', '.join(workload_names())}")


def get_strategy_plugin(name: str) -> Any:
    """Raises UnknownPluginError listing the known strategies."""
    from fedaqt.strategies.registry import BUILTIN_STRATEGIES

    eps = _entry_points(STRATEGY_GROUP)
    if name in eps:
        return eps[name].load()
    if name in BUILTIN_STRATEGIES:
        return BUILTIN_STRATEGIES[name]
    raise UnknownPluginError(f"unknown strategy {name!r}; known strategies: {', '.join(strategy_names())}")


def list_plugins() -> list[PluginInfo]:
    """Every registered workload and strategy with its source package and one-line description."""
    out = []
    for name in workload_names():
        ep = _entry_points(WORKLOAD_GROUP).get(name)
        source = ep.dist.name if ep is not None and ep.dist is not None else "fedaqt"
        try:
            desc = get_workload_class(name).description
        except Exception as exc:  # noqa: BLE001 - a broken plugin is listed, not fatal
            desc = f"(failed to load: {exc})"
        out.append(PluginInfo(name, "workload", source, desc))
    for name in strategy_names():
        ep = _entry_points(STRATEGY_GROUP).get(name)
        source = ep.dist.name if ep is not None and ep.dist is not None else "fedaqt"
        try:
            desc = get_strategy_plugin(name).description
        except Exception as exc:  # noqa: BLE001
            desc = f"(failed to load: {exc})"
        out.append(PluginInfo(name, "strategy", source, desc))
    return out
