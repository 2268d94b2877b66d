"""The Flower app of fedaqt: the ``[tool.flwr.app.components]`` of ``pyproject.toml``.

``flwr run . CONNECTION`` (Flower 1.42) builds a FAB of the ``fedaqt`` package, sends it to the SuperLink of the
connection, which starts :data:`server_app` (``flwr-serverapp``) and has every SuperNode start :data:`client_app`
(``flwr-clientapp``) in processes of their own. The same objects run under ``fedaqt run``:
:data:`client_app` *is* :data:`fedaqt.client.app.app` (what ``run_simulation`` gets) and :data:`server_app`'s
``main`` goes through :func:`fedaqt.launch.runner.serve`, the code ``fedaqt run``'s ServerApp runs
(:func:`fedaqt.server.app.make_server_app` -> :class:`fedaqt.server.app.Server` ``.run_rounds``).

Run config (``[tool.flwr.app.config]``, overridden by ``flwr run --run-config 'KEY=VALUE ...'``): every field of
:class:`fedaqt.config.RunConfig` under its own name (``num_clients``, ``uplink_bits``, ...), plus

* ``preset`` / ``config``: a named preset or a TOML/JSON file (``fedaqt run --preset`` / ``--config``); when one is
  given, only keys whose value differs from RunConfig's default override it (a Flower run config always holds
  every key, so "not given" cannot be told apart from "given at the default");
* ``options``: ``"KEY=VALUE KEY=VALUE"`` (space separated; each VALUE parsed as JSON when it parses, else a
  string), the ``-o KEY=VALUE`` options of ``fedaqt run``.

The resolved configuration is checked by :func:`fedaqt.launch.runner.preflight` (the same checks as ``fedaqt
run``) before the run directory is touched: a bad key or value fails the Flower run with the ConfigError's
message. ``out`` and file paths (``data_dir``, ``device_trace``) are resolved by the ServerApp process, whose working
directory is the SuperLink's: pass absolute paths.

Data partitions: the server assigns each sampled node the partition it trains on (``partition-id`` in the train
config, a function of ``(seed, round)``, see :func:`fedaqt.server.app.sample_partitions`); a SuperNode's node config
``partition-id`` is the fallback when a message names none (``flower-supernode --node-config 'partition-id=0
num-partitions=2'``).
"""

from __future__ import annotations

import json
import shlex
from typing import Any, Mapping

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedaqt.client.app import app as client_app
from fedaqt.config import ConfigError, RunConfig, resolve_config

#: run-config keys that are not RunConfig fields
EXTRA_KEYS = ("preset", "config", "options")

__all__ = ["client_app", "server_app", "config_from_run_config", "parse_options"]


def parse_options(text: str) -> dict[str, Any]:
    """``"KEY=VALUE KEY=VALUE"`` -> ``{KEY: VALUE}`` (shell-style quoting; VALUE as JSON when it parses).

    Raises:
        ConfigError: an item without ``=`` (naming it), or unbalanced quotes.
    """
    try:
        items = shlex.split(str(text or ""))
    except ValueError as exc:
        raise ConfigError(f"run config options={text!r}: {exc}") from None
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"run config options: {item!r} must be KEY=VALUE (options = \"KEY=VALUE KEY=VALUE\")")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


def config_from_run_config(run_config: Mapping[str, Any]) -> RunConfig:
    """The :class:`RunConfig` of a Flower run config (``context.run_config``; module docstring for the keys).

    Raises:
        ConfigError: an unknown key (naming it and the allowed keys), a value of the wrong type, a bad preset or
            config file, or a bad ``options`` string. Range checks are :func:`fedaqt.launch.runner.preflight`'s.
    """
    values = {str(k).replace("-", "_"): v for k, v in dict(run_config).items()}
    known = set(RunConfig.field_names()) | set(EXTRA_KEYS)
    unknown = sorted(k for k in values if k not in known)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in the Flower run config; allowed keys: {', '.join(sorted(known))}")
    preset = str(values.pop("preset", "") or "") or None
    config_file = str(values.pop("config", "") or "") or None
    opts = parse_options(values.pop("options", ""))
    if preset or config_file:
        defaults = RunConfig().to_dict()
        values = {k: v for k, v in values.items() if v != defaults.get(k)}
    cfg = resolve_config(preset, config_file, values)
    if opts:
        cfg = cfg.override({"options": {**cfg.options, **opts}}, source="the Flower run config's options")
    return cfg


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """Resolve and check the run config, then run every round on ``grid`` (the SuperLink's nodes)."""
    from fedaqt.launch.runner import preflight, serve

    config = preflight(config_from_run_config(context.run_config))
    serve(config, grid)
