"""`fedpriv`: the Hydra entry point of the main job.

Bad input ends the program with one line on stderr (what is wrong, where, how to fix it) and a
non-zero exit code; Hydra's own composition errors (unknown keys, wrong types) are reported by
Hydra, also without a traceback.

Exit codes: 0 the run trained; 2 bad input (:data:`EXIT_BAD_INPUT`); 3 the run finished but no
hospital trained in any round, so its model is untrained (:data:`EXIT_NOTHING_TRAINED`; in a sweep
the job is reported and the sweep goes on); 130 interrupted.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from fedpriv import rundir
from fedpriv.config import FedprivConfig, register_configs, to_config
from fedpriv.errors import ConfigError, FedprivError, NothingTrained

log = logging.getLogger("fedpriv")

EXIT_BAD_INPUT = 2
EXIT_NOTHING_TRAINED = 3
CONFIG_NAME = "config"  # Hydra's primary config, conf/config.yaml


def config_dir() -> str:
    """The Hydra config folder: inside the installed package, or conf/ of a source checkout."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package / "conf", package.parent / "conf"):
        if (candidate / f"{CONFIG_NAME}.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"fedpriv's conf/ folder is missing next to {package}")


def run(cfg: DictConfig | FedprivConfig, run_dir: Path) -> None:
    """Validate, prepare the data, then run the federated simulation; outputs go to `run_dir`.

    Raises NothingTrained when the run ended without any hospital training in any round.
    """
    from fedpriv.app_config import config_to_json
    from fedpriv.experiment import prepare_experiment
    from fedpriv.outputs import resume_checkpoint, untrained_reason
    from fedpriv.simulation import run_simulation

    config = absolute_paths(to_config(cfg), run_dir)
    experiment = prepare_experiment(config)  # every check runs here, before any budget is spent
    if config.resume:
        resume_checkpoint(config)  # an incompatible run directory fails now, not inside Flower
    log.info("%s", experiment.dataset.describe())
    log.info("Partition (%s, seed %d):\n%s", config.federation.partition, config.seed,
             experiment.partition_table())
    experiment.save_partition(run_dir)
    run_simulation(config_to_json(config), run_dir, num_hospitals=config.federation.num_hospitals,
                   client_cpus=config.federation.client_cpus)
    log.info("Run finished; outputs in %s\n%s", run_dir, rundir.read_summary(run_dir))
    result = rundir.read_result(run_dir) or {}
    if result.get("rounds_trained") == 0:
        raise NothingTrained(f"{untrained_reason(result['stop_reason'])}; outputs in {run_dir}")


def absolute_paths(config: FedprivConfig, run_dir: str | Path | None = None) -> FedprivConfig:
    """Make every path absolute: the Flower apps run in other processes and folders.

    It also pins where the simulated hospitals' ledgers live (see fedpriv.experiment.ledger_folder),
    so the config.yaml every run saves names them and a later `resume=` finds the same ledgers:
    scope "persistent" stores the folder it resolves ($FEDPRIV_LEDGER_DIR or the user data folder)
    as federation.ledger_dir; scope "run" stores the run directory as federation.ledger_run_dir
    (when `run_dir` is given and it is unset: a resumed run keeps the old run's).
    """
    from fedpriv.data import default_data_dir
    from fedpriv.experiment import ledger_folder

    data, fed = config.dataset, config.federation
    if data.name not in ("synthetic", "imagefolder"):
        data.root = str(Path(data.root).resolve()) if data.root else str(default_data_dir().resolve())
    if fed.ledger_scope == "persistent" and not fed.ledger_dir:
        fed.ledger_dir = str(ledger_folder(config, run_dir))
    elif fed.ledger_scope == "run" and not fed.ledger_run_dir and run_dir:
        fed.ledger_run_dir = str(run_dir)
    for section, key in ((data, "path"), (data, "attributes_csv"), (fed, "ledger_dir"), (fed, "ledger_run_dir"),
                         (config, "resume")):
        value = getattr(section, key)
        if value:
            setattr(section, key, str(Path(value).expanduser().resolve()))
    return config


def resumed_config(resume: str | Path, overrides: Sequence[str] = ()) -> FedprivConfig:
    """The configuration `fedpriv resume=RUN_DIR [OVERRIDES]` runs with.

    It is RUN_DIR/config.yaml (the resolved config that run saved) as a whole, with only the command
    line's explicit value overrides (`overrides`: Hydra's task overrides) applied on top: the
    defaults of conf/ play no part, so an interrupted 8-round run resumes as an 8-round run.
    `resume=` itself is skipped. A config group choice (`strategy=sequential`, `experiment=smoke`) is
    skipped when it is the one the resumed run made (Hydra saved them in RUN_DIR/.hydra/hydra.yaml),
    so repeating the original command line with `resume=` works; another choice is refused, since a
    group option would silently replace many of the resumed run's settings (e.g. its num_rounds).

    The ledgers stay the resumed run's: the saved config names them (federation.ledger_dir for
    scope "persistent", federation.ledger_run_dir for scope "run", see `absolute_paths`). A saved
    config without ledger_run_dir (a run started by `flwr run`) charges RUN_DIR/ledgers; one from
    before federation.ledger_scope existed had its ledgers in RUN_DIR unless it set ledger_dir.
    Overriding federation.ledger_scope to another scope drops the saved location (it belongs to
    the old scope) unless the command line also sets it.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    run_dir = Path(resume).expanduser().resolve()
    saved = run_dir / rundir.CONFIG
    try:
        raw = rundir.read_config_yaml(run_dir)
        previous = OmegaConf.merge(OmegaConf.structured(FedprivConfig), raw)
    except Exception as exc:  # missing, unreadable or from another version: its settings are unknown
        raise ConfigError("resume", str(run_dir), f"its {rundir.CONFIG} cannot be read ({type(exc).__name__})",
                          f"resume only a run directory written by fedpriv, with its {rundir.CONFIG}") from None
    fed = previous.federation
    if "ledger_scope" not in (raw.get("federation") or {}) and not fed.ledger_dir:
        fed.ledger_scope = "run"  # written before ledger_scope: without ledger_dir, ledgers lived in the run dir
    saved_scope = fed.ledger_scope
    choices = rundir.read_hydra_choices(run_dir)
    overridden = set()
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key = override.key_or_group
        if key == "resume":
            continue
        text = override.input_line or key
        if override.is_delete() or override.is_sweep_override():
            raise ConfigError(key, text, "only plain values can be set on top of a resumed run's config",
                              f"set the value you mean, e.g. {key}=VALUE")
        if override.package is not None or (Path(config_dir()) / key).is_dir():
            if override.package is None and key in choices and choices[key] == override.value():
                continue  # the resumed run's own choice: its values are already in config.yaml
            raise ConfigError(key, override.value(), "a config group choice would replace many of the resumed "
                              f"run's settings (resume= takes its config from {saved})",
                              "override single values instead, e.g. strategy.mode=sequential")
        try:
            OmegaConf.update(previous, key, override.value(), merge=False)
        except Exception as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ConfigError(key, override.value(), f"cannot be applied to the resumed run's config ({reason})",
                              f"check the key and value against that run's {rundir.CONFIG}") from None
        overridden.add(key)
    if fed.ledger_scope != saved_scope:
        for key in ("ledger_dir", "ledger_run_dir"):
            if f"federation.{key}" not in overridden:
                fed[key] = None
    if fed.ledger_scope == "run" and not fed.ledger_run_dir:
        fed.ledger_run_dir = str(run_dir)  # its throw-away ledgers are where that run kept them
    previous.resume = str(run_dir)
    return to_config(previous)


def _fail(error: FedprivError) -> None:
    print(f"fedpriv: error: {error}", file=sys.stderr)
    raise SystemExit(EXIT_BAD_INPUT)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name=CONFIG_NAME)
def _hydra_main(cfg: DictConfig) -> None:
    try:
        hydra_config = HydraConfig.get()
        # A resume continues the resumed run: its own config.yaml plus what the command line sets.
        config = resumed_config(cfg.resume, hydra_config.overrides.task) if cfg.get("resume") else cfg
        run(config, Path(hydra_config.runtime.output_dir))
    except NothingTrained as error:
        if hydra_config.mode == RunMode.MULTIRUN:  # one job's outcome: the sweep's other jobs still run
            log.error("%s", error)
            return
        print(f"fedpriv: {error}", file=sys.stderr)
        raise SystemExit(EXIT_NOTHING_TRAINED) from None
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
