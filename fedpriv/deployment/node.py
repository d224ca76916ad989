"""A deployed hospital: its settings come from its own SuperNode's `--node-config`, never the server.

In deployment each hospital runs `flower-supernode --node-config '...'` on its own machine. The node
config names everything that must stay under the hospital's control:

=====================  ======================================================================
key                    meaning
=====================  ======================================================================
``name``               the hospital's display name (required)
``data``               its data (required): an image folder (one subfolder per class), or a
                       MedMNIST npz file (``<dataset>.npz`` / ``<dataset>_<size>.npz``), or a
                       folder holding one
``dataset``            the MedMNIST flag of an npz (default ``pneumoniamnist``)
``budget-epsilon``     its privacy budget over every use of the data (required, > 0)
``delta``              its delta (required, 0 < delta < 1)
``ledger``             path of its SQLite privacy ledger (required; the folder must exist)
``ledger-key``         path of the key that authenticates its ledger (default: a file in
                       ``$FEDPRIV_KEY_DIR`` or the user's config folder); keep it apart from
                       the ledger's disk or OS user
``accountant``         ``prv`` (default) or ``rdp``
``min-records``        fewest open records a round may use (default 10)
``max-local-epochs``   most local epochs a server may ask for in one round (default 20)
``min-noise-multiplier``  smallest fixed sigma a server may ask for (default 0.3)
``max-epsilon-per-round``  most epsilon one round may cost, its event alone (default: no cap)
``max-epsilon-per-run``  most epsilon one run may cost at this hospital, its events composed
                       (default: no cap; the budget still holds over every run)
``share-validation-metrics``  answer evaluation requests with metrics on the validation split;
                       default ``false``: those metrics are NOT covered by epsilon
``val-fraction``       image folders only: the share of images (stratified by class, fixed
                       order) held out as the validation split; default 0: every image trains
``allow-non-private``  accept non-private rounds (epsilon = inf); default ``false``
``privacy-unit``       ``image`` (default) or ``patient``: patient-level DP (all of a patient's
                       images as one record); needs patient ids (an npz's ``train_patient_ids``,
                       an image folder's ``attributes-csv``), else the hospital refuses to take part.
                       Fixed by the ledger: it refuses the other unit
``attributes-csv``     image folders only: a CSV with a ``path`` column (relative to the folder)
                       and a ``patient_id`` column naming each image's patient (other columns are
                       subgroup attributes); a relative name is looked up in the folder. With it,
                       ``val-fraction`` holds out whole patients
``max-images-per-patient``  privacy-unit=patient: most images of a patient per step (default: all)
``threads``            torch CPU threads for training (default: torch's choice)
``device``             where it trains: ``auto`` (default: CUDA where this machine has it, else
                       the CPU), ``cpu``, ``cuda`` or ``cuda:N``; ``cuda`` without a CUDA device
                       is refused at start-up. It changes no privacy figure
=====================  ======================================================================

From the run config (the server's side) only the model architecture and the image size are taken;
budget, delta, data and ledger path never are. Records whose channels, classes or size the run's
model cannot take are refused with a ConfigError naming ``data``.

Where the validation split comes from (it is used only to answer evaluation requests, and only
with ``share-validation-metrics=true``): an npz trains on its ``train`` arrays and validates on its
``val`` arrays when it has them (no validation split otherwise); its ``test`` arrays are never
read and need not exist. An image folder trains on every image unless ``val-fraction`` holds some
out. Nothing is held out silently: the split sizes are logged when the data is loaded.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedpriv.devices import check_device, resolve_device
from fedpriv.errors import ConfigError, DataError, LedgerError, PrivacyError
from fedpriv.privacy.accounting import check_accountant
from fedpriv.privacy.store import folder_write_problem

# Parsing a node config (fedpriv-deploy node, before it starts a SuperNode) must not load torch:
# the modules that do (config, data, hospital, site) are imported where a site is built, each with that reason.
if TYPE_CHECKING:  # annotations only
    from flwr.app import Context

    from fedpriv.config import FedprivConfig
    from fedpriv.data import LabeledImages
    from fedpriv.hospital import HospitalSettings
    from fedpriv.privacy.migrate import OldLedger
    from fedpriv.site import HospitalSite

log = logging.getLogger(__name__)

DEFAULT_DATASET = "pneumoniamnist"
KNOWN_KEYS = ("name", "data", "dataset", "budget-epsilon", "delta", "ledger", "ledger-key", "accountant",
              "allow-non-private", "threads", "min-records", "max-local-epochs", "min-noise-multiplier",
              "max-epsilon-per-round", "max-epsilon-per-run", "share-validation-metrics", "val-fraction",
              "privacy-unit", "max-images-per-patient", "device", "attributes-csv")
REQUIRED_KEYS = ("name", "data", "budget-epsilon", "delta", "ledger")


@dataclass(frozen=True)
class NodeSettings:
    """A hospital's own settings, parsed and checked from its SuperNode's node config."""

    name: str
    data: Path
    dataset: str
    budget_epsilon: float
    delta: float
    ledger: Path
    accountant: str = "prv"
    allow_non_private: bool = False
    threads: int | None = None
    ledger_key: Path | None = None
    min_records: int = 10
    max_local_epochs: int = 20
    min_noise_multiplier: float = 0.3
    max_epsilon_per_round: float | None = None
    max_epsilon_per_run: float | None = None
    share_validation_metrics: bool = False
    val_fraction: float = 0.0
    privacy_unit: str = "image"
    max_images_per_patient: int | None = None
    device: str = "auto"  # as written (checked for its form); resolved where the site is built
    attributes_csv: Path | None = None  # image folders: patient ids (and attributes) per image


@dataclass(frozen=True)
class HospitalData:
    """A hospital's loaded records: what it trains on and what it validates on."""

    train: LabeledImages
    validation: LabeledImages
    in_channels: int
    num_classes: int
    image_size: int
    source: str


def _fix(key: str, example: str) -> str:
    return f"start the SuperNode with --node-config '{key}={example} ...'"


def _required(config: Mapping[str, Any], key: str, example: str) -> Any:
    if key not in config or config[key] is None or str(config[key]).strip() == "":
        raise ConfigError(key, config.get(key), "missing from the SuperNode's node config", _fix(key, example))
    return config[key]


def _text(config: Mapping[str, Any], key: str, example: str) -> str:
    value = _required(config, key, example)
    if not isinstance(value, str):
        raise ConfigError(key, value, "must be a string", _fix(key, example))
    return value.strip()


def _number(config: Mapping[str, Any], key: str, example: str) -> float:
    value = _required(config, key, example)
    if isinstance(value, bool):
        raise ConfigError(key, value, "must be a number", _fix(key, example))
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(key, value, "must be a number", _fix(key, example)) from None
    if not math.isfinite(number):
        raise ConfigError(key, value, "must be a finite number", _fix(key, example))
    return number


def _flag(config: Mapping[str, Any], key: str) -> bool:
    value = config.get(key, False)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ConfigError(key, value, "must be true or false", _fix(key, "false"))


def _threads(config: Mapping[str, Any]) -> int | None:
    value = config.get("threads")
    if value is None or value == "":
        return None
    whole = isinstance(value, int) and not isinstance(value, bool)
    if not (whole or (isinstance(value, str) and value.strip().isdigit())) or int(value) < 1:
        raise ConfigError("threads", value, "must be a whole number >= 1", _fix("threads", "1"))
    return int(value)


def _dataset_flag(config: Mapping[str, Any]) -> str:
    from fedpriv.data.medmnist import medmnist_2d_flags  # deferred: loads torch (see the imports)

    flag = config.get("dataset", DEFAULT_DATASET)
    if not isinstance(flag, str) or flag not in medmnist_2d_flags() or flag == "chestmnist":
        raise ConfigError("dataset", flag, "must be a single-label MedMNIST 2D flag (it names the npz layout)",
                          _fix("dataset", '"pneumoniamnist"'))
    return flag


def parse_node_config(config: Mapping[str, Any]) -> NodeSettings:
    """Check a SuperNode's node config; a bad or missing key raises ConfigError naming it."""
    unknown = sorted(set(config) - set(KNOWN_KEYS))
    if unknown:
        log.warning("ignoring unknown node-config keys: %s (known: %s)", ", ".join(unknown), ", ".join(KNOWN_KEYS))
    name = _text(config, "name", '"St-Marys"')
    data = Path(_text(config, "data", '"/srv/xrays"')).expanduser()
    if not data.exists():
        raise ConfigError("data", str(data), "no such file or folder on this machine",
                          "point data= at the hospital's image folder or MedMNIST npz")
    budget = _number(config, "budget-epsilon", "3")
    if budget <= 0:
        raise ConfigError("budget-epsilon", budget, "must be positive", _fix("budget-epsilon", "3"))
    delta = _number(config, "delta", "1e-5")
    if not 0 < delta < 1:
        raise ConfigError("delta", delta, "must be between 0 and 1 (exclusive)", _fix("delta", "1e-5"))
    ledger = Path(_text(config, "ledger", '"/var/lib/fedpriv/ledger.db"')).expanduser()
    if ledger.is_dir():
        raise ConfigError("ledger", str(ledger), "is a folder; it must name the ledger file",
                          _fix("ledger", f'"{ledger / "ledger.db"}"'))
    if not ledger.parent.is_dir():
        # Never create it: a missing folder may be an unmounted disk, and a fresh ledger would
        # silently forget the budget already spent.
        raise ConfigError("ledger", str(ledger), f"its folder {ledger.parent} does not exist",
                          "create the folder (on persistent storage) or fix the path")
    problem = folder_write_problem(ledger.parent)
    if problem:  # fail at start-up, before the node serves a single round
        raise ConfigError("ledger", str(ledger), f"its folder {ledger.parent}: {problem}",
                          "let the SuperNode's user write to that folder, or choose a writable ledger path")
    accountant = str(config.get("accountant", "prv"))
    try:
        check_accountant(accountant)
    except PrivacyError as error:
        raise ConfigError("accountant", accountant, str(error), _fix("accountant", '"prv"')) from None
    key = config.get("ledger-key")
    key_path = Path(_text(config, "ledger-key", '"/etc/fedpriv/ledger.key"')).expanduser().resolve() if key else None
    if key_path is not None and key_path.parent == ledger.resolve().parent:
        log.warning("ledger-key %s is in the ledger's own folder: whoever can write the ledger can then "
                    "forge it; keep the key on another disk or under another user", key_path)
    return NodeSettings(name=name, data=data.resolve(), dataset=_dataset_flag(config), budget_epsilon=budget,
                        delta=delta, ledger=ledger.resolve(), accountant=accountant,
                        allow_non_private=_flag(config, "allow-non-private"), threads=_threads(config),
                        ledger_key=key_path, min_records=_limit(config, "min-records", 10, 1),
                        max_local_epochs=_limit(config, "max-local-epochs", 20, 1),
                        min_noise_multiplier=float(_limit(config, "min-noise-multiplier", 0.3, 0.3, whole=False)),
                        max_epsilon_per_round=_cap(config, "max-epsilon-per-round"),
                        max_epsilon_per_run=_cap(config, "max-epsilon-per-run"),
                        share_validation_metrics=_flag(config, "share-validation-metrics"),
                        val_fraction=_val_fraction(config, data), privacy_unit=_privacy_unit(config),
                        max_images_per_patient=(None if config.get("max-images-per-patient") in (None, "")
                                                else _limit(config, "max-images-per-patient", 1, 1)),
                        device=check_device(config.get("device") or "auto", fix=_fix("device", '"auto"')),
                        attributes_csv=_attributes_csv(config, data))


def _attributes_csv(config: Mapping[str, Any], data: Path) -> Path | None:
    """The image folder's attributes CSV (absolute), checked to exist; None when not given."""
    if config.get("attributes-csv") in (None, ""):
        return None
    given = Path(_text(config, "attributes-csv", '"attributes.csv"')).expanduser()
    if data.is_file():
        raise ConfigError("attributes-csv", str(given), "applies to image folders only; an npz carries its patient "
                          "ids in a train_patient_ids array", "drop attributes-csv, or store the ids in the npz")
    # A relative name is the folder's own file first (a CSV shipped with the images), else from here.
    for candidate in ((data / given, given) if not given.is_absolute() else (given,)):
        if candidate.is_file():
            return candidate.resolve()
    raise ConfigError("attributes-csv", str(given), f"no such file (looked in {data} and the working folder)",
                      "point attributes-csv at the CSV with the images' path and patient_id columns")


def _privacy_unit(config: Mapping[str, Any]) -> str:
    """What one record of the hospital's guarantee is: "image" (default) or "patient"."""
    unit = str(config.get("privacy-unit") or "image").strip()
    if unit not in ("image", "patient"):
        raise ConfigError("privacy-unit", unit, "must be image or patient", _fix("privacy-unit", '"patient"'))
    return unit


def _val_fraction(config: Mapping[str, Any], data: Path) -> float:
    """The image folder's validation hold-out (0: none); an npz brings its own val split."""
    if config.get("val-fraction") in (None, ""):
        return 0.0
    value = _number(config, "val-fraction", "0.1")
    if not 0 <= value < 1:
        raise ConfigError("val-fraction", config["val-fraction"], "must be at least 0 and below 1",
                          _fix("val-fraction", "0.1"))
    if value and data.is_file():
        raise ConfigError("val-fraction", value, "applies to image folders only; an npz brings its own val split",
                          "drop val-fraction, or store val_images/val_labels in the npz")
    return value


def _cap(config: Mapping[str, Any], key: str) -> float | None:
    """An epsilon cap of the hospital's own: absent means none."""
    if config.get(key) in (None, ""):
        return None
    value = _number(config, key, "1")
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(key, config[key], "must be a finite number above 0", _fix(key, "1"))
    return value


def _limit(config: Mapping[str, Any], key: str, default: float, lowest: float, whole: bool = True) -> Any:
    """A hospital's own limit: absent means the default; it can never go below `lowest`."""
    if config.get(key) in (None, ""):
        return default
    value = _number(config, key, str(default))
    if value < lowest or (whole and value != int(value)):
        kind = "a whole number" if whole else "a number"
        raise ConfigError(key, config[key], f"must be {kind} >= {lowest:g}", _fix(key, str(default)))
    return int(value) if whole else value


def _npz_size(file: Path, flag: str) -> int:
    """The image size a MedMNIST npz file name stands for: `flag.npz` is 28, `flag_64.npz` is 64."""
    if file.name == f"{flag}.npz":
        return 28
    match = re.fullmatch(rf"{re.escape(flag)}_(\d+)\.npz", file.name)
    if not match:
        raise ConfigError("data", str(file), f"an npz must be named {flag}.npz or {flag}_<size>.npz "
                          "(MedMNIST layout)", "rename the file, or set dataset= to its MedMNIST flag")
    return int(match.group(1))


def load_hospital_data(settings: NodeSettings, image_size: int) -> HospitalData:
    """Load the hospital's records from `settings.data` (npz file, npz folder or image folder).

    An npz: ``train`` required, ``val`` read when present, ``test`` never read. An image folder: every
    image trains, except the ``val-fraction`` held out for validation. No test split is made.
    """
    from fedpriv.data.medmnist import load_medmnist, npz_filename  # deferred: loads torch (see the imports)

    data = settings.data
    npz = None
    if data.is_file():
        npz = (_npz_size(data, settings.dataset), data.parent)
    elif (data / npz_filename(settings.dataset, image_size)).is_file():
        npz = (image_size, data)
    if npz is not None:
        # Content ids: the hospital's own file may gain scans or be re-ordered; ids follow the images.
        dataset = load_medmnist(settings.dataset, npz[0], str(npz[1]), False, record_ids="content",
                                required=("train",), optional=("val",))
        train, validation = dataset.train, dataset.val
        where = f"its val arrays ({len(validation)} images)" if len(validation) else "none: the npz has no val arrays"
    else:
        dataset, train, validation = _image_folder(data, image_size, settings.val_fraction, settings.attributes_csv)
        held = "whole patients" if train.patient_ids is not None else "images"
        where = (f"{settings.val_fraction:g} of the folder's images, held out as {held} ({len(validation)} images)"
                 if len(validation) else "none: every image trains (set val-fraction to hold some out)")
    if settings.privacy_unit == "patient" and train.patient_ids is None:
        # Caught here, at start-up: a hospital that cannot say whose images it holds cannot protect patients.
        raise ConfigError("privacy-unit", "patient", f"the hospital's data {dataset.source} carries no patient ids",
                          "image folder: give attributes-csv a CSV with path and patient_id columns; npz: add a "
                          "train_patient_ids array; or set privacy-unit=\"image\"")
    log.info("hospital %s: training on %d images from %s; validation split: %s", settings.name, len(train),
             dataset.source, where)
    return HospitalData(train, validation, dataset.in_channels,
                        dataset.num_classes, dataset.image_size, dataset.source)


def _image_folder(data: Path, image_size: int, val_fraction: float, attributes_csv: Path | None = None):
    """(dataset, train, validation) of an image folder: all images, less a validation hold-out (stratified
    by class; whole patients, at random, when the images carry patient ids)."""
    from fedpriv.data.imagefolder import load_image_records  # deferred: loads torch (see the imports)

    dataset = load_image_records(str(data), image_size,
                                 attributes_csv=None if attributes_csv is None else str(attributes_csv))
    everything = dataset.train
    if not val_fraction:
        return dataset, everything, everything.subset([])
    if everything.patient_ids is not None:  # a patient's images never sit on both sides
        from fedpriv.data.splits import hold_out  # deferred: loads torch (see the imports)

        train, validation = hold_out(np.arange(len(everything)), val_fraction, np.random.default_rng(0),
                                     everything.patient_ids)
        if not len(validation):
            raise ConfigError("val-fraction", val_fraction, f"holds out no whole patient of {data} (each patient "
                              "has more images than that share)", "raise val-fraction, or set val-fraction=0")
        return dataset, everything.subset(train), everything.subset(validation)
    from sklearn.model_selection import train_test_split

    labels = everything.labels.numpy()
    try:
        train, validation = train_test_split(np.arange(len(labels)), test_size=val_fraction, stratify=labels,
                                             random_state=0)
    except ValueError as error:
        raise ConfigError("val-fraction", val_fraction, f"cannot hold out a stratified validation split from "
                          f"{data} ({error})", "lower val-fraction, add images, or set val-fraction=0") from None
    return dataset, everything.subset(np.sort(train)), everything.subset(np.sort(validation))


# Flower may serve many messages from one process (`--isolation process`): load the data once.
_DATA: dict[str, HospitalData] = {}


def cached_hospital_data(settings: NodeSettings, image_size: int, node_config: Mapping[str, Any]) -> HospitalData:
    """`load_hospital_data`, cached per process by the node config (and the requested image size)."""
    key = json.dumps({"node-config": {k: str(v) for k, v in sorted(node_config.items())}, "size": image_size})
    if key not in _DATA:
        _DATA.clear()
        _DATA[key] = load_hospital_data(settings, image_size)
    return _DATA[key]


def expected_shape(dataset_name: str) -> tuple[int, int] | None:
    """(channels, classes) the run's model is built for, when the run's dataset name tells; else None."""
    if dataset_name == "synthetic":
        return 1, 2
    if dataset_name == "imagefolder":
        return None
    from fedpriv.data.medmnist import medmnist_info  # deferred: loads torch (see the imports)

    info = medmnist_info().get(dataset_name)
    return (int(info["n_channels"]), len(info["label"])) if info else None


def check_compatible(cfg: FedprivConfig, data: HospitalData) -> None:
    """Refuse, naming `data`, hospital records the run's model cannot take (instead of a shape error)."""
    shape = expected_shape(cfg.dataset.name)
    if shape is not None and shape != (data.in_channels, data.num_classes):
        raise ConfigError("data", data.source, f"holds {data.in_channels}-channel images of {data.num_classes} "
                          f"classes, but the run's model ({cfg.dataset.name}) takes {shape[0]}-channel images of "
                          f"{shape[1]} classes", "point data= at records of the federation's task")
    if data.image_size != cfg.dataset.size:
        raise ConfigError("data", data.source, f"holds {data.image_size}-pixel images, but the run uses "
                          f"dataset.size={cfg.dataset.size}", "provide the npz of that size")


def hospital_settings(settings: NodeSettings) -> HospitalSettings:
    """The :class:`~fedpriv.hospital.HospitalSettings` of a deployed hospital (always with a budget)."""
    from fedpriv.hospital import HospitalSettings  # deferred: loads torch (see the imports)

    return HospitalSettings(name=settings.name, budget_epsilon=settings.budget_epsilon, delta=settings.delta,
                            ledger_path=settings.ledger, accountant=settings.accountant,
                            allow_non_private=settings.allow_non_private, ledger_key=settings.ledger_key,
                            min_records=settings.min_records, max_local_epochs=settings.max_local_epochs,
                            min_noise_multiplier=settings.min_noise_multiplier,
                            max_epsilon_per_round=settings.max_epsilon_per_round,
                            max_epsilon_per_run=settings.max_epsilon_per_run,
                            share_validation_metrics=settings.share_validation_metrics,
                            unit=settings.privacy_unit, max_images_per_patient=settings.max_images_per_patient,
                            device=resolve_device(settings.device, fix=_fix("device", '"cpu"')))


def deployed_site(context: Context) -> HospitalSite:
    """The hospital this SuperNode serves, from its node config; the run config gives the model only."""
    import torch

    from fedpriv.app_config import config_from_run_config  # deferred: loads torch (see the imports)
    from fedpriv.site import HospitalSite  # deferred: loads torch (see the imports)

    settings = parse_node_config(context.node_config)
    cfg = config_from_run_config(context.run_config)
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    data = cached_hospital_data(settings, cfg.dataset.size, context.node_config)
    check_compatible(cfg, data)
    return HospitalSite(hospital_settings(settings), data.train, data.validation, cfg,
                        data.in_channels, data.num_classes, data.image_size)


@dataclass(frozen=True)
class ProtectedRecords:
    """The records an old ledger protected: the train split of the hospital's data, by its record ids."""

    ids: np.ndarray
    source: str
    image_size: int


def load_protected_records(
    old: OldLedger, data: str | Path, dataset: str, size: int | None = None,
) -> ProtectedRecords:
    """Load the hospital's data as its node does and return the train split whose fingerprint is ``old``'s.

    ``data`` is a MedMNIST npz file, a folder holding one, or an image folder (as a node's ``data``);
    record ids are content ids (``record_ids="content"``), as a deployed node uses. For a folder the
    image size is ``size``, else each MedMNIST size is tried (the fingerprint covers the shape, so
    only the size the old ledger saw can match). Raises LedgerError, nothing written, when no
    candidate's fingerprint is the old ledger's; DataError/ConfigError for unusable data.
    """
    from fedpriv.data import dataset_fingerprint  # deferred: loads torch (see the imports)
    from fedpriv.data.medmnist import SIZES, medmnist_2d_flags, npz_filename  # deferred: loads torch (see the imports)

    if dataset not in medmnist_2d_flags() or dataset == "chestmnist":
        raise DataError(f"--dataset {dataset!r} must be a single-label MedMNIST 2D flag (it names the npz layout): "
                        f"one of {', '.join(f for f in medmnist_2d_flags() if f != 'chestmnist')}")
    data = Path(data).expanduser()
    if not data.exists():
        raise DataError(f"no data at {data}: point --data at the hospital's MedMNIST npz, a folder holding one, "
                        "or its image folder")
    data = data.resolve()
    settings = NodeSettings(name="migration", data=data, dataset=dataset, budget_epsilon=old.budget_epsilon,
                            delta=old.delta, ledger=old.path, accountant=old.accountant)
    if data.is_file():
        sizes = [s for s in SIZES if data.name == npz_filename(dataset, s)]
        if not sizes:
            raise DataError(f"{data}: an npz must be named {dataset}.npz or {dataset}_<size>.npz (MedMNIST layout); "
                            "rename it, or give its MedMNIST flag with --dataset")
    elif size is not None:
        sizes = [size]
    else:
        present = [s for s in SIZES if (data / npz_filename(dataset, s)).is_file()]
        sizes = present or list(SIZES)
    tried = []
    for candidate in sizes:
        loaded = load_hospital_data(settings, candidate)
        fingerprint = dataset_fingerprint(loaded.train)
        if fingerprint == old.fingerprint:
            return ProtectedRecords(np.asarray(loaded.train.ids(), dtype=str), loaded.source, loaded.image_size)
        tried.append(f"{loaded.source} at {loaded.image_size} pixels: {len(loaded.train)} train records, "
                     f"fingerprint {fingerprint[:16]}...")
    raise LedgerError(
        f"the data is not the record set ledger {old.path} protects (fingerprint {old.fingerprint[:16]}...); "
        f"tried {'; '.join(tried)}. Nothing was written. Fix: point --data at the exact data the node trained "
        "on (same images, labels, order and size; --dataset names an npz's flag, --size an image folder's size)")
