"""Settings of the privacy audit (`fedpriv-audit`): which attacks run, and how hard they try.

This module is imported by :mod:`fedpriv.config` (the `audit` section of the schema), so it must not
import the config module back, nor anything heavy: only the dataclass and its data-free checks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from fedpriv.errors import ConfigError

INVERSION_MODELS = ("convnet", "model")


@dataclass
class AuditConfig:
    """The `audit` section of the experiment config (see docs/audit.md)."""

    # Privacy levels attacked besides the non-private baseline; sigma is calibrated per epsilon.
    epsilons: list[float] = field(default_factory=lambda: [1.0, 3.0, 8.0])
    # Membership inference: the audited model is one hospital's model, trained centrally.
    target_records: int = 250  # expected members; the pool of candidate records is twice this
    epochs: int = 80  # passes over the members (one hospital's whole participation)
    shadow_models: int = 6  # per privacy level, trained on records outside the pool (offline LiRA)
    canary_fraction: float = 0.1  # records given a wrong label: outliers DP must protect too
    # The non-private reference trains with plain SGD at this rate: train.lr (1.0) suits DP-SGD's
    # clipped, averaged steps; plain SGD at 1.0 gave a far worse model (PneumoniaMNIST, 250 records,
    # 80 epochs: test accuracy 0.415 / AUC 0.865 against 0.771 / 0.932 at 0.1), a poor reference for
    # what an attacker gets without DP.
    non_private_lr: float = 0.1
    check_fprs: list[float] = field(default_factory=lambda: [0.001, 0.01, 0.1, 0.5])
    confidence: float = 0.95  # of the ceiling check, for all its comparisons together
    # Gradient inversion: one local step on a small batch, seen by an honest-but-curious server.
    inversion_model: str = "convnet"  # "convnet": small attack-friendly net; "model": cfg.model
    inversion_batch_sizes: list[int] = field(default_factory=lambda: [1, 4])
    inversion_iterations: int = 300
    inversion_lr: float = 0.1
    inversion_tv_weight: float = 0.05
    inversion_restarts: int = 1
    inversion_noise_multipliers: list[float] = field(default_factory=list)  # extra sigmas, attacked directly
    threads: int = 1  # torch CPU threads; one is fastest for these small models on a busy machine


def check_audit_config(audit: AuditConfig) -> None:
    """Check every audit value that can be checked without data. Raises :class:`ConfigError`."""
    for index, value in enumerate(audit.epsilons):
        _require(f"audit.epsilons[{index}]", value, math.isfinite(value) and value > 0,
                 "must be a positive, finite epsilon", "list budgets such as audit.epsilons=[1,3,8]")
    _at_least("audit.target_records", audit.target_records, 2, "use e.g. audit.target_records=500")
    _at_least("audit.epochs", audit.epochs, 1, "use e.g. audit.epochs=20")
    _at_least("audit.shadow_models", audit.shadow_models, 1, "use e.g. audit.shadow_models=6")
    _require("audit.canary_fraction", audit.canary_fraction, 0 <= audit.canary_fraction < 1,
             "must be in [0, 1)", "use e.g. audit.canary_fraction=0.1 (0: no mislabelled canaries)")
    _require("audit.non_private_lr", audit.non_private_lr,
             math.isfinite(audit.non_private_lr) and audit.non_private_lr > 0,
             "must be a positive number", "use e.g. audit.non_private_lr=0.1")
    _require("audit.check_fprs", audit.check_fprs, bool(audit.check_fprs) and all(0 < f < 1 for f in audit.check_fprs),
             "needs false-positive rates strictly between 0 and 1", "use e.g. audit.check_fprs=[0.001,0.01,0.1]")
    _require("audit.confidence", audit.confidence, 0 < audit.confidence < 1,
             "must be between 0 and 1", "use e.g. audit.confidence=0.95")
    _require("audit.inversion_model", audit.inversion_model, audit.inversion_model in INVERSION_MODELS,
             f"unknown attack model; known: {', '.join(INVERSION_MODELS)}", "use audit.inversion_model=convnet")
    _require("audit.inversion_batch_sizes", audit.inversion_batch_sizes,
             bool(audit.inversion_batch_sizes) and all(b >= 1 for b in audit.inversion_batch_sizes),
             "needs batch sizes of at least 1", "use e.g. audit.inversion_batch_sizes=[1,4]")
    _at_least("audit.inversion_iterations", audit.inversion_iterations, 1, "use e.g. 300")
    _at_least("audit.inversion_restarts", audit.inversion_restarts, 1, "use e.g. 1")
    _require("audit.inversion_lr", audit.inversion_lr, math.isfinite(audit.inversion_lr) and audit.inversion_lr > 0,
             "must be a positive number", "use e.g. audit.inversion_lr=0.1")
    _require("audit.inversion_tv_weight", audit.inversion_tv_weight,
             math.isfinite(audit.inversion_tv_weight) and audit.inversion_tv_weight >= 0,
             "must be a number >= 0", "use e.g. audit.inversion_tv_weight=0.05")
    _require("audit.inversion_noise_multipliers", audit.inversion_noise_multipliers,
             all(math.isfinite(s) and s >= 0 for s in audit.inversion_noise_multipliers),
             "needs noise multipliers >= 0", "use e.g. audit.inversion_noise_multipliers=[0.01,0.1]")
    _at_least("audit.threads", audit.threads, 1, "use audit.threads=1")


def _require(key: str, value: object, ok: bool, problem: str, fix: str) -> None:
    if not ok:
        raise ConfigError(key, value, problem, fix)


def _at_least(key: str, value: int, minimum: int, fix: str) -> None:
    _require(key, value, isinstance(value, int) and value >= minimum, f"must be an integer >= {minimum}", fix)
