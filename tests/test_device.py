"""Where training runs: `device=auto|cpu|cuda|cuda:N`, resolved once per process and honoured everywhere.

This machine has no CUDA device, so CUDA is simulated by monkeypatching ``torch.cuda.is_available``
and the device string is followed by spies to where it is used (the real work then runs on the CPU).
The one thing that needs a real GPU, a run on it, is bench/gpu_check.py.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from inprocess_grid import InProcessGrid
from opacus.optimizers import optimizer as opacus_optimizer

from fedpriv import client_app, hospital, server_app, training
from fedpriv.app_config import CONFIG_KEY, RUN_DIR_KEY, compose_config, config_to_json
from fedpriv.cli import main as cli
from fedpriv.config import FedprivConfig, validate_config
from fedpriv.deployment.node import NodeSettings, hospital_settings, parse_node_config
from fedpriv.devices import check_device, resolve_device
from fedpriv.errors import ConfigError
from fedpriv.privacy.plan import PrivacyPlan
from fedpriv.protocol import outcome_fields
from fedpriv.server_app import run_federation


def _cuda(monkeypatch, available: bool, count: int = 1) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count if available else 0)


@pytest.mark.parametrize(("value", "available", "expected"), [
    ("auto", False, "cpu"), ("auto", True, "cuda"), ("cpu", True, "cpu"), ("cpu", False, "cpu"),
    ("cuda", True, "cuda"), ("cuda:1", True, "cuda:1"), (" CUDA ", True, "cuda"),
])
def test_a_device_setting_resolves_to_this_machines_device(monkeypatch, value, available, expected):
    _cuda(monkeypatch, available, count=2)
    assert resolve_device(value) == expected


@pytest.mark.parametrize("value", ["cuda", "cuda:0"])
def test_asking_for_cuda_without_it_is_a_one_line_config_error(monkeypatch, value):
    _cuda(monkeypatch, False)
    with pytest.raises(ConfigError) as raised:
        resolve_device(value)
    message = str(raised.value)
    assert raised.value.key == "device" and "no CUDA device" in message and "device=auto" in message
    assert "\n" not in message


def test_a_cuda_index_past_the_machines_devices_is_refused(monkeypatch):
    _cuda(monkeypatch, True, count=1)
    assert resolve_device("cuda:0") == "cuda:0"
    with pytest.raises(ConfigError, match="1 CUDA device"):
        resolve_device("cuda:1")


def test_an_emptied_cuda_visible_devices_is_named_in_the_error(monkeypatch):
    _cuda(monkeypatch, False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # what Ray does to a worker given no GPU share
    with pytest.raises(ConfigError, match="CUDA_VISIBLE_DEVICES is empty"):
        resolve_device("cuda")


@pytest.mark.parametrize("value", ["gpu", "cuda:", "cuda:x", "mps", "", 3, None])
def test_any_other_device_value_is_refused_by_its_form(value):
    with pytest.raises(ConfigError, match="unknown device"):
        check_device(value)


def test_the_default_is_auto_and_the_config_check_resolves_it(monkeypatch):
    assert FedprivConfig().device == "auto" and compose_config([]).device == "auto"
    _cuda(monkeypatch, False)
    validate_config(FedprivConfig())  # auto on a machine without CUDA: the CPU, no error
    with pytest.raises(ConfigError, match="device='cuda'"):
        validate_config(FedprivConfig(device="cuda"))
    with pytest.raises(ConfigError, match="device='gpu'"):
        validate_config(FedprivConfig(device="gpu"))


@pytest.mark.parametrize("value", ["cuda", "gpu"])
def test_the_cli_refuses_a_device_it_cannot_use_in_one_line_exit_2_and_starts_nothing(tmp_path, monkeypatch, capsys,
                                                                                     value):
    _cuda(monkeypatch, False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["fedpriv"])

    def started(*args, **kwargs):
        raise AssertionError("a simulation was started")

    monkeypatch.setattr(cli, "run_simulation", started)
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        cli.main([f"device={value}", "dataset=synthetic", "dataset.num_samples=240", "federation=iid",
                  "federation.num_hospitals=2", "federation.ledger_scope=run", "strategy.num_rounds=1"])
    err = capsys.readouterr().err
    assert done.value.code == cli.EXIT_BAD_INPUT, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"fedpriv: error: device='{value}': "), err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # no run directory (nor outputs/) is left, no ledger was made


class _FakeGenerator:
    """Stands in for torch.Generator: records the device asked for (this machine cannot make a CUDA one)."""

    made: list[_FakeGenerator] = []

    def __init__(self, device: str | None = None) -> None:
        self.device, self.seed = torch.device(device or "cpu"), None
        _FakeGenerator.made.append(self)

    def manual_seed(self, seed: int) -> _FakeGenerator:
        self.seed = seed
        return self


def test_the_noise_generator_is_made_on_the_training_device_and_sampling_stays_on_the_cpu(monkeypatch):
    cpu_sampling, cpu_noise = training.round_generators(5, "cpu")
    assert cpu_sampling is cpu_noise and cpu_noise.device.type == "cpu"  # one generator: CPU runs draw as before
    _FakeGenerator.made = []
    monkeypatch.setattr(training.torch, "Generator", _FakeGenerator)
    sampling, noise = training.round_generators(5, "cuda:1")
    assert sampling.device == torch.device("cpu") and noise.device == torch.device("cuda:1")
    assert sampling is not noise and sampling.seed == noise.seed == 5 and len(_FakeGenerator.made) == 2


def _data(n: int = 60):
    from fedpriv.data import LabeledImages

    x = torch.randn(n, 1, 1, 16, generator=torch.Generator().manual_seed(0))
    return LabeledImages(x, (x.flatten(1).sum(1) > 0).long())


@pytest.mark.parametrize("grouped", [False, True])
def test_opacus_draws_the_noise_with_the_noise_generator_on_the_parameters_device(monkeypatch, grouped):
    """Both private paths (per image, and per patient) take the round's noise generator, and only it, to the noise."""
    sampling, noise = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    asked: list[str] = []
    monkeypatch.setattr(training, "round_generators", lambda seed, device: asked.append(device) or (sampling, noise))
    draws = []
    real_noise = opacus_optimizer._generate_noise

    def spy(std, reference, generator=None, secure_mode=False):
        draws.append((generator, reference.device))
        return real_noise(std, reference, generator=generator, secure_mode=secure_mode)

    monkeypatch.setattr(opacus_optimizer, "_generate_noise", spy)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    data = _data()
    plan = PrivacyPlan(steps=2, sample_rate=0.5, noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode="hooks")
    groups = np.repeat(np.arange(20), 3) if grouped else None
    result = training.train_local(model, data.as_dataset(), plan, lr=0.1, device="cpu", groups=groups)
    assert asked == ["cpu"] and result.steps == 2
    assert draws and all(generator is noise for generator, _ in draws)  # never the sampling generator
    assert {device for _, device in draws} == {torch.device("cpu")}  # the parameters' device: the one asked for


def _federate(tmp_path, *overrides):
    cfg = compose_config(["dataset=synthetic", "dataset.num_samples=240", "federation=iid", "train.batch_size=16",
                          "strategy.num_rounds=1", "model.width=4", "privacy.accountant=rdp",
                          "federation.num_hospitals=2", "federation.ledger_scope=run", *overrides])
    run_dir = tmp_path / "run"
    grid = InProcessGrid(cfg.federation.num_hospitals, {CONFIG_KEY: config_to_json(cfg), RUN_DIR_KEY: str(run_dir)})
    return run_federation(grid, cfg, run_dir, run_id="device-run"), run_dir


@pytest.mark.parametrize(("setting", "expected"), [("auto", "cuda"), ("cpu", "cpu")])
def test_the_resolved_device_reaches_training_evaluation_and_the_run_outputs(tmp_path, monkeypatch, setting, expected):
    """With CUDA 'present', device=auto trains and evaluates on cuda and the run says so; device=cpu stays on the CPU."""
    _cuda(monkeypatch, True)
    seen: dict[str, list[str]] = {"train": [], "server": [], "hospital": []}

    def spying(name, real):
        def call(*args, device="cpu", **kwargs):
            seen[name].append(device)
            return real(*args, device="cpu", **kwargs)  # the real work, on the CPU this machine has
        return call

    monkeypatch.setattr(hospital, "train_local", spying("train", hospital.train_local))
    monkeypatch.setattr(server_app, "evaluate", spying("server", server_app.evaluate))
    monkeypatch.setattr(client_app, "evaluate", spying("hospital", client_app.evaluate))
    strategy, run_dir = _federate(tmp_path, f"device={setting}", "strategy.client_evaluate=true")
    assert seen["train"] == [expected] * 2 and seen["hospital"] == [expected] * 2
    assert seen["server"] and set(seen["server"]) == {expected}
    assert {h.device for h in strategy.hospitals} == {expected}
    result = json.loads((run_dir / "result.json").read_text())
    assert result["server_device"] == expected
    assert result["devices"] == {h["hospital"]: expected for h in result["hospitals"]}
    summary = (run_dir / "summary.md").read_text()
    assert f"- device: hospitals trained on {expected} (hospital-1, hospital-2); the server evaluated on {expected}" \
        in summary


def test_a_hospital_reports_the_device_its_own_settings_name(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDPRIV_KEY_DIR", str(tmp_path / "keys"))
    used = []
    real = hospital.train_local
    monkeypatch.setattr(hospital, "train_local",
                        lambda *args, device, **kwargs: used.append(device) or real(*args, device="cpu", **kwargs))
    settings = hospital.HospitalSettings("A", 1.0, 1e-5, tmp_path / "ledger.db", device="cuda:3")
    request = hospital.RoundRequest(run_id="r", server_round=1, num_rounds=1, batch_size=10, lr=0.1)
    outcome = hospital.train_round(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2)), _data(),
                                   settings, request)
    assert outcome.status == hospital.TRAINED and used == ["cuda:3"]
    assert outcome_fields(outcome)["device"] == "cuda:3"  # what the server records for it


def _node_config(tmp_path, **extra):
    data = tmp_path / "pneumoniamnist.npz"
    data.touch()
    return {"name": "St-Marys", "data": str(data), "budget-epsilon": 3, "delta": 1e-5,
            "ledger": str(tmp_path / "ledger.db"), **extra}


def test_a_deployed_hospital_chooses_its_device_in_its_node_config(tmp_path, monkeypatch):
    assert parse_node_config(_node_config(tmp_path)).device == "auto"  # the default
    assert parse_node_config(_node_config(tmp_path, device="cuda:0")).device == "cuda:0"
    with pytest.raises(ConfigError, match="device='gpu'.*--node-config 'device="):
        parse_node_config(_node_config(tmp_path, device="gpu"))
    settings = parse_node_config(_node_config(tmp_path))
    _cuda(monkeypatch, True)
    assert hospital_settings(settings).device == "cuda"
    _cuda(monkeypatch, False)
    assert hospital_settings(settings).device == "cpu"
    cuda = NodeSettings(**{**settings.__dict__, "device": "cuda"})
    with pytest.raises(ConfigError, match="device='cuda': no CUDA device.*--node-config 'device="):
        hospital_settings(cuda)


@pytest.mark.slow
def test_fedpriv_deploy_node_refuses_cuda_without_it_before_it_starts_anything(tmp_path):
    """`fedpriv-deploy node --device cuda` where no GPU is visible: one line, exit 2, before any credential is read."""
    import os
    import subprocess

    config = _node_config(tmp_path)
    missing = str(tmp_path / "not-made")  # credentials: never reached
    args = ["node", "--name", "A", "--data", config["data"], "--budget-epsilon", "3", "--delta", "1e-5",
            "--ledger", config["ledger"], "--superlink", "127.0.0.1:1", "--root-certificates", missing,
            "--auth-key", missing, "--tls-certificate", missing, "--tls-key", missing, "--print-command"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU visible, on any machine
    done = subprocess.run([sys.executable, "-m", "fedpriv.cli.deploy", *args, "--device", "cuda"],
                          capture_output=True, text=True, env=env, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith("fedpriv-deploy: error: device='cuda': no CUDA device") and "not-made" not in lines[0]
    assert "--node-config 'device=" in lines[0]
    auto = subprocess.run([sys.executable, "-m", "fedpriv.cli.deploy", *args], capture_output=True, text=True,
                          env=env, timeout=120)
    assert auto.returncode == 2 and "credential file not found" in auto.stderr  # device=auto passed, went on
