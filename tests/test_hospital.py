"""A hospital's round under its own budget: the server can lower, never raise, what it spends."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from fedpriv.data import LabeledImages
from fedpriv.errors import LedgerError, PrivacyError
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
from independent_accounting import events_epsilon


@pytest.fixture(autouse=True)
def _key_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDPRIV_KEY_DIR", str(tmp_path / "keys"))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 2))


def _data(n: int = 100, seed: int = 0) -> LabeledImages:
    x = torch.randn(n, 1, 1, 16, generator=torch.Generator().manual_seed(seed))
    return LabeledImages(x, (x.flatten(1).sum(1) > 0).long())


def _settings(tmp_path, budget: float = 1.0, **kwargs) -> HospitalSettings:
    return HospitalSettings("A", budget, 1e-5, tmp_path / "ledger.db", **kwargs)


def _request(**kwargs) -> RoundRequest:
    defaults = dict(run_id="run-1", server_round=1, num_rounds=2, batch_size=10, lr=0.1)
    return RoundRequest(**{**defaults, **kwargs})


def _chain_length(settings: HospitalSettings) -> int:
    with read_ledger(settings.ledger_path) as ledger:
        return ledger.status().chain_length


def test_a_server_cap_above_the_budget_is_ignored(tmp_path):
    settings = _settings(tmp_path, budget=1.0)
    outcome = train_round(_model(), _data(), settings, _request(max_epsilon=50.0))
    assert outcome.status == TRAINED
    # Calibrated against the hospital's own 1.0 (spread over 2 rounds), not the server's 50.
    assert outcome.epsilon <= 1.0 and outcome.budget_epsilon == 1.0
    with read_ledger(settings.ledger_path) as ledger:
        assert ledger.status().budget_epsilon == 1.0


def test_a_server_cap_below_the_budget_is_honoured_and_its_refusal_locks_and_charges_nothing(tmp_path):
    settings = _settings(tmp_path, budget=2.0)
    outcome = train_round(_model(), _data(), settings, _request(max_epsilon=0.5))
    assert outcome.status == TRAINED and outcome.epsilon <= 0.5
    length = _chain_length(settings)
    refused = train_round(_model(), _data(), settings,
                          _request(max_epsilon=0.5, noise_multiplier=3.0, run_id="run-2"))
    assert refused.status == REFUSED and not refused.locked and refused.exhausted == 0
    assert _chain_length(settings) == length  # nothing written
    # The refusal says what a compliant request could still use, and one does train.
    assert refused.remaining == pytest.approx(2.0 - outcome.epsilon, rel=1e-6)
    assert train_round(_model(), _data(), settings, _request(run_id="run-3")).status == TRAINED


def test_the_budget_is_spent_over_the_planned_rounds_then_the_hospital_locks(tmp_path):
    settings = _settings(tmp_path, budget=1.0)
    epsilons = []
    for server_round in (1, 2):
        outcome = train_round(_model(), _data(), settings, _request(server_round=server_round))
        assert outcome.status == TRAINED
        epsilons.append(outcome.epsilon)
    assert epsilons[0] < epsilons[1] <= 1.0 and epsilons[1] == pytest.approx(1.0, rel=0.02)
    with read_ledger(settings.ledger_path) as ledger:
        assert len({event.noise_multiplier for event in ledger.events()}) == 1  # sigma fixed for the run
    extra = train_round(_model(), _data(), settings, _request(server_round=3, num_rounds=3))
    assert extra.status == LOCKED and extra.state_dict is None and extra.epsilon <= 1.0
    assert extra.exhausted == extra.records == len(_data())
    again = train_round(_model(), _data(), settings, _request(run_id="run-2"))
    assert again.status == LOCKED and "budget exhausted" in again.message


def test_new_records_train_with_their_own_budget_while_old_ones_stay_exhausted(tmp_path):
    settings = _settings(tmp_path, budget=1.0)
    old = _data(100)
    for server_round in (1, 2):
        assert train_round(_model(), old, settings, _request(server_round=server_round)).status == TRAINED
    grown = LabeledImages(torch.cat([old.images, _data(40, seed=1).images]),
                          torch.cat([old.labels, _data(40, seed=1).labels]))
    outcome = train_round(_model(), grown, settings, _request(run_id="run-2", num_rounds=1))
    assert outcome.status == TRAINED and outcome.num_examples == 40  # only the new records
    with read_ledger(settings.ledger_path) as ledger:
        budgets = ledger.budgets(grown.ids())
    assert budgets.exhausted[:100].all() and budgets.exhausted[100:].all()  # the new ones spent theirs now
    assert (budgets.epsilon <= 1.0).all()
    assert budgets.epsilon[:100] == pytest.approx(epsilons_of(settings, old)[:100])


def epsilons_of(settings: HospitalSettings, records: LabeledImages) -> np.ndarray:
    with read_ledger(settings.ledger_path) as ledger:
        return ledger.budgets(records.ids()).epsilon


def test_spend_remaining_trains_what_fits_and_nothing_goes_over(tmp_path):
    settings = _settings(tmp_path, budget=1.0)
    request = _request(noise_multiplier=2.0, spend_remaining=True, local_epochs=20)
    outcome = train_round(_model(), _data(), settings, request)
    assert outcome.status == TRAINED and 0 < outcome.steps < 200
    assert outcome.epsilon <= 1.0 and outcome.remaining < 0.05


def test_a_hospital_refuses_non_private_training_unless_it_allows_it(tmp_path):
    settings = _settings(tmp_path)
    outcome = train_round(_model(), _data(), settings, _request(private=False))
    assert outcome.status == REFUSED and outcome.state_dict is None
    assert not settings.ledger_path.exists()


def test_non_private_training_is_recorded_as_infinity_and_exhausts_its_records(tmp_path):
    settings = _settings(tmp_path, allow_non_private=True)
    outcome = train_round(_model(), _data(), settings, _request(private=False))
    assert outcome.status == TRAINED and math.isinf(outcome.epsilon)
    state = budget_state(settings, _data())
    assert math.isinf(state.epsilon) and state.locked
    # Exhausted records never train again, private or not.
    assert train_round(_model(), _data(), settings, _request(private=False, run_id="r2")).status == LOCKED
    assert train_round(_model(), _data(), settings, _request(run_id="r3")).status == LOCKED


def test_a_non_private_round_after_a_private_one_is_recorded(tmp_path):
    settings = _settings(tmp_path, budget=3.0, allow_non_private=True)
    private = train_round(_model(), _data(), settings, _request(num_rounds=4))
    assert private.status == TRAINED and math.isfinite(private.epsilon)
    assert train_round(_model(), _data(), settings, _request(private=False, run_id="r2")).status == TRAINED
    assert math.isinf(budget_state(settings, _data()).epsilon)


def test_a_corrupt_ledger_is_refused_and_not_reset(tmp_path):
    settings = _settings(tmp_path)
    settings.ledger_path.write_bytes(b"garbage, not sqlite" * 100)
    with pytest.raises(LedgerError):
        train_round(_model(), _data(), settings, _request())
    assert settings.ledger_path.read_bytes().startswith(b"garbage")


def test_no_reply_field_tells_two_neighbouring_datasets_apart(tmp_path):
    # Two datasets of the same size that differ in one record (substitution): every figure a
    # hospital sends, apart from its noisy weights and its timings, must be the same. (The old reply
    # carried the exact training loss: a perfect membership test outside epsilon.)
    base = _data(60)
    other = LabeledImages(base.images.clone(), base.labels.clone())
    other.images[0] = torch.randn(1, 1, 16, generator=torch.Generator().manual_seed(9))
    replies = []
    for name, records in (("one", base), ("two", other)):
        settings = HospitalSettings("A", 5.0, 1e-5, tmp_path / f"{name}.db")
        outcome = train_round(_model(), records, settings, _request(batch_size=60, noise_multiplier=5.0))
        assert outcome.status == TRAINED
        replies.append({k: v for k, v in outcome.metrics().items() if not k.endswith("-seconds")})
    assert "train-loss" not in replies[0] and not any("loss" in key for key in replies[0])
    assert replies[0] == replies[1]


def test_round_requests_survive_a_config_record_round_trip():
    request = _request(noise_multiplier=None, max_epsilon=None, spend_remaining=True)
    assert RoundRequest.from_record(request.to_record()) == request


def test_the_learning_rate_falls_linearly_from_lr_to_lr_final_over_the_planned_rounds():
    def lr_in(server_round: int, **kwargs) -> float:
        return RoundRequest(run_id="r", server_round=server_round, num_rounds=5, lr=2.0, **kwargs).round_lr()

    assert [lr_in(r, lr_final=0.3) for r in (1, 2, 3, 4, 5)] == pytest.approx([2.0, 1.65, 1.3, 0.95, 0.6])
    assert lr_in(9, lr_final=0.3) == pytest.approx(0.6)  # past the plan (a resumed run): stays at the floor
    assert {lr_in(r, lr_final=1.0) for r in (1, 3, 5)} == {2.0}  # lr_final 1: constant
    assert lr_in(5) == pytest.approx(0.6)  # the default lr_final is the config's, 0.3
    assert RoundRequest(run_id="r", server_round=1, num_rounds=1, lr=2.0, lr_final=0.3).round_lr() == 2.0


def _update(tmp_path, name: str, settings_name: str = "A", noise_seed=None, **request) -> torch.Tensor:
    settings = HospitalSettings(settings_name, 5.0, 1e-5, tmp_path / f"{name}.db", noise_seed=noise_seed)
    outcome = train_round(_model(), _data(), settings, _request(noise_multiplier=1.0, **request))
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


# ----------------------------------------------------------------- the hospital's own caps


def _run_events(settings: HospitalSettings, run_id: str) -> list:
    with read_ledger(settings.ledger_path) as ledger:
        return [e for e in ledger.events() if e.run_id == run_id]


def test_a_round_over_the_hospitals_per_round_cap_is_refused_and_charges_nothing(tmp_path):
    settings = _settings(tmp_path, budget=10.0, max_epsilon_per_round=0.5)
    # sigma 1 for 10 steps at q = 0.1 costs about 1.1 alone: over the hospital's cap of 0.5.
    refused = train_round(_model(), _data(), settings, _request(noise_multiplier=1.0))
    assert refused.status == REFUSED and "per-round cap of 0.5" in refused.message
    assert _chain_length(settings) == 1 and not refused.locked  # only the opening entry: nothing charged
    assert refused.max_epsilon_per_round == 0.5 and refused.metrics()["max-epsilon-per-round"] == 0.5
    # "auto" calibrates to the cap, and the round's own cost (recomputed independently) stays under it.
    trained = train_round(_model(), _data(), settings, _request(num_rounds=40))
    assert trained.status == TRAINED
    (event,) = _run_events(settings, "run-1")
    assert 0.4 < events_epsilon([event], settings.delta, settings.accountant) <= 0.5 * 1.03


def test_the_hospitals_per_run_cap_holds_over_the_run_and_not_beyond_it(tmp_path):
    settings = _settings(tmp_path, budget=10.0, max_epsilon_per_run=1.5)
    costs = []
    for server_round in (1, 2, 3):
        outcome = train_round(_model(), _data(), settings,
                              _request(server_round=server_round, num_rounds=3, noise_multiplier=2.0))
        costs.append(outcome.status)
    # sigma 2, q 0.1, 10 steps a round: one round costs ~0.45, two ~0.65 ... the run's composition
    # passes 1.5 within a few rounds; then the run's rounds are refused, and nothing more is charged.
    rounds = 2
    while costs[-1] == TRAINED and rounds < 12:
        rounds += 1
        costs.append(train_round(_model(), _data(), settings,
                                 _request(server_round=rounds, num_rounds=12, noise_multiplier=2.0)).status)
    assert costs[-1] == REFUSED and costs.count(TRAINED) >= 2
    events = _run_events(settings, "run-1")
    assert events_epsilon(events, settings.delta, settings.accountant) <= 1.5 * 1.03
    refused = train_round(_model(), _data(), settings, _request(server_round=rounds + 1, num_rounds=12,
                                                                noise_multiplier=2.0))
    assert refused.status == REFUSED and "per-run cap of 1.5" in refused.message and not refused.locked
    assert len(_run_events(settings, "run-1")) == len(events)
    # Another run starts its own cap (the per-record budget of 10 is what holds over every run).
    assert train_round(_model(), _data(), settings, _request(run_id="run-2", noise_multiplier=2.0)).status == TRAINED


def test_auto_sigma_spreads_the_per_run_cap_over_the_planned_rounds(tmp_path):
    settings = _settings(tmp_path, budget=10.0, max_epsilon_per_run=1.0)
    for server_round in (1, 2, 3):
        outcome = train_round(_model(), _data(), settings, _request(server_round=server_round, num_rounds=3))
        assert outcome.status == TRAINED
    cost = events_epsilon(_run_events(settings, "run-1"), settings.delta, settings.accountant)
    assert 0.8 < cost <= 1.0 * 1.03


def test_spend_remaining_stops_at_the_hospitals_per_round_cap(tmp_path):
    settings = _settings(tmp_path, budget=10.0, max_epsilon_per_round=0.8)
    outcome = train_round(_model(), _data(), settings,
                          _request(noise_multiplier=2.0, spend_remaining=True, local_epochs=20))
    assert outcome.status == TRAINED and 0 < outcome.steps < 200
    (event,) = _run_events(settings, "run-1")
    assert events_epsilon([event], settings.delta, settings.accountant) <= 0.8 * 1.03


def test_a_hospital_cap_that_is_not_a_positive_number_is_rejected(tmp_path):
    with pytest.raises(PrivacyError, match="per-run epsilon cap"):
        _settings(tmp_path, max_epsilon_per_run=0.0)
