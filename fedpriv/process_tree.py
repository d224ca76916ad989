"""Process trees by PID, through psutil: what fedpriv started and everything those processes started.

Processes are found from a PID this process started (its descendants, the process group or session
it leads) or from a marker fedpriv put in their command line or environment, never by a program's
name. Flower starts some processes in sessions of their own, so a process group alone is not
enough; and a process whose parent dies first is re-parented away from the tree, so stopping a tree
also looks again, while it waits, for orphans left in a group or session that one of its processes
leads. A PID together with its start time names one process: a PID reused later has another.
"""

from __future__ import annotations

import os
import signal
import time

import psutil

_GONE = (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied)


def start_time(pid: int) -> float | None:
    """When `pid` started (psutil's create time), or None if it is gone or a zombie."""
    try:
        process = psutil.Process(pid)
        return None if process.status() == psutil.STATUS_ZOMBIE else process.create_time()
    except _GONE:
        return None


def alive(identity: tuple[int, float] | int) -> bool:
    """Whether a process still runs, not as a zombie: a PID, or `(pid, start time)` (a reused PID does not count)."""
    if isinstance(identity, int):
        return start_time(identity) is not None
    pid, started = identity
    return start_time(pid) == started


def descendants(root: int) -> list[int]:
    """All live descendants of `root`, by parent links (children, their children, ...)."""
    try:
        children = psutil.Process(root).children(recursive=True)
    except _GONE:
        return []
    return [child.pid for child in children if alive(child.pid)]


def _led_by(known: set[int]) -> list[int]:
    """Live processes in a process group or session that one of `known` leads (orphans included)."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.pid not in known and (os.getpgid(process.pid) in known or os.getsid(process.pid) in known) \
                    and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process.pid)
        except (*_GONE, ProcessLookupError, PermissionError):
            continue
    return found


def group_members(group: int) -> list[int]:
    """Live (not zombie) processes in process group `group`."""
    members = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == group and process.status() != psutil.STATUS_ZOMBIE:
                members.append(process.pid)
        except (*_GONE, ProcessLookupError, PermissionError):
            continue
    return members


def processes_mentioning(marker: str) -> list[int]:
    """Live processes (other than this one) whose command line or environment contains `marker`.

    fedpriv's runs put their folder in every child's command line or environment, so this finds
    what a run left behind even in sessions of its own (Ray, the SuperLink).
    """
    found = []
    for process in psutil.process_iter():
        if process.pid == os.getpid():
            continue
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                continue
            if any(marker in part for part in process.cmdline()) or \
                    any(marker in f"{key}={value}" for key, value in process.environ().items()):
                found.append(process.pid)
        except _GONE:
            continue
    return found


def terminate_tree(root: int, *, grace: float = 10.0, settle: float | None = None) -> None:
    """SIGTERM `root` and all its descendants by PID; SIGKILL whatever is left after `grace` s.

    While it waits it also takes in what the tree spawned while shutting down: new descendants, and
    orphans left in a process group or session that one of the tree leads.

    `settle`: once `root` itself has ended, the rest of the tree gets at most this many seconds more
    (within `grace`) before SIGKILL; None waits the whole `grace`. For trees whose stragglers have
    nothing left to save (a SuperLink's Ray workers take ~4 s after their raylet has gone just to
    notice it; the run's outputs are written atomically and every ledger survives a SIGKILL).
    """
    known = {root, *descendants(root)}
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        for pid in sorted(known):
            if alive(pid):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            known |= {child for pid in known for child in descendants(pid)} | set(_led_by(known))
            if not any(alive(pid) for pid in known):
                return
            if sig == signal.SIGTERM and settle is not None and not alive(root):
                deadline, settle = min(deadline, time.monotonic() + settle), None
            time.sleep(0.2)
