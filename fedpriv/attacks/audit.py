"""The privacy audit: run both attacks on one configuration, at several privacy levels.

What is audited is **one hospital**: its update in one local step (gradient inversion), and the
model trained on its records alone (membership inference), trained centrally with the same
:func:`~fedpriv.training.train_local` and privacy plans a hospital uses in the federation. Every
privacy level of ``cfg.audit.epsilons`` is compared with a non-private baseline.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedpriv import rundir
from fedpriv.attacks.bounds import (
    CeilingCheck,
    PrivacyCeiling,
    check_attack,
    per_bound_confidence,
)
from fedpriv.attacks.figures import RocPanel, save_image_grid, save_roc_plot
from fedpriv.attacks.inversion import (
    ImageScore,
    InversionNet,
    client_update,
    invert_gradients,
    score_reconstructions,
    to_unit,
)
from fedpriv.attacks.membership import (
    REPORTED_FPRS,
    AttackMetrics,
    evaluate_attack,
    lira_offline_scores,
    logit_confidence,
    loss_scores,
    model_logits,
)
from fedpriv.attacks.report import write_report
from fedpriv.attacks.settings import check_audit_config
from fedpriv.config import FedprivConfig, logit_shift, validate_config
from fedpriv.data import LabeledImages, MedicalImageDataset, load_dataset
from fedpriv.devices import resolve_device
from fedpriv.errors import ConfigError
from fedpriv.models import build_model
from fedpriv.privacy.accounting import PrivacyEvent, epsilon
from fedpriv.privacy.plan import PrivacyPlan, plan_local_training
from fedpriv.scatnet import precomputed
from fedpriv.training import evaluate, train_local

log = logging.getLogger(__name__)

NON_PRIVATE = "non-private"
ATTACKS = ("loss", "lira")
ALL_RECORDS, CANARIES = "all", "canaries"  # the candidates an attack is scored on


@dataclass(frozen=True)
class PrivacyLevel:
    """One privacy level of the audit and the plan a hospital with `target_records` records would run."""

    label: str
    target_epsilon: float | None  # None: non-private
    plan: PrivacyPlan


@dataclass
class InversionCase:
    """One gradient-inversion attack: a batch, the update the server saw, what it rebuilt."""

    batch_size: int
    setting: str
    level: str | None  # the privacy level this update belongs to (None: clipping only, extra sigmas)
    noise_multiplier: float | None  # None: plain gradient
    epsilon: float | None  # epsilon of the whole training run this sigma belongs to (None: none)
    gradient_distance: float
    scores: list[ImageScore]
    reconstructions: np.ndarray = field(repr=False)  # pixel intensities in [0, 1], (B, C, H, W)
    originals: np.ndarray = field(repr=False)  # the true batch, same layout

    @property
    def mean_ssim(self) -> float:
        return float(np.mean([s.ssim for s in self.scores]))

    @property
    def mean_psnr(self) -> float:
        return float(np.mean([s.psnr for s in self.scores]))

    @property
    def mean_mse(self) -> float:
        return float(np.mean([s.mse for s in self.scores]))


@dataclass
class MembershipResult:
    """Membership attacks on one target model, and the ceiling its privacy guarantee sets."""

    level: PrivacyLevel
    epsilon_spent: float  # math.inf when non-private
    members: int
    non_members: int
    canaries: int  # mislabelled records in the pool
    test_accuracy: float
    test_auc: float
    attacks: dict[str, AttackMetrics]
    checks: list[CeilingCheck]
    ceiling: PrivacyCeiling

    @property
    def epsilon_lower(self) -> float:
        """The largest epsilon the attacks prove, at the audit's confidence (0: nothing proven)."""
        return max((c.epsilon_lower for c in self.checks), default=0.0)

    @property
    def violations(self) -> list[CeilingCheck]:
        return [c for c in self.checks if c.violated]


@dataclass
class AuditReport:
    """Everything the audit measured; written out by :mod:`fedpriv.attacks.report`."""

    config: FedprivConfig
    dataset: str
    attack_model: str
    levels: list[PrivacyLevel]
    inversion: list[InversionCase]
    membership: list[MembershipResult]
    seconds: float = 0.0
    figures: list[str] = field(default_factory=list)

    @property
    def violations(self) -> list[tuple[str, CeilingCheck]]:
        return [(m.level.label, c) for m in self.membership for c in m.violations]

    @property
    def ok(self) -> bool:
        """False when an attack beat the ceiling its privacy guarantee allows: a bug somewhere."""
        return not self.violations


def run_audit(config: FedprivConfig, run_dir: str | Path) -> AuditReport:
    """Validate, run both attacks at every privacy level, and write audit.json/audit.md/PNGs to `run_dir`."""
    started = time.perf_counter()
    validate_config(config)
    config = replace(config, device=resolve_device(config.device))  # "auto" becomes this machine's device
    log.info("audit models train and are evaluated on %s", config.device)
    check_audit_config(config.audit)
    dataset = load_dataset(config.dataset, config.seed)
    check_audit_against_data(config, dataset)
    log.info("%s", dataset.describe())
    levels = privacy_levels(config)
    inversion = run_inversion_audit(config, dataset, levels)
    membership = run_membership_audit(config, dataset, levels)
    report = AuditReport(config, dataset.describe(), attack_model_name(config), levels, inversion, membership)
    report.figures = save_figures(report, Path(run_dir))
    report.seconds = time.perf_counter() - started
    write_report(report, Path(run_dir))
    return report


def check_audit_against_data(config: FedprivConfig, dataset: MedicalImageDataset) -> None:
    """Checks that need the data: enough records for pool and shadows, a sensible delta."""
    audit, records = config.audit, len(dataset.train)
    if records < 3 * audit.target_records:
        raise ConfigError("audit.target_records", audit.target_records,
                          f"the training split has {records} records; the audit needs 3x target_records "
                          "(a pool of twice the members, and at least as many again for shadow models)",
                          f"use audit.target_records<={records // 3}")
    if config.train.batch_size > audit.target_records:
        raise ConfigError("train.batch_size", config.train.batch_size, "larger than audit.target_records",
                          f"use train.batch_size<={audit.target_records}")
    if max(audit.inversion_batch_sizes) > records:
        raise ConfigError("audit.inversion_batch_sizes", audit.inversion_batch_sizes,
                          f"larger than the {records} training records", "use small batches, e.g. [1,4]")
    if config.privacy.delta >= 1 / audit.target_records:
        raise ConfigError("privacy.delta", config.privacy.delta,
                          f"must be below 1/audit.target_records (1/{audit.target_records})",
                          f"use privacy.delta<={0.1 / audit.target_records:.1e}")


def privacy_levels(config: FedprivConfig) -> list[PrivacyLevel]:
    """The non-private baseline and one DP-SGD plan per epsilon, all over `target_records` records.

    Sigma is calibrated so the whole training run (audit.epochs passes) spends exactly epsilon.
    """
    common = dict(num_records=config.audit.target_records, batch_size=config.train.batch_size,
                  local_epochs=config.audit.epochs, max_physical_batch_size=config.privacy.max_physical_batch_size)
    levels = [PrivacyLevel(NON_PRIVATE, None, plan_local_training(private=False, **common))]
    for target in sorted(config.audit.epsilons):
        plan = plan_local_training(private=True, target_epsilon=target, delta=config.privacy.delta,
                                   max_grad_norm=config.privacy.max_grad_norm,
                                   accountant=config.privacy.accountant, **common)
        levels.append(PrivacyLevel(f"ε={target:g}", target, plan))
        log.info("Privacy level %s: sigma %.3f, %d steps at sample rate %.4f", levels[-1].label,
                 plan.noise_multiplier, plan.steps, plan.sample_rate)
    return levels


def attack_model_name(config: FedprivConfig) -> str:
    if config.audit.inversion_model == "convnet":
        return "InversionNet (3 conv 5x5, width 32, ReLU, linear head over the flattened map)"
    return (f"{config.model.name} (width {config.model.width}, {config.model.activation}), "
            "the configured fedpriv model")


def _seeded_model(config: FedprivConfig, dataset: MedicalImageDataset, seed: int, *, for_inversion: bool) -> nn.Module:
    torch.manual_seed(seed)
    shape = dict(in_channels=dataset.in_channels, num_classes=dataset.num_classes, image_size=dataset.image_size)
    if for_inversion and config.audit.inversion_model == "convnet":
        return InversionNet(**shape)
    model = config.model
    return build_model(model.name, width=model.width, activation=model.activation, scale=model.scale,
                       orientations=model.orientations, order=model.order, **shape)


# --- gradient inversion -------------------------------------------------------------------------


def run_inversion_audit(config: FedprivConfig, dataset: MedicalImageDataset,
                        levels: list[PrivacyLevel]) -> list[InversionCase]:
    """Invert one local step's update for each batch size and each privacy level."""
    rng = np.random.default_rng(config.seed + 1)
    cases = []
    for batch_size in config.audit.inversion_batch_sizes:
        chosen = rng.choice(len(dataset.train), size=batch_size, replace=False)
        batch = dataset.train.subset(chosen)
        model = _seeded_model(config, dataset, config.seed, for_inversion=True).to(config.device)
        for setting in inversion_settings(config, levels):
            cases.append(_invert_one(config, model, batch, setting))
    return cases


@dataclass(frozen=True)
class InversionSetting:
    """One kind of update the server sees: its label, sigma (None: plain), and what it costs."""

    label: str
    noise_multiplier: float | None
    epsilon: float | None  # of the whole training run this sigma belongs to
    level: str | None = None


def inversion_settings(config: FedprivConfig, levels: list[PrivacyLevel]) -> list[InversionSetting]:
    """The plain update, clipping alone, each privacy level's DP update, and any extra sigmas."""
    settings = [InversionSetting(NON_PRIVATE, None, None, NON_PRIVATE),
                InversionSetting("clipping only (σ=0)", 0.0, math.inf)]
    for level in levels[1:]:
        sigma = level.plan.noise_multiplier
        label = f"DP {level.label} (σ={sigma:.2f})"
        settings.append(InversionSetting(label, sigma, level.target_epsilon, level.label))
    reference = levels[-1].plan  # same sample rate and steps at every level
    for sigma in config.audit.inversion_noise_multipliers:
        settings.append(InversionSetting(f"DP σ={sigma:g}", float(sigma), _epsilon_at_sigma(sigma, reference, config)))
    return settings


def _epsilon_at_sigma(sigma: float, plan: PrivacyPlan, config: FedprivConfig) -> float:
    """Epsilon of a whole training run like the audit's at this sigma (inf when unaccountable)."""
    if sigma <= 0:
        return math.inf
    return epsilon([PrivacyEvent(sigma, plan.sample_rate, plan.steps)], config.privacy.delta, config.privacy.accountant)


def _invert_one(config, model, batch: LabeledImages, setting: InversionSetting) -> InversionCase:
    audit = config.audit
    images, labels = batch.images.to(config.device), batch.labels.to(config.device)
    generator = torch.Generator().manual_seed(config.seed + 2)
    observed = client_update(model, images, labels, noise_multiplier=setting.noise_multiplier,
                             max_grad_norm=config.privacy.max_grad_norm, generator=generator)
    started = time.perf_counter()
    inversion = invert_gradients(model, observed, labels, image_shape=tuple(images.shape[1:]),
                                 iterations=audit.inversion_iterations, lr=audit.inversion_lr,
                                 tv_weight=audit.inversion_tv_weight, restarts=audit.inversion_restarts,
                                 seed=config.seed + 3)
    scores = score_reconstructions(inversion.images, images)
    case = InversionCase(len(labels), setting.label, setting.level, setting.noise_multiplier, setting.epsilon,
                         inversion.gradient_distance, scores, to_unit(inversion.images), to_unit(images))
    log.info("Inversion, batch %d, %s: mean SSIM %.3f, PSNR %.1f dB (%.1fs)", case.batch_size, setting.label,
             case.mean_ssim, case.mean_psnr, time.perf_counter() - started)
    return case


# --- membership inference -----------------------------------------------------------------------


@dataclass
class _Split:
    """The pool of candidate records, which of them the target trains on, and the shadows' records."""

    pool: LabeledImages
    is_member: np.ndarray
    is_canary: np.ndarray
    shadow_sets: list[LabeledImages]
    test: LabeledImages

    def subsets(self) -> dict[str, np.ndarray]:
        """The candidates each attack is scored on: all of them, and the canaries alone (if usable)."""
        subsets = {ALL_RECORDS: np.ones(len(self.is_member), dtype=bool)}
        canary_members = self.is_member[self.is_canary]
        if canary_members.any() and not canary_members.all():
            subsets[CANARIES] = self.is_canary
        return subsets



def with_canaries(records: LabeledImages, fraction: float, num_classes: int,
                  rng: np.random.Generator) -> tuple[LabeledImages, np.ndarray]:
    """A copy of `records` where each label is, with probability `fraction`, changed to another class.

    Mislabelled records are the auditor's canaries (Jagielski et al. 2020, Nasr et al. 2021): a
    model can only fit them by memorising them, so they show what a model reveals about its most
    exposed records, which is what DP's worst-case guarantee is about.
    """
    flipped = rng.random(len(records)) < fraction
    labels = records.labels.clone()
    shift = torch.from_numpy(rng.integers(1, num_classes, size=int(flipped.sum())))
    labels[torch.from_numpy(flipped)] = (labels[torch.from_numpy(flipped)] + shift) % num_classes
    return LabeledImages(records.images, labels), flipped


def split_records(config: FedprivConfig, dataset: MedicalImageDataset) -> _Split:
    """Draw the pool (2 x target_records records) and the shadow models' records from the rest.

    Every pool record is a member independently with probability 1/2 (not "exactly half"), so
    whether one record is in says nothing about the others: the setting DP's guarantee is about.
    Each shadow model gets, independently per record, about target_records records from outside
    the pool, so every shadow model is OUT for every candidate (offline LiRA). Canaries are drawn
    at the same rate inside and outside the pool, so shadows train on data like the target's.
    """
    audit, rng = config.audit, np.random.default_rng(config.seed)
    train, flipped = with_canaries(dataset.train, audit.canary_fraction, dataset.num_classes, rng)
    order = rng.permutation(len(train))
    pool_size = 2 * audit.target_records
    pool_index, outside = order[:pool_size], order[pool_size:]
    is_member = rng.random(pool_size) < 0.5
    while is_member.all() or not is_member.any():  # only possible for tiny pools
        is_member = rng.random(pool_size) < 0.5
    keep = audit.target_records / len(outside)
    shadow_sets = [train.subset(outside[rng.random(len(outside)) < keep]) for _ in range(audit.shadow_models)]
    return _Split(train.subset(pool_index), is_member, flipped[pool_index], shadow_sets, dataset.test)


def run_membership_audit(config: FedprivConfig, dataset: MedicalImageDataset,
                         levels: list[PrivacyLevel]) -> list[MembershipResult]:
    """Train a target and its shadow models at each privacy level, attack, and check the ceiling."""
    split = split_records(config, dataset)
    log.info("Membership pool: %d records (%d members, %d canaries); %d shadow models per level",
             len(split.pool), split.is_member.sum(), split.is_canary.sum(), len(split.shadow_sets))
    private_levels = sum(1 for level in levels if level.target_epsilon is not None)
    comparisons = private_levels * len(split.subsets()) * len(ATTACKS) * len(config.audit.check_fprs)
    confidence = per_bound_confidence(config.audit.confidence, comparisons)
    return [_attack_level(config, dataset, split, level, index, confidence) for index, level in enumerate(levels)]


def attack_name(attack: str, subset: str) -> str:
    """How results are keyed: "lira" on all candidates, "lira, canaries" on the canaries alone."""
    return attack if subset == ALL_RECORDS else f"{attack}, {subset}"


def _attack_level(config: FedprivConfig, dataset: MedicalImageDataset, split: _Split, level: PrivacyLevel,
                  index: int, confidence: float) -> MembershipResult:
    seed = config.seed * 10_000 + index * 100
    started = time.perf_counter()
    members = split.pool.subset(np.flatnonzero(split.is_member))
    target, trained = _train(config, dataset, members, level.plan, seed)
    logits, labels = model_logits(target, split.pool.images, device=config.device), split.pool.labels
    out_confidence = np.stack([
        logit_confidence(model_logits(_train(config, dataset, records, level.plan, seed + 1 + k)[0],
                                      split.pool.images, device=config.device), labels)
        for k, records in enumerate(split.shadow_sets)
    ])
    scores = {"loss": loss_scores(logits, labels),
              "lira": lira_offline_scores(logit_confidence(logits, labels), out_confidence)}
    ceiling = _ceiling(config, trained.events if level.target_epsilon is not None else None)
    fprs = sorted({*REPORTED_FPRS, *config.audit.check_fprs})
    attacks, checks = {}, []
    for subset, mask in split.subsets().items():
        for attack, attack_scores in scores.items():
            name, subset_scores, membership = attack_name(attack, subset), attack_scores[mask], split.is_member[mask]
            attacks[name] = evaluate_attack(subset_scores, membership, fprs)
            checks += check_attack(subset_scores, membership, ceiling, config.audit.check_fprs,
                                   confidence=confidence, attack=name)
    utility = evaluate(target, split.test.as_dataset(), device=config.device)
    result = MembershipResult(level, ceiling.epsilon, int(split.is_member.sum()), int((~split.is_member).sum()),
                              int(split.is_canary.sum()), utility.accuracy, utility.auc, attacks, checks, ceiling)
    _log_membership(result, time.perf_counter() - started)
    return result


def _train(config: FedprivConfig, dataset: MedicalImageDataset, records: LabeledImages, plan: PrivacyPlan,
           seed: int):
    model = _seeded_model(config, dataset, seed, for_inversion=False)
    lr = config.train.lr if plan.private else config.audit.non_private_lr
    # A fixed front end (model=scatnet) makes its coefficients of the records once, as a hospital's site
    # does, instead of in every one of the audit's many epochs; the trained model still takes images.
    records = precomputed(model, records)
    result = train_local(model, records.as_dataset(), plan, lr=lr, momentum=config.train.momentum,
                         logit_shift=logit_shift(config, dataset.num_classes), seed=seed, device=config.device)
    model.load_state_dict(result.state_dict)
    return model, result


def _ceiling(config: FedprivConfig, events: list[PrivacyEvent] | None) -> PrivacyCeiling:
    """The accountant's ceiling for what training actually ran (the events Opacus recorded)."""
    if events is None:
        return PrivacyCeiling.from_epsilon(math.inf, config.privacy.delta)
    return PrivacyCeiling.from_events(events, config.privacy.delta, config.privacy.accountant)


def _log_membership(result: MembershipResult, seconds: float) -> None:
    parts = "; ".join(f"{name} AUC {m.auc:.3f} TPR@1%FPR {m.tpr_at[0.01]:.3f}" for name, m in result.attacks.items())
    log.info("Membership, %s (epsilon spent %.3g, %.0fs): test accuracy %.3f; %s; epsilon proven >= %.2f",
             result.level.label, result.epsilon_spent, seconds, result.test_accuracy, parts, result.epsilon_lower)
    for check in result.violations:
        log.error("CEILING EXCEEDED at %s, %s attack, FPR level %g: TPR >= %.4f but DP allows at most %.4f",
                  result.level.label, check.attack, check.fpr_level, check.tpr_lower, check.ceiling)


# --- figures ------------------------------------------------------------------------------------


def save_figures(report: AuditReport, run_dir: Path) -> list[str]:
    """Write one reconstruction grid per batch size and one ROC figure; return their file names."""
    names = []
    for batch_size in sorted({case.batch_size for case in report.inversion}):
        cases = [c for c in report.inversion if c.batch_size == batch_size]
        rows = [("original", cases[0].originals)] + [(_short(c), _ordered(c)) for c in cases]
        name = rundir.inversion_figure(batch_size)
        save_image_grid(run_dir / name, rows, title=f"Gradient inversion, one local step on {batch_size} image(s)")
        names.append(name)
    if report.membership:
        names.append(_save_roc(report, run_dir))
    return names


def _save_roc(report: AuditReport, run_dir: Path) -> str:
    min_fpr = 1 / max(m.non_members for m in report.membership)
    grid = np.logspace(math.log10(min_fpr), 0, 200)
    panels = [RocPanel(
        title=f"{m.level.label}" + (f" (ε spent {rundir.format_epsilon(m.epsilon_spent, m.level.target_epsilon)})"
                                    if m.ceiling.private else ""),
        curves={name: (a.fpr, a.tpr) for name, a in m.attacks.items()},
        ceiling=m.ceiling.tpr(grid) if m.ceiling.private else None,
        headline=m.ceiling.tpr_headline(grid) if m.ceiling.private else None,
        grid=grid,
    ) for m in report.membership]
    save_roc_plot(run_dir / rundir.MEMBERSHIP_ROC, panels, min_fpr=min_fpr)
    return rundir.MEMBERSHIP_ROC


def _ordered(case: InversionCase) -> np.ndarray:
    """Reconstructions reordered so each stands under the original it is paired with."""
    order = sorted(case.scores, key=lambda s: s.original)
    return case.reconstructions[[s.reconstruction for s in order]]


def _short(case: InversionCase) -> str:
    return case.setting.replace(" (", "\n(")
