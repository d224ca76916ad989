"""A hospital's round under its own budget: the server can lower, never raise, what it spends."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedpriv.hospital import (
    LOCKED,
    REFUSED,
    TRAINED,
    HospitalSettings,
    RoundRequest,
    budget_state,
    train_round,
)
from fedpriv.privacy.ledger import read_ledger


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 2))


def _data(n: int = 100) -> TensorDataset:
    x = torch.randn(n, 1, 1, 16, generator=torch.Generator().manual_seed(0))
    return TensorDataset(x, (x.flatten(1).sum(1) > 0).long())


def _settings(tmp_path, budget: float = 1.0, **kwargs) -> HospitalSettings:
    return HospitalSettings("A", budget, 1e-5, tmp_path / "ledger.db", **kwargs)


def _request(**kwargs) -> RoundRequest:
    defaults = dict(run_id="run-1", server_round=1, num_rounds=2, batch_size=10, lr=0.1)
    return RoundRequest(**{**defaults, **kwargs})


def test_a_server_cap_above_the_budget_is_ignored(tmp_path):
    settings = _settings(tmp_path, budget=1.0)
    outcome = train_round(_model(), _data(), settings, _request(max_epsilon=50.0), fingerprint="f")
    assert outcome.status == TRAINED
    # Calibrated against the hospital's own 1.0 (spread over 2 rounds), not the server's 50.
    assert outcome.epsilon <= 1.0 and outcome.budget_epsilon == 1.0
    assert read_ledger(settings.ledger_path).budget_epsilon == 1.0


def test_a_server_cap_below_the_budget_is_honoured_without_locking(tmp_path):
    settings = _settings(tmp_path, budget=2.0)
    outcome = train_round(_model(), _data(), settings, _request(max_epsilon=0.5), fingerprint="f")
    assert outcome.status == TRAINED and outcome.epsilon <= 0.5
    refused = train_round(_model(), _data(), settings,
                          _request(max_epsilon=0.5, noise_multiplier=3.0, run_id="run-2"), fingerprint="f")
    assert refused.status == REFUSED and not refused.locked  # only the request's cap was hit


def test_the_budget_is_spent_over_the_planned_rounds_then_the_hospital_locks(tmp_path):
    settings = _settings(tmp_path, budget=1.0)
    epsilons = []
    for server_round in (1, 2):
        outcome = train_round(_model(), _data(), settings, _request(server_round=server_round), fingerprint="f")
        assert outcome.status == TRAINED
        epsilons.append(outcome.epsilon)
    assert epsilons[0] < epsilons[1] <= 1.0 and epsilons[1] == pytest.approx(1.0, rel=0.02)
    sigmas = {entry.noise_multiplier for entry in read_ledger(settings.ledger_path).entries()}
    assert len(sigmas) == 1  # sigma fixed at the first participation of the run
    extra = train_round(_model(), _data(), settings, _request(server_round=3, num_rounds=3), fingerprint="f")
    assert extra.status == LOCKED and extra.state_dict is None and extra.epsilon <= 1.0
    again = train_round(_model(), _data(), settings, _request(run_id="run-2"), fingerprint="f")
    assert again.status == LOCKED and "budget exhausted" in again.message


def test_spend_remaining_trains_what_fits_then_locks(tmp_path):
    settings = _settings(tmp_path, budget=1.0)
    request = _request(noise_multiplier=2.0, spend_remaining=True, local_epochs=20)
    outcome = train_round(_model(), _data(), settings, request, fingerprint="f")
    assert outcome.status == TRAINED and 0 < outcome.steps < 200
    assert outcome.epsilon <= 1.0 and outcome.locked


def test_a_hospital_with_a_budget_refuses_non_private_training(tmp_path):
    settings = _settings(tmp_path)
    outcome = train_round(_model(), _data(), settings, _request(private=False), fingerprint="f")
    assert outcome.status == REFUSED and outcome.state_dict is None
    assert not settings.ledger_path.exists()


def test_non_private_training_without_a_budget_reports_infinity(tmp_path):
    settings = HospitalSettings("A", None, 1e-5, None, allow_non_private=True)
    outcome = train_round(_model(), _data(), settings, _request(private=False), fingerprint="f")
    assert outcome.status == TRAINED and math.isinf(outcome.epsilon)
    assert math.isinf(budget_state(settings, "f").epsilon)


def test_a_corrupt_ledger_is_refused_and_not_reset(tmp_path):
    settings = _settings(tmp_path)
    settings.ledger_path.write_bytes(b"garbage, not sqlite" * 100)
    from fedpriv.errors import LedgerError

    with pytest.raises(LedgerError):
        train_round(_model(), _data(), settings, _request(), fingerprint="f")
    assert settings.ledger_path.read_bytes().startswith(b"garbage")


def test_round_requests_survive_a_config_record_round_trip():
    request = _request(noise_multiplier=None, max_epsilon=None, spend_remaining=True)
    assert RoundRequest.from_record(request.to_record()) == request


def test_the_learning_rate_falls_linearly_from_lr_to_lr_final_over_the_planned_rounds():
    def lr_in(server_round: int, **kwargs) -> float:
        return RoundRequest(run_id="r", server_round=server_round, num_rounds=5, lr=2.0, **kwargs).round_lr()

    assert [lr_in(r, lr_final=0.3) for r in (1, 2, 3, 4, 5)] == pytest.approx([2.0, 1.65, 1.3, 0.95, 0.6])
    assert lr_in(9, lr_final=0.3) == pytest.approx(0.6)  # past the plan (a resumed run): stays at the floor
    assert {lr_in(r) for r in (1, 3, 5)} == {2.0}  # lr_final 1: constant
    assert RoundRequest(run_id="r", server_round=1, num_rounds=1, lr=2.0, lr_final=0.3).round_lr() == 2.0


def _update(tmp_path, name: str, settings_name: str = "A", noise_seed=None, **request) -> torch.Tensor:
    settings = HospitalSettings(settings_name, 5.0, 1e-5, tmp_path / f"{name}.db", noise_seed=noise_seed)
    outcome = train_round(_model(), _data(), settings, _request(noise_multiplier=1.0, **request), fingerprint="f")
    assert outcome.status == TRAINED
    return torch.cat([v.flatten() for v in outcome.state_dict.values()])


def test_the_servers_seed_does_not_decide_the_dp_noise(tmp_path):
    # Same model, data, request (seed included) and settings: a server that knows all of it still
    # cannot reproduce the update, because the noise and the sampling come from fresh entropy.
    first, second = _update(tmp_path, "one", seed=7), _update(tmp_path, "two", seed=7)
    assert not torch.allclose(first, second)


def test_a_hospitals_own_noise_seed_repeats_its_experiment_and_differs_between_hospitals(tmp_path):
    first = _update(tmp_path, "one", noise_seed=3)
    assert torch.equal(first, _update(tmp_path, "two", noise_seed=3))
    # Another hospital (or another round) with the same experiment seed draws other noise.
    assert not torch.allclose(first, _update(tmp_path, "three", settings_name="B", noise_seed=3))
    assert not torch.allclose(first, _update(tmp_path, "four", noise_seed=3, server_round=2))
    # The server's seed plays no part either way.
    assert torch.equal(first, _update(tmp_path, "five", noise_seed=3, seed=99))
