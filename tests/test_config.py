"""Configuration: the real conf/ composes, and every bad input gets one clear error before any work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import OmegaConfBaseException

from fedpriv.cli.main import config_dir
from fedpriv.config import register_configs, to_config
from fedpriv.errors import ConfigError, DataError
from fedpriv.experiment import prepare_experiment

CONF = Path(config_dir())
TINY = ["dataset=synthetic", "dataset.num_samples=300", "train.batch_size=8", "federation=iid"]


def composed(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return to_config(compose("config", overrides=list(overrides)))


def test_defaults_are_the_documented_ones():
    cfg = composed()
    assert (cfg.dataset.name, cfg.model.name, cfg.privacy.epsilon, cfg.strategy.mode) == (
        "pneumoniamnist", "cnn", 3.0, "parallel")
    assert (cfg.federation.num_hospitals, cfg.federation.partition) == (3, "dirichlet")
    assert cfg.privacy.enabled and cfg.privacy.accountant == "prv"
    assert (cfg.model.activation, cfg.train.logit_adjustment, cfg.dataset.class_prior) == (
        "tanh", 3.0, [0.258, 0.742])
    # Metrics on hospitals' private validation data are not DP-covered: the server must ask by name.
    assert cfg.strategy.client_evaluate is False
    assert cfg.federation.ledger_scope == "persistent"


def test_the_logit_shift_is_tau_times_the_log_prior_and_needs_one_share_per_class():
    import math

    from fedpriv.config import logit_shift

    cfg = composed("train.logit_adjustment=2")
    assert logit_shift(cfg, 2) == pytest.approx([2 * math.log(0.258), 2 * math.log(0.742)])
    assert logit_shift(composed("train.logit_adjustment=0"), 2) == []
    assert logit_shift(composed("dataset=synthetic"), 2) == []  # no published prior: plain cross-entropy
    with pytest.raises(ConfigError, match="3 classes"):
        logit_shift(cfg, 3)


@pytest.mark.parametrize("option", sorted(
    f"{group.name}={option.stem}" for group in CONF.iterdir() if group.is_dir()
    for option in group.glob("*.yaml")))
def test_every_config_option_composes(option):
    overrides = [option, "dataset.path=/some/folder"] if option == "dataset=imagefolder" else [option]
    cfg = composed(*overrides)
    assert cfg.seed == 0


def test_non_private_is_an_explicit_option():
    assert composed("privacy=none").privacy.enabled is False


@pytest.mark.parametrize("override", ["privacy.epsilonn=3", "privacy.epsilon=abc", "train.batch_size=many",
                                      "federation.num_hospitals=2.5"])
def test_typos_and_wrong_types_fail_at_composition(override):
    with pytest.raises((ConfigCompositionException, OmegaConfBaseException)):
        composed(override)


@pytest.mark.parametrize(("overrides", "key", "hint"), [
    (["privacy.epsilon=0"], "privacy.epsilon", "positive"),
    (["privacy.epsilon=-2"], "privacy.epsilon", "positive"),
    (["privacy.epsilon=nan"], "privacy.epsilon", "positive"),
    (["privacy.delta=0"], "privacy.delta", "between 0 and 1"),
    (["privacy.delta=1.5"], "privacy.delta", "between 0 and 1"),
    (["privacy.max_grad_norm=0"], "privacy.max_grad_norm", "positive"),
    (["privacy.noise_multiplier=-0.5"], "privacy.noise_multiplier", ">= 0"),
    (["privacy.noise_multiplier=lots"], "privacy.noise_multiplier", "'auto'"),
    (["federation.num_hospitals=0"], "federation.num_hospitals", "at least 1"),
    (["dataset.name=cifar"], "dataset.name", "unknown dataset"),
    (["model.name=vgg"], "model.name", "unknown name"),
    (["dataset.size=32"], "dataset.size", "28, 64, 128 and 224"),
    (["privacy.accountant=moments"], "privacy.accountant", "unknown name"),
    (["strategy.mode=random"], "strategy.mode", "unknown name"),
    (["federation.partition=pathological"], "federation.partition", "unknown name"),
    (["model.activation=sigmoid"], "model.activation", "unknown name"),
    (["model=resnet18", "model.activation=tanh"], "model.activation", "ReLU"),
    (["train.logit_adjustment=-1"], "train.logit_adjustment", ">= 0"),
    (["train.lr_final=0"], "train.lr_final", "(0, 1]"),
    (["strategy.server_lr=0"], "strategy.server_lr", "positive"),
    (["strategy.sequential_step=half"], "strategy.sequential_step", "known: full, share"),
    (["strategy.max_in_flight=-1"], "strategy.max_in_flight", "whole number >= 0"),
    (["train.lr_final=1.5"], "train.lr_final", "(0, 1]"),
    (["dataset.class_prior=[0.5,0.6]"], "dataset.class_prior", "summing to 1"),
    (["dataset.class_prior=[0,1]"], "dataset.class_prior", "above 0"),
    (["federation.client_gpus=-0.5"], "federation.client_gpus", ">= 0"),
    (["federation.client_gpus=1.5"], "federation.client_gpus", "whole number"),
    (["federation.ray_address=headnode"], "federation.ray_address", "HOST:PORT"),
    (["federation.ray_address='ray://10.0.0.5:10001'"], "federation.ray_address", "Ray Client"),
    (["federation.ray_address='10.0.0.5:0'"], "federation.ray_address", "HOST:PORT"),
])
def test_bad_config_values_are_rejected_before_data_is_read(overrides, key, hint, monkeypatch):
    # No data directory at all: the config check must fire before any loader runs.
    monkeypatch.setenv("FEDPRIV_DATA_DIR", "/nonexistent")
    with pytest.raises(ConfigError) as error:
        prepare_experiment(composed(*overrides))
    assert error.value.key == key
    assert hint in str(error.value) and "Fix:" in str(error.value)


@pytest.mark.parametrize(("overrides", "key", "hint"), [
    (["train.batch_size=500"], "train.batch_size", "larger than the smallest hospital"),
    (["privacy.delta=0.05"], "privacy.delta", "below 1/records"),
    (["federation.num_hospitals=400"], "federation.num_hospitals", "records"),
    (["federation=dirichlet", "federation.alpha=0.001", "federation.num_hospitals=30", "train.batch_size=1"],
     "federation.alpha", "hospital"),
])
def test_bad_values_for_this_data_are_rejected_before_training(overrides, key, hint):
    with pytest.raises(ConfigError) as error:
        prepare_experiment(composed(*TINY, *overrides))
    assert error.value.key == key
    assert hint in str(error.value)


def write_npz(path: Path, **changes) -> None:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 60), ("val", 10), ("test", 10)):
        arrays[f"{split}_images"] = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).reshape(n, 1).astype(np.uint8)
    arrays.update(changes)
    np.savez(path, **arrays)


def test_data_file_problems_are_data_errors(tmp_path):
    base = ["dataset=pneumoniamnist", f"dataset.root={tmp_path}", "train.batch_size=4", "federation=iid"]
    with pytest.raises(DataError, match="pneumoniamnist.npz") as missing:
        prepare_experiment(composed(*base))
    assert "FEDPRIV_DATA_DIR" in str(missing.value)
    (tmp_path / "pneumoniamnist.npz").write_bytes(b"not an npz at all")
    with pytest.raises(DataError):
        prepare_experiment(composed(*base))
    write_npz(tmp_path / "pneumoniamnist.npz", train_images=np.zeros((60, 32, 32), np.uint8))
    with pytest.raises(DataError):
        prepare_experiment(composed(*base))
    write_npz(tmp_path / "pneumoniamnist.npz")
    assert len(prepare_experiment(composed(*base)).dataset.train) == 60


def test_image_folder_problems_are_data_errors(tmp_path):
    from PIL import Image

    base = ["dataset=imagefolder", f"dataset.path={tmp_path}", "train.batch_size=1", "federation=iid",
            "federation.num_hospitals=1"]
    (tmp_path / "normal").mkdir()
    with pytest.raises(DataError, match="no images|No images|no image"):
        prepare_experiment(composed(*base))
    for i in range(6):
        Image.fromarray(np.full((10, 10), i * 20, np.uint8)).save(tmp_path / "normal" / f"{i}.png")
    with pytest.raises(DataError, match="class"):
        prepare_experiment(composed(*base))


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "FEDPRIV_DATA_DIR": str(cwd / "no-data-here")}
    return subprocess.run([sys.executable, "-m", "fedpriv.cli.main", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_cli_reports_bad_input_in_one_line_without_traceback(tmp_path):
    result = run_cli("privacy.epsilon=-1", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("fedpriv: error:")]
    assert len(errors) == 1 and "privacy.epsilon=-1.0" in errors[0] and "Fix:" in errors[0]


@pytest.mark.slow
def test_cli_reports_a_missing_data_file_with_where_it_looked(tmp_path):
    result = run_cli(f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert str(tmp_path / "no-data-here" / "pneumoniamnist.npz") in result.stderr


@pytest.mark.slow
def test_cli_prints_the_composed_config(tmp_path):
    result = run_cli("--cfg", "job", "privacy.epsilon=1", cwd=tmp_path)
    assert result.returncode == 0
    assert "epsilon: 1.0" in result.stdout and "name: pneumoniamnist" in result.stdout




def test_the_ray_cluster_comes_from_the_setting_else_ray_address_and_local_overrides_both():
    from fedpriv.simulation import ray_cluster_address

    assert ray_cluster_address("", {}) == ""  # a local Ray of its own, as before
    assert ray_cluster_address("", {"RAY_ADDRESS": "10.0.0.5:6379"}) == "10.0.0.5:6379"
    assert ray_cluster_address("10.0.0.7:6379", {"RAY_ADDRESS": "10.0.0.5:6379"}) == "10.0.0.7:6379"
    assert ray_cluster_address("local", {"RAY_ADDRESS": "10.0.0.5:6379"}) == ""
    assert ray_cluster_address("auto", {}) == "auto"
    with pytest.raises(ConfigError) as error:
        ray_cluster_address("", {"RAY_ADDRESS": "headnode"})
    assert error.value.key == "RAY_ADDRESS" and "Fix:" in str(error.value)
    for good in ("federation.client_gpus=0.25", "federation.client_gpus=2", "federation.ray_address='10.0.0.5:6379'"):
        prepare_experiment(composed(*TINY, good))  # accepted


def test_a_local_ray_never_joins_a_cluster_that_ray_start_left_on_this_machine(tmp_path, monkeypatch):
    """Ray's ray.init() without an address joins the cluster named in TEMP_DIR/ray_current_cluster
    (written by `ray start`): a run meant to use a Ray of its own would land on it, with none of the
    attach checks. The SuperLink's environment makes Flower's ray.init() start its own."""
    from ray._private.services import canonicalize_bootstrap_address

    from fedpriv.simulation import LocalSuperLink

    (tmp_path / "ray_current_cluster").write_text("10.0.0.9:6399")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert canonicalize_bootstrap_address(None, str(tmp_path)) == "10.0.0.9:6399"  # what Ray does unprompted
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")  # and $RAY_ADDRESS is not what a local run asked for
    local = LocalSuperLink(tmp_path / "home", ray_address="").env["RAY_ADDRESS"]
    monkeypatch.setenv("RAY_ADDRESS", local)
    assert canonicalize_bootstrap_address(None, str(tmp_path)) is None  # None: start a Ray of its own
    assert LocalSuperLink(tmp_path / "home", ray_address="10.0.0.7:6379").env["RAY_ADDRESS"] == "10.0.0.7:6379"


def test_a_gpu_share_without_a_gpu_for_the_local_ray_is_one_config_error():
    import torch

    from fedpriv.simulation import check_local_gpu_share

    check_local_gpu_share(0)  # the default needs nothing
    if torch.cuda.device_count():
        pytest.skip("this machine has a CUDA GPU")
    with pytest.raises(ConfigError) as error:
        check_local_gpu_share(0.25)
    assert error.value.key == "federation.client_gpus" and "0 CUDA GPUs" in str(error.value)
