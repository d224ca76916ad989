"""A real deployment on loopback: a TLS SuperLink with SuperNode authentication behind nginx, 3 hospitals.

One federation (processes started once for the module, stopped by PID at the end) serves every test.
The SuperLink listens on loopback; hospitals reach it only through the proxy (mutual TLS, Fleet API
only), presenting their TLS client certificates (`fedpriv-supernode`). Intruders are refused
(unregistered key, plain HTTP, an untrusted certificate); the outsider's attack of issue 19 is
replayed against the public port with Flower's own Control client and `flwr run`, holding only
`ca.crt` (refused at the TLS layer) and then a hospital's valid client certificate (the Control and
Runtime APIs answer 403); an unapproved app submitted by someone with loopback access runs at no
hospital. Then a parallel and a sequential run of 2 rounds each train on tiny synthetic shares.
Each hospital's budget, delta, data and ledger come from its own node config; the run config asks
for a huge budget and another ledger folder and is ignored. The last test stops everything and
checks, by PID, that no process is left.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shlex
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import httpx
import pytest
import tomli_w
from cryptography.hazmat.primitives import serialization
from flwr.cli.cli_client_interceptor import CliClientHttpInterceptor
from flwr.proto.control_pb2 import (  # pylint: disable=E0611
    ListNodesRequest,
    ListRunsRequest,
    RegisterNodeRequest,
    StartRunRequest,
    UnregisterNodeRequest,
)
from flwr.proto.run_pb2 import GetRunRequest  # pylint: disable=E0611
from flwr.supercore.control import ControlHttpClient
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
from flwr.supercore.primitives.asymmetric import public_key_to_bytes
from flwr.supernode.fleet_http_client import FleetHttpClient

from fedpriv.app_config import compose_config
from fedpriv.deployment.approval import app_hash
from fedpriv.deployment.client_tls import client_context
from fedpriv.deployment.credentials import make_ca, make_client_certificate, make_supernode_keys
from fedpriv.deployment.processes import (
    ManagedProcess,
    ProcessSet,
    _flwr_json,
    flower_env,
    online_nodes,
    run_command,
    supernode_command,
    wait_for_superlink,
    write_flwr_config,
)
from fedpriv.deployment.proxy import wait_for_proxy
from fedpriv.deployment.rehearsal import LocalFederation, free_port, write_share
from fedpriv.experiment import prepare_experiment
from fedpriv.privacy.ledger import read_ledger
from fedpriv.process_tree import processes_mentioning, terminate_tree

pytestmark = [pytest.mark.slow, pytest.mark.processes]

BUDGETS = [40.0, 40.0, 0.05]  # the third hospital cannot afford one round: it must refuse, spending nothing
RUN_OVERRIDES = [
    "dataset=synthetic", "dataset.num_samples=300", "federation=iid", "strategy.num_rounds=2",
    "train.batch_size=16", "train.local_epochs=1", "train.momentum=0.0", "model.width=4",
    "privacy.noise_multiplier=1.0",  # a fixed sigma: one round costs far more than 0.05
    "strategy.client_evaluate=false",  # keeps the test short: every message starts a ClientApp process
    "strategy.round_timeout=240",
]


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    out = tmp_path_factory.mktemp("deployment")
    server_ledgers = out / "server-chosen-ledgers"
    server_ledgers.mkdir()
    # What the server asks for: a huge budget and ledgers in its own folder. Hospitals ignore both.
    greedy = [f"federation.ledger_dir={server_ledgers}", "privacy.epsilon=1000000", "privacy.delta=0.1"]
    cfg = compose_config(RUN_OVERRIDES + greedy)
    federation = LocalFederation(prepare_experiment(compose_config(RUN_OVERRIDES)), out, budgets=BUDGETS,
                                 startup_timeout=120)
    federation.run_cfg = cfg
    federation.server_ledgers = server_ledgers
    try:
        federation.prepare()
        # The third hospital's node config calls it by the first one's name (a rogue claim, and two
        # nodes claiming one name): the server must report it under the name its key was registered with.
        federation.hospitals[2].claimed_name = federation.hospitals[0].name
        federation.start()
        yield federation
    finally:
        federation.stop()


def _supernode(federation: LocalFederation, name: str, **kwargs) -> ManagedProcess:
    folder = federation.out / name
    (folder / "ledger").mkdir(parents=True, exist_ok=True)
    node_config = {**federation.hospitals[0].node_config(), "name": name, "ledger": str(folder / "ledger" / "l.db"),
                   "ledger-key": str(folder / "ledger-key" / "l.key")}
    command = supernode_command(superlink=federation.public_address, node_config=node_config, port=free_port(),
                                **kwargs)
    return federation.processes.start(name, command, folder / "supernode.log", cwd=folder)


def _intruder_key(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    private, _ = make_supernode_keys("intruder")
    path = folder / "intruder.key"
    path.write_bytes(private)
    os.chmod(path, 0o600)
    return path


def _listening_addresses(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket `pid` listens on (from /proc: its sockets' inodes)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd)
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table, width in (("tcp", 8), ("tcp6", 32)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                address, port = fields[1].split(":")
                if width == 8:
                    address = ".".join(str(int(address[i:i + 2], 16)) for i in (6, 4, 2, 0))
                found.add((address, int(port, 16)))
    return found


def test_every_hospital_is_registered_and_online_with_its_own_settings(federation):
    assert {h.node_id for h in federation.hospitals} <= online_nodes(federation.env)
    assert len({h.port for h in federation.hospitals}) == 3
    assert len({h.ledger for h in federation.hospitals}) == 3
    for hospital in federation.hospitals:
        assert (hospital.data / "pneumoniamnist.npz").is_file()
        assert hospital.data.parent == hospital.folder


def test_the_superlink_listens_on_loopback_and_hospitals_come_in_through_the_proxy(federation):
    port = int(federation.superlink_address.rsplit(":", 1)[1])
    listening = _listening_addresses(federation.link.pid)
    assert ("127.0.0.1", port) in listening
    assert all(address == "127.0.0.1" for address, _ in listening)  # nothing on 0.0.0.0 or another interface
    assert federation.public_address != federation.superlink_address
    # Every hospital's SuperNode talked to the Fleet API through nginx, with its own client certificate.
    access = (federation.coordinator / "proxy" / "logs" / "access.log").read_text()
    for hospital in federation.hospitals:
        assert f'"POST /v1/fleet/pull-messages HTTP/1.1" 200' in access
        assert f'client="CN={hospital.name},O=fedpriv federation" verify=SUCCESS' in access


def test_a_supernode_with_an_unregistered_key_is_refused(federation):
    """Behind the proxy, SuperNode authentication still decides: a valid TLS client certificate is not enough."""
    before = online_nodes(federation.env)
    holder = federation.hospitals[0]
    intruder = _supernode(federation, "intruder", root_certificates=federation.credentials.ca_certificate,
                          auth_key=_intruder_key(federation.out / "intruder"),
                          client_certificate=holder.tls_certificate, client_key=holder.tls_key)
    code = intruder.wait(timeout=90)
    assert code != 0
    assert "Failed to" in intruder.log_tail(40)
    assert online_nodes(federation.env) == before


def test_a_plain_connection_to_the_tls_superlink_fails(federation):
    for address in (federation.superlink_address, federation.public_address):
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(f"http://{address}/health", timeout=5)
    plain = _supernode(federation, "plain", root_certificates=None, auth_key=None, insecure=True, max_retries=2,
                       max_wait_time=20)
    assert plain.wait(timeout=90) != 0


def test_a_certificate_from_another_ca_is_not_trusted(federation):
    folder = federation.out / "other-ca"
    folder.mkdir()
    _, other_ca = make_ca(days=1)
    (folder / "ca.crt").write_bytes(other_ca.public_bytes(serialization.Encoding.PEM))
    registered = federation.hospitals[0]
    spoof = _supernode(federation, "other-ca", root_certificates=folder / "ca.crt", auth_key=registered.private_key,
                       client_certificate=registered.tls_certificate, client_key=registered.tls_key,
                       max_retries=2, max_wait_time=20)
    assert spoof.wait(timeout=90) != 0


ROGUE_APP = '''
from pathlib import Path

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

client = ClientApp()
server = ServerApp()


@client.query()
def steal(msg, context):  # what an outsider's app would do at a hospital: read its settings, report back
    Path(MARKER).write_text(repr(dict(context.node_config)))
    return Message(RecordDict({"config": ConfigRecord({"node-config": repr(dict(context.node_config))})}),
                   reply_to=msg)


@server.main()
def main(grid, context):
    nodes = list(grid.get_node_ids())
    messages = [Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type="query")
                for node in nodes]
    replies = list(grid.send_and_receive(messages, timeout=30))
    Path(REPORT).write_text(f"{len(nodes)} {sum(not reply.has_error() for reply in replies)}")
'''


def _rogue_app(folder: Path) -> tuple[Path, Path, Path]:
    """The outsider's app under `folder`: (app folder, the file its ClientApp writes, its ServerApp's report)."""
    app = folder / "rogue"
    app.mkdir(parents=True)
    marker, report = folder / "stolen.txt", folder / "rogue-report.txt"
    (app / "rogue_app.py").write_text(f"MARKER = {str(marker)!r}\nREPORT = {str(report)!r}\n" + ROGUE_APP)
    (app / "pyproject.toml").write_text(tomli_w.dumps({
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {"name": "rogue-app", "version": "1.0.0", "license": "Apache-2.0", "dependencies": []},
        "tool": {"flwr": {"app": {"publisher": "outsider", "config": {"note": ""},
                                  "components": {"serverapp": "rogue_app:server", "clientapp": "rogue_app:client"}}}},
    }))
    run_config = folder / "rogue.toml"
    run_config.write_text('note = "rogue"\n')
    return app, marker, report


def test_an_app_the_hospitals_did_not_approve_never_runs_there(federation, tmp_path):
    """Whoever reaches the Control API (on the coordinator: loopback) can submit a run; no hospital runs it."""
    app, marker, report = _rogue_app(tmp_path)
    rogue_hash = app_hash(app)
    ledgers = {h.name: h.ledger.read_bytes() if h.ledger.exists() else None for h in federation.hospitals}
    runner = federation.processes.start("rogue run", run_command(app, tmp_path / "rogue.toml"), tmp_path / "rogue-run.log",
                                        cwd=tmp_path)
    assert runner.wait(timeout=240) == 0, runner.log_tail(40)
    assert report.read_text() == "3 0"  # its ServerApp reached all three hospitals; none answered
    assert not marker.exists()  # its ClientApp ran nowhere
    for hospital in federation.hospitals:
        refused = (hospital.folder / "hospital-exec.log").read_text()
        assert f"its app {rogue_hash} is not one this hospital approved" in refused
        assert "fedpriv-approved-clientapp: refused run" in refused  # refused on the bytes it pulled
        current = hospital.ledger.read_bytes() if hospital.ledger.exists() else None
        assert current == ledgers[hospital.name]  # nothing read into a run, nothing spent


# ------------------------------------------------------------------ the outsider's attack (issue 19)


def _control(address: str, verify: ssl.SSLContext) -> ControlHttpClient:
    """Flower's own Control API client, with the headers the `flwr` CLI sends."""
    return ControlHttpClient(f"https://{address}", verify=verify, timeout=15,
                             interceptors=[CliClientHttpInterceptor(), RuntimeVersionHttpInterceptor(component_name="flwr CLI")])


def _attack_steps(federation: LocalFederation) -> dict:
    """Every Control API step of the attack: list runs and nodes, register a key, unregister a hospital, run."""
    _, public = make_supernode_keys("outsider")
    key = public_key_to_bytes(serialization.load_ssh_public_key(public))
    victim = federation.hospitals[0].node_id
    return {
        "list runs": lambda client: client.ListRuns(ListRunsRequest()),
        "list nodes": lambda client: client.ListNodes(ListNodesRequest()),
        "register a key": lambda client: client.RegisterNode(RegisterNodeRequest(public_key=key, name="outsider")),
        "unregister a hospital": lambda client: client.UnregisterNode(UnregisterNodeRequest(node_id=victim)),
        "start a run": lambda client: client.StartRun(StartRunRequest()),
    }


def _state(federation: LocalFederation) -> tuple[dict[int, str], set[int]]:
    """(node id -> status, run ids), read over loopback as the coordinator's researcher would."""
    with _control(federation.superlink_address, ssl.create_default_context(
            cafile=str(federation.credentials.ca_certificate))) as client:
        nodes = {info.node_id: info.status for info in client.ListNodes(ListNodesRequest()).nodes_info}
        runs = set(client.ListRuns(ListRunsRequest()).run_dict)
    return nodes, runs


def _raw_status(address: str, context: ssl.SSLContext, method: str, path: str) -> int:
    """The status answering `method path`, the path sent exactly as written (no client-side clean-up)."""
    host, port = address.rsplit(":", 1)
    connection = http.client.HTTPSConnection(host, int(port), context=context, timeout=15)
    try:
        connection.request(method, path, body=b"", headers={"content-type": "application/protobuf"})
        return connection.getresponse().status
    finally:
        connection.close()


def _refused(call, client) -> httpx.Response:
    with pytest.raises(httpx.HTTPStatusError) as refused:
        call(client)
    return refused.value.response


def test_an_outsider_holding_only_the_ca_certificate_is_refused_at_every_step(federation, tmp_path):
    """Issue 19's attack against the public port, with `ca.crt` alone: nginx forwards nothing."""
    before = _state(federation)
    assert {h.node_id for h in federation.hospitals} <= set(before[0])  # the coordinator does see them
    ca = federation.credentials.ca_certificate
    outsider = ssl.create_default_context(cafile=str(ca))  # trusts the server; presents no certificate
    with _control(federation.public_address, outsider) as client:
        for step, call in _attack_steps(federation).items():
            response = _refused(call, client)
            assert response.status_code == 400, step
            assert "No required SSL certificate was sent" in response.text, step
    # A client certificate the outsider made itself (another CA) does not pass either.
    other_key, other_ca = make_ca(days=1)
    key, certificate = make_client_certificate(other_key, other_ca, "hospital-1", days=1)
    (tmp_path / "own.crt").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "own.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    forged = client_context(ca, tmp_path / "own.crt", tmp_path / "own.key")
    with _control(federation.public_address, forged) as client:
        response = _refused(_attack_steps(federation)["list nodes"], client)
        assert response.status_code == 400 and "SSL certificate error" in response.text
    # Not even the Fleet API answers without a certificate: nothing reaches the SuperLink.
    with FleetHttpClient(f"https://{federation.public_address}", verify=outsider) as fleet:
        assert _refused(lambda c: c.GetRun(GetRunRequest(run_id=1)), fleet).status_code == 400

    # `flwr run` itself, pointed at the public port (a connection holding only ca.crt): refused.
    app, marker, report = _rogue_app(tmp_path)
    home = tmp_path / "outsider-flwr-home"
    write_flwr_config(home, federation.public_address, ca)
    submitted = subprocess.run(run_command(app, tmp_path / "rogue.toml"), env=flower_env(home), capture_output=True,
                               text=True, timeout=120, stdin=subprocess.DEVNULL, cwd=tmp_path)
    output = submitted.stdout + submitted.stderr
    assert submitted.returncode != 0, output
    assert "400 Bad Request" in output and "/v1/control/start-run" in output  # the proxy's answer
    assert not marker.exists() and not report.exists()
    assert _state(federation) == before  # no run, no node registered or unregistered


def test_a_hospitals_client_certificate_reaches_the_fleet_api_and_nothing_else(federation):
    """A hospital (or whoever stole its TLS key) gets the Fleet API only: Control and Runtime answer 403."""
    before = _state(federation)
    hospital = federation.hospitals[1]
    verify = client_context(federation.credentials.ca_certificate, hospital.tls_certificate, hospital.tls_key)
    with _control(federation.public_address, verify) as client:
        for step, call in _attack_steps(federation).items():
            assert _refused(call, client).status_code == 403, step
    forbidden = ["/v1/control/list-nodes", "/v1/runtime/create-task", "/v1/runtime/pull-task-input", "/health",
                 "/v1/fleet/../control/list-runs", "/v1/fleet/%2e%2e/control/list-runs",
                 "/v1/fleet/..%2fcontrol/list-nodes", "/v1/fleetx/list-runs"]
    for path in forbidden:
        assert _raw_status(federation.public_address, verify, "POST", path) == 403, path
    assert _raw_status(federation.public_address, verify, "GET", "/v1/fleet/get-run") == 403  # Fleet calls are POSTs
    # The Fleet API is forwarded, and the SuperLink's SuperNode authentication still judges the call.
    with FleetHttpClient(f"https://{federation.public_address}", verify=verify) as fleet:
        response = _refused(lambda c: c.GetRun(GetRunRequest(run_id=1)), fleet)
        assert response.status_code == 401 and "SuperNode authentication" in response.text
    # The same Control calls work over loopback (the coordinator's side): the refusals are the proxy's.
    assert {h.node_id for h in federation.hospitals} <= set(before[0])
    assert _state(federation) == before


def _check_run(federation: LocalFederation, run_dir: Path, previous: dict[str, float],
               num_rounds: int = 2) -> dict[str, float]:
    for artifact in ("metrics.json", "summary.md", "model.pt"):
        assert (run_dir / artifact).is_file(), artifact
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == list(range(1, num_rounds + 1))
    spent = {}
    for hospital, budget in zip(federation.hospitals, BUDGETS):
        replies = [r["hospitals"][hospital.name] for r in rounds if hospital.name in r["hospitals"]]
        privacy = rounds[-1]["privacy"]
        reported = next(p for p in privacy if p["hospital"] == hospital.name)
        assert reported["budget_epsilon"] == pytest.approx(budget)  # the node's, not the run config's 1e6
        assert reported["delta"] == pytest.approx(1e-5)
        with read_ledger(hospital.ledger, key_path=hospital.ledger_key) as ledger:  # at the hospital's own path
            status = ledger.status()
        locked = status.locked
        assert status.budget_epsilon == pytest.approx(budget)
        assert status.epsilon_spent == pytest.approx(reported["epsilon"], rel=1e-9)
        if replies:  # the epsilon the hospital's own reply reported
            assert replies[-1]["epsilon"] == pytest.approx(status.epsilon_spent, rel=1e-9)
        if budget < 1:
            # Too small a budget for any round: every request is refused, nothing charged or locked.
            assert not locked and not reported["locked"] and status.epsilon_spent == 0.0
            assert replies and all(r["status"] == "refused" for r in replies)
        else:
            assert not locked and all(r["status"] == "trained" for r in replies) and len(replies) == num_rounds
            assert status.epsilon_spent > previous.get(hospital.name, 0.0)
        spent[hospital.name] = status.epsilon_spent
    assert not any(federation.server_ledgers.iterdir())  # the run config's ledger folder was ignored
    return spent


@pytest.fixture(scope="module")
def spent() -> dict[str, float]:
    return {}


def test_a_parallel_run_spends_each_hospitals_own_budget(federation, spent):
    outcome = federation.run(federation.run_cfg, "parallel", timeout=400)
    spent.update(_check_run(federation, outcome.run_dir, spent))
    rounds = json.loads((outcome.run_dir / "metrics.json").read_text())["rounds"]
    # The third hospital's budget cannot afford a round: it refuses every one, charging and locking nothing.
    poor = federation.hospitals[2].name
    assert all(r["hospitals"][poor]["status"] == "refused" for r in rounds)
    assert all("nothing charged" in r["hospitals"][poor]["message"] for r in rounds)
    # It calls itself by the first hospital's name; every row is still the registered node's own, and the
    # duplicate claim stopped nothing.
    assert federation.hospitals[2].node_config()["name"] == federation.hospitals[0].name
    assert all(set(r["hospitals"]) == {h.name for h in federation.hospitals} for r in rounds)
    assert all(r["hospitals"][federation.hospitals[0].name]["status"] == "trained" for r in rounds)
    summary = (outcome.run_dir / "summary.md").read_text()
    assert summary.count(f"| {federation.hospitals[0].name} |") == 1 and f"| {poor} |" in summary, summary


def test_a_sequential_run_on_the_same_federation(federation, spent):
    # One round: the order is the same in every round, and each costs ~40 s here (a process per message).
    sequential = compose_config([*RUN_OVERRIDES, "strategy.mode=sequential", "strategy.num_rounds=1",
                                 "privacy.epsilon=1000000", f"federation.ledger_dir={federation.server_ledgers}"])
    outcome = federation.run(sequential, "sequential", timeout=400)
    spent.update(_check_run(federation, outcome.run_dir, spent, num_rounds=1))
    rounds = json.loads((outcome.run_dir / "metrics.json").read_text())["rounds"]
    trained = [h.name for h in federation.hospitals[:2]]
    assert all(r["order"][:2] == trained for r in rounds)  # one hospital after the other
    assert all([n for n in r["order"] if r["hospitals"][n]["status"] == "trained"] == trained for r in rounds)
    assert "sequential" in (outcome.run_dir / "summary.md").read_text()


def test_no_process_is_left_behind(federation):
    processes = federation.processes
    started = processes.seen()
    assert len(started) >= 6  # SuperLink, 3 SuperNodes, intruders, runs and what they spawned
    federation.stop()
    assert processes.leftovers() == []
    # Belt and braces: nothing still runs with this federation's folders in its environment.
    assert processes_mentioning(str(federation.out)) == []


def test_ctrl_c_during_a_rehearsal_stops_every_process(tmp_path):
    """`fedpriv-deploy local`, interrupted once its federation is up, leaves nothing running."""
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "rehearsal"
    command = [sys.executable, "-m", "fedpriv.cli.deploy", "local", "--hospitals", "1", "--rounds", "1",
               "--out", str(out), "dataset=synthetic", "dataset.num_samples=60", "train.batch_size=8", "train.local_epochs=1"]
    cli = subprocess.Popen(command, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env={**os.environ, "PYTHONPATH": str(root)}, start_new_session=True)
    try:
        lines = []
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not any("SuperLink (TLS" in line for line in lines):
            line = cli.stdout.readline()
            if not line:
                break
            lines.append(line)
        assert any("SuperLink (TLS" in line for line in lines), "".join(lines)
        cli.send_signal(signal.SIGINT)
        output, _ = cli.communicate(timeout=120)
        assert cli.returncode == 130, "".join(lines) + output
        assert "every process it started was stopped" in output
    finally:
        if cli.poll() is None:
            terminate_tree(cli.pid, grace=5)
            cli.wait(timeout=10)
    assert processes_mentioning(str(out)) == []


# ------------------------------------------------------------------ docs/deployment.md, as printed


DOC = Path(__file__).resolve().parents[1] / "docs" / "deployment.md"


def _documented_steps() -> list[tuple[str, str]]:
    """(kind, text) of every ```bash, ```ini and ```toml block of sections 1 to 3, in the doc's order."""
    text = DOC.read_text()
    walk_through = text[text.index("## 1. "):text.index("## 4. ")]
    steps = []
    for kind, body in re.findall(r"```(bash|ini|toml)\n(.*?)```", walk_through, flags=re.S):
        if kind == "bash":
            joined = body.replace("\\\n", " ")
            steps += [("bash", line.strip()) for line in joined.splitlines() if line.strip() and not line.startswith("#")]
        else:
            steps.append((kind, body))
    return steps


def make_share(folder: Path) -> Path:
    """A hospital's data folder: a tiny pneumoniamnist.npz with train arrays only."""
    from fedpriv.data.synthetic import make_synthetic

    data = make_synthetic(num_samples=40, size=28, seed=5, val_fraction=0.2, test_fraction=0.2)
    return write_share(folder, "pneumoniamnist", 28, data.train, None)


def test_the_documented_commands_work_as_printed(tmp_path):
    """Sections 1-3 of docs/deployment.md on loopback: keys, units (ExecStart as printed), registration.

    Only the folders, the host name and the ports change; the units' commands run with a bare PATH,
    as systemd would start them. Every process started here is stopped by PID at the end.
    """
    venv = Path(sys.executable).parent.parent
    ports = {port: str(free_port()) for port in ("8000", "8443", "9094")}
    replacements = [("/opt/fedpriv/.venv", str(venv)), ("/srv/fedpriv", str(tmp_path / "coordinator")),
                    ("/srv/hospital", str(tmp_path / "hospital")), ("link.example.org:8443", "127.0.0.1:8443")]
    replacements += [(f":{port}", f":{free}") for port, free in ports.items()]
    replacements += [(f"--port {port}", f"--port {free}") for port, free in ports.items()]

    def local(text: str) -> str:
        for old, new in replacements:
            text = text.replace(old, new)
        return text

    steps = _documented_steps()
    kinds = [kind for kind, _ in steps]
    # SuperLink, proxy, hospital SuperNode and hospital launcher units; the flwr connection
    assert kinds.count("ini") == 4 and "toml" in kinds
    flwr_home = tmp_path / "researcher-flwr-home"
    shell_env = {"PATH": f"{venv / 'bin'}:/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path), "FLWR_HOME": str(flwr_home)}
    incoming, keys = tmp_path / "coordinator" / "incoming", tmp_path / "hospital" / "keys"
    incoming.mkdir(parents=True)
    share = make_share(tmp_path / "hospital" / "xrays")
    processes = ProcessSet(shell_env)
    launcher = None
    ca = tmp_path / "coordinator" / "creds" / "coordinator" / "ca.crt"
    try:
        for kind, text in steps:
            text = local(text)
            if kind == "toml":
                flwr_home.mkdir(exist_ok=True)
                (flwr_home / "config.toml").write_text(text)
            elif kind == "bash":
                done = subprocess.run(text, shell=True, env=shell_env, capture_output=True, text=True, timeout=120,
                                      stdin=subprocess.DEVNULL, cwd=tmp_path)
                assert done.returncode == 0, f"{text}\n{done.stdout}\n{done.stderr}"
                if text.startswith("fedpriv-deploy hospital-keys"):  # the hospital sends its public files
                    for name in ("A.pub", "A-tls.csr"):
                        shutil.copyfile(keys / name, incoming / name)
                if text.startswith("fedpriv-deploy sign"):  # ... and receives its certificate and the CA's
                    shutil.copyfile(incoming / "A-tls.crt", keys / "A-tls.crt")
                    shutil.copyfile(ca, keys / "ca.crt")
            else:
                unit = dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("["))
                env = {"PATH": "/usr/bin:/bin"}  # systemd's own, without fedpriv's environment
                env.update(dict(entry.split("=", 1) for entry in
                                [line.split("=", 1)[1] for line in text.splitlines() if line.startswith("Environment=")]))
                folder = Path(unit["WorkingDirectory"])
                folder.mkdir(parents=True, exist_ok=True)
                name = unit["Description"]
                started = processes.start(name, shlex.split(unit["ExecStart"]), tmp_path / f"{len(processes.processes)}.log",
                                          cwd=folder, env=env)
                if unit["ExecStart"].split()[1] == "launcher":
                    launcher = started
                elif "superlink" in unit["ExecStart"].split()[1]:
                    wait_for_superlink(started, f"127.0.0.1:{ports['8000']}", ca, 90)
                elif "proxy" in unit["ExecStart"].split()[1]:
                    wait_for_proxy(started, f"127.0.0.1:{ports['8443']}", ca, 60)
        # The hospital's SuperNode came online through the proxy, under the name it was registered with.
        deadline = time.monotonic() + 120
        listed: list = []
        while time.monotonic() < deadline:
            listed = _flwr_json([str(venv / "bin" / "flwr"), "supernode", "list", "fedpriv", "--format", "json"],
                                shell_env, 60)["nodes"]
            if any(node.get("status") == "online" for node in listed):
                break
            assert all(p.running() for p in processes.processes if p is not launcher), \
                [p.log_tail() for p in processes.processes]
            time.sleep(1)
        assert [node["status"] for node in listed] == ["online"], listed
        # The launcher's unit names User=fedpriv-app; run here as the keys' owner (no such user on a test
        # machine), it refuses to start, as it would under a wrong User=: it can read A.key.
        assert launcher.wait(timeout=120) != 0
        assert "refused to start: this launcher" in launcher.log_tail() and "can read the SuperNode's private key" \
            in launcher.log_tail() and "A.key" in launcher.log_tail()
        access = (tmp_path / "coordinator" / "proxy" / "logs" / "access.log").read_text()
        assert 'client="CN=A,O=fedpriv federation" verify=SUCCESS' in access
        assert not list((tmp_path / "coordinator").rglob("A.key")) and not list((tmp_path / "coordinator").rglob("A-tls.key"))
        assert share.is_file()
    finally:
        processes.stop_all()
    assert processes.leftovers() == []
