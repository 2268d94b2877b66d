"""Typed options: every plugin declares its ``-o KEY=VALUE`` options as a pydantic model; one check before Ray.

The user's flat ``RunConfig.options`` table (``-o KEY=VALUE`` on the command line, ``[options]`` in a TOML) is
split by key among the models that declare the keys:

* ``core`` -- :class:`CoreOptions` (``round_timeout``, ``max_nonfinite_rounds``, ``profile_memory``,
  ``device_trace``, ``deadline_s``, ``dp_*``, ``secagg*``), read by the
  server and the clients whatever the plugins;
* ``workload NAME`` -- ``Workload.Options`` of the selected workload;
* ``strategy NAME`` -- ``StrategyPlugin.Options`` of the selected strategy;
* ``algorithm NAME`` -- ``ClientAlgorithm.Options`` of the selected client algorithm (when the installed fedaqt
  has client-algorithm plugins, :func:`fedaqt.plugins.get_algorithm_class`).

An ``Options`` model is a ``pydantic.BaseModel`` with ``model_config = ConfigDict(extra="forbid")`` whose every
field has a default and ``Field(description="one line help", ...)``, with constraints as ``ge``/``gt``/``le``/
``lt`` and choices as ``Literal[...]``. :func:`options_for` gives a plugin its typed instance;
:func:`fedaqt.plugins.check_options` (called by preflight, before Ray starts) refuses an
unknown key (naming it, a close match and every allowed key by owner) and any bad value (naming the key, the
value, the allowed range and the owner).

Values arrive as parsed JSON (``-o k=3`` is the int 3, ``-o k=abc`` the string "abc") or TOML values; numeric
strings are accepted for numbers and true/false/yes/no/on/off/1/0 for booleans, as pydantic's lax mode does,
except that a boolean is never accepted for a number (``-o max_nonfinite_rounds=true`` is an error).

A key declared by two owners (e.g. a workload and an algorithm both reading ``proximal_mu``) is allowed only when
both declare it with the same type; both then receive the same value, each validated by its own constraints.
"""

from __future__ import annotations

import difflib
import math
import types
import typing
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fedaqt.config import ConfigError

__all__ = [
    "BaseOptions",
    "CoreOptions",
    "NoOptions",
    "OptionRow",
    "describe_options",
    "options_for",
]


class BaseOptions(BaseModel):
    """Base of fedaqt's own option models: unknown keys forbidden, no NaN/inf for floats, defaults validated."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, validate_default=True, frozen=True)


class NoOptions(BaseOptions):
    """A plugin without options."""


class CoreOptions(BaseOptions):
    """Options that fedaqt's server and clients read whatever the workload, strategy and algorithm."""

    round_timeout: float = Field(3600.0, gt=0, description="seconds the server waits for a round's replies")
    max_nonfinite_rounds: int = Field(
        3, ge=1, description="rounds whose aggregated model may be non-finite (skipped) before the run stops"
    )
    profile_memory: bool = Field(False, description="clients measure their memory every round (clients.csv)")
    server_lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="server learning rate per round: constant, or cosine decay from --server-lr in "
                                "round 1 to 0 after the last round (eta_r = eta 0.5 (1 + cos(pi (r-1) / rounds)))")
    device_trace: str = Field("", description="device trace CSV (compute_speed, bandwidth_mbps, on_probability): "
                                              "simulated clock and availability, fedaqt.server.clock")
    deadline_s: float = Field(0.0, ge=0, description="simulated round deadline in seconds (0 = none): slower "
                                                     "clients are stragglers, not aggregated; needs device_trace")
    dp_clip: float = Field(0.0, ge=0, description="central DP (fedaqt.strategies.dp): L2 clipping norm C of each "
                                                  "client's parameter update (0 = DP off)")
    dp_noise: float = Field(0.0, ge=0, description="central DP: noise multiplier sigma; the mean update gets "
                                                   "N(0, (sigma C max_k w_k)^2) noise (needs dp_clip > 0)")
    dp_delta: float = Field(1e-5, gt=0, lt=1, description="central DP: delta of the (epsilon, delta) reported per "
                                                          "round in rounds.csv dp_epsilon (opacus RDP accountant)")
    secagg: bool = Field(False, description="secure aggregation with Flower's SecAgg+ (fedaqt.server.secagg): the "
                                            "server sees only the masked sum; --uplink-bits 32 or 8 (shared scale)")
    secagg_num_shares: float = Field(1.0, gt=0, description="SecAgg+: shares of each client's keys; <= 1 a fraction of "
                                                            "the sampled clients, else an integer count >= 3")
    secagg_threshold: float = Field(1.0, gt=0, description="SecAgg+: shares needed to reconstruct a key; <= 1 a "
                                                           "fraction of num_shares, else an integer count >= 2")
    # upper bounds: beyond them the quantizer's step (2R / levels, or the shared scale) exceeds any update element,
    # every code rounds to 0 and the round silently aggregates nothing (found by a fault-injection run: 1e30)
    secagg_clipping_range: float = Field(8.0, gt=0, le=1e3, description="SecAgg+ at --uplink-bits 32: every update "
                                                                        "element is clipped to [-R, R] before Flower's quantizer")
    secagg_quantization_range: int = Field(2**22, ge=2, description="SecAgg+ at --uplink-bits 32: integer levels "
                                                                     "of Flower's quantizer over [-R, R]")
    secagg_headroom: float = Field(4.0, gt=0, le=1e3, description="SecAgg+ at --uplink-bits 8: shared scale of a tensor = "
                                                          "headroom x max|previous round's mean| / 127")
    secagg_scale_init: float = Field(0.05, gt=0, le=1e3, description="SecAgg+ at --uplink-bits 8: element range of every "
                                                             "tensor in round 1 (shared scale = value / 127)")
    stream_aggregation: bool = Field(
        True, description="fold each reply into an order-independent running sum as it arrives (server memory "
                          "O(model)); false = hold every reply until the round ends (used anyway with a device "
                          "trace or a strategy that overrides aggregate_train)")

    @field_validator("secagg_num_shares")
    @classmethod
    def _count_or_fraction_3(cls, v: float) -> float:
        if v > 1 and (v != int(v) or v < 3):
            raise ValueError(f"must be a fraction in (0, 1] or an integer >= 3 (Flower's SecAgg+), got {v!r}")
        return v

    @field_validator("secagg_threshold")
    @classmethod
    def _count_or_fraction_2(cls, v: float) -> float:
        if v > 1 and (v != int(v) or v < 2):
            raise ValueError(f"must be a fraction in (0, 1] or an integer >= 2 (Flower's SecAgg+), got {v!r}")
        return v


# ---------------------------------------------------------------------------------------------- describing fields
def _is_bool(tp: Any) -> bool:
    return tp is bool


def _is_number(tp: Any) -> bool:
    return tp in (int, float)


def _args(tp: Any) -> tuple:
    return typing.get_args(tp)


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _literal_values(tp: Any) -> tuple | None:
    if typing.get_origin(tp) is Literal:
        return _args(tp)
    return None


def type_name(tp: Any) -> str:
    """Short name of a field's annotation for tables: ``int``, ``float``, ``bool``, ``str``, ``choice``,
    ``float|None``..."""
    if _literal_values(tp) is not None:
        return "choice"
    if _is_union(tp):
        return "|".join(type_name(a) for a in _args(tp))
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", str(tp))


def _constraints(field: Any) -> list[str]:
    out = []
    for m in field.metadata:
        for attr, op in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            v = getattr(m, attr, None)
            if v is not None:
                out.append(f"{op} {v!r}")
        v = getattr(m, "min_length", None)
        if v is not None:
            out.append("non-empty" if v == 1 else f"of at least {v} characters")
        v = getattr(m, "max_length", None)
        if v is not None:
            out.append(f"of at most {v} characters")
    return out


def _allowed_for(tp: Any, field: Any, finite: bool) -> str:
    lit = _literal_values(tp)
    if lit is not None:
        return "one of " + ", ".join(repr(v) for v in lit)
    if _is_union(tp):
        parts = [a for a in _args(tp) if a is not type(None)]
        none = len(parts) < len(_args(tp))
        text = " or ".join(_allowed_for(a, field, finite) for a in parts)
        return f"{text} or null" if none else text
    if _is_bool(tp):
        return "true or false"
    cons = _constraints(field)
    if tp is int:
        base = "an integer"
    elif tp is float:
        base = "a finite number" if finite else "a number"
    elif tp is str:
        if cons == ["non-empty"]:
            return "a non-empty string"
        base = "a string"
    else:
        base = f"a {type_name(tp)}"
    return base + (" " + " and ".join(cons) if cons else "")


def allowed_text(model_cls: type[BaseModel], key: str) -> str:
    """What ``model_cls`` allows for ``key``, in words: ``an integer >= 1``, ``one of 'tiny', 'small'``, ..."""
    field = model_cls.model_fields[key]
    finite = model_cls.model_config.get("allow_inf_nan", True) is False
    return _allowed_for(field.annotation, field, finite)


class OptionRow(typing.NamedTuple):
    """One row of ``fedaqt plugins show``: the key, its type, its default, what is allowed, one line of help."""

    key: str
    type: str
    default: Any
    allowed: str
    help: str


def describe_options(model_cls: type[BaseModel]) -> list[OptionRow]:
    """The rows of an ``Options`` model (declaration order) for ``fedaqt plugins show NAME``."""
    rows = []
    for key, field in model_cls.model_fields.items():
        default = field.get_default(call_default_factory=True)
        rows.append(OptionRow(key, type_name(field.annotation), default, allowed_text(model_cls, key),
                              (field.description or "").strip().splitlines()[0] if field.description else ""))
    return rows


# ---------------------------------------------------------------------------------------------- validation
def _base_type(tp: Any) -> Any:
    """``int``/``float``/``bool``/... of an annotation, ``Optional[X]`` -> X (None for anything else)."""
    if _is_union(tp):
        inner = [a for a in _args(tp) if a is not type(None)]
        return inner[0] if len(inner) == 1 else None
    return tp


def _fmt_value(v: Any) -> str:
    return repr(v)


def options_for(model_cls: type[BaseModel], options: dict[str, Any] | None, owner: str) -> BaseModel:
    """The typed options of one owner: the keys of ``options`` that ``model_cls`` declares, validated.

    Args:
        model_cls: the owner's ``Options`` model (a pydantic ``BaseModel`` subclass).
        options: the run's flat ``-o KEY=VALUE`` table (other owners' keys are ignored here).
        owner: who declares the model, for messages: ``"core"``, ``"workload asr"``, ``"algorithm fedavg"``.

    Returns:
        an instance of ``model_cls`` (defaults for the keys not given).

    Raises:
        ConfigError: ``option KEY=VALUE (OWNER) is not allowed: must be ALLOWED`` for the first bad value.
    """
    options = dict(options or {})
    fields = model_cls.model_fields
    picked = {k: v for k, v in options.items() if k in fields}
    for key, value in picked.items():  # pydantic's lax mode takes True for 1; fedaqt does not
        base = _base_type(fields[key].annotation)
        if isinstance(value, bool) and _is_number(base):
            raise _bad(model_cls, key, value, owner)
        if isinstance(value, float) and base is float and not math.isfinite(value) \
                and model_cls.model_config.get("allow_inf_nan", True) is False:
            raise _bad(model_cls, key, value, owner)
    try:
        return model_cls.model_validate(picked)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = err.get("loc") or ()
        key = str(loc[0]) if loc else ""
        if key in picked:
            if err.get("type") == "value_error":  # a field validator's own message names the rule
                reason = str((err.get("ctx") or {}).get("error") or err.get("msg", ""))
                raise ConfigError(f"option {key}={_fmt_value(picked[key])} ({owner}) is not allowed: {reason}") from None
            raise _bad(model_cls, key, picked[key], owner) from None
        raise ConfigError(f"options of {owner} are not allowed: {err.get('msg', exc)}") from None


def _bad(model_cls: type[BaseModel], key: str, value: Any, owner: str) -> ConfigError:
    return ConfigError(f"option {key}={_fmt_value(value)} ({owner}) is not allowed: must be {allowed_text(model_cls, key)}")


def core_options(config: Any) -> CoreOptions:
    """The typed :class:`CoreOptions` of a run (``config.options``). Raises ConfigError on a bad value."""
    return options_for(CoreOptions, getattr(config, "options", {}) or {}, "core")  # type: ignore[return-value]
