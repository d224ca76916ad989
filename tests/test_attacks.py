"""The privacy audit's attacks and ceiling check behave as they should, on tiny data with fixed seeds."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from fedpriv import rundir
from fedpriv.attacks.bounds import (
    PrivacyCeiling,
    check_attack,
    clopper_pearson,
    dp_tpr_ceiling,
    epsilon_lower_bound,
)
from fedpriv.attacks.inversion import (
    InversionNet,
    client_update,
    invert_gradients,
    score_reconstructions,
)
from fedpriv.attacks.membership import (
    evaluate_attack,
    lira_offline_scores,
    logit_confidence,
    loss_scores,
    model_logits,
)
from fedpriv.attacks.settings import AuditConfig, check_audit_config
from fedpriv.data import LabeledImages
from fedpriv.data.synthetic import make_synthetic
from fedpriv.errors import ConfigError
from fedpriv.privacy import PrivacyEvent, PrivacyPlan
from fedpriv.training import train_local

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    """Small models run fastest on one thread, and timings stay stable on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def xrays():
    """Synthetic 16x16 chest-X-ray-like images (train split: 210 records)."""
    return make_synthetic(300, 16, seed=0, val_fraction=0.1, test_fraction=0.2)


# --- gradient inversion -------------------------------------------------------------------------


@pytest.mark.slow
def test_inversion_recovers_plain_image_far_better_than_dp(xrays):
    torch.manual_seed(0)
    model = InversionNet(image_size=16, width=32)
    images, labels = xrays.train.images[:1], xrays.train.labels[:1]
    results = {}
    for name, sigma in (("plain", None), ("dp", 1.0)):
        observed = client_update(model, images, labels, noise_multiplier=sigma, max_grad_norm=1.0,
                                 generator=torch.Generator().manual_seed(1))
        inversion = invert_gradients(model, observed, labels, image_shape=(1, 16, 16), iterations=200, seed=0)
        results[name] = score_reconstructions(inversion.images, images)[0]
    plain, dp = results["plain"], results["dp"]
    assert plain.ssim > 0.8  # recognisable (measured: 0.98)
    assert plain.ssim > dp.ssim + 0.6  # measured: DP about 0
    assert plain.psnr > dp.psnr + 10.0  # dB; measured: 27 vs 9


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_dp_update_is_what_a_hospital_sends():
    """Clipped, summed, noised, averaged: the same as one step of fedpriv's Opacus training."""
    torch.manual_seed(0)
    model = InversionNet(image_size=8, width=4)
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.randn(4, 1, 8, 8, generator=generator) * 3, torch.tensor([0, 1, 1, 0])
    plan = PrivacyPlan(steps=1, sample_rate=1.0, noise_multiplier=0.0, max_grad_norm=0.05)
    stepped = train_local(model, torch.utils.data.TensorDataset(images, labels), plan, lr=1.0)
    update = client_update(model, images, labels, noise_multiplier=0.0, max_grad_norm=0.05)
    for (name, before), observed in zip(model.named_parameters(), update):
        torch.testing.assert_close(before.detach() - stepped.state_dict[name], observed, rtol=1e-4, atol=1e-6)
    noisy = client_update(model, images, labels, noise_multiplier=2.0, max_grad_norm=0.05, generator=generator)
    noise = torch.cat([(n - u).flatten() for n, u in zip(noisy, update)])
    assert noise.std().item() == pytest.approx(2.0 * 0.05 / 4, rel=0.05)  # sigma * C / batch size


def test_reconstructions_are_paired_with_their_best_matching_original():
    generator = torch.Generator().manual_seed(0)
    originals = torch.rand(3, 1, 12, 12, generator=generator) * 2 - 1
    shuffled = originals[[2, 0, 1]]
    scores = score_reconstructions(shuffled, originals)
    assert [(s.reconstruction, s.original, s.best_match) for s in scores] == [(0, 2, 2), (1, 0, 0), (2, 1, 1)]
    assert all(s.ssim == pytest.approx(1.0) and s.mse == 0 and math.isinf(s.psnr) for s in scores)


# --- membership inference -----------------------------------------------------------------------


def _overfit(records, seed: int) -> nn.Module:
    """A non-private model trained far too long on too few records: it memorises them."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 2))
    plan = PrivacyPlan.non_private(steps=300, sample_rate=0.25)
    result = train_local(model, records.as_dataset(), plan, lr=0.01, momentum=0.9, seed=seed)
    model.load_state_dict(result.state_dict)
    return model


def test_membership_attacks_find_members_of_an_overfit_model(xrays):
    rng = np.random.default_rng(0)
    # Random labels: the only way to fit them is to memorise, the worst case for membership privacy.
    random_labels = torch.from_numpy(rng.integers(0, 2, len(xrays.train))).long()
    train = LabeledImages(xrays.train.images, random_labels)
    pool, outside = train.subset(range(80)), np.arange(80, len(train))
    is_member = rng.random(80) < 0.5
    target = _overfit(pool.subset(np.flatnonzero(is_member)), seed=0)
    logits = model_logits(target, pool.images)
    shadows = [_overfit(train.subset(rng.choice(outside, 40, replace=False)), seed=k + 1) for k in range(4)]
    out = np.stack([logit_confidence(model_logits(s, pool.images), pool.labels) for s in shadows])
    loss_auc = evaluate_attack(loss_scores(logits, pool.labels), is_member, [0.01]).auc
    lira_auc = evaluate_attack(lira_offline_scores(logit_confidence(logits, pool.labels), out), is_member, [0.01]).auc
    assert loss_auc > 0.75
    assert lira_auc > 0.75


def test_lira_scores_rank_records_above_their_out_distribution():
    rng = np.random.default_rng(0)
    means = rng.normal(0, 3, 200)  # records differ a lot in how confident models are on them
    out = means + rng.normal(0, 0.5, (8, 200))
    is_member = np.arange(200) % 2 == 0
    target = means + rng.normal(0, 0.5, 200) + 2.0 * is_member  # members: 4 OUT-stds more confident
    assert evaluate_attack(lira_offline_scores(target, out), is_member, [0.01]).auc > 0.95
    assert evaluate_attack(target, is_member, [0.01]).auc < 0.8  # without per-record calibration: far worse


def test_logit_confidence_is_log_odds_of_the_true_class():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    labels = torch.tensor([0, 2])
    p = torch.softmax(logits, 1)[[0, 1], labels]
    np.testing.assert_allclose(logit_confidence(logits, labels), torch.log(p / (1 - p)).numpy(), rtol=1e-5)


# --- the ceiling --------------------------------------------------------------------------------


def test_ceiling_formula():
    expected = [0.0, math.e * 0.1, 1 - 0.5 / math.e, 1.0]  # e^eps FPR bites first, then the swapped bound
    np.testing.assert_allclose(dp_tpr_ceiling([0.0, 0.1, 0.5, 1.0], 1.0, 0.0), expected)
    assert dp_tpr_ceiling(0.01, math.inf, 1e-5) == 1.0
    assert epsilon_lower_bound(math.e * 0.1, 0.1, 0.0) == pytest.approx(1.0)
    lower, upper = clopper_pearson(5, 10, 0.95)
    assert (lower, upper) == (pytest.approx(0.2224, abs=1e-4), pytest.approx(0.7776, abs=1e-4))


def test_accountant_ceiling_is_tighter_than_the_headline_guarantee():
    events = [PrivacyEvent(1.0, 0.1, 100)]
    ceiling = PrivacyCeiling.from_events(events, 1e-5, "rdp")
    grid = np.logspace(-4, 0, 50)
    assert np.all(ceiling.tpr(grid) <= ceiling.tpr_headline(grid) + 1e-12)
    assert np.any(ceiling.tpr(grid) < ceiling.tpr_headline(grid) - 0.05)


def _fabricated(tpr: float, fpr: float, members: int, non_members: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores where exactly `tpr` of members and `fpr` of non-members score 1, the rest 0."""
    hits_in, hits_out = round(tpr * members), round(fpr * non_members)
    scores = np.r_[np.ones(hits_in), np.zeros(members - hits_in), np.ones(hits_out), np.zeros(non_members - hits_out)]
    return scores, np.r_[np.ones(members, bool), np.zeros(non_members, bool)]


def test_ceiling_check_flags_an_attack_above_the_ceiling():
    ceiling = PrivacyCeiling.from_epsilon(1.0, 1e-5)  # at FPR 10%, TPR <= 27.2%
    scores, is_member = _fabricated(0.6, 0.1, 2000, 2000)
    checks = check_attack(scores, is_member, ceiling, [0.1], confidence=0.99)
    assert checks[0].violated and checks[0].epsilon_lower > 1.3


def test_ceiling_check_passes_an_attack_below_the_ceiling():
    ceiling = PrivacyCeiling.from_epsilon(1.0, 1e-5)
    scores, is_member = _fabricated(0.2, 0.1, 2000, 2000)
    checks = check_attack(scores, is_member, ceiling, [0.1], confidence=0.99)
    assert not checks[0].violated and checks[0].epsilon_lower < 1.0


def test_ceiling_check_does_not_alarm_on_finite_sample_noise():
    """35% at 10% FPR beats the 27% ceiling on paper, but 20 records cannot show it: no alarm."""
    ceiling = PrivacyCeiling.from_epsilon(1.0, 1e-5)
    few = check_attack(*_fabricated(0.35, 0.1, 20, 20), ceiling, [0.1], confidence=0.99)[0]
    assert few.tpr > float(ceiling.tpr(few.fpr)) and not few.violated
    many = check_attack(*_fabricated(0.35, 0.1, 20_000, 20_000), ceiling, [0.1], confidence=0.99)[0]
    assert many.violated


def test_audit_settings_are_checked():
    check_audit_config(AuditConfig())
    with pytest.raises(ConfigError, match="audit.epsilons"):
        check_audit_config(AuditConfig(epsilons=[1.0, -2.0]))
    with pytest.raises(ConfigError, match="audit.inversion_model"):
        check_audit_config(AuditConfig(inversion_model="resnet"))
    with pytest.raises(ConfigError, match="audit.non_private_lr"):
        check_audit_config(AuditConfig(non_private_lr=0.0))


def test_the_non_private_reference_trains_at_its_own_rate_and_the_dp_levels_at_train_lr(monkeypatch):
    """train.lr (1.0) suits DP-SGD's clipped steps; plain SGD at that rate trained a far worse model,
    a poor reference for what an attacker gets without DP (see AuditConfig.non_private_lr)."""
    from fedpriv.app_config import compose_config
    from fedpriv.attacks import audit as audit_module
    from fedpriv.data import load_dataset

    config = compose_config(["dataset=synthetic", "dataset.num_samples=120", "model.width=4", "train.lr=1.0"])
    dataset = load_dataset(config.dataset, config.seed)
    used = []
    monkeypatch.setattr(audit_module, "train_local", lambda model, data, plan, *, lr, **kwargs: used.append(
        (plan.private, lr)) or SimpleNamespace(state_dict=model.state_dict()))
    for plan in (PrivacyPlan.non_private(steps=2, sample_rate=0.1), PrivacyPlan(2, 0.1, 1.0, 1.0)):
        audit_module._train(config, dataset, dataset.train, plan, seed=0)
    assert used == [(False, config.audit.non_private_lr), (True, 1.0)] and config.audit.non_private_lr == 0.1


def test_a_scatnet_audit_model_scatters_its_records_once_and_trains_as_on_the_images(monkeypatch):
    """The audit trains many models for many epochs: the fixed front end runs once per record set,
    and the trained model is the one the same steps give on the images themselves."""
    from fedpriv.app_config import compose_config
    from fedpriv.attacks import audit as audit_module
    from fedpriv.data import load_dataset
    from fedpriv.scatnet import ScatNet

    config = compose_config(["dataset=synthetic", "dataset.num_samples=120", "model=scatnet", "model.width=4",
                             "device=cpu"])
    dataset = load_dataset(config.dataset, config.seed)
    records = dataset.train.subset(np.arange(24))
    plan = PrivacyPlan(6, 0.25, 1.0, 1.0)  # 6 DP-SGD steps
    scattered, features = [], ScatNet.features
    monkeypatch.setattr(ScatNet, "features", lambda self, images: scattered.append(len(images)) or features(self, images))
    model, _ = audit_module._train(config, dataset, records, plan, seed=3)
    assert scattered == [24]  # once, before training; not once per step
    reference = audit_module._seeded_model(config, dataset, 3, for_inversion=False)
    on_images = train_local(reference, records.as_dataset(), plan, lr=config.train.lr, momentum=config.train.momentum,
                            logit_shift=audit_module.logit_shift(config, dataset.num_classes), seed=3)
    for key, value in on_images.state_dict.items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=1e-4, atol=1e-5)


# --- fedpriv-audit --------------------------------------------------------------------------------

TINY = ["dataset=synthetic", "dataset.num_samples=300", "dataset.size=16", "model.width=4",
        "audit.target_records=40", "audit.shadow_models=2", "audit.epochs=2", "audit.epsilons=[4]",
        "audit.inversion_iterations=20", "audit.inversion_batch_sizes=[1,2]", "train.batch_size=8",
        "privacy.delta=1e-3", "privacy.accountant=rdp"]


def _audit(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "fedpriv.cli.audit", *overrides, f"hydra.run.dir={tmp_path}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_fedpriv_audit_end_to_end(tmp_path):
    done = _audit(tmp_path, *TINY)
    assert done.returncode == 0, done.stderr[-2000:]
    report = rundir.read_audit(tmp_path)
    assert report["ok"] is True
    assert [level["label"] for level in report["membership"]["levels"]] == ["non-private", "ε=4"]
    assert {case["batch_size"] for case in report["inversion"]["cases"]} == {1, 2}
    assert {"auc", "tpr_at_fpr"} <= set(report["membership"]["levels"][1]["attacks"]["lira"])
    assert report["membership"]["levels"][0]["epsilon_spent"] == math.inf  # no guarantee
    assert json.loads((tmp_path / "audit.json").read_text())["membership"]["levels"][0]["epsilon_spent"] == "inf"
    for name in ("audit.md", "inversion_batch1.png", "inversion_batch2.png", "membership_roc.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert "## In plain words" in (tmp_path / "audit.md").read_text()


@pytest.mark.slow
def test_fedpriv_audit_of_scatnet_passes_and_inverts_through_its_front_end(tmp_path):
    """What the README says of `fedpriv-audit model=scatnet`: it runs and passes, and the inversion
    attacks the scattering model itself (through its fixed front end) when asked to."""
    done = _audit(tmp_path, *TINY, "model=scatnet", "audit.inversion_model=model")
    assert done.returncode == 0, done.stderr[-2000:]
    report = rundir.read_audit(tmp_path)
    assert report["ok"] is True and report["inversion"]["attack_model"].startswith("scatnet")
    assert [level["label"] for level in report["membership"]["levels"]] == ["non-private", "ε=4"]
    plain = [case["mean_ssim"] for case in report["inversion"]["cases"] if case["setting"] == "non-private"]
    noisy = [case["mean_ssim"] for case in report["inversion"]["cases"] if case["setting"].startswith("DP")]
    assert len(plain) == len(noisy) == 2 and min(plain) > max(noisy)  # noise, not the features, protects


@pytest.mark.slow
def test_fedpriv_audit_rejects_bad_input_in_one_line(tmp_path):
    done = _audit(tmp_path, "dataset=synthetic", "audit.target_records=100000")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("fedpriv-audit: error: audit.target_records=100000")
    assert "Traceback" not in done.stderr


def test_fedpriv_audit_exits_non_zero_when_an_attack_beats_the_ceiling(tmp_path, monkeypatch, capsys):
    from omegaconf import OmegaConf

    import fedpriv.attacks.audit
    from fedpriv.cli import audit as cli
    from fedpriv.config import FedprivConfig

    check = SimpleNamespace(attack="lira", fpr_level=0.01)
    fake = SimpleNamespace(ok=False, seconds=1.0, violations=[("ε=1", check)])
    monkeypatch.setattr(cli, "run_audit", lambda config, run_dir: fake)
    cfg = OmegaConf.structured(FedprivConfig)
    assert cli.run(cfg, tmp_path) == cli.EXIT_CEILING_EXCEEDED
    assert "BOUND VIOLATED" in capsys.readouterr().err
