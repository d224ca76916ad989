"""Bad configuration and data beyond the basics: one clear error (or a named exclusion), nothing spent."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from fault_injection import without_permission_override
from PIL import Image
from test_federation import TINY, federate

import fedpriv.client_app as client_app
from fedpriv.app_config import compose_config
from fedpriv.data.imagefolder import load_image_folder
from fedpriv.errors import ConfigError
from fedpriv.experiment import prepare_experiment
from fedpriv.privacy.accounting import epsilon
from fedpriv.privacy.ledger import read_ledger


def _rename_sites(monkeypatch, change):
    """Every simulated hospital's settings pass through `change(index, settings)`."""
    real = client_app.simulated_site

    def site(run_config, partition_id):
        found = real(run_config, partition_id)  # shared by the worker's later messages: change a copy
        return dataclasses.replace(found, settings=change(partition_id, found.settings))

    monkeypatch.setattr(client_app, "simulated_site", site)


def _trained(grid) -> list:
    return [r for _, r in grid.train_exchanges() if r is not None and r.content["metrics"]["trained"] == 1]


@pytest.mark.slow
def test_two_nodes_with_one_hospital_name_do_not_stop_the_run(tmp_path, monkeypatch, caplog):
    """Simulation (no registered names): nodes calling themselves alike are kept apart by node id."""
    _rename_sites(monkeypatch, lambda i, s: dataclasses.replace(s, name="St-Marys"))
    with caplog.at_level(logging.WARNING, logger="fedpriv"):
        strategy, grid, run_dir = federate(tmp_path)
    names = sorted(h.name for h in strategy.hospitals)
    assert names == sorted(f"St-Marys#{node}" for node in grid.node_ids)
    assert "3 nodes" in caplog.text and "go by the hospital name St-Marys" in caplog.text
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert set(rounds[-1]["hospitals"]) == set(names) and _trained(grid)


@pytest.mark.slow
def test_a_hospital_is_reported_under_its_registered_name_whatever_it_calls_itself(tmp_path, monkeypatch, caplog):
    """Deployment: the SuperLink binds each registered name to the node its key authenticates.

    Node 2 (registered as "rogue") calls itself hospital-1 in its node config, and two keys were
    registered under one name: the run goes on, every row is the registered node's own.
    """
    _rename_sites(monkeypatch, lambda i, s: dataclasses.replace(s, name="hospital-1" if i == 2 else s.name))

    def register(grid):
        first, second, third = grid.node_ids
        grid.registered.update({first: "hospital-1", second: "twin", third: "twin"})

    with caplog.at_level(logging.WARNING, logger="fedpriv"):
        strategy, grid, run_dir = federate(tmp_path, grid_hook=register)
    first, second, third = grid.node_ids
    by_node = {h.node_id: h for h in strategy.hospitals}
    assert by_node[first].name == "hospital-1" and by_node[first].claimed_name == "hospital-1"
    assert (by_node[second].name, by_node[third].name) == (f"twin#{second}", f"twin#{third}")
    assert by_node[third].claimed_name == "hospital-1"  # its claim is recorded, never used as its name
    assert f"registered as twin, calls itself 'hospital-1'" in caplog.text
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert set(rounds[-1]["hospitals"]) == {"hospital-1", f"twin#{second}", f"twin#{third}"}
    assert len(_trained(grid)) == 3 * len(rounds)  # nobody was stopped or merged
    summary = (run_dir / "summary.md").read_text()
    assert f"| twin#{third} |" in summary and summary.count("| hospital-1 |") == 1


def test_duplicate_hospital_names_in_the_config_are_refused_before_data_is_read():
    cfg = compose_config([*TINY, "federation.hospitals=[{name: a}, {name: b}, {name: a}]"])
    with pytest.raises(ConfigError, match="unique") as error:
        prepare_experiment(cfg)
    assert error.value.key == "federation.hospitals.name"


@pytest.mark.slow
def test_two_hospitals_holding_the_same_records_share_those_records_budget(tmp_path, monkeypatch):
    # The budget belongs to the records, not to a hospital's name: hospital-2 is handed hospital-1's
    # records, so whatever one of them spends the other finds spent.
    real = client_app.simulated_site

    def same_records(run_config, partition_id):
        site = real(run_config, partition_id)
        return dataclasses.replace(site, train=real(run_config, 0).train) if partition_id == 1 else site

    monkeypatch.setattr(client_app, "simulated_site", same_records)
    strategy, grid, run_dir = federate(tmp_path)
    from test_federation import hospital_records, ledger_of

    with read_ledger(ledger_of(run_dir)) as ledger:
        shared = ledger.budgets(hospital_records(run_dir, 0))
        events = [e for e in ledger.events() if e.hospital in ("hospital-1", "hospital-2")]
    # Both hospitals' uses of the records compose into one epsilon per record, within the budget.
    assert {e.hospital for e in events} == {"hospital-1", "hospital-2"}
    assert (shared.epsilon <= 3.0).all()
    assert shared.epsilon.max() == pytest.approx(epsilon([e.event() for e in events], 1e-5, "rdp"), rel=1e-9)
    refused = [row for record in strategy.history for name, row in record.hospitals.items()
               if name in ("hospital-1", "hospital-2") and row["status"] != "trained"]
    assert refused and all("nothing charged" in row["message"] for row in refused)


def test_a_ledger_dir_that_cannot_be_created_is_refused_before_data_is_read(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cfg = compose_config([*TINY, f"federation.ledger_dir={blocker / 'ledgers'}"])
    with pytest.raises(ConfigError, match="cannot create that folder") as error:
        prepare_experiment(cfg)
    assert error.value.key == "federation.ledger_dir"


@pytest.mark.slow
def test_cli_refuses_a_read_only_ledger_dir_in_one_line_and_starts_nothing(tmp_path):
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    os.chmod(read_only, 0o555)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "fedpriv.cli.main", *TINY, f"federation.ledger_dir={read_only}",
             f"hydra.run.dir={tmp_path / 'run'}"],
            cwd=tmp_path, capture_output=True, text=True, timeout=300, preexec_fn=without_permission_override)
    finally:
        os.chmod(read_only, 0o755)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("fedpriv: error:")]
    assert len(errors) == 1 and "federation.ledger_dir" in errors[0] and "Permission denied" in errors[0]
    assert "Fix:" in errors[0] and list(read_only.iterdir()) == []
    assert not (tmp_path / "run" / "checkpoints").exists()  # no federation was started


@pytest.mark.slow
def test_resuming_from_a_run_with_another_model_is_refused_and_names_the_setting(tmp_path):
    _, _, first = federate(tmp_path, run="first")
    with pytest.raises(ConfigError, match="model.width was 4, now 8") as error:
        federate(tmp_path, "model.width=8", f"resume={first}", run="second")
    assert error.value.key == "resume" and "config.yaml" in error.value.fix
    assert not (tmp_path / "second").exists()  # refused before the run wrote anything


@pytest.mark.slow
def test_resuming_from_a_run_with_another_data_split_is_refused(tmp_path):
    _, _, first = federate(tmp_path, run="first")
    with pytest.raises(ConfigError, match="seed was 0, now 1.*|federation.num_hospitals was 3, now 4"):
        federate(tmp_path, "seed=1", f"resume={first}", run="second")
    with pytest.raises(ConfigError, match="federation.num_hospitals was 3, now 4"):
        federate(tmp_path, "federation.num_hospitals=4", f"resume={first}", run="third")


@pytest.mark.slow
def test_resuming_from_a_truncated_checkpoint_is_refused(tmp_path):
    _, _, first = federate(tmp_path, run="first")
    last = sorted((first / "checkpoints").glob("round-*.pt"))[-1]
    last.write_bytes(last.read_bytes()[:100])
    with pytest.raises(ConfigError, match="round-002.pt cannot be used"):
        federate(tmp_path, "strategy.num_rounds=3", f"resume={first}", run="second")


def test_a_hospital_without_any_record_of_a_class_is_named_in_a_warning(caplog):
    cfg = compose_config([*TINY, "federation=dirichlet", "federation.alpha=0.05", "federation.num_hospitals=3",
                          "seed=3", "train.batch_size=8"])
    with caplog.at_level(logging.WARNING, logger="fedpriv.experiment"):
        experiment = prepare_experiment(cfg)
    empty = [row["hospital"] for row in experiment.partition_rows
             if any(row[name] == 0 for name in experiment.dataset.class_names)]
    assert empty, "this seed and alpha should leave some hospital without a class"
    warning = " ".join(record.getMessage() for record in caplog.records)
    assert all(f"{name} holds no records of class" in warning for name in empty)
    assert "federation.alpha" in warning


def test_an_image_folder_of_mixed_sizes_is_resized_to_the_configured_size(tmp_path):
    rng = np.random.default_rng(0)
    for label, sizes in (("normal", [(20, 20), (64, 48), (28, 28)]), ("pneumonia", [(100, 100), (31, 17), (28, 40)])):
        folder = tmp_path / "data" / label
        folder.mkdir(parents=True)
        for repeat in range(4):
            for i, (w, h) in enumerate(sizes):
                Image.fromarray(rng.integers(0, 255, (h, w), dtype=np.uint8)).save(folder / f"{repeat}-{i}.png")
    dataset = load_image_folder(str(tmp_path / "data"), 28, val_fraction=0.2, test_fraction=0.2)
    for split in (dataset.train, dataset.val, dataset.test):
        assert tuple(split.images.shape[1:]) == (1, 28, 28)
    assert len(dataset.train) + len(dataset.val) + len(dataset.test) == 24


def test_a_global_model_that_does_not_fit_a_hospitals_records_is_a_one_line_refusal(tmp_path, monkeypatch):
    # A hospital whose records have three classes while the federation's model has two outputs.
    real_site = client_app.simulated_site

    def three_classes(run_config, partition_id):
        site = real_site(run_config, partition_id)
        if partition_id == 1:
            return dataclasses.replace(site, num_classes=3)
        return site

    monkeypatch.setattr(client_app, "simulated_site", three_classes)
    strategy, grid, _ = federate(tmp_path, "strategy.num_rounds=1")
    row = strategy.history[0].hospitals["hospital-2"]
    assert row["status"] == "refused" and "do not fit hospital hospital-2's model" in row["message"]
    assert "\n" not in row["message"]
    assert sorted(strategy.history[0].trained) == ["hospital-1", "hospital-3"]
    assert torch.load(tmp_path / "run" / "model.pt", weights_only=True)  # the round went on


def test_a_supernode_whose_ledger_folder_is_read_only_is_refused_naming_ledger(tmp_path):
    folder = tmp_path / "ledgers"
    folder.mkdir()
    os.chmod(folder, 0o555)
    check = ("import json, sys\nfrom fedpriv.deployment.node import parse_node_config\nfrom fedpriv.errors import "
             "ConfigError\ntry:\n    parse_node_config(json.loads(sys.argv[1]))\n    print('accepted')\n"
             "except ConfigError as error:\n    print(error.key, '|', error)\n")
    node_config = {"name": "St-Marys", "data": str(tmp_path), "budget-epsilon": 2.0, "delta": 1e-5,
                   "ledger": str(folder / "ledger.db")}
    try:
        result = subprocess.run([sys.executable, "-c", check, json.dumps(node_config)], capture_output=True,
                                text=True, timeout=120, preexec_fn=without_permission_override)
    finally:
        os.chmod(folder, 0o755)
    assert result.returncode == 0, result.stderr[-2000:]
    key, message = result.stdout.strip().split(" | ", 1)
    assert key == "ledger" and "Permission denied" in message and "Fix:" in message
    assert list(folder.iterdir()) == []
