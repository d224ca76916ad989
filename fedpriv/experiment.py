"""Turn a validated config into an experiment: the data, the hospitals and their shares of it.

Shared by the CLI, the Flower apps and the benchmarks, so every entry point checks the same things
in the same order: config values first (no data touched), then the data and its partition, then
the checks that need the partition (batch size, delta) — all before any training or budget.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedpriv import rundir
from fedpriv.config import FedprivConfig, validate_against_data, validate_config
from fedpriv.data import (
    LabeledImages,
    MedicalImageDataset,
    default_data_dir,
    format_partition_table,
    load_dataset,
    partition_indices,
    partition_summary,
)
from fedpriv.data.splits import hold_out
from fedpriv.errors import ConfigError
from fedpriv.privacy.store import folder_write_problem

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hospital:
    """One simulated hospital: its name, its own budget and how many training records it holds."""

    index: int
    name: str
    epsilon: float
    delta: float
    records: int


@dataclass
class Experiment:
    """A prepared experiment: the dataset, each hospital's indices into its training split."""

    config: FedprivConfig
    dataset: MedicalImageDataset
    partitions: list[np.ndarray]  # each hospital's records (indices into the training split)
    hospitals: list[Hospital]
    partition_rows: list[dict]
    local_training: list[np.ndarray]  # the part of each partition the hospital trains on
    local_validation: list[np.ndarray]  # the part it keeps for its own (private) validation

    def hospital_data(self, index: int) -> LabeledImages:
        """The records hospital `index` trains on (what its DP guarantee and ledger protect)."""
        return self.dataset.train.subset(self.local_training[index])

    def hospital_validation(self, index: int) -> LabeledImages:
        """Hospital `index`'s private validation records, held out from its training."""
        return self.dataset.train.subset(self.local_validation[index])

    def partition_table(self) -> str:
        return format_partition_table(self.partition_rows)

    def save_partition(self, run_dir: str | Path) -> None:
        """Write the partition summary next to the run's other outputs (Markdown and JSON)."""
        header = f"# Partition\n\n{self.dataset.describe()}\n\n"
        rundir.write_partition(run_dir, header + self.partition_table() + "\n", self.partition_rows)


def hospital_names(cfg: FedprivConfig) -> list[str]:
    if cfg.federation.hospitals:
        return [h.name for h in cfg.federation.hospitals]
    return [f"hospital-{i + 1}" for i in range(cfg.federation.num_hospitals)]


def prepare_experiment(cfg: FedprivConfig) -> Experiment:
    """Validate `cfg`, load its dataset and split the training records among its hospitals."""
    validate_config(cfg)
    check_ledger_dir(cfg)
    return partition_experiment(cfg, load_dataset(cfg.dataset, cfg.seed))


def partition_experiment(cfg: FedprivConfig, dataset: MedicalImageDataset) -> Experiment:
    """Split an already loaded dataset among `cfg`'s hospitals, as :func:`prepare_experiment` does.

    It neither checks nor touches the ledger folder: the run report uses it to name each simulated
    hospital's records when it only reads their ledger.
    """
    fed = cfg.federation
    shares = [h.share for h in fed.hospitals] if fed.hospitals and fed.hospitals[0].share is not None else None
    labels = dataset.train.labels.numpy()
    # With patient ids, a patient's images all go to one hospital, and to one side of its validation split.
    patients = dataset.train.patient_ids
    if cfg.privacy.enabled and cfg.privacy.unit == "patient":
        dataset.train.patients(where=f"dataset {dataset.name}")  # DataError naming the fix, before any training
    partitions = partition_indices(labels, fed.num_hospitals, fed.partition, alpha=fed.alpha,
                                   seed=cfg.seed, shares=shares, groups=patients)
    local_training, local_validation = split_local_validation(partitions, fed.local_val_fraction, cfg.seed,
                                                              patients)
    units = ([len(np.unique(patients[p])) for p in local_training] if patients is not None
             and cfg.privacy.unit == "patient" else [len(p) for p in local_training])
    validate_against_data(cfg, units, len(labels))
    names = hospital_names(cfg)
    overrides = fed.hospitals or [None] * fed.num_hospitals
    hospitals = [
        Hospital(
            index=i,
            name=names[i],
            epsilon=(o.epsilon if o is not None and o.epsilon is not None else cfg.privacy.epsilon),
            delta=(o.delta if o is not None and o.delta is not None else cfg.privacy.delta),
            records=len(local_training[i]),
        )
        for i, o in enumerate(overrides)
    ]
    rows = partition_summary(labels, partitions, dataset.class_names, names)
    warn_about_missing_classes(rows, dataset.class_names)
    for row, training, validation in zip(rows, local_training, local_validation):
        row["training"], row["validation"] = len(training), len(validation)
    return Experiment(cfg, dataset, partitions, hospitals, rows, local_training, local_validation)


def warn_about_missing_classes(rows: list[dict], class_names: list[str]) -> list[str]:
    """Name the hospitals that hold no record of some class; returns the warnings it logged.

    Not an error: under label skew a site that only sees one class is the realistic case, and
    DP-SGD and the ledger are unaffected. But its local validation AUC is undefined and FedAvg
    leans on the other sites for that class, so the user should know.
    """
    warnings = []
    for row in rows:
        missing = [name for name in class_names if row[name] == 0]
        if missing:
            warnings.append(f"{row['hospital']} holds no records of class {', '.join(missing)}")
    if warnings:
        log.warning("%s: its local validation AUC is undefined and other hospitals must teach it that class. "
                    "If that is not intended, raise federation.alpha or use federation=iid", "; ".join(warnings))
    return warnings


LEDGER_DIR_ENV = "FEDPRIV_LEDGER_DIR"  # the persistent ledger folder when federation.ledger_dir is unset


def ledger_folder(cfg: FedprivConfig, run_dir: str | Path | None) -> Path:
    """The folder that holds the simulated hospitals' privacy ledgers (one file per dataset).

    - ``federation.ledger_scope=run``: ``<run>/ledgers``, a throw-away ledger whose budget is enforced
      within that run only. ``<run>`` is ``federation.ledger_run_dir`` when set, else ``run_dir``. The
      CLI sets ledger_run_dir to the run directory and stores it in config.yaml, so a resumed run
      (whose config is the old run's config.yaml) keeps charging the old run's ledgers: the
      throw-away budget then covers that run and its resumptions, and nothing else.
    - ``persistent`` (default): ``federation.ledger_dir`` if set, else ``$FEDPRIV_LEDGER_DIR`` if set,
      else ``platformdirs.user_data_dir("fedpriv")/ledgers``: ledgers that outlive every run, so a
      hospital's budget is spent once over every use of its data. The CLI stores the folder it
      resolved as ``federation.ledger_dir``, so a resume uses the same one.

    Raises :class:`ConfigError` for contradictory settings (scope "run" with a ledger_dir), or for
    scope "run" when no run directory is known.
    """
    fed = cfg.federation
    if fed.ledger_scope == "run":
        if fed.ledger_dir:
            raise ConfigError("federation.ledger_scope", fed.ledger_scope,
                              f"contradicts federation.ledger_dir={fed.ledger_dir!r} (a throw-away ledger in the "
                              "run directory, or a persistent ledger folder)",
                              "drop federation.ledger_dir, or use federation.ledger_scope=persistent")
        run = fed.ledger_run_dir or (str(run_dir) if run_dir else None)
        if not run:
            raise ConfigError("federation.ledger_run_dir", None, "scope 'run' keeps its ledgers in the run "
                              "directory, and no run directory is known", "run through the fedpriv CLI or give "
                              "the run directory (run-dir in Flower's run config)")
        return Path(run).expanduser() / rundir.LEDGERS
    if fed.ledger_dir:
        return Path(fed.ledger_dir).expanduser()
    if os.environ.get(LEDGER_DIR_ENV):
        return Path(os.environ[LEDGER_DIR_ENV]).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("fedpriv")) / "ledgers"


def absolute_paths(config: FedprivConfig, run_dir: str | Path | None = None) -> FedprivConfig:
    """Make every path absolute: the Flower apps run in other processes and folders.

    A leading ``~`` means the home folder in every path setting (the dataset's root, path and
    attributes CSV, the ledger folders, ``resume``), wherever the value came from (a config file, a
    quoted override, a resumed run's config.yaml).

    It also pins where the simulated hospitals' ledgers live (see :func:`ledger_folder`), so the
    config.yaml every run saves names them and a later `resume=` finds the same ledgers: scope
    "persistent" stores the folder it resolves ($FEDPRIV_LEDGER_DIR or the user data folder) as
    federation.ledger_dir; scope "run" stores the run directory as federation.ledger_run_dir (when
    `run_dir` is given and it is unset: a resumed run keeps the old run's).
    """
    data, fed = config.dataset, config.federation
    if data.name not in ("synthetic", "imagefolder"):
        data.root = str(Path(data.root).expanduser().resolve()) if data.root else str(default_data_dir().resolve())
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


def check_ledger_dir(cfg: FedprivConfig, run_dir: str | Path | None = None) -> None:
    """A ledger folder the hospitals cannot write fails now, before any data is read or budget spent.

    Checks (creates, then test-writes) the folder :func:`ledger_folder` names: the persistent folder,
    or the throw-away ledgers of the run this one resumes. Non-private runs too: they mark their
    records' epsilon as infinity there. A new run's own ``<run_dir>/ledgers`` is checked only when
    ``run_dir`` or ``federation.ledger_run_dir`` names it (Hydra has just created the run directory).
    """
    fed = cfg.federation
    if fed.ledger_scope == "run" and not fed.ledger_run_dir and not run_dir:
        return
    folder = ledger_folder(cfg, run_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        problem = f"cannot create that folder ({exc.strerror or exc})"
    else:
        problem = folder_write_problem(folder)
    if not problem:
        return
    if fed.ledger_scope == "run":
        raise ConfigError("federation.ledger_run_dir", str(folder), f"the run's throw-away ledgers: {problem}",
                          "make that run directory writable, or start a new run without resume=")
    raise ConfigError("federation.ledger_dir", str(folder), f"the hospitals' persistent ledger folder: {problem}",
                      f"point federation.ledger_dir, or the {LEDGER_DIR_ENV} environment variable, at a folder "
                      "you can write (the ledgers must outlive every run); or use federation.ledger_scope=run "
                      "for a throw-away ledger in the run directory (the budget then holds within that run only)")


def split_local_validation(partitions: list[np.ndarray], fraction: float, seed: int,
                           patient_ids: np.ndarray | None = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each hospital holds out `fraction` of its own records for validation, as a real site would.

    The official validation split stays with the server (a public calibration set), so nothing a
    hospital validates on is shared with anyone. With `patient_ids` (one per record of the training
    split) whole patients are held out (:func:`fedpriv.data.splits.hold_out`).
    """
    training, validation = [], []
    for index, part in enumerate(partitions):
        groups = None if patient_ids is None else patient_ids[part]
        kept, held = hold_out(part, fraction, np.random.default_rng([seed, index]), groups)
        validation.append(held)
        training.append(kept)
    return training, validation
