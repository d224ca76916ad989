"""Flower ServerApp: builds the budget-aware strategy, evaluates the global model, writes the run.

The server holds the held-out test split (for PneumoniaMNIST, its official test split) and
evaluates the global model on it after every round. It never sees a hospital's budget settings,
only what hospitals report.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedpriv.app_config import RUN_DIR_KEY, config_from_run_config
from fedpriv.config import FedprivConfig, logit_shift, resolve_noise_multiplier, validate_config
from fedpriv.data import load_server_dataset
from fedpriv.devices import resolve_device
from fedpriv.hospital import RoundRequest
from fedpriv.models import build_model
from fedpriv.outputs import RunRecorder, resume, untrained_reason
from fedpriv.protocol import Metric
from fedpriv.report.run_report import write_run_report
from fedpriv.scatnet import precomputed
from fedpriv.strategy import BudgetAwareStrategy
from fedpriv.training import evaluate

app = ServerApp()
log = logging.getLogger("fedpriv")


def _ensure_logging() -> None:
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s fedpriv: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False  # Flower's and Ray's root handlers would print every line twice


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point of the ServerApp (run by Flower, in simulation or deployment)."""
    _ensure_logging()
    cfg = config_from_run_config(context.run_config)
    run_dir = Path(str(context.run_config.get(RUN_DIR_KEY, "") or f"outputs/flwr/{time.strftime('%Y%m%d-%H%M%S')}"))
    run_federation(grid, cfg, run_dir, run_id=str(context.run_id))


def round_request(cfg: FedprivConfig, run_id: str, num_classes: int) -> RoundRequest:
    """The training plan the server sends: how to train, never how much budget to spend."""
    return RoundRequest(
        run_id=run_id, server_round=0, num_rounds=cfg.strategy.num_rounds, local_epochs=cfg.train.local_epochs,
        batch_size=cfg.train.batch_size, lr=cfg.train.lr, momentum=cfg.train.momentum, private=cfg.privacy.enabled,
        max_grad_norm=cfg.privacy.max_grad_norm, noise_multiplier=resolve_noise_multiplier(cfg.privacy.noise_multiplier)
        if cfg.privacy.enabled else None, spend_remaining=cfg.strategy.spend_remaining,
        max_physical_batch_size=cfg.privacy.max_physical_batch_size, seed=cfg.seed,
        logit_shift=tuple(logit_shift(cfg, num_classes)), lr_final=cfg.train.lr_final,
    )


def run_federation(grid: Grid, cfg: FedprivConfig, run_dir: Path, *, run_id: str) -> BudgetAwareStrategy:
    """Run the configured federation on `grid`, writing outputs into `run_dir`."""
    validate_config(cfg)
    device = resolve_device(cfg.device)
    log.info("device: the server evaluates on %s; simulated hospitals train on device=%s as each resolves it "
             "(a deployed hospital on its node config's device)", device, cfg.device)
    dataset = load_server_dataset(cfg.dataset, cfg.seed)  # the test split; train and val only if present
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model.name, in_channels=dataset.in_channels, num_classes=dataset.num_classes,
                        image_size=dataset.image_size, width=cfg.model.width, activation=cfg.model.activation,
                        scale=cfg.model.scale, orientations=cfg.model.orientations, order=cfg.model.order)
    state, first_round, rounds_trained = model.state_dict(), 1, 0
    if cfg.resume:
        resumed = resume(cfg, model)
        state, first_round, run_id, rounds_trained = (resumed.state_dict, resumed.first_round, resumed.run_id,
                                                      resumed.rounds_trained)
        log.info("resuming run %s from %s (round %d)", run_id, resumed.checkpoint, first_round)
    if cfg.train.logit_adjustment and cfg.dataset.class_prior is None:
        log.info("train.logit_adjustment=%g has no effect: dataset %s declares no public class_prior, so "
                 "hospitals train with plain cross-entropy", cfg.train.logit_adjustment, cfg.dataset.name)
    recorder = RunRecorder(run_dir, cfg, run_id, dataset.describe(), rounds_trained=rounds_trained,
                           server_device=device)
    test = precomputed(model, dataset.test).as_dataset()  # a fixed front end (scatnet) runs once, not every round

    def evaluate_on_test(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        started = time.perf_counter()
        model.load_state_dict(arrays.to_torch_state_dict())
        metrics = evaluate(model, test, device=device).metrics()
        metrics[Metric.EVAL_SECONDS] = time.perf_counter() - started
        return MetricRecord({k: float(v) for k, v in metrics.items()})

    strategy = BudgetAwareStrategy(
        mode=cfg.strategy.mode, expected_hospitals=cfg.federation.num_hospitals,
        shuffle_order=cfg.strategy.shuffle_order, seed=cfg.seed, client_evaluate=cfg.strategy.client_evaluate,
        max_update_norm_ratio=cfg.strategy.max_update_norm_ratio, server_lr=cfg.strategy.server_lr,
        sequential_step=cfg.strategy.sequential_step, max_in_flight=cfg.strategy.max_in_flight,
        on_round_end=lambda record, arrays, hospitals: recorder.round_end(record, arrays.to_torch_state_dict(),
                                                                          hospitals),
    )
    result = strategy.start(
        grid, ArrayRecord(state), num_rounds=cfg.strategy.num_rounds, timeout=cfg.strategy.round_timeout,
        train_config=ConfigRecord(round_request(cfg, run_id, dataset.num_classes).to_record()),
        evaluate_fn=evaluate_on_test, first_round=first_round,
    )
    summary = recorder.finish(result.arrays.to_torch_state_dict(), strategy.hospitals, strategy.stop_reason, strategy.excluded)
    write_run_report(run_dir, dataset=dataset)  # calibration on the public splits, fairness, report.html
    log.info("run finished: %s\n%s", strategy.stop_reason, summary)
    if not recorder.rounds_trained:
        log.warning("%s", untrained_reason(strategy.stop_reason))
    return strategy
