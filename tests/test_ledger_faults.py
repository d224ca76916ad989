"""A hospital whose ledger cannot be written refuses to train (fail closed), and says why.

The storage faults are real, not mocked, and run in a child process:
- a disk that refuses writes is a file-size limit (RLIMIT_FSIZE: every write fails with EFBIG,
  as on a full disk or an exhausted quota);
- a missing write permission is a read-only folder or file, enforced even for root by dropping
  CAP_DAC_OVERRIDE from the child's capability bounding set before it starts.
The federation-level test injects the same SQLite error in process, to see what the server is told.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap

from fault_injection import without_permission_override
from test_federation import federate

from fedpriv.privacy import ledger as ledger_module
from fedpriv.privacy.ledger import read_ledger

# One private round of a tiny model on tiny data, in a child process; prints what happened as JSON.
CHILD = textwrap.dedent("""
    import json, resource, signal, sys
    from pathlib import Path
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset
    from fedpriv.errors import FedprivError
    from fedpriv.hospital import HospitalSettings, RoundRequest, train_round

    ledger, fault = Path(sys.argv[1]), sys.argv[2]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    x = torch.randn(100, 1, 1, 16, generator=torch.Generator().manual_seed(0))
    data = TensorDataset(x, (x.flatten(1).sum(1) > 0).long())
    settings = HospitalSettings("A", 5.0, 1e-5, ledger, accountant="rdp")
    request = RoundRequest(run_id="run-" + fault, server_round=1, num_rounds=2, batch_size=10, lr=0.1,
                           noise_multiplier=1.5)
    if fault == "full":
        # Every write past the first kilobyte of any file fails (EFBIG), as on a full disk.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))
    try:
        outcome = train_round(model, data, settings, request, fingerprint="f")
        result = {"status": outcome.status, "error": None, "weights": outcome.state_dict is not None}
    except FedprivError as error:
        result = {"status": "error", "error": str(error), "type": type(error).__name__,
                  "reason": getattr(error, "reason", ""), "weights": False}
    print(json.dumps(result))
""")

def _round_in_child(ledger, fault: str) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, str(ledger), fault], capture_output=True, text=True,
                            timeout=300, preexec_fn=without_permission_override)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _ledger_with_one_round(tmp_path):
    path = tmp_path / "ledgers" / "ledger.db"
    first = _round_in_child(path, "ok")
    assert first["status"] == "trained" and first["weights"]
    return path


def test_a_full_disk_refuses_the_round_and_keeps_the_ledger_intact(tmp_path):
    path = _ledger_with_one_round(tmp_path)
    before = path.read_bytes()
    result = _round_in_child(path, "full")
    assert result["type"] == "LedgerError"
    assert "the disk refused a write" in result["error"] and "Fix: free space" in result["error"]
    assert path.read_bytes() == before  # nothing half-written
    report = read_ledger(path).verify()
    assert report.ok and len(read_ledger(path).entries()) == 1


def test_a_read_only_ledger_refuses_the_round(tmp_path):
    path = _ledger_with_one_round(tmp_path)
    os.chmod(path, 0o444)
    os.chmod(path.parent, 0o555)
    try:
        result = _round_in_child(path, "readonly")
    finally:
        os.chmod(path.parent, 0o755)
        os.chmod(path, 0o644)
    assert result["type"] == "LedgerError"
    assert "no write permission" in result["error"] or "cannot be opened" in result["error"]
    assert "Fix:" in result["error"]
    assert len(read_ledger(path).entries()) == 1 and read_ledger(path).verify().ok


def test_a_new_ledger_in_a_read_only_folder_is_refused_and_nothing_is_created(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    os.chmod(folder, 0o555)
    try:
        result = _round_in_child(folder / "ledger.db", "readonly")
    finally:
        os.chmod(folder, 0o755)
    assert result["type"] == "LedgerError"
    assert "cannot create privacy ledger" in result["error"] and "no write permission" in result["error"]
    assert list(folder.iterdir()) == []


def test_a_hospital_with_a_full_disk_is_skipped_and_trains_again_once_space_is_back(tmp_path, monkeypatch):
    real_append, charges, failed = ledger_module.PrivacyLedger._append, [], []

    def append(self, conn, meta, planned, run_id, round, projected):
        charges.append(self.path)
        if len(charges) == 5:  # round 2, second hospital: the disk fills up mid-transaction
            failed.append(self.path)
            raise sqlite3.OperationalError("database or disk is full")
        return real_append(self, conn, meta, planned, run_id, round, projected)

    monkeypatch.setattr(ledger_module.PrivacyLedger, "_append", append)
    strategy, grid, run_dir = federate(tmp_path, "strategy.num_rounds=3", "privacy.epsilon=8")
    second_round = strategy.history[1]
    refused = [name for name, h in second_round.hospitals.items() if h["status"] == "refused"]
    assert len(refused) == 1 and sorted(second_round.trained) == sorted(set(second_round.hospitals) - set(refused))
    message = second_round.hospitals[refused[0]]["message"]
    assert "disk is full" in message and str(tmp_path) not in message  # the cause, not the hospital's paths
    assert refused[0] in strategy.history[2].trained  # space is back: it trains in round 3
    rounds = [entry.round for entry in read_ledger(failed[0]).entries()]
    assert rounds == [1, 3] and read_ledger(failed[0]).verify().ok
    assert (run_dir / "model.pt").is_file()
