"""`fedpriv`: the Hydra entry point of the main job.

Bad input ends the program with one line on stderr (what is wrong, where, how to fix it) and exit
code 2, before anything is started: fedpriv's own checks and Hydra's composition errors alike (a
misspelt key or group option, a value of the wrong type, an override Hydra cannot parse).

SIGINT, SIGTERM and SIGHUP stop the run however `fedpriv` was started (also as a background job of a
script, which starts with SIGINT ignored): every process it started is stopped by PID, and the last
lines name the run directory and the exact `fedpriv resume=...` command that continues it.

A run that fails before it starts (bad input, or interrupted while it prepares the data) leaves no
run directory behind.

Exit codes: 0 the run trained; 2 bad input (:data:`EXIT_BAD_INPUT`); 3 the run finished but no
hospital trained in any round, so its model is untrained (:data:`EXIT_NOTHING_TRAINED`; in a sweep
the job is reported and the sweep goes on); 130 interrupted (:data:`EXIT_INTERRUPTED`).
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import CompactHydraException, MissingConfigException, OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from fedpriv import rundir
from fedpriv.app_config import CONFIG_NAME, config_dir, config_to_json, expand_home
from fedpriv.config import FedprivConfig, register_configs, to_config
from fedpriv.errors import ConfigError, FedprivError, NothingTrained
from fedpriv.experiment import absolute_paths, prepare_experiment
from fedpriv.outputs import resume_checkpoint, untrained_reason
from fedpriv.simulation import (Interrupted, SharedRuntime, interrupt_on_signals, ray_cluster_address, run_simulation,
                                shared_runtime, stop_shared_runtime)

__all__ = ["CONFIG_NAME", "EXIT_BAD_INPUT", "EXIT_INTERRUPTED", "EXIT_NOTHING_TRAINED", "SweepFolder",
           "absolute_paths", "config_dir", "hydra_error_line", "main", "resumed_config", "run"]

log = logging.getLogger("fedpriv")

EXIT_BAD_INPUT = 2
EXIT_NOTHING_TRAINED = 3
EXIT_INTERRUPTED = 130
FULL_ERROR_ENV = "HYDRA_FULL_ERROR"  # Hydra's switch: raise composition errors instead of printing them


def _sweep_runtime() -> SharedRuntime | None:
    """In a job of a Hydra multirun, the SuperLink (and Ray) its jobs share; else None (a run of its own)."""
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return shared_runtime()
    return None


def run(cfg: DictConfig | FedprivConfig, run_dir: Path) -> None:
    """Validate, prepare the data, then run the federated simulation; outputs go to `run_dir`.

    In a job of a sweep (`fedpriv -m`) it runs on the SuperLink and Ray the sweep's jobs share, which
    stay running for the next job (:func:`fedpriv.simulation.shared_runtime`).

    Raises NothingTrained when the run ended without any hospital training in any round.
    """
    config = absolute_paths(to_config(cfg), run_dir)
    # The Ray cluster to attach to (federation.ray_address, else $RAY_ADDRESS), recorded in config.yaml.
    cluster = ray_cluster_address(config.federation.ray_address)
    if cluster:
        config = replace(config, federation=replace(config.federation, ray_address=cluster))
    experiment = prepare_experiment(config)  # every check runs here, before any budget is spent
    if config.resume:
        resume_checkpoint(config)  # an incompatible run directory fails now, not inside Flower
    log.info("%s", experiment.dataset.describe())
    log.info("Partition (%s, seed %d):\n%s", config.federation.partition, config.seed,
             experiment.partition_table())
    experiment.save_partition(run_dir)
    run_simulation(config_to_json(config), run_dir, num_hospitals=config.federation.num_hospitals,
                   client_cpus=config.federation.client_cpus, client_gpus=config.federation.client_gpus,
                   ray_address=cluster, runtime=_sweep_runtime())
    # The ServerApp has printed the summary already (through Flower's log stream): once is enough.
    log.info("Run finished; outputs in %s (summary in %s)", run_dir, run_dir / rundir.SUMMARY)
    result = rundir.read_result(run_dir) or {}
    if result.get("rounds_trained") == 0:
        raise NothingTrained(f"{untrained_reason(result['stop_reason'])}; outputs in {run_dir}")


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


def hydra_error_line(error: Exception) -> str:
    """One line for a configuration error Hydra (or OmegaConf under it) raised: what is wrong, and the fix."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    headline = (lines or [type(error).__name__])[0].rstrip(".")
    cause = error.__cause__ if isinstance(error.__cause__, OmegaConfBaseException) else None
    if isinstance(error, MissingConfigException) and error.options is not None:  # a misspelt group option
        group = (error.missing_cfg_file or "").rpartition("/")[0]
        return (f"{headline}. Fix: choose one of: {', '.join(error.options) or '(none)'}"
                + (f" (`{group}=OPTION`)" if group else ""))
    if isinstance(error, OverrideParseException):  # the override's text is not in Hydra's grammar
        return (f"cannot read the override {error.override!r} ({headline}). Fix: quote a value with spaces or "
                "special characters, e.g. 'key=\"a value\"' (a leading ~ is the home folder); "
                "see https://hydra.cc/docs/advanced/override_grammar/basic/")
    if cause is not None:
        detail = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        key = getattr(cause, "full_key", None)
        if isinstance(cause, ConfigKeyError | ConfigAttributeError):  # a misspelt key
            fix = "check the spelling: `fedpriv --cfg job` prints every setting"
        elif isinstance(cause, ValidationError):
            fix = f"give {key or 'it'} a value of the type `fedpriv --cfg job` shows"
        else:
            fix = "compare it with `fedpriv --cfg job`, which prints every setting"
        return f"{headline}: {detail}. Fix: {fix}"
    return f"{' '.join(lines) or type(error).__name__}. Fix: compare it with `fedpriv --cfg job`"


def _remove_stub(run_dir: Path) -> None:
    """Remove `run_dir` if it holds nothing but what Hydra and the partition step wrote before the run started.

    A run that fails on bad input (or is interrupted) before the simulation starts has spent nothing
    and produced nothing; its folder would only litter outputs/. Anything else in it (a config.yaml,
    a checkpoint, a copied superlink.log, a ledger) keeps it. The date folder above a default run directory
    goes too when it is left empty, and so does Hydra's default outputs/ folder.
    """
    try:
        hydra_log = f"{HydraConfig.get().job.name}.log"
        stub = {".hydra", hydra_log, rundir.PARTITION_MD, rundir.PARTITION_JSON}
        # A throw-away ledger's folder is created (empty) when it is checked, before the data is read.
        unused_ledgers = run_dir / rundir.LEDGERS
        if not run_dir.is_dir() or any(entry.name not in stub and not (entry == unused_ledgers and entry.is_dir()
                                                                       and not any(entry.iterdir()))
                                       for entry in run_dir.iterdir()):
            return
        shutil.rmtree(run_dir)
        _remove_empty_default_parents(run_dir, "outputs")
    except OSError:
        pass


class SweepFolder(Callback):
    """Hydra callback (conf/config.yaml) that notes a sweep's folder, so bad input can remove it again.

    Hydra creates the sweep folder and its multirun.yaml before it composes the first job; when that
    composition fails, Hydra's own record of the folder is gone by the time the error reaches
    :func:`main`.
    """

    folder: Path | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: object) -> None:
        SweepFolder.folder = Path(str(config.hydra.sweep.dir)).resolve()

    def on_multirun_end(self, config: DictConfig, **kwargs: object) -> None:
        # The jobs' shared SuperLink and Ray stop here; on a failing job or a stop signal main() stops them.
        stop_shared_runtime()


def _remove_stub_sweep() -> None:
    """Remove the sweep folder of a `fedpriv -m` stopped by bad input before any job ran.

    Nothing but the multirun.yaml Hydra writes first means no job got as far as a run directory.
    The date folder above a default sweep folder, and Hydra's default multirun/ folder, go too when
    they are left empty.
    """
    sweep_dir = SweepFolder.folder
    try:
        if sweep_dir is None or any(entry.name != rundir.MULTIRUN_RECORD for entry in sweep_dir.iterdir()):
            return
        shutil.rmtree(sweep_dir)
        _remove_empty_default_parents(sweep_dir, "multirun")
    except OSError:
        pass


def _remove_empty_default_parents(folder: Path, default_root: str) -> None:
    """Remove the date folder above `folder` and then `default_root` above it, each only if empty."""
    parent = folder.parent
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", parent.name) and not any(parent.iterdir()):
        parent.rmdir()
        if parent.parent.name == default_root and not any(parent.parent.iterdir()):
            parent.parent.rmdir()


def _interrupted(error: KeyboardInterrupt, run_dir: Path, config: FedprivConfig | DictConfig) -> None:
    """After a stop signal: say what was stopped, where the run is and the command that continues it."""
    how = f" by {error.signal_name}" if isinstance(error, Interrupted) else ""
    resumable = run_dir if rundir.latest_checkpoint(run_dir) is not None else None
    if resumable is None and getattr(config, "resume", None):
        resumable = Path(str(config.resume))  # a resume stopped before its first checkpoint of its own
    if resumable is None:
        _remove_stub(run_dir)
    print(f"fedpriv: interrupted{how}; every process fedpriv started has been stopped", file=sys.stderr)
    if resumable is not None:
        checkpoint = rundir.latest_checkpoint(resumable)
        where = checkpoint.name if resumable == run_dir else f"{checkpoint.name} in {resumable}"
        print(f"fedpriv: run directory: {run_dir}\nfedpriv: continue from its last checkpoint ({where}) "
              f"with: fedpriv resume={shlex.quote(str(resumable))}", file=sys.stderr)
    elif run_dir.is_dir():
        print(f"fedpriv: run directory: {run_dir}\nfedpriv: no round had finished, so there is nothing to resume: "
              "start the run again with the same command", file=sys.stderr)
    else:
        print("fedpriv: the run had not started; start it again with the same command", file=sys.stderr)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name=CONFIG_NAME)
def _hydra_main(cfg: DictConfig) -> None:
    hydra_config = HydraConfig.get()
    run_dir = Path(hydra_config.runtime.output_dir)
    config: FedprivConfig | DictConfig = cfg
    try:
        # A resume continues the resumed run: its own config.yaml plus what the command line sets.
        config = resumed_config(cfg.resume, hydra_config.overrides.task) if cfg.get("resume") else cfg
        run(config, run_dir)
    except NothingTrained as error:
        if hydra_config.mode == RunMode.MULTIRUN:  # one job's outcome: the sweep's other jobs still run
            log.error("%s", error)
            return
        print(f"fedpriv: {error}", file=sys.stderr)
        raise SystemExit(EXIT_NOTHING_TRAINED) from None
    except FedprivError as error:
        _remove_stub(run_dir)
        print(f"fedpriv: error: {error}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT) from None
    except KeyboardInterrupt as error:
        # The simulation's context managers have already stopped every process they started; a sweep's
        # shared SuperLink and Ray stop here, before fedpriv says that everything was stopped.
        stop_shared_runtime()
        _interrupted(error, run_dir, config)
        raise SystemExit(EXIT_INTERRUPTED) from None


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point (`fedpriv`); `argv` replaces the command line's arguments (tests)."""
    register_configs()
    interrupt_on_signals()
    # A leading ~ in a value is the home folder (Hydra's grammar would reject it).
    sys.argv[1:] = expand_home(sys.argv[1:] if argv is None else argv)
    user_wants_traceback = bool(os.environ.get(FULL_ERROR_ENV))
    os.environ[FULL_ERROR_ENV] = "1"  # Hydra raises its composition errors, so they become one line here
    try:
        _hydra_main()
    except (CompactHydraException, OmegaConfBaseException) as error:
        if user_wants_traceback:
            raise
        _remove_stub_sweep()
        print(f"fedpriv: error: {hydra_error_line(error)}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT) from None
    except SystemExit as done:
        if done.code == EXIT_BAD_INPUT:  # a sweep's first job was refused: its (emptied) sweep folder goes too
            _remove_stub_sweep()
        raise
    except KeyboardInterrupt as error:  # before the run directory existed (Hydra was still composing)
        how = f" by {error.signal_name}" if isinstance(error, Interrupted) else ""
        if stop_shared_runtime():  # between two jobs of a sweep (or in its report)
            print(f"fedpriv: interrupted{how} between the jobs of the sweep; every process fedpriv started has "
                  "been stopped", file=sys.stderr)
        else:
            print(f"fedpriv: interrupted{how} before the run started; nothing was started", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    finally:
        stop_shared_runtime()  # a sweep's SuperLink and Ray, whichever way it ended (also done at exit)
        if not user_wants_traceback:
            os.environ.pop(FULL_ERROR_ENV, None)


if __name__ == "__main__":
    main()
