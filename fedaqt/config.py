"""One typed run configuration: defaults < preset/config file < CLI flags, validated before any work starts.

Every field can be set in a TOML (or the JSON ``config.json`` a run writes) and on the command line. Validation
names the bad key and value and lists what is allowed; it runs before Ray starts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib  # type: ignore[no-redef]

PRESET_DIR = Path(__file__).parent / "presets"

ALLOWED_BITS = (32, 8, 4)
ALLOWED_UPLINK_BITS = (32, 16, 8, 4)
ALLOWED_GRANULARITY = ("tensor", "channel")

#: keys that ``fedaqt run --resume RUN_DIR`` lets the command line change: where and with how many cores the run
#: executes. Every other key changes what is computed, so a resumed run refuses a different value for it.
RESUME_OVERRIDABLE = ("num_cpus", "client_num_cpus", "ray_address")

#: largest ``seed``: torch.manual_seed takes up to 2**64 - 1, numpy's SeedSequence any non-negative integer
MAX_SEED = 2**63 - 1


#: settings that were ``RunConfig`` fields before workload options were typed (ASR / partitioning settings) and
#: their old defaults. A config file, preset or an old run's ``config.json`` holding them at top level is migrated
#: into ``options`` (:func:`migrate_legacy`); ``fedaqt run --data-dir`` etc. remain as shortcuts that set the option.
LEGACY_OPTION_KEYS: dict[str, Any] = {
    "data_dir": "data/speech",
    "model_size": "tiny",
    "real_eval": True,
    "real_eval_max": 120,
    "partition": "speaker",
    "alpha": 0.5,
}

log = logging.getLogger("fedaqt.config")


def migrate_legacy(values: dict[str, Any], source: str = "config", workload: str | None = None) -> dict[str, Any]:
    """Move the :data:`LEGACY_OPTION_KEYS` of a flat configuration mapping into its ``options`` table.

    A key equal to its old default is dropped (the workload's option has the same default, so the run is the
    same); another value becomes ``options[key]`` (an explicit ``options`` entry wins), checked later with every
    option by :func:`fedaqt.plugins.check_options` (a workload that does not declare it refuses it, naming the
    key). The move is logged once at INFO. Mappings without legacy keys are returned unchanged (a copy).

    Args:
        values: flat mapping (``config.json``, a TOML table, keys with ``-`` or ``_``).
        source: where it came from, for the log and errors.
        workload: the workload the values are for (default: ``values["workload"]``, else ``"asr"``).

    Raises:
        ConfigError: a value of the wrong type for the old field (naming the key and ``source``), or ``options``
            is not a table while a value must move into it.
    """
    values = {k.replace("-", "_"): v for k, v in values.items()}
    legacy = {k: values.pop(k) for k in list(values) if k in LEGACY_OPTION_KEYS}
    if not legacy:
        return values
    name = str(workload or values.get("workload") or RunConfig.workload)
    options = values.get("options", {})
    options = dict(options) if isinstance(options, dict) else options
    moved = {}
    for key, value in legacy.items():
        default = LEGACY_OPTION_KEYS[key]
        # the old field's type check (naming the key and the file); the workload's Options checks the range later
        value = _coerce(key, value, default, f" in {source}")
        if value == default and type(value) is type(default):
            continue
        moved[key] = value
    if moved and not isinstance(options, dict):
        raise ConfigError(f"options must be a table of KEY = VALUE, got {options!r} in {source}")
    for key, value in moved.items():
        options.setdefault(key, value)
    if moved or "options" in values:
        values["options"] = options
    log.info("%s: top-level key(s) %s are options of workload %s now; moved into options: %s", source,
             ", ".join(legacy), name, moved or "none (old defaults)")
    return values


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key, the value and what is allowed."""


@dataclass
class RunConfig:
    """Resolved configuration of one federated run.

    Units: ``lr``/``server_lr`` are SGD step sizes; ``num_cpus`` counts CPU cores given to Ray;
    ``client_num_cpus`` cores per simulated client (concurrency = num_cpus / client_num_cpus).

    ``options`` is the flat ``-o KEY=VALUE`` table; its keys are declared, typed and checked by the core, the
    workload, the strategy and the client algorithm (:mod:`fedaqt.options`; ``fedaqt plugins show NAME``).
    Dataset and model settings of one workload (ASR's ``data_dir``, ``model_size``, ``real_eval``, ...; the
    image workloads' ``partition``/``alpha``) are that workload's options, not fields here.
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
    eval_every: int = 0  # 0 = the workload's default (Workload.default_eval_every)
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
        unknown = sorted(k for k in values if k.replace("-", "_") not in known | set(LEGACY_OPTION_KEYS))
        if unknown:
            raise ConfigError(
                f"unknown key(s) {unknown} in {source}; allowed keys: {', '.join(sorted(known))}"
            )
        cfg = cls()
        return cfg.override({k.replace("-", "_"): v for k, v in values.items()}, source=source)

    def override(self, values: dict[str, Any], source: str = "") -> "RunConfig":
        """Return a copy with ``values`` (None means 'not given') applied, coerced to the field types.

        Raises:
            ConfigError: an unknown key or a value of the wrong type (the message names the key and ``source``).
        """
        types = {f.name: f.type for f in fields(self)}
        current = dataclasses.asdict(self)
        where = f" in {source}" if source else ""
        legacy = {k: v for k, v in values.items() if k in LEGACY_OPTION_KEYS and v is not None}
        if legacy:  # settings that are workload options now (old config.json, preset, file)
            values = {k: v for k, v in values.items() if k not in LEGACY_OPTION_KEYS}
            base = values.get("options") if values.get("options") is not None else self.options
            moved = migrate_legacy({**legacy, "options": base}, source=source or "config",
                                   workload=values.get("workload") or self.workload)
            values["options"] = moved["options"]
        for key, value in values.items():
            if value is None:
                continue
            if key not in types:
                raise ConfigError(f"unknown key {key!r}{where}; allowed keys: {', '.join(sorted(types))}")
            current[key] = _coerce(key, value, getattr(self, key), where)
        return RunConfig(**current)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Write the configuration as JSON atomically (``fedaqt run --config PATH`` reads it back)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))
        os.replace(tmp, path)

    # ------------------------------------------------------------------ validation
    def validate(self, known_workloads: list[str] | None = None, known_strategies: list[str] | None = None,
                 known_algorithms: list[str] | None = None) -> "RunConfig":
        """Check every value; raise ConfigError naming the first bad key, its value and the allowed values.

        ``known_*`` (registered plugin names) check ``workload``/``strategy``/``algorithm`` when given; what an
        algorithm requires of the rest (FedSGD: ``local_steps == 1``) is its own ``validate`` (preflight)."""
        _choice("bits", self.bits, ALLOWED_BITS)
        _choice("uplink_bits", self.uplink_bits, ALLOWED_UPLINK_BITS)
        _choice("granularity", self.granularity, ALLOWED_GRANULARITY)
        if known_workloads is not None:
            _choice("workload", self.workload, tuple(known_workloads))
        if known_strategies is not None:
            _choice("strategy", self.strategy, tuple(known_strategies))
        if known_algorithms is not None:
            _choice("algorithm", self.algorithm, tuple(known_algorithms))
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"seed must be an integer in [0, 2**63 - 1], got {self.seed!r}")
        if not isinstance(self.options, dict):
            raise ConfigError(f"options must be a table of KEY = VALUE, got {self.options!r}")
        _check_out(self.out)
        if self.eval_every < 0:
            raise ConfigError(f"eval_every must be >= 0 (0 = the workload's default), got {self.eval_every!r}")
        for key in ("num_clients", "clients_per_round", "rounds", "local_steps", "batch_size", "num_cpus"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key} must be a positive integer, got {getattr(self, key)!r}")
        for key in ("lr", "server_lr", "client_num_cpus"):
            value = getattr(self, key)
            if not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"{key} must be a finite number > 0, got {value!r}")
        if self.ray_address and ":" not in self.ray_address and self.ray_address != "auto":
            raise ConfigError(
                f"ray_address={self.ray_address!r} must be HOST:PORT of a running Ray head (e.g. 127.0.0.1:6379) or 'auto'"
            )
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
        return self


def _check_out(out: str) -> None:
    """``out`` must name a directory (existing or to be created): no existing part of it may be a file."""
    if not out:
        raise ConfigError("out must name a run directory, got ''")
    p = Path(out).expanduser()
    for part in (p, *p.parents):
        if part.exists():
            if not part.is_dir():
                what = "is a file" if part == p else f"lies under {str(part)!r}, which is a file"
                raise ConfigError(f"out={out!r} {what}; --out must name a run directory")
            return


def _choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of: {', '.join(map(str, allowed))}")


def _coerce(key: str, value: Any, default: Any, where: str = "") -> Any:
    """``value`` converted to the type of ``default``; strings from the command line are parsed.

    Booleans accept true/false (also 1/0, yes/no, on/off); integers reject fractions and booleans; strings reject
    numbers, lists and tables (a TOML ``workload = 5`` is an error, not ``"5"``).
    """
    try:
        if isinstance(default, bool):
            if isinstance(value, bool):
                return value
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            if isinstance(value, str):
                low = value.strip().lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
            raise ValueError(value)
        if isinstance(default, int):
            if isinstance(value, bool):
                raise ValueError(value)
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            if isinstance(value, (dict, list)):
                raise ValueError(value)
            return int(value)
        if isinstance(default, float):
            if isinstance(value, (bool, dict, list)):
                raise ValueError(value)
            return float(value)
        if isinstance(default, dict):
            if not isinstance(value, dict):
                raise ValueError(value)
            return dict(value)
        if not isinstance(value, str):
            raise ValueError(value)
        return value
    except (TypeError, ValueError):
        raise ConfigError(
            f"{key}={value!r}{where} has the wrong type; expected {type(default).__name__}"
        ) from None


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
    if not isinstance(data, dict):
        raise ConfigError(f"{str(p)!r} must hold a table/object of configuration keys, got {type(data).__name__}")
    if isinstance(data.get("run"), dict):  # keys may sit under a [run] table, next to [options]
        run = dict(data.pop("run"))
        if "options" in run and "options" in data:
            run["options"] = {**data.pop("options"), **run["options"]}
        data = {**data, **run}
    return data


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def preset_path(name: str) -> Path:
    """The file of preset ``name``. Raises ConfigError listing the known presets."""
    path = PRESET_DIR / f"{name}.toml"
    if not path.exists():
        raise ConfigError(f"preset {name!r} does not exist; known presets: {', '.join(list_presets())}")
    return path


def resolve_config(preset: str | None, config_file: str | None, cli: dict[str, Any]) -> RunConfig:
    """defaults < preset < config file < CLI flags (None = flag not given).

    Each layer is checked on its own, so an error names the file (or preset) that holds the bad key. The
    ``options`` tables of the preset and the file are merged key by key (the file wins).

    Raises:
        ConfigError: unknown preset, missing/unparsable file, unknown key or wrong type.
    """
    cfg = RunConfig()
    layers: list[tuple[str, dict[str, Any]]] = []
    if preset:
        layers.append((f"preset {preset!r}", load_config_file(preset_path(preset))))
    if config_file:
        layers.append((str(config_file), load_config_file(config_file)))
    for source, values in layers:
        # top-level settings that are workload options now move into this layer's options (logged once)
        values = migrate_legacy(values, source=source, workload=values.get("workload") or cfg.workload)
        RunConfig.from_mapping(values, source=source)  # unknown keys / types, naming this source
        if "options" in values and isinstance(values["options"], dict):
            values["options"] = {**cfg.options, **values["options"]}
        cfg = cfg.override(values, source=source)
    given = {k: v for k, v in cli.items() if v is not None}
    if isinstance(given.get("options"), dict):  # merged key by key like the file layers (the command line wins)
        given["options"] = {**cfg.options, **given["options"]}
    return cfg.override(given, source="command-line options")


def explicit_keys(preset: str | None, config_file: str | None, cli: dict[str, Any]) -> tuple[set[str], set[str]]:
    """The run keys and the option keys that the preset, the config file or the command line set.

    ``cli`` is the same mapping :func:`resolve_config` takes (None = flag not given; its ``options`` the ``-o``
    table). Legacy top-level keys count as the options they became (:func:`migrate_legacy`). Used to apply
    defaults that depend on the resolved run (e.g. the fine-tuning recipe of a run that starts from a pretrained
    checkpoint) only where nobody chose a value.

    Raises:
        ConfigError: unknown preset, missing/unparsable file (as :func:`resolve_config`).
    """
    run_keys: set[str] = set()
    option_keys: set[str] = set()
    layers = [load_config_file(preset_path(preset))] if preset else []
    if config_file:
        layers.append(load_config_file(config_file))
    layers.append({k: v for k, v in cli.items() if v is not None})
    for values in layers:
        values = {k.replace("-", "_"): v for k, v in values.items()}
        option_keys |= {k for k in values if k in LEGACY_OPTION_KEYS}
        options = values.get("options")
        if isinstance(options, dict):
            option_keys |= {str(k).replace("-", "_") for k in options}
        run_keys |= {k for k in values if k not in LEGACY_OPTION_KEYS and k != "options"}
    return run_keys, option_keys


def resolve_resume_config(run_dir: str | Path, cli: dict[str, Any]) -> RunConfig:
    """The configuration of the run in ``run_dir`` (its ``config.json``) for ``fedaqt run --resume RUN_DIR``.

    ``out`` becomes ``run_dir`` (the directory may have moved). Command-line values may change only
    :data:`RESUME_OVERRIDABLE` keys; a different value for any other key is refused, since the resumed run would
    no longer continue the same computation (an equal value is accepted).

    Raises:
        ConfigError: ``run_dir`` has no ``config.json``, or a refused override (the message names the key).
    """
    path = Path(run_dir) / "config.json"
    if not path.exists():
        raise ConfigError(f"cannot resume: {str(path)!r} does not exist (is {str(run_dir)!r} a run directory?)")
    cfg = RunConfig.from_mapping(load_config_file(path), source=str(path))
    out = cli.get("out")
    if out is not None and Path(out).resolve() != Path(run_dir).resolve():
        raise ConfigError(f"--resume {str(run_dir)!r} writes into that run directory; --out {out!r} would differ")
    given = {k: v for k, v in cli.items() if v is not None and k != "out"}
    probe = cfg.override(given, source="command-line options")
    changed = sorted(k for k in given if getattr(probe, k) != getattr(cfg, k) and k not in RESUME_OVERRIDABLE)
    if changed:
        detail = ", ".join(f"{k}={getattr(probe, k)!r} (run has {getattr(cfg, k)!r})" for k in changed)
        raise ConfigError(
            f"--resume continues the run in {str(run_dir)!r} with its own configuration; cannot change {detail}. "
            f"Only {', '.join(RESUME_OVERRIDABLE)} may differ; start a new run (--config {path} --out NEW_DIR) instead"
        )
    return probe.override({"out": str(run_dir)})
