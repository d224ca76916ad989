"""Flower ClientApp: one hospital. Message handlers only; the work is in fedpriv.hospital.

- train: private local training under the hospital's own ledger, or a clear locked/refused status.
- evaluate: metrics on the hospital's private validation split (NOT covered by the DP guarantee).
- query: the hospital's name and budget state, so the server can map node ids to hospitals.

In simulation the hospital's settings come from the experiment config (`federation` section) and
its partition id; its ledger lives in `federation.ledger_dir` (default: the run directory).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from fedpriv.app_config import CONFIG_KEY, RUN_DIR_KEY, config_from_run_config, config_to_json
from fedpriv.config import FedprivConfig
from fedpriv.data import LabeledImages, dataset_fingerprint
from fedpriv.errors import ConfigError, FedprivError, LedgerError
from fedpriv.experiment import Experiment, prepare_experiment
from fedpriv.faults import injected_corruption, injected_fault
from fedpriv.hospital import (
    REFUSED,
    HospitalSettings,
    RoundOutcome,
    RoundRequest,
    budget_state,
    train_round,
)
from fedpriv.models import build_model
from fedpriv.privacy.ledger import read_ledger
from fedpriv.training import evaluate

app = ClientApp()

NOT_COVERED = "computed on the hospital's private validation data: NOT covered by the DP guarantee"


@dataclass
class HospitalSite:
    """Everything one hospital's handlers need: its settings, data and model factory."""

    settings: HospitalSettings
    train: LabeledImages
    validation: LabeledImages
    fingerprint: str
    config: FedprivConfig
    in_channels: int
    num_classes: int
    image_size: int

    def new_model(self) -> torch.nn.Module:
        return build_model(self.config.model.name, in_channels=self.in_channels, num_classes=self.num_classes,
                           image_size=self.image_size, width=self.config.model.width,
                           activation=self.config.model.activation)


# Ray actors serve many messages: keep each prepared experiment (data + partition) per process.
_EXPERIMENTS: dict[str, Experiment] = {}


def _experiment(cfg: FedprivConfig) -> Experiment:
    key = config_to_json(cfg)
    if key not in _EXPERIMENTS:
        _EXPERIMENTS.clear()
        _EXPERIMENTS[key] = prepare_experiment(cfg)
    return _EXPERIMENTS[key]


def ledger_directory(cfg: FedprivConfig, run_config) -> Path:
    if cfg.federation.ledger_dir:
        return Path(cfg.federation.ledger_dir)
    run_dir = str(run_config.get(RUN_DIR_KEY, "") or "outputs/flwr")
    return Path(run_dir) / "ledgers"


# A Ray worker plays many hospitals, each many times a run. Parsing and checking the run's config
# alone takes ~15 ms, so each hospital's site is built once per run (its ledger is still opened
# from disk for every message: the budget state is never cached).
_SITES: dict[tuple[str, str, int], HospitalSite] = {}


def simulated_site(context: Context) -> HospitalSite:
    """The hospital this simulated node plays: the partition-id-th hospital of the experiment."""
    run = (str(context.run_config.get(CONFIG_KEY, "")), str(context.run_config.get(RUN_DIR_KEY, "")))
    key = (*run, int(context.node_config["partition-id"]))
    site = _SITES.get(key)
    if site is None:
        if any(cached[:2] != run for cached in _SITES):  # another run: forget the last one's sites
            _SITES.clear()
        site = _SITES[key] = _new_simulated_site(context)
    torch.set_num_threads(site.config.federation.client_cpus)
    return site


def _new_simulated_site(context: Context) -> HospitalSite:
    cfg = config_from_run_config(context.run_config)
    experiment = _experiment(cfg)
    index = int(context.node_config["partition-id"])
    hospital = experiment.hospitals[index]
    train = experiment.hospital_data(index)
    fingerprint = dataset_fingerprint(train)
    private = cfg.privacy.enabled
    settings = HospitalSettings(
        name=hospital.name,
        budget_epsilon=hospital.epsilon if private else None,
        delta=hospital.delta,
        # Keyed by the data's fingerprint: a renamed hospital or a fresh config gets no fresh budget.
        ledger_path=ledger_directory(cfg, context.run_config) / f"ledger-{fingerprint[:16]}.db" if private else None,
        accountant=cfg.privacy.accountant,
        allow_non_private=not private,
        noise_seed=cfg.privacy.noise_seed,
    )
    dataset = experiment.dataset
    return HospitalSite(settings, train, experiment.hospital_validation(index), fingerprint, cfg,
                        dataset.in_channels, dataset.num_classes, dataset.image_size)


def _site(context: Context) -> HospitalSite:
    """Simulation nodes carry a partition id; a deployed hospital's node config names its own data."""
    if "partition-id" in context.node_config:
        return simulated_site(context)
    from fedpriv.deployment.node import deployed_site

    return deployed_site(context)


def _status_record(name: str, status: str, message: str) -> ConfigRecord:
    return ConfigRecord({"hospital": name, "status": status, "message": message})


def _unusable_site(msg: Message, context: Context, error: FedprivError) -> Message:
    """The reply of a hospital whose own setup (node config, data) is wrong: refused, with the one-line cause."""
    name = str(context.node_config.get("name", f"node-{context.node_id}"))
    logging.getLogger("fedpriv").error("hospital %s cannot take part: %s", name, error)
    outcome = RoundOutcome(name, REFUSED, str(error), epsilon=math.nan)
    return Message(content=RecordDict({"metrics": MetricRecord(outcome.metrics()),
                                       "status": _status_record(name, REFUSED, str(error))}), reply_to=msg)


def _global_model(site: HospitalSite, msg: Message) -> torch.nn.Module:
    """The server's model, loaded into this hospital's architecture; ConfigError if they do not fit."""
    model = site.new_model()
    try:
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    except (RuntimeError, KeyError) as exc:
        raise ConfigError("model", site.config.model.name, f"the federation's weights do not fit hospital "
                          f"{site.settings.name}'s model for its records ({str(exc).splitlines()[0][:160]})",
                          "give every hospital records of the same task (classes, channels, image size)") from None
    return model


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train one round under the hospital's budget; a spent budget is a status, not an error."""
    try:
        site = _site(context)
        model = _global_model(site, msg)
        request = RoundRequest.from_record(dict(msg.content["config"]))
        request.check(site.num_classes)
    except FedprivError as error:
        return _unusable_site(msg, context, error)
    try:
        outcome = train_round(model, site.train.as_dataset(), site.settings, request, fingerprint=site.fingerprint,
                              after_charge=injected_fault(context, site.config, request.server_round))
    except FedprivError as error:  # e.g. a corrupt ledger or a full disk: refuse (fail closed), say why
        logging.getLogger("fedpriv").error("hospital %s: %s", site.settings.name, error)
        outcome = budget_failure(site, told_to_server(error))
    content = RecordDict({"metrics": MetricRecord(outcome.metrics()),
                          "status": _status_record(site.settings.name, outcome.status, outcome.message)})
    if outcome.state_dict is not None:
        content["arrays"] = ArrayRecord(injected_corruption(context, site.config, request.server_round,
                                                            outcome.state_dict))
    return Message(content=content, reply_to=msg)


def told_to_server(error: FedprivError) -> str:
    """What the server learns of a hospital's own failure: the cause, not its paths or fingerprints."""
    if isinstance(error, LedgerError):
        return f"refused to train: {error.reason}; nothing was trained (details in the hospital's own log)"
    return str(error)


def budget_failure(site: HospitalSite, message: str) -> RoundOutcome:
    """A refusal for a hospital whose ledger cannot be used (fail closed: nothing is trained).

    It reports the ledger's figures where the ledger can still be read (e.g. a full disk); where it
    cannot, epsilon is NaN (unknown), and the server keeps the figures it last received.
    """
    outcome = RoundOutcome(site.settings.name, REFUSED, message, epsilon=math.nan, delta=site.settings.delta,
                           budget_epsilon=site.settings.budget_epsilon or math.inf)
    path = site.settings.ledger_path
    if path is not None and path.is_file():
        try:
            with read_ledger(path) as ledger:
                if ledger.fingerprint == site.fingerprint:
                    outcome.with_status(ledger.status())
        except FedprivError:
            logging.getLogger("fedpriv").debug("ledger %s unreadable too", path, exc_info=True)
    return outcome


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    """Evaluate the received model on the hospital's private validation split."""
    try:
        site = _site(context)
        model = _global_model(site, msg)
    except FedprivError as error:
        return _unusable_site(msg, context, error)
    metrics = {"num-examples": 0}
    started = time.perf_counter()
    if len(site.validation):
        metrics = evaluate(model, site.validation.as_dataset()).metrics()
    metrics["eval-seconds"] = time.perf_counter() - started
    metrics = {key: float(value) for key, value in metrics.items() if not math.isnan(value)}
    metrics["dp-covered"] = 0.0
    return Message(content=RecordDict({"metrics": MetricRecord(metrics),
                                       "status": _status_record(site.settings.name, "evaluated", NOT_COVERED)}),
                   reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Report the hospital's name and current budget state (reads the ledger, spends nothing)."""
    try:
        site = _site(context)
    except FedprivError as error:
        return _unusable_site(msg, context, error)
    try:
        state = budget_state(site.settings, site.fingerprint)
        status, message = ("locked" if state.locked else "open"), ""
    except FedprivError as error:
        logging.getLogger("fedpriv").error("hospital %s: %s", site.settings.name, error)
        message = told_to_server(error)
        state, status = budget_failure(site, message), "refused"
    metrics = state.metrics()
    metrics["num-examples"] = len(site.train)
    return Message(content=RecordDict({"metrics": MetricRecord(metrics),
                                       "status": _status_record(site.settings.name, status, message)}),
                   reply_to=msg)
