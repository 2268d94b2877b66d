"""Strategy registry: built-ins and third-party plugins from the ``fedaqt.strategies`` entry-point group.

A registered strategy is a :class:`StrategyPlugin` whose ``factory(config: RunConfig, spec: BroadcastSpec)``
returns a ready strategy (no setup phase): an object that puts :class:`~fedaqt.strategies.quantized.QuantizedMixin`
in front of a Flower Message-API strategy (``flwr.serverapp.strategy``), built with ``spec=spec, seed=config.seed``
(:func:`base_kwargs`). The mixin supplies the quantized broadcast, the per-round seeded node sampling and the mean
float update of the replies the round loop accepted; the Flower class supplies the server-side math (averaging,
server momentum, Adam/Yogi). ``StrategyPlugin.upload`` is the kind of client update the strategy needs
("gradient", "delta" or "" for either; preflight checks it against the client algorithm's ``upload``). An entry
point may also name such a class directly (see :func:`plugin_from_class`).

Built-ins, each checked against Flower's own strategy on float updates at ``--bits 32``
(``tests/test_strategies_flower.py``):

=========  ===================  ==============================================================================
name       Flower class         server step on the weighted mean client update ``u``
=========  ===================  ==============================================================================
fedsgd     FedAvgM              ``W - server_lr * m``, ``m = server_momentum * m + g`` (``g`` = mean gradient)
fedavg     FedAvg               ``W + u`` (the weighted mean of the client models)
fedavgm    FedAvgM              SGD with momentum on the pseudo-gradient ``-u`` (``--server-lr/--server-momentum``)
relay      FedAvgM              fedsgd with the gradient-relay correction of ``g`` (spec §2.3)
fedprox    FedProx              ``W + u``; clients add ``mu/2 ||w - W||^2`` (``options.proximal_mu``)
fedadam    FedAdam              Adam on ``u`` (eta = ``--server-lr``, ``options.beta_1/beta_2/tau``)
fedyogi    FedYogi              Yogi on ``u`` (eta = ``--server-lr``, ``options.beta_1/beta_2/tau``)
=========  ===================  ==============================================================================
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx, FedYogi
from pydantic import Field

from fedaqt.config import RunConfig
from fedaqt.protocol import BroadcastSpec
from fedaqt.options import BaseOptions, NoOptions, core_options, options_for
from fedaqt.strategies.quantized import QuantizedMixin
from fedaqt.strategies.relay import GradientRelayMixin


class QuantizedFedAvg(QuantizedMixin, FedAvg):
    """Plain FedAvg over the quantized broadcast: the new global model is the weighted mean of the client models."""


class QuantizedFedAvgM(QuantizedMixin, FedAvgM):
    """FedSGD / FedAvg / FedAvgM over the quantized broadcast: SGD (with momentum) on the mean update."""


class QuantizedRelay(GradientRelayMixin, QuantizedMixin, FedAvgM):
    """FedSGD with the gradient relay (spec §2.2 step 6): relayed FedSGD equals centralized QAT."""


class QuantizedFedProx(QuantizedMixin, FedProx):
    """FedProx: Flower's server side (FedAvg) + the proximal term ``mu/2 ||w - w_global||^2`` on clients."""


class QuantizedFedAdam(QuantizedMixin, FedAdam):
    """FedAdam (Reddi et al. 2021) with Flower's server-side Adam on the mean delta."""


class QuantizedFedYogi(QuantizedMixin, FedYogi):
    """FedYogi (Reddi et al. 2021) with Flower's server-side Yogi on the mean delta."""


def sampling_kwargs(cfg: RunConfig) -> dict[str, Any]:
    """Keyword arguments of every Flower strategy's constructor that make it sample ``clients_per_round`` of the
    ``num_clients`` nodes for training each round and skip federated evaluation (the server evaluates)."""
    k = cfg.clients_per_round
    return {
        "fraction_train": k / cfg.num_clients,
        "fraction_evaluate": 0.0,
        "min_train_nodes": k,
        "min_available_nodes": k,
    }


def base_kwargs(cfg: RunConfig, spec: BroadcastSpec) -> dict[str, Any]:
    """:func:`sampling_kwargs` + what :class:`QuantizedMixin` needs (``spec``, ``seed``, the core option
    ``server_lr_schedule`` as ``lr_schedule`` with ``total_rounds``): the keyword arguments
    every strategy built here starts from, ``cls(**base_kwargs(cfg, spec), **flower_hyperparameters)``."""
    schedule = core_options(cfg).server_lr_schedule
    return {**sampling_kwargs(cfg), "spec": spec, "seed": int(cfg.seed), "lr_schedule": schedule,
            "total_rounds": int(cfg.rounds)}


def _fedavgm(cfg: RunConfig, spec: BroadcastSpec) -> QuantizedFedAvgM:
    return QuantizedFedAvgM(**base_kwargs(cfg, spec), server_learning_rate=cfg.server_lr,
                            server_momentum=cfg.server_momentum)


class FedProxOptions(BaseOptions):
    """Options of the fedprox strategy."""

    proximal_mu: float = Field(0.01, ge=0, description="weight mu of the clients' proximal term mu/2 ||w - W||^2")


class FedOptOptions(BaseOptions):
    """Options of the fedadam / fedyogi strategies (Flower's FedOpt; eta = --server-lr, eta_l = --lr)."""

    tau: float = Field(1e-3, gt=0, description="adaptivity tau of the server optimizer (Flower default 1e-3)")
    beta_1: float = Field(0.9, ge=0, lt=1, description="first-moment decay of the server optimizer")
    beta_2: float = Field(0.99, ge=0, lt=1, description="second-moment decay of the server optimizer")


def _fedopt_kwargs(cfg: RunConfig, name: str = "fedadam") -> dict[str, Any]:
    """Flower FedOpt hyper-parameters: eta = server_lr, eta_l = lr; beta_1/beta_2/tau from the typed options
    (:class:`FedOptOptions`; defaults are Flower's FedAdam/FedYogi defaults)."""
    o = options_for(FedOptOptions, cfg.options, f"strategy {name}")
    return {"eta": cfg.server_lr, "eta_l": cfg.lr, "tau": o.tau, "beta_1": o.beta_1, "beta_2": o.beta_2}


def _fedprox(cfg: RunConfig, spec: BroadcastSpec) -> "QuantizedFedProx":
    mu = options_for(FedProxOptions, cfg.options, "strategy fedprox").proximal_mu
    return QuantizedFedProx(**base_kwargs(cfg, spec), proximal_mu=mu)


#: update kinds a strategy may need (``StrategyPlugin.upload``); "" accepts either
UPLOADS = ("gradient", "delta", "")
#: the old ``algorithm`` attribute of a strategy plugin -> its ``upload``
_LEGACY_ALGORITHM_UPLOAD = {"fedsgd": "gradient", "fedavg": "delta", "": ""}


@dataclass(frozen=True)
class StrategyPlugin:
    """A registered strategy.

    Attributes:
        factory: ``factory(config: RunConfig, spec: BroadcastSpec) -> strategy``, built complete (no setup phase).
        upload: the client update the strategy needs: "gradient" (FedSGD family), "delta" (FedAvg family) or ""
            (either).
        description: one line for ``fedaqt plugins list``.
        Options: the strategy's typed options (a pydantic model with ``extra="forbid"``, :mod:`fedaqt.options`); ``NoOptions`` when it has none.

    Raises:
        ValueError: ``upload`` is not one of :data:`UPLOADS`.
    """

    factory: Callable[[RunConfig, BroadcastSpec], Any]
    upload: str
    description: str
    Options: type = NoOptions

    def __post_init__(self) -> None:
        if self.upload not in UPLOADS:
            raise ValueError(f"StrategyPlugin.upload={self.upload!r} must be one of {UPLOADS}")


BUILTIN_STRATEGIES: dict[str, StrategyPlugin] = {
    "fedsgd": StrategyPlugin(_fedavgm, "gradient", "quantized FedSGD: mean client gradient, server SGD (--server-lr, --server-momentum)"),
    "fedavg": StrategyPlugin(
        lambda cfg, spec: QuantizedFedAvg(**base_kwargs(cfg, spec)),
        "delta",
        "quantized FedAvg: new model = weighted mean of client models (Flower FedAvg; fedavgm for server lr/momentum)",
    ),
    "fedavgm": StrategyPlugin(_fedavgm, "", "FedAvgM (Hsu et al. 2019) over the quantized broadcast (Flower FedAvgM)"),
    "relay": StrategyPlugin(
        lambda cfg, spec: QuantizedRelay(**base_kwargs(cfg, spec), server_learning_rate=cfg.server_lr,
                                         server_momentum=cfg.server_momentum),
        "gradient",
        "gradient relay: FedSGD + server-side scale-gradient correction = centralized QAT (spec §2.3)",
    ),
    "fedprox": StrategyPlugin(
        _fedprox,
        "delta",
        "FedProx (Li et al. 2020): proximal term on clients (options.proximal_mu), Flower FedProx server",
        FedProxOptions,
    ),
    "fedadam": StrategyPlugin(
        lambda cfg, spec: QuantizedFedAdam(**base_kwargs(cfg, spec), **_fedopt_kwargs(cfg, "fedadam")),
        "",
        "FedAdam (Reddi et al. 2021), Flower FedAdam server optimizer (eta = --server-lr)",
        FedOptOptions,
    ),
    "fedyogi": StrategyPlugin(
        lambda cfg, spec: QuantizedFedYogi(**base_kwargs(cfg, spec), **_fedopt_kwargs(cfg, "fedyogi")),
        "",
        "FedYogi (Reddi et al. 2021), Flower FedYogi server optimizer (eta = --server-lr)",
        FedOptOptions,
    ),
}


def _upload_of(obj: Any) -> str:
    """``obj.upload``, else the old ``obj.algorithm`` mapped ("fedsgd" -> "gradient", "fedavg" -> "delta"), else ""."""
    if getattr(obj, "upload", None) is not None:
        return str(obj.upload)
    legacy = str(getattr(obj, "algorithm", "") or "")
    if legacy not in _LEGACY_ALGORITHM_UPLOAD:
        raise ValueError(f"{obj!r}: algorithm={legacy!r} is not one of 'fedsgd', 'fedavg', '' (use upload=...)")
    return _LEGACY_ALGORITHM_UPLOAD[legacy]


def plugin_from_class(cls: type) -> StrategyPlugin:
    """A StrategyPlugin for a strategy class registered directly under ``fedaqt.strategies``.

    The class must subclass :class:`QuantizedMixin` (in front of a Flower strategy). It is built as
    ``cls(**base_kwargs(config, spec))``, or ``cls.from_config(config, spec)`` when it defines that classmethod
    (which must pass ``spec=spec, seed=config.seed`` on, e.g. through :func:`base_kwargs`). Its class attribute
    ``upload`` ("gradient", "delta" or "", default ""; an old ``algorithm`` = "fedsgd"/"fedavg" is mapped), its
    ``Options`` and the first line of its docstring (or ``description``) fill in the rest.

    Raises:
        TypeError: ``cls`` is not a QuantizedMixin subclass, or its ``from_config`` takes no ``spec`` (the old
            signature ``from_config(cls, cfg)``: the message says what to change).
    """
    if not (isinstance(cls, type) and issubclass(cls, QuantizedMixin)):
        raise TypeError(f"{cls!r} is not a subclass of fedaqt.strategies.quantized.QuantizedMixin")
    if hasattr(cls, "from_config"):
        params = list(inspect.signature(cls.from_config).parameters.values())
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if len(positional) < 2 and not any(p.kind == p.VAR_POSITIONAL for p in params):
            raise TypeError(
                f"{cls.__module__}.{cls.__qualname__}.from_config takes (cfg) only; since the one-message-contract change strategies are "
                "built complete: define from_config(cls, cfg, spec) and build with "
                "cls(**fedaqt.strategies.registry.base_kwargs(cfg, spec), ...)")
        factory = cls.from_config
    else:
        def factory(cfg: RunConfig, spec: BroadcastSpec) -> Any:
            return cls(**base_kwargs(cfg, spec))

    text = str(getattr(cls, "description", "") or cls.__doc__ or "").strip()
    return StrategyPlugin(factory, _upload_of(cls), text.splitlines()[0].strip() if text else cls.__name__,
                          getattr(cls, "Options", NoOptions))


def as_strategy_plugin(obj: Any) -> StrategyPlugin:
    """Normalize what a ``fedaqt.strategies`` entry point names: a StrategyPlugin is returned as is; any object
    with ``factory``, ``upload`` (or the old ``algorithm``) and ``description`` is converted; a QuantizedMixin
    subclass is wrapped (:func:`plugin_from_class`).

    Raises:
        TypeError: anything else.
    """
    if isinstance(obj, StrategyPlugin):
        return obj
    if isinstance(obj, type):
        return plugin_from_class(obj)
    if callable(getattr(obj, "factory", None)) and (hasattr(obj, "upload") or hasattr(obj, "algorithm")) \
            and hasattr(obj, "description"):
        return StrategyPlugin(obj.factory, _upload_of(obj), str(obj.description), getattr(obj, "Options", NoOptions))
    raise TypeError(f"{obj!r} is neither a StrategyPlugin nor a QuantizedMixin strategy class")


FEDSGD, FEDAVG, FEDAVGM, RELAY, FEDPROX, FEDADAM, FEDYOGI = (
    BUILTIN_STRATEGIES[n] for n in ("fedsgd", "fedavg", "fedavgm", "relay", "fedprox", "fedadam", "fedyogi")
)
