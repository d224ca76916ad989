"""model=scatnet: a fixed, data-independent scattering front end, computed once per hospital per run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedpriv.app_config import compose_config
from fedpriv.data import LabeledImages
from fedpriv.errors import ConfigError
from fedpriv.hospital import HospitalSettings
from fedpriv.models import (
    build_model,
    check_private_trainable,
    model_name,
    resolve_grad_sample_mode,
)
from fedpriv.privacy.plan import PrivacyPlan
from fedpriv.report.evaluation import model_info
from fedpriv.scatnet import ScatNet, auto_scale, coefficients_per_channel, precomputed
from fedpriv.site import HospitalSite
from fedpriv.training import train_local


def scatnet(in_channels: int = 1, image_size: int = 28, **options) -> ScatNet:
    return build_model("scatnet", in_channels=in_channels, num_classes=2, image_size=image_size, width=8, **options)


def records(count: int = 40, in_channels: int = 1, image_size: int = 28, seed: int = 0) -> LabeledImages:
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(count, in_channels, image_size, image_size, generator=generator)
    labels = torch.arange(count) % 2
    images[labels == 1, :, image_size // 4:image_size // 2] += 1.0  # a learnable bright band
    patients = np.array([f"p{i // 2}" for i in range(count)])
    return LabeledImages(images, labels, patient_ids=patients)


@pytest.mark.parametrize(("in_channels", "image_size", "maps", "side"), [
    (1, 28, 81, 7),  # PneumoniaMNIST: J=2, L=8, order 2
    (3, 28, 243, 7),  # RGB MedMNIST: K maps for each channel
    (1, 64, 217, 8),  # J=3
    (1, 8, 9, 4),  # the smallest image fedpriv accepts: J=1
])
def test_it_builds_passes_the_validator_and_classifies_every_supported_shape(in_channels, image_size, maps, side):
    model = scatnet(in_channels, image_size)
    check_private_trainable(model)  # Opacus's ModuleValidator finds nothing
    assert model_name(model) == "scatnet" and resolve_grad_sample_mode("auto", model) == "hooks"
    assert model.coefficient_shape == (maps, side, side)
    images = torch.rand(2, in_channels, image_size, image_size)
    assert model(images).shape == (2, 2)
    assert model.precompute(images).shape == (2, maps, side, side)


@pytest.mark.slow
@pytest.mark.parametrize(("image_size", "scale", "side"), [(128, 4, 8), (224, 5, 7)])
def test_large_medmnist_sizes_get_a_larger_scale_and_small_maps(image_size, scale, side):
    model = scatnet(3, image_size)
    assert model.scale == auto_scale(image_size) == scale
    assert model.coefficient_shape == (3 * coefficients_per_channel(scale, 8, 2), side, side)
    assert model(torch.rand(1, 3, image_size, image_size)).shape == (1, 2)


def test_the_front_end_is_fixed_and_data_independent():
    first, second = scatnet(), scatnet()
    # No trainable parameter outside the head, and nothing of the front end in the weights a hospital sends.
    assert [name for name, _ in first.named_parameters() if not name.startswith("head.")] == []
    assert all(key.startswith("head.") for key in first.state_dict())
    # The filters are a function of the settings alone: two models built apart hold the same ones ...
    filters = {name: buffer.clone() for name, buffer in first.front.named_buffers()}
    assert filters and all(torch.equal(buffer, dict(second.front.named_buffers())[name])
                           for name, buffer in filters.items())
    # ... and neither DP-SGD training nor data changes them (GroupNorm keeps no running statistics either).
    data, initial = records(), first.state_dict()["head.1.weight"].clone()
    plan = PrivacyPlan(steps=3, sample_rate=0.5, noise_multiplier=1.0, max_grad_norm=1.0)
    result = train_local(first, precomputed(first, data).as_dataset(), plan, lr=1.0, seed=0)
    first.load_state_dict(result.state_dict)
    assert all(torch.equal(buffer, filters[name]) for name, buffer in first.front.named_buffers())
    assert not any(name.endswith(("running_mean", "running_var")) for name, _ in first.named_buffers())
    assert not torch.equal(result.state_dict["head.1.weight"], initial)  # the head did train


def test_coefficients_give_the_same_logits_as_the_images_and_keep_every_id():
    model, data = scatnet(), records(count=12)
    prepared = precomputed(model, data)
    assert torch.allclose(model(prepared.images), model(data.images), atol=1e-5)
    assert np.array_equal(prepared.ids(), data.ids())  # the ledger charges the same records
    assert np.array_equal(prepared.patient_ids, data.patient_ids) and torch.equal(prepared.labels, data.labels)
    assert precomputed(build_model("cnn", in_channels=1, num_classes=2, image_size=28), data) is data
    # Without record ids, the content ids of the images (identical images share one) are kept.
    twins = LabeledImages(torch.cat([data.images[:3], data.images[:3]]), torch.cat([data.labels[:3]] * 2))
    assert np.array_equal(precomputed(model, twins).ids(), twins.ids()) and len(set(twins.ids())) == 3
    named = LabeledImages(data.images[:4], data.labels[:4], record_ids=np.array(["a", "b", "c", "d"]))
    assert list(precomputed(model, named).ids()) == ["a", "b", "c", "d"]


def test_training_never_runs_the_front_end_once_a_hospitals_coefficients_are_computed(monkeypatch, tmp_path):
    cfg = compose_config(["model=scatnet", "dataset=synthetic", "model.width=8"])
    calls = []
    real = ScatNet.features
    monkeypatch.setattr(ScatNet, "features", lambda self, images: calls.append(len(images)) or real(self, images))
    train, validation = records(count=40), records(count=10, seed=1)
    site = HospitalSite(HospitalSettings("h", 3.0, 1e-5, tmp_path / "ledger.db"), train, validation, cfg, 1, 2, 28)
    assert sum(calls) == 50  # every image of the hospital once, when its site is assembled
    assert site.train.images.shape == (40, 81, 7, 7) and site.validation.images.shape == (10, 81, 7, 7)
    calls.clear()
    plan = PrivacyPlan(steps=4, sample_rate=0.5, noise_multiplier=1.0, max_grad_norm=1.0)
    result = train_local(site.new_model(), site.train.as_dataset(), plan, lr=1.0, seed=0)
    assert result.steps == 4 and calls == []  # four DP-SGD steps, no scattering


def test_bad_inputs_and_settings_say_what_and_how_to_fix():
    model = scatnet()
    with pytest.raises(ValueError, match=r"shape \(2, 1, 32, 32\).*\(N, 1, 28, 28\).*\(N, 81, 7, 7\)"):
        model(torch.rand(2, 1, 32, 32))
    with pytest.raises(ConfigError, match="model.scale"):
        scatnet(image_size=28, scale=5)  # 2^5 > 28
    with pytest.raises(ConfigError, match="model.order"):
        scatnet(order=3)
    with pytest.raises(ConfigError, match="model.activation"):
        scatnet(activation="gelu")


def test_the_report_rebuilds_the_model_from_its_weights():
    cfg = compose_config(["model=scatnet", "dataset=synthetic", "model.width=8", "model.orientations=4"])
    model = build_model("scatnet", in_channels=3, num_classes=2, image_size=28, width=8, orientations=4)
    info = model_info(cfg, model.state_dict(), ["a", "b"])
    assert (info.in_channels, info.orientations) == (3, 4)
    info.build().load_state_dict(model.state_dict())  # same architecture


def _scatnet_search():
    """bench/scatnet_search.py, loaded from its file (bench/ is not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "scatnet_search.py"
    spec = importlib.util.spec_from_file_location("scatnet_search", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("clip", [0.05, 100.0])  # every record clipped; none clipped
def test_the_recipe_searchs_fast_dp_sgd_takes_the_same_steps_as_train_local(clip):
    # The search (bench/scatnet_search.py) trains ScatNet's head with per-sample gradients written out by
    # hand; without noise and with every record in every batch it must take exactly train_local's steps.
    search = _scatnet_search()
    torch.manual_seed(0)
    model = build_model("scatnet", in_channels=1, num_classes=2, image_size=28, width=8)
    with torch.no_grad():  # GroupNorm's affine weights away from (1, 0), as after some training
        model.head[0].weight.uniform_(0.5, 1.5)
        model.head[0].bias.uniform_(-0.5, 0.5)
    data = records(count=30)
    coefficients = model.precompute(data.images)
    unfolded = search.unfold_normalised(coefficients, model.head[0].num_groups)
    shift = [3 * np.log(0.26), 3 * np.log(0.74)]
    plan = PrivacyPlan(steps=3, sample_rate=1.0, noise_multiplier=0.0, max_grad_norm=clip)
    kept = torch.arange(4, 30)  # a hospital's records among the prepared ones
    expected = train_local(model, LabeledImages(coefficients[kept], data.labels[kept]).as_dataset(), plan, lr=0.5,
                           logit_shift=shift, seed=1).state_dict
    fast = search.fast_train_local(model, (unfolded, data.labels, kept), plan, lr=0.5, logit_shift=shift, seed=1)
    assert fast.keys() == expected.keys()
    for key, value in expected.items():
        assert not torch.allclose(value, model.state_dict()[key])  # every tensor moved
        assert torch.allclose(fast[key], value, atol=1e-5, rtol=1e-4), key
    # With noise, the noise is there: sigma * clip per coordinate of the summed gradient.
    noisy = PrivacyPlan(steps=1, sample_rate=1.0, noise_multiplier=5.0, max_grad_norm=clip)
    moved = search.fast_train_local(model, (unfolded, data.labels, kept), noisy, lr=1.0, seed=2)
    step = (moved["head.1.weight"] - model.state_dict()["head.1.weight"]) * len(kept)
    assert 0.8 * 5.0 * clip < step.std() < 1.2 * 5.0 * clip + clip


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
@pytest.mark.parametrize(("experiment", "epsilon", "rounds"), [("scatnet", 3.0, 20), ("scatnet_eps1", 1.0, 10)])
def test_the_scatnet_experiments_give_their_tuned_recipe_and_leave_the_rest_to_the_user(mode, experiment, epsilon,
                                                                                        rounds):
    cfg = compose_config([f"experiment={experiment}", f"strategy={mode}"])
    assert cfg.model.name == "scatnet" and cfg.strategy.mode == mode and cfg.privacy.epsilon == epsilon
    assert (cfg.train.batch_size, cfg.train.lr, cfg.train.lr_final, cfg.train.local_epochs) == (256, 0.5, 0.3, 1)
    assert cfg.strategy.num_rounds == rounds and cfg.privacy.max_grad_norm == 1.0 and cfg.privacy.enabled
    # Each mode keeps its own server step; without the experiment the CNN's recipe is untouched.
    assert (cfg.strategy.server_lr, cfg.strategy.sequential_step) == ((1.5, "share") if mode == "parallel"
                                                                      else (1.0, "share"))
    default = compose_config([f"strategy={mode}"])
    assert (default.model.name, default.train.lr, default.train.batch_size, default.strategy.num_rounds) == (
        "cnn", 1.0, 128, 40)
    # A setting given on the command line still wins over the experiment's.
    chosen = compose_config([f"experiment={experiment}", "train.lr=0.3", "privacy.epsilon=8"])
    assert (chosen.train.lr, chosen.privacy.epsilon) == (0.3, 8.0)
