"""A one-machine rehearsal of a real deployment: TLS SuperLink behind an mTLS proxy, authenticated SuperNodes.

:class:`LocalFederation` follows the deployment's key flow: the coordinator makes the CA and the
server certificate; each hospital makes its own key pair, TLS key and certificate request in its own
folder (:func:`~fedpriv.deployment.credentials.write_hospital_request`); only the public key and the
request are copied to the coordinator, which registers the one and signs the other
(:func:`~fedpriv.deployment.credentials.sign_request`) and copies back only the certificate and
`ca.crt`. The coordinator's code never opens a hospital's private key. It gives every hospital its own folder (its data share
as a MedMNIST-layout npz, its ledger, its budget in its own node config), starts a TLS SuperLink with
SuperNode authentication on loopback, puts nginx in front of it (the public port: mutual TLS, only
`/v1/fleet/` forwarded, see proxy.py), registers each hospital's public key by name over loopback,
starts one SuperNode per hospital on its own port, connected through the proxy with its TLS client
certificate (`fedpriv-supernode`), and runs federations with `flwr run ... --stream` over loopback,
as the coordinator's researcher would. Leaving the context (normally, on error or on Ctrl-C) stops
every process it started, by PID.

Layout under OUT::

    credentials/            the coordinator's: ca/ca.key, coordinator/{ca.crt,server.pem,server.key},
                            coordinator/supernode-keys/<hospital>.pub (received public keys),
                            coordinator/requests/<hospital>-tls.csr (received requests),
                            coordinator/issued/<hospital>-tls.crt (signed certificates)
    coordinator/            flwr-home/, app/, run-config-*.toml, superlink.log, proxy.log
    coordinator/proxy/      nginx.conf, nginx.pid, logs/access.log (who asked for what)
    coordinator/runs/NAME/  the server's artifacts of each run (metrics.json, summary.md, model.pt, ...)
    <hospital>/keys/        the hospital's own: <hospital>.key, <hospital>-tls.key (private, made
                            here), <hospital>.pub, <hospital>-tls.csr, and what came back:
                            <hospital>-tls.crt, ca.crt
    <hospital>/data/        the hospital's share: <flag>.npz (train = the records it trains on,
                            val = the records it holds out for its own validation; no test split)
    <hospital>/ledger/      its privacy ledger (ledger.db)
    <hospital>/ledger-key/  the key that authenticates its ledger (and the chain's witness)
    <hospital>/supernode.log
"""

from __future__ import annotations

import logging
import math
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedpriv import rundir
from fedpriv.app_config import config_to_json, write_app
from fedpriv.config import FedprivConfig
from fedpriv.data import NORMALISATION_MEAN, NORMALISATION_STD, LabeledImages
from fedpriv.data.medmnist import SIZES, npz_filename
from fedpriv.deployment.approval import app_hash
from fedpriv.deployment.credentials import (
    Credentials,
    HospitalRequest,
    make_authority,
    sign_request,
    write_hospital_request,
)
from fedpriv.deployment.processes import (
    DeploymentError,
    ManagedProcess,
    ProcessSet,
    flower_env,
    hospital_exec_command,
    online_nodes,
    register_supernode,
    run_command,
    superlink_command,
    supernode_command,
    wait_for_superlink,
    write_flwr_config,
    write_run_config,
)
from fedpriv.deployment.proxy import (
    ProxySettings,
    check_proxy_config,
    find_nginx,
    proxy_command,
    wait_for_proxy,
    write_proxy_config,
)
from fedpriv.errors import ConfigError
from fedpriv.experiment import Experiment

log = logging.getLogger(__name__)

LOOPBACK_HOSTS = ("127.0.0.1", "localhost")
# The rehearsal runs each hospital's launcher (and its ClientApps) as the SuperNode's own OS user. One
# user on one machine already holds every hospital's keys, the CA key and the coordinator's, so another
# user would separate nothing; and the rehearsal's folders (and often the Python environment) sit under
# the caller's private folders, which another user cannot enter. A deployment separates them
# (docs/deployment.md, section 3: `--clientapp-user`, or the launcher's own unit with User=).
CLIENTAPP_USER_NOTE = ("ClientApps run as the SuperNode's own OS user here, so app code could read the "
                       "hospitals' private keys; a deployment runs them as another user (docs/deployment.md, "
                       "section 3)")
# A synthetic or image-folder dataset with one channel and two classes fits PneumoniaMNIST's layout.
FALLBACK_FLAG = "pneumoniamnist"


def free_port() -> int:
    """A TCP port free on loopback right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _uint8_images(images: LabeledImages) -> np.ndarray:
    """Undo the fixed normalisation: MedMNIST's (N, H, W) or (N, H, W, 3) uint8 layout."""
    pixels = images.images.numpy() * NORMALISATION_STD + NORMALISATION_MEAN
    pixels = np.clip(np.round(pixels * 255.0), 0, 255).astype(np.uint8)
    return pixels[:, 0] if pixels.shape[1] == 1 else pixels.transpose(0, 2, 3, 1)


def npz_flag(cfg: FedprivConfig, experiment: Experiment) -> str:
    """The MedMNIST flag whose npz layout carries this experiment's data."""

    if cfg.dataset.size not in SIZES:
        raise ConfigError("dataset.size", cfg.dataset.size, "hospital shares are written as MedMNIST npz files, "
                          f"which come in sizes {', '.join(map(str, SIZES))}", "use dataset.size=28")
    if cfg.dataset.name not in ("synthetic", "imagefolder"):
        return cfg.dataset.name
    dataset = experiment.dataset
    if dataset.in_channels != 1 or dataset.num_classes != 2:
        raise ConfigError("dataset.name", cfg.dataset.name, "the rehearsal writes shares in a MedMNIST layout, "
                          "which for this dataset needs greyscale images of two classes",
                          "rehearse with a MedMNIST dataset or two-class greyscale images")
    return FALLBACK_FLAG


def write_share(folder: Path, flag: str, size: int, train: LabeledImages | None, val: LabeledImages | None,
                test: LabeledImages | None = None) -> Path:
    """Data as a MedMNIST-layout npz under `folder` (only the splits given); the file's path.

    A hospital's share holds train (and val) only; the coordinator's test (and val) only.
    """

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / npz_filename(flag, size)
    arrays = {}
    for split, images in (("train", train), ("val", val), ("test", test)):
        if images is None or not len(images):
            continue
        arrays[f"{split}_images"] = _uint8_images(images)
        arrays[f"{split}_labels"] = images.labels.numpy().astype(np.uint8)[:, None]
    np.savez_compressed(path, **arrays)
    return path


def _copy(source: Path, target: Path) -> Path:
    """Hand a public file over (on a real deployment: e-mail, a USB stick, a ticket system)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target


@dataclass
class RehearsalHospital:
    """One rehearsed hospital: everything its own machine would hold."""

    name: str
    folder: Path
    data: Path
    dataset: str
    ledger: Path
    ledger_key: Path
    budget_epsilon: float
    delta: float
    port: int
    private_key: Path
    public_key: Path
    ca_certificate: Path
    tls_certificate: Path  # its TLS client certificate, presented to the proxy
    tls_key: Path
    node_id: int = 0
    process: ManagedProcess | None = None
    launcher: ManagedProcess | None = None  # its fedpriv-hospital-exec (runs approved apps only)
    threads: int | None = 1
    approved_apps: tuple[str, ...] = ()
    # What its node config calls it; None: its registered name. (A rehearsal of a node that claims
    # another hospital's name: the server still reports it under the name it was registered with.)
    claimed_name: str | None = None

    def node_config(self) -> dict[str, object]:
        """What this hospital's SuperNode gets as `--node-config`: its own settings only."""
        return {"name": self.claimed_name or self.name, "data": str(self.data), "dataset": self.dataset,
                "budget-epsilon": float(self.budget_epsilon), "delta": float(self.delta),
                "ledger": str(self.ledger), "ledger-key": str(self.ledger_key), "threads": self.threads}


@dataclass
class RunOutcome:
    """A finished run: where the server wrote its artifacts, and the `flwr run` log."""

    run_dir: Path
    log_path: Path
    seconds: float


@dataclass
class LocalFederation:
    """A TLS, authenticated SuperLink behind an mTLS proxy, plus one SuperNode per hospital (a context manager).

    `superlink_address` is the SuperLink's own port (loopback: Control, Runtime and Fleet APIs; what
    the `flwr` CLI and the ServerApp use); `public_address` is the proxy's (what hospitals use).
    """

    experiment: Experiment
    out: Path
    budgets: list[float] | None = None
    startup_timeout: float = 120.0
    threads: int | None = 1
    hospitals: list[RehearsalHospital] = field(default_factory=list)
    processes: ProcessSet | None = None
    link: ManagedProcess | None = None
    proxy: ManagedProcess | None = None
    superlink_address: str = ""
    public_address: str = ""
    credentials: Credentials | None = None
    _runs: int = 0

    @property
    def coordinator(self) -> Path:
        return self.out / "coordinator"

    @property
    def env(self) -> dict[str, str]:
        return flower_env(self.coordinator / "flwr-home")

    # ---------------------------------------------------------------- preparation

    def prepare(self) -> None:
        """Credentials, every hospital's folder (data share, ledger folder), the app and flwr's config."""
        self.out = self.out.resolve()
        find_nginx()  # before anything is written: without nginx there is no rehearsal
        names = [hospital.name for hospital in self.experiment.hospitals]
        budgets = self.budgets or [hospital.epsilon for hospital in self.experiment.hospitals]
        if len(budgets) != len(names):
            raise ConfigError("budgets", budgets, f"one budget per hospital is needed ({len(names)} hospitals)",
                              "give a comma-separated list with one epsilon per hospital")
        # The coordinator's side: the CA and the server certificate, no hospital key.
        self.credentials = make_authority(self.out / "credentials", LOOPBACK_HOSTS, overwrite=True)
        cfg = self.experiment.config
        flag = npz_flag(cfg, self.experiment)
        self.hospitals = []
        for index, (hospital, budget) in enumerate(zip(self.experiment.hospitals, budgets)):
            folder = self.out / hospital.name
            data = folder / "data"
            # Its partition as train and its validation share as val; no test split: a hospital needs none.
            write_share(data, flag, cfg.dataset.size, self.experiment.hospital_data(index),
                        self.experiment.hospital_validation(index))
            (folder / "ledger").mkdir(parents=True, exist_ok=True)
            # The ledger's key in a folder of its own (on a real machine: another disk or OS user).
            (folder / "ledger-key").mkdir(parents=True, exist_ok=True, mode=0o700)
            # The hospital's side: its keys and certificate request, made in its own folder.
            keys = write_hospital_request(folder / "keys", hospital.name, overwrite=True)
            registered = self.enrol(keys)
            self.hospitals.append(RehearsalHospital(
                name=hospital.name, folder=folder, data=data, dataset=flag, ledger=folder / "ledger" / "ledger.db",
                ledger_key=folder / "ledger-key" / "ledger.key",
                budget_epsilon=float(budget), delta=hospital.delta, port=free_port(), private_key=keys.private_key,
                public_key=registered, ca_certificate=keys.folder / "ca.crt", tls_certificate=keys.tls_certificate,
                tls_key=keys.tls_key, threads=self.threads))
        # Each hospital approves the hash of the app the coordinator will submit (fedpriv's own).
        approved = (app_hash(write_app(self.coordinator / "app")),)
        for hospital in self.hospitals:
            hospital.approved_apps = approved

    def enrol(self, keys: HospitalRequest) -> Path:
        """The exchange with one hospital: its public key and request travel to the coordinator, which
        signs the request; the certificate and ca.crt travel back. Returns the coordinator's copy of the
        public key (what it registers). Only public files are read; no private key is opened here."""
        assert self.credentials is not None
        coordinator = self.credentials.root / "coordinator"
        received_key = _copy(keys.public_key, coordinator / "supernode-keys" / keys.public_key.name)
        received_request = _copy(keys.certificate_request, coordinator / "requests" / keys.certificate_request.name)
        issued = sign_request(received_request, ca_key=self.credentials.ca_key,
                              ca_certificate=self.credentials.ca_certificate,
                              out=coordinator / "issued" / f"{keys.name}-tls.crt", expected_name=keys.name,
                              overwrite=True)
        _copy(issued, keys.tls_certificate)
        _copy(self.credentials.ca_certificate, keys.folder / "ca.crt")
        return received_key

    # ---------------------------------------------------------------- processes

    def start(self) -> None:
        """Start the SuperLink (loopback) and its proxy, register every hospital, start their SuperNodes
        (through the proxy); wait until all are online."""
        assert self.credentials is not None
        credentials = self.credentials
        port = free_port()
        self.superlink_address = f"127.0.0.1:{port}"
        write_flwr_config(self.coordinator / "flwr-home", self.superlink_address, credentials.ca_certificate)
        self.processes = ProcessSet(self.env)
        self.link = self.processes.start("superlink", superlink_command(
            ca_certificate=credentials.ca_certificate, certificate=credentials.server_certificate,
            key=credentials.server_key, host="127.0.0.1", port=port), self.coordinator / "superlink.log",
            cwd=self.coordinator)
        wait_for_superlink(self.link, self.superlink_address, credentials.ca_certificate, self.startup_timeout)
        self.proxy = self.start_proxy()
        wait_for_proxy(self.proxy, self.public_address, credentials.ca_certificate, self.startup_timeout)
        for hospital in self.hospitals:
            hospital.node_id = register_supernode(hospital.public_key, hospital.name, self.env)
            log.info("registered hospital %s as node %d", hospital.name, hospital.node_id)
        for hospital in self.hospitals:
            hospital.process = self.start_supernode(hospital)
        self.wait_until_online()

    def start_proxy(self) -> ManagedProcess:
        """Write the proxy's nginx.conf (checked with `nginx -t`) and start nginx on a free public port."""
        assert self.credentials is not None and self.processes is not None
        self.public_address = f"127.0.0.1:{free_port()}"
        settings = ProxySettings(prefix=self.coordinator / "proxy", listen=self.public_address,
                                 superlink=self.superlink_address, certificate=self.credentials.server_certificate,
                                 key=self.credentials.server_key, client_ca=self.credentials.ca_certificate)
        write_proxy_config(settings)
        nginx = find_nginx()
        check_proxy_config(settings, nginx)
        return self.processes.start("proxy", proxy_command(settings, nginx), self.coordinator / "proxy.log",
                                    cwd=self.coordinator)

    def start_supernode(self, hospital: RehearsalHospital) -> ManagedProcess:
        """Start one hospital's SuperNode (its own FLWR_HOME, port, key and node config) and its launcher.

        The launcher follows the SuperNode (``--parent-pid``): it ends when the SuperNode does.
        """
        assert self.processes is not None
        command = supernode_command(superlink=self.public_address, node_config=hospital.node_config(),
                                    root_certificates=hospital.ca_certificate, auth_key=hospital.private_key,
                                    port=hospital.port, client_certificate=hospital.tls_certificate,
                                    client_key=hospital.tls_key)
        env = flower_env(hospital.folder / "flwr-home")
        node = self.processes.start(f"supernode {hospital.name}", command, hospital.folder / "supernode.log",
                                    cwd=hospital.folder, env=env)
        launcher = hospital_exec_command(approved_apps=hospital.approved_apps, port=hospital.port)
        log.warning("hospital %s: %s", hospital.name, CLIENTAPP_USER_NOTE)
        hospital.launcher = self.processes.start(f"hospital-exec {hospital.name}",
                                                 [*launcher, "--parent-pid", str(node.process.pid)],
                                                 hospital.folder / "hospital-exec.log", cwd=hospital.folder, env=env)
        return node

    def wait_until_online(self) -> None:
        expected = {hospital.node_id for hospital in self.hospitals}
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            for hospital in self.hospitals:
                if hospital.process is not None and not hospital.process.running():
                    raise DeploymentError(f"the SuperNode of hospital {hospital.name} exited with code "
                                          f"{hospital.process.process.returncode}; see {hospital.process.log_path}:"
                                          f"\n{hospital.process.log_tail()}")
            if expected <= online_nodes(self.env):
                return
            time.sleep(0.5)
        raise DeploymentError(f"not every SuperNode came online within {self.startup_timeout:.0f}s")

    def run(self, cfg: FedprivConfig, name: str | None = None, *, timeout: float | None = None) -> RunOutcome:
        """One federated run of `cfg` (its JSON travels in the run config); artifacts land in coordinator/runs/."""
        assert self.processes is not None, "start the federation first"
        self._runs += 1
        name = name or f"run-{self._runs}-{cfg.strategy.mode}"
        run_dir = self.coordinator / "runs" / name
        run_dir.mkdir(parents=True, exist_ok=True)
        run_config = write_run_config(self.coordinator / f"run-config-{name}.toml", run_dir=run_dir,
                                      config_json=config_to_json(cfg))
        started = time.monotonic()
        runner = self.processes.start(f"flwr run {name}", run_command(self.coordinator / "app", run_config),
                                      run_dir / "flwr-run.log", cwd=self.coordinator)
        try:
            code = self._follow(runner, timeout)
        finally:
            self.processes.stop(runner)
        if code != 0 or not rundir.finished(run_dir):
            raise DeploymentError(f"the federated run {name} did not finish (flwr run exited {code}); see "
                                  f"{runner.log_path} and {self.coordinator / 'superlink.log'}:\n{runner.log_tail()}")
        return RunOutcome(run_dir, runner.log_path, time.monotonic() - started)

    def _follow(self, runner: ManagedProcess, timeout: float | None) -> int:
        """Wait for `flwr run` to end, noting every process the federation spawns meanwhile (by PID)."""
        deadline = time.monotonic() + (timeout or math.inf)
        while runner.running():
            if time.monotonic() > deadline:
                raise DeploymentError(f"the run did not finish within {timeout:.0f}s; see {runner.log_path}")
            assert self.processes is not None
            self.processes.note_descendants()
            time.sleep(0.5)
        return runner.process.returncode

    def stop(self) -> None:
        """Stop every process this federation started (SuperNodes, runs, the proxy, the SuperLink), by PID."""
        if self.processes is not None:
            self.processes.stop_all()

    def __enter__(self) -> LocalFederation:
        try:
            self.prepare()
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
