"""One typed run configuration: defaults < preset/config file < CLI flags, validated before any work starts.

Every field can be set in a TOML (or the JSON ``config.json`` a run writes) and on the command line. Validation
names the bad key and value and lists what is allowed; it runs before Ray starts.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib  # type: ignore[no-redef]

PRESET_DIR = Path(__file__).parent / "presets"

ALLOWED_BITS = (32, 8, 4)
ALLOWED_UPLINK_BITS = (32, 16, 8)
ALLOWED_GRANULARITY = ("tensor", "channel")
ALLOWED_ALGORITHMS = ("fedsgd", "fedavg")
ALLOWED_PARTITIONS = ("iid", "dirichlet", "speaker")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key, the value and what is allowed."""


@dataclass
class RunConfig:
    """Resolved configuration of one federated run.

    Units: ``lr``/``server_lr`` are SGD step sizes; ``num_cpus`` counts CPU cores given to Ray;
    ``client_num_cpus`` cores per simulated client (concurrency = num_cpus / client_num_cpus).
    """

    workload: str = "asr"
    strategy: str = "fedsgd"
    bits: int = 8
    granularity: str = "tensor"
    algorithm: str = "fedsgd"
    uplink_bits: int = 32
    num_clients: int = 32
    clients_per_round: int = 8
    rounds: int = 150
    local_steps: int = 1
    batch_size: int = 8
    lr: float = 0.05
    server_lr: float = 0.05
    server_momentum: float = 0.9
    seed: int = 0
    out: str = "runs/latest"
    checkpointing: bool = True
    num_cpus: int = 2
    client_num_cpus: float = 1.0
    eval_every: int = 25
    data_dir: str = "data/speech"
    model_size: str = "tiny"
    real_eval: bool = True
    real_eval_max: int = 120
    partition: str = "speaker"
    alpha: float = 0.5
    ray_address: str = ""
    device_profile: str = ""
    options: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ construction
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_mapping(cls, values: dict[str, Any], source: str = "config") -> "RunConfig":
        """Build from a flat mapping; unknown keys raise ConfigError naming them and the ``source``."""
        known = set(cls.field_names())
        unknown = sorted(k for k in values if k.replace("-", "_") not in known)
        if unknown:
            raise ConfigError(
                f"unknown key(s) {unknown} in {source}; allowed keys: {', '.join(sorted(known))}"
            )
        cfg = cls()
        return cfg.override({k.replace("-", "_"): v for k, v in values.items()})

    def override(self, values: dict[str, Any]) -> "RunConfig":
        """Return a copy with ``values`` (None means 'not given') applied, coerced to the field types."""
        types = {f.name: f.type for f in fields(self)}
        current = dataclasses.asdict(self)
        for key, value in values.items():
            if value is None:
                continue
            if key not in types:
                raise ConfigError(f"unknown key {key!r}")
            current[key] = _coerce(key, value, getattr(self, key))
        return RunConfig(**current)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))

    # ------------------------------------------------------------------ validation
    def validate(self, known_workloads: list[str] | None = None, known_strategies: list[str] | None = None) -> "RunConfig":
        """Check every value; raise ConfigError naming the first bad key, its value and the allowed values."""
        _choice("bits", self.bits, ALLOWED_BITS)
        _choice("uplink_bits", self.uplink_bits, ALLOWED_UPLINK_BITS)
        _choice("granularity", self.granularity, ALLOWED_GRANULARITY)
        _choice("algorithm", self.algorithm, ALLOWED_ALGORITHMS)
        _choice("partition", self.partition, ALLOWED_PARTITIONS)
        if known_workloads is not None:
            _choice("workload", self.workload, tuple(known_workloads))
        if known_strategies is not None:
            _choice("strategy", self.strategy, tuple(known_strategies))
        for key in ("num_clients", "clients_per_round", "rounds", "local_steps", "batch_size", "num_cpus", "eval_every"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key} must be a positive integer, got {getattr(self, key)!r}")
        for key in ("lr", "server_lr", "client_num_cpus", "alpha"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"{key} must be > 0, got {getattr(self, key)!r}")
        if not 0.0 <= self.server_momentum < 1.0:
            raise ConfigError(f"server_momentum must be in [0, 1), got {self.server_momentum!r}")
        if self.clients_per_round > self.num_clients:
            raise ConfigError(
                f"clients_per_round={self.clients_per_round} exceeds num_clients={self.num_clients}"
            )
        if self.client_num_cpus > self.num_cpus and not self.ray_address:
            raise ConfigError(
                f"client_num_cpus={self.client_num_cpus} exceeds num_cpus={self.num_cpus}: no client could be scheduled"
            )
        if self.algorithm == "fedsgd" and self.local_steps != 1:
            raise ConfigError(f"local_steps={self.local_steps} is only meaningful with algorithm=fedavg; FedSGD uses one batch")
        return self


def _choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of: {', '.join(map(str, allowed))}")


def _coerce(key: str, value: Any, default: Any) -> Any:
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                low = value.strip().lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, dict):
            if not isinstance(value, dict):
                raise ValueError(value)
            return dict(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r} has the wrong type; expected {type(default).__name__}") from None


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a ``.toml`` or ``.json`` configuration file into a flat mapping.

    Raises:
        ConfigError: the file is missing or cannot be parsed.
    """
    p = Path(path)
    if p.is_dir() and (p / "config.json").exists():
        p = p / "config.json"
    if not p.exists():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        if p.suffix == ".json":
            data = json.loads(p.read_text())
        else:
            data = tomllib.loads(p.read_text())
    except Exception as exc:  # noqa: BLE001 - report any parse error with the file name
        raise ConfigError(f"cannot parse {str(p)!r}: {exc}") from exc
    if "run" in data and isinstance(data["run"], dict) and len(data) == 1:
        data = data["run"]
    return data


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def resolve_config(preset: str | None, config_file: str | None, cli: dict[str, Any]) -> RunConfig:
    """defaults < preset < config file < CLI flags (None = flag not given)."""
    values: dict[str, Any] = {}
    if preset:
        path = PRESET_DIR / f"{preset}.toml"
        if not path.exists():
            raise ConfigError(f"preset {preset!r} does not exist; known presets: {', '.join(list_presets())}")
        values.update(load_config_file(path))
    if config_file:
        values.update(load_config_file(config_file))
    cfg = RunConfig.from_mapping(values, source=config_file or f"preset {preset}")
    return cfg.override({k: v for k, v in cli.items() if v is not None})
