"""Private local training: DP-SGD behaves as DP-SGD (clipping, noise scale, equivalence to SGD)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedpriv.errors import ModelNotPrivateError, PrivacyError
from fedpriv.models import (
    GRAD_SAMPLE_MODE_BY_MODEL,
    build_model,
    resolve_grad_sample_mode,
)
from fedpriv.privacy import PrivacyPlan, plan_local_training
from fedpriv.training import evaluate, train_local


def _linear_model(features: int = 16, classes: int = 2) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(features, classes))


def _toy_data(n: int = 32, features: int = 16, scale: float = 1.0) -> TensorDataset:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(n, 1, 1, features, generator=generator) * scale
    y = (x.flatten(1).sum(1) > 0).long()
    return TensorDataset(x, y)


def _weights_change(model: nn.Module, state: dict[str, torch.Tensor]) -> torch.Tensor:
    before = torch.cat([p.detach().flatten() for p in model.state_dict().values()])
    after = torch.cat([state[k].flatten() for k in model.state_dict()])
    return after - before


def test_zero_noise_and_huge_clip_equals_plain_sgd():
    model, data = _linear_model(), _toy_data()
    # q = 1 makes Poisson sampling take every record each step, so both runs see the same batches.
    dp_plan = PrivacyPlan(steps=5, sample_rate=1.0, noise_multiplier=0.0, max_grad_norm=1e6)
    plain_plan = PrivacyPlan.non_private(steps=5, sample_rate=1.0)
    dp = train_local(model, data, dp_plan, lr=0.5)
    plain = train_local(model, data, plain_plan, lr=0.5)
    for key in plain.state_dict:
        torch.testing.assert_close(dp.state_dict[key], plain.state_dict[key], rtol=1e-4, atol=1e-6)
    assert not torch.equal(plain.state_dict["1.weight"], model.state_dict()["1.weight"])  # it did train


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
@pytest.mark.parametrize("clip", [0.1, 1.0])
def test_per_sample_gradient_is_clipped_to_max_grad_norm(clip, mode):
    model = _linear_model()
    for index in range(4):
        # One misclassified, large record alone: the update is exactly its clipped gradient (lr = 1).
        image = _toy_data(4, scale=100.0)[index][0][None]
        wrong_label = 1 - model(image).argmax(dim=1)
        data = TensorDataset(image, wrong_label)
        plan = PrivacyPlan(steps=1, sample_rate=1.0, noise_multiplier=0.0, max_grad_norm=clip, grad_sample_mode=mode)
        result = train_local(model, data, plan, lr=1.0)
        norm = _weights_change(model, result.state_dict).norm().item()
        assert norm <= clip * (1 + 1e-4)
        assert norm == pytest.approx(clip, rel=1e-3)  # the raw gradient was far larger: clipping acted


def test_clipping_bounds_the_batch_update():
    model, data = _linear_model(), _toy_data(64, scale=50.0)
    plan = PrivacyPlan(steps=1, sample_rate=1.0, noise_multiplier=0.0, max_grad_norm=0.5)
    result = train_local(model, data, plan, lr=1.0)
    assert _weights_change(model, result.state_dict).norm().item() <= 0.5 * (1 + 1e-4)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_noise_has_the_expected_scale(mode):
    # All-zero inputs give the weight matrix a zero gradient, so its update is pure noise:
    # std = lr * sigma * C / expected_batch_size.
    features, records, sigma, clip = 4096, 10, 2.0, 0.5
    model = _linear_model(features)
    data = TensorDataset(torch.zeros(records, 1, 1, features), torch.zeros(records, dtype=torch.long))
    plan = PrivacyPlan(steps=1, sample_rate=1.0, noise_multiplier=sigma, max_grad_norm=clip, grad_sample_mode=mode)
    result = train_local(model, data, plan, lr=1.0)
    noise = result.state_dict["1.weight"] - model.state_dict()["1.weight"]
    expected = sigma * clip / records
    assert noise.mean().item() == pytest.approx(0.0, abs=4 * expected / math.sqrt(noise.numel()))
    assert noise.std().item() == pytest.approx(expected, rel=0.05)


def test_private_training_reports_the_events_it_consumed():
    model, data = _linear_model(), _toy_data(100)
    plan = plan_local_training(num_records=100, batch_size=10, local_epochs=2, private=True,
                               target_epsilon=3.0, delta=1e-5, max_grad_norm=1.0, max_physical_batch_size=4)
    result = train_local(model, data, plan, lr=0.1)
    assert result.private and result.steps == plan.steps == 20
    assert [(e.noise_multiplier, e.sample_rate, e.steps) for e in result.events] == [
        (plan.noise_multiplier, 0.1, 20)]
    assert 2.5 < result.epsilon(1e-5) <= 3.0 + 0.05
    assert set(result.state_dict) == set(model.state_dict())  # plain keys, no "_module." prefix


def test_non_private_training_is_labelled_epsilon_infinity():
    model, data = _linear_model(), _toy_data()
    plan = plan_local_training(num_records=32, batch_size=8, local_epochs=1, private=False)
    result = train_local(model, data, plan, lr=0.1)
    assert not result.private and result.events == []
    assert result.epsilon(1e-5) == math.inf


def test_training_does_not_modify_the_callers_model():
    model, data = _linear_model(), _toy_data()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_local(model, data, PrivacyPlan(steps=3, sample_rate=0.5, noise_multiplier=1.0, max_grad_norm=1.0), lr=1.0)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    assert not hasattr(model, "_module")


def test_private_cnn_learns_a_simple_signal():
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(400, 1, 16, 16, generator=generator)
    labels = torch.arange(400) % 2
    images[labels == 1, :, 4:12, 4:12] += 1.5
    data = TensorDataset(images, labels)
    model = build_model("cnn", in_channels=1, num_classes=2, image_size=16, width=8)
    plan = plan_local_training(num_records=400, batch_size=50, local_epochs=5, private=True,
                               target_epsilon=8.0, delta=1e-4, max_grad_norm=1.0)
    result = train_local(model, data, plan, lr=0.5, momentum=0.5)
    model.load_state_dict(result.state_dict)
    assert evaluate(model, data).auc > 0.9


def test_a_model_opacus_rejects_fails_with_opacus_explanation():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    plan = PrivacyPlan(steps=1, sample_rate=1.0, noise_multiplier=1.0, max_grad_norm=1.0)
    with pytest.raises(ModelNotPrivateError, match="BatchNorm.*GroupNorm"):
        train_local(model, TensorDataset(torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)), plan, lr=0.1)


def test_evaluate_metrics_match_hand_computed_values():
    class Fixed(nn.Module):
        def forward(self, x):
            return torch.stack([torch.zeros(len(x)), x.flatten(1)[:, 0]], dim=1)

    # Scores for class 1: labels 0 -> [-2, 1], labels 1 -> [3, -1]: predictions by score > 0.
    scores = torch.tensor([-2.0, 1.0, 3.0, -1.0])
    labels = torch.tensor([0, 0, 1, 1])
    result = evaluate(Fixed(), TensorDataset(scores[:, None], labels))
    assert result.accuracy == pytest.approx(0.5)
    assert result.sensitivity == pytest.approx(0.5)  # one of two positives found
    assert result.specificity == pytest.approx(0.5)  # one of two negatives rejected
    assert result.auc == pytest.approx(0.75)  # 3 of 4 positive/negative pairs ranked right
    assert result.probabilities.shape == (4, 2)
    assert result.probabilities.sum(axis=1) == pytest.approx([1, 1, 1, 1])


@pytest.mark.parametrize("name", ["cnn", "resnet18"])
def test_models_pass_opacus_validation_and_accept_greyscale(name):
    model = build_model(name, in_channels=1, num_classes=2, image_size=28)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 2)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


# --- Ghost clipping (Opacus's fast gradient clipping) ----------------------------------------------


def _images(n: int, size: int, seed: int = 2) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 1, size, size, generator=generator)
    labels = torch.arange(n) % 2
    images[labels == 1, :, size // 4: 3 * size // 4, size // 4: 3 * size // 4] += 1.0
    return TensorDataset(images, labels)


def _update(model: nn.Module, state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([(state[key] - value).flatten() for key, value in model.state_dict().items()])


def _relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.slow
@pytest.mark.parametrize("name, size, records, sample_rate, physical, steps", [
    ("cnn", 28, 48, 0.5, 8, 3),  # Poisson batches of ~24 split into physical batches of 8
    ("resnet18", 16, 12, 1.0, 5, 1),  # GroupNorm, residual blocks; 12 records as 5 + 4 + 3 (kept small: CPU)
])
def test_ghost_clipping_gives_the_same_update_as_per_sample_clipping(name, size, records, sample_rate, physical,
                                                                      steps):
    model = build_model(name, in_channels=1, num_classes=2, image_size=size)
    data = _images(records, size)
    updates = {}
    for mode, clip in [("hooks", 0.05), ("ghost", 0.05), ("hooks", 1e6)]:
        plan = PrivacyPlan(steps=steps, sample_rate=sample_rate, noise_multiplier=0.0, max_grad_norm=clip,
                           max_physical_batch_size=physical, grad_sample_mode=mode)
        result = train_local(model, data, plan, lr=1.0, seed=7)
        assert result.steps == steps and [e.steps for e in result.events] == [steps]
        updates[mode, clip] = _update(model, result.state_dict)
    # Clipping is active: clipped and unclipped updates differ far beyond the tolerance below ...
    assert _relative_difference(updates["hooks", 0.05], updates["hooks", 1e6]) > 0.1
    # ... and ghost clipping reproduces per-sample clipping (same Poisson batches, same seed).
    assert _relative_difference(updates["ghost", 0.05], updates["hooks", 0.05]) < 1e-4
    assert updates["ghost", 0.05].norm() > 0


def test_ghost_clipping_adds_the_same_noise_as_per_sample_clipping():
    # Noise is drawn from the same seeded generator as the Poisson batches, in the same order.
    model, data = build_model("cnn", in_channels=1, num_classes=2, image_size=16, width=8), _images(40, 16)
    results = {}
    for mode in ("hooks", "ghost"):
        plan = PrivacyPlan(steps=4, sample_rate=0.25, noise_multiplier=1.3, max_grad_norm=0.5,
                           max_physical_batch_size=4, grad_sample_mode=mode)
        results[mode] = _update(model, train_local(model, data, plan, lr=0.5, seed=3).state_dict)
    assert _relative_difference(results["ghost"], results["hooks"]) < 1e-4
    other_seed = PrivacyPlan(steps=4, sample_rate=0.25, noise_multiplier=1.3, max_grad_norm=0.5,
                             max_physical_batch_size=4, grad_sample_mode="ghost")
    assert _relative_difference(_update(model, train_local(model, data, other_seed, lr=0.5, seed=4).state_dict),
                                results["ghost"]) > 0.5  # the seed matters: the comparison above is not vacuous


def test_ghost_clipping_steps_and_privacy_events_match_the_plan():
    model, data = build_model("cnn", in_channels=1, num_classes=2, image_size=16, width=8), _images(100, 16)
    plan = plan_local_training(num_records=100, batch_size=10, local_epochs=2, private=True, target_epsilon=3.0,
                               delta=1e-5, max_grad_norm=1.0, max_physical_batch_size=4, grad_sample_mode="ghost")
    assert plan.grad_sample_mode == "ghost"
    result = train_local(model, data, plan, lr=0.1)
    assert result.private and result.steps == plan.steps == 20
    assert [(e.noise_multiplier, e.sample_rate, e.steps) for e in result.events] == [
        (plan.noise_multiplier, 0.1, 20)]
    assert result.events == [plan.event()]
    assert 2.5 < result.epsilon(1e-5) <= 3.0 + 0.05
    assert set(result.state_dict) == set(model.state_dict())  # plain keys, no "_module." prefix
    assert not hasattr(model, "_module")
    for parameter in model.parameters():  # the caller's model carries no Opacus attributes
        assert not hasattr(parameter, "_norm_sample") and not hasattr(parameter, "_forward_counter")


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_empty_poisson_batches_still_add_noise(mode):
    # q = 0.001 over 4 records: every batch of this seed is empty (no loss recorded), yet each of the
    # 3 steps adds N(0, (sigma C)^2) noise (expected batch size 1), and every step is charged.
    model, data = build_model("cnn", in_channels=1, num_classes=2, image_size=16), _images(4, 16)
    sigma, clip, steps = 1.5, 0.2, 3
    silent = PrivacyPlan(steps=steps, sample_rate=0.001, noise_multiplier=0.0, max_grad_norm=clip,
                         grad_sample_mode=mode)
    result = train_local(model, data, silent, lr=1.0, seed=0)
    assert math.isnan(result.mean_loss)  # no record was drawn: only empty batches
    assert _update(model, result.state_dict).abs().max().item() == 0.0  # nothing but noise moves weights
    noisy = PrivacyPlan(steps=steps, sample_rate=0.001, noise_multiplier=sigma, max_grad_norm=clip,
                        grad_sample_mode=mode)
    result = train_local(model, data, noisy, lr=1.0, seed=0)
    assert math.isnan(result.mean_loss)
    assert result.steps == steps and result.events == [noisy.event()]
    noise = _update(model, result.state_dict)
    assert noise.std().item() == pytest.approx(sigma * clip * math.sqrt(steps), rel=0.05)


@pytest.mark.parametrize("name", ["cnn", "resnet18"])
def test_default_mode_per_model_trains_privately_and_survives_empty_batches(name):
    model = build_model(name, in_channels=1, num_classes=2, image_size=16)
    mode = resolve_grad_sample_mode("auto", model)
    assert mode == GRAD_SAMPLE_MODE_BY_MODEL[name]
    # functorch and expanded weights fail on an empty Poisson batch with these models: never a default.
    assert mode in ("hooks", "ghost")
    plan = PrivacyPlan(steps=2, sample_rate=0.001, noise_multiplier=1.0, max_grad_norm=1.0)
    assert plan.grad_sample_mode == "auto"
    result = train_local(model, _images(4, 16), plan, lr=0.1)
    assert result.steps == 2 and result.events == [plan.event()]


def test_auto_mode_falls_back_to_opacus_default_and_unknown_modes_are_refused():
    assert resolve_grad_sample_mode("auto", _linear_model()) == "hooks"
    assert resolve_grad_sample_mode("ghost", _linear_model()) == "ghost"
    with pytest.raises(PrivacyError, match="grad_sample_mode"):
        PrivacyPlan(steps=1, sample_rate=1.0, noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode="ghostly")


# ------------------------------------------------------------------------------ logit adjustment


def _uninformative(n: int = 200, share_of_class_1: float = 0.75) -> TensorDataset:
    """Identical images, labels 75% class 1: the best a model can do is predict the label shares."""
    labels = (torch.arange(n) < int(share_of_class_1 * n)).long()
    return TensorDataset(torch.ones(n, 1, 1, 4), labels)


@pytest.mark.parametrize("private", [False, True])
def test_logit_adjustment_removes_the_prior_from_the_models_raw_predictions(private):
    data = _uninformative()
    prior = [0.25, 0.75]
    if private:
        plan = PrivacyPlan(steps=300, sample_rate=0.5, noise_multiplier=0.0, max_grad_norm=1e3,
                           grad_sample_mode="hooks")
    else:
        plan = PrivacyPlan.non_private(steps=300, sample_rate=0.5)
    probability = {}
    for tau in (0.0, 1.0):
        shift = [tau * math.log(p) for p in prior]
        model = _linear_model(features=4)
        model.load_state_dict(train_local(model, data, plan, lr=0.5, logit_shift=shift, seed=0).state_dict)
        probability[tau] = torch.softmax(model(torch.ones(1, 1, 1, 4)), dim=1)[0, 1].item()
    # Plain cross-entropy learns the prior; with tau = 1 the raw logits carry no prior at all.
    assert probability[0.0] == pytest.approx(0.75, abs=0.03)
    assert probability[1.0] == pytest.approx(0.5, abs=0.03)


def test_logit_adjustment_works_with_ghost_clipping_as_with_per_sample_clipping():
    model, data = build_model("cnn", in_channels=1, num_classes=2, image_size=16, width=8), _images(40, 16)
    shift = [2 * math.log(0.25), 2 * math.log(0.75)]
    updates = {}
    for mode, logit_shift in [("hooks", shift), ("ghost", shift), ("hooks", None)]:
        # A clipping bound some per-sample gradients stay under: for two classes the gradient of the
        # loss w.r.t. the logits always points along (1, -1), so once EVERY sample is clipped, the
        # shift (which only changes gradient magnitudes) can no longer change the update.
        plan = PrivacyPlan(steps=3, sample_rate=0.25, noise_multiplier=0.0, max_grad_norm=1.0,
                           max_physical_batch_size=4, grad_sample_mode=mode)
        updates[mode, logit_shift is None] = _update(
            model, train_local(model, data, plan, lr=1.0, logit_shift=logit_shift, seed=2).state_dict)
    assert _relative_difference(updates["ghost", False], updates["hooks", False]) < 1e-4
    assert _relative_difference(updates["hooks", True], updates["hooks", False]) > 0.01  # the shift acts


@pytest.mark.parametrize("activation, layer", [("tanh", nn.Tanh), ("relu", nn.ReLU)])
def test_the_cnn_uses_the_configured_activation(activation, layer):
    model = build_model("cnn", in_channels=1, num_classes=2, image_size=28, activation=activation)
    kinds = {type(m) for m in model.modules()}
    assert layer in kinds and ({nn.Tanh, nn.ReLU} - {layer}).isdisjoint(kinds)


def test_an_unknown_activation_names_the_setting():
    from fedpriv.errors import ConfigError

    with pytest.raises(ConfigError, match="model.activation"):
        build_model("cnn", in_channels=1, num_classes=2, image_size=28, activation="sigmoid")
