"""How a hospital is assembled: its settings, its records and its model, simulated or deployed.

A simulated hospital is the partition-id-th hospital of the experiment in the run config; a
deployed one takes everything that must stay under its control (data, budget, ledger, limits) from
its own SuperNode's node config (:mod:`fedpriv.deployment.node`). Both end up as a
:class:`HospitalSite`, and every handler of the ClientApp works on that alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedpriv.app_config import CONFIG_KEY, RUN_DIR_KEY, config_from_run_config, config_to_json
from fedpriv.config import FedprivConfig
from fedpriv.data import LabeledImages
from fedpriv.devices import resolve_device
from fedpriv.errors import ConfigError
from fedpriv.experiment import Experiment, ledger_folder, prepare_experiment
from fedpriv.hospital import HospitalSettings, RoundOutcome
from fedpriv.models import build_model
from fedpriv.protocol import Status
from fedpriv.scatnet import precomputed


@dataclass
class HospitalSite:
    """Everything one hospital's handlers need: its settings, data and model factory."""

    settings: HospitalSettings
    train: LabeledImages
    validation: LabeledImages
    config: FedprivConfig
    in_channels: int
    num_classes: int
    image_size: int

    def __post_init__(self) -> None:
        # A model with a fixed, data-independent front end (model=scatnet) trains on what that front end
        # makes of the images: computed here, once per hospital per run, not in every step.
        model = self.new_model()
        self.train, self.validation = precomputed(model, self.train), precomputed(model, self.validation)

    def new_model(self) -> torch.nn.Module:
        model = self.config.model
        return build_model(model.name, in_channels=self.in_channels, num_classes=self.num_classes,
                           image_size=self.image_size, width=model.width, activation=model.activation,
                           scale=model.scale, orientations=model.orientations, order=model.order)

    def global_model(self, state_dict: Mapping[str, torch.Tensor]) -> torch.nn.Module:
        """The server's weights in this hospital's architecture; ConfigError if they do not fit."""
        model = self.new_model()
        try:
            model.load_state_dict(state_dict)
        except (RuntimeError, KeyError) as exc:
            raise ConfigError("model", self.config.model.name, f"the federation's weights do not fit hospital "
                              f"{self.settings.name}'s model for its records ({str(exc).splitlines()[0][:160]})",
                              "give every hospital records of the same task (classes, channels, image size)") from None
        return model

    def refusal(self, message: str) -> RoundOutcome:
        """A refusal for a hospital whose ledger cannot be used (fail closed: nothing is trained).

        Epsilon is NaN (unknown): a ledger that failed its checks is not read again, and the server
        keeps the figures it last received.
        """
        return RoundOutcome(self.settings.name, Status.REFUSED, message, epsilon=math.nan, delta=self.settings.delta,
                            budget_epsilon=self.settings.budget_epsilon)


# Ray actors serve many messages: keep each prepared experiment (data + partition) per process.
_EXPERIMENTS: dict[str, Experiment] = {}


def _experiment(cfg: FedprivConfig) -> Experiment:
    key = config_to_json(cfg)
    if key not in _EXPERIMENTS:
        _EXPERIMENTS.clear()
        _EXPERIMENTS[key] = prepare_experiment(cfg)
    return _EXPERIMENTS[key]


def simulation_ledger_path(cfg: FedprivConfig, run_dir: str | Path | None) -> Path:
    """The ledger every simulated hospital of this data source shares.

    One file per data source, not per hospital or partition: a record's spend must follow it into
    whichever simulated hospital holds it next run (another `num_hospitals`, seed or partition).
    """
    return ledger_folder(cfg, run_dir) / f"simulated-{cfg.dataset.name}.db"


def simulation_ledger_key(cfg: FedprivConfig, ledger: Path) -> Path | None:
    """The key of that ledger: None for the default one (fedpriv.privacy.chain.key_path_for).

    A throw-away ledger keeps its key beside it (it dies with the run); a persistent one uses the
    key folder, apart from the ledger.
    """
    return ledger.parent / "keys" / f"{ledger.stem}.key" if cfg.federation.ledger_scope == "run" else None


# A Ray worker plays many hospitals, each many times a run, so each hospital's site is built once
# per run (its ledger is still opened from disk for every message: the budget state is never cached).
_SITES: dict[tuple[str, str, int], HospitalSite] = {}


def simulated_site(run_config: dict[str, Any], partition_id: int) -> HospitalSite:
    """The hospital this simulated node plays: the partition-id-th hospital of the experiment."""
    run = (str(run_config.get(CONFIG_KEY, "")), str(run_config.get(RUN_DIR_KEY, "")))
    key = (*run, partition_id)
    site = _SITES.get(key)
    if site is None:
        if any(cached[:2] != run for cached in _SITES):  # another run: forget the last one's sites
            _SITES.clear()
        site = _SITES[key] = _new_simulated_site(run, run_config, partition_id)
    torch.set_num_threads(site.config.federation.client_cpus)
    return site


# The run's config, parsed once per run in this process: every hospital of the run shares it (a worker
# playing 500 hospitals parsed it 500 times, ~40 ms each).
_CONFIGS: dict[tuple[str, str], FedprivConfig] = {}


def _run_config(run: tuple[str, str], run_config: dict[str, Any]) -> FedprivConfig:
    if run not in _CONFIGS:
        _CONFIGS.clear()
        _CONFIGS[run] = config_from_run_config(run_config)
    return _CONFIGS[run]


def _new_simulated_site(run: tuple[str, str], run_config: dict[str, Any], index: int) -> HospitalSite:
    cfg = _run_config(run, run_config)
    experiment = _experiment(cfg)
    hospital = experiment.hospitals[index]
    run_dir = str(run_config.get(RUN_DIR_KEY, "") or "outputs/flwr")
    ledger = simulation_ledger_path(cfg, run_dir)
    key = simulation_ledger_key(cfg, ledger)
    own = cfg.federation.hospitals[index] if cfg.federation.hospitals else None
    limits = {name: getattr(own, name) for name in ("max_epsilon_per_round", "max_epsilon_per_run",
                                                     "min_noise_multiplier", "max_local_epochs")
              if own is not None and getattr(own, name) is not None}
    settings = HospitalSettings(
        name=hospital.name,
        budget_epsilon=hospital.epsilon,
        delta=hospital.delta,
        ledger_path=ledger,
        accountant=cfg.privacy.accountant,
        # privacy=none is the explicit request for non-private training: its records' epsilon
        # becomes infinity in the same ledger, and they never train again.
        allow_non_private=not cfg.privacy.enabled,
        noise_seed=cfg.privacy.noise_seed,
        ledger_key=key,
        ledger_budget_epsilon=max(h.epsilon for h in experiment.hospitals),
        # One user configures every simulated hospital and the server: asking for hospital-side
        # evaluation is that user's opt-in to metrics on private validation data.
        share_validation_metrics=cfg.strategy.client_evaluate,
        # The simulated hospitals protect what the run config names: images, or patients (user-level DP).
        unit=cfg.privacy.unit,
        max_images_per_patient=cfg.privacy.max_images_per_patient,
        # Resolved in this hospital's own process: "auto" is CUDA only where this process sees a GPU.
        device=resolve_device(cfg.device),
        **limits,
    )
    dataset = experiment.dataset
    return HospitalSite(settings, experiment.hospital_data(index), experiment.hospital_validation(index), cfg,
                        dataset.in_channels, dataset.num_classes, dataset.image_size)
