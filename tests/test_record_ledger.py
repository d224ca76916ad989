"""The budget belongs to the records: no default run, repartition, new split or non-private use escapes it.

Each scenario runs the real strategy and ClientApp in process, then recomputes every record's
epsilon from the ledger's raw events with Google's dp_accounting (independent of Opacus) and checks
it against the ledger's figure and the budget.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
from independent_accounting import check_records
from inprocess_grid import InProcessGrid
from test_federation import TINY, federate, hospital_records, ledger_of

from fedpriv import rundir
from fedpriv.app_config import CONFIG_KEY, RUN_DIR_KEY, compose_config, config_from_run_config
from fedpriv.cli import main as cli
from fedpriv.data.synthetic import make_synthetic
from fedpriv.deployment.node import hospital_settings, load_hospital_data, parse_node_config
from fedpriv.deployment.rehearsal import write_share
from fedpriv.experiment import prepare_experiment
from fedpriv.hospital import LOCKED, TRAINED, RoundRequest, train_round
from fedpriv.models import build_model
from fedpriv.privacy.ledger import read_ledger
from fedpriv.server_app import run_federation

BUDGET = 3.0


def all_training_records(*overrides: str) -> np.ndarray:
    """Every record of the synthetic training split (what any partition can hand a hospital)."""
    return prepare_experiment(compose_config([*TINY, *overrides])).dataset.train.ids()


def trained_ids(run_dir, hospitals: int) -> set[str]:
    return {str(i) for index in range(hospitals) for i in hospital_records(run_dir, index)}


@pytest.mark.slow
def test_a_second_default_run_finds_every_budget_spent_and_says_where_it_is_kept(tmp_path, ledger_env_dir,
                                                                                  monkeypatch, capsys):
    first, _, first_dir = federate(tmp_path, run="first", default_ledger=True)
    assert all(h.epsilon == pytest.approx(BUDGET, rel=0.02) for h in first.hospitals)
    assert rundir.read_result(first_dir)["rounds_trained"] == 2 and "final test AUC" in rundir.read_summary(first_dir)
    second, grid, second_dir = federate(tmp_path, run="second", default_ledger=True)  # the same command again
    assert all(h.locked for h in second.hospitals) and second.history == []
    assert not [r for _, r in grid.train_exchanges() if r is not None and r.content["metrics"]["trained"]]
    assert ledger_of(second_dir) == ledger_of(first_dir) and ledger_of(first_dir).parent == ledger_env_dir
    summary = rundir.read_summary(second_dir)
    assert str(ledger_env_dir) in summary and "federation.ledger_scope=run" in summary
    with read_ledger(ledger_of(second_dir)) as ledger:
        check_records(ledger, all_training_records(), BUDGET)
    # Nobody trained: no headline metric anywhere, and the report says the model is untrained.
    result = rundir.read_result(second_dir)
    assert (result["rounds_trained"], result["test"]) == (0, {})
    assert "final test AUC" not in summary and "final model: UNTRAINED" in summary
    assert "UNTRAINED MODEL" in (second_dir / rundir.REPORT_MD).read_text()
    # The same command once more, through `fedpriv` itself (its federation in process): one line, exit 3.
    def federate_in_process(config_json, run_dir, *, num_hospitals, **_):
        run_config = {CONFIG_KEY: config_json, RUN_DIR_KEY: str(run_dir)}
        run_federation(InProcessGrid(num_hospitals, run_config), config_from_run_config(run_config), run_dir,
                       run_id="third")

    monkeypatch.setattr(cli, "run_simulation", federate_in_process)  # the name the CLI calls
    # Hydra's own logging setup would keep pytest's captured stream after the test: left out.
    monkeypatch.setattr(sys, "argv", ["fedpriv", *TINY, f"hydra.run.dir={tmp_path / 'third'}",
                                      "hydra/job_logging=none", "hydra/hydra_logging=none"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == cli.EXIT_NOTHING_TRAINED
    err = capsys.readouterr().err
    told = [line for line in err.splitlines() if line.startswith("fedpriv: ")]
    assert len(told) == 1 and "Traceback" not in err
    assert told[0].startswith("fedpriv: no hospital trained in any round") and str(tmp_path / "third") in told[0]
    assert rundir.read_result(tmp_path / "third")["test"] == {}


@pytest.mark.slow
def test_more_hospitals_on_the_same_ledger_store_never_charge_a_spent_record_again(tmp_path):
    _, _, two = federate(tmp_path, "federation.num_hospitals=2", run="two")
    spent = trained_ids(two, 2)
    three, _, three_dir = federate(tmp_path, "federation.num_hospitals=3", run="three")
    with read_ledger(ledger_of(three_dir)) as ledger:
        epsilons = check_records(ledger, all_training_records(), BUDGET)
        for record_id in list(spent)[:40]:  # the records run "two" spent: no event of run "three"
            events, _, exhausted, _ = ledger.record_history(record_id)
            assert exhausted and {e.run_id for e in events} == {"two"}
    # What run "three" could still train on were the records run "two" held out for validation.
    assert (epsilons <= BUDGET).all()
    assert all(h.epsilon <= BUDGET for h in three.hospitals)


@pytest.mark.slow
def test_a_changed_validation_split_trains_only_records_that_were_not_spent(tmp_path):
    _, _, first = federate(tmp_path, "federation.local_val_fraction=0.1", run="first")
    spent = trained_ids(first, 3)
    _, _, second = federate(tmp_path, "federation.local_val_fraction=0.4", run="second")
    with read_ledger(ledger_of(second)) as ledger:
        check_records(ledger, all_training_records(), BUDGET)
        second_sets = [e for e in ledger.events() if e.run_id == "second"]
        for record_id in list(spent)[:40]:
            events, _, _, _ = ledger.record_history(record_id)
            assert not any(e.run_id == "second" for e in events), record_id
    assert all(e.set_size < 200 for e in second_sets)


@pytest.mark.slow
def test_a_non_private_run_after_a_private_one_trains_nothing_on_spent_records(tmp_path):
    _, _, private = federate(tmp_path, run="private")
    with read_ledger(ledger_of(private)) as ledger:
        before = len(ledger.events())
    plain, grid, plain_dir = federate(tmp_path, "privacy=none", run="plain")
    assert not [r for _, r in grid.train_exchanges() if r is not None and r.content["metrics"]["trained"]]
    assert all(h.locked for h in plain.hospitals)
    with read_ledger(ledger_of(plain_dir)) as ledger:
        assert len(ledger.events()) == before  # nothing charged, nothing trained
        check_records(ledger, all_training_records(), BUDGET)


@pytest.mark.slow
def test_a_non_private_run_is_recorded_as_infinity_for_every_record_it_touched(tmp_path):
    plain, _, run_dir = federate(tmp_path, "privacy=none", "strategy.num_rounds=1", run="plain")
    assert all(math.isinf(h.epsilon) for h in plain.hospitals)
    with read_ledger(ledger_of(run_dir)) as ledger:
        touched = hospital_records(run_dir, 0)
        epsilons = check_records(ledger, touched, BUDGET)
        assert np.isinf(epsilons).all() and ledger.status(touched).locked
    again, _, _ = federate(tmp_path, "strategy.num_rounds=1", run="private-after")  # private, same records
    assert all(h.locked for h in again.hospitals) and again.history == []


def _deployed_round(node_config: dict, run_id: str, rounds: int = 2) -> list:
    settings = parse_node_config(node_config)
    data = load_hospital_data(settings, 28)
    outcomes = []
    for server_round in range(1, rounds + 1):
        model = build_model("cnn", in_channels=1, num_classes=2, image_size=28, width=4)
        request = RoundRequest(run_id=run_id, server_round=server_round, num_rounds=rounds, batch_size=16,
                               lr=0.5, noise_multiplier=None)
        outcomes.append(train_round(model, data.train, hospital_settings(settings), request))
    return outcomes, data


@pytest.mark.slow
def test_a_deployed_hospital_that_adds_scans_trains_the_new_ones_and_keeps_the_old_ones_spent(tmp_path):
    folder, ledger_dir = tmp_path / "data", tmp_path / "ledger"
    ledger_dir.mkdir()
    node_config = {"name": "St-Elsewhere", "data": str(folder), "budget-epsilon": BUDGET, "delta": 1e-5,
                   "ledger": str(ledger_dir / "ledger.db"), "threads": 1, "min-records": 10}
    old = make_synthetic(num_samples=150, size=28, seed=3, val_fraction=0.1, test_fraction=0.1)
    write_share(folder, "pneumoniamnist", 28, old.train, old.val, old.test)
    outcomes, before = _deployed_round(node_config, "first")
    assert [o.status for o in outcomes] == [TRAINED, TRAINED] and outcomes[-1].locked
    assert _deployed_round(node_config, "again", rounds=1)[0][0].status == LOCKED

    # New scans arrive; the hospital rewrites its file with old and new records (in another order).
    new = make_synthetic(num_samples=80, size=28, seed=4, val_fraction=0.1, test_fraction=0.1)
    grown = type(old.train)(
        images=__import__("torch").cat([new.train.images, old.train.images]),
        labels=__import__("torch").cat([new.train.labels, old.train.labels]))
    write_share(folder, "pneumoniamnist", 28, grown, old.val, old.test)
    outcomes, after = _deployed_round(node_config, "second")
    assert [o.status for o in outcomes] == [TRAINED, TRAINED]
    assert all(o.num_examples == len(new.train) for o in outcomes)  # only the new records trained
    with read_ledger(ledger_dir / "ledger.db", key_path=None) as ledger:
        epsilons = check_records(ledger, after.train.ids(), BUDGET)
        old_ids = set(before.train.ids())
        for position, record_id in enumerate(after.train.ids()):
            events, _, exhausted, _ = ledger.record_history(str(record_id))
            assert exhausted
            assert {e.run_id for e in events} == ({"first"} if record_id in old_ids else {"second"})
    assert epsilons.max() <= BUDGET


def test_in_a_sweep_a_job_that_trained_nothing_is_logged_and_the_sweep_goes_on(tmp_path, monkeypatch, caplog):
    from fedpriv.errors import NothingTrained

    jobs = []

    def nothing_trained(config, run_dir):
        jobs.append(run_dir)
        raise NothingTrained(f"no hospital trained in any round; outputs in {run_dir}")

    monkeypatch.setattr(cli, "run", nothing_trained)
    monkeypatch.setattr(sys, "argv", ["fedpriv", "-m", *TINY, "seed=1,2", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                                      "hydra/job_logging=none", "hydra/hydra_logging=none"])
    cli.main()  # no SystemExit: the second job still ran
    assert len(jobs) == 2 and "no hospital trained in any round" in caplog.text
