"""`fedpriv` on a Ray cluster that is already running: it attaches, runs there, and leaves it running.

A real one-node cluster is started with `ray start --head` on loopback, with its own temporary folder
and ports, and stopped by PID at the end (never `ray stop`, which would stop every cluster of this
user). `ray start` daemonises: its processes are re-parented to pytest (tests/conftest.py makes pytest
a child subreaper), so the fixture finds them as new descendants of pytest.

Ray swaps a loopback node address for the machine's own and listens on every interface unless
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 ("no multi-machine clusters"): with it, in the cluster's and the
run's environment alike, the cluster binds 127.0.0.1 only.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from fedpriv import rundir
from fedpriv.errors import ConfigError
from fedpriv.process_tree import alive, descendants, processes_mentioning, terminate_tree
from fedpriv.simulation import SimulationError, executable, probe_ray_cluster

pytestmark = [pytest.mark.slow, pytest.mark.processes]

LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
TINY = ["dataset=synthetic", "dataset.num_samples=240", "federation=iid", "train.batch_size=16", "train.local_epochs=1",
        "model.width=4", "strategy.num_rounds=1", "strategy.client_evaluate=false", "federation.num_hospitals=2",
        "federation.ledger_scope=run"]


@dataclass
class Cluster:
    address: str
    temp_dir: Path
    processes: list[psutil.Process]  # everything `ray start` left running

    def logs(self) -> Path:
        return self.temp_dir / "session_latest" / "logs"


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _descendants() -> dict[int, psutil.Process]:
    return {p.pid: p for p in psutil.Process().children(recursive=True)}


def _stop(processes: list[psutil.Process]) -> None:
    """SIGTERM each (by PID, start time checked by psutil), SIGKILL what is left after 10 s."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        for process in processes:
            try:
                process.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        _, processes = psutil.wait_procs(processes, timeout=wait)
        if not processes:
            return


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Cluster]:
    temp_dir = Path(tempfile.mkdtemp(dir="/tmp", prefix="fpray"))  # short: Ray's socket paths must fit
    port, *others = _free_ports(9)
    before = set(_descendants())
    command = [executable("ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
               f"--temp-dir={temp_dir}", "--num-cpus=2", "--num-gpus=0", "--include-dashboard=false",
               "--disable-usage-stats", "--object-store-memory=100000000",
               *(f"--{flag}={value}" for flag, value in zip(
                   ("dashboard-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                    "ray-client-server-port", "metrics-export-port", "runtime-env-agent-port", "node-manager-port",
                    "object-manager-port"), others))]
    cluster = Cluster(f"127.0.0.1:{port}", temp_dir, [])
    try:
        started = subprocess.run(command, env={**os.environ, **LOOPBACK}, capture_output=True, text=True,
                                 timeout=300)
        cluster.processes = [p for pid, p in _descendants().items() if pid not in before]
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        assert cluster.processes, "ray start left no process running"
        yield cluster
    finally:
        # The cluster, the workers its raylet started since, and whatever else names its folder.
        left = {p.pid: p for p in cluster.processes}
        for process in cluster.processes:
            try:
                left.update((child.pid, child) for child in process.children(recursive=True))
            except psutil.NoSuchProcess:
                pass
        for pid in processes_mentioning(str(temp_dir)):
            try:
                left.setdefault(pid, psutil.Process(pid))
            except psutil.NoSuchProcess:
                pass
        _stop([process for pid, process in left.items() if pid not in before])
        shutil.rmtree(temp_dir, ignore_errors=True)


def _actor_logs(cluster: Cluster) -> set[Path]:
    """The cluster's worker logs of Flower's ClientApp actors (Ray writes the actor's class into them)."""
    return {log for log in cluster.logs().glob("worker-*.out")
            if ":actor_name:ClientAppActor" in log.read_text(errors="replace")}


def _running(processes: list[psutil.Process]) -> list[int]:
    return [p.pid for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_a_federation_runs_on_a_running_ray_cluster_and_leaves_it_running(ray_cluster, tmp_path):
    run_dir = tmp_path / "run"
    cluster_pids = _running(ray_cluster.processes)
    env = {**os.environ, **LOOPBACK, "RAY_ADDRESS": ray_cluster.address}  # the standard variable
    completed = subprocess.run([sys.executable, "-m", "fedpriv.cli.main", *TINY, f"hydra.run.dir={run_dir}"],
                               cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-4000:]
    assert f"Attached to the Ray cluster at {ray_cluster.address}" in output
    assert rundir.read_result(run_dir)["ray_address"] == ray_cluster.address
    assert f"ray_address: {ray_cluster.address}" in (run_dir / rundir.CONFIG).read_text()
    # The cluster ran the hospitals: its own session logs hold the run's ClientApp actors.
    assert _actor_logs(ray_cluster), sorted(p.name for p in ray_cluster.logs().iterdir())
    # ... and it is still running, every process of it, and answering.
    assert _running(ray_cluster.processes) == cluster_pids
    probed = probe_ray_cluster(ray_cluster.address, client_cpus=1, client_gpus=0, env=env, timeout=120)
    assert probed.session_dir.startswith(str(ray_cluster.temp_dir)) and probed.cpus == 2


def test_stopping_an_attached_run_stops_what_fedpriv_started_and_nothing_of_the_cluster(ray_cluster, tmp_path):
    cluster_pids = _running(ray_cluster.processes)
    actors_before = _actor_logs(ray_cluster)
    env = {**os.environ, **LOOPBACK, "RAY_ADDRESS": ray_cluster.address}
    log_path = tmp_path / "fedpriv.log"
    seen: set[int] = set()
    with open(log_path, "w") as log_file:
        process = subprocess.Popen([sys.executable, "-m", "fedpriv.cli.main", *TINY, "strategy.num_rounds=50",
                                    f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, env=env,
                                   stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        # Until the run's hospitals exist on the cluster: then Ctrl-C, while Ray runs them.
        while process.poll() is None and not _actor_logs(ray_cluster) - actors_before and time.monotonic() < deadline:
            seen |= set(descendants(process.pid))
            time.sleep(0.5)
        assert process.poll() is None, log_path.read_text()[-3000:]
        seen |= set(descendants(process.pid))
        process.send_signal(signal.SIGINT)
        code = process.wait(timeout=180)
    finally:
        if process.poll() is None:
            terminate_tree(process.pid, grace=5)
            process.wait(timeout=10)
    output = log_path.read_text()
    assert code == 130, output[-3000:]  # EXIT_INTERRUPTED
    assert seen and not [pid for pid in seen if alive(pid)], output[-3000:]  # what fedpriv started is stopped
    assert _running(ray_cluster.processes) == cluster_pids  # ... and every process of the cluster still runs
    probe_ray_cluster(ray_cluster.address, client_cpus=1, client_gpus=0, env=env, timeout=120)  # and answers


def test_a_gpu_share_the_cluster_cannot_give_is_one_config_error(ray_cluster):
    env = {**os.environ, **LOOPBACK}
    with pytest.raises(ConfigError) as error:
        probe_ray_cluster(ray_cluster.address, client_cpus=1, client_gpus=0.5, env=env, timeout=120)
    assert error.value.key == "federation.client_gpus" and "0 GPUs" in str(error.value)


def test_an_unreachable_cluster_is_one_error_within_the_time_limit():
    port, = _free_ports(1)  # nothing listens there: Ray alone retries for many minutes
    address = f"127.0.0.1:{port}"
    with pytest.raises(SimulationError) as error:
        probe_ray_cluster(address, client_cpus=1, client_gpus=0, env={**os.environ, **LOOPBACK}, timeout=15)
    message = str(error.value)
    assert f"Ray cluster at {address}" in message and "\n" not in message
    assert not processes_mentioning(address)  # the probe was stopped, not left retrying
