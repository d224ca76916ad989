"""Flower's deployment processes, as commands and as processes this module owns and stops by PID.

The command builders (:func:`superlink_command`, :func:`supernode_command`, :func:`run_command`)
spell out the exact `flower-superlink`, `flower-supernode` and `flwr` command lines of Flower 1.42,
so the CLI, the docs and the rehearsal agree. :class:`ProcessSet` starts processes in their own
sessions and stops each one, with every descendant it spawned, by PID
(:func:`fedpriv.process_tree.terminate_tree`), never by name.
"""

from __future__ import annotations

import json
import logging
import math
import os
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from fedpriv.app_config import CONFIG_KEY, OVERRIDES_KEY, RUN_DIR_KEY
from fedpriv.errors import FedprivError
from fedpriv.process_tree import alive, descendants, start_time, terminate_tree
from fedpriv.simulation import executable

log = logging.getLogger(__name__)

CONNECTION = "fedpriv-deploy"
DEFAULT_SUPERLINK_PORT = 8000
DEFAULT_SUPERNODE_PORT = 9094


class DeploymentError(FedprivError):
    """Raised when a deployment process could not be started, or a step of the federation failed."""


def flower_env(home: Path) -> dict[str, str]:
    """Environment for Flower processes: a private FLWR_HOME and this environment's scripts first.

    The SuperLink and SuperNodes start `flower-superexec`, `flwr-serverapp` and `flwr-clientapp`
    by name, so this environment's bin folder must lead PATH.
    """
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, "FLWR_HOME": str(home), "FLWR_DISABLE_UPDATE_CHECK": "1"}


def printable(command: Sequence[str]) -> list[str]:
    """`command` as a line that works without this environment on PATH (e.g. in a systemd unit).

    Flower's processes start `flower-superexec`, `flwr-clientapp` and fedpriv's launchers by name, so
    the line sets PATH to this environment's bin folder first; the executables are absolute already.
    """
    path = os.pathsep.join([str(Path(sys.executable).parent), "/usr/local/bin", "/usr/bin", "/bin"])
    return ["/usr/bin/env", f"PATH={path}", *command]


def write_flwr_config(home: Path, address: str, root_certificates: Path, connection: str = CONNECTION) -> Path:
    """`$FLWR_HOME/config.toml` naming one TLS connection to the SuperLink (used by `flwr ...`)."""
    home.mkdir(parents=True, exist_ok=True)
    path = home / "config.toml"
    path.write_text(tomli_w.dumps({"superlink": {
        "default": connection,
        connection: {"address": address, "root-certificates": str(Path(root_certificates).resolve())},
    }}))
    return path


def write_run_config(path: Path, *, run_dir: Path, config_json: str = "", overrides: str = "") -> Path:
    """A TOML run-config file for `flwr run --run-config FILE` (JSON config or Hydra overrides)."""
    values = {RUN_DIR_KEY: str(run_dir)}
    if config_json:
        values[CONFIG_KEY] = config_json
    if overrides:
        values[OVERRIDES_KEY] = overrides
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(values))
    return path


def _toml_value(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"node-config {key}: {value} is not a finite number")
        return repr(value)
    text = str(value)
    if '"' not in text:
        return json.dumps(text)  # a TOML basic string: JSON's escapes are valid TOML
    # Flower splits the node config with a regex that ends a "..." value at the next double quote.
    if "'" in text or "\n" in text:
        raise ValueError(f"node-config {key}: {text!r} holds both kinds of quotes (or a line break)")
    return f"'{text}'"  # a TOML literal string: taken as is


def node_config_string(values: Mapping[str, Any]) -> str:
    """The `--node-config` argument for `values`: `key="text" key=3 ...` (TOML values, None skipped)."""
    return " ".join(f"{key}={_toml_value(key, value)}" for key, value in values.items() if value is not None)


def superlink_command(*, ca_certificate: Path, certificate: Path, key: Path, host: str = "127.0.0.1",
                      port: int = DEFAULT_SUPERLINK_PORT, database: Path | None = None) -> list[str]:
    """`flower-superlink` with TLS and SuperNode authentication on, using this environment's packages.

    It listens on loopback by default: its one port also serves the Control API, which open-source
    Flower does not authenticate, so hospitals reach it only through the proxy (proxy.py).
    """
    command = [executable("flower-superlink"),
               "--ssl-ca-certfile", str(ca_certificate), "--ssl-certfile", str(certificate), "--ssl-keyfile", str(key),
               "--enable-supernode-auth", "--host", host, "--port", str(port),
               "--disable-runtime-dependency-installation"]
    if database is not None:
        command += ["--database", str(database)]
    return command


def supernode_command(*, superlink: str, node_config: Mapping[str, Any], root_certificates: Path | None,
                      auth_key: Path | None, port: int = DEFAULT_SUPERNODE_PORT, insecure: bool = False,
                      max_retries: int | None = None, max_wait_time: float | None = None,
                      client_certificate: Path | None = None, client_key: Path | None = None) -> list[str]:
    """One hospital's SuperNode: TLS to the coordinator's proxy, authenticated by its private key.

    With `client_certificate` and `client_key` it is `fedpriv-supernode` (flower-supernode that
    presents the hospital's TLS client certificate, which the proxy demands); without them plain
    `flower-supernode`.
    """
    if (client_certificate is None) != (client_key is None):
        raise ValueError("a TLS client certificate needs its key, and the other way round")
    if client_certificate is not None:
        command = [executable("fedpriv-supernode"), "--tls-client-certificate", str(client_certificate),
                   "--tls-client-key", str(client_key)]
    else:
        command = [executable("flower-supernode")]
    command += ["--superlink", superlink]
    if insecure:
        command.append("--insecure")
    if root_certificates is not None:
        command += ["--root-certificates", str(root_certificates)]
    if auth_key is not None:
        command += ["--auth-supernode-private-key", str(auth_key)]
    # Process isolation: the SuperNode starts no app code itself; fedpriv-hospital-exec (next to it)
    # starts only the apps the hospital approved (fedpriv.deployment.approval).
    command += ["--isolation", "process", "--port", str(port), "--node-config", node_config_string(node_config)]
    if max_retries is not None:
        command += ["--max-retries", str(max_retries)]
    if max_wait_time is not None:
        command += ["--max-wait-time", str(max_wait_time)]
    return command


def hospital_exec_command(*, approved_apps: Iterable[str], port: int = DEFAULT_SUPERNODE_PORT,
                          unreadable: Iterable[Path] = ()) -> list[str]:
    """`fedpriv-hospital-exec`: the hospital's SuperExec, on its SuperNode's local Runtime API (loopback).

    `unreadable`: the SuperNode's private keys; the launcher refuses to start if it can open one.
    """
    command = [executable("fedpriv-hospital-exec"), "--approved-apps", ",".join(approved_apps),
               "--runtime-api-address", f"127.0.0.1:{port}", "--insecure"]
    secrets = [str(Path(path).resolve()) for path in unreadable]
    return command + (["--unreadable", ",".join(secrets)] if secrets else [])


def register_command(public_key: Path, name: str, connection: str = CONNECTION) -> list[str]:
    """`flwr supernode register KEY CONNECTION --name NAME --format json`."""
    return [executable("flwr"), "supernode", "register", str(public_key), connection, "--name", name,
            "--format", "json"]


def run_command(app_dir: Path, run_config: Path, connection: str = CONNECTION) -> list[str]:
    """`flwr run APP CONNECTION --run-config FILE --stream` (follows the run until it ends)."""
    return [executable("flwr"), "run", str(app_dir), connection, "--run-config", str(run_config), "--stream"]


@dataclass
class ManagedProcess:
    """One process started by a :class:`ProcessSet`, with its log file and every process it spawned."""

    name: str
    process: subprocess.Popen
    log_path: Path
    seen: set[tuple[int, float]] = field(default_factory=set)  # (pid, start time) of it and its descendants

    @property
    def pid(self) -> int:
        return self.process.pid

    def running(self) -> bool:
        return self.process.poll() is None

    def note_descendants(self) -> None:
        """Remember the process and its current descendants, to stop (and check) them all at the end."""
        for pid in (self.pid, *descendants(self.pid)):
            started = start_time(pid)
            if started is not None:
                self.seen.add((pid, started))

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait(self, timeout: float) -> int:
        """Wait for the process to end by itself; its exit code (DeploymentError on timeout)."""
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise DeploymentError(f"{self.name} did not exit within {timeout:.0f}s; see {self.log_path}") from None


class ProcessSet:
    """Processes started for one deployment; on exit (also on error or Ctrl-C) all are stopped by PID."""

    def __init__(self, env: Mapping[str, str], *, grace: float = 10.0) -> None:
        self.env = dict(env)
        self.grace = grace
        self.processes: list[ManagedProcess] = []

    def start(self, name: str, command: Sequence[str], log_path: Path, *, cwd: Path | None = None,
              env: Mapping[str, str] | None = None) -> ManagedProcess:
        """Start `command` in its own session (Ctrl-C in a terminal does not reach it; we stop it)."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log_file:
            process = subprocess.Popen(list(command), env=dict(env or self.env), stdout=log_file,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       start_new_session=True, cwd=cwd)
        managed = ManagedProcess(name, process, log_path)
        managed.note_descendants()
        self.processes.append(managed)
        log.info("started %s (pid %d): %s", name, process.pid, " ".join(command))
        return managed

    def seen(self) -> set[tuple[int, float]]:
        """Every process (pid, start time) started here or seen as a descendant so far."""
        self.note_descendants()
        return set().union(*(p.seen for p in self.processes))

    def leftovers(self) -> list[int]:
        """PIDs of processes started here (or their descendants) that still run."""
        return sorted(pid for pid, started in self.seen() if start_time(pid) == started)

    def note_descendants(self) -> None:
        """Remember the current descendants of every running process (call it while they work)."""
        for managed in self.processes:
            if managed.running():
                managed.note_descendants()

    def stop(self, managed: ManagedProcess) -> None:
        """Stop one process and everything it spawned (SIGTERM, then SIGKILL after the grace period)."""
        started = time.monotonic()
        if managed.running():
            managed.note_descendants()
            terminate_tree(managed.pid, grace=self.grace)
        # Descendants re-parented away from the tree (their parent died first): end those we saw,
        # unless the PID now belongs to another process (checked by start time).
        for identity in sorted(managed.seen):
            if alive(identity):
                terminate_tree(identity[0], grace=self.grace)
        try:
            managed.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            log.warning("%s (pid %d) is still running after SIGKILL", managed.name, managed.pid)
        log.info("stopped %s (pid %d) in %.1fs", managed.name, managed.pid, time.monotonic() - started)

    def stop_all(self) -> None:
        """Stop every process, the most recently started first."""
        for managed in reversed(self.processes):
            self.stop(managed)

    def __enter__(self) -> ProcessSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def superlink_ready(address: str, ca_certificate: Path) -> bool:
    """True if the SuperLink at `address` answers its health check over TLS verified by the CA."""
    context = ssl.create_default_context(cafile=str(ca_certificate))
    try:
        with urllib.request.urlopen(f"https://{address}/health", timeout=2, context=context) as response:
            return response.status == 200
    except OSError:
        return False


def wait_until_ready(process: ManagedProcess, name: str, ready, timeout: float, what: str = "become ready") -> None:
    """Block until ``ready()``; DeploymentError naming ``name`` if the process exits or the time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process.running():
            raise DeploymentError(f"{name} exited with code {process.process.returncode}; "
                                  f"see {process.log_path}:\n{process.log_tail()}")
        if ready():
            return
        time.sleep(0.25)
    raise DeploymentError(f"{name} did not {what} within {timeout:.0f}s; see {process.log_path}")


def wait_for_superlink(link: ManagedProcess, address: str, ca_certificate: Path, timeout: float = 60.0) -> None:
    """Block until the SuperLink is healthy; DeploymentError if it exits or times out."""
    wait_until_ready(link, "flower-superlink", lambda: superlink_ready(address, ca_certificate), timeout)


def _flwr_json(command: list[str], env: Mapping[str, str], timeout: float) -> dict:
    completed = subprocess.run(command, env=dict(env), capture_output=True, text=True, timeout=timeout,
                               stdin=subprocess.DEVNULL)
    start = completed.stdout.find("{")
    try:
        result = json.loads(completed.stdout[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        result = {}
    if completed.returncode != 0 or not result.get("success"):
        detail = (completed.stdout + completed.stderr).strip().splitlines()[-5:]
        raise DeploymentError(f"`{' '.join(command[1:])}` failed (exit {completed.returncode}): {' '.join(detail)}")
    return result


def register_supernode(public_key: Path, name: str, env: Mapping[str, str], *, connection: str = CONNECTION,
                       timeout: float = 60.0) -> int:
    """Register a hospital's public key with the SuperLink under `name`; the node id it gets."""
    return int(_flwr_json(register_command(public_key, name, connection), env, timeout)["node-id"])


def online_nodes(env: Mapping[str, str], *, connection: str = CONNECTION, timeout: float = 60.0) -> set[int]:
    """Node ids the SuperLink currently lists as online."""
    result = _flwr_json([executable("flwr"), "supernode", "list", connection, "--format", "json"], env, timeout)
    return {int(node["node-id"]) for node in result.get("nodes", []) if node.get("status") == "online"}
