"""The ledger fails closed: storage faults, a killed node and competing processes never under-count.

The faults are real, not mocked, and run in child processes:
- a disk that refuses writes is a file-size limit (RLIMIT_FSIZE: every write fails with EFBIG,
  as on a full disk or an exhausted quota);
- a missing write permission is a read-only folder or file, enforced even for root by dropping
  CAP_DAC_OVERRIDE from the child's capability bounding set before it starts;
- a crash is SIGKILL between the charge and its confirmation;
- two nodes are two processes charging the same file at the same moment.
The federation-level test injects the same SQLite error in process, to see what the server is told.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from fault_injection import without_permission_override
from ledger_helpers import DELTA, check_against_dp_accounting, open_ledger, raw_entries, record_ids
from test_federation import federate

from fedpriv.errors import BudgetExhausted
from fedpriv.privacy import ledger as ledger_module
from fedpriv.privacy.accounting import PrivacyEvent, epsilon
from fedpriv.privacy.ledger import PrivacyLedger, read_ledger

SUBPROCESS_TIMEOUT_S = 180


@pytest.fixture(autouse=True)
def _key_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDPRIV_KEY_DIR", str(tmp_path / "keys"))  # children inherit it


@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    return tmp_path / "hospital-a" / "ledger.sqlite"


def run_python(code: str, *args: str, **kwargs) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh interpreter (a separate node process)."""
    return subprocess.run([sys.executable, "-W", "ignore", "-c", textwrap.dedent(code), *args],
                          capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S, **kwargs)


# --------------------------------------------------------------------- storage faults


# One private round of a tiny model on tiny data, in a child process; prints what happened as JSON.
CHILD = """
    import json, resource, signal, sys
    from pathlib import Path
    import torch
    from torch import nn
    from fedpriv.data import LabeledImages
    from fedpriv.errors import FedprivError
    from fedpriv.hospital import HospitalSettings, RoundRequest, train_round

    ledger, fault = Path(sys.argv[1]), sys.argv[2]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    x = torch.randn(100, 1, 1, 16, generator=torch.Generator().manual_seed(0))
    data = LabeledImages(x, (x.flatten(1).sum(1) > 0).long())
    settings = HospitalSettings("A", 5.0, 1e-5, ledger, accountant="rdp")
    request = RoundRequest(run_id="run-" + fault, server_round=1, num_rounds=2, batch_size=10, lr=0.1,
                           noise_multiplier=1.5)
    if fault == "full":
        # Every write past the first kilobyte of any file fails (EFBIG), as on a full disk.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))
    try:
        outcome = train_round(model, data, settings, request)
        result = {"status": outcome.status, "error": None, "weights": outcome.state_dict is not None}
    except FedprivError as error:
        result = {"status": "error", "error": str(error), "type": type(error).__name__,
                  "reason": getattr(error, "reason", ""), "weights": False}
    print(json.dumps(result))
"""


def _round_in_child(ledger: Path, fault: str) -> dict:
    result = run_python(CHILD, str(ledger), fault, preexec_fn=without_permission_override)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _ledger_with_one_round(tmp_path: Path) -> Path:
    path = tmp_path / "ledgers" / "ledger.db"
    first = _round_in_child(path, "ok")
    assert first["status"] == "trained" and first["weights"]
    return path


def _one_confirmed_charge(path: Path) -> None:
    with read_ledger(path) as ledger:
        assert ledger.verify().ok
        assert [(e.run_id, e.status) for e in ledger.events()] == [("run-ok", "confirmed")]


@pytest.mark.slow
def test_a_full_disk_refuses_the_round_and_keeps_the_ledger_intact(tmp_path):
    path = _ledger_with_one_round(tmp_path)
    before = path.read_bytes()
    result = _round_in_child(path, "full")
    assert result["type"] == "LedgerError" and not result["weights"]
    assert "the disk refused a write" in result["error"] and "Fix: free space" in result["error"]
    assert "disk" in result["reason"]  # the short cause the server may be told
    assert path.read_bytes() == before  # nothing half-written
    _one_confirmed_charge(path)


@pytest.mark.slow
def test_a_read_only_ledger_refuses_the_round(tmp_path):
    path = _ledger_with_one_round(tmp_path)
    os.chmod(path, 0o444)
    os.chmod(path.parent, 0o555)
    try:
        result = _round_in_child(path, "readonly")
    finally:
        os.chmod(path.parent, 0o755)
        os.chmod(path, 0o644)
    assert result["type"] == "LedgerError" and not result["weights"]
    assert "no write permission" in result["error"] or "cannot be opened" in result["error"]
    assert "Fix:" in result["error"]
    _one_confirmed_charge(path)


@pytest.mark.slow
def test_a_new_ledger_in_a_read_only_folder_is_refused_and_nothing_is_created(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    os.chmod(folder, 0o555)
    try:
        result = _round_in_child(folder / "ledger.db", "readonly")
    finally:
        os.chmod(folder, 0o755)
    assert result["type"] == "LedgerError" and not result["weights"]
    assert "cannot create privacy ledger" in result["error"] and "no write permission" in result["error"]
    assert list(folder.iterdir()) == []


@pytest.mark.slow
def test_a_hospital_with_a_full_disk_is_skipped_and_trains_again_once_space_is_back(tmp_path, monkeypatch):
    real_append, charges, failed = ledger_module.PrivacyLedger._append, [], []

    def append(self, conn, history, kind, body):
        if kind == ledger_module.CHARGE:
            charges.append(self.path)
            if len(charges) == 5:  # round 2, second hospital: the disk fills up mid-transaction
                failed.append((self.path, body["hospital"]))
                raise sqlite3.OperationalError("database or disk is full")
        return real_append(self, conn, history, kind, body)

    monkeypatch.setattr(ledger_module.PrivacyLedger, "_append", append)
    strategy, grid, run_dir = federate(tmp_path, "strategy.num_rounds=3", "privacy.epsilon=8")
    second_round = strategy.history[1]
    refused = [name for name, h in second_round.hospitals.items() if h["status"] == "refused"]
    assert len(refused) == 1 and sorted(second_round.trained) == sorted(set(second_round.hospitals) - set(refused))
    message = second_round.hospitals[refused[0]]["message"]
    assert "disk is full" in message and str(tmp_path) not in message  # the cause, not the hospital's paths
    assert refused[0] in strategy.history[2].trained  # space is back: it trains in round 3
    (path, hospital), = failed
    with read_ledger(path) as ledger:
        assert ledger.verify().ok
        assert [e.round for e in ledger.events() if e.hospital == hospital] == [1, 3]
    assert (run_dir / "model.pt").is_file()


# --------------------------------------------------------------------- a crash keeps the charge


def test_the_charge_is_durable_before_training(ledger_path):
    ids = record_ids("r", 100)
    with open_ledger(ledger_path) as ledger:
        made = ledger.charge(ids, noise_multiplier=2.0, batch_size=10, steps=30, run_id="run", round=1)
        # A separate connection (another process, or this node after a crash) already sees it.
        raw = sqlite3.connect(ledger_path)
        try:
            rows = raw.execute("SELECT id, kind, body FROM entries WHERE kind = 'charge'").fetchall()
        finally:
            raw.close()
        assert [(entry_id, kind, json.loads(body)["steps"]) for entry_id, kind, body in rows] == [
            (made.entry_id, "charge", 30)]


@pytest.mark.slow
def test_a_node_killed_after_the_charge_keeps_the_full_charge(ledger_path):
    ids = record_ids("r", 100)
    open_ledger(ledger_path, budget=3.0).close()
    result = run_python(
        """
        import os, signal, sys
        from fedpriv.privacy.ledger import PrivacyLedger
        ids = [f"r-{i:04d}" for i in range(100)]
        ledger = PrivacyLedger.open(sys.argv[1], budget_epsilon=3.0, delta=1e-5)
        ledger.charge(ids, noise_multiplier=2.0, batch_size=10, steps=40, run_id="crashed", round=1)
        os.kill(os.getpid(), signal.SIGKILL)  # dies mid-training: never confirms
        """,
        str(ledger_path),
    )
    assert result.returncode == -9, result.stderr
    charged = PrivacyEvent(2.0, 0.1, 40)
    with open_ledger(ledger_path, budget=3.0) as ledger:
        (event,) = ledger.events()
        assert (event.run_id, event.status, event.steps, event.set_size) == ("crashed", "charged", 40, 100)
        assert ledger.status(ids).epsilon_spent == pytest.approx(epsilon([charged], DELTA))
        assert ledger.verify().ok
        following = ledger.charge(ids, noise_multiplier=2.0, batch_size=10, steps=20, run_id="restarted", round=1)
        assert following.projected_epsilon == pytest.approx(epsilon([PrivacyEvent(2.0, 0.1, 60)], DELTA))
        with pytest.raises(BudgetExhausted):  # the crashed charge still counts in full
            ledger.charge(ids, noise_multiplier=2.0, batch_size=10, steps=200, run_id="greedy", round=1)
        check_against_dp_accounting(ledger, ids)


# --------------------------------------------------------------------- two nodes, one budget


_CONTENDER = """
import pathlib, sys, time
from fedpriv.errors import BudgetExhausted
from fedpriv.privacy.ledger import PrivacyLedger
path, ready, go = sys.argv[1:4]
ids = [f"r-{i:04d}" for i in range(100)]
ledger = PrivacyLedger.open(path, budget_epsilon=1.6, delta=1e-5)
ledger.status(ids)  # warm up the accountant before the race
pathlib.Path(ready).touch()
deadline = time.monotonic() + 120
while not pathlib.Path(go).exists() and time.monotonic() < deadline:
    time.sleep(0.002)
try:
    ledger.charge(ids, noise_multiplier=2.0, batch_size=10, steps=40, run_id=ready, round=1)
except BudgetExhausted:
    sys.exit(3)
sys.exit(0)
"""


def _one_fits_two_do_not() -> None:
    assert epsilon([PrivacyEvent(2.0, 0.1, 40)], DELTA) <= 1.6 < epsilon([PrivacyEvent(2.0, 0.1, 80)], DELTA)


@pytest.mark.slow
def test_two_processes_cannot_both_spend_the_last_of_a_budget(tmp_path, ledger_path):
    _one_fits_two_do_not()
    ids = record_ids("r", 100)
    open_ledger(ledger_path, budget=1.6).close()
    go = tmp_path / "go"
    ready = [tmp_path / f"ready-{i}" for i in range(2)]
    contenders = [
        subprocess.Popen([sys.executable, "-W", "ignore", "-c", _CONTENDER, str(ledger_path), str(flag), str(go)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for flag in ready
    ]
    try:
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
        while not all(flag.exists() for flag in ready) and time.monotonic() < deadline:
            assert all(c.poll() is None for c in contenders), [c.communicate() for c in contenders]
            time.sleep(0.01)
        go.touch()
        codes = [c.wait(timeout=SUBPROCESS_TIMEOUT_S) for c in contenders]
    finally:
        for contender in contenders:
            if contender.poll() is None:
                contender.kill()
    assert sorted(codes) == [0, 3], [c.stderr.read() for c in contenders]
    with open_ledger(ledger_path, budget=1.6) as ledger:
        assert len(ledger.events()) == 1
        assert ledger.status(ids).epsilon_spent <= 1.6
        assert not ledger.status(ids).locked  # the loser was refused; it locked nothing
        assert ledger.verify().ok
        check_against_dp_accounting(ledger, ids)


def test_connections_in_threads_cannot_overspend(ledger_path):
    _one_fits_two_do_not()
    ids = record_ids("r", 100)
    open_ledger(ledger_path, budget=1.6).close()
    ledgers = [open_ledger(ledger_path, budget=1.6) for _ in range(4)]  # one connection each
    start = threading.Barrier(len(ledgers))
    outcomes: list[str] = []

    def contend(ledger: PrivacyLedger, name: str) -> None:
        start.wait()
        try:
            ledger.charge(ids, noise_multiplier=2.0, batch_size=10, steps=40, run_id=name, round=1)
            outcomes.append("charged")
        except BudgetExhausted:
            outcomes.append("refused")

    threads = [threading.Thread(target=contend, args=(l, f"t{i}")) for i, l in enumerate(ledgers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=SUBPROCESS_TIMEOUT_S)
    try:
        assert sorted(outcomes) == ["charged", "refused", "refused", "refused"]
        assert len(ledgers[0].events()) == 1 and ledgers[0].verify().ok
        assert [kind for _, kind, _, _ in raw_entries(ledger_path)] == ["open", "charge"]
        assert (ledgers[0].budgets(ids).epsilon <= 1.6).all()
    finally:
        for ledger in ledgers:
            ledger.close()


_CREATOR = """
import fcntl, pathlib, sys
from fedpriv.privacy.ledger import PrivacyLedger
path, ready, gate = sys.argv[1:4]
with open(gate) as door:
    pathlib.Path(ready).touch()
    fcntl.flock(door, fcntl.LOCK_SH)  # blocks until the parent opens the gate: all start at once
with PrivacyLedger.open(path, budget_epsilon=2.0, delta=1e-5) as ledger:
    print(ledger.status().chain_length)
"""


@pytest.mark.slow
def test_processes_creating_the_same_new_ledger_at_once_all_get_it(tmp_path):
    # Nodes (or simulated hospitals sharing a ledger) that start together all find no ledger and no
    # key. Exactly one ledger with one opening entry must result, and every one of them must use it:
    # none may fail on another's half-written key or mistake another's fresh ledger for a deleted one.
    # This is a race: released together, several processes hit such a window in most trials.
    import fcntl

    for trial in range(4):
        path, gate = tmp_path / f"trial-{trial}" / "ledger.sqlite", tmp_path / f"gate-{trial}"
        gate.touch()
        ready = [tmp_path / f"ready-{trial}-{i}" for i in range(6)]
        with open(gate) as door:
            fcntl.flock(door, fcntl.LOCK_EX)
            creators = [subprocess.Popen([sys.executable, "-W", "ignore", "-c", _CREATOR, str(path), str(flag),
                                          str(gate)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                        for flag in ready]
            deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
            while not all(flag.exists() for flag in ready) and time.monotonic() < deadline:
                time.sleep(0.005)
            time.sleep(0.05)  # let each reach its flock
        outputs = [c.communicate(timeout=SUBPROCESS_TIMEOUT_S) for c in creators]
        errors = [err.strip().splitlines()[-1] for (_, err), c in zip(outputs, creators, strict=True) if c.returncode]
        assert errors == [], f"trial {trial}: {errors}"
        assert [kind for _, kind, _, _ in raw_entries(path)] == ["open"]
        with open_ledger(path) as ledger:
            assert ledger.verify().ok
