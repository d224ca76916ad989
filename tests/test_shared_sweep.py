"""A sweep's jobs share one SuperLink and one local Ray, and nothing of them outlives the sweep:
not when a later job fails, not after Ctrl-C, not when fedpriv itself is SIGKILLed (the watchdogs).

Real processes, so each test takes tens of seconds; the sweep that succeeds is in test_simulation.py.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedpriv.process_tree import descendants

from test_simulation import TINY, _alive, _describe

pytestmark = [pytest.mark.slow, pytest.mark.processes]

RAY_FOLDER = re.compile(r"Started a local Ray head for this sweep at \S+ \(pid \d+, folder (\S+)\)")


def sweep_watched(args: list[str], cwd: Path, *, signal_after: tuple[str, float, int] | None = None,
                  timeout: float = 400) -> tuple[int, set[int], str]:
    """Run `fedpriv -m ARGS` in a process group of its own, recording every descendant PID; with
    `signal_after` (TEXT, SECONDS, SIGNAL), send SIGNAL SECONDS after TEXT first appears in its output
    (SIGINT to the whole process group, as Ctrl-C in a terminal does; any other to fedpriv alone)."""
    log_path = cwd / f"sweep-{time.monotonic_ns()}.log"
    with open(log_path, "w") as log_file:
        process = subprocess.Popen([sys.executable, "-m", "fedpriv.cli.main", "-m", *args], cwd=cwd,
                                   stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        seen: set[int] = set()
        started, seen_text = time.monotonic(), None
        try:
            while process.poll() is None:
                seen |= set(descendants(process.pid))
                if signal_after is not None:
                    text, delay, signum = signal_after
                    if seen_text is None and text in log_path.read_text(errors="replace"):
                        seen_text = time.monotonic()
                    if seen_text is not None and time.monotonic() - seen_text > delay:
                        if signum == signal.SIGINT:
                            os.killpg(process.pid, signum)
                        else:
                            process.send_signal(signum)
                        signal_after = None
                assert time.monotonic() - started < timeout, "the sweep did not end in time"
                time.sleep(0.2)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    return process.returncode, seen, log_path.read_text(errors="replace")


def _nothing_left(seen: set[int], output: str, wait: float = 0.5) -> None:
    deadline = time.monotonic() + wait
    while [pid for pid in seen if _alive(pid)] and time.monotonic() < deadline:
        time.sleep(0.5)
    left = [pid for pid in seen if _alive(pid)]
    assert not left, _describe(left) + output[-2000:]
    folders = RAY_FOLDER.findall(output)
    assert folders, output[-2000:]  # the sweep had started its Ray head
    assert not any(Path(folder).exists() for folder in folders), folders


def test_a_sweep_whose_second_job_is_refused_fails_once_and_stops_the_shared_runtime(tmp_path):
    code, seen, output = sweep_watched([*TINY, "privacy.epsilon=1,-1", "federation.ledger_scope=run",
                                        f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path)
    assert code == 2, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("fedpriv: error:")]
    assert len(errors) == 1 and "privacy.epsilon" in errors[0], output[-3000:]
    assert (tmp_path / "sweep" / "0" / "summary.md").is_file()  # the first job's outputs stay
    assert len(seen) >= 3
    _nothing_left(seen, output)


def test_ctrl_c_in_a_sweep_stops_the_shared_superlink_and_ray(tmp_path):
    # Job 0 finishes; Ctrl-C comes while job 1 runs on the SuperLink and Ray that job 0 started.
    code, seen, output = sweep_watched([*TINY, "strategy.num_rounds=1,50", "federation.ledger_scope=run",
                                        f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path,
                                       signal_after=("Reusing the sweep's SuperLink", 6.0, signal.SIGINT))
    assert code == 130, output[-3000:]
    assert "interrupted by SIGINT; every process fedpriv started has been stopped" in output
    _nothing_left(seen, output)


def test_a_sigkilled_sweep_leaves_its_watchdogs_to_stop_the_superlink_and_the_ray_head(tmp_path):
    code, seen, output = sweep_watched([*TINY, "strategy.num_rounds=50", "privacy.epsilon=1,8",
                                        "federation.ledger_scope=run", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                                       tmp_path, signal_after=("Started the sweep's SuperLink", 4.0, signal.SIGKILL))
    assert code == -signal.SIGKILL
    _nothing_left(seen, output, wait=40)
