"""`fedpriv resume=RUN_DIR` continues the resumed run: its own config.yaml, its own ledgers."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fedpriv import rundir
from fedpriv.app_config import compose_config
from fedpriv.cli import main as cli
from fedpriv.cli.main import absolute_paths, resumed_config
from fedpriv.config import to_config, validate_config
from fedpriv.errors import ConfigError
from fedpriv.experiment import LEDGER_DIR_ENV, ledger_folder
from fedpriv.outputs import RunRecorder, resume_checkpoint

pytestmark = pytest.mark.processes  # starts real processes; each test stops what it started

TINY = ["dataset=synthetic", "dataset.num_samples=240", "federation=iid", "train.batch_size=16", "model.width=4",
        "privacy.accountant=rdp"]


def _old_run(run_dir: Path, *overrides: str, pin: bool = True):
    """A run directory as the CLI leaves it: config.yaml (written by the ServerApp) and a checkpoint."""
    cfg = compose_config([*TINY, *overrides])
    if pin:  # the CLI's absolute_paths; a plain `flwr run` does not pin anything
        cfg = absolute_paths(cfg, run_dir)
    RunRecorder(run_dir, cfg, run_dir.name, "SYNTHETIC")
    rundir.checkpoint(run_dir, 1).write_bytes(b"not read by these tests")
    return cfg


def _as_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _without(values: dict, *dotted: str) -> dict:
    values = json.loads(json.dumps(values))
    for key in dotted:
        section, _, name = key.rpartition(".")
        target = values
        for part in filter(None, section.split(".")):
            target = target[part]
        target.pop(name)
    return values


# ---------------------------------------------------------------------------- the configuration


def test_a_resume_runs_the_old_runs_config_not_the_defaults(tmp_path):
    old = _old_run(tmp_path / "a", "strategy.num_rounds=3", "train.lr=0.5", "strategy=sequential")
    resumed = resumed_config(tmp_path / "a", [f"resume={tmp_path / 'a'}"])
    assert resumed.strategy.num_rounds == 3  # not conf/'s 40
    assert (resumed.strategy.mode, resumed.train.lr) == ("sequential", 0.5)
    assert resumed.resume == str(tmp_path / "a")
    assert _without(_as_dict(resumed), "resume") == _without(_as_dict(old), "resume")
    validate_config(resumed)
    assert resume_checkpoint(resumed) == rundir.checkpoint(tmp_path / "a", 1)


def test_only_what_the_command_line_sets_goes_on_top(tmp_path):
    old = _old_run(tmp_path / "a", "strategy.num_rounds=3", "privacy.epsilon=2")
    resumed = resumed_config(tmp_path / "a", [f"resume={tmp_path / 'a'}", "strategy.num_rounds=5",
                                              "privacy.noise_multiplier=1.1", "dataset.class_prior=[0.4,0.6]"])
    assert resumed.strategy.num_rounds == 5
    assert resumed.privacy.noise_multiplier == 1.1 and resumed.dataset.class_prior == [0.4, 0.6]
    assert resumed.privacy.epsilon == 2.0  # kept from the old run
    changed = ("resume", "strategy.num_rounds", "privacy.noise_multiplier", "dataset.class_prior")
    assert _without(_as_dict(resumed), *changed) == _without(_as_dict(old), *changed)


def test_a_relative_resume_path_is_the_same_run(tmp_path, monkeypatch):
    _old_run(tmp_path / "a", "strategy.num_rounds=3")
    monkeypatch.chdir(tmp_path)
    resumed = resumed_config("a", ["resume=a"])
    assert resumed.resume == str(tmp_path / "a") and resumed.strategy.num_rounds == 3


def test_a_group_choice_on_resume_is_refused_as_it_would_replace_many_settings(tmp_path):
    _old_run(tmp_path / "a", "strategy.num_rounds=3")
    for override in ("strategy=sequential", "experiment=smoke", "federation=dirichlet"):
        with pytest.raises(ConfigError, match="config group choice") as error:
            resumed_config(tmp_path / "a", [override])
        assert error.value.key == override.split("=")[0] and "strategy.mode=sequential" in error.value.fix


def test_an_incompatible_override_still_fails_the_checkpoint_check(tmp_path):
    _old_run(tmp_path / "a")
    resumed = resumed_config(tmp_path / "a", ["model.width=8"])
    with pytest.raises(ConfigError, match="model.width was 4, now 8"):
        resume_checkpoint(resumed)


def test_a_directory_without_config_yaml_cannot_be_resumed(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="config.yaml cannot be read") as error:
        resumed_config(tmp_path / "empty", [])
    assert error.value.key == "resume"


def test_the_cli_hands_the_resumed_config_to_the_run(tmp_path, monkeypatch):
    """Through Hydra itself: its task overrides, without resume= and hydra.*, go on top of config.yaml."""
    _old_run(tmp_path / "a", "strategy.num_rounds=3")
    received = []
    monkeypatch.setattr(cli, "run", lambda config, run_dir: received.append((config, run_dir)))
    for extra, rounds in (([], 3), (["strategy.num_rounds=5"], 5)):
        monkeypatch.setattr(sys, "argv", ["fedpriv", f"resume={tmp_path / 'a'}", *extra,
                                          f"hydra.run.dir={tmp_path / 'b'}"])
        cli.main()
        config, run_dir = received.pop()
        assert (config.strategy.num_rounds, config.dataset.name, config.model.width) == (rounds, "synthetic", 4)
        assert config.resume == str(tmp_path / "a") and run_dir == tmp_path / "b"


def test_repeating_the_original_command_line_with_resume_changes_nothing(tmp_path, monkeypatch):
    """Group choices the resumed run made are no-ops (Hydra recorded them); other choices are refused."""
    def record(config, run_dir):  # what the ServerApp would save: the config the CLI hands on
        received.append(config)
        if not config.resume:
            RunRecorder(run_dir, absolute_paths(to_config(config), run_dir), run_dir.name, "SYNTHETIC")
            rundir.checkpoint(run_dir, 1).write_bytes(b"x")

    received = []
    monkeypatch.setattr(cli, "run", record)
    original = [*TINY, "strategy=sequential", "strategy.num_rounds=3"]
    monkeypatch.setattr(sys, "argv", ["fedpriv", *original, f"hydra.run.dir={tmp_path / 'a'}"])
    cli.main()
    assert (tmp_path / "a" / ".hydra" / "hydra.yaml").is_file()
    monkeypatch.setattr(sys, "argv", ["fedpriv", *original, f"resume={tmp_path / 'a'}",
                                      f"hydra.run.dir={tmp_path / 'b'}"])
    cli.main()
    resumed = received.pop()
    assert (resumed.strategy.mode, resumed.strategy.num_rounds, resumed.dataset.name) == ("sequential", 3, "synthetic")
    with pytest.raises(ConfigError, match="config group choice"):
        resumed_config(tmp_path / "a", ["strategy=parallel"])
    with pytest.raises(ConfigError, match="config group choice"):
        resumed_config(tmp_path / "a", ["experiment=smoke"])  # the original run chose no experiment


# ------------------------------------------------------------------------------------- ledgers


def test_a_resumed_throw_away_run_charges_the_old_runs_ledgers(tmp_path):
    _old_run(tmp_path / "a", "federation.ledger_scope=run")
    resumed = absolute_paths(resumed_config(tmp_path / "a", []), tmp_path / "b")
    assert resumed.federation.ledger_scope == "run"  # still labelled throw-away in its summary
    assert ledger_folder(resumed, tmp_path / "b") == tmp_path / "a" / "ledgers"
    validate_config(resumed)
    # b's config.yaml carries it on: resuming b again still charges a's ledgers.
    RunRecorder(tmp_path / "b", resumed, "a", "SYNTHETIC")
    rundir.checkpoint(tmp_path / "b", 2).write_bytes(b"x")
    again = absolute_paths(resumed_config(tmp_path / "b", []), tmp_path / "c")
    assert ledger_folder(again, tmp_path / "c") == tmp_path / "a" / "ledgers"


def test_a_run_started_by_flwr_run_keeps_its_ledgers_in_its_directory_on_resume(tmp_path):
    _old_run(tmp_path / "a", "federation.ledger_scope=run", pin=False)  # config.yaml names no ledger folder
    resumed = absolute_paths(resumed_config(tmp_path / "a", []), tmp_path / "b")
    assert ledger_folder(resumed, tmp_path / "b") == tmp_path / "a" / "ledgers"


def test_a_resumed_persistent_run_keeps_the_folder_its_config_names(tmp_path, monkeypatch):
    monkeypatch.setenv(LEDGER_DIR_ENV, str(tmp_path / "ledgers-then"))
    _old_run(tmp_path / "a")
    monkeypatch.setenv(LEDGER_DIR_ENV, str(tmp_path / "ledgers-now"))
    resumed = absolute_paths(resumed_config(tmp_path / "a", []), tmp_path / "b")
    assert resumed.federation.ledger_scope == "persistent"
    assert ledger_folder(resumed, tmp_path / "b") == tmp_path / "ledgers-then"
    moved = resumed_config(tmp_path / "a", [f"federation.ledger_dir={tmp_path / 'moved'}"])
    assert ledger_folder(moved, tmp_path / "b") == tmp_path / "moved"


def test_changing_the_scope_on_resume_drops_the_old_scopes_location(tmp_path, monkeypatch):
    _old_run(tmp_path / "a", "federation.ledger_scope=run")
    monkeypatch.setenv(LEDGER_DIR_ENV, str(tmp_path / "persistent"))
    resumed = absolute_paths(resumed_config(tmp_path / "a", ["federation.ledger_scope=persistent"]), tmp_path / "b")
    validate_config(resumed)
    assert ledger_folder(resumed, tmp_path / "b") == tmp_path / "persistent"
    _old_run(tmp_path / "p")
    throwaway = absolute_paths(resumed_config(tmp_path / "p", ["federation.ledger_scope=run"]), tmp_path / "q")
    validate_config(throwaway)
    assert ledger_folder(throwaway, tmp_path / "q") == tmp_path / "p" / "ledgers"


@pytest.mark.parametrize("ledger_dir", [None, "elsewhere"])
def test_a_config_from_before_ledger_scope_keeps_its_ledgers_where_they_were(tmp_path, ledger_dir):
    _old_run(tmp_path / "a")
    saved = OmegaConf.load(tmp_path / "a" / "config.yaml")
    del saved.federation["ledger_scope"], saved.federation["ledger_run_dir"]
    saved.federation.ledger_dir = str(tmp_path / ledger_dir) if ledger_dir else None
    OmegaConf.save(saved, tmp_path / "a" / "config.yaml")
    resumed = absolute_paths(resumed_config(tmp_path / "a", []), tmp_path / "b")
    validate_config(resumed)
    expected = tmp_path / ledger_dir if ledger_dir else tmp_path / "a" / "ledgers"
    assert ledger_folder(resumed, tmp_path / "b") == expected


# End to end (a real run interrupted by SIGINT, resumed, stopped by SIGTERM, resumed to its end on its
# own ledgers): tests/test_cli_run.py, which starts the processes and stops them by PID.
