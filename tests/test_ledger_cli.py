"""Tests of ``fedpriv-ledger show`` and ``fedpriv-ledger verify``."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from fedpriv.cli.ledger import main
from fedpriv.privacy.accounting import PrivacyEvent
from fedpriv.privacy.ledger import PrivacyLedger

FINGERPRINT = "5c" * 32
DELTA = 1e-5


@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    """A ledger with one confirmed (partly given back) and one charged entry."""
    path = tmp_path / "ledger.sqlite"
    with PrivacyLedger.open(path, fingerprint=FINGERPRINT, budget_epsilon=3.0, delta=DELTA) as ledger:
        first = ledger.charge(PrivacyEvent(1.0, 0.02, 100), run_id="run-alpha", round=0)
        ledger.confirm(first, steps_done=80)
        ledger.charge(PrivacyEvent(1.5, 0.05, 40), run_id="run-beta", round=1)
    return path


def _status(path: Path):
    with PrivacyLedger.open(path, fingerprint=FINGERPRINT, budget_epsilon=3.0, delta=DELTA) as ledger:
        return ledger.status()


def test_show_prints_events_budget_and_state(ledger_path, capsys):
    assert main(["show", str(ledger_path)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "sigma" in lines[0] and "epsilon after" in lines[0]
    assert "run-alpha" in lines[1] and "confirmed" in lines[1] and "80 (of 100)" in lines[1]
    assert "run-beta" in lines[2] and "charged" in lines[2] and "0.05" in lines[2]
    spent = _status(ledger_path).epsilon_spent
    assert f"epsilon spent {spent:.4f} / budget 3 at delta 1e-05 (accountant prv)" in out
    assert lines[-1] == "open"


def test_show_reports_a_lock(ledger_path, capsys):
    with PrivacyLedger.open(ledger_path, fingerprint=FINGERPRINT, budget_epsilon=3.0, delta=DELTA) as ledger:
        ledger.lock("hospital withdrew consent")
    assert main(["show", str(ledger_path)]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith("LOCKED since") and "hospital withdrew consent" in last


def test_show_json(ledger_path, capsys):
    assert main(["show", "--json", str(ledger_path)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert {"events", "epsilon", "delta", "budget_epsilon", "locked", "accountant"} <= set(shown)
    first, second = shown["events"]
    assert (first["noise_multiplier"], first["sample_rate"], first["steps"]) == (1.0, 0.02, 80)
    assert (second["status"], second["steps"], second["run_id"]) == ("charged", 40, "run-beta")
    assert shown["epsilon"] == pytest.approx(_status(ledger_path).epsilon_spent)
    assert shown["epsilon"] == pytest.approx(second["epsilon_after"])
    settings = (shown["delta"], shown["budget_epsilon"], shown["locked"], shown["accountant"])
    assert settings == (DELTA, 3.0, False, "prv")


def test_verify_ok(ledger_path, capsys):
    assert main(["verify", str(ledger_path)]) == 0
    assert capsys.readouterr().out.startswith("ok: 2 entries")


def test_verify_tampered_ledger_exits_1(ledger_path, capsys):
    with sqlite3.connect(ledger_path) as raw:
        raw.execute("UPDATE entries SET noise_multiplier = 3.0 WHERE id = 1")
    assert main(["verify", str(ledger_path)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("FAILED")
    assert "entry 1: hash mismatch" in out


@pytest.mark.parametrize("command", ["show", "verify"])
def test_missing_ledger_is_one_error_line(tmp_path, capsys, command):
    assert main([command, str(tmp_path / "nope.sqlite")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("fedpriv-ledger: error: ")
    assert len(captured.err.strip().splitlines()) == 1


def test_corrupt_ledger_is_one_error_line(tmp_path, capsys):
    corrupt = tmp_path / "corrupt.sqlite"
    corrupt.write_bytes(b"\x00not a database\xff" * 500)
    assert main(["show", str(corrupt)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedpriv-ledger: error: ") and len(err.strip().splitlines()) == 1


def test_console_script_has_no_traceback(tmp_path):
    script = shutil.which("fedpriv-ledger", path=str(Path(sys.executable).parent))
    command = [script] if script else [sys.executable, "-m", "fedpriv.cli.ledger"]
    result = subprocess.run(
        [*command, "show", str(tmp_path / "missing.sqlite")], capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"fedpriv-ledger: error: no ledger at {tmp_path / 'missing.sqlite'}"
    ]
