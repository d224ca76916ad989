"""The budget-aware strategy with the real ClientApp, in process (no SuperLink): modes, locks, faults."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from inprocess_grid import InProcessGrid

from fedpriv import client_app
from fedpriv import site as site_module
from fedpriv.app_config import CONFIG_KEY, RUN_DIR_KEY, compose_config, config_to_json
from fedpriv.privacy.ledger import read_ledger
from fedpriv.server_app import run_federation
from fedpriv.site import simulation_ledger_path
from fedpriv.aggregation import weighted_average

# RDP calibrates sigma in milliseconds where PRV takes seconds; PRV is exercised where it matters.
TINY = ["dataset=synthetic", "dataset.num_samples=240", "federation=iid", "train.batch_size=16", "train.local_epochs=1",
        "strategy.num_rounds=2", "model.width=4", "strategy.client_evaluate=false", "privacy.accountant=rdp"]


def federate(tmp_path, *overrides, run="run", grid_hook=None, ledger_dir=None, run_id=None, default_ledger=False):
    """A federation in process. Its persistent ledgers live in `ledger_dir`, by default `tmp_path/ledgers`
    (shared by the runs of one test); `default_ledger=True` leaves the default location ($FEDPRIV_LEDGER_DIR)."""
    ledger_dir = None if default_ledger else (ledger_dir or tmp_path / "ledgers")
    extra = [f"federation.ledger_dir={ledger_dir}"] if ledger_dir and not any(
        o.startswith("federation.ledger_scope=run") for o in overrides) else []
    cfg = compose_config([*TINY, *overrides, *extra])
    run_dir = tmp_path / run
    grid = InProcessGrid(cfg.federation.num_hospitals, {CONFIG_KEY: config_to_json(cfg), RUN_DIR_KEY: str(run_dir)})
    if grid_hook:
        grid_hook(grid)
    strategy = run_federation(grid, cfg, run_dir, run_id=run_id or run)
    return strategy, grid, run_dir


def ledger_of(run_dir):
    """The ledger the run's simulated hospitals shared (one per data source)."""
    from omegaconf import OmegaConf

    from fedpriv.config import to_config

    return simulation_ledger_path(to_config(OmegaConf.load(run_dir / "config.yaml")), run_dir)


def hospital_records(run_dir, index):
    """The records simulated hospital `index` of the run trained on (their ids)."""
    from omegaconf import OmegaConf

    from fedpriv.config import to_config
    from fedpriv.experiment import prepare_experiment

    return prepare_experiment(to_config(OmegaConf.load(run_dir / "config.yaml"))).hospital_data(index).ids()


def _state(message):
    return message.content["arrays"].to_torch_state_dict()


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
@pytest.mark.parametrize("server_lr", [1.0, 2.0])
def test_parallel_round_aggregates_the_weighted_mean(tmp_path, server_lr):
    strategy, grid, run_dir = federate(tmp_path, "strategy.num_rounds=1", "federation=quantity",
                                       f"strategy.server_lr={server_lr}",
                                       "federation.hospitals=[{name: a, share: 0.5}, {name: b, share: 0.3}, "
                                       "{name: c, share: 0.2}]")
    exchanges = grid.train_exchanges()
    assert len(exchanges) == 3 and all(reply is not None for _, reply in exchanges)
    states = [_state(reply) for _, reply in exchanges]
    weights = [reply.content["metrics"]["num-examples"] for _, reply in exchanges]
    assert len(set(weights)) > 1  # unequal hospitals, so the weighting matters
    mean, start = weighted_average(states, weights), _state(exchanges[0][0])
    # server_lr 1 is plain FedAvg (the weighted mean); 2 moves twice as far along the mean update.
    expected = {key: start[key] + server_lr * (mean[key] - start[key]) for key in mean}
    final = torch.load(run_dir / "model.pt", weights_only=True)
    for key in expected:
        torch.testing.assert_close(final[key], expected[key])
    # Every hospital started from the same global model.
    _assert_same(_state(exchanges[0][0]), _state(exchanges[1][0]))


@pytest.mark.slow
def test_sequential_round_passes_the_model_from_hospital_to_hospital(tmp_path):
    strategy, grid, run_dir = federate(tmp_path, "strategy=sequential", "strategy.num_rounds=2",
                                       "strategy.sequential_step=full", "model.width=4", "train.batch_size=16")
    exchanges = grid.train_exchanges()
    assert len(exchanges) == 6  # 3 hospitals x 2 rounds, one at a time
    for (_, previous_reply), (next_message, _) in zip(exchanges, exchanges[1:]):
        _assert_same(_state(next_message), _state(previous_reply))  # k starts from k-1's weights
    _assert_same(torch.load(run_dir / "model.pt", weights_only=True), _state(exchanges[-1][1]))
    assert [r.order for r in strategy.history] == [["hospital-1", "hospital-2", "hospital-3"]] * 2


def test_sequential_share_step_moves_less_towards_a_small_hospital(tmp_path):
    strategy, grid, run_dir = federate(tmp_path, "strategy=sequential", "strategy.num_rounds=1",
                                       "federation=quantity", "federation.hospitals=[{name: a, share: 0.5}, "
                                       "{name: b, share: 0.3}, {name: c, share: 0.2}]")
    assert strategy.sequential_step == "share"  # the sequential default
    exchanges = grid.train_exchanges()
    sizes = [reply.content["metrics"]["num-examples"] for _, reply in exchanges]
    weights = [min(1.0, 3 * n / sum(sizes)) for n in sizes]
    assert weights[0] == 1.0 and 0.5 < weights[2] < 0.7  # a larger-than-average share takes a full step
    for (sent, reply), weight, (following, _) in zip(exchanges, weights, exchanges[1:]):
        start, returned = _state(sent), _state(reply)
        expected = {key: start[key] + weight * (returned[key] - start[key]) for key in start}
        for key, value in _state(following).items():  # hospital k+1 starts where the server moved to
            torch.testing.assert_close(value, expected[key])
    (sent, reply), weight = exchanges[-1], weights[-1]
    final = torch.load(run_dir / "model.pt", weights_only=True)
    for key, value in _state(sent).items():
        torch.testing.assert_close(final[key], value + weight * (_state(reply)[key] - value))
    assert not torch.equal(final["head.weight"], _state(reply)["head.weight"])


@pytest.mark.slow
def test_a_simulated_hospital_is_set_up_once_per_run_not_per_message(tmp_path, monkeypatch):
    parsed, built = [], []
    parse, build = site_module.config_from_run_config, site_module._new_simulated_site
    monkeypatch.setattr(site_module, "config_from_run_config", lambda run_config: parsed.append(1) or parse(run_config))
    monkeypatch.setattr(site_module, "_new_simulated_site", lambda *args: built.append(args[-1]) or build(*args))
    strategy, grid, _ = federate(tmp_path, "strategy.num_rounds=2", "strategy.client_evaluate=true")
    assert len(grid.sent) >= 3 * 4  # a query, two trainings and two evaluations per hospital
    assert sorted(built) == [0, 1, 2] and len(parsed) == 1  # one set-up per hospital, the run's config parsed once
    # The budget state is not cached with it: each round's reply carries the ledger's new figure.
    epsilons = [[record.hospitals[name]["epsilon"] for record in strategy.history]
                for name in ("hospital-1", "hospital-2", "hospital-3")]
    assert all(first < second for first, second in epsilons)
    federate(tmp_path, "strategy.num_rounds=1", run="another-run")  # another run: set up afresh
    assert sorted(built) == [0, 0, 1, 1, 2, 2] and len(parsed) == 2


@pytest.mark.slow
def test_privacy_figures_are_per_hospital_and_max_never_averaged(tmp_path):
    strategy, grid, run_dir = federate(tmp_path, "privacy.accountant=prv", "federation.hospitals=[{name: a, epsilon: 1.0}, "
                                       "{name: b, epsilon: 2.0}, {name: c, epsilon: 4.0}]")
    spent = {h.name: h.epsilon for h in strategy.hospitals}
    assert spent["a"] < spent["b"] < spent["c"] <= 4.0 + 1e-6
    with read_ledger(ledger_of(run_dir)) as ledger:
        for index, hospital in enumerate(strategy.hospitals):  # auto sigma spends each budget over the rounds
            assert hospital.epsilon == pytest.approx(hospital.budget_epsilon, rel=0.02)
            own = ledger.status(hospital_records(run_dir, index), budget=hospital.budget_epsilon)
            assert own.epsilon_spent == pytest.approx(hospital.epsilon, rel=1e-6) and own.locked
    summary = (run_dir / "summary.md").read_text()
    assert "| a |" in summary and "completed all 2 rounds" in summary


@pytest.mark.slow
def test_a_budget_spent_in_round_one_locks_the_hospital_and_ends_the_run(tmp_path):
    # A fixed sigma whose first round (4 steps) reaches epsilon 1.55 and whose second would reach 2.09.
    strategy, grid, run_dir = federate(tmp_path, "privacy.noise_multiplier=2.0", "privacy.epsilon=2.0",
                                       "strategy.num_rounds=4")
    round_two = strategy.history[1]
    # The server's fixed sigma no longer fits: each hospital refuses it, charging and locking nothing
    # (a smaller round could still use the 0.45 left), and the run ends instead of repeating it.
    assert all(h["status"] == "refused" for h in round_two.hospitals.values())
    assert all("nothing charged" in h["message"] for h in round_two.hospitals.values())
    assert len(strategy.history) == 2 and "no hospital can train" in strategy.stop_reason
    assert all(not h.locked and h.epsilon <= 2.0 for h in strategy.hospitals)
    assert all(row["epsilon"] == strategy.history[0].hospitals[name]["epsilon"]
               for name, row in round_two.hospitals.items())
    assert "no hospital can train" in (run_dir / "summary.md").read_text()


@pytest.mark.slow
def test_a_second_run_on_the_same_ledgers_is_refused(tmp_path):
    ledgers = tmp_path / "shared-ledgers"
    first, _, _ = federate(tmp_path, run="first", ledger_dir=ledgers)
    assert all(h.epsilon == pytest.approx(3.0, rel=0.02) for h in first.hospitals)
    second, grid, _ = federate(tmp_path, run="second", ledger_dir=ledgers)
    assert all(h.locked for h in second.hospitals)
    assert all(h.epsilon <= 3.0 + 1e-9 for h in second.hospitals)
    trained = [r for _, r in grid.train_exchanges() if r is not None and r.content["metrics"]["trained"] == 1]
    assert trained == []
    assert "no hospital can train" in second.stop_reason


def test_a_hospital_that_fails_does_not_stop_the_run(tmp_path):
    def break_second_hospital(grid):
        grid.fail.add((grid.node_ids[1], 1))

    strategy, grid, _ = federate(tmp_path, grid_hook=break_second_hospital)
    first, second = strategy.history
    assert first.hospitals["hospital-2"]["status"] == "failed"
    assert sorted(first.trained) == ["hospital-1", "hospital-3"]
    assert sorted(second.trained) == ["hospital-1", "hospital-2", "hospital-3"]


@pytest.mark.slow
def test_sequential_skips_a_silent_hospital_and_continues_from_the_last_good_weights(tmp_path):
    def silence_first_hospital(grid):
        grid.silent.add((grid.node_ids[0], 1))

    strategy, grid, _ = federate(tmp_path, "strategy=sequential", "strategy.num_rounds=1",
                                 grid_hook=silence_first_hospital)
    exchanges = grid.train_exchanges()
    assert strategy.history[0].hospitals["hospital-1"]["status"] == "timeout"
    (silent_message, none_reply), (second_message, _) = exchanges[0], exchanges[1]
    assert none_reply is None
    _assert_same(_state(second_message), _state(silent_message))  # still the global model


def test_non_private_runs_report_epsilon_infinity(tmp_path):
    strategy, _, run_dir = federate(tmp_path, "privacy=none", "strategy.num_rounds=1")
    assert all(math.isinf(h.epsilon) for h in strategy.hospitals)
    with read_ledger(ledger_of(run_dir)) as ledger:  # recorded: those records are spent for good
        assert math.isinf(ledger.status(hospital_records(run_dir, 0)).epsilon_spent)
    assert "NONE: not private, epsilon = infinity" in (run_dir / "summary.md").read_text()


@pytest.mark.slow
def test_outputs_hold_metrics_checkpoints_and_a_resumable_state(tmp_path):
    # A fixed sigma leaves budget for a third round: the resumed run spends the same ledger.
    room = ("privacy.noise_multiplier=3.0", "privacy.epsilon=10")
    strategy, _, run_dir = federate(tmp_path, *room)
    for name in ("config.yaml", "metrics.json", "metrics.csv", "model.pt", "summary.md",
                 "checkpoints/round-001.pt", "checkpoints/round-002.pt"):
        assert (run_dir / name).is_file(), name
    checkpoint = torch.load(run_dir / "checkpoints/round-002.pt", weights_only=True)
    assert checkpoint["round"] == 2 and checkpoint["run_id"] == "run"
    resumed, grid, _ = federate(tmp_path, *room, "strategy.num_rounds=3", f"resume={run_dir}", run="resumed")
    assert [r.round for r in resumed.history] == [3]
    _assert_same(_state(grid.train_exchanges()[0][0]), checkpoint["state_dict"])


@pytest.mark.slow
def test_a_resumed_run_ends_with_the_same_model_as_an_uninterrupted_one(tmp_path):
    # Same seeds, same run id; separate ledgers so that both runs may spend their budgets. The DP
    # noise is seeded (privacy.noise_seed, an experiment-only setting) so that the runs can match.
    seeded = "privacy.noise_seed=11"
    _, _, whole = federate(tmp_path, "strategy.num_rounds=3", seeded, run="whole", ledger_dir=tmp_path / "ledgers-whole")
    # The same run, its coordinator lost after round 2: round 3 never reaches a hospital (so
    # nothing is charged for it) and its checkpoint is gone; the plan still says 3 rounds.
    _, _, cut = federate(tmp_path, "strategy.num_rounds=3", seeded, run="cut", run_id="whole",
                         ledger_dir=tmp_path / "ledgers-cut",
                         grid_hook=lambda grid: grid.silent.update((node, 3) for node in grid.node_ids))
    (cut / "checkpoints" / "round-003.pt").unlink()
    _, _, resumed = federate(tmp_path, "strategy.num_rounds=3", seeded, f"resume={cut}", run="resumed",
                             ledger_dir=tmp_path / "ledgers-cut")
    _assert_same(torch.load(whole / "model.pt", weights_only=True), torch.load(resumed / "model.pt", weights_only=True))


def test_parallel_skips_a_silent_hospital_and_aggregates_the_others(tmp_path):
    def silence_third_hospital(grid):
        grid.silent.add((grid.node_ids[2], 1))

    strategy, grid, run_dir = federate(tmp_path, "strategy.num_rounds=1", "strategy.server_lr=1",
                                       grid_hook=silence_third_hospital)
    row = strategy.history[0].hospitals["hospital-3"]
    assert row["status"] == "timeout" and "skipped" in row["message"]
    answered = [reply for _, reply in grid.train_exchanges() if reply is not None]
    assert len(answered) == 2
    expected = weighted_average([_state(r) for r in answered],
                                [r.content["metrics"]["num-examples"] for r in answered])
    final = torch.load(run_dir / "model.pt", weights_only=True)
    for key in expected:
        torch.testing.assert_close(final[key], expected[key])


def test_a_round_sent_a_few_requests_at_a_time_trains_everyone_from_the_same_model(tmp_path):
    strategy, grid, run_dir = federate(tmp_path, "strategy.num_rounds=1", "strategy.server_lr=1",
                                       "federation.num_hospitals=5", "strategy.max_in_flight=2")
    assert grid.waiting_peak == 2  # never more than two requests waiting
    exchanges = grid.train_exchanges()
    assert len(exchanges) == 5 and all(reply is not None for _, reply in exchanges)
    assert sorted(strategy.history[0].trained) == [f"hospital-{i}" for i in range(1, 6)]
    for message, _ in exchanges[1:]:  # the later requests carry the same global model, not a newer one
        _assert_same(_state(message), _state(exchanges[0][0]))
    replies = [reply for _, reply in exchanges]
    expected = weighted_average([_state(r) for r in replies], [r.content["metrics"]["num-examples"] for r in replies])
    final = torch.load(run_dir / "model.pt", weights_only=True)
    for key in expected:
        torch.testing.assert_close(final[key], expected[key])


def test_hospitals_whose_turn_never_came_within_the_round_timeout_were_not_asked_and_spent_nothing(tmp_path):
    def silence_first_hospital(grid):
        grid.silent.add((grid.node_ids[0], 1))

    strategy, grid, run_dir = federate(tmp_path, "strategy.num_rounds=1", "strategy.max_in_flight=1",
                                       "strategy.round_timeout=1", grid_hook=silence_first_hospital)
    assert [m.metadata.dst_node_id for m, _ in grid.train_exchanges()] == [grid.node_ids[0]]  # only the first
    rows = strategy.history[0].hospitals
    assert rows["hospital-1"]["status"] == "timeout" and "no reply within" in rows["hospital-1"]["message"]
    for name in ("hospital-2", "hospital-3"):
        assert rows[name]["status"] == "timeout" and "not asked" in rows[name]["message"]
    with read_ledger(ledger_of(run_dir)) as ledger:
        for index in (1, 2):
            assert ledger.status(hospital_records(run_dir, index)).epsilon_spent == 0.0


def test_the_superlinks_error_for_an_offline_node_is_told_of_that_node_not_of_node_zero(tmp_path, caplog):
    def take_the_second_offline(grid):
        grid.unavailable.add(grid.node_ids[1])

    with caplog.at_level(logging.WARNING, logger="fedpriv"):
        strategy, grid, _ = federate(tmp_path, "strategy.num_rounds=1", "strategy.max_in_flight=1",
                                     grid_hook=take_the_second_offline)
    offline = grid.node_ids[1]
    assert [h.node_id for h in strategy.hospitals] == [grid.node_ids[0], grid.node_ids[2]]
    warnings = [r.getMessage() for r in caplog.records if "did not answer the hospital query" in r.getMessage()]
    assert warnings == [f"node {offline} did not answer the hospital query: node {offline} is offline"]


@pytest.mark.slow
def test_a_hospital_silent_in_the_last_round_is_reported_as_a_lower_bound(tmp_path):
    def silence_third_hospital(grid):
        grid.silent.add((grid.node_ids[2], 2))

    _, _, run_dir = federate(tmp_path, grid_hook=silence_third_hospital)
    # It may have charged round 2 before going silent: the server must not state its epsilon as exact.
    result = json.loads((run_dir / "result.json").read_text())
    bounds = {h["hospital"]: h["epsilon_is_lower_bound"] for h in result["hospitals"]}
    assert bounds == {"hospital-1": False, "hospital-2": False, "hospital-3": True}
    summary = (run_dir / "summary.md").read_text()
    assert summary.count("no report since round 2") == 1 and "| hospital-3 | " in summary


@pytest.mark.slow
def test_unseeded_hospitals_draw_independent_noise_and_a_seeded_run_says_it_is_not_private(tmp_path):
    # The same hospital, with the same data, seed and run id in two runs, trains with other noise.
    _, grid_a, run_a = federate(tmp_path, "strategy.num_rounds=1", run="a", ledger_dir=tmp_path / "la")
    _, grid_b, _ = federate(tmp_path, "strategy.num_rounds=1", run="b", ledger_dir=tmp_path / "lb", run_id="a")
    a, b = _state(grid_a.train_exchanges()[0][1]), _state(grid_b.train_exchanges()[0][1])
    assert any(not torch.equal(a[key], b[key]) for key in a)  # same run id, seed and data: other noise
    assert "noise_seed" not in (run_a / "summary.md").read_text()
    _, _, seeded = federate(tmp_path, "strategy.num_rounds=1", "privacy.noise_seed=5", run="c",
                            ledger_dir=tmp_path / "lc")
    assert "WARNING" in (seeded / "summary.md").read_text()
    assert json.loads((seeded / "result.json").read_text())["noise_seeded"] is True
