"""Shared test set-up: no test may touch the user's real privacy ledgers or leave a process running."""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

# absl (imported by dp_accounting, which the independent accountant in these tests uses) gives its
# log handler the sys.stderr of the moment: during collection, pytest's capture stream. Hydra's logging
# set-up closes every existing handler, and absl's close() closes that stream unless it is one of the
# current sys.stderr/stdout; under capsys it is not, so pytest lost its own stderr and crashed. Point
# the handler at the process's real stderr (still captured at the file-descriptor level) first.
try:
    from absl import logging as _absl_logging
except ImportError:  # dp_accounting is a dev dependency; without it nothing holds the stream
    pass
else:
    _absl_logging.get_absl_handler().python_handler.stream = sys.__stderr__

LEDGER_DIR_ENV = "FEDPRIV_LEDGER_DIR"  # fedpriv.experiment.LEDGER_DIR_ENV


@pytest.fixture(scope="session", autouse=True)
def _session_ledger_env_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """FEDPRIV_LEDGER_DIR for module- and session-scoped fixtures, which run before any per-test fixture."""
    folder = tmp_path_factory.mktemp("fedpriv-ledgers-shared") / "ledgers"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(LEDGER_DIR_ENV, str(folder))
        yield folder


@pytest.fixture(autouse=True)
def ledger_env_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point FEDPRIV_LEDGER_DIR at a fresh folder for every test.

    Persistent ledgers (federation.ledger_scope=persistent, the default) live there instead of in the
    user's data folder; `fedpriv` and Flower subprocesses inherit the variable. A test that needs the
    folder (e.g. to find a default run's ledgers) asks for this fixture by name. fedpriv creates the
    folder itself when it first checks it.
    """
    folder = tmp_path_factory.mktemp("fedpriv-ledgers") / "ledgers"
    monkeypatch.setenv(LEDGER_DIR_ENV, str(folder))
    return folder


KEY_DIR_ENV = "FEDPRIV_KEY_DIR"  # fedpriv.privacy.chain.KEY_DIR_ENV


@pytest.fixture(scope="session", autouse=True)
def _session_key_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Ledger keys and witnesses of every test live in a temporary folder, never the user's config.

    One folder for the session: keys are named by their ledger's path, and every test's ledgers have
    paths of their own, so module-scoped fixtures and the tests reading their ledgers find the same key.
    """
    folder = tmp_path_factory.mktemp("fedpriv-keys-shared") / "keys"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(KEY_DIR_ENV, str(folder))
        yield folder


# ------------------------------------------------------------------ logging as each test found it

@pytest.fixture(autouse=True)
def _logging_as_before() -> Iterator[None]:
    """Put every logger's handlers, level and switches back after each test.

    A test that calls `fedpriv` in this process lets Hydra configure logging: its handlers then write
    to that test's capture streams, which pytest closes afterwards, and every later log line became a
    "--- Logging error ---" traceback in another test's stderr.
    """
    loggers = [logging.getLogger()] + [logger for logger in logging.Logger.manager.loggerDict.values()
                                       if isinstance(logger, logging.Logger)]
    saved = [(logger, logger.handlers[:], logger.level, logger.disabled, logger.propagate) for logger in loggers]
    yield
    for logger, handlers, level, disabled, propagate in saved:
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.disabled, logger.propagate = disabled, propagate


# ------------------------------------------------------------------ nothing a test starts outlives it

# A stopped SuperLink or Ray worker may take a few seconds to exit.
LEFTOVER_GRACE_S = float(os.environ.get("FEDPRIV_TEST_LEFTOVER_GRACE_S", "20"))


def _become_subreaper() -> bool:
    """Adopt the orphans of processes tests start (Linux): a SuperLink whose `fedpriv` died is
    reparented to pytest rather than to init, so the check below sees it."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def _living_descendants() -> list[psutil.Process]:
    """The processes below pytest still running; adopted zombies are reaped on the way."""
    living = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                if child.ppid() == os.getpid():
                    os.waitpid(child.pid, os.WNOHANG)
                continue
            living.append(child)
        except (psutil.NoSuchProcess, ChildProcessError):
            continue
    return living


@pytest.fixture(scope="session", autouse=True)
def _adopt_orphans() -> None:
    _become_subreaper()


@pytest.fixture(scope="module", autouse=True)
def _no_process_outlives_its_module(_adopt_orphans) -> Iterator[None]:
    """Fail the module whose tests leave a process running (and stop it, by PID): every process a
    test starts is stopped by whoever started it, also when the test fails."""
    before = {p.pid for p in _living_descendants()}
    yield
    deadline = time.monotonic() + LEFTOVER_GRACE_S
    while (left := [p for p in _living_descendants() if p.pid not in before]) and time.monotonic() < deadline:
        time.sleep(0.5)
    described = []
    for process in left:
        try:
            described.append(f"{process.pid}: {' '.join(process.cmdline())[:200]}")
            process.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(left, timeout=5)  # reaps those that are pytest's own children
    assert not described, "processes left running (now killed):\n" + "\n".join(described)


# Only tests marked `processes` may start the real thing (Flower's SuperLink, SuperNodes and `flwr`,
# Ray, nginx): the marker is what keeps the quick subset free of them. An audit hook (it cannot be
# removed, so it is installed once) sees every subprocess.Popen of this process; a test that is not
# marked and starts one of these fails, as a test that thought it ran a federation in process did.
_REAL_PROCESSES = ("flower-superlink", "flower-supernode", "flower-superexec", "flwr", "flwr-simulation", "ray",
                   "nginx")
_spawned: list[str] | None = None  # the real processes the current unmarked test started


def _note_spawn(event: str, args: tuple) -> None:
    if event != "subprocess.Popen" or _spawned is None:
        return
    try:
        executable, argv = args[0], args[1]
        first = executable if executable is not None else (argv[0] if isinstance(argv, (list, tuple)) else argv)
        name = Path(os.fsdecode(first)).name
    except (IndexError, TypeError, ValueError):
        return
    if name in _REAL_PROCESSES:
        _spawned.append(name)


sys.addaudithook(_note_spawn)


@pytest.fixture(autouse=True)
def _only_marked_tests_start_real_processes(request: pytest.FixtureRequest) -> Iterator[None]:
    global _spawned
    if request.node.get_closest_marker("processes") is not None:
        yield
        return
    _spawned = []
    try:
        yield
        assert not _spawned, (f"{request.node.nodeid} started {', '.join(sorted(set(_spawned)))} but is not marked "
                              "`processes`: mark it, or run its federation in process")
    finally:
        _spawned = None
