"""Plugin discovery: workloads, strategies and client algorithms from Python entry points.

Groups: ``fedaqt.workloads`` (a :class:`fedaqt.workloads.base.Workload` subclass), ``fedaqt.strategies`` (a
:class:`fedaqt.strategies.registry.StrategyPlugin`, or a strategy class that puts
:class:`fedaqt.strategies.quantized.QuantizedMixin` in front of a Flower Message-API strategy) and
``fedaqt.algorithms`` (a :class:`fedaqt.algorithms.base.ClientAlgorithm` subclass). fedaqt's built-ins
register through the same groups in its own ``pyproject.toml``; when the package metadata is unavailable (running
from a source tree), the built-ins are still found.

Name clashes: a name registered by two different distributions is ambiguous and selecting it is an error that
names both packages (``fedaqt plugins list`` shows the clash). The same distribution seen twice on ``sys.path``
(an editable install next to its source tree) is not a clash.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from pydantic import BaseModel

from fedaqt.config import ConfigError
from fedaqt.options import CoreOptions, NoOptions, options_for, type_name

log = logging.getLogger("fedaqt.plugins")

WORKLOAD_GROUP = "fedaqt.workloads"
STRATEGY_GROUP = "fedaqt.strategies"
ALGORITHM_GROUP = "fedaqt.algorithms"

_BUILTIN_WORKLOADS = {
    "asr": "fedaqt.workloads.asr:ASRWorkload",
    "wrapnet": "fedaqt.workloads.wrapnet:WrapNetWorkload",
    "metaformer": "fedaqt.workloads.metaformer:MetaFormerWorkload",
    "fewshot": "fedaqt.workloads.fewshot:FewShotWorkload",
}
_BUILTIN_ALGORITHMS = {
    "fedsgd": "fedaqt.algorithms.fedsgd:FedSGD",
    "fedavg": "fedaqt.algorithms.fedavg:FedAvg",
    "fomaml": "fedaqt.algorithms.meta:FOMAML",
    "maml": "fedaqt.algorithms.meta:MAML",
    "reptile": "fedaqt.algorithms.meta:Reptile",
    "consensus_reptile": "fedaqt.algorithms.meta:ConsensusReptile",
}


@dataclass(frozen=True)
class PluginInfo:
    """One row of ``fedaqt plugins list``: ``kind`` is "workload", "strategy" or "algorithm"; ``source`` the
    distribution."""

    name: str
    kind: str
    source: str
    description: str


class UnknownPluginError(ValueError):
    """``--workload``/``--strategy``/``--algorithm`` named something not registered; the message lists the known
    names."""


class PluginLoadError(ValueError):
    """A registered plugin cannot be imported, is ambiguous, or is not a workload/strategy/algorithm."""


def _load_ref(ref: str) -> Any:
    import importlib

    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def _dist_name(ep: EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return dist.name if dist is not None else "?"


def _entry_points(group: str) -> dict[str, list[EntryPoint]]:
    """name -> entry points of ``group``, one per distinct distribution (duplicates of one dist dropped)."""
    out: dict[str, list[EntryPoint]] = {}
    for ep in entry_points(group=group):
        same = out.setdefault(ep.name, [])
        if not any(_dist_name(e) == _dist_name(ep) for e in same):
            same.append(ep)
    return out


def _resolve(group: str, name: str, kind: str, builtin: bool = False) -> tuple[Any, str] | None:
    """(loaded object, source distribution) for ``name`` in ``group``; None when not registered there.

    ``builtin``: ``name`` is also one of fedaqt's built-ins. Another package's entry point of that name is then a
    clash too, even where fedaqt's own entry points are missing (an install older than the group)."""
    eps = _entry_points(group).get(name)
    if not eps:
        return None
    if builtin and all(_dist_name(e) != "fedaqt" for e in eps):
        owners = ", ".join(["fedaqt (built-in)"] + sorted(_dist_name(e) for e in eps))
        raise PluginLoadError(f"{kind} {name!r} is registered by several packages ({owners}); uninstall all but one")
    if len(eps) > 1:
        owners = ", ".join(sorted(_dist_name(e) for e in eps))
        raise PluginLoadError(f"{kind} {name!r} is registered by several packages ({owners}); uninstall all but one")
    ep = eps[0]
    try:
        return ep.load(), _dist_name(ep)
    except Exception as exc:  # noqa: BLE001 - name the plugin and its package
        raise PluginLoadError(
            f"{kind} {name!r} from package {_dist_name(ep)!r} ({ep.value}) failed to load: {type(exc).__name__}: {exc}"
        ) from exc


def workload_names() -> list[str]:
    return sorted(set(_BUILTIN_WORKLOADS) | set(_entry_points(WORKLOAD_GROUP)))


def strategy_names() -> list[str]:
    from fedaqt.strategies.registry import BUILTIN_STRATEGIES

    return sorted(set(BUILTIN_STRATEGIES) | set(_entry_points(STRATEGY_GROUP)))


def algorithm_names() -> list[str]:
    return sorted(set(_BUILTIN_ALGORITHMS) | set(_entry_points(ALGORITHM_GROUP)))


def _check_workload(name: str, obj: Any, source: str) -> type:
    from fedaqt.workloads.base import Workload

    if not (isinstance(obj, type) and issubclass(obj, Workload)):
        raise PluginLoadError(
            f"workload {name!r} from package {source!r} is {obj!r}, not a subclass of fedaqt.workloads.base.Workload"
        )
    return obj


def _get_class(group: str, builtins: dict[str, str], name: str, kind: str, names: Any, check: Any) -> type:
    """``name``'s registered class in ``group`` (an entry point, else fedaqt's built-in), checked by
    ``check(name, obj, source)``. Raises UnknownPluginError listing ``names()``; PluginLoadError from the checks."""
    found = _resolve(group, name, kind, builtin=name in builtins)
    if found is not None:
        return check(name, *found)
    if name in builtins:
        return check(name, _load_ref(builtins[name]), "fedaqt")
    raise UnknownPluginError(f"unknown {kind} {name!r}; known {kind}s: {', '.join(names())}")


def get_workload_class(name: str) -> type:
    """The Workload subclass registered as ``name``.

    Raises:
        UnknownPluginError: not registered (the message lists the known workloads).
        PluginLoadError: registered but ambiguous, failing to import, or not a Workload subclass.
    """
    return _get_class(WORKLOAD_GROUP, _BUILTIN_WORKLOADS, name, "workload", workload_names, _check_workload)


def _check_algorithm(name: str, obj: Any, source: str) -> type:
    from fedaqt.algorithms.base import UPLOAD_KINDS, ClientAlgorithm

    if not (isinstance(obj, type) and issubclass(obj, ClientAlgorithm)):
        raise PluginLoadError(
            f"algorithm {name!r} from package {source!r} is {obj!r}, not a subclass of "
            "fedaqt.algorithms.base.ClientAlgorithm"
        )
    if obj.upload not in UPLOAD_KINDS:
        raise PluginLoadError(
            f"algorithm {name!r} from package {source!r} declares upload={obj.upload!r}; allowed: {', '.join(UPLOAD_KINDS)}"
        )
    return obj


def get_algorithm_class(name: str) -> type:
    """The :class:`~fedaqt.algorithms.base.ClientAlgorithm` subclass registered as ``name``.

    Raises:
        UnknownPluginError: not registered (the message lists the known algorithms).
        PluginLoadError: registered but ambiguous, failing to import, not a ClientAlgorithm subclass, or with an
            ``upload`` other than "gradient"/"delta".
    """
    return _get_class(ALGORITHM_GROUP, _BUILTIN_ALGORITHMS, name, "algorithm", algorithm_names, _check_algorithm)


def get_strategy_plugin(name: str) -> Any:
    """The :class:`~fedaqt.strategies.registry.StrategyPlugin` registered as ``name``.

    A registered strategy *class* (QuantizedMixin + a Flower strategy) is wrapped by
    :func:`fedaqt.strategies.registry.plugin_from_class`.

    Raises:
        UnknownPluginError: not registered (the message lists the known strategies).
        PluginLoadError: registered but ambiguous, failing to import, or neither a StrategyPlugin nor such a class.
    """
    from fedaqt.strategies.registry import BUILTIN_STRATEGIES, as_strategy_plugin

    found = _resolve(STRATEGY_GROUP, name, "strategy", builtin=name in BUILTIN_STRATEGIES)
    if found is not None:
        obj, source = found
        try:
            return as_strategy_plugin(obj)
        except TypeError as exc:
            raise PluginLoadError(f"strategy {name!r} from package {source!r}: {exc}") from None
    if name in BUILTIN_STRATEGIES:
        return BUILTIN_STRATEGIES[name]
    raise UnknownPluginError(f"unknown strategy {name!r}; known strategies: {', '.join(strategy_names())}")


def _source(group: str, name: str) -> str:
    eps = _entry_points(group).get(name)
    if not eps:
        return "fedaqt"
    owners = sorted(_dist_name(e) for e in eps)
    return owners[0] if len(owners) == 1 else " + ".join(owners) + " (clash)"


def list_plugins() -> list[PluginInfo]:
    """Every registered workload, strategy and client algorithm with its source package and one-line description.

    A plugin that fails to load is listed with the reason instead of a description (never fatal).
    """
    out = []
    for name in workload_names():
        try:
            desc = _first_line(getattr(get_workload_class(name), "description", "") or get_workload_class(name).__doc__)
        except Exception as exc:  # noqa: BLE001 - a broken plugin is listed, not fatal
            desc = f"(failed to load: {exc})"
        out.append(PluginInfo(name, "workload", _source(WORKLOAD_GROUP, name), desc))
    for name in strategy_names():
        try:
            desc = _first_line(get_strategy_plugin(name).description)
        except Exception as exc:  # noqa: BLE001
            desc = f"(failed to load: {exc})"
        out.append(PluginInfo(name, "strategy", _source(STRATEGY_GROUP, name), desc))
    for name in algorithm_names():
        try:
            cls = get_algorithm_class(name)
            desc = _first_line(cls.description or cls.__doc__)
        except Exception as exc:  # noqa: BLE001
            desc = f"(failed to load: {exc})"
        out.append(PluginInfo(name, "algorithm", _source(ALGORITHM_GROUP, name), desc))
    return out


def _first_line(text: str | None) -> str:
    return (text or "").strip().splitlines()[0].strip() if (text or "").strip() else ""


def known_plugin_names() -> list[str]:
    """Every registered workload, strategy and client algorithm name (sorted, each once)."""
    names = set(workload_names()) | set(strategy_names())
    alg_names = globals().get("algorithm_names")
    if callable(alg_names):
        names |= set(alg_names())
    return sorted(names)


def plugin_entries(name: str) -> list[tuple[str, str, str, Any]]:
    """``[(kind, source package, description, Options model), ...]`` of every kind registered as ``name``
    (workload, strategy, algorithm; e.g. ``fedavg`` is a strategy and a client algorithm); [] when none.

    Raises:
        PluginLoadError: ``name`` is registered but fails to load or is ambiguous.
    """
    from fedaqt.options import NoOptions

    out: list[tuple[str, str, str, Any]] = []
    if name in workload_names():
        cls = get_workload_class(name)
        out.append(("workload", _source(WORKLOAD_GROUP, name),
                    _first_line(getattr(cls, "description", "") or cls.__doc__), getattr(cls, "Options", NoOptions)))
    if name in strategy_names():
        sp = get_strategy_plugin(name)
        out.append(("strategy", _source(STRATEGY_GROUP, name), _first_line(sp.description),
                    getattr(sp, "Options", NoOptions)))
    get_alg = globals().get("get_algorithm_class")
    alg_names = globals().get("algorithm_names")
    if callable(get_alg) and callable(alg_names) and name in alg_names():
        cls = get_alg(name)
        group = globals().get("ALGORITHM_GROUP", "fedaqt.algorithms")
        out.append(("algorithm", _source(group, name),
                    _first_line(getattr(cls, "description", "") or cls.__doc__), getattr(cls, "Options", NoOptions)))
    return out


# ---------------------------------------------------------------------------------------------- typed options
# Here rather than in fedaqt.options: resolving a run's owners needs the registries, and fedaqt.options (imported
# by every plugin for BaseOptions) must not import the plugins themselves (import-linter contracts, pyproject).
def option_owners(config: Any) -> list[tuple[str, type[BaseModel]]]:
    """``[(owner, Options model), ...]`` of a run: core, its workload, its strategy and its client algorithm.

    Raises:
        ConfigError: the workload/strategy/algorithm is not registered or fails to load (the message lists the
            known names), or a plugin's ``Options`` is not a pydantic model.
    """
    owners: list[tuple[str, type[BaseModel]]] = [("core", CoreOptions)]
    try:
        wl = get_workload_class(config.workload)
        owners.append((f"workload {config.workload}", _model_of(getattr(wl, "Options", NoOptions), "workload", config.workload)))
        sp = get_strategy_plugin(config.strategy)
        owners.append((f"strategy {config.strategy}", _model_of(getattr(sp, "Options", NoOptions), "strategy", config.strategy)))
        alg = get_algorithm_class(config.algorithm)
        owners.append((f"algorithm {config.algorithm}", _model_of(getattr(alg, "Options", NoOptions), "algorithm", config.algorithm)))
    except (UnknownPluginError, PluginLoadError) as exc:
        raise ConfigError(str(exc)) from None
    return owners


def _other_owners(key: str, config: Any) -> list[str]:
    """``["strategy fedprox (--strategy fedprox)", ...]``: registered plugins not used by ``config`` that declare
    option ``key`` (a hint for an unknown key; plugins that fail to load are skipped)."""
    found = []
    kinds = (("workload", "workload", workload_names, get_workload_class),
             ("strategy", "strategy", strategy_names, get_strategy_plugin),
             ("algorithm", "algorithm", algorithm_names, get_algorithm_class))
    for kind, flag, names, get in kinds:
        for name in names():
            if name == getattr(config, kind):
                continue
            try:
                model = getattr(get(name), "Options", None)
            except Exception:  # noqa: BLE001 - a hint only
                continue
            if key in (getattr(model, "model_fields", None) or {}):
                found.append(f"{kind} {name} (--{flag} {name})")
    return found


def _model_of(obj: Any, kind: str, name: str) -> type[BaseModel]:
    if obj is None:
        return NoOptions
    if not (isinstance(obj, type) and issubclass(obj, BaseModel)):
        raise ConfigError(f"{kind} {name!r}: its Options is {obj!r}, not a pydantic BaseModel subclass")
    return obj


def check_options(config: Any) -> dict[str, BaseModel]:
    """Validate a run's whole ``options`` table against every owner's model (before Ray starts).

    Returns:
        owner -> typed options instance.

    Raises:
        ConfigError: an unknown key (``unknown option 'local_epoch'; did you mean local_epochs? allowed options:
            core: ...; workload asr: ...; strategy fedsgd: (none); algorithm fedavg: ...``), a bad value (see
            :func:`options_for`), or a key two owners declare with different types.
    """
    options = config.options
    if not isinstance(options, dict):
        raise ConfigError(f"options must be a table of KEY = VALUE, got {options!r}")
    owners = option_owners(config)
    declared: dict[str, tuple[str, Any]] = {}
    for owner, model in owners:
        for key, field in model.model_fields.items():
            if key in declared and declared[key][1] != field.annotation:
                other, tp = declared[key]
                raise ConfigError(
                    f"option {key!r} is declared by {other} as {type_name(tp)} and by {owner} as "
                    f"{type_name(field.annotation)}; an option shared by two plugins must have one type"
                )
            declared.setdefault(key, (owner, field.annotation))
    unknown = sorted(k for k in options if k not in declared)
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), list(declared), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        elsewhere = _other_owners(str(key), config)
        if elsewhere:
            hint += f"; {key!r} is an option of {' and '.join(elsewhere)}, not selected in this run"
        listing = "; ".join(f"{owner}: {', '.join(model.model_fields) or '(none)'}" for owner, model in owners)
        more = f" (also unknown: {', '.join(map(repr, unknown[1:]))})" if len(unknown) > 1 else ""
        raise ConfigError(f"unknown option {key!r}{more}{hint}; allowed options: {listing}")
    return {owner: options_for(model, options, owner) for owner, model in owners}
