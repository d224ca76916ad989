"""Process trees by PID (psutil): found from the root, by group or by marker, and stopped whole."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from fedpriv.process_tree import (
    alive,
    descendants,
    group_members,
    processes_mentioning,
    start_time,
    terminate_tree,
)

pytestmark = pytest.mark.processes  # starts real processes; each test stops what it started

# A root in its own session with a child and a grandchild; the marker is in the root's command line
# and in the environment all three share.
TREE = ("import subprocess, sys, time; "
        "subprocess.Popen([sys.executable, '-c', 'import subprocess, time; subprocess.Popen([\"sleep\", \"300\"]); "
        "time.sleep(300)']); time.sleep(300)")


def _wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.1)


def test_a_tree_is_found_from_its_root_and_stopped_whole(tmp_path):
    marker = f"fedpriv-tree-{tmp_path.name}"
    root = subprocess.Popen([sys.executable, "-c", TREE, marker], start_new_session=True,
                            env={**os.environ, "FEDPRIV_TEST_MARKER": marker})
    seen = [root.pid]
    try:
        _wait_for(lambda: len(descendants(root.pid)) == 2)
        seen += descendants(root.pid)
        assert len(seen) == 3 and all(alive(pid) for pid in seen)
        assert sorted(group_members(root.pid)) == sorted(seen)  # the root leads its group
        assert sorted(processes_mentioning(marker)) == sorted(seen)
        identity = (root.pid, start_time(root.pid))
        assert alive(identity) and not alive((root.pid, identity[1] + 1.0))  # another start time: another process
        terminate_tree(root.pid, grace=5)
        root.wait(timeout=10)
        _wait_for(lambda: not any(alive(pid) for pid in seen))
        assert [pid for pid in seen if alive(pid)] == [] and processes_mentioning(marker) == []
        assert not alive(identity) and start_time(root.pid) is None
    finally:
        for pid in seen:  # whatever happened, stop what this test started, by PID
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        root.wait(timeout=10)


def test_an_orphan_left_in_the_roots_session_is_stopped_too():
    # The middle process exits at once: its child is re-parented away from the root, but stays in its session.
    code = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
            "'import subprocess; subprocess.Popen([\"sleep\", \"300\"])']).wait(); time.sleep(300)")
    root = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        _wait_for(lambda: len(group_members(root.pid)) == 2 and not descendants(root.pid))
        orphan = [pid for pid in group_members(root.pid) if pid != root.pid]
        assert len(orphan) == 1 and descendants(root.pid) == []  # re-parented away from the root
        terminate_tree(root.pid, grace=5)
        root.wait(timeout=10)
        _wait_for(lambda: not alive(orphan[0]))
        assert not alive(orphan[0])
    finally:
        for pid in group_members(root.pid):
            os.kill(pid, signal.SIGKILL)
        root.wait(timeout=10)


# A root that ends on SIGTERM and a child that ignores it (as Ray's workers take seconds to go).
STUBBORN = ("import signal, subprocess, sys, time; "
            "subprocess.Popen([sys.executable, '-c', 'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print(\"ready\", flush=True); time.sleep(600)']); time.sleep(600)")


def test_with_settle_the_rest_of_a_tree_is_killed_soon_after_its_root_ends_not_after_the_whole_grace():
    root = subprocess.Popen([sys.executable, "-c", STUBBORN], start_new_session=True)
    seen = [root.pid]
    try:
        _wait_for(lambda: len(descendants(root.pid)) == 1)
        seen += descendants(root.pid)
        time.sleep(1.0)  # the child has installed its SIG_IGN
        # A grace of 10 minutes: without `settle` the child would outlive the 60 s this test waits.
        stopper = threading.Thread(target=terminate_tree, args=(root.pid,), kwargs={"grace": 600, "settle": 0.5},
                                   daemon=True)
        stopper.start()
        stopper.join(timeout=60)
        assert not stopper.is_alive(), "terminate_tree waited for the whole grace"
        root.wait(timeout=10)
        assert [pid for pid in seen if alive(pid)] == []
    finally:
        for pid in seen:  # whatever happened, stop what this test started, by PID
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        root.wait(timeout=10)
