"""The experiment config as the Flower apps receive it, through Flower's run config.

Flower's run config holds TOML scalars only, so the whole resolved Hydra config travels as one
JSON string (`fedpriv-config`, written by the `fedpriv` CLI). A plain `flwr run .` leaves it empty;
the apps then compose `conf/` themselves, applying the Hydra overrides in `overrides`
(e.g. `flwr run . --run-config 'overrides="strategy=sequential privacy.epsilon=1"'`).
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from omegaconf import OmegaConf

from fedpriv.config import FedprivConfig, register_configs, to_config

CONFIG_KEY, OVERRIDES_KEY, RUN_DIR_KEY = "fedpriv-config", "overrides", "run-dir"


def config_to_json(cfg: FedprivConfig) -> str:
    return json.dumps(asdict(cfg), sort_keys=True)


def compose_config(overrides: list[str]) -> FedprivConfig:
    """Compose conf/ with Hydra overrides, as the `fedpriv` CLI would (without running it)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from fedpriv.cli.main import config_dir

    register_configs()
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return to_config(compose("config", overrides=overrides))


def config_from_run_config(run_config: Mapping[str, Any]) -> FedprivConfig:
    """The experiment config carried by a Flower run config (see the module docstring)."""
    payload = str(run_config.get(CONFIG_KEY, "") or "")
    if payload:
        return to_config(OmegaConf.create(json.loads(payload)))
    return compose_config(shlex.split(str(run_config.get(OVERRIDES_KEY, "") or "")))
