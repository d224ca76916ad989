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

With a Ray cluster to attach to (`federation.ray_address`, else the standard RAY_ADDRESS), the
simulation runs on that cluster instead of a local Ray: fedpriv first checks, within a bounded time,
that the cluster answers and can host one hospital and, with more than one node, that every node sees
the hospitals' ledger folder and key folder (:func:`probe_ray_cluster`), then hands the address to the
SuperLink's simulation process as RAY_ADDRESS. The cluster's processes were started by
`ray start`, not under the SuperLink, so stopping the SuperLink's tree cannot reach them: an attached
cluster keeps running (only this run's Ray workers end, when Ray sees its driver go).

The jobs of a Hydra multirun (`fedpriv -m ...`) share one SuperLink and, by default, one local Ray
(:class:`SharedRuntime`; FEDPRIV_SHARED_RUNTIME=superlink+ray, superlink or off): the first job starts
them, later jobs submit their runs to them, and fedpriv stops them when the sweep ends, when a job
fails or is interrupted, and at interpreter exit. The Ray is a one-node cluster of fedpriv's own
(`ray start --head --block` on loopback, :class:`LocalRayHead`) that the SuperLink's simulations
attach to; it has a watchdog of its own, like the SuperLink's. A job that attaches to a Ray cluster
the user gave runs on that cluster, through a SuperLink pointed at it.

SIGINT, SIGTERM and SIGHUP become :class:`Interrupted` (:func:`interrupt_on_signals`, used by
`fedpriv` and `fedpriv-deploy`), so the same clean-up runs however the command was started or
stopped. What `flwr run --stream` prints passes through :func:`flower_line`, which drops Flower's
and Ray's lines that mislead a fedpriv user (the run directory's superlink.log keeps everything).
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import re
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import tomli_w

from fedpriv import rundir
from fedpriv.errors import ConfigError, FedprivError
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
    # A sweep's own Ray head runs without Ray's dashboard: its GCS and raylet say they cannot export metrics.
    "Failed to establish connection to the event+metrics exporter agent",
    "Failed to establish connection to the metrics exporter agent",
    # Flower's normal shutdown of its Ray actors at the end of every run, printed as a WARNING twice each.
    "Manually terminating ClientAppActor",
)
_DEBUG_LINE = re.compile(r"^(\S+ \S+:DEBUG:|DEBUG\s*:)")  # Flower's debug lines, in both of its formats
_EMPTY_INFO = re.compile(r"^(\S+ \S+:INFO:|INFO\s*:)\s*$")  # Flower's blank INFO lines
_RAY_DEDUP_NOTICE = re.compile(r"\s*\(Ray deduplicates logs by default\.[^)]*\)")
SUPERLINK_GONE = "Connection to the SuperLink is unavailable"  # flwr's words when the SuperLink is gone


def flower_line(line: str) -> str | None:
    """`line` of `flwr run --stream` output as fedpriv shows it, or None to leave it out.

    Left out: Flower's note that its default federation size changed and how to change it (fedpriv
    sets the size from federation.num_hospitals, so that advice would mislead), its warning that it
    terminates its Ray actors (which it does at the end of every run), its DEBUG lines and blank INFO
    lines. Ray's notice that it deduplicates repeated log lines is cut from the line it
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


def executable(name: str) -> str:
    """A console script of this environment (next to the running Python), else from PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise SimulationError(f"`{name}` was not found; reinstall fedpriv (pip install -e .) in this environment")
    return found


# After SIGTERM, a SuperLink (or a Ray head) ends within a second; the ServerApp's process finishes Ray's
# shutdown in ~3 s, and Ray's workers linger ~4 s more only to notice that their raylet is gone. What is
# left this long after the SuperLink itself ended is SIGKILLed: the run's files are written atomically and
# every ledger survives a SIGKILL (tests/test_process_faults.py), so nothing is lost, and Ctrl-C returns sooner.
STRAGGLERS_S = 3.0


class LocalSuperLink:
    """A SuperLink in simulation mode, owned by this process: started on enter, stopped on exit."""

    def __init__(self, home: Path, *, startup_timeout: float = 60.0, temporary_home: bool = False,
                 ray_address: str = "", extra_env: Mapping[str, str] | None = None) -> None:
        """`ray_address`: the Ray cluster its simulation attaches to ("": a local Ray of its own);
        `extra_env`: more environment for it and what it starts."""
        self.home = home
        self.temporary_home = temporary_home  # the watchdog removes it too if this process dies
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen | None = None
        self.watchdog: subprocess.Popen | None = None
        self.port, self.control_port = free_ports(2)
        self.log_path = home / "superlink.log"
        # The SuperLink starts `flower-superexec` and friends by name: put this environment first.
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        self.env = {**os.environ, "PATH": path, "FLWR_HOME": str(home), "FLWR_DISABLE_UPDATE_CHECK": "1",
                    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
        # Flower's Ray backend calls ray.init() without an address: RAY_ADDRESS decides where it runs.
        # Unset, Ray would join the last cluster `ray start` began on this machine (its address file
        # under /tmp/ray), unchecked: "local" makes it start a Ray of its own.
        self.env[RAY_ADDRESS_ENV] = ray_address or "local"
        self.env.update(extra_env or {})
        self.ray_address = ray_address

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

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, grace: float = 10.0) -> None:
        """Stop the SuperLink and every process it spawned (SIGTERM, then SIGKILL after `grace`, or
        :data:`STRAGGLERS_S` after the SuperLink itself has ended)."""
        if self.process is None:
            return
        terminate_tree(self.process.pid, grace=grace, settle=STRAGGLERS_S)
        self.process.wait(timeout=5)
        self.process = None
        self.watchdog = _end_watchdog(self.watchdog)

    def __exit__(self, *exc) -> None:
        self.stop()


def _end_watchdog(watchdog: subprocess.Popen | None) -> None:
    """Wait for a watchdog whose charge has just been stopped (it then ends by itself); stop it if it
    does not. Returns None, for the caller's attribute."""
    if watchdog is not None:
        try:
            watchdog.wait(timeout=10)
        except subprocess.TimeoutExpired:
            terminate_tree(watchdog.pid, grace=1)
            watchdog.wait(timeout=5)
    return None


def _start_watchdog(link: subprocess.Popen, home: Path | None,
                    what: str = "flower-superlink") -> subprocess.Popen | None:
    """Start the watchdog that stops `link`'s tree should this process die first (module docstring).

    It gets pidfds of this process and of the SuperLink (or of the sweep's Ray head, `what` names which),
    so a reused PID cannot fool it, and runs in a session of its own, so that what kills this process's
    group or session spares it. Without pidfds (not Linux) there is no watchdog.
    """
    if not hasattr(os, "pidfd_open"):
        return None
    fds: list[int] = []
    try:
        fds = [os.pidfd_open(os.getpid()), os.pidfd_open(link.pid)]
        code = ("import sys; from fedpriv.simulation import _watch; "
                "_watch(*map(int, sys.argv[1:4]), sys.argv[4], sys.argv[5])")
        return subprocess.Popen([sys.executable, "-c", code, *map(str, fds), str(link.pid), str(home or ""), what],
                                pass_fds=fds,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    except OSError as error:
        log.warning("no watchdog for %s (pid %d): %s; if fedpriv is killed, stop it by hand",
                    what, link.pid, error)
        return None
    finally:
        for fd in fds:
            os.close(fd)


def _watch(parent_fd: int, link_fd: int, link_pid: int, home: str = "", what: str = "flower-superlink") -> None:
    """The watchdog: wait until the SuperLink (or Ray head: `what`) or its starter ends; if the starter
    went first, stop it and every process it spawned, then remove its temporary `home` (if one is given)."""
    readable, _, _ = select.select([parent_fd, link_fd], [], [])
    if link_fd in readable:  # the SuperLink ended first: stopped as usual, nothing left to do
        return
    # Stop first, speak after: the stderr inherited from the dead starter may be a closed pipe, and
    # a write to it (BrokenPipeError) must not stop the watchdog before it has done its job.
    terminate_tree(link_pid, settle=STRAGGLERS_S)
    if home:
        shutil.rmtree(home, ignore_errors=True)
    try:
        print(f"fedpriv: the process that started {what} (pid {link_pid}) died; stopped "
              f"{'the SuperLink' if what == 'flower-superlink' else what} and every process it started",
              file=sys.stderr, flush=True)
    except OSError:
        pass


RAY_ADDRESS_ENV = "RAY_ADDRESS"  # Ray's own variable: the cluster ray.init() attaches to


def ray_cluster_address(setting: str, environ: Mapping[str, str] | None = None) -> str:
    """The Ray cluster a run attaches to, "" for a local Ray: `setting` (federation.ray_address) if
    set, else $RAY_ADDRESS; "local" means a local Ray whatever $RAY_ADDRESS says. Raises ConfigError
    for an address that is not one."""
    from fedpriv.config import RAY_LOCAL, check_ray_address  # deferred: the watchdog imports this module

    environ = os.environ if environ is None else environ
    setting = str(setting or "").strip()
    if setting:
        check_ray_address("federation.ray_address", setting)
        return "" if setting == RAY_LOCAL else setting
    inherited = environ.get(RAY_ADDRESS_ENV, "").strip()
    check_ray_address(RAY_ADDRESS_ENV, inherited)
    return "" if inherited == RAY_LOCAL else inherited


@dataclass(frozen=True)
class RayCluster:
    """What a Ray cluster told :func:`probe_ray_cluster`: where its head is and what it holds."""

    address: str  # as given (HOST:PORT or "auto")
    gcs_address: str  # the head's HOST:PORT as Ray resolved it
    session_dir: str  # the cluster's session folder on the head (its logs are under it)
    nodes: int
    cpus: float
    gpus: float
    hospital_slots: int  # hospitals that can train at once with the configured shares
    shared: tuple[str, ...] = ()  # the folders every node was seen to share (none checked: one node)

    def describe(self) -> str:
        return (f"{self.nodes} node{'s' * (self.nodes != 1)}, {self.cpus:g} CPUs, {self.gpus:g} GPUs, "
                f"{self.hospital_slots} hospital{'s' * (self.hospital_slots != 1)} at a time")


# The shared-folder check: each node reads, at the same absolute path, a file of random content the
# probe has just written; the hospitals' ledger key folder is resolved on each node as a hospital
# there resolves it (its own FEDPRIV_KEY_DIR, else its user's config folder) unless a path is given.
_SHARED_CHECK_PREFIX = ".fedpriv-shared-check-"

_PROBE = """
import json, sys, time
import ray
ray.init(address=sys.argv[1], include_dashboard=False, log_to_driver=False, logging_level="ERROR")
cpus, gpus = float(sys.argv[2]), float(sys.argv[3])
check = json.loads(sys.argv[4]) if sys.argv[4] else None
slots, cpu_slots, nodes, totals, alive = 0, 0, 0, {"CPU": 0.0, "GPU": 0.0}, []
for node in ray.nodes():  # as Flower sizes its actor pool: per node
    resources = node.get("Resources") or {}
    if not node.get("Alive") or not resources:
        continue
    nodes += 1
    alive.append((node["NodeID"], node.get("NodeManagerAddress", "")))
    for key in totals:
        totals[key] += resources.get(key, 0.0)
    fit = int(resources.get("CPU", 0.0) // cpus)
    cpu_slots += fit
    if gpus > 0:
        fit = min(fit, int(resources.get("GPU", 0.0) // gpus))
    slots += fit
seen = []
if check and nodes > 1:  # a hospital trains on any node: each must see the same ledger folder
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0, max_retries=0)
    def look(check):
        import os

        def read(path):
            try:
                with open(path) as file:
                    return file.read(100)
            except OSError:
                return None

        key = check["key"]
        if not key:  # as a hospital on this node resolves it: by fedpriv's own rule, in the node's environment
            from fedpriv.privacy.chain import default_key_dir

            key = os.path.join(default_key_dir(), check["name"])
        from fedpriv.simulation import data_fingerprint

        return {"ledger": read(check["ledger"]), "key": read(key), "key_path": key,
                "data": [data_fingerprint(path) for _, path, _ in check["data"]]}

    refs = {look.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote(check):
            (node_id, ip) for node_id, ip in alive}
    ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=max(1.0, check["deadline"] - time.time()))
    for ref, (node_id, ip) in refs.items():
        entry = {"id": node_id, "ip": ip}
        if ref in ready:
            try:
                entry.update(ray.get(ref))
            except Exception as error:
                entry["error"] = type(error).__name__ + ": " + str(error).strip().splitlines()[-1][:200]
        else:
            entry["error"] = "it did not run the check in time"
        seen.append(entry)
try:  # Ray's private API: only informative, so its absence costs nothing
    session_dir = ray._private.worker.global_worker.node.get_session_dir_path()
except Exception:
    session_dir = ""
print(json.dumps({"gcs_address": ray.get_runtime_context().gcs_address, "nodes": nodes, "cpus": totals["CPU"],
                  "gpus": totals["GPU"], "slots": slots, "cpu_slots": cpu_slots, "session_dir": session_dir,
                  "seen": seen}))
ray.shutdown()
"""


def _nodes(entries: list[dict]) -> str:
    return ", ".join(f"{entry['ip'] or '?'} (node id {entry['id'][:16]})" for entry in entries)


def probe_ray_cluster(address: str, *, client_cpus: int, client_gpus: float,
                      env: Mapping[str, str] | None = None, timeout: float = 60.0,
                      ledger_dir: Path | None = None, ledger_setting: str = "federation.ledger_dir",
                      key_dir: Path | None = None, data: list[tuple[str, Path]] = ()) -> RayCluster:
    """Connect to the Ray cluster at `address` as the simulation will (same environment), in a child
    process bounded by `timeout` s, and check that it can host at least one hospital.

    Ray itself retries an unreachable address for many minutes; this turns that into one error.

    With `ledger_dir` (the hospitals' ledger folder, named by the setting `ledger_setting`) and a
    cluster of more than one node, it also checks that every node sees that folder and the ledger key
    folder: Flower's Ray backend runs a hospital on whichever node has room, so a node with a folder
    of its own would keep a second ledger and under-count that hospital's epsilon. A file of random
    content is written into each folder here, one small task pinned to each node reads it back at the
    same path, and the file is removed again. `key_dir`: the key folder at the same path on every
    node; None: each node's own FEDPRIV_KEY_DIR (else its user's config folder), as its hospitals
    resolve it. `data`: (setting, path) of what the hospitals load (a MedMNIST file, an image folder,
    an attributes CSV): each node must see it at the same path as it is here (:func:`data_fingerprint`).
    A node that sees something else is a ConfigError naming the setting and the node(s).
    """
    env = os.environ if env is None else env
    check, token, written, key_folder = "", "", [], None
    expected = [(setting, path, data_fingerprint(path)) for setting, path in data]  # as this machine sees it
    try:
        if ledger_dir is not None:
            token = secrets.token_hex(16)
            name = f"{_SHARED_CHECK_PREFIX}{token}"
            from fedpriv.privacy.chain import default_key_dir  # deferred: the watchdog imports this module

            key_folder = key_dir if key_dir is not None else default_key_dir(env)
            key_setting = _key_setting(ledger_dir, key_dir, ledger_setting)
            for folder, setting, mode in ((ledger_dir, ledger_setting, 0o777), (key_folder, key_setting, 0o700)):
                try:
                    folder.mkdir(parents=True, exist_ok=True, mode=mode)
                    (folder / name).write_text(token)
                    written.append(folder / name)
                except OSError as exc:
                    raise ConfigError(setting, str(folder), f"fedpriv cannot write a file there to check that every "
                                      f"node of the Ray cluster sees it ({exc.strerror or exc})",
                                      "make that folder writable") from None
            check = json.dumps({"ledger": str(ledger_dir / name), "key": str(key_dir / name) if key_dir else "",
                                "name": name, "data": [(setting, str(path), seen) for setting, path, seen in expected],
                                "deadline": time.time() + timeout - min(10.0, timeout / 4)})
        found = _run_probe(address, [str(client_cpus), str(client_gpus), check], env, timeout)
    finally:
        for path in written:
            path.unlink(missing_ok=True)
    cluster = RayCluster(address=address, gcs_address=found["gcs_address"], session_dir=found["session_dir"],
                         nodes=found["nodes"], cpus=found["cpus"], gpus=found["gpus"], hospital_slots=found["slots"])
    if cluster.hospital_slots < 1:
        # The GPU share is what no node can give when the CPU share alone would fit somewhere.
        key, value = ("federation.client_gpus", client_gpus) if found["cpu_slots"] > 0 \
            else ("federation.client_cpus", client_cpus)
        raise ConfigError(key, value, f"no node of the Ray cluster at {address} has that much to give one hospital "
                          f"({cluster.describe()})", "lower the per-hospital share, or add a node that has it")
    seen = found.get("seen") or []
    if seen:
        _check_shared(address, seen, token, ledger_dir, ledger_setting, key_dir, key_folder)
        _check_data(address, seen, expected)
        cluster = replace(cluster, shared=(str(ledger_dir), str(key_folder)))
    return cluster


def _key_setting(ledger_dir: Path, key_dir: Path | None, ledger_setting: str) -> str:
    """What names the key folder: the ledger's setting for one inside the ledger folder, else FEDPRIV_KEY_DIR."""
    from fedpriv.privacy.chain import KEY_DIR_ENV  # deferred: the watchdog imports this module

    return ledger_setting if key_dir is not None and key_dir.is_relative_to(ledger_dir) else KEY_DIR_ENV


def _check_shared(address: str, seen: list[dict], token: str, ledger_dir: Path, ledger_setting: str,
                  key_dir: Path | None, key_folder: Path) -> None:
    """Raise unless every node in `seen` (what the probe's tasks read) saw the files of `token`."""
    failed = [entry for entry in seen if "error" in entry]
    if failed:
        raise SimulationError(f"could not check that every node of the Ray cluster at {address} sees the ledger "
                              f"folder {ledger_dir}: on node {_nodes(failed[:3])} {failed[0]['error']}; nothing "
                              "was trained and no budget spent")
    why = ("a hospital trains on whichever node Ray gives it, so a node with a folder of its own would keep "
           "a ledger of its own and under-count that hospital's epsilon")
    blind = [entry for entry in seen if entry.get("ledger") != token]
    if blind:
        fix = ("put the ledger folder on storage that every node of the cluster mounts at this same path "
               f"(e.g. NFS) and point {ledger_setting} at it")
        if ledger_setting == "federation.ledger_run_dir":
            fix = ("put the run directory (hydra.run.dir) on storage that every node of the cluster mounts at this "
                   "same path, or use federation.ledger_scope=persistent with a federation.ledger_dir on such storage")
        raise ConfigError(ledger_setting, str(ledger_dir), f"{len(blind)} of the {len(seen)} nodes of the Ray "
                          f"cluster at {address} do not see this folder (a file fedpriv wrote there is not there "
                          f"for them): {_nodes(blind)}; {why}. Refused before any budget was spent", fix)
    blind = [entry for entry in seen if entry.get("key") != token]
    if blind:
        setting = _key_setting(ledger_dir, key_dir, ledger_setting)
        where = "; ".join(f"{_nodes([entry])} looks in {Path(entry.get('key_path', '')).parent}" for entry in blind)
        fix = ("put the key folder on storage that every node of the cluster mounts at this same path, and set "
               f"{setting} to it in the environment of this command and of each node's `ray start`")
        if setting == ledger_setting:  # a throw-away ledger's keys, in its own folder
            fix = "put the run directory (hydra.run.dir) on storage that every node mounts at this same path"
        raise ConfigError(setting, str(key_folder), f"{len(blind)} of the {len(seen)} nodes of the Ray cluster at "
                          f"{address} do not see this ledger key folder (a file fedpriv wrote there is not there "
                          f"for them): {where}; {why} (each with a key of its own). Refused before any budget "
                          "was spent", fix)


def data_fingerprint(path: str | Path) -> str | None:
    """What a node sees of data at `path`: a file's SHA-256, an image folder's listing (each file's
    relative path and size; not the pixels, for speed), None when nothing is there."""
    path, digest = Path(path), hashlib.sha256()
    try:
        if path.is_file():
            with open(path, "rb") as file:
                for chunk in iter(lambda: file.read(1 << 20), b""):
                    digest.update(chunk)
            return f"file {digest.hexdigest()}"
        if path.is_dir():
            for item in sorted(p for p in path.rglob("*") if p.is_file()):
                digest.update(f"{item.relative_to(path)}\0{item.stat().st_size}\n".encode())
            return f"folder {digest.hexdigest()}"
    except OSError:
        pass
    return None


def _check_data(address: str, seen: list[dict], expected: list[tuple[str, Path, str | None]]) -> None:
    """Raise unless every node in `seen` saw each (setting, path, fingerprint) of `expected` as this machine does."""
    for index, (setting, path, here) in enumerate(expected):
        blind = [entry for entry in seen if (entry.get("data") or [None] * len(expected))[index] != here]
        if blind:
            raise ConfigError(setting, str(path), f"{len(blind)} of the {len(seen)} nodes of the Ray cluster at "
                              f"{address} do not see this data as it is here (it is missing there, or holds other "
                              f"content): {_nodes(blind)}; a hospital Ray places on such a node could not load its "
                              "records, or would train on others. Refused before any budget was spent",
                              "put the same data at this same path on every node of the cluster (or on storage "
                              "every node mounts)")


def _run_probe(address: str, arguments: list[str], env: Mapping[str, str], timeout: float) -> dict:
    """Run the probe script in a child process bounded by `timeout` s; what it printed, as a dict."""
    command = [sys.executable, "-c", _PROBE, address, *arguments]
    process = subprocess.Popen(command, env={**env, RAY_ADDRESS_ENV: address}, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace",
                               start_new_session=True)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SimulationError(f"the Ray cluster at {address} did not answer within {timeout:.0f}s (federation."
                              f"ray_address or ${RAY_ADDRESS_ENV}); check that `ray start --head` runs there and "
                              "that this machine can reach it, or unset both for a local Ray") from None
    finally:
        if process.poll() is None:
            terminate_tree(process.pid, grace=2)
            process.wait(timeout=5)
    lines = out.strip().splitlines()
    if process.returncode != 0 or not lines:
        reason = next((line for line in reversed(err.strip().splitlines()) if line.strip()), "no output")
        raise SimulationError(f"could not attach to the Ray cluster at {address} (federation.ray_address or "
                              f"${RAY_ADDRESS_ENV}): {reason[:300]}")
    return json.loads(lines[-1])


def _shared_paths(config_json: str, run_dir: Path) -> tuple[Path, str, Path | None, list[tuple[str, Path]]]:
    """The simulated hospitals' ledger folder, the setting that names it, their key folder (None: each
    node's FEDPRIV_KEY_DIR, else its user's config folder), as :mod:`fedpriv.site` resolves them, and
    (setting, path) of the data files they load (none for synthetic data, which each generates)."""
    from fedpriv.app_config import CONFIG_KEY, RUN_DIR_KEY, config_from_run_config  # deferred: torch
    from fedpriv.data.medmnist import npz_filename  # deferred: torch; the watchdog imports us
    from fedpriv.site import simulation_ledger_key, simulation_ledger_path  # deferred: torch; the watchdog imports us

    cfg = config_from_run_config({CONFIG_KEY: config_json, RUN_DIR_KEY: str(run_dir)})
    ledger = simulation_ledger_path(cfg, run_dir)
    key = simulation_ledger_key(cfg, ledger)
    setting = "federation.ledger_run_dir" if cfg.federation.ledger_scope == "run" else "federation.ledger_dir"
    data, dataset = [], cfg.dataset
    if dataset.name == "imagefolder":
        data.append(("dataset.path", Path(dataset.path)))
    elif dataset.name != "synthetic":
        data.append(("dataset.root", Path(dataset.root) / npz_filename(dataset.name, dataset.size)))
    if dataset.attributes_csv:
        data.append(("dataset.attributes_csv", Path(dataset.attributes_csv)))
    return ledger.parent.absolute(), setting, key.parent.absolute() if key is not None else None, data


def check_local_gpu_share(client_gpus: float) -> None:
    """A GPU share for the hospitals of a local Ray needs a CUDA GPU here; without one, Flower's Ray
    backend would only fail inside the run ("ActorPool is empty"). Raises ConfigError."""
    if client_gpus <= 0:
        return
    import torch  # deferred: the watchdog imports this module and should start in milliseconds

    found = torch.cuda.device_count()
    if found < client_gpus:  # not even one hospital would fit
        raise ConfigError("federation.client_gpus", client_gpus,
                          f"this machine has {found} CUDA GPU{'s' * (found != 1)} for the local Ray",
                          "use federation.client_gpus=0 here, or attach to a Ray cluster with GPUs "
                          "(federation.ray_address)")


# Sweeps: one SuperLink (and one local Ray) for every job of a Hydra multirun (FEDPRIV_SHARED_RUNTIME).
SHARED_RUNTIME_ENV = "FEDPRIV_SHARED_RUNTIME"
SHARE_ALL, SHARE_SUPERLINK, SHARE_NONE = "superlink+ray", "superlink", "off"
SHARE_MODES = (SHARE_ALL, SHARE_SUPERLINK, SHARE_NONE)
_LOOPBACK_RAY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # a Ray of fedpriv's own binds 127.0.0.1 only
_RAY_HEAD_PORTS = ("dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port",
                   "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port",
                   "node-manager-port", "object-manager-port")
_RAY_HEAD_READY = "This command will now block forever"  # what `ray start --block` prints once the node runs


def share_mode(environ: Mapping[str, str] | None = None) -> str:
    """What the jobs of a multirun share: $FEDPRIV_SHARED_RUNTIME, by default "superlink+ray"."""
    value = (os.environ if environ is None else environ).get(SHARED_RUNTIME_ENV, "").strip().lower() or SHARE_ALL
    if value not in SHARE_MODES:
        raise ConfigError(SHARED_RUNTIME_ENV, value, "is not a way to share a sweep's runtime",
                          f"set it to one of: {', '.join(SHARE_MODES)} (or leave it unset)")
    return value


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports on loopback (all held open together while they are picked)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class LocalRayHead:
    """A one-node Ray cluster of fedpriv's own on loopback (`ray start --head --block`), for a sweep.

    `ray start --block` stays in the foreground as the parent of the node's processes (GCS, raylet,
    and the workers the raylet starts), in a session of its own: stopping its process tree stops the
    whole cluster, by PID. It has its own short temporary folder (Ray's socket paths must fit) and free
    ports, so it never meets another cluster on the machine; a watchdog stops it and removes that
    folder should fedpriv die without its clean-up (SIGKILL).
    """

    def __init__(self, env: Mapping[str, str], *, startup_timeout: float = 120.0) -> None:
        self.env = {**env, **_LOOPBACK_RAY}
        self.env.pop(RAY_ADDRESS_ENV, None)
        self.startup_timeout = startup_timeout
        self.temp_dir = Path(tempfile.mkdtemp(dir="/tmp", prefix="fpray"))
        self.log_path = self.temp_dir / "ray-start.log"
        self.process: subprocess.Popen | None = None
        self.watchdog: subprocess.Popen | None = None
        port, *others = free_ports(1 + len(_RAY_HEAD_PORTS))
        self.address = f"127.0.0.1:{port}"
        self.command = [executable("ray"), "start", "--head", "--block", f"--port={port}", "--include-dashboard=false",
                        "--node-ip-address=127.0.0.1", f"--temp-dir={self.temp_dir}",
                        f"--num-cpus={os.cpu_count() or 1}", "--disable-usage-stats",
                        *(f"--{flag}={value}" for flag, value in zip(_RAY_HEAD_PORTS, others, strict=True))]

    def start(self) -> LocalRayHead:
        with open(self.log_path, "wb") as log_file:
            self.process = subprocess.Popen(self.command, env=self.env, stdout=log_file, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True, cwd=self.temp_dir)
        try:
            self.watchdog = _start_watchdog(self.process, self.temp_dir, what="the Ray head")
            deadline = time.monotonic() + self.startup_timeout
            while _RAY_HEAD_READY not in self.log_path.read_text(errors="replace"):
                if self.process.poll() is not None:
                    raise SimulationError(f"`ray start --head` exited with code {self.process.returncode}:\n"
                                          + "\n".join(self.log_path.read_text(errors="replace").splitlines()[-15:]))
                if time.monotonic() > deadline:
                    raise SimulationError(f"the local Ray head did not start within {self.startup_timeout:.0f}s:\n"
                                          + "\n".join(self.log_path.read_text(errors="replace").splitlines()[-15:]))
                time.sleep(0.2)
        except BaseException:
            self.stop()
            raise
        log.info("Started a local Ray head for this sweep at %s (pid %d, folder %s)", self.address, self.process.pid,
                 self.temp_dir)
        return self

    def stop(self) -> None:
        """Stop every process of the cluster (SIGTERM, then SIGKILL) and remove its temporary folder."""
        if self.process is not None:
            terminate_tree(self.process.pid, grace=10, settle=STRAGGLERS_S)
            self.process.wait(timeout=5)
            self.process = None
        self.watchdog = _end_watchdog(self.watchdog)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


class SharedRuntime:
    """One SuperLink in simulation mode (and, mode "superlink+ray", one local Ray head) that the jobs of a
    Hydra multirun submit their runs to, one after the other, instead of each starting its own.

    Started on the first job's first use, reused by later jobs, stopped by :meth:`stop` (idempotent):
    fedpriv calls it when the multirun ends, when a job fails or is interrupted, and at interpreter exit.
    A job that attaches to a Ray cluster (federation.ray_address, $RAY_ADDRESS) gets a SuperLink pointed
    at that cluster: the SuperLink is restarted whenever a job's cluster differs from the previous job's,
    so no run lands on another cluster than its config asks for. A cluster the user gave is never stopped.
    """

    def __init__(self, mode: str = SHARE_ALL) -> None:
        self.mode = mode
        self.home: Path | None = None
        self.link: LocalSuperLink | None = None
        self.head: LocalRayHead | None = None
        self.runs = 0

    def superlink(self, ray_address: str, *, startup_timeout: float = 60.0) -> LocalSuperLink:
        """The SuperLink for a run on `ray_address` ("": a local Ray), started if there is none for it."""
        if self.link is not None and (self.link_key != ray_address or not self.link.running()):
            why = "asks for another Ray cluster" if self.link_key != ray_address else "found it stopped"
            log.info("This job %s: restarting the sweep's SuperLink", why)
            self.link.stop()
            self.link = None
        if self.link is not None:
            log.info("Reusing the sweep's SuperLink (pid %d, port %d)", self.link.process.pid, self.link.port)
            return self.link
        if self.home is None:
            self.home = Path(tempfile.mkdtemp(prefix="fedpriv-flwr-sweep-"))
            from fedpriv.app_config import write_app  # deferred: torch; the watchdog imports this module

            write_app(self.home / "app")
        address, extra = ray_address, {}
        if not ray_address and self.mode == SHARE_ALL:
            if self.head is None or self.head.process is None or self.head.process.poll() is not None:
                if self.head is not None:
                    self.head.stop()
                env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                       "FLWR_HOME": str(self.home), "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
                self.head = LocalRayHead(env)
                self.head.start()
            address, extra = self.head.address, _LOOPBACK_RAY
        link = LocalSuperLink(self.home, startup_timeout=startup_timeout, temporary_home=True, ray_address=address,
                              extra_env=extra)
        link.__enter__()
        self.link, self.link_key = link, ray_address
        log.info("Started the sweep's SuperLink (pid %d, port %d)%s; later jobs reuse it", link.process.pid,
                 link.port, f" on the local Ray head at {address}" if self.head is not None and not ray_address else "")
        return link

    def stop(self) -> None:
        """Stop the SuperLink and the Ray head this runtime started (each by its process tree) and remove
        the temporary folders; a Ray cluster the user gave is left running. Safe to call again."""
        try:
            if self.link is not None:
                self.link.stop()
                self.link = None
        finally:
            try:
                if self.head is not None:
                    self.head.stop()
                    self.head = None
            finally:
                if self.home is not None:
                    shutil.rmtree(self.home, ignore_errors=True)
                    self.home = None


_shared: SharedRuntime | None = None


def shared_runtime() -> SharedRuntime | None:
    """The runtime the jobs of this process's multirun share (created on first call, started on first use),
    or None when $FEDPRIV_SHARED_RUNTIME is "off"; :func:`stop_shared_runtime` stops it."""
    global _shared
    mode = share_mode()
    if mode == SHARE_NONE:
        return None
    if _shared is None:
        _shared = SharedRuntime(mode)
        atexit.register(stop_shared_runtime)
    return _shared


def stop_shared_runtime() -> bool:
    """Stop the sweep's shared runtime, if one was started (idempotent); whether one was running."""
    global _shared
    runtime, _shared = _shared, None
    if runtime is None:
        return False
    started = runtime.link is not None or runtime.head is not None
    runtime.stop()
    return started


def run_simulation(config_json: str, run_dir: Path, *, num_hospitals: int, client_cpus: int,
                   client_gpus: float = 0.0, ray_address: str = "", startup_timeout: float = 60.0,
                   attach_timeout: float = 60.0, runtime: SharedRuntime | None = None) -> None:
    """Run one federated simulation of `config_json`; outputs land in `run_dir`.

    `ray_address` (see :func:`ray_cluster_address`): a running Ray cluster to run it on, "" for a
    local Ray that is started and stopped with the SuperLink. `runtime`: a sweep's shared runtime to
    submit the run to (its SuperLink, and its local Ray head for `ray_address` ""), left running
    afterwards; None: a SuperLink of this run's own, stopped when the run ends.
    """
    # Imported here: the watchdog imports this module and should start in milliseconds.
    from fedpriv.app_config import CONFIG_KEY, RUN_DIR_KEY, write_app  # deferred: torch; the watchdog imports us

    run_dir = run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    if ray_address:
        # Before anything trains: every node of the cluster must see the hospitals' ledger folder and key folder.
        ledger_dir, ledger_setting, key_dir, data = _shared_paths(config_json, run_dir)
        cluster = probe_ray_cluster(ray_address, client_cpus=client_cpus, client_gpus=client_gpus,
                                    timeout=attach_timeout, ledger_dir=ledger_dir, ledger_setting=ledger_setting,
                                    key_dir=key_dir, data=data)
        log.info("Attached to the Ray cluster at %s (head %s; %s); fedpriv will not stop it",
                 ray_address, cluster.gcs_address, cluster.describe())
        if cluster.shared:
            log.info("Every node of the Ray cluster sees the ledger folder %s and the key folder %s", *cluster.shared)
    else:
        check_local_gpu_share(client_gpus)
    federation = (f"num-supernodes={num_hospitals} client-resources-num-cpus={client_cpus} "
                  f"client-resources-num-gpus={client_gpus:g}")
    run_config = {CONFIG_KEY: config_json, RUN_DIR_KEY: str(run_dir)}
    if runtime is not None:
        link = runtime.superlink(ray_address, startup_timeout=startup_timeout)
        runtime.runs += 1
        config_path = link.home / f"run-config-{runtime.runs}.toml"
        config_path.write_text(tomli_w.dumps(run_config))
        try:
            _submit(link, link.home / "app", config_path, federation, run_dir, shared=True)
        finally:
            config_path.unlink(missing_ok=True)
        return
    home = Path(tempfile.mkdtemp(prefix="fedpriv-flwr-"))
    try:
        write_app(home / "app")
        config_path = home / "run-config.toml"
        config_path.write_text(tomli_w.dumps(run_config))
        with LocalSuperLink(home, startup_timeout=startup_timeout, temporary_home=True,
                            ray_address=ray_address) as link:
            _submit(link, home / "app", config_path, federation, run_dir, shared=False)
    finally:
        shutil.rmtree(home, ignore_errors=True)


SHARED_LOG_NOTE = "fedpriv: this run used a SuperLink shared by the jobs of its sweep"


def _submit(link: LocalSuperLink, app: Path, config_path: Path, federation: str, run_dir: Path, *,
            shared: bool) -> None:
    """Submit one run to `link` with `flwr run --stream`; copy its SuperLink log into the run directory.

    With a `shared` SuperLink, only the part of its log written while this run was submitted and ran
    is copied, under a first line that names the SuperLink (pid, port) and says so.
    """
    command = [executable("flwr"), "run", str(app), CONNECTION, "--run-config", str(config_path),
               "--federation-config", federation, "--stream"]
    offset = link.log_path.stat().st_size if shared and link.log_path.exists() else 0
    try:
        returncode = stream_flower(command, env=link.env, cwd=link.home)
    finally:
        log_copy = run_dir / rundir.SUPERLINK_LOG
        if shared:
            with open(link.log_path, "rb") as source, open(log_copy, "wb") as target:
                target.write((f"{SHARED_LOG_NOTE} (pid {link.process.pid if link.process else '?'}, port {link.port}); "
                              "below is the part of its log written during this run\n").encode())
                source.seek(offset)
                shutil.copyfileobj(source, target)
        else:
            shutil.copy(link.log_path, log_copy)
    if returncode != 0 or not rundir.finished(run_dir):
        raise SimulationError(f"the federated run did not finish (flwr run exited {returncode}); "
                              f"see {log_copy}")


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
