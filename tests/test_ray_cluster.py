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
import shlex
import shutil
import signal
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
from fedpriv.simulation import SimulationError, executable, free_ports, probe_ray_cluster

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


def _descendants() -> dict[int, psutil.Process]:
    return {p.pid: p for p in psutil.Process().children(recursive=True)}


def _stop(processes: list[psutil.Process]) -> None:
    """SIGTERM each (by PID, start time checked by psutil), SIGKILL what is left after 3 s (Ray's GCS
    server and raylet ignore SIGTERM; a test cluster has nothing to save)."""
    for sig, wait in ((signal.SIGTERM, 3), (signal.SIGKILL, 5)):
        for process in processes:
            try:
                process.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        _, processes = psutil.wait_procs(processes, timeout=wait)
        if not processes:
            return


_PORT_FLAGS = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
               "runtime-env-agent-port", "node-manager-port", "object-manager-port")
_HEAD_PORT_FLAGS = ("dashboard-port", "ray-client-server-port", *_PORT_FLAGS)


def _node_flags(host: str, temp_dir: Path, flags: tuple[str, ...], ports: list[int], cpus: int) -> list[str]:
    """`ray start` flags of a node at `host` with its own folder and free ports (none left to Ray)."""
    return [f"--node-ip-address={host}", f"--temp-dir={temp_dir}", f"--num-cpus={cpus}", "--num-gpus=0",
            "--disable-usage-stats", "--object-store-memory=100000000",
            *(f"--{flag}={value}" for flag, value in zip(flags, ports, strict=True))]


def _start_head(cluster: Cluster, cpus: int = 2, host: str = "127.0.0.1", env: dict[str, str] = LOOPBACK) -> None:
    """`ray start --head` at `host` for `cluster` (its temp_dir set; its address is set here), with `env`
    added to this environment: what it left running joins the cluster's processes."""
    before = set(_descendants())
    port, *others = free_ports(1 + len(_HEAD_PORT_FLAGS))
    cluster.address = f"{host}:{port}"
    command = [executable("ray"), "start", "--head", f"--port={port}", "--include-dashboard=false",
               *_node_flags(host, cluster.temp_dir, _HEAD_PORT_FLAGS, others, cpus)]
    started = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    cluster.processes += [p for pid, p in _descendants().items() if pid not in before]
    assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
    assert cluster.processes, "ray start left no process running"


def _stop_cluster(cluster: Cluster, before: set[int], folders: list[Path]) -> None:
    """Stop the cluster's processes, the workers its raylets started since, and whatever else names one of
    its `folders`; then remove those folders."""
    left = {p.pid: p for p in cluster.processes}
    for process in cluster.processes:
        try:
            left.update((child.pid, child) for child in process.children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    for folder in folders:
        for pid in processes_mentioning(str(folder)):
            try:
                left.setdefault(pid, psutil.Process(pid))
            except psutil.NoSuchProcess:
                pass
    _stop([process for pid, process in left.items() if pid not in before])
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Cluster]:
    temp_dir = Path(tempfile.mkdtemp(dir="/tmp", prefix="fpray"))  # short: Ray's socket paths must fit
    before = set(_descendants())
    cluster = Cluster("", temp_dir, [])
    try:
        _start_head(cluster)
        yield cluster
    finally:
        _stop_cluster(cluster, before, [temp_dir])


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
    port, = free_ports(1)  # nothing listens there: Ray alone retries for many minutes
    address = f"127.0.0.1:{port}"
    with pytest.raises(SimulationError) as error:
        probe_ray_cluster(address, client_cpus=1, client_gpus=0, env={**os.environ, **LOOPBACK}, timeout=5)
    message = str(error.value)
    assert f"Ray cluster at {address}" in message and "\n" not in message
    assert not processes_mentioning(address)  # the probe was stopped, not left retrying


# ------------------------------------------------------------------ a cluster of two nodes

TWO_NODES_HOST = "127.0.0.2"  # loopback, but not an address Ray swaps for the machine's own
MULTI_NODE = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}  # Linux's default, whatever this environment says

@dataclass
class TwoNodes:
    cluster: Cluster  # its processes: the head's and the second node's
    shared: Path  # a folder both nodes see
    blind: Path  # a folder the second node does not see: a tmpfs of its own is mounted over it there
    blind_keys: Path  # the same, for a key folder


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoNodes]:
    """A head and a second node (`ray start --address=HEAD --block`) on this machine, each with its own
    folder and ports. The second node runs in a mount namespace of its own, where a tmpfs hides the
    `blind` folders: to it they are other, empty folders at the same paths, as on a node whose disk
    holds its own folder there.

    A second node refuses to start under LOOPBACK ("no multi-machine clusters"), and without it Ray
    swaps the address 127.0.0.1 for the machine's own (which the head, bound to loopback, would not
    answer): both nodes use 127.0.0.2, a loopback address Ray keeps, and listen on every interface."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare(1): the second node mounts a folder of its own over the ledger folder")
    folders = tmp_path_factory.mktemp("two-nodes")
    nodes = TwoNodes(Cluster("", Path(tempfile.mkdtemp(dir="/tmp", prefix="fpray")), []), folders / "shared",
                     folders / "blind", folders / "blind-keys")
    for folder in (nodes.shared, nodes.blind, nodes.blind_keys):
        folder.mkdir()
    second_dir = Path(tempfile.mkdtemp(dir="/tmp", prefix="fpray2"))
    before = set(_descendants())
    second: subprocess.Popen | None = None
    env = {**os.environ, **MULTI_NODE}
    try:
        _start_head(nodes.cluster, cpus=1, host=TWO_NODES_HOST, env=MULTI_NODE)
        start = shlex.join([executable("ray"), "start", f"--address={nodes.cluster.address}", "--block",
                            *_node_flags(TWO_NODES_HOST, second_dir, _PORT_FLAGS, free_ports(len(_PORT_FLAGS)), 1)])
        mounts = " && ".join(f"mount -t tmpfs tmpfs {shlex.quote(str(folder))}"
                             for folder in (nodes.blind, nodes.blind_keys))
        second_env = {**os.environ, **MULTI_NODE}
        with open(folders / "second-node.log", "wb") as log_file:
            second = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                                       f"{mounts} && exec {start}"], env=second_env, stdin=subprocess.DEVNULL,
                                      stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 240
        while probe_ray_cluster(nodes.cluster.address, client_cpus=1, client_gpus=0, env=env,
                                timeout=120).nodes < 2:
            assert second.poll() is None, (f"the second node's `ray start` exited with {second.returncode}: "
                                           f"{(folders / 'second-node.log').read_text(errors='replace')[-3000:]}")
            assert time.monotonic() < deadline, "the second node did not join the cluster"
            time.sleep(1)
        yield nodes
    finally:
        if second is not None and second.poll() is None:  # `ray start --block` and what it started
            nodes.cluster.processes.append(psutil.Process(second.pid))
        _stop_cluster(nodes.cluster, before, [second_dir, nodes.cluster.temp_dir])
        if second is not None:
            second.wait(timeout=10)


def test_a_node_that_does_not_see_the_ledger_folder_is_refused_before_any_budget_is_spent(two_nodes):
    env = {**os.environ, **MULTI_NODE}
    with pytest.raises(ConfigError) as error:
        probe_ray_cluster(two_nodes.cluster.address, client_cpus=1, client_gpus=0, env=env, timeout=120,
                          ledger_dir=two_nodes.blind)
    message = str(error.value)
    assert error.value.key == "federation.ledger_dir" and error.value.value == str(two_nodes.blind)
    assert "1 of the 2 nodes" in message and f"{TWO_NODES_HOST} (node id " in message and "\n" not in message
    assert "same path" in error.value.fix
    assert not list(two_nodes.blind.iterdir())  # no ledger, and the check's own file is gone


def test_a_folder_every_node_sees_passes_and_the_probe_reports_both_nodes(two_nodes):
    env = {**os.environ, **MULTI_NODE}
    cluster = probe_ray_cluster(two_nodes.cluster.address, client_cpus=1, client_gpus=0, env=env, timeout=120,
                                ledger_dir=two_nodes.shared)
    assert cluster.nodes == 2 and cluster.cpus == 2
    assert cluster.shared == (str(two_nodes.shared), os.environ["FEDPRIV_KEY_DIR"])
    assert not list(two_nodes.shared.iterdir())  # the check left nothing behind
    assert not [p for p in Path(os.environ["FEDPRIV_KEY_DIR"]).glob(".fedpriv-shared-check-*")]


def test_data_a_node_does_not_see_as_it_is_here_is_refused(two_nodes):
    """A hospital Ray places on a node without the data (or with other data at that path) could not
    load its records, or would train on others: the probe compares what each node sees with this machine."""
    env = {**os.environ, **MULTI_NODE}
    hidden = two_nodes.blind / "pneumoniamnist.npz"  # under the tmpfs the second node mounts over the folder
    hidden.write_bytes(b"the data")
    try:
        with pytest.raises(ConfigError) as error:
            probe_ray_cluster(two_nodes.cluster.address, client_cpus=1, client_gpus=0, env=env, timeout=120,
                              ledger_dir=two_nodes.shared, data=[("dataset.root", hidden)])
    finally:
        hidden.unlink()
    assert (error.value.key, error.value.value) == ("dataset.root", str(hidden))
    assert "1 of the 2 nodes" in str(error.value) and f"{TWO_NODES_HOST} (node id " in str(error.value)
    assert "same path on every node" in error.value.fix
    seen = two_nodes.shared / "images"  # a folder every node sees passes
    (seen / "normal").mkdir(parents=True)
    (seen / "normal" / "1.png").write_bytes(b"png")
    try:
        cluster = probe_ray_cluster(two_nodes.cluster.address, client_cpus=1, client_gpus=0, env=env, timeout=120,
                                    ledger_dir=two_nodes.shared, data=[("dataset.path", seen)])
    finally:
        shutil.rmtree(seen)
    assert cluster.nodes == 2


def test_a_data_fingerprint_tells_missing_changed_and_moved_data(tmp_path):
    from fedpriv.simulation import data_fingerprint

    file = tmp_path / "data.npz"
    assert data_fingerprint(file) is None
    file.write_bytes(b"abc")
    first = data_fingerprint(file)
    file.write_bytes(b"abd")
    assert first.startswith("file ") and data_fingerprint(file) not in (None, first)
    folder = tmp_path / "images"
    (folder / "a").mkdir(parents=True)
    (folder / "a" / "1.png").write_bytes(b"x")
    listing = data_fingerprint(folder)
    (folder / "a" / "1.png").rename(folder / "a" / "2.png")
    assert listing.startswith("folder ") and data_fingerprint(folder) != listing


def test_a_key_folder_a_node_does_not_see_is_refused(two_nodes, tmp_path):
    env = {**os.environ, **MULTI_NODE}
    # A given key folder (as a throw-away ledger's) hidden from the second node.
    with pytest.raises(ConfigError) as error:
        probe_ray_cluster(two_nodes.cluster.address, client_cpus=1, client_gpus=0, env=env, timeout=120,
                          ledger_dir=two_nodes.shared, key_dir=two_nodes.blind_keys)
    assert error.value.key == "FEDPRIV_KEY_DIR" and "1 of the 2 nodes" in str(error.value)
    # FEDPRIV_KEY_DIR here names a folder other than the one the nodes' hospitals use (their own
    # FEDPRIV_KEY_DIR, from where `ray start` ran): no node sees it.
    elsewhere = tmp_path / "keys"
    with pytest.raises(ConfigError) as error:
        probe_ray_cluster(two_nodes.cluster.address, client_cpus=1, client_gpus=0, timeout=120,
                          env={**env, "FEDPRIV_KEY_DIR": str(elsewhere)}, ledger_dir=two_nodes.shared)
    assert error.value.key == "FEDPRIV_KEY_DIR" and "2 of the 2 nodes" in str(error.value)
    assert f"looks in {os.environ['FEDPRIV_KEY_DIR']}" in str(error.value)
    assert not list(elsewhere.iterdir()) and not list(two_nodes.shared.iterdir())


def test_a_run_on_a_cluster_whose_second_node_has_another_ledger_folder_is_refused_and_spends_nothing(two_nodes,
                                                                                                     tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, **MULTI_NODE, "RAY_ADDRESS": two_nodes.cluster.address}
    overrides = [o for o in TINY if not o.startswith("federation.ledger_scope=")]
    completed = subprocess.run([sys.executable, "-m", "fedpriv.cli.main", *overrides,
                                "federation.ledger_scope=persistent", f"federation.ledger_dir={two_nodes.blind}",
                                f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                               timeout=600)
    output = completed.stdout + completed.stderr
    assert completed.returncode == 2, output[-4000:]  # a configuration error
    assert f"federation.ledger_dir='{two_nodes.blind}'" in output and "do not see this folder" in output
    assert "Attached to the Ray cluster" not in output  # refused before the SuperLink, before any hospital
    assert not list(two_nodes.blind.iterdir())  # no ledger, no budget spent, and the check left nothing


def test_a_run_passes_the_probe_its_ledger_folder_and_key_folder(tmp_path):
    from fedpriv.app_config import compose_config, config_to_json
    from fedpriv.experiment import absolute_paths
    from fedpriv.simulation import _shared_paths

    run_dir = tmp_path / "run"
    persistent = absolute_paths(compose_config([f"federation.ledger_dir={tmp_path / 'ledgers'}"]), run_dir)
    assert _shared_paths(config_to_json(persistent), run_dir) == (
        tmp_path / "ledgers", "federation.ledger_dir", None,  # keys: each node's FEDPRIV_KEY_DIR
        [("dataset.root", Path(persistent.dataset.root) / "pneumoniamnist.npz")])  # the data every hospital loads
    throwaway = absolute_paths(compose_config(["federation.ledger_scope=run"]), run_dir)
    assert _shared_paths(config_to_json(throwaway), run_dir) == (run_dir / "ledgers", "federation.ledger_run_dir",
                                                                 run_dir / "ledgers" / "keys",
                                                                 [("dataset.root", Path(throwaway.dataset.root) /
                                                                   "pneumoniamnist.npz")])
    folder = absolute_paths(compose_config(["dataset=imagefolder", f"dataset.path={tmp_path}",
                                            f"dataset.attributes_csv={tmp_path / 'a.csv'}"]), run_dir)
    assert _shared_paths(config_to_json(folder), run_dir)[3] == [("dataset.path", tmp_path),
                                                                 ("dataset.attributes_csv", tmp_path / "a.csv")]
    synthetic = absolute_paths(compose_config(["dataset=synthetic"]), run_dir)
    assert _shared_paths(config_to_json(synthetic), run_dir)[3] == []  # generated by each hospital: nothing to see
