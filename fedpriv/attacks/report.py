"""Write the audit's results: ``audit.json`` (every number) and ``audit.md`` (tables and plain words)."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from fedpriv import rundir
from fedpriv.attacks.membership import REPORTED_FPRS

if TYPE_CHECKING:  # annotations only: report is imported by audit at call time, not the reverse
    from fedpriv.attacks.audit import AuditReport, InversionCase, MembershipResult

log = logging.getLogger(__name__)

# Mean SSIM above which a reconstruction is called recognisable, and below which it is not: rough
# visual anchors for 28x28 X-rays (identical images score 1, unrelated ones about 0).
RECOGNISABLE_SSIM = 0.5
UNRECOGNISABLE_SSIM = 0.3
SCOPE = ("The audit measures ONE hospital: its update in one local step (gradient inversion) and a "
         "model trained on its records alone (membership inference), trained centrally with fedpriv's "
         "own local training and privacy plans. A federated model mixes several hospitals' updates, "
         "which only makes these attacks harder; the epsilon figures are per hospital, as in the ledger.")


def write_report(report: AuditReport, run_dir: Path) -> tuple[Path, Path]:
    """Write audit.json and audit.md into `run_dir`; return their paths."""
    json_path, md_path = rundir.write_audit(run_dir, report_dict(report), markdown(report))
    log.info("Wrote %s and %s", json_path, md_path)
    return json_path, md_path


# --- JSON ---------------------------------------------------------------------------------------


def report_dict(report: AuditReport) -> dict:
    """Every measured number, as plain data; no epsilon (no DP) is float('inf') (rundir encodes it)."""
    config = report.config
    return {
        "ok": report.ok,
        "verdict": _verdict(report),
        "dataset": report.dataset,
        "scope": SCOPE,
        "seconds": round(report.seconds, 1),
        "settings": {
            "seed": config.seed, "delta": config.privacy.delta, "max_grad_norm": config.privacy.max_grad_norm,
            "accountant": config.privacy.accountant, "batch_size": config.train.batch_size, "device": config.device,
            "lr": config.train.lr, "momentum": config.train.momentum,
            "model": {"name": config.model.name, "width": config.model.width}, "audit": asdict(config.audit),
        },
        "levels": [{"label": level.label, "target_epsilon": _infinite_if_none(level.target_epsilon),
                    "noise_multiplier": level.plan.noise_multiplier, "sample_rate": level.plan.sample_rate,
                    "steps": level.plan.steps} for level in report.levels],
        "inversion": {"attack_model": report.attack_model, "labels_known": True,
                      "cases": [_inversion_dict(case) for case in report.inversion]},
        "membership": {"pool": _pool_size(report), "shadow_models": config.audit.shadow_models,
                       "levels": [_membership_dict(result) for result in report.membership]},
        "violations": [{"level": label, **check.as_dict()} for label, check in report.violations],
        "figures": report.figures,
    }


def _inversion_dict(case: InversionCase) -> dict:
    return {"batch_size": case.batch_size, "setting": case.setting, "level": case.level,
            "noise_multiplier": case.noise_multiplier,
            "epsilon": _infinite_if_none(case.epsilon), "gradient_distance": case.gradient_distance, "mean_mse": case.mean_mse,
            "mean_psnr": case.mean_psnr, "mean_ssim": case.mean_ssim,
            "images": [asdict(score) for score in case.scores]}


def _membership_dict(result: MembershipResult) -> dict:
    ceiling = result.ceiling
    return {
        "label": result.level.label, "private": ceiling.private,
        "target_epsilon": _infinite_if_none(result.level.target_epsilon),
        "epsilon_spent": result.epsilon_spent, "delta": ceiling.delta,
        "noise_multiplier": result.level.plan.noise_multiplier, "steps": result.level.plan.steps,
        "members": result.members, "non_members": result.non_members,
        "test_accuracy": result.test_accuracy, "test_auc": result.test_auc,
        "attacks": {name: metrics.as_dict() for name, metrics in result.attacks.items()},
        "ceiling_tpr_at_fpr": {f"{fpr:g}": float(ceiling.tpr(fpr)) for fpr in _fprs(result)},
        "guarantees": [{"epsilon": e, "delta": d} for e, d in ceiling.guarantees],
        "epsilon_lower_bound": result.epsilon_lower,
        "checks": [check.as_dict() for check in result.checks],
    }


def _infinite_if_none(epsilon: float | None) -> float:
    """An epsilon the audit keeps as None (no DP: no target, or a plain update) is infinity on file."""
    return math.inf if epsilon is None else epsilon


def _fprs(result: MembershipResult) -> list[float]:
    return sorted(next(iter(result.attacks.values())).tpr_at)


def _pool_size(report: AuditReport) -> int:
    return report.membership[0].members + report.membership[0].non_members if report.membership else 0


# --- Markdown -----------------------------------------------------------------------------------


def markdown(report: AuditReport) -> str:
    """The human-readable report: verdict, summary table, plain words, then the details."""
    sections = [
        "# Privacy audit\n",
        f"**{_verdict(report)}**\n",
        f"Data: {report.dataset}. Took {report.seconds / 60:.1f} minutes.\n",
        f"Scope: {SCOPE}\n",
        "## Summary\n", _summary_table(report),
        "## In plain words\n", *(f"- {line}" for line in plain_words(report)), "",
        "## Gradient inversion\n", _inversion_section(report),
        "## Membership inference\n", _membership_section(report),
        "## How to read the ceiling\n", _ceiling_explanation(report),
    ]
    return "\n".join(sections) + "\n"


def _verdict(report: AuditReport) -> str:
    if report.ok:
        return "PASS: no attack beat the ceiling that the spent (epsilon, delta) allows."
    where = "; ".join(f"{label}, {c.attack} attack at FPR {c.fpr_level:g}: TPR >= {c.tpr_lower:.4f} > "
                      f"ceiling {c.ceiling:.4f}" for label, c in report.violations)
    return ("FAIL: BOUND VIOLATED. An attack did better than differential privacy allows, so the privacy "
            f"accounting or the training does not do what it claims (a bug). {where}.")


def _eps(value: float | None, budget: float | None = None) -> str:
    """An epsilon by the one rule (fedpriv.rundir.format_epsilon): never shown at its target when it is not."""
    if value is None or math.isinf(value):
        return "∞ (none)"
    return rundir.format_epsilon(value, budget)


def _summary_table(report: AuditReport) -> str:
    sizes = sorted({c.batch_size for c in report.inversion})
    canaries = any("lira, canaries" in r.attacks for r in report.membership)
    split = " (all / canaries)" if canaries else ""
    head = ["model", "ε spent", "test accuracy / AUC", *(f"inversion SSIM, batch {b}" for b in sizes),
            f"LiRA AUC{split}", f"LiRA TPR @ 1% FPR{split}", "ceiling @ 1%", f"LiRA TPR @ 0.1% FPR{split}",
            "ceiling @ 0.1%", "ε proven (lower bound)"]
    rows = []
    for result in report.membership:
        ceiling = result.ceiling
        rows.append([result.level.label, _eps(result.epsilon_spent, result.level.target_epsilon),
                     f"{result.test_accuracy:.3f} / {result.test_auc:.3f}",
                     *(_level_ssim(report, result.level.label, b) for b in sizes),
                     _both(result, lambda m: m.auc), _both(result, lambda m: m.tpr_at[0.01]),
                     f"{float(ceiling.tpr(0.01)):.3f}", _both(result, lambda m: m.tpr_at[0.001]),
                     f"{float(ceiling.tpr(0.001)):.3f}", f"{result.epsilon_lower:.2f}"])
    delta = report.config.privacy.delta
    note = (f"\nε spent at δ = {delta:g} ({report.config.privacy.accountant} accountant) by the whole training of "
            "the audited model. Ceilings: the most any attack may reach at that FPR. 'ε proven': what the attacks "
            f"demonstrate at {report.config.audit.confidence:.0%} confidence. With {_non_members(report)} non-members "
            f"the smallest measurable FPR is {1 / max(_non_members(report), 1):.2%}: a TPR at a smaller FPR is the TPR "
            "at zero false positives.\n")
    return _table(head, rows) + note


def _both(result: MembershipResult, metric) -> str:
    """A LiRA figure on all candidates, and on the canaries when there are any."""
    text = f"{metric(result.attacks['lira']):.3f}"
    if "lira, canaries" in result.attacks:
        text += f" / {metric(result.attacks['lira, canaries']):.3f}"
    return text


def _non_members(report: AuditReport) -> int:
    return report.membership[0].non_members if report.membership else 0


def _level_ssim(report: AuditReport, label: str, batch_size: int) -> str:
    for case in report.inversion:
        if case.batch_size == batch_size and case.level == label:
            return f"{case.mean_ssim:.3f}"
    return "-"


def plain_words(report: AuditReport) -> list[str]:
    """Sentences saying what an attacker could and could not do, generated from the numbers."""
    lines = [_inversion_words(report, b) for b in sorted({c.batch_size for c in report.inversion})]
    lines += [_membership_words(result) for result in report.membership]
    if not report.ok:
        lines.append("**An attack beat the ceiling: treat every epsilon figure of this configuration as wrong "
                     "until the bug is found.**")
    return [line for line in lines if line]


def _inversion_words(report: AuditReport, batch_size: int) -> str:
    cases = [c for c in report.inversion if c.batch_size == batch_size]
    plain = next(c for c in cases if c.noise_multiplier is None)
    dp = [c for c in cases if c.noise_multiplier and c.epsilon is not None and math.isfinite(c.epsilon)]
    clip = next((c for c in cases if c.noise_multiplier == 0), None)
    text = (f"From one local step on {batch_size} image(s), a curious server that knows the model and labels "
            f"rebuilds {_recognisable(plain.mean_ssim)} images from a plain update (mean SSIM {plain.mean_ssim:.2f}, "
            f"PSNR {plain.mean_psnr:.1f} dB).")
    if clip is not None:
        text += f" Clipping alone does not help (SSIM {clip.mean_ssim:.2f}): the direction of the update still leaks."
    if dp:
        worst = max(dp, key=lambda c: c.mean_ssim)
        text += (f" With DP-SGD noise at every audited budget (ε ≤ {max(c.epsilon for c in dp):g}) it gets "
                 f"{_recognisable(worst.mean_ssim)} images (best mean SSIM {worst.mean_ssim:.2f}).")
    return text


def _recognisable(ssim: float) -> str:
    if ssim >= RECOGNISABLE_SSIM:
        return "recognisable"
    if ssim >= UNRECOGNISABLE_SSIM:
        return "blurred, partly recognisable"
    return "unrecognisable (noise-like)"


def _membership_words(result: MembershipResult) -> str:
    everyone = {k: m for k, m in result.attacks.items() if "canaries" not in k}
    name, best = max(everyone.items(), key=lambda item: item[1].tpr_at[0.01])
    text = (f"the best membership attack ({name}) picks out {best.tpr_at[0.01]:.1%} of the training records while "
            f"wrongly accusing at most 1% of outsiders (guessing: 1%), AUC {best.auc:.2f}")
    canary = result.attacks.get("lira, canaries")
    if canary is not None:
        text += (f"; on mislabelled records (canaries) LiRA finds {canary.tpr_at[0.01]:.0%} of members at that "
                 f"false-positive rate, AUC {canary.auc:.2f}")
    utility = f"test accuracy {result.test_accuracy:.2f}, AUC {result.test_auc:.2f}"
    if not result.ceiling.private:
        return f"**Without DP**, {text}. Nothing bounds this: the model may reveal arbitrarily much ({utility})."
    allowed = float(result.ceiling.tpr(0.01))
    text = (f"**At ε = {_eps(result.epsilon_spent, result.level.target_epsilon)}**, {text}. DP allows at most {allowed:.1%} at 1% false positives, "
            f"whatever the attack; the attacks prove only ε ≥ {result.epsilon_lower:.2f} ({utility}).")
    above = any(m.tpr_at[fpr] > float(result.ceiling.tpr(fpr))
                for m in result.attacks.values() for fpr in REPORTED_FPRS)
    if not result.violations and above:
        text += (" Where a measured TPR lies above the ceiling at 0.1% or 1% FPR it is within finite-sample error "
                 "(a few hundred records cannot measure such small FPRs precisely); the confidence-aware check passes.")
    return text


def _inversion_section(report: AuditReport) -> str:
    audit = report.config.audit
    intro = (f"Attack: cosine-similarity gradient matching with a total-variation prior (Geiping et al. 2020), "
             f"{audit.inversion_iterations} signed-Adam iterations (lr {audit.inversion_lr:g}, TV weight "
             f"{audit.inversion_tv_weight:g}, {audit.inversion_restarts} restart(s)), box-constrained to valid pixels. "
             f"Model: {report.attack_model}, at its initial (first-round) weights. The server knows the model and "
             f"the labels. DP updates: per-sample gradients clipped to C = {report.config.privacy.max_grad_norm:g}, "
             "summed, plus Gaussian noise σ·C, divided by the batch size. Each DP level's σ is the one its "
             "membership-audit training uses (ε is that whole training's). Metrics are on pixel intensities in "
             "[0, 1]; each reconstruction is paired with a true image by the best one-to-one SSIM matching.\n")
    head = ["batch", "update", "σ", "ε of the training", "gradient distance", "MSE", "PSNR (dB)", "SSIM"]
    rows = [[case.batch_size, case.setting, "-" if case.noise_multiplier is None else f"{case.noise_multiplier:.3g}",
             _eps(case.epsilon), f"{case.gradient_distance:.3f}", f"{case.mean_mse:.4f}", f"{case.mean_psnr:.1f}",
             f"{case.mean_ssim:.3f}"] for case in report.inversion]
    images = "\n".join(f"![{name}]({name})" for name in report.figures if name.startswith("inversion"))
    return intro + "\n" + _table(head, rows) + "\nPer image:\n\n" + _per_image_table(report) + "\n" + images + "\n"


def _per_image_table(report: AuditReport) -> str:
    head = ["batch", "update", "reconstruction", "paired with", "best match", "MSE", "PSNR (dB)", "SSIM"]
    rows = [[case.batch_size, case.setting, s.reconstruction, s.original, s.best_match, f"{s.mse:.4f}",
             f"{s.psnr:.1f}", f"{s.ssim:.3f}"] for case in report.inversion for s in case.scores]
    return _table(head, rows)


def _membership_section(report: AuditReport) -> str:
    audit, config = report.config.audit, report.config
    first = report.levels[0].plan
    canaries = report.membership[0].canaries if report.membership else 0
    intro = (f"Pool: {_pool_size(report)} training records, {canaries} of them canaries (label changed to another "
             f"class with probability {audit.canary_fraction:g}, likewise outside the pool); each is a member of the "
             "audited model's training set independently with probability 1/2. Attacks are scored on all candidates "
             "and on the canaries alone. The audited model trains on its members for "
             f"{audit.epochs} epochs "
             f"({first.steps} steps, expected batch {config.train.batch_size}, lr {config.train.lr:g}, momentum "
             f"{config.train.momentum:g}) with fedpriv's train_local and the level's privacy plan. Offline LiRA uses "
             f"{audit.shadow_models} shadow models per level, trained the same way on records outside the pool "
             "(so every shadow is OUT for every candidate); a Gaussian is fitted to their logit-scaled confidences "
             "(mean per record, variance pooled over records when there are fewer than 32 shadows).\n")
    head = ["model", "ε spent", "attack", "AUC", "TPR @ 0.1% FPR", "TPR @ 1% FPR", "ceiling @ 0.1%", "ceiling @ 1%"]
    rows = [[r.level.label, _eps(r.epsilon_spent, r.level.target_epsilon), name, f"{m.auc:.3f}", f"{m.tpr_at[0.001]:.4f}",
             f"{m.tpr_at[0.01]:.4f}", f"{float(r.ceiling.tpr(0.001)):.4f}", f"{float(r.ceiling.tpr(0.01)):.4f}"]
            for r in report.membership for name, m in r.attacks.items()]
    roc = rundir.MEMBERSHIP_ROC
    figure = f"\n![membership ROC]({roc})\n" if roc in report.figures else ""
    return intro + "\n" + _table(head, rows) + figure + "\nCeiling checks:\n\n" + _checks_table(report)


def _checks_table(report: AuditReport) -> str:
    head = ["model", "attack", "FPR level", "TP / members", "FP / non-members", "TPR lower bound",
            "FPR upper bound", "ceiling", "ε proven", "result"]
    rows = [[r.level.label, c.attack, f"{c.fpr_level:g}", f"{c.true_positives}/{c.members}",
             f"{c.false_positives}/{c.non_members}", f"{c.tpr_lower:.4f}", f"{c.fpr_upper:.4f}",
             f"{c.ceiling:.4f}" if r.ceiling.private else "1 (no guarantee)", f"{c.epsilon_lower:.2f}",
             "**VIOLATED**" if c.violated else ("ok" if r.ceiling.private else "-")]
            for r in report.membership for c in r.checks]
    return _table(head, rows)


def _ceiling_explanation(report: AuditReport) -> str:
    audit = report.config.audit
    return (
        "For any membership test against an (ε, δ)-DP training run, TPR ≤ min(e^ε·FPR + δ, 1 − e^−ε·(1 − δ − FPR)). "
        "The accountant certifies a whole family of such guarantees (ε(δ) for every δ); the ceiling drawn in red and "
        "used by the check is the minimum over a grid of them, a numerical upper approximation of the f-DP "
        "trade-off curve of the exact steps that were run. The dash-dotted line is the headline (ε, δ) alone; "
        "dashed curves are attacks scored on the canaries.\n\n"
        f"Finite samples: at each FPR level ({', '.join(f'{f:g}' for f in audit.check_fprs)}) the check takes the "
        "strictest threshold that lets at most that share of non-members through, and compares the Clopper-Pearson "
        "lower bound of the TPR with the ceiling at the upper bound of the FPR. All bounds together hold with "
        f"probability {audit.confidence:.0%} (Bonferroni), so a violation is not finite-sample noise. 'ε proven' is "
        "the largest ε these bounds are incompatible with being smaller than.\n")


def _table(head: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(cell).replace("\n", " ") for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
