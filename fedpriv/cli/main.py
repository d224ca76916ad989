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
    """Validate, prepare the data, then run the federated simulation; outputs go to `run_dir`."""
    from fedpriv.app_config import config_to_json
    from fedpriv.experiment import prepare_experiment
    from fedpriv.outputs import resume_checkpoint
    from fedpriv.simulation import run_simulation

    config = absolute_paths(to_config(cfg))
    experiment = prepare_experiment(config)  # every check runs here, before any budget is spent
    if config.resume:
        resume_checkpoint(config)  # an incompatible run directory fails now, not inside Flower
    log.info("%s", experiment.dataset.describe())
    log.info("Partition (%s, seed %d):\n%s", config.federation.partition, config.seed,
             experiment.partition_table())
    experiment.save_partition(run_dir)
    run_simulation(config_to_json(config), run_dir, num_hospitals=config.federation.num_hospitals,
                   client_cpus=config.federation.client_cpus)
    log.info("Run finished; outputs in %s\n%s", run_dir, (run_dir / "summary.md").read_text())


def absolute_paths(config):
    """Make every path absolute: the Flower apps run in other processes and folders."""
    from fedpriv.data import default_data_dir

    data = config.dataset
    if data.name not in ("synthetic", "imagefolder"):
        data.root = str(Path(data.root).resolve()) if data.root else str(default_data_dir().resolve())
    for section, key in ((data, "path"), (data, "attributes_csv"), (config.federation, "ledger_dir"),
                         (config, "resume")):
        value = getattr(section, key)
        if value:
            setattr(section, key, str(Path(value).resolve()))
    return config


def _fail(error: FedprivError) -> None:
    print(f"fedpriv: error: {error}", file=sys.stderr)
    raise SystemExit(EXIT_BAD_INPUT)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        run(cfg, Path(HydraConfig.get().runtime.output_dir))
    except FedprivError as error:
        _fail(error)
    except KeyboardInterrupt:
        # The simulation's context managers have already stopped every process they started.
        print("fedpriv: interrupted; every process fedpriv started has been stopped", file=sys.stderr)
        raise SystemExit(130) from None


def main() -> None:
    """Console-script entry point (`fedpriv`)."""
    register_configs()
    _hydra_main()


if __name__ == "__main__":
    main()
