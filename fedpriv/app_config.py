"""The experiment config as the Flower apps receive it, through Flower's run config.

Flower's run config holds TOML scalars only, so the whole resolved Hydra config travels as one
JSON string (`fedpriv-config`, written by the `fedpriv` CLI). A plain `flwr run .` leaves it empty;
the apps then compose `conf/` themselves, applying the Hydra overrides in `overrides`
(e.g. `flwr run . --run-config 'overrides="strategy=sequential privacy.epsilon=1"'`).
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import tomli_w
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from fedpriv.config import FedprivConfig, register_configs, to_config

CONFIG_KEY, OVERRIDES_KEY, RUN_DIR_KEY = "fedpriv-config", "overrides", "run-dir"
CONFIG_NAME = "config"  # Hydra's primary config, conf/config.yaml
_PLAIN_VALUE = re.compile(r"[\w/.+:@-]*")  # what Hydra's override grammar takes unquoted (a path's characters)


def config_dir() -> str:
    """The Hydra config folder: inside the installed package, or conf/ of a source checkout."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "conf", package.parent / "conf"):
        if (candidate / f"{CONFIG_NAME}.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"fedpriv's conf/ folder is missing next to {package}")


def expand_home(overrides: Sequence[str]) -> list[str]:
    """Hydra overrides with a leading ``~`` in a value expanded to the home folder, as a shell would.

    ``federation.ledger_dir=~/ledgers`` is not a word a shell expands (it is no variable assignment),
    and Hydra's override grammar rejects an unquoted ``~`` as a lexer error. A value starting with
    ``~`` has no other meaning, so ``~`` and ``~user`` become the home folder; each value of a
    sweep (``a=~/x,~/y``) too. A ``~`` before the key (Hydra's delete, ``~key``) is left alone, and so
    is every argument that is not ``key=value``. An expanded path Hydra would not take unquoted (a
    space in it) is quoted.
    """
    expanded = []
    for override in overrides:
        key, equals, value = override.partition("=")
        if equals and key and not key.startswith(("~", "-")) and value.startswith("~"):
            override = f"{key}=" + ",".join(_hydra_value(os.path.expanduser(part)) for part in value.split(","))
        expanded.append(override)
    return expanded


def _hydra_value(text: str) -> str:
    """`text` as a Hydra override value: as it is when the grammar takes it unquoted, else single-quoted."""
    if _PLAIN_VALUE.fullmatch(text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def config_to_json(cfg: FedprivConfig) -> str:
    return json.dumps(asdict(cfg), sort_keys=True)


def compose_config(overrides: Sequence[str]) -> FedprivConfig:
    """Compose conf/ with Hydra overrides, as the `fedpriv` CLI would (without running it).

    A leading ``~`` in a value means the home folder here too (:func:`expand_home`).
    """
    register_configs()
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return to_config(compose(CONFIG_NAME, overrides=expand_home(overrides)))


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
