"""The watchdog stops the SuperLink's tree when fedpriv is killed, even with a closed stderr."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from fedpriv.process_tree import alive, descendants

pytestmark = pytest.mark.processes  # starts real processes; each test stops what it started

# Stands in for `fedpriv`: starts a "SuperLink" (a process with a child, in its own session, as
# Flower's are) and the real watchdog, prints the PIDs, then waits to be killed.
STARTER = textwrap.dedent("""
    import subprocess, sys, time
    from fedpriv.simulation import _start_watchdog
    link = subprocess.Popen([sys.executable, "-c",
                             "import subprocess, time; subprocess.Popen(['sleep', '300']); time.sleep(300)"],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    watchdog = _start_watchdog(link, None)
    time.sleep(1)  # the link's child is started
    print(link.pid, watchdog.pid, flush=True)
    time.sleep(300)
""")


def _in_session(session: int) -> list[int]:
    """Live processes in `session` (the stand-in SuperLink leads its own, as Flower's does)."""
    found = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == session and alive(process.pid):
                found.append(process.pid)
        except (psutil.Error, OSError):
            continue
    return found


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="the watchdog needs pidfds (Linux)")
def test_a_killed_starter_with_a_closed_stderr_leaves_nothing_running():
    starter = subprocess.Popen([sys.executable, "-c", STARTER], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               stdin=subprocess.DEVNULL, text=True)
    started: list[int] = [starter.pid]
    try:
        link, watchdog = map(int, starter.stdout.readline().split())
        started += [link, watchdog, *descendants(link)]
        assert len(started) == 4 and all(alive(pid) for pid in started[1:])
        starter.stderr.close()  # what pytest's subprocess timeout does: the watchdog's stderr is now a broken pipe
        starter.send_signal(signal.SIGKILL)
        starter.wait(timeout=30)
        deadline = time.monotonic() + 60
        while (any(alive(pid) for pid in started[1:]) or _in_session(link)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert [pid for pid in started[1:] if alive(pid)] == []  # the link, its child and the watchdog
        assert _in_session(link) == []  # nothing else the link started either
    finally:
        for pid in started:  # whatever happened, stop what this test started, by PID
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        starter.stdout.close()
