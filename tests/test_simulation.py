"""Real Flower simulations through the `fedpriv` CLI: a sweep, its report, and process cleanup.

These start a SuperLink in simulation mode and Ray, so each takes tens of seconds. They watch
every process `fedpriv` spawns (by PID) and assert that none outlives it.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedpriv.process_tree import descendants
from fedpriv.simulation import SHARED_LOG_NOTE

pytestmark = [pytest.mark.slow, pytest.mark.processes]

TINY = ["dataset=synthetic", "dataset.num_samples=240", "federation=iid", "train.batch_size=16", "train.local_epochs=1",
        "model.width=4", "strategy.num_rounds=1", "strategy.client_evaluate=false",
        "federation.num_hospitals=2"]


def _describe(pids) -> str:
    described = []
    for pid in pids:
        try:
            described.append(f"{pid}: " + Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")[:150])
        except OSError:
            described.append(f"{pid}: (gone)")
    return "; ".join(described)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def run_watched(args: list[str], cwd: Path, *, interrupt_after: float | None = None) -> tuple[int, set[int], str]:
    """Run `fedpriv ARGS`, recording every descendant PID; optionally Ctrl-C it after a delay."""
    log_path = cwd / f"fedpriv-{time.monotonic_ns()}.log"
    with open(log_path, "w") as log_file:
        process = subprocess.Popen([sys.executable, "-m", "fedpriv.cli.main", *args], cwd=cwd,
                                   stdout=log_file, stderr=subprocess.STDOUT)
        seen: set[int] = set()
        started = time.monotonic()
        while process.poll() is None:
            seen |= set(descendants(process.pid))
            if interrupt_after is not None and time.monotonic() - started > interrupt_after and len(seen) > 3:
                process.send_signal(signal.SIGINT)
                interrupt_after = None
            time.sleep(0.2)
    return process.returncode, seen, log_path.read_text()


def test_a_sweep_of_two_jobs_writes_its_table_and_leaves_no_process(tmp_path):
    sweep_dir = tmp_path / "sweep"
    # One request waiting at a time: Flower's own link state and grid, driven by fedpriv.message_window.
    code, seen, output = run_watched(
        ["-m", *TINY, "privacy.epsilon=1,8", "federation.ledger_scope=run", f"hydra.sweep.dir={sweep_dir}",
         "strategy.max_in_flight=1"], tmp_path)
    assert code == 0, output[-3000:]
    table = (sweep_dir / "sweep.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| 1 |") or line.startswith("| 8 |")]
    assert len(rows) == 2 and all("parallel" in row for row in rows)
    assert (sweep_dir / "privacy_utility.png").stat().st_size > 1000
    notes = set()
    for job in ("0", "1"):
        assert (sweep_dir / job / "summary.md").is_file()
        assert len(list((sweep_dir / job / "ledgers").glob("*.db"))) == 1  # its throw-away ledger
        (round_one,) = json.loads((sweep_dir / job / "metrics.json").read_text())["rounds"]
        assert [row["status"] for row in round_one["hospitals"].values()] == ["trained", "trained"]
        # Its part of the SuperLink's log, under a note naming the one SuperLink (pid, port) of the sweep.
        first, *rest = (sweep_dir / job / "superlink.log").read_text().splitlines()
        assert first.startswith(SHARED_LOG_NOTE) and any("Created run" in line for line in rest), first
        notes.add(first)
    assert len(notes) == 1, notes  # one SuperLink for both jobs
    assert output.count("Started the sweep's SuperLink") == 1 and "Reusing the sweep's SuperLink" in output
    assert output.count("Started a local Ray head") == 1
    assert len(seen) >= 3  # a SuperLink, its SuperExec/ServerApp and Ray processes were started
    left = [pid for pid in seen if _alive(pid)]
    assert not left, _describe(left)


def test_ctrl_c_stops_every_process_fedpriv_started(tmp_path):
    code, seen, output = run_watched([*TINY, "strategy.num_rounds=50", f"hydra.run.dir={tmp_path / 'run'}"],
                                     tmp_path, interrupt_after=8.0)
    assert code != 0
    assert seen, output[-2000:]
    time.sleep(0.5)
    left = [pid for pid in seen if _alive(pid)]
    assert not left, _describe(left) + output[-2000:]
