"""Typed configuration schema and its validation.

The dataclasses below are registered in Hydra's ConfigStore as the schema of `conf/config.yaml`, so a
misspelt key or a value of the wrong type fails when the config is composed. Semantic checks
(ranges, names, combinations) live in :func:`validate_config` and run before any data is read;
the checks that need the data (sizes of hospitals) live in :func:`validate_against_data` and run
before any training, so no privacy budget is spent on a config that cannot work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from fedpriv.attacks.settings import AuditConfig
from fedpriv.data.medmnist import medmnist_2d_flags
from fedpriv.devices import resolve_device
from fedpriv.errors import ConfigError
from fedpriv.models import ACTIVATIONS
from fedpriv.privacy.accounting import ACCOUNTANTS

MODEL_NAMES = ("cnn", "resnet18", "scatnet")
PARTITION_SCHEMES = ("iid", "dirichlet", "quantity")
STRATEGY_MODES = ("parallel", "sequential")
SEQUENTIAL_STEPS = ("full", "share")  # see fedpriv.aggregation.sequential_weight
# Requests waiting at the SuperLink at once (strategy.max_in_flight): enough to keep every simulated
# worker, or 64 deployed hospitals, busy; bounded so that Flower's per-poll scan stays small.
MAX_IN_FLIGHT = 64
LEDGER_SCOPES = ("persistent", "run")  # see FederationConfig.ledger_scope
PRIVACY_UNITS = ("image", "patient")  # see PrivacyConfig.unit
MEDMNIST_SIZES = (28, 64, 128, 224)
RAY_LOCAL, RAY_AUTO = "local", "auto"  # see FederationConfig.ray_address
NON_MEDMNIST_DATASETS = ("imagefolder", "synthetic")


@dataclass
class DatasetConfig:
    """Which images to load and from where."""

    name: str = "pneumoniamnist"  # a MedMNIST 2D flag, "imagefolder" or "synthetic"
    root: Optional[str] = None  # MedMNIST npz folder; None: $FEDPRIV_DATA_DIR, else the user cache
    size: int = 28  # image side in pixels (MedMNIST: 28/64/128/224)
    download: bool = False  # let medmnist download a missing npz (needs internet)
    path: Optional[str] = None  # image folder: one subfolder per class
    attributes_csv: Optional[str] = None  # image folder: per-image attributes (column "path")
    val_fraction: float = 0.1  # image folder / synthetic: share held out for validation
    test_fraction: float = 0.2  # image folder / synthetic: share held out for testing
    num_samples: int = 1200  # synthetic: number of images in all splits
    # Synthetic: None (default) gives no patient ids (one image, one unknown patient); k >= 1 groups the
    # images into patients of 1..k images each (uniformly drawn), every image of a patient with its label.
    images_per_patient: Optional[int] = None
    # Share of each class in the population the model will see, from a PUBLIC source (published
    # counts, registry prevalence), one number per class; used by train.logit_adjustment. Never
    # estimate it from a hospital's records at run time: the counts themselves would leak.
    class_prior: Optional[list[float]] = None


@dataclass
class ModelConfig:
    """Which network to train; every option is Opacus-compatible (GroupNorm, no BatchNorm)."""

    name: str = "cnn"
    width: int = 16  # channels of the CNN's first block (doubles per block)
    activation: str = "tanh"  # CNN, scatnet: "tanh" (better under DP-SGD) or "relu"; ResNet-18 keeps ReLU
    # scatnet only: its fixed scattering front end (fedpriv.scatnet). Scale J (None: by image size, 2 at 28 px),
    # orientations L and order (1 or 2); `width` is then the channels of its head's convolution.
    scale: Optional[int] = None
    orientations: int = 8
    order: int = 2


@dataclass
class PrivacyConfig:
    """DP-SGD settings and each hospital's default budget."""

    enabled: bool = True  # false only through the explicit `privacy=none` option: epsilon = inf
    epsilon: float = 3.0  # budget per hospital, cumulative over every use of its data
    delta: float = 1e-5
    max_grad_norm: float = 1.0  # per-sample clipping bound C
    noise_multiplier: Any = "auto"  # "auto": calibrated to spend the budget; or a fixed sigma >= 0
    accountant: str = "prv"  # "prv" (tight, default) or "rdp"
    max_physical_batch_size: int = 128  # memory cap; logical (Poisson) batches are split to fit
    # Simulation only: seed every simulated hospital's DP noise and sampling from this number, so an
    # experiment repeats exactly. Whoever knows it can regenerate the noise, so a run with it set is
    # NOT private against them (the summary says so). Unset (default): fresh OS entropy every round.
    # A deployed hospital never takes it from the server.
    noise_seed: Optional[int] = None
    # What one record of the guarantee is: "image" (each image protected on its own; a patient with k
    # images only at about k x epsilon) or "patient" (user-level DP-SGD: all of a patient's images together;
    # needs patient ids in the data). Fixed per ledger: a ledger refuses a switch of unit.
    unit: str = "image"
    # unit=patient: at most this many of a sampled patient's images enter one step's per-patient gradient,
    # drawn at random (None: all of them). Bounds the cost of a patient with many images; privacy is the same.
    max_images_per_patient: Optional[int] = None


@dataclass
class TrainConfig:
    """Local optimisation at each hospital."""

    # Defaults chosen for DP-SGD (see BENCHMARKS.md): larger batches with plain SGD beat small,
    # momentum-driven batches once gradients are clipped and noised; and many short rounds (one local
    # epoch each) beat a few long ones: the noisy local models are combined, and drift apart, less.
    batch_size: int = 128  # expected (Poisson) batch size: sample rate = batch_size / records
    local_epochs: int = 1
    lr: float = 1.0
    # The learning rate falls linearly over the rounds, from lr in round 1 to lr * lr_final in the
    # last: late rounds then add less DP noise to a model that is already good (1.0 = constant).
    lr_final: float = 0.3
    momentum: float = 0.0
    # Logit adjustment strength tau: the training loss sees logits + tau * log(dataset.class_prior),
    # so the model leans less towards the majority class (0 = plain cross-entropy; no effect when
    # the dataset declares no class_prior). Costs no privacy: the prior is public, fixed in advance.
    logit_adjustment: float = 3.0


@dataclass
class StrategyConfig:
    """How the federation schedules hospitals."""

    mode: str = "parallel"  # "parallel" (FedAvg) or "sequential" (cyclic weight transfer)
    num_rounds: int = 40  # with train.local_epochs=1: 40 passes over each hospital's data
    shuffle_order: bool = False  # sequential: shuffle the hospital order each round (by seed)
    round_timeout: float = 1800.0  # seconds to wait for hospitals' replies before skipping them
    # Ask hospitals for metrics on their private validation splits: NOT covered by epsilon (computed
    # without noise), so off by default; a deployed hospital answers only with share-validation-metrics.
    client_evaluate: bool = False
    spend_remaining: bool = False  # hospitals train the steps that still fit, then lock
    max_update_norm_ratio: float = 10.0  # reject updates whose norm exceeds this many times the median
    # Parallel mode: the global model moves server_lr times the averaged update (1.0 = plain FedAvg).
    server_lr: float = 1.5
    # Sequential mode: "share" moves the model towards a small hospital's weights in proportion to its
    # share of the records (capped at a full step); "full" takes every hospital's weights as they are.
    sequential_step: str = "share"
    # At most this many requests wait at the SuperLink at once (0: all of a round's at once). Flower's
    # in-memory link state scans every waiting message on every node's poll; see fedpriv.message_window.
    max_in_flight: int = MAX_IN_FLIGHT


@dataclass
class HospitalConfig:
    """One simulated hospital; unset fields fall back to the federation/privacy defaults."""

    name: str = "hospital"
    epsilon: Optional[float] = None
    delta: Optional[float] = None
    share: Optional[float] = None  # fraction of the training split (quantity partition)
    # The hospital's own limits (as a deployed hospital's node config sets them); the server's
    # request can only ask for less. None: fedpriv's defaults (no epsilon caps, sigma >= 0.3, <= 20 epochs).
    max_epsilon_per_round: Optional[float] = None
    max_epsilon_per_run: Optional[float] = None
    min_noise_multiplier: Optional[float] = None
    max_local_epochs: Optional[int] = None


@dataclass
class FederationConfig:
    """Who takes part and how the training split is divided among them."""

    num_hospitals: int = 3
    partition: str = "dirichlet"  # "iid", "dirichlet" (label skew) or "quantity" (size skew)
    alpha: float = 0.5  # Dirichlet concentration: smaller is more skewed
    hospitals: list[HospitalConfig] = field(default_factory=list)
    # Where the simulated hospitals' privacy ledgers live (see fedpriv.experiment.ledger_folder).
    # "persistent" (default): ledgers that outlive every run, so each hospital's budget is spent once over
    # every use of its data: in ledger_dir if set, else $FEDPRIV_LEDGER_DIR, else the user data folder
    # (platformdirs' user_data_dir("fedpriv")/ledgers). "run": a throw-away ledger in the run directory,
    # so the budget is enforced within that run only (sweeps on public benchmark data, demos).
    ledger_scope: str = "persistent"
    ledger_dir: Optional[str] = None  # scope "persistent": the ledgers' folder (None: see above)
    # Scope "run" only, and set by fedpriv, not by hand: the run directory whose ledgers/ this run charges
    # (None: its own). The CLI records it in every run's config.yaml, so `resume=RUN_DIR` keeps charging
    # the throw-away ledgers of the run it continues rather than starting new ones.
    ledger_run_dir: Optional[str] = None
    client_cpus: int = 1  # CPU cores per simulated hospital (Ray resources and torch threads)
    # GPUs per simulated hospital (Ray resources): a fraction such as 0.25 lets 4 hospitals share one GPU.
    # It only limits how many run at once; Ray does not enforce GPU memory.
    client_gpus: float = 0.0
    # A running Ray cluster to simulate on: its head's "HOST:PORT" (or "auto": the one started on this
    # machine). "" (default): $RAY_ADDRESS if set, else a local Ray that fedpriv starts and stops;
    # "local": always a local Ray. fedpriv never stops a cluster it attached to.
    ray_address: str = ""
    local_val_fraction: float = 0.1  # share of each hospital's records it keeps for private validation


@dataclass
class FaultsConfig:
    """Fault injection, for reliability tests and benchmarks only: off by default.

    Applies to simulated hospitals only; a deployed hospital never takes it from the run config.
    """

    # Probability that a simulated hospital's round raises right after its ledger charge (the
    # worst moment: the budget is spent, nothing is returned). Drawn per (seed, hospital, round).
    train_failure_rate: float = 0.0
    # Probability that a simulated hospital that trained sends weights poisoned with NaN (a buggy or
    # hostile site): the server must reject them before aggregation.
    corrupt_update_rate: float = 0.0


@dataclass
class FedprivConfig:
    """The whole experiment."""

    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    seed: int = 0
    # Where the simulated hospitals train and the server (and fedpriv-audit) evaluate: "auto" (CUDA where
    # there is one, else the CPU), "cpu", "cuda" or "cuda:N"; see fedpriv.devices. A deployed hospital
    # chooses its own (its node config's `device`). Privacy accounting does not depend on it.
    device: str = "auto"
    resume: Optional[str] = None  # a previous run directory: continue from its last checkpoint
    audit: AuditConfig = field(default_factory=AuditConfig)  # used by fedpriv-audit only
    faults: FaultsConfig = field(default_factory=FaultsConfig)  # testing only: injected failures


def register_configs() -> None:
    """Register the schema so `conf/config.yaml` can extend it (`defaults: [fedpriv_schema, ...]`)."""
    store = ConfigStore.instance()
    store.store(name="fedpriv_schema", node=FedprivConfig)


def to_config(cfg: DictConfig | FedprivConfig) -> FedprivConfig:
    """A typed :class:`FedprivConfig` from a composed DictConfig (or the object itself)."""
    if isinstance(cfg, FedprivConfig):
        return cfg
    typed = OmegaConf.merge(OmegaConf.structured(FedprivConfig), cfg)
    return OmegaConf.to_object(typed)  # type: ignore[return-value]


def _check_class_prior(prior: Optional[list[float]]) -> None:
    if prior is None:
        return
    values = [float(p) for p in prior]
    if len(values) < 2 or not all(math.isfinite(p) and p > 0 for p in values) or abs(sum(values) - 1) > 1e-3:
        raise ConfigError("dataset.class_prior", list(prior),
                          "must hold one share per class, each above 0, summing to 1",
                          "e.g. dataset.class_prior=[0.26,0.74], or null to train without logit adjustment")


def logit_shift(cfg: FedprivConfig, num_classes: int) -> list[float]:
    """What the training loss adds to the logits: tau * log(class prior), or [] for none."""
    prior = cfg.dataset.class_prior
    if prior is None or cfg.train.logit_adjustment == 0:
        return []
    if len(prior) != num_classes:
        raise ConfigError("dataset.class_prior", list(prior),
                          f"has {len(prior)} shares but the dataset has {num_classes} classes",
                          "give one share per class, in class order, or set it to null")
    return [cfg.train.logit_adjustment * math.log(float(p)) for p in prior]


def _positive(key: str, value: float, fix: str) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ConfigError(key, value, "must be a positive number", fix)


def _choice(key: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ConfigError(key, value, f"unknown name; known: {', '.join(options)}", f"set {key} to one of them")


def check_client_gpus(value: float) -> None:
    """federation.client_gpus: a number >= 0; above 1 a whole number (Ray's rule for GPU requests)."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ConfigError("federation.client_gpus", value, "must be a number >= 0",
                          "use 0 (CPU only), a fraction such as 0.25 (4 hospitals per GPU), or 1")
    if value > 1 and value != int(value):
        raise ConfigError("federation.client_gpus", value, "above 1 a GPU share must be a whole number (Ray's rule)",
                          f"use {math.floor(value)} or {math.ceil(value)}, or a fraction up to 1")


def check_ray_address(key: str, value: str) -> None:
    """A Ray cluster address as fedpriv takes it (federation.ray_address or $RAY_ADDRESS): "", "local",
    "auto" or HOST:PORT. Ray Client addresses (ray://) are refused: the simulation runs its driver here."""
    text = str(value).strip()
    if text in ("", RAY_LOCAL, RAY_AUTO):
        return
    if text.startswith("ray://"):
        raise ConfigError(key, value, "a Ray Client address; fedpriv attaches as a driver on a cluster node",
                          "run fedpriv on a node of the cluster and give its head's HOST:PORT, e.g. 10.0.0.5:6379")
    host, colon, port = text.rpartition(":")
    if not (colon and host and "/" not in text and port.isdigit() and 0 < int(port) < 65536):
        raise ConfigError(key, value, "not a Ray cluster address",
                          "give the head's HOST:PORT (e.g. 10.0.0.5:6379), auto, local, or leave it empty")


def resolve_noise_multiplier(value: Any) -> float | None:
    """The configured sigma: None for "auto", else a float >= 0. Raises ConfigError otherwise."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return None
    try:
        sigma = float(value)
    except (TypeError, ValueError):
        sigma = math.nan
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ConfigError(
            "privacy.noise_multiplier", value, "must be 'auto' or a number >= 0",
            "use privacy.noise_multiplier=auto to calibrate sigma to the budget, or e.g. 1.1",
        )
    return sigma


def validate_config(cfg: FedprivConfig) -> None:
    """Check every value that can be checked without data. Raises :class:`ConfigError`."""
    data = cfg.dataset
    known = (*medmnist_2d_flags(), *NON_MEDMNIST_DATASETS)
    if data.name not in known:
        raise ConfigError("dataset.name", data.name, f"unknown dataset; known: {', '.join(known)}",
                          "pick one of them, e.g. dataset=pneumoniamnist")
    if data.name == "chestmnist":
        raise ConfigError("dataset.name", data.name, "multi-label tasks are not supported",
                          "use a single-label MedMNIST flag such as pneumoniamnist")
    if data.name not in NON_MEDMNIST_DATASETS and data.size not in MEDMNIST_SIZES:
        raise ConfigError("dataset.size", data.size, "MedMNIST ships sizes 28, 64, 128 and 224 only",
                          "set dataset.size to one of them")
    if data.size < 8:
        raise ConfigError("dataset.size", data.size, "images must be at least 8 pixels wide", "use e.g. 28")
    if data.name == "imagefolder" and not data.path:
        raise ConfigError("dataset.path", data.path, "the image folder needs a location",
                          "set dataset.path=/path/to/folder with one subfolder per class")
    for key in ("val_fraction", "test_fraction"):
        value = getattr(data, key)
        if not 0 < value < 1:
            raise ConfigError(f"dataset.{key}", value, "must be between 0 and 1", f"use e.g. dataset.{key}=0.1")
    if data.val_fraction + data.test_fraction >= 0.9:
        raise ConfigError("dataset.val_fraction", data.val_fraction,
                          "validation and test together leave under 10% for training",
                          "lower dataset.val_fraction or dataset.test_fraction")
    if data.name == "synthetic" and data.num_samples < 20:
        raise ConfigError("dataset.num_samples", data.num_samples, "too few images to split",
                          "use at least 20, e.g. dataset.num_samples=600")

    _choice("model.name", cfg.model.name, MODEL_NAMES)
    if cfg.model.width < 4:
        raise ConfigError("model.width", cfg.model.width, "must be at least 4", "use e.g. model.width=16")
    _choice("model.activation", cfg.model.activation, tuple(ACTIVATIONS))
    if cfg.model.name == "resnet18" and cfg.model.activation != "relu":
        raise ConfigError("model.activation", cfg.model.activation, "ResNet-18 uses torchvision's ReLU",
                          "use model=resnet18 as configured (model.activation=relu), or model=cnn")

    privacy = cfg.privacy
    if privacy.enabled:
        _positive("privacy.epsilon", privacy.epsilon, "set a budget such as privacy.epsilon=3")
        if not 0 < privacy.delta < 1:
            raise ConfigError("privacy.delta", privacy.delta, "must be between 0 and 1 (exclusive)",
                              "use a delta well below 1/records, e.g. privacy.delta=1e-5")
        _positive("privacy.max_grad_norm", privacy.max_grad_norm, "use e.g. privacy.max_grad_norm=1.0")
        resolve_noise_multiplier(privacy.noise_multiplier)
        _choice("privacy.accountant", privacy.accountant, ACCOUNTANTS)
    _choice("privacy.unit", privacy.unit, PRIVACY_UNITS)
    if privacy.max_images_per_patient is not None and privacy.max_images_per_patient < 1:
        raise ConfigError("privacy.max_images_per_patient", privacy.max_images_per_patient, "must be at least 1",
                          "use e.g. privacy.max_images_per_patient=8, or null for all of a patient's images")
    if data.images_per_patient is not None and data.images_per_patient < 1:
        raise ConfigError("dataset.images_per_patient", data.images_per_patient, "must be at least 1",
                          "use e.g. dataset.images_per_patient=4 (patients of 1 to 4 images), or null")
    if privacy.max_physical_batch_size < 1:
        raise ConfigError("privacy.max_physical_batch_size", privacy.max_physical_batch_size,
                          "must be at least 1", "use e.g. 128")

    train = cfg.train
    if train.batch_size < 1:
        raise ConfigError("train.batch_size", train.batch_size, "must be at least 1", "use e.g. train.batch_size=64")
    if train.local_epochs < 1:
        raise ConfigError("train.local_epochs", train.local_epochs, "must be at least 1", "use e.g. 1")
    _positive("train.lr", train.lr, "use e.g. train.lr=0.1")
    if not 0 <= train.momentum < 1:
        raise ConfigError("train.momentum", train.momentum, "must be in [0, 1)", "use e.g. train.momentum=0.9")
    if not 0 < train.lr_final <= 1:
        raise ConfigError("train.lr_final", train.lr_final, "must be in (0, 1]: a fraction of train.lr",
                          "use e.g. train.lr_final=0.3, or 1 for a constant learning rate")
    if not (math.isfinite(train.logit_adjustment) and train.logit_adjustment >= 0):
        raise ConfigError("train.logit_adjustment", train.logit_adjustment, "must be a number >= 0",
                          "use e.g. train.logit_adjustment=2 (or 0 for plain cross-entropy)")
    _check_class_prior(cfg.dataset.class_prior)

    _choice("strategy.mode", cfg.strategy.mode, STRATEGY_MODES)
    if cfg.strategy.num_rounds < 1:
        raise ConfigError("strategy.num_rounds", cfg.strategy.num_rounds, "must be at least 1", "use e.g. 5")
    _positive("strategy.round_timeout", cfg.strategy.round_timeout, "use e.g. strategy.round_timeout=600")
    _positive("strategy.server_lr", cfg.strategy.server_lr, "use e.g. strategy.server_lr=1 (plain FedAvg)")
    _choice("strategy.sequential_step", cfg.strategy.sequential_step, SEQUENTIAL_STEPS)
    in_flight = cfg.strategy.max_in_flight
    if isinstance(in_flight, bool) or not (isinstance(in_flight, int) and in_flight >= 0):
        raise ConfigError("strategy.max_in_flight", cfg.strategy.max_in_flight, "must be a whole number >= 0",
                          f"use e.g. strategy.max_in_flight={MAX_IN_FLIGHT}, or 0 to send a round's requests at once")
    if not cfg.strategy.max_update_norm_ratio > 1:
        raise ConfigError("strategy.max_update_norm_ratio", cfg.strategy.max_update_norm_ratio, "must be above 1",
                          "use e.g. strategy.max_update_norm_ratio=10")
    if cfg.federation.client_cpus < 1:
        raise ConfigError("federation.client_cpus", cfg.federation.client_cpus, "must be at least 1", "use 1")
    check_client_gpus(cfg.federation.client_gpus)
    check_ray_address("federation.ray_address", cfg.federation.ray_address)
    for key in ("train_failure_rate", "corrupt_update_rate"):
        if not 0.0 <= getattr(cfg.faults, key) < 1.0:
            raise ConfigError(f"faults.{key}", getattr(cfg.faults, key), "must be in [0, 1)",
                              f"use 0 (no injected faults) or e.g. faults.{key}=0.1 for a reliability test")

    fed = cfg.federation
    if fed.num_hospitals < 1:
        raise ConfigError("federation.num_hospitals", fed.num_hospitals, "a federation needs at least 1 hospital",
                          "set federation.num_hospitals=3 (or more)")
    _choice("federation.partition", fed.partition, PARTITION_SCHEMES)
    if not 0 <= fed.local_val_fraction < 0.5:
        raise ConfigError("federation.local_val_fraction", fed.local_val_fraction, "must be in [0, 0.5)",
                          "use e.g. federation.local_val_fraction=0.1 (0 disables hospital-side validation)")
    if fed.partition != "iid":
        _positive("federation.alpha", fed.alpha, "use e.g. federation.alpha=0.5 (smaller is more skewed)")
    _validate_ledger_location(fed)
    _validate_hospitals(cfg)
    resolve_device(cfg.device)  # device=cuda on a machine without CUDA fails here, before anything starts


def _validate_ledger_location(fed: FederationConfig) -> None:
    _choice("federation.ledger_scope", fed.ledger_scope, LEDGER_SCOPES)
    if fed.ledger_scope == "run" and fed.ledger_dir:
        raise ConfigError("federation.ledger_scope", fed.ledger_scope,
                          f"contradicts federation.ledger_dir={fed.ledger_dir!r}: scope 'run' keeps a throw-away "
                          "ledger in the run directory, ledger_dir names a persistent ledger folder",
                          "drop federation.ledger_dir for a throw-away ledger, or use federation.ledger_scope="
                          "persistent to keep the ledgers in that folder")
    if fed.ledger_scope == "persistent" and fed.ledger_run_dir:
        raise ConfigError("federation.ledger_run_dir", fed.ledger_run_dir,
                          "names a run whose throw-away ledgers to charge, but federation.ledger_scope is "
                          "'persistent'", "leave federation.ledger_run_dir unset (fedpriv sets it for scope "
                          "'run'), or use federation.ledger_scope=run")


def _validate_hospitals(cfg: FedprivConfig) -> None:
    hospitals = cfg.federation.hospitals
    if not hospitals:
        return
    if len(hospitals) != cfg.federation.num_hospitals:
        raise ConfigError("federation.hospitals", f"{len(hospitals)} entries",
                          f"federation.num_hospitals is {cfg.federation.num_hospitals}",
                          "list one entry per hospital, or leave the list empty")
    names = [h.name for h in hospitals]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError("federation.hospitals.name", duplicates[0], "hospital names must be unique",
                          "give every hospital its own name")
    for i, hospital in enumerate(hospitals):
        if hospital.epsilon is not None:
            _positive(f"federation.hospitals[{i}].epsilon", hospital.epsilon, "give a positive budget, e.g. 3")
        if hospital.delta is not None and not 0 < hospital.delta < 1:
            raise ConfigError(f"federation.hospitals[{i}].delta", hospital.delta, "must be between 0 and 1",
                              "use e.g. 1e-5")
        for cap in ("max_epsilon_per_round", "max_epsilon_per_run"):
            if getattr(hospital, cap) is not None:
                _positive(f"federation.hospitals[{i}].{cap}", getattr(hospital, cap), f"give a positive cap, e.g. {cap}=1")
        if hospital.min_noise_multiplier is not None and not hospital.min_noise_multiplier >= 0.3:
            raise ConfigError(f"federation.hospitals[{i}].min_noise_multiplier", hospital.min_noise_multiplier,
                              "must be at least 0.3 (fedpriv's own floor)", "use e.g. min_noise_multiplier=0.5")
        if hospital.max_local_epochs is not None and not (
                isinstance(hospital.max_local_epochs, int) and 1 <= hospital.max_local_epochs <= 20):
            raise ConfigError(f"federation.hospitals[{i}].max_local_epochs", hospital.max_local_epochs,
                              "must be a whole number in 1..20", "use e.g. max_local_epochs=5")
    shares = [h.share for h in hospitals]
    if any(s is not None for s in shares):
        if any(s is None or not s > 0 for s in shares):
            raise ConfigError("federation.hospitals.share", shares, "every hospital needs a positive share",
                              "give each hospital a share, e.g. 0.5, 0.3, 0.2")


def validate_against_data(cfg: FedprivConfig, hospital_sizes: list[int], train_size: int) -> None:
    """Checks that need the partition: batch size, delta and emptiness against each hospital's records.

    Runs after the data is split and before any training, so nothing is spent on an impossible plan.
    """
    if cfg.federation.num_hospitals > train_size:
        raise ConfigError("federation.num_hospitals", cfg.federation.num_hospitals,
                          f"the training split has only {train_size} records",
                          "use fewer hospitals or a larger dataset")
    for index, size in enumerate(hospital_sizes):
        if size == 0:
            raise ConfigError("federation.partition", cfg.federation.partition,
                              f"hospital {index} received no records",
                              "raise federation.alpha, use fewer hospitals, or federation.partition=iid")
    smallest = min(hospital_sizes)
    if cfg.train.batch_size > smallest:
        raise ConfigError("train.batch_size", cfg.train.batch_size,
                          f"larger than the smallest hospital's data ({smallest} records)",
                          f"use train.batch_size<={smallest}")
    if cfg.privacy.enabled:
        for delta in {cfg.privacy.delta, *(h.delta for h in cfg.federation.hospitals if h.delta is not None)}:
            if delta >= 1 / smallest:
                raise ConfigError("privacy.delta", delta,
                                  f"must be below 1/records of the smallest hospital (1/{smallest})",
                                  f"use privacy.delta<={0.1 / smallest:.1e}")
