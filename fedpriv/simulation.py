"""Run a federation in Flower's Simulation Engine, and stop everything that was started.

`fedpriv` starts its own SuperLink in simulation mode (in a new process group, with a private
FLWR_HOME), submits the run with `flwr run ... --stream`, and on the way out (success, failure or
Ctrl-C) terminates that process group: the SuperLink, the ServerApp and the Ray workers it spawned.
Processes are ended by the process-group id of the SuperLink this module started, never by name.

If `fedpriv` itself is killed (SIGKILL, the OOM killer, a closed terminal's SIGHUP), its cleanup
never runs, and the SuperLink, the ServerApp and Ray, each in a session of their own, would run on
(and keep training and writing checkpoints into the run directory). A small watchdog process,
started with the SuperLink in a session of its own, waits on both; when `fedpriv` dies first it
stops the SuperLink's process tree the same way (:func:`fedpriv.process_tree.terminate_tree`).

SIGINT, SIGTERM and SIGHUP become :class:`Interrupted` (:func:`interrupt_on_signals`, used by
`fedpriv` and `fedpriv-deploy`), so the same clean-up runs however the command was started or
stopped. What `flwr run --stream` prints passes through :func:`flower_line`, which drops Flower's
and Ray's lines that mislead a fedpriv user (the run directory's superlink.log keeps everything).
"""

from __future__ import annotations

import logging
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import tomli_w

from fedpriv import rundir
from fedpriv.errors import FedprivError
from fedpriv.process_tree import terminate_tree

log = logging.getLogger("fedpriv")

CONNECTION = "fedpriv-local"


class SimulationError(FedprivError):
    """Raised when the simulation could not be started or did not finish its run."""


class Interrupted(KeyboardInterrupt):
    """A stop signal (SIGINT, SIGTERM, SIGHUP) received by a fedpriv command; `signal_name` says which."""

    def __init__(self, signum: int) -> None:
        self.signal_name = signal.Signals(signum).name
        super().__init__(f"stopped by {self.signal_name}")


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def interrupt_on_signals() -> None:
    """Make SIGINT, SIGTERM and SIGHUP raise :class:`Interrupted` in the main thread.

    Every `finally` and context manager that stops processes then runs, whichever signal came. The
    handlers are installed explicitly because a non-interactive shell starts a background job
    (`fedpriv ... &` in a script) with SIGINT ignored, and Python keeps an inherited "ignore": such a
    job would not stop on `kill -INT`. The first signal starts the clean-up; later ones are ignored,
    so a second Ctrl-C cannot cut it short and leave processes behind (SIGKILL still works: the
    watchdog then stops what is left).
    """
    def interrupt(signum: int, frame: object) -> None:
        for other in STOP_SIGNALS:
            signal.signal(other, signal.SIG_IGN)
        raise Interrupted(signum)

    for signum in STOP_SIGNALS:
        signal.signal(signum, interrupt)


# What `flwr run --stream` prints that a fedpriv user should not see, or should see explained.
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_MISLEADING = (
    "default simulated SuperNodes changed from",  # fedpriv sets the count: federation.num_hospitals
    "To change federation size, use the following command",  # ... so Flower's way to change it is wrong here
    "flwr federation simulation-config",
)
_DEBUG_LINE = re.compile(r"^(\S+ \S+:DEBUG:|DEBUG\s*:)")  # Flower's debug lines, in both of its formats
_EMPTY_INFO = re.compile(r"^(\S+ \S+:INFO:|INFO\s*:)\s*$")  # Flower's blank INFO lines
_RAY_DEDUP_NOTICE = re.compile(r"\s*\(Ray deduplicates logs by default\.[^)]*\)")
SUPERLINK_GONE = "Connection to the SuperLink is unavailable"  # flwr's words when the SuperLink is gone


def flower_line(line: str) -> str | None:
    """`line` of `flwr run --stream` output as fedpriv shows it, or None to leave it out.

    Left out: Flower's note that its default federation size changed and how to change it (fedpriv
    sets the size from federation.num_hospitals, so that advice would mislead), its DEBUG lines and
    blank INFO lines. Ray's notice that it deduplicates repeated log lines is cut from the line it
    ends. Flower's "Connection to the SuperLink is unavailable ... check your network" is explained:
    the SuperLink is fedpriv's own, on this machine, so the network is not the cause.
    """
    plain = _ANSI.sub("", line)
    if any(text in plain for text in _MISLEADING) or _DEBUG_LINE.match(plain) or _EMPTY_INFO.match(plain):
        return None
    if SUPERLINK_GONE in plain:
        return ("fedpriv: the local SuperLink that fedpriv started has stopped (not a network problem); "
                f"its log is {rundir.SUPERLINK_LOG} in the run directory\n")
    return _RAY_DEDUP_NOTICE.sub("", line)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def executable(name: str) -> str:
    """A console script of this environment (next to the running Python), else from PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise SimulationError(f"`{name}` was not found; reinstall fedpriv (pip install -e .) in this environment")
    return found


class LocalSuperLink:
    """A SuperLink in simulation mode, owned by this process: started on enter, stopped on exit."""

    def __init__(self, home: Path, *, startup_timeout: float = 60.0, temporary_home: bool = False) -> None:
        self.home = home
        self.temporary_home = temporary_home  # the watchdog removes it too if this process dies
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen | None = None
        self.watchdog: subprocess.Popen | None = None
        self.port = _free_port()
        self.control_port = _free_port()
        self.log_path = home / "superlink.log"
        # The SuperLink starts `flower-superexec` and friends by name: put this environment first.
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        self.env = {**os.environ, "PATH": path, "FLWR_HOME": str(home), "FLWR_DISABLE_UPDATE_CHECK": "1",
                    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}

    def __enter__(self) -> LocalSuperLink:
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "config.toml").write_text(tomli_w.dumps({"superlink": {
            "default": CONNECTION, CONNECTION: {"address": f"127.0.0.1:{self.port}", "insecure": True}}}))
        command = [executable("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
                   "--host", "127.0.0.1", "--port", str(self.port),
                   "--control-api-address", f"127.0.0.1:{self.control_port}",
                   "--disable-runtime-dependency-installation"]
        with open(self.log_path, "wb") as log_file:
            # Its own session keeps Ctrl-C in the terminal from reaching it half-way; we stop it.
            self.process = subprocess.Popen(command, env=self.env, stdout=log_file, stderr=subprocess.STDOUT,
                                            start_new_session=True, cwd=self.home)
        try:
            self.watchdog = _start_watchdog(self.process, self.home if self.temporary_home else None)
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SimulationError(f"flower-superlink exited with code {self.process.returncode}; "
                                      f"see {self.log_path}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        raise SimulationError(f"flower-superlink did not become ready within {self.startup_timeout:.0f}s; "
                              f"see {self.log_path}")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, grace: float = 10.0) -> None:
        """Stop the SuperLink and every process it spawned (SIGTERM, then SIGKILL after `grace`)."""
        if self.process is None:
            return
        terminate_tree(self.process.pid, grace=grace)
        self.process.wait(timeout=5)
        self.process = None
        if self.watchdog is not None:  # it ends by itself once the SuperLink has exited
            try:
                self.watchdog.wait(timeout=10)
            except subprocess.TimeoutExpired:
                terminate_tree(self.watchdog.pid, grace=1)
                self.watchdog.wait(timeout=5)
            self.watchdog = None

    def __exit__(self, *exc) -> None:
        self.stop()


def _start_watchdog(link: subprocess.Popen, home: Path | None) -> subprocess.Popen | None:
    """Start the watchdog that stops `link`'s tree should this process die first (module docstring).

    It gets pidfds of this process and of the SuperLink, so a reused PID cannot fool it, and runs in
    a session of its own, so that what kills this process's group or session spares it. Without
    pidfds (not Linux) there is no watchdog.
    """
    if not hasattr(os, "pidfd_open"):
        return None
    fds: list[int] = []
    try:
        fds = [os.pidfd_open(os.getpid()), os.pidfd_open(link.pid)]
        code = "import sys; from fedpriv.simulation import _watch; _watch(*map(int, sys.argv[1:4]), sys.argv[4])"
        return subprocess.Popen([sys.executable, "-c", code, *map(str, fds), str(link.pid), str(home or "")],
                                pass_fds=fds,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    except OSError as error:
        log.warning("no watchdog for flower-superlink (pid %d): %s; if fedpriv is killed, stop it by hand",
                    link.pid, error)
        return None
    finally:
        for fd in fds:
            os.close(fd)


def _watch(parent_fd: int, link_fd: int, link_pid: int, home: str = "") -> None:
    """The watchdog: wait until the SuperLink or its starter ends; if the starter went first, stop the
    SuperLink and every process it spawned, then remove its temporary `home` (if one is given)."""
    readable, _, _ = select.select([parent_fd, link_fd], [], [])
    if link_fd in readable:  # the SuperLink ended first: stopped as usual, nothing left to do
        return
    # Stop first, speak after: the stderr inherited from the dead starter may be a closed pipe, and
    # a write to it (BrokenPipeError) must not stop the watchdog before it has done its job.
    terminate_tree(link_pid)
    if home:
        shutil.rmtree(home, ignore_errors=True)
    try:
        print(f"fedpriv: the process that started flower-superlink (pid {link_pid}) died; stopped the "
              "SuperLink and every process it started", file=sys.stderr, flush=True)
    except OSError:
        pass


def run_simulation(config_json: str, run_dir: Path, *, num_hospitals: int, client_cpus: int,
                   startup_timeout: float = 60.0) -> None:
    """Run one federated simulation of `config_json`; outputs land in `run_dir`."""
    # Imported here: the watchdog imports this module and should start in milliseconds.
    from fedpriv.app_config import CONFIG_KEY, RUN_DIR_KEY, write_app  # deferred: torch; the watchdog imports us

    run_dir = run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix="fedpriv-flwr-"))
    try:
        write_app(home / "app")
        run_config = home / "run-config.toml"
        run_config.write_text(tomli_w.dumps({CONFIG_KEY: config_json, RUN_DIR_KEY: str(run_dir)}))
        with LocalSuperLink(home, startup_timeout=startup_timeout, temporary_home=True) as link:
            command = [executable("flwr"), "run", str(home / "app"), CONNECTION, "--run-config", str(run_config),
                       "--federation-config", f"num-supernodes={num_hospitals} client-resources-num-cpus={client_cpus}",
                       "--stream"]
            try:
                returncode = stream_flower(command, env=link.env, cwd=home)
            finally:
                log_copy = run_dir / rundir.SUPERLINK_LOG
                shutil.copy(link.log_path, log_copy)
            if returncode != 0 or not rundir.finished(run_dir):
                raise SimulationError(f"the federated run did not finish (flwr run exited {returncode}); "
                                      f"see {log_copy}")
    finally:
        shutil.rmtree(home, ignore_errors=True)


def stream_flower(command: list[str], *, env: dict[str, str], cwd: Path) -> int:
    """Run `flwr run ... --stream`, showing its output through :func:`flower_line`; its exit code.

    It runs in a session of its own, so a Ctrl-C in the terminal reaches only fedpriv. When fedpriv
    is interrupted, `flwr` is stopped (by PID) before the SuperLink, and what it prints from then on
    is not shown: with the SuperLink gone it would only say "check your network".
    """
    process = subprocess.Popen(command, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, start_new_session=True, text=True, errors="replace")
    try:
        for line in process.stdout:
            shown = flower_line(line)
            if shown is not None:
                sys.stdout.write(shown)
                sys.stdout.flush()
        return process.wait()
    finally:
        if process.poll() is None:
            terminate_tree(process.pid, grace=2)
            process.wait(timeout=5)
        process.stdout.close()
