"""Strategy registry: built-ins and third-party plugins from the ``fedaqt.strategies`` entry-point group.

A registered strategy is a :class:`StrategyPlugin` whose ``factory(config: RunConfig)`` returns an object that
puts :class:`~fedaqt.strategies.quantized.QuantizedMixin` in front of a Flower Message-API strategy
(``flwr.serverapp.strategy``). The mixin supplies the quantized broadcast, the per-round seeded client sampling,
reply validation and the mean float update; the Flower class supplies the server-side math (averaging, server
momentum, Adam/Yogi). An entry point may also name such a class directly (see :func:`plugin_from_class`).

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

from dataclasses import dataclass
from typing import Any, Callable

from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx, FedYogi
from pydantic import Field

from fedaqt.config import RunConfig
from fedaqt.options import BaseOptions, NoOptions, options_for
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


def _fedavgm(cfg: RunConfig) -> QuantizedFedAvgM:
    return QuantizedFedAvgM(**sampling_kwargs(cfg), server_learning_rate=cfg.server_lr, server_momentum=cfg.server_momentum)


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


def _fedprox(cfg: RunConfig) -> "QuantizedFedProx":
    mu = options_for(FedProxOptions, cfg.options, "strategy fedprox").proximal_mu
    return QuantizedFedProx(**sampling_kwargs(cfg), proximal_mu=mu)


@dataclass(frozen=True)
class StrategyPlugin:
    """A registered strategy: ``factory(config)`` builds it; ``algorithm`` is the client algorithm it needs
    ("fedsgd", "fedavg" or "" for either); ``description`` is one line for ``fedaqt plugins list``; ``Options``
    its typed ``-o`` options (a pydantic model, see :mod:`fedaqt.options`; default none)."""

    factory: Callable[[RunConfig], Any]
    algorithm: str
    description: str
    Options: type = NoOptions


BUILTIN_STRATEGIES: dict[str, StrategyPlugin] = {
    "fedsgd": StrategyPlugin(_fedavgm, "fedsgd", "quantized FedSGD: mean client gradient, server SGD (--server-lr, --server-momentum)"),
    "fedavg": StrategyPlugin(
        lambda cfg: QuantizedFedAvg(**sampling_kwargs(cfg)),
        "fedavg",
        "quantized FedAvg: new model = weighted mean of client models (Flower FedAvg; fedavgm for server lr/momentum)",
    ),
    "fedavgm": StrategyPlugin(_fedavgm, "", "FedAvgM (Hsu et al. 2019) over the quantized broadcast (Flower FedAvgM)"),
    "relay": StrategyPlugin(
        lambda cfg: QuantizedRelay(**sampling_kwargs(cfg), server_learning_rate=cfg.server_lr, server_momentum=cfg.server_momentum),
        "fedsgd",
        "gradient relay: FedSGD + server-side scale-gradient correction = centralized QAT (spec §2.3)",
    ),
    "fedprox": StrategyPlugin(
        _fedprox,
        "fedavg",
        "FedProx (Li et al. 2020): proximal term on clients (options.proximal_mu), Flower FedProx server",
        FedProxOptions,
    ),
    "fedadam": StrategyPlugin(
        lambda cfg: QuantizedFedAdam(**sampling_kwargs(cfg), **_fedopt_kwargs(cfg, "fedadam")),
        "",
        "FedAdam (Reddi et al. 2021), Flower FedAdam server optimizer (eta = --server-lr)",
        FedOptOptions,
    ),
    "fedyogi": StrategyPlugin(
        lambda cfg: QuantizedFedYogi(**sampling_kwargs(cfg), **_fedopt_kwargs(cfg, "fedyogi")),
        "",
        "FedYogi (Reddi et al. 2021), Flower FedYogi server optimizer (eta = --server-lr)",
        FedOptOptions,
    ),
}


def plugin_from_class(cls: type) -> StrategyPlugin:
    """A StrategyPlugin for a strategy class registered directly under ``fedaqt.strategies``.

    The class must subclass :class:`QuantizedMixin` (in front of a Flower strategy). It is built as
    ``cls(**sampling_kwargs(config))``, or ``cls.from_config(config)`` when it defines that classmethod. Its
    class attribute ``algorithm`` ("fedsgd", "fedavg" or "", default "") and the first line of its docstring (or
    ``description``) fill in the rest.

    Raises:
        TypeError: ``cls`` is not a QuantizedMixin subclass.
    """
    if not (isinstance(cls, type) and issubclass(cls, QuantizedMixin)):
        raise TypeError(f"{cls!r} is not a subclass of fedaqt.strategies.quantized.QuantizedMixin")
    if hasattr(cls, "from_config"):
        factory = cls.from_config
    else:
        def factory(cfg: RunConfig) -> Any:
            return cls(**sampling_kwargs(cfg))

    text = str(getattr(cls, "description", "") or cls.__doc__ or "").strip()
    return StrategyPlugin(factory, str(getattr(cls, "algorithm", "")), text.splitlines()[0].strip() if text else cls.__name__,
                          getattr(cls, "Options", NoOptions))


def as_strategy_plugin(obj: Any) -> StrategyPlugin:
    """Normalize what a ``fedaqt.strategies`` entry point names: a StrategyPlugin (or any object with
    ``factory``, ``algorithm`` and ``description``) is returned as is; a QuantizedMixin subclass is wrapped.

    Raises:
        TypeError: anything else.
    """
    if isinstance(obj, StrategyPlugin):
        return obj
    if isinstance(obj, type):
        return plugin_from_class(obj)
    if callable(getattr(obj, "factory", None)) and hasattr(obj, "algorithm") and hasattr(obj, "description"):
        return StrategyPlugin(obj.factory, str(obj.algorithm), str(obj.description), getattr(obj, "Options", NoOptions))
    raise TypeError(f"{obj!r} is neither a StrategyPlugin nor a QuantizedMixin strategy class")


FEDSGD, FEDAVG, FEDAVGM, RELAY, FEDPROX, FEDADAM, FEDYOGI = (
    BUILTIN_STRATEGIES[n] for n in ("fedsgd", "fedavg", "fedavgm", "relay", "fedprox", "fedadam", "fedyogi")
)
