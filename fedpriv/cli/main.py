"""`fedpriv`: the Hydra entry point of the main job.

Bad input ends the program with one line on stderr (what is wrong, where, how to fix it) and a
non-zero exit code; Hydra's own composition errors (unknown keys, wrong types) are reported by
Hydra, also without a traceback.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fedpriv.config import register_configs, to_config
from fedpriv.errors import FedprivError

log = logging.getLogger("fedpriv")

EXIT_BAD_INPUT = 2


def config_dir() -> str:
    """The Hydra config folder: inside the installed package, or conf/ of a source checkout."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package / "conf", package.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"fedpriv's conf/ folder is missing next to {package}")


def run(cfg: DictConfig, run_dir: Path) -> None:
    """Run the configured experiment, writing its outputs into `run_dir`."""
    from fedpriv.experiment import prepare_experiment

    config = to_config(cfg)
    experiment = prepare_experiment(config)
    log.info("%s", experiment.dataset.describe())
    log.info("Partition (%s, seed %d):\n%s", config.federation.partition, config.seed,
             experiment.partition_table())
    experiment.save_partition(run_dir)


def _fail(error: FedprivError) -> None:
    print(f"fedpriv: error: {error}", file=sys.stderr)
    raise SystemExit(EXIT_BAD_INPUT)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        run(cfg, Path(HydraConfig.get().runtime.output_dir))
    except FedprivError as error:
        _fail(error)


def main() -> None:
    """Console-script entry point (`fedpriv`)."""
    register_configs()
    _hydra_main()


if __name__ == "__main__":
    main()
