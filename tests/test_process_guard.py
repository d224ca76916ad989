"""The suite's own guard: a test module that leaves a process running fails, and the process is stopped.

tests/conftest.py makes pytest a child subreaper, so even a process whose parent exited (as a
SuperLink does when `fedpriv` is killed) is found. Checked here on an inner pytest run.
"""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.processes  # starts real processes; each test stops what it started

pytest_plugins = ["pytester"]

LEAKY = """
import subprocess

def test_an_orphan_in_its_own_session():
    subprocess.run(["sh", "-c", "setsid sleep 311 >/dev/null 2>&1 & echo $! > orphan.pid"], check=True)

def test_a_direct_child():
    open("child.pid", "w").write(str(subprocess.Popen(["sleep", "312"]).pid))
"""

TIDY = """
import subprocess

def test_a_child_it_stops():
    child = subprocess.Popen(["sleep", "313"])
    child.kill()
    child.wait()
"""


def _run(pytester, source: str):
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makepyfile(test_inner=source)
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-o", "addopts=")


def test_a_module_leaving_processes_running_fails_and_they_are_stopped(pytester, monkeypatch):
    monkeypatch.setenv("FEDPRIV_TEST_LEFTOVER_GRACE_S", "1")  # nothing here is slow to exit
    result = _run(pytester, LEAKY)
    result.assert_outcomes(passed=2, errors=1)
    output = result.stdout.str()
    assert "processes left running (now killed)" in output
    for name, command in (("orphan.pid", "sleep 311"), ("child.pid", "sleep 312")):
        pid = int((pytester.path / name).read_text())
        assert f"{pid}: {command}" in output
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_a_module_that_stops_what_it_started_passes(pytester):
    _run(pytester, TIDY).assert_outcomes(passed=1)


SPAWNING = """
import subprocess

import pytest


def _flwr(tmp_path):
    fake = tmp_path / "flwr"  # the guard goes by the executable's name; this one only exits
    fake.write_text("#!/bin/sh\\nexit 0\\n")
    fake.chmod(0o755)
    return str(fake)


def test_an_unmarked_test_starting_flwr(tmp_path):
    subprocess.run([_flwr(tmp_path)], check=True)


@pytest.mark.processes
def test_a_marked_test_starting_flwr(tmp_path):
    subprocess.run([_flwr(tmp_path)], check=True)
"""


def test_only_tests_marked_processes_may_start_flower_ray_or_nginx(pytester):
    result = _run(pytester, SPAWNING)
    result.assert_outcomes(passed=2, errors=1)  # the unmarked one errs in its teardown; the marked one is fine
    output = result.stdout.str()
    assert "ERROR test_inner.py::test_an_unmarked_test_starting_flwr" in output
    assert "test_an_unmarked_test_starting_flwr started flwr but is not marked `processes`" in output
