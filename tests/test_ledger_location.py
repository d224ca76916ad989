"""Where simulated hospitals' ledgers live: persistent by default, throw-away only when asked, and said so."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from fedpriv import experiment, rundir
from fedpriv.app_config import compose_config
from fedpriv.cli.main import absolute_paths
from fedpriv.config import validate_config
from fedpriv.errors import ConfigError
from fedpriv.experiment import LEDGER_DIR_ENV, check_ledger_dir, ledger_folder, prepare_experiment
from fedpriv.outputs import RunRecorder
from fedpriv.privacy.chain import KEY_DIR_ENV, default_key_dir
from fedpriv.report.run_report import write_run_report
from fedpriv.report.sweep import write_sweep_report
from fedpriv.roster import HospitalState

TINY = ["dataset=synthetic", "dataset.num_samples=240", "federation=iid", "train.batch_size=16", "model.width=4"]


# ------------------------------------------------------------------ where ledger_folder points


def test_the_default_scope_is_persistent_in_the_environment_variables_folder(tmp_path, monkeypatch):
    monkeypatch.setenv(LEDGER_DIR_ENV, str(tmp_path / "from-env"))
    cfg = compose_config(TINY)
    assert cfg.federation.ledger_scope == "persistent"
    assert ledger_folder(cfg, tmp_path / "run") == tmp_path / "from-env"
    assert ledger_folder(cfg, None) == tmp_path / "from-env"  # not tied to any run directory


def test_without_the_variable_the_persistent_folder_is_the_users_data_folder(tmp_path, monkeypatch):
    import platformdirs

    monkeypatch.delenv(LEDGER_DIR_ENV)
    asked = []
    monkeypatch.setattr(platformdirs, "user_data_dir", lambda app, *a, **k: asked.append(app) or str(tmp_path / app))
    assert ledger_folder(compose_config(TINY), tmp_path / "run") == tmp_path / "fedpriv" / "ledgers"
    assert asked == ["fedpriv"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="XDG_DATA_HOME is platformdirs' Linux convention")
def test_on_linux_the_default_follows_xdg_data_home(tmp_path, monkeypatch):
    monkeypatch.delenv(LEDGER_DIR_ENV)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert ledger_folder(compose_config(TINY), None) == tmp_path / "xdg" / "fedpriv" / "ledgers"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert ledger_folder(compose_config(TINY), None) == tmp_path / "home" / ".local" / "share" / "fedpriv" / "ledgers"


def test_the_key_folder_is_resolved_in_the_environment_it_is_given(tmp_path, monkeypatch):
    """The Ray cluster check resolves the key folder in the SuperLink's environment, by the same rule
    a hospital uses in its own: FEDPRIV_KEY_DIR (with ~), else the user's configuration folder."""
    import platformdirs

    monkeypatch.setenv(KEY_DIR_ENV, str(tmp_path / "this-process"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_key_dir() == tmp_path / "this-process"
    assert default_key_dir({KEY_DIR_ENV: " ~/keys "}) == tmp_path / "home" / "keys"
    monkeypatch.setattr(platformdirs, "user_config_dir", lambda app, *a, **k: str(tmp_path / "config" / app))
    assert default_key_dir({}) == tmp_path / "config" / "fedpriv" / "ledger-keys"  # not this process's variable
    assert default_key_dir({KEY_DIR_ENV: "  "}) == tmp_path / "config" / "fedpriv" / "ledger-keys"


def test_an_explicit_ledger_dir_beats_the_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv(LEDGER_DIR_ENV, str(tmp_path / "from-env"))
    cfg = compose_config([*TINY, f"federation.ledger_dir={tmp_path / 'explicit'}"])
    assert ledger_folder(cfg, tmp_path / "run") == tmp_path / "explicit"


def test_scope_run_keeps_a_throw_away_ledger_in_the_run_directory(tmp_path):
    cfg = compose_config([*TINY, "federation.ledger_scope=run"])
    assert ledger_folder(cfg, tmp_path / "run") == tmp_path / "run" / "ledgers"
    with pytest.raises(ConfigError, match="no run directory is known"):
        ledger_folder(cfg, None)
    cfg.federation.ledger_run_dir = str(tmp_path / "older-run")  # a resumed run charges the old run's ledgers
    assert ledger_folder(cfg, tmp_path / "run") == tmp_path / "older-run" / "ledgers"


def test_scope_run_with_a_ledger_dir_is_contradictory(tmp_path, monkeypatch):
    cfg = compose_config([*TINY, "federation.ledger_scope=run", f"federation.ledger_dir={tmp_path / 'l'}"])
    with pytest.raises(ConfigError) as error:
        validate_config(cfg)
    assert error.value.key == "federation.ledger_scope" and error.value.value == "run"
    assert "ledger_dir" in str(error.value) and "Fix:" in str(error.value)
    with pytest.raises(ConfigError, match="contradicts"):
        ledger_folder(cfg, tmp_path / "run")
    monkeypatch.setattr(experiment, "load_dataset", _no_data_may_be_read)
    with pytest.raises(ConfigError, match="contradicts"):
        prepare_experiment(cfg)


def test_an_unknown_scope_is_refused_naming_the_key_and_the_choices():
    with pytest.raises(ConfigError) as error:
        validate_config(compose_config([*TINY, "federation.ledger_scope=forever"]))
    assert error.value.key == "federation.ledger_scope" and error.value.value == "forever"
    assert "persistent" in error.value.problem and "run" in error.value.problem


def _no_data_may_be_read(*args, **kwargs):
    raise AssertionError("the data was read before the ledger folder was checked")


def test_an_unwritable_persistent_folder_fails_before_any_data_is_read(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    folder = blocker / "ledgers"  # cannot be created, whoever runs the test (root included)
    monkeypatch.setenv(LEDGER_DIR_ENV, str(folder))
    monkeypatch.setattr(experiment, "load_dataset", _no_data_may_be_read)
    cfg = compose_config(TINY)
    with pytest.raises(ConfigError) as error:
        check_ledger_dir(cfg)
    assert str(folder) in str(error.value) and LEDGER_DIR_ENV in error.value.fix
    with pytest.raises(ConfigError, match="persistent ledger folder"):
        prepare_experiment(cfg)


def test_a_writable_persistent_folder_is_created_by_the_check(tmp_path, monkeypatch):
    monkeypatch.setenv(LEDGER_DIR_ENV, str(tmp_path / "new" / "ledgers"))
    check_ledger_dir(compose_config(TINY))
    assert (tmp_path / "new" / "ledgers").is_dir()
    assert list((tmp_path / "new" / "ledgers").iterdir()) == []  # the write probe is gone


def test_absolute_paths_pins_the_resolved_ledger_location(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(LEDGER_DIR_ENV, "relative-ledgers")
    persistent = absolute_paths(compose_config(TINY), tmp_path / "run")
    assert persistent.federation.ledger_dir == str(tmp_path / "relative-ledgers")
    assert persistent.federation.ledger_run_dir is None
    monkeypatch.setenv(LEDGER_DIR_ENV, str(tmp_path / "elsewhere"))  # pinned: later changes do not move it
    assert ledger_folder(persistent, None) == tmp_path / "relative-ledgers"
    throwaway = absolute_paths(compose_config([*TINY, "federation.ledger_scope=run"]), Path("run"))
    assert (throwaway.federation.ledger_dir, throwaway.federation.ledger_run_dir) == (None, str(tmp_path / "run"))
    validate_config(throwaway)


# --------------------------------------------------------------------------- the shipped configs


@pytest.mark.parametrize(("overrides", "scope"), [
    ([], "persistent"),
    (["experiment=smoke"], "run"),
    (["experiment=privacy_utility"], "run"),
    (["experiment=smoke", "federation=dirichlet"], "run"),  # the experiment's choice survives a group choice
    (["experiment=smoke", "federation.ledger_scope=persistent"], "persistent"),
])
def test_demo_and_benchmark_sweeps_use_throw_away_ledgers_and_the_default_is_persistent(overrides, scope):
    cfg = compose_config(overrides)
    assert cfg.federation.ledger_scope == scope
    assert cfg.federation.ledger_dir is None and cfg.federation.ledger_run_dir is None


# ----------------------------------------------------------------- what the run's files say


def _hospitals() -> list[HospitalState]:
    return [HospitalState(node_id=i, name=f"hospital-{i}", num_examples=80, epsilon=1.5, delta=1e-5,
                          budget_epsilon=3.0) for i in (1, 2)]


def _finished_run(run_dir: Path, *overrides: str) -> tuple[RunRecorder, str]:
    cfg = absolute_paths(compose_config([*TINY, *overrides]), run_dir)
    recorder = RunRecorder(run_dir, cfg, run_dir.name, "SYNTHETIC test images")
    summary = recorder.finish(torch.nn.Linear(2, 2).state_dict(), _hospitals(), "all rounds run")
    return recorder, summary


def test_a_throw_away_runs_summary_says_its_budget_held_within_that_run_only(tmp_path):
    _, summary = _finished_run(tmp_path / "run", "federation.ledger_scope=run")
    assert summary == (tmp_path / "run" / "summary.md").read_text()
    assert "THROW-AWAY" in summary and "enforced within this run only" in summary
    assert f"in {tmp_path / 'run' / 'ledgers'}" in summary
    assert "cumulative over every use" not in summary
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert (result["ledger_scope"], result["ledger_folder"]) == ("run", str(tmp_path / "run" / "ledgers"))


def test_a_persistent_runs_summary_names_the_ledger_folder(tmp_path, ledger_env_dir):
    _, summary = _finished_run(tmp_path / "run")
    assert f"privacy ledger: persistent, in {ledger_env_dir}" in summary
    assert "cumulative over every use" in summary and "within this run only" not in summary
    assert json.loads((tmp_path / "run" / "result.json").read_text())["ledger_folder"] == str(ledger_env_dir)


def test_a_non_private_run_names_its_ledger_too(tmp_path):
    """privacy=none marks the records' epsilon as infinity in the same ledger."""
    _, summary = _finished_run(tmp_path / "run", "privacy=none", "federation.ledger_scope=run")
    assert "NONE: not private" in summary and "enforced within this run only" in summary
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["ledger_folder"] == str(tmp_path / "run" / "ledgers")


def test_the_report_of_a_throw_away_run_says_so_and_a_persistent_ones_does_not(tmp_path):
    _finished_run(tmp_path / "throwaway", "federation.ledger_scope=run")
    _finished_run(tmp_path / "persistent")
    for name, throwaway in (("throwaway", True), ("persistent", False)):
        written = write_run_report(tmp_path / name)
        for text in (written.markdown.read_text(), written.html.read_text()):
            assert ("enforced within this run only" in text) is throwaway, name
            assert ("THROW-AWAY LEDGER" in text) is throwaway, name


def test_the_sweep_table_says_when_budgets_held_within_each_run_only(tmp_path):
    sweep = tmp_path / "sweep"
    _finished_run(sweep / "0", "federation.ledger_scope=run")
    _finished_run(sweep / "1", "federation.ledger_scope=run")
    text = write_sweep_report(sweep).read_text()
    assert "throw-away ledger" in text and "enforced within that run only" in text
    _finished_run(sweep / "2")  # one persistent run among them: the table names the throw-away ones
    text = write_sweep_report(sweep).read_text()
    assert "except in runs 0, 1" in text and "enforced within that run only" in text
    persistent_only = tmp_path / "persistent-sweep"
    _finished_run(persistent_only / "0")
    text = write_sweep_report(persistent_only).read_text()
    assert "cumulative epsilon" in text and "throw-away" not in text


def test_the_sweep_table_never_rounds_an_epsilon_spent_up_to_the_budget(tmp_path):
    sweep = tmp_path / "sweep"
    cfg = absolute_paths(compose_config([*TINY, "federation.ledger_scope=run"]), sweep / "0")
    spent = [HospitalState(node_id=1, name="hospital-1", epsilon=2.99512, delta=1e-5, budget_epsilon=3.0),
             HospitalState(node_id=2, name="hospital-2", epsilon=math.inf, delta=1e-5, budget_epsilon=3.0)]
    RunRecorder(sweep / "0", cfg, "0", "SYNTHETIC test images").finish(torch.nn.Linear(2, 2).state_dict(), spent,
                                                                      "all rounds run")
    row = next(line for line in write_sweep_report(sweep).read_text().splitlines() if line.startswith("| 3 |"))
    assert "| 2.995, inf (not private) |" in row  # 2.99512 of 3 must not read "3"
    csv_row = (sweep / "sweep.csv").read_text().splitlines()[1]
    assert "2.99512 inf" in csv_row  # the CSV keeps every digit


@pytest.mark.parametrize("trained_before", [0, 2])
def test_a_run_whose_hospitals_all_refused_reports_no_test_metric_unless_it_resumed_a_trained_model(
        tmp_path, trained_before):
    """Every hospital refused round 3: the server still evaluated the model, but only a model some
    hospital trained (here or in the run it resumed) has a test AUC to report."""
    from fedpriv.roster import RoundRecord

    cfg = absolute_paths(compose_config([*TINY, "federation.ledger_scope=run"]), tmp_path / "run")
    recorder = RunRecorder(tmp_path / "run", cfg, "run", "SYNTHETIC test images", rounds_trained=trained_before)
    refused = RoundRecord(3, {h.name: {"status": "refused"} for h in _hospitals()}, [h.name for h in _hospitals()],
                          {"auc": 0.7058, "accuracy": 0.6})
    state = torch.nn.Linear(2, 2).state_dict()
    recorder.round_end(refused, state, _hospitals())
    summary = recorder.finish(state, _hospitals(), "stopped after round 3: no hospital can train")
    result = rundir.read_result(tmp_path / "run")
    assert result["rounds_trained"] == trained_before
    assert torch.load(rundir.checkpoint(tmp_path / "run", 3))["rounds_trained"] == trained_before
    table = write_sweep_report(tmp_path).read_text().splitlines()
    sweep_row = table[next(i for i, line in enumerate(table) if line.startswith("|---")) + 1]
    if trained_before:
        assert result["test"]["auc"] == 0.7058 and "final test AUC: 0.7058" in summary
        assert "| 0.7058 | 0.6000 |" in sweep_row
    else:
        assert result["test"] == {} and "0.7058" not in summary and "final model: UNTRAINED" in summary
        assert "| UNTRAINED | UNTRAINED |" in sweep_row
