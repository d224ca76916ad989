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
from pathlib import Path
from typing import Any

import tomli_w
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


def write_app(app_dir: Path) -> Path:
    """A minimal Flower app (what `flwr run APP` uploads) whose components are fedpriv's.

    The components are imported from the environment each machine runs, so fedpriv must be
    installed on the coordinator and at every hospital. The run-config keys it declares are the
    ones `--run-config` may set: `fedpriv-config` (JSON), `overrides` (Hydra) and `run-dir`.
    """
    app_dir.mkdir(parents=True, exist_ok=True)
    (app_dir / "pyproject.toml").write_text(tomli_w.dumps({
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {"name": "fedpriv-app", "version": "1.0.0", "description": "fedpriv Flower app",
                    "license": "Apache-2.0", "dependencies": []},
        "tool": {"flwr": {"app": {
            "publisher": "fedpriv",
            "components": {"serverapp": "fedpriv.server_app:app", "clientapp": "fedpriv.client_app:app"},
            "config": {CONFIG_KEY: "", OVERRIDES_KEY: "", RUN_DIR_KEY: ""},
        }}},
    }))
    return app_dir
