"""Strategy registry: built-ins and third-party plugins from the ``fedaqt.strategies`` entry-point group.

A registered strategy is a *factory* ``(config: RunConfig) -> QuantizedMixin & flwr Strategy``. Built-ins wrap
Flower's own classes (``flwr.serverapp.strategy``) so the server-side math is Flower's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from flwr.serverapp.strategy import FedAdam, FedAvgM, FedProx, FedYogi

from fedaqt.config import RunConfig
from fedaqt.strategies.quantized import QuantizedMixin
from fedaqt.strategies.relay import GradientRelayMixin


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


def _sampling(cfg: RunConfig) -> dict[str, Any]:
    k = cfg.clients_per_round
    return {
        "fraction_train": k / cfg.num_clients,
        "fraction_evaluate": 0.0,
        "min_train_nodes": k,
        "min_available_nodes": k,
    }


def _fedavgm(cfg: RunConfig, momentum: float | None = None) -> QuantizedFedAvgM:
    return QuantizedFedAvgM(
        **_sampling(cfg),
        server_learning_rate=cfg.server_lr,
        server_momentum=cfg.server_momentum if momentum is None else momentum,
    )


@dataclass(frozen=True)
class StrategyPlugin:
    """A registered strategy: ``factory(config)`` builds it; ``algorithm`` is the client algorithm it needs
    ("fedsgd", "fedavg" or "" for either); ``description`` is one line for ``fedaqt plugins list``."""

    factory: Callable[[RunConfig], Any]
    algorithm: str
    description: str


BUILTIN_STRATEGIES: dict[str, StrategyPlugin] = {
    "fedsgd": StrategyPlugin(_fedavgm, "fedsgd", "quantized FedSGD: mean client gradient, server SGD (--server-lr, --server-momentum)"),
    "fedavg": StrategyPlugin(_fedavgm, "fedavg", "quantized FedAvg: mean client delta, server SGD (server_lr 1, momentum 0 = plain FedAvg)"),
    "fedavgm": StrategyPlugin(_fedavgm, "", "FedAvgM (Hsu et al. 2019) over the quantized broadcast (Flower FedAvgM)"),
    "relay": StrategyPlugin(
        lambda cfg: QuantizedRelay(**_sampling(cfg), server_learning_rate=cfg.server_lr, server_momentum=cfg.server_momentum),
        "fedsgd",
        "gradient relay: FedSGD + server-side scale-gradient correction = centralized QAT (spec §2.3)",
    ),
    "fedprox": StrategyPlugin(
        lambda cfg: QuantizedFedProx(**_sampling(cfg), proximal_mu=float(cfg.options.get("proximal_mu", 0.01))),
        "fedavg",
        "FedProx (Li et al. 2020): proximal term on clients (options.proximal_mu), Flower FedProx server",
    ),
    "fedadam": StrategyPlugin(
        lambda cfg: QuantizedFedAdam(**_sampling(cfg), eta=cfg.server_lr, eta_l=cfg.lr, tau=float(cfg.options.get("tau", 1e-3))),
        "",
        "FedAdam (Reddi et al. 2021), Flower FedAdam server optimizer (eta = --server-lr)",
    ),
    "fedyogi": StrategyPlugin(
        lambda cfg: QuantizedFedYogi(**_sampling(cfg), eta=cfg.server_lr, eta_l=cfg.lr, tau=float(cfg.options.get("tau", 1e-3))),
        "",
        "FedYogi (Reddi et al. 2021), Flower FedYogi server optimizer (eta = --server-lr)",
    ),
}

FEDSGD, FEDAVG, FEDAVGM, RELAY, FEDPROX, FEDADAM, FEDYOGI = (
    BUILTIN_STRATEGIES[n] for n in ("fedsgd", "fedavg", "fedavgm", "relay", "fedprox", "fedadam", "fedyogi")
)
