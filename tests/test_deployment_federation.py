"""A real deployment on loopback: a TLS SuperLink with SuperNode authentication and 3 hospital SuperNodes.

One federation (processes started once for the module, stopped by PID at the end) serves every test:
intruders are refused (unregistered key, plain HTTP, an untrusted certificate), then a parallel and a
sequential run of 2 rounds each train on tiny synthetic shares. Each hospital's budget, delta, data and
ledger come from its own node config; the run config asks for a huge budget and another ledger folder
and is ignored. The last test stops everything and checks, by PID, that no process is left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import tomli_w
from cryptography.hazmat.primitives import serialization

from fedpriv.app_config import compose_config
from fedpriv.deployment.approval import app_hash
from fedpriv.deployment.credentials import make_ca, make_supernode_keys
from fedpriv.deployment.processes import (
    ManagedProcess,
    online_nodes,
    run_command,
    supernode_command,
)
from fedpriv.deployment.rehearsal import LocalFederation, free_port
from fedpriv.experiment import prepare_experiment
from fedpriv.privacy.ledger import read_ledger
from fedpriv.simulation import processes_mentioning, terminate_tree

pytestmark = pytest.mark.slow

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
        federation.__enter__()
        yield federation
    finally:
        federation.stop()


def _supernode(federation: LocalFederation, name: str, **kwargs) -> ManagedProcess:
    folder = federation.out / name
    (folder / "ledger").mkdir(parents=True, exist_ok=True)
    node_config = {**federation.hospitals[0].node_config(), "name": name, "ledger": str(folder / "ledger" / "l.db"),
                   "ledger-key": str(folder / "ledger-key" / "l.key")}
    command = supernode_command(superlink=federation.address, node_config=node_config, port=free_port(), **kwargs)
    return federation.processes.start(name, command, folder / "supernode.log", cwd=folder)


def _intruder_key(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    private, _ = make_supernode_keys("intruder")
    path = folder / "intruder.key"
    path.write_bytes(private)
    os.chmod(path, 0o600)
    return path


def test_every_hospital_is_registered_and_online_with_its_own_settings(federation):
    assert {h.node_id for h in federation.hospitals} <= online_nodes(federation.env)
    assert len({h.port for h in federation.hospitals}) == 3
    assert len({h.ledger for h in federation.hospitals}) == 3
    for hospital in federation.hospitals:
        assert (hospital.data / "pneumoniamnist.npz").is_file()
        assert hospital.data.parent == hospital.folder


def test_a_supernode_with_an_unregistered_key_is_refused(federation):
    before = online_nodes(federation.env)
    intruder = _supernode(federation, "intruder", root_certificates=federation.credentials.ca_certificate,
                          auth_key=_intruder_key(federation.out / "intruder"))
    code = intruder.wait(timeout=90)
    assert code != 0
    assert "Failed to" in intruder.log_tail(40)
    assert online_nodes(federation.env) == before


def test_a_plain_connection_to_the_tls_superlink_fails(federation):
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(f"http://{federation.address}/health", timeout=5)
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


def test_an_app_the_hospitals_did_not_approve_never_runs_there(federation, tmp_path):
    """Anyone who reaches the Control API can submit a run; no hospital runs its ClientApp."""
    app = tmp_path / "rogue"
    app.mkdir()
    marker, report = tmp_path / "stolen.txt", tmp_path / "rogue-report.txt"
    (app / "rogue_app.py").write_text(f"MARKER = {str(marker)!r}\nREPORT = {str(report)!r}\n" + ROGUE_APP)
    (app / "pyproject.toml").write_text(tomli_w.dumps({
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {"name": "rogue-app", "version": "1.0.0", "license": "Apache-2.0", "dependencies": []},
        "tool": {"flwr": {"app": {"publisher": "outsider", "config": {"note": ""},
                                  "components": {"serverapp": "rogue_app:server", "clientapp": "rogue_app:client"}}}},
    }))
    rogue_hash = app_hash(app)
    ledgers = {h.name: h.ledger.read_bytes() if h.ledger.exists() else None for h in federation.hospitals}
    run_config = tmp_path / "rogue.toml"
    run_config.write_text('note = "rogue"\n')
    runner = federation.processes.start("rogue run", run_command(app, run_config), tmp_path / "rogue-run.log",
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


def _check_run(federation: LocalFederation, run_dir: Path, previous: dict[str, float]) -> dict[str, float]:
    for artifact in ("metrics.json", "summary.md", "model.pt"):
        assert (run_dir / artifact).is_file(), artifact
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
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
            assert not locked and all(r["status"] == "trained" for r in replies) and len(replies) == 2
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


def test_a_sequential_run_on_the_same_federation(federation, spent):
    sequential = compose_config([*RUN_OVERRIDES, "strategy.mode=sequential", "privacy.epsilon=1000000",
                                 f"federation.ledger_dir={federation.server_ledgers}"])
    outcome = federation.run(sequential, "sequential", timeout=400)
    spent.update(_check_run(federation, outcome.run_dir, spent))
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
