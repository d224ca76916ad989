"""Tests of ``fedpriv-ledger show``, ``verify`` and ``migrate`` on the per-record ledger."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from fedpriv.cli.ledger import format_epsilon, main
from fedpriv.privacy.chain import key_path_for
from fedpriv.privacy.ledger import PrivacyLedger, read_ledger

DELTA = 1e-5
BUDGET = 3.0
REPO = Path(__file__).resolve().parents[1]
# The last commit whose fedpriv/privacy/ledger.py wrote fedpriv's first ledger format (schema 1).
OLD_FORMAT_COMMIT = "544590ab39ebf5ad8594021a3105ab9b94c9649e"


@pytest.fixture(autouse=True)
def key_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test's ledger keys and witnesses live in its own folder, set before any ledger exists."""
    folder = tmp_path / "keys"
    monkeypatch.setenv("FEDPRIV_KEY_DIR", str(folder))
    return folder


def ids(start: int, stop: int) -> np.ndarray:
    return np.array([f"rec-{i:03d}" for i in range(start, stop)])


def open_ledger(path: Path) -> PrivacyLedger:
    return PrivacyLedger.open(path, budget_epsilon=BUDGET, delta=DELTA)


@pytest.fixture
def ledger_path(tmp_path: Path, key_dir: Path) -> Path:
    """Three events on growing sets (records added between charges): 40, then 60, then 80 records.

    rec-050 joined before the second charge, so it is in events 2 and 3 only; rec-010 is in all three.
    """
    path = tmp_path / "ledger.db"
    with open_ledger(path) as ledger:
        first = ledger.charge(ids(0, 40), noise_multiplier=1.0, batch_size=2, steps=20, run_id="run-alpha", round=0)
        ledger.confirm(first, steps_done=15)
        second = ledger.charge(ids(0, 60), noise_multiplier=1.5, batch_size=3, steps=30, run_id="run-alpha",
                               round=1, hospital="St-Marys")
        ledger.confirm(second, steps_done=30)
        ledger.charge(ids(0, 80), noise_multiplier=2.0, batch_size=4, steps=10, run_id="run-beta", round=0)
    return path


def _status(path: Path):
    with read_ledger(path) as ledger:
        return ledger.status()


def _events(path: Path):
    with read_ledger(path) as ledger:
        return ledger.events()


def _one_error_line(captured) -> str:
    assert captured.out == ""
    assert captured.err.startswith("fedpriv-ledger: error: ")
    assert len(captured.err.strip().splitlines()) == 1
    assert "Traceback" not in captured.err
    return captured.err


# --------------------------------------------------------------------- show


def test_show_prints_the_budget_distribution_and_events_matching_status(ledger_path, capsys):
    assert main(["show", str(ledger_path)]) == 0
    out = capsys.readouterr().out
    status = _status(ledger_path)
    assert status.records == 80 and not status.locked
    assert "budget: epsilon 3 per record at delta 1e-05 (accountant prv)" in out
    expected = (f"records: 80 known; epsilon per record min {format_epsilon(status.epsilon_min, BUDGET)}, "
                f"median {format_epsilon(status.epsilon_median, BUDGET)}, "
                f"max {format_epsilon(status.epsilon_spent, BUDGET)}; {status.exhausted} exhausted, "
                f"{status.records - status.exhausted} open")
    assert expected in out
    assert status.epsilon_min < status.epsilon_median < status.epsilon_spent  # three histories
    rows = [line for line in out.splitlines() if re.match(r"^\d+\s", line)]
    assert len(rows) == 3
    assert rows[0].split()[0] == "2" and "run-alpha" in rows[0] and "15 (of 20)" in rows[0]
    assert "confirmed" in rows[0] and rows[0].split()[-1] == "40" and " private " in rows[0]
    assert "St-Marys" in rows[1] and rows[1].split()[-1] == "60"
    assert "run-beta" in rows[2] and "charged" in rows[2] and rows[2].split()[-1] == "80"
    # which hospitals used it, named at the top (a simulated federation's hospitals share one ledger)
    names = [e.hospital for e in _events(ledger_path)]
    expected_use = ", ".join(f"{n or '(no name)'} ({names.count(n)} event{'s' if names.count(n) != 1 else ''})"
                             for n in sorted(set(names)))
    assert f"used by: {expected_use}" in out and "St-Marys (1 event)" in out


def test_show_json_matches_status_and_events(ledger_path, capsys):
    assert main(["show", "--json", str(ledger_path)]) == 0
    shown = json.loads(capsys.readouterr().out)
    status = _status(ledger_path)
    assert (shown["budget_epsilon"], shown["delta"], shown["accountant"]) == (BUDGET, DELTA, "prv")
    assert (shown["records"], shown["exhausted"], shown["locked"]) == (80, status.exhausted, False)
    assert shown["epsilon"] == {"min": status.epsilon_min, "median": status.epsilon_median,
                                "max": status.epsilon_spent}
    first, second, third = shown["events"]
    assert (first["noise_multiplier"], first["sample_rate"], first["steps"], first["charged_steps"]) == (
        1.0, 2 / 40, 15, 20)
    assert (first["status"], first["set_size"], first["private"]) == ("confirmed", 40, True)
    assert (second["hospital"], second["set_size"]) == ("St-Marys", 60)
    assert shown["hospitals"]["St-Marys"] == 1 and sum(shown["hospitals"].values()) == len(shown["events"])
    assert (third["status"], third["run_id"], third["set_size"]) == ("charged", "run-beta", 80)


def test_a_non_private_round_shows_infinity_as_inf(ledger_path, capsys):
    with open_ledger(ledger_path) as ledger:
        ledger.charge(ids(70, 90), noise_multiplier=None, batch_size=5, steps=3, run_id="run-open", round=0)
    assert main(["show", str(ledger_path)]) == 0
    out = capsys.readouterr().out
    assert "max inf;" in out
    row = next(line for line in out.splitlines() if "run-open" in line)
    assert "NOT PRIVATE" in row
    status = _status(ledger_path)
    assert status.epsilon_spent == float("inf") and status.exhausted >= 20
    assert main(["show", "--json", str(ledger_path)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["epsilon"]["max"] == "inf"
    assert shown["events"][-1]["private"] is False
    assert main(["show", "--record", "rec-085", "--json", str(ledger_path)]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["epsilon"] == "inf" and record["exhausted"] is True


def test_show_reports_the_lock_of_every_record(ledger_path, capsys):
    with open_ledger(ledger_path) as ledger:
        ledger.lock(ids(0, 90), "hospital withdrew consent")
    assert main(["show", str(ledger_path)]) == 0
    out = capsys.readouterr().out
    assert "LOCKED: every one of the 80 records is exhausted" in out
    assert "on 90 records: hospital withdrew consent" in out


def test_record_history_lists_exactly_the_events_whose_set_held_it(ledger_path, capsys):
    charges = [event.id for event in _events(ledger_path)]
    assert main(["show", "--record", "rec-050", str(ledger_path)]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if re.match(r"^\d+\s", line)]
    assert [int(row.split()[0]) for row in rows] == charges[1:]
    assert "events (2):" in out and f"first seen in entry {charges[1]}" in out and "not exhausted" in out
    with read_ledger(ledger_path) as ledger:
        _, value, _, _ = ledger.record_history("rec-050")
    assert f"epsilon {format_epsilon(value, BUDGET)} of budget 3" in out

    assert main(["show", "--record", "rec-050", "--json", str(ledger_path)]) == 0
    record = json.loads(capsys.readouterr().out)
    assert [e["id"] for e in record["events"]] == charges[1:]
    assert [e["set_size"] for e in record["events"]] == [60, 80]
    assert (record["known"], record["first_entry"], record["epsilon"]) == (True, charges[1], value)
    assert main(["show", "--record", "rec-010", "--json", str(ledger_path)]) == 0
    assert [e["id"] for e in json.loads(capsys.readouterr().out)["events"]] == charges


def test_an_unknown_record_says_so_and_exits_1(ledger_path, capsys):
    assert main(["show", "--record", "no-such-record", str(ledger_path)]) == 1
    captured = capsys.readouterr()
    assert "'no-such-record' is not known to ledger" in captured.err and captured.out == ""
    assert main(["show", "--record", "no-such-record", "--json", str(ledger_path)]) == 1
    assert json.loads(capsys.readouterr().out)["known"] is False


@pytest.mark.parametrize(("value", "budget", "text"), [
    (2.9957, 3.0, "2.996"), (2.99996, 3.0, "2.99996"), (3.00004, 3.0, "3.00004"), (3.0, 3.0, "3"),
    (1.23456, 3.0, "1.235"), (float("inf"), 3.0, "inf"),
])
def test_epsilon_is_never_rounded_onto_the_budget(value, budget, text):
    assert format_epsilon(value, budget) == text


# --------------------------------------------------------------------- verify


def test_verify_ok(ledger_path, capsys):
    assert main(["verify", str(ledger_path)]) == 0
    status = _status(ledger_path)
    assert capsys.readouterr().out.strip() == (
        f"ok: {status.chain_length} entries, 3 events, chain and witness intact")


def test_verify_detects_an_edited_entry(ledger_path, capsys):
    raw = sqlite3.connect(ledger_path)
    with raw:
        entry_id, body = raw.execute("SELECT id, body FROM entries WHERE kind = 'charge' ORDER BY id").fetchone()
        values = json.loads(body)
        values["noise_multiplier"] = 5.0  # a far smaller epsilon than was spent
        raw.execute("UPDATE entries SET body = ? WHERE id = ?", (json.dumps(values, sort_keys=True), entry_id))
    raw.close()
    assert main(["verify", str(ledger_path)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("FAILED")
    assert f"integrity check at entry {entry_id}" in out and "tag does not match" in out
    assert main(["show", str(ledger_path)]) == 2  # nor is a tampered ledger shown as if it were sound
    assert "tag does not match" in _one_error_line(capsys.readouterr())


def test_a_missing_key_is_a_clear_error_naming_where_it_was_looked_for(ledger_path, tmp_path, capsys):
    key = key_path_for(ledger_path)
    moved = tmp_path / "elsewhere.key"
    shutil.move(key, moved)
    assert main(["verify", str(ledger_path)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("FAILED: cannot verify") and str(key) in out and "key" in out
    assert main(["show", str(ledger_path)]) == 2
    err = _one_error_line(capsys.readouterr())
    assert "was not found at" in err and str(key) in err
    # Pointed at the key, both work again (the witness stays with the key file's name).
    shutil.move(key.with_suffix(".head"), moved.with_suffix(".head"))
    assert main(["verify", "--key", str(moved), str(ledger_path)]) == 0
    assert main(["show", "--key", str(moved), str(ledger_path)]) == 0


@pytest.mark.parametrize("command", ["show", "verify"])
def test_missing_ledger_is_one_error_line(tmp_path, capsys, command):
    assert main([command, str(tmp_path / "nope.db")]) == 2
    assert f"no ledger at {tmp_path / 'nope.db'}" in _one_error_line(capsys.readouterr())


@pytest.mark.parametrize("command", ["show", "verify"])
def test_corrupt_ledger_is_one_error_line(tmp_path, capsys, command):
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"\x00not a database\xff" * 500)
    assert main([command, str(corrupt)]) == 2
    _one_error_line(capsys.readouterr())


def test_the_tool_never_writes_the_ledger(ledger_path, capsys):
    before = ledger_path.read_bytes()
    for argv in (["show", str(ledger_path)], ["show", "--json", str(ledger_path)], ["verify", str(ledger_path)],
                 ["show", "--record", "rec-001", str(ledger_path)]):
        assert main(argv) == 0
    capsys.readouterr()
    assert ledger_path.read_bytes() == before


def test_console_script_has_no_traceback(tmp_path, key_dir):
    script = shutil.which("fedpriv-ledger", path=str(Path(sys.executable).parent))
    command = [script] if script else [sys.executable, "-m", "fedpriv.cli.ledger"]
    env = {**os.environ, "FEDPRIV_KEY_DIR": str(key_dir)}
    result = subprocess.run([*command, "show", str(tmp_path / "missing.db")], capture_output=True, text=True,
                            timeout=180, env=env)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"fedpriv-ledger: error: no ledger at {tmp_path / 'missing.db'}"]


# --------------------------------------------------------------------- the first format and its migration


@pytest.fixture(scope="module")
def old_module(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    """fedpriv's own first-format ledger code, as it was before the per-record ledger."""
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{OLD_FORMAT_COMMIT}:fedpriv/privacy/ledger.py"],
                            capture_output=True, text=True)
    if source.returncode != 0:
        pytest.skip(f"the first-format ledger code (git commit {OLD_FORMAT_COMMIT[:10]}) is not available")
    file = tmp_path_factory.mktemp("old-format") / "old_ledger.py"
    file.write_text(source.stdout)
    spec = importlib.util.spec_from_file_location("fedpriv_old_ledger", file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is defined
    spec.loader.exec_module(module)
    assert module.SCHEMA_VERSION == 1
    return module


def medmnist_arrays(seed: int) -> dict[str, np.ndarray]:
    """A tiny fake pneumoniamnist in MedMNIST's npz layout (as tests/test_data_loaders.py builds them)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in {"train": 20, "val": 6, "test": 6}.items():
        arrays[f"{split}_images"] = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 2, size=(n, 1)).astype(np.uint8)
    return arrays


def write_npz(folder: Path, seed: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "pneumoniamnist.npz"
    np.savez_compressed(path, **medmnist_arrays(seed))
    return path


def old_fingerprint(npz: Path) -> str:
    """The fingerprint an old node keyed its ledger by: that of its train split."""
    from fedpriv.data import dataset_fingerprint
    from fedpriv.data.medmnist import load_medmnist

    return dataset_fingerprint(load_medmnist("pneumoniamnist", 28, str(npz.parent), False).train)


def train_ids(npz: Path) -> np.ndarray:
    from fedpriv.data.medmnist import load_medmnist

    return load_medmnist("pneumoniamnist", 28, str(npz.parent), False, record_ids="content").train.ids()


@pytest.fixture
def old_ledger(old_module, tmp_path) -> tuple[Path, Path, float]:
    """A first-format ledger of a fake npz: one confirmed (partly given back) and one charged entry,
    budget lowered from 3 to 2.5. Returns (ledger, npz, the old ledger's cumulative epsilon)."""
    npz = write_npz(tmp_path / "data", seed=0)
    path = tmp_path / "old-ledger.db"
    event = old_module.PrivacyEvent
    with old_module.PrivacyLedger.open(path, fingerprint=old_fingerprint(npz), budget_epsilon=3.0,
                                       delta=DELTA) as ledger:
        first = ledger.charge(event(1.0, 0.02, 100), run_id="run-alpha", round=0)
        ledger.confirm(first, steps_done=80)
        ledger.charge(event(1.5, 0.05, 40), run_id="run-beta", round=1)
    with old_module.PrivacyLedger.open(path, fingerprint=old_fingerprint(npz), budget_epsilon=2.5,
                                       delta=DELTA) as ledger:
        spent = ledger.status().epsilon_spent
    return path, npz, spent


@pytest.mark.parametrize("command", ["show", "verify"])
def test_an_old_format_ledger_says_so_and_how_to_migrate(old_ledger, capsys, command):
    path, _, _ = old_ledger
    before = path.read_bytes()
    assert main([command, str(path)]) == 2
    err = _one_error_line(capsys.readouterr())
    assert re.search(r"old format.*fedpriv-ledger migrate", err)
    assert path.read_bytes() == before


def test_migrate_carries_every_event_to_every_record(old_module, old_ledger, capsys):
    path, npz, old_epsilon = old_ledger
    before = path.read_bytes()
    assert main(["migrate", str(path), "--data", str(npz)]) == 0
    out = capsys.readouterr().out
    new = path.with_suffix(".v2.db")
    assert f"to {new}" in out and "2 (1 confirmed, 1 charged" in out and "20 records" in out
    assert path.read_bytes() == before  # the old file is untouched

    records = train_ids(npz)
    with read_ledger(new) as ledger:
        status = ledger.status(records)
        everything = ledger.status()
        events = ledger.events()
        assert ledger.verify().ok
    assert everything.records == status.records == 20
    assert status.epsilon_min == status.epsilon_spent  # every record has the one old history
    assert status.epsilon_spent == pytest.approx(old_epsilon, rel=1e-6)
    assert (status.budget_epsilon, status.delta, status.accountant) == (2.5, DELTA, "prv")
    with old_module.read_ledger(path) as old:
        old_entries = old.entries()
    assert [(e.run_id, e.round, e.noise_multiplier, e.sample_rate, e.steps, e.charged_steps, e.status, e.created_at)
            for e in events] == [
        (o.run_id, o.round, o.noise_multiplier, o.sample_rate, o.steps, o.charged_steps, o.status, o.created_at)
        for o in old_entries]
    assert all(e.private and e.set_size == 20 for e in events)

    assert main(["verify", str(new)]) == 0
    assert main(["show", "--record", str(records[0]), "--json", str(new)]) == 0
    capsys.readouterr()
    # Never over an existing file (a second migration, or an explicit --out).
    assert main(["migrate", str(path), "--data", str(npz)]) == 2
    assert "already exists" in _one_error_line(capsys.readouterr())
    assert main(["migrate", str(new), "--data", str(npz)]) == 2
    assert "already in the current format" in _one_error_line(capsys.readouterr())


def test_migrate_carries_the_lock_over(old_module, old_ledger, tmp_path, capsys):
    path, npz, _ = old_ledger
    with old_module.PrivacyLedger.open(path, fingerprint=old_fingerprint(npz), budget_epsilon=2.5,
                                       delta=DELTA) as ledger:
        ledger.lock("hospital withdrew consent")
    new = tmp_path / "migrated" / "new.db"
    new.parent.mkdir()
    assert main(["migrate", str(path), "--data", str(npz.parent), "--out", str(new)]) == 0
    assert "locked: yes" in capsys.readouterr().out
    status = _status(new)
    assert status.locked and status.exhausted == status.records == 20
    assert main(["show", str(new)]) == 0
    assert "hospital withdrew consent" in capsys.readouterr().out


def test_migrate_refuses_other_data_and_writes_nothing(old_ledger, tmp_path, key_dir, capsys):
    path, _, _ = old_ledger
    other = write_npz(tmp_path / "other-data", seed=1)
    assert main(["migrate", str(path), "--data", str(other)]) == 2
    err = _one_error_line(capsys.readouterr())
    assert "not the record set" in err and "Nothing was written" in err
    assert not path.with_suffix(".v2.db").exists()
    assert not key_path_for(path.with_suffix(".v2.db")).exists()


def test_migrate_refuses_a_broken_old_chain(old_ledger, capsys):
    path, npz, _ = old_ledger
    raw = sqlite3.connect(path)
    with raw:
        raw.execute("UPDATE entries SET noise_multiplier = 3.0 WHERE id = 1")
    raw.close()
    assert main(["migrate", str(path), "--data", str(npz)]) == 2
    err = _one_error_line(capsys.readouterr())
    assert "entry 1: hash mismatch" in err and "refusing to migrate" in err
    assert not path.with_suffix(".v2.db").exists()


def test_migrate_of_a_missing_ledger_is_one_error_line(tmp_path, capsys):
    npz = write_npz(tmp_path / "data", seed=0)
    assert main(["migrate", str(tmp_path / "nope.db"), "--data", str(npz)]) == 2
    assert "no ledger at" in _one_error_line(capsys.readouterr())
