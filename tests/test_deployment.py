"""Deployment without processes: credentials, hospital node configs, deployed sites and their replies.

The hospital's own settings (data, budget, delta, ledger) come from its SuperNode's node config; these
tests check that bad node configs are refused naming the key, that neither the run config nor the
server's messages can change them, and that a reply carries weights, scalar metrics and a status only.
The real processes (SuperLink, SuperNodes, TLS, authentication) are tested in
test_deployment_federation.py.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    RecordDict,
)
from flwr.common.config import parse_config_args
from flwr.supercore.task_identity import TaskIdentity
from PIL import Image

from fedpriv.app_config import CONFIG_KEY, compose_config, config_to_json
from fedpriv.cli import deploy as deploy_cli
from fedpriv.client_app import app as client_app
from fedpriv.data import load_server_dataset
from fedpriv.data.synthetic import make_synthetic
from fedpriv.deployment import node as node_module
from fedpriv.deployment import proxy as proxy_module
from fedpriv.deployment.client_tls import client_context
from fedpriv.deployment.credentials import make_credentials, placement
from fedpriv.deployment.node import deployed_site, hospital_settings, parse_node_config
from fedpriv.deployment.processes import DeploymentError, node_config_string, supernode_command
from fedpriv.deployment.proxy import ProxySettings, check_proxy_config, nginx_config, write_proxy_config
from fedpriv.deployment.rehearsal import write_share
from fedpriv.devices import resolve_device
from fedpriv.errors import ConfigError, DataError
from fedpriv.models import build_model
from fedpriv.privacy.ledger import read_ledger
from fedpriv.server_app import round_request

pytestmark = pytest.mark.processes  # starts real processes; each test stops what it started

ROOT = Path(__file__).resolve().parents[1]
RUN_OVERRIDES = ["dataset=synthetic", "dataset.num_samples=120", "train.batch_size=8", "train.local_epochs=1", "model.width=4",
                 "train.momentum=0.0"]


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def run_cfg():
    return compose_config(RUN_OVERRIDES)


@pytest.fixture(scope="module")
def share(tmp_path_factory) -> Path:
    """A hospital's data folder holding pneumoniamnist.npz (MedMNIST layout, train and val arrays only:
    a hospital needs no test split) of tiny synthetic images."""
    data = make_synthetic(num_samples=120, size=28, seed=3, val_fraction=0.2, test_fraction=0.2)
    folder = tmp_path_factory.mktemp("share") / "data"
    write_share(folder, "pneumoniamnist", 28, data.train, data.val)
    assert "test_images" not in np.load(folder / "pneumoniamnist.npz").files
    return folder


@pytest.fixture
def node_config(share, tmp_path) -> dict:
    (tmp_path / "ledger").mkdir()
    return {"name": "St-Elsewhere", "data": str(share), "budget-epsilon": 2.5, "delta": 1e-5,
            "ledger": str(tmp_path / "ledger" / "ledger.db"), "threads": 1}


@pytest.fixture
def task_identity():
    """Messages are built as inside a run: Flower needs its task identity set (restored afterwards)."""
    saved = TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 11, 1, 0
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved


def _context(node_config: dict, run_config: dict) -> Context:
    return Context(run_id=11, node_id=5, node_config=dict(node_config), state=RecordDict(),
                   run_config=dict(run_config))


def _run_config(cfg) -> dict:
    return {CONFIG_KEY: config_to_json(cfg), "overrides": "", "run-dir": ""}


def _deliver(message: Message, context: Context) -> Message:
    """Hand a message to the real ClientApp in this process, as a SuperNode would."""
    message.metadata.__dict__["_message_id"] = f"m{id(message)}"
    return client_app(message, context)


def _train_message(cfg, **extra) -> Message:
    model = build_model(cfg.model.name, in_channels=1, num_classes=2, image_size=28, width=cfg.model.width)
    config = {**round_request(cfg, "run-a", num_classes=2).to_record(), "server_round": 1, **extra}
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord(config)}),
                   dst_node_id=5, message_type=MessageType.TRAIN)


# --------------------------------------------------------------------------------- credentials


def test_credentials_are_a_ca_a_server_certificate_and_openssh_p384_keys(tmp_path):
    credentials = make_credentials(tmp_path / "creds", ["A", "B"], ["link.example.org", "10.1.2.3"], days=30)

    ca = x509.load_pem_x509_certificate(credentials.ca_certificate.read_bytes())
    server = x509.load_pem_x509_certificate(credentials.server_certificate.read_bytes())
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(names.get_values_for_type(x509.DNSName)) == {"link.example.org", "localhost"}
    assert {str(ip) for ip in names.get_values_for_type(x509.IPAddress)} == {"10.1.2.3", "127.0.0.1"}
    server_key = serialization.load_pem_private_key(credentials.server_key.read_bytes(), None)
    assert server_key.public_key().public_numbers() == server.public_key().public_numbers()

    for name, hospital in credentials.hospitals.items():
        private = serialization.load_ssh_private_key(hospital.private_key.read_bytes(), None)  # as flower-supernode
        public = serialization.load_ssh_public_key(hospital.registered_key.read_bytes())  # as flwr supernode register
        assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(private.curve, ec.SECP384R1)
        assert private.public_key().public_numbers() == public.public_numbers()
        assert hospital.registered_key.read_bytes() == hospital.public_key.read_bytes()
        assert hospital.ca_certificate.read_bytes() == credentials.ca_certificate.read_bytes()
        assert hospital.private_key.parent.name == name
        # Its TLS client certificate: issued by the CA, for client authentication only, named after it.
        tls = x509.load_pem_x509_certificate(hospital.tls_certificate.read_bytes())
        tls.verify_directly_issued_by(ca)
        usage = tls.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
        assert not tls.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        assert tls.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == name
        tls_key = serialization.load_pem_private_key(hospital.tls_key.read_bytes(), None)
        assert tls_key.public_key().public_numbers() == tls.public_key().public_numbers()
        client_context(credentials.ca_certificate, hospital.tls_certificate, hospital.tls_key)  # loads as a pair
    for secret in (credentials.ca_key, credentials.server_key,
                   *(h.private_key for h in credentials.hospitals.values()),
                   *(h.tls_key for h in credentials.hospitals.values())):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    text = placement(credentials)
    assert "--ssl-certfile" in text and "--auth-supernode-private-key" in text and "--name B" in text
    assert "--tls-client-certificate" in text and "--client-ca" in text


def test_credentials_keys_are_accepted_by_flowers_own_loaders(tmp_path):
    from flwr.cli.supernode.register import try_load_public_key

    credentials = make_credentials(tmp_path, ["A"])
    assert try_load_public_key(credentials.hospitals["A"].registered_key)


def test_credentials_refuse_to_overwrite_and_leave_files_untouched(tmp_path):
    first = make_credentials(tmp_path, ["A"])
    before = first.ca_certificate.read_bytes()
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        make_credentials(tmp_path, ["A", "B"])
    assert first.ca_certificate.read_bytes() == before
    assert not (tmp_path / "hospitals" / "B").exists()
    assert make_credentials(tmp_path, ["A"], overwrite=True).ca_certificate.read_bytes() != before


@pytest.mark.parametrize("hospitals", [["A", "A"], ["bad name"], [], ["../etc"]])
def test_credentials_reject_bad_hospital_lists(tmp_path, hospitals):
    with pytest.raises(ConfigError) as error:
        make_credentials(tmp_path, hospitals)
    assert error.value.key == "hospitals"
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------------- node configuration


def test_node_config_string_round_trips_through_flowers_parser(tmp_path):
    values = {"name": 'Saint "Q" Hospital', "data": str(tmp_path / "a folder" / "x.npz"), "budget-epsilon": 3.0,
              "delta": 1e-5, "allow-non-private": False, "threads": 2, "skipped": None}
    parsed = parse_config_args([node_config_string(values)])
    assert parsed == {key: value for key, value in values.items() if value is not None}


def test_supernode_command_has_tls_and_authentication(tmp_path):
    command = supernode_command(superlink="link:8443", node_config={"name": "A"}, root_certificates=tmp_path / "ca",
                                auth_key=tmp_path / "A.key", port=9100, client_certificate=tmp_path / "A-tls.crt",
                                client_key=tmp_path / "A-tls.key")
    assert Path(command[0]).is_absolute() and Path(command[0]).name == "fedpriv-supernode"
    flags = dict(zip(command[1::2], command[2::2]))
    assert flags["--root-certificates"].endswith("ca") and flags["--auth-supernode-private-key"].endswith("A.key")
    assert flags["--tls-client-certificate"].endswith("A-tls.crt") and flags["--tls-client-key"].endswith("A-tls.key")
    assert flags["--port"] == "9100" and "--insecure" not in command
    with pytest.raises(ValueError, match="needs its key"):
        supernode_command(superlink="link:8443", node_config={}, root_certificates=None, auth_key=None,
                          client_certificate=tmp_path / "A-tls.crt")


# ------------------------------------------------------------------------------------ the proxy


@pytest.fixture(scope="module")
def proxy_credentials(tmp_path_factory):
    return make_credentials(tmp_path_factory.mktemp("proxy-creds"), ["A"])


def _proxy_settings(credentials, prefix: Path, **changes) -> ProxySettings:
    values = dict(prefix=prefix, listen="0.0.0.0:8443", superlink="127.0.0.1:8000",
                  certificate=credentials.server_certificate, key=credentials.server_key,
                  client_ca=credentials.ca_certificate)
    return ProxySettings(**{**values, **changes})


def test_the_proxy_config_demands_client_certificates_and_forwards_only_the_fleet_api(proxy_credentials, tmp_path):
    settings = _proxy_settings(proxy_credentials, tmp_path / "proxy")
    text = write_proxy_config(settings).read_text()
    check_proxy_config(settings)  # nginx itself accepts it (`nginx -t`)
    assert "ssl_verify_client on;" in text
    assert f'ssl_client_certificate "{proxy_credentials.ca_certificate}";' in text
    assert "listen 0.0.0.0:8443 ssl;" in text and "server 127.0.0.1:8000;" in text
    locations = [line.strip() for line in text.splitlines() if line.strip().startswith("location")]
    assert locations == ["location /v1/fleet/ {", "location / {"]
    fleet, rest = text.split("location /v1/fleet/ {")[1].split("location / {")
    assert "proxy_pass https://superlink/v1/fleet/;" in fleet and "proxy_ssl_verify on;" in fleet
    assert "limit_except POST" in fleet
    assert "return 403;" in rest and "proxy_pass" not in rest
    # Everything nginx writes stays under its own prefix (no /var/log, /run or /var/lib needed).
    directives = [line.strip() for line in text.splitlines() if not line.lstrip().startswith("#")]
    assert not any(line.startswith("daemon") for line in directives)  # `-g 'daemon off;'` sets it
    assert str(settings.prefix / "nginx.pid") in text
    assert "/var/" not in text and "/run/" not in text


def test_the_proxy_refuses_bad_settings_and_missing_files_with_one_clear_error(proxy_credentials, tmp_path):
    with pytest.raises(DeploymentError, match="is not HOST:PORT"):
        nginx_config(_proxy_settings(proxy_credentials, tmp_path, listen="8443"))
    with pytest.raises(DeploymentError, match="TLS file not found"):
        write_proxy_config(_proxy_settings(proxy_credentials, tmp_path, key=tmp_path / "missing.key"))
    with pytest.raises(DeploymentError, match="may not contain"):
        nginx_config(_proxy_settings(proxy_credentials, tmp_path / "a;b"))


def test_without_nginx_the_proxy_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(proxy_module.shutil, "which", lambda name: None)
    monkeypatch.setattr(proxy_module, "_SBIN", ())
    with pytest.raises(DeploymentError, match="apt-get install nginx-light"):
        proxy_module.find_nginx()


@pytest.mark.parametrize("key", ["name", "data", "budget-epsilon", "delta", "ledger"])
def test_a_missing_node_config_key_is_named(node_config, key):
    del node_config[key]
    with pytest.raises(ConfigError) as error:
        parse_node_config(node_config)
    assert error.value.key == key
    assert "node config" in str(error.value)


@pytest.mark.parametrize(("key", "value"), [
    ("budget-epsilon", -1.0), ("budget-epsilon", "lots"), ("budget-epsilon", math.inf), ("budget-epsilon", True),
    ("delta", 1.5), ("delta", 0), ("dataset", "notamedmnistflag"), ("accountant", "gdp"),
    ("allow-non-private", "maybe"), ("threads", 0), ("data", "/no/such/folder"), ("ledger", "/no/such/dir/l.db"),
    ("name", ""), ("max-epsilon-per-round", 0), ("max-epsilon-per-run", "inf"), ("max-epsilon-per-run", -2),
    ("min-noise-multiplier", 0.1), ("max-local-epochs", 0), ("share-validation-metrics", "perhaps"),
])
def test_an_invalid_node_config_value_is_named(node_config, key, value):
    node_config[key] = value
    with pytest.raises(ConfigError) as error:
        parse_node_config(node_config)
    assert error.value.key == key


def test_a_hospitals_own_limits_come_from_its_node_config(node_config):
    settings = hospital_settings(parse_node_config({
        **node_config, "max-epsilon-per-round": 0.4, "max-epsilon-per-run": "1.5", "min-noise-multiplier": 0.8,
        "max-local-epochs": 3, "share-validation-metrics": "true"}))
    assert (settings.max_epsilon_per_round, settings.max_epsilon_per_run) == (0.4, 1.5)
    assert (settings.min_noise_multiplier, settings.max_local_epochs, settings.share_validation_metrics) == (0.8, 3, True)
    plain = hospital_settings(parse_node_config(node_config))
    assert plain.max_epsilon_per_round is None and plain.max_epsilon_per_run is None
    assert not plain.share_validation_metrics  # metrics on private validation data: opt-in only


def test_a_ledger_path_that_is_a_folder_is_refused(node_config, tmp_path):
    node_config["ledger"] = str(tmp_path / "ledger")
    with pytest.raises(ConfigError) as error:
        parse_node_config(node_config)
    assert error.value.key == "ledger"


def test_deployed_site_takes_budget_data_and_ledger_from_the_node_only(node_config, run_cfg, tmp_path):
    greedy = compose_config([*RUN_OVERRIDES, "privacy.epsilon=1000000", "privacy.delta=0.5",
                             f"federation.ledger_dir={tmp_path / 'server-chosen'}", "model.width=8"])
    site = deployed_site(_context(node_config, _run_config(greedy)))
    assert site.settings.budget_epsilon == 2.5
    assert site.settings.delta == 1e-5
    assert site.settings.ledger_path == Path(node_config["ledger"])
    assert site.settings.name == "St-Elsewhere"
    assert not site.settings.allow_non_private
    assert site.config.model.width == 8  # the architecture does come from the run config
    assert (site.in_channels, site.num_classes, site.image_size) == (1, 2, 28)
    assert len(site.train) == 72 and len(site.validation) == 24  # the npz's train and val splits

    # The Hydra-overrides route of the run config changes nothing either.
    overrides = {CONFIG_KEY: "", "overrides": " ".join([*RUN_OVERRIDES, "privacy.epsilon=1000000"])}
    assert deployed_site(_context(node_config, overrides)).settings.budget_epsilon == 2.5


def test_deployed_site_caches_the_data_per_node_config(node_config, run_cfg):
    first = deployed_site(_context(node_config, _run_config(run_cfg)))
    again = deployed_site(_context(node_config, _run_config(run_cfg)))
    assert again.train is first.train
    other = deployed_site(_context({**node_config, "name": "Other"}, _run_config(run_cfg)))
    assert other.settings.name == "Other"
    assert node_module._DATA and len(node_module._DATA) == 1


def test_deployed_site_reads_an_npz_file_and_an_image_folder(node_config, share, run_cfg, tmp_path):
    node_config["data"] = str(share / "pneumoniamnist.npz")
    assert len(deployed_site(_context(node_config, _run_config(run_cfg))).train) == 72

    renamed = tmp_path / "mine.npz"
    renamed.write_bytes((share / "pneumoniamnist.npz").read_bytes())
    with pytest.raises(ConfigError) as error:
        deployed_site(_context({**node_config, "data": str(renamed)}, _run_config(run_cfg)))
    assert error.value.key == "data"

    rng = np.random.default_rng(0)
    for label in ("normal", "opacity"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(tmp_path / "images" / label / f"{i}.png")
    site = deployed_site(_context({**node_config, "data": str(tmp_path / "images")}, _run_config(run_cfg)))
    assert (site.num_classes, site.image_size) == (2, 28)
    assert (len(site.train), len(site.validation)) == (20, 0)  # every image trains: nothing held out silently
    held = deployed_site(_context({**node_config, "data": str(tmp_path / "images"), "val-fraction": 0.2},
                                  _run_config(run_cfg)))
    assert (len(held.train), len(held.validation)) == (16, 4)  # the hospital's own, stratified hold-out
    assert set(held.validation.labels.tolist()) == {0, 1}
    assert not set(held.train.ids()) & set(held.validation.ids())
    with pytest.raises(ConfigError) as error:  # an npz brings its own val split
        parse_node_config({**node_config, "val-fraction": 0.2, "data": str(share / "pneumoniamnist.npz")})
    assert error.value.key == "val-fraction"


def test_a_deployed_image_folder_protects_the_patients_its_attributes_csv_names(node_config, share, run_cfg,
                                                                                 task_identity, tmp_path):
    folder, rng, rows = tmp_path / "images", np.random.default_rng(1), ["path,patient_id"]
    for label in ("normal", "opacity"):
        (folder / label).mkdir(parents=True)
        for i in range(24):  # 24 patients of 2 images each
            Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(folder / label / f"{i}.png")
            rows.append(f"{label}/{i}.png,{label}-{i // 2}")
    (folder / "attributes.csv").write_text("\n".join(rows) + "\n")
    config = {**node_config, "data": str(folder), "attributes-csv": "attributes.csv", "privacy-unit": "patient",
              "val-fraction": 0.25, "min-records": 2}
    context = _context(config, _run_config(run_cfg))
    site = deployed_site(context)
    trained, held = set(site.train.patient_ids.tolist()), set(site.validation.patient_ids.tolist())
    assert held and not trained & held and len(trained | held) == 24  # whole patients held out
    assert len(site.train) == 2 * len(trained)
    reply = _deliver(_train_message(run_cfg), context)
    assert reply.content["status"]["status"] == "trained", dict(reply.content["status"])
    assert dict(reply.content["metrics"])["num-examples"] == len(trained)  # records are patients
    with read_ledger(config["ledger"]) as ledger:  # each trained patient was charged once, the held-out never
        assert all(len(ledger.record_history(patient)[0]) == 1 for patient in trained)
        assert all(not ledger.record_history(patient)[0] for patient in held)

    # Patient-level DP without patient ids is refused when the node loads its data, before any round:
    # its answer to the run's opening query is a refusal naming the fix, and nothing is charged.
    unnamed = {**config, "attributes-csv": "", "ledger": str(tmp_path / "ledger" / "other.db")}
    with pytest.raises(ConfigError, match="carries no patient ids") as error:
        deployed_site(_context(unnamed, _run_config(run_cfg)))
    assert error.value.key == "privacy-unit"
    query = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=5, message_type=MessageType.QUERY)
    answer = dict(_deliver(query, _context(unnamed, _run_config(run_cfg))).content["status"])
    assert answer["status"] == "refused" and "privacy-unit" in answer["message"], answer
    assert not (tmp_path / "ledger" / "other.db").exists()
    for bad in ({"attributes-csv": "missing.csv"}, {"data": str(share / "pneumoniamnist.npz")}):
        with pytest.raises(ConfigError) as error:
            parse_node_config({**config, "val-fraction": "", **bad})
        assert error.value.key == "attributes-csv"


def test_a_hospital_npz_needs_train_only_and_the_coordinator_test_only(node_config, share, run_cfg, tmp_path):
    data = make_synthetic(num_samples=120, size=28, seed=4, val_fraction=0.2, test_fraction=0.2)
    only_train = write_share(tmp_path / "hospital", "pneumoniamnist", 28, data.train, None)
    site = deployed_site(_context({**node_config, "data": str(only_train)}, _run_config(run_cfg)))
    assert (len(site.train), len(site.validation)) == (72, 0)  # no val arrays: no validation split
    only_test = write_share(tmp_path / "coordinator", "pneumoniamnist", 28, None, None, data.test)
    cfg = compose_config(["dataset=pneumoniamnist", f"dataset.root={only_test.parent}"])
    coordinator = load_server_dataset(cfg.dataset, cfg.seed)
    assert (len(coordinator.train), len(coordinator.val), len(coordinator.test)) == (0, 0, 24)
    assert (coordinator.in_channels, coordinator.image_size) == (1, 28)
    assert coordinator.describe().startswith("pneumoniamnist: 24 test images, 1x28x28")  # no "0/0/24"
    with pytest.raises(DataError, match="lacks the key 'test_images'"):  # the coordinator does need its test split
        cfg = compose_config(["dataset=pneumoniamnist", f"dataset.root={only_train.parent}"])
        load_server_dataset(cfg.dataset, cfg.seed)


def test_deployed_site_refuses_records_the_runs_model_cannot_take(node_config, share):
    four_classes = compose_config([*RUN_OVERRIDES, "dataset.name=octmnist"])
    with pytest.raises(ConfigError, match="4 classes") as error:
        deployed_site(_context(node_config, _run_config(four_classes)))
    assert error.value.key == "data"
    node_config["data"] = str(share / "pneumoniamnist.npz")  # 28-pixel images
    bigger = compose_config([*RUN_OVERRIDES, "dataset.size=64"])
    with pytest.raises(ConfigError, match="dataset.size=64") as error:
        deployed_site(_context(node_config, _run_config(bigger)))
    assert error.value.key == "data"


# --------------------------------------------------------------------- what leaves a hospital


def _assert_only_scalars_leave(reply: Message, allowed: set[str]) -> None:
    assert not reply.has_error(), reply.error if reply.has_error() else ""
    assert set(reply.content.keys()) <= allowed
    assert {type(value) for value in dict(reply.content["metrics"]).values()} <= {int, float}
    assert {type(value) for value in dict(reply.content["status"]).values()} <= {str}
    # The accountant's name is the hospital's own setting and the device its hardware: neither is a
    # function of its records.
    status = dict(reply.content["status"])
    assert set(status) <= {"hospital", "status", "message", "chain-head", "accountant", "device"}
    assert status.get("device", "") in {"", resolve_device("auto")}  # the node's own device, if it trained


def test_a_train_reply_carries_weights_scalar_metrics_and_status_only(node_config, run_cfg, task_identity):
    context = _context(node_config, _run_config(run_cfg))
    # The server tries to hand out budget, delta, ledger and data: none of it is a training setting.
    message = _train_message(run_cfg, budget_epsilon=1e9, delta=0.9, ledger="/tmp/evil.db", data="/tmp/evil",
                             max_epsilon=1e9)
    reply = _deliver(message, context)
    _assert_only_scalars_leave(reply, {"arrays", "metrics", "status"})
    assert set(reply.content.keys()) == {"arrays", "metrics", "status"}
    metrics = dict(reply.content["metrics"])
    assert reply.content["status"]["status"] == "trained"
    assert metrics["budget-epsilon"] == 2.5 and metrics["delta"] == 1e-5
    status = read_ledger(node_config["ledger"]).status()
    assert status.budget_epsilon == 2.5
    assert metrics["epsilon"] == pytest.approx(status.epsilon_spent)
    assert not Path("/tmp/evil.db").exists()
    assert node_config["data"] not in str(dict(reply.content["status"]))


def test_evaluate_and_query_replies_carry_scalar_metrics_and_status_only(node_config, run_cfg, task_identity):
    context = _context(node_config, _run_config(run_cfg))
    train = _train_message(run_cfg)
    arrays = train.content["arrays"]
    evaluate = Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server_round": 1})}), dst_node_id=5,
                       message_type=MessageType.EVALUATE)
    declined = _deliver(evaluate, context)
    _assert_only_scalars_leave(declined, {"metrics", "status"})
    # By default a hospital shares no metric computed on its private validation split (not DP-covered).
    assert declined.content["status"]["status"] == "declined"
    assert dict(declined.content["metrics"]) == {"num-examples": 0, "dp-covered": 0.0}
    shared = _deliver(evaluate, _context({**node_config, "share-validation-metrics": "true"}, _run_config(run_cfg)))
    _assert_only_scalars_leave(shared, {"metrics", "status"})
    assert shared.content["metrics"]["num-examples"] > 0 and shared.content["metrics"]["dp-covered"] == 0.0
    assert "NOT covered" in shared.content["status"]["message"]
    query = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=5, message_type=MessageType.QUERY)
    reply = _deliver(query, context)
    _assert_only_scalars_leave(reply, {"metrics", "status"})
    assert reply.content["status"]["hospital"] == "St-Elsewhere"
    assert reply.content["metrics"]["budget-epsilon"] == 2.5


@pytest.mark.parametrize("bad, key", [
    ({"logit_shift": [0.1, 0.2, 0.3]}, "class_prior"), ({"logit_shift": [0.0, math.inf]}, "class_prior"),
    ({"lr": -1.0}, "train.lr"), ({"lr_final": 0.0}, "train.lr_final"), ({"momentum": 1.0}, "train.momentum"),
])
def test_a_training_request_that_cannot_work_is_refused_before_any_budget_is_spent(node_config, run_cfg,
                                                                                   task_identity, bad, key):
    reply = _deliver(_train_message(run_cfg, **bad), _context(node_config, _run_config(run_cfg)))
    assert reply.content["status"]["status"] == "refused"
    assert key in reply.content["status"]["message"] and "arrays" not in reply.content
    ledger = Path(node_config["ledger"])
    assert not ledger.exists() or read_ledger(ledger).status().epsilon_spent == 0


def test_a_non_private_request_is_refused_unless_the_hospital_allows_it(node_config, run_cfg, task_identity):
    non_private = compose_config([*RUN_OVERRIDES, "privacy=none"])
    reply = _deliver(_train_message(non_private), _context(node_config, _run_config(non_private)))
    assert reply.content["status"]["status"] == "refused"
    assert "arrays" not in reply.content


# ------------------------------------------------------------------------------------ the CLI


def _cli(*args: str) -> subprocess.CompletedProcess:
    """`fedpriv-deploy ARGS` through its entry point in this process, from the project folder: its exit
    code and what it printed (a fresh interpreter per call would cost seconds each; the documented
    commands run as real processes in test_deployment_federation.py). Signal handlers are restored."""
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.chdir(ROOT), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = deploy_cli.main(list(args))
            except SystemExit as done:  # argparse's usage errors
                code = done.code if isinstance(done.code, int) else int(done.code is not None)
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
    return subprocess.CompletedProcess(["fedpriv-deploy", *args], code, out.getvalue(), err.getvalue())


def test_cli_credentials_and_node_print_command(tmp_path, share):
    made = _cli("credentials", "--hospitals", "A,B", "--out", str(tmp_path / "creds"), "--hosts", "link.example.org")
    assert made.returncode == 0, made.stderr
    assert "Hospital B" in made.stdout and (tmp_path / "creds" / "hospitals" / "B" / "B.key").is_file()
    assert (tmp_path / "creds" / "hospitals" / "B" / "B-tls.crt").is_file()
    assert _cli("credentials", "--hospitals", "A", "--out", str(tmp_path / "creds")).returncode == 2

    hospital = tmp_path / "creds" / "hospitals" / "A"
    (tmp_path / "ledgers").mkdir()
    node = ["node", "--name", "A", "--data", str(share), "--budget-epsilon", "3", "--delta", "1e-5",
            "--ledger", str(tmp_path / "ledgers" / "A.db"), "--superlink", "link.example.org:8443",
            "--root-certificates", str(hospital / "ca.crt"), "--auth-key", str(hospital / "A.key"),
            "--tls-certificate", str(hospital / "A-tls.crt"), "--tls-key", str(hospital / "A-tls.key"),
            "--port", "9101"]
    printed = _cli(*node, "--print-command")
    assert printed.returncode == 0, printed.stderr
    bin_dir = Path(sys.executable).parent
    # Works as printed without the environment on PATH (a systemd unit): PATH set, executables absolute.
    assert f"/usr/bin/env PATH={bin_dir}:" in printed.stdout
    assert f"{bin_dir / 'fedpriv-supernode'} --tls-client-certificate {hospital / 'A-tls.crt'}" in printed.stdout
    assert "--superlink link.example.org:8443" in printed.stdout
    assert "--auth-supernode-private-key" in printed.stdout and "budget-epsilon=3.0" in printed.stdout
    # The SuperNode runs no app code itself; its launcher runs only fedpriv's own app (by default).
    assert "--isolation process" in printed.stdout
    own = _cli("app-hash")
    assert own.returncode == 0 and len(own.stdout.strip()) == 64
    assert f"{bin_dir / 'fedpriv-hospital-exec'} --approved-apps {own.stdout.strip()} " \
        "--runtime-api-address 127.0.0.1:9101" in printed.stdout
    assert _cli(*node, "--approved-apps", "not-a-hash", "--print-command").returncode == 2

    bad = _cli(*[arg if arg != "1e-5" else "2" for arg in node], "--print-command")
    assert bad.returncode == 2 and "delta=2.0" in bad.stderr
    missing = _cli(*[arg if not arg.endswith("A-tls.key") else str(tmp_path / "nope.key") for arg in node],
                   "--print-command")
    assert missing.returncode == 2 and "nope.key" in missing.stderr and "Traceback" not in missing.stderr


def test_the_node_command_passes_the_patient_settings_to_the_node_config(tmp_path, share):
    from fedpriv.cli.deploy import _parser, node_config_from_args

    (tmp_path / "ledgers").mkdir()
    (tmp_path / "images" / "normal").mkdir(parents=True)
    (tmp_path / "images" / "attributes.csv").write_text("path,patient_id\n")
    base = ["node", "--name", "A", "--budget-epsilon", "3", "--delta", "1e-5", "--ledger", str(tmp_path / "ledgers" / "A.db"),
            "--superlink", "h:1", "--root-certificates", "ca", "--auth-key", "k", "--tls-certificate", "c", "--tls-key", "t"]
    args = _parser().parse_args([*base, "--data", str(tmp_path / "images"), "--privacy-unit", "patient",
                                 "--max-images-per-patient", "4", "--attributes-csv", str(tmp_path / "images" / "attributes.csv")])
    settings = parse_node_config(node_config_from_args(args))
    assert (settings.privacy_unit, settings.max_images_per_patient) == ("patient", 4)
    assert settings.attributes_csv == tmp_path / "images" / "attributes.csv"
    plain = parse_node_config(node_config_from_args(_parser().parse_args([*base, "--data", str(share)])))
    assert (plain.privacy_unit, plain.max_images_per_patient, plain.attributes_csv) == ("image", None, None)


def test_cli_superlink_and_proxy_print_their_commands(tmp_path):
    creds = tmp_path / "creds" / "coordinator"
    assert _cli("credentials", "--hospitals", "A", "--out", str(tmp_path / "creds")).returncode == 0
    tls = ["--ssl-certfile", str(creds / "server.pem"), "--ssl-keyfile", str(creds / "server.key")]
    link = _cli("superlink", "--ssl-ca-certfile", str(creds / "ca.crt"), *tls, "--print-command")
    assert link.returncode == 0, link.stderr
    bin_dir = Path(sys.executable).parent
    assert f"/usr/bin/env PATH={bin_dir}:" in link.stdout  # flower-superlink starts flower-superexec by name
    assert f"{bin_dir / 'flower-superlink'} " in link.stdout and "--host 127.0.0.1 " in link.stdout
    assert "--enable-supernode-auth" in link.stdout and link.stderr == ""
    exposed = _cli("superlink", "--ssl-ca-certfile", str(creds / "ca.crt"), *tls, "--host", "0.0.0.0",
                   "--print-command")
    assert exposed.returncode == 0 and "exposes the Control API" in exposed.stderr

    proxy = _cli("proxy", *tls, "--client-ca", str(creds / "ca.crt"), "--prefix", str(tmp_path / "proxy"),
                 "--listen", "0.0.0.0:9443", "--print-command")
    assert proxy.returncode == 0, proxy.stderr
    assert f"-c {tmp_path / 'proxy' / 'nginx.conf'} -p {tmp_path / 'proxy'}/ -g 'daemon off;'" in proxy.stdout
    assert "listen 0.0.0.0:9443 ssl;" in (tmp_path / "proxy" / "nginx.conf").read_text()
    bad = _cli("proxy", *tls, "--client-ca", str(tmp_path / "no-ca.crt"), "--prefix", str(tmp_path / "p2"),
               "--print-command")
    assert bad.returncode == 1 and "TLS file not found" in bad.stderr and "Traceback" not in bad.stderr


def test_cli_local_checks_the_config_before_starting_anything(tmp_path):
    result = _cli("local", "--hospitals", "0", "--out", str(tmp_path / "out"), "dataset=synthetic")
    assert result.returncode == 2
    assert "federation.num_hospitals" in result.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ hospital-owned keys (issue 19, item 3)


_OPENED: list[tuple[str, object, object]] | None = None  # (path, mode, flags) while a test listens


def _note_open(event: str, args: tuple) -> None:
    if _OPENED is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append((os.fsdecode(args[0]), args[1], args[2]))


sys.addaudithook(_note_open)  # permanent for the process, but records only while _OPENED is a list


def _read_opens(opened: list[tuple[str, object, object]]) -> set[str]:
    """Paths opened for reading (builtins.open with an 'r' or '+' mode, os.open without O_WRONLY)."""
    read = set()
    for path, mode, flags in opened:
        if isinstance(mode, str):
            reading = "r" in mode or "+" in mode
        else:
            reading = isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR) != os.O_WRONLY
        if reading:
            read.add(str(Path(path).resolve()))
    return read


def test_the_rehearsal_keeps_each_hospitals_private_keys_in_its_own_folder_unread(tmp_path):
    """Hospitals make their keys and requests; the coordinator signs and registers, never opening a private key."""
    global _OPENED
    from fedpriv.deployment.rehearsal import LocalFederation
    from fedpriv.experiment import prepare_experiment

    experiment = prepare_experiment(compose_config([*RUN_OVERRIDES, "federation.num_hospitals=2"]))
    federation = LocalFederation(experiment, tmp_path / "out", budgets=[3.0, 3.0])
    _OPENED = []
    try:
        federation.prepare()
        opened = list(_OPENED)
    finally:
        _OPENED = None
    out = federation.out
    private = {h.name: (h.private_key, h.tls_key) for h in federation.hospitals}
    for hospital in federation.hospitals:
        keys = hospital.folder / "keys"
        assert all(path.parent == keys and stat.S_IMODE(path.stat().st_mode) == 0o600 for path in private[hospital.name])
        # What came back fits the hospital's own key: the certificate is for its TLS key, clientAuth, CN=its name.
        certificate = x509.load_pem_x509_certificate(hospital.tls_certificate.read_bytes())
        tls_key = serialization.load_pem_private_key(hospital.tls_key.read_bytes(), None)
        assert certificate.public_key().public_numbers() == tls_key.public_key().public_numbers()
        assert certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == hospital.name
        assert certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == \
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
        # The coordinator registers its own copy of the public key, which matches the hospital's private key.
        assert hospital.public_key.is_relative_to(out / "credentials" / "coordinator")
        ssh_private = serialization.load_ssh_private_key(hospital.private_key.read_bytes(), None)
        ssh_public = serialization.load_ssh_public_key(hospital.public_key.read_bytes())
        assert ssh_private.public_key().public_numbers() == ssh_public.public_numbers()
    secrets = [path.read_bytes() for pair in private.values() for path in pair]
    coordinator_files = [path for path in (out / "credentials").rglob("*") if path.is_file()]
    assert not any(path.read_bytes() in secrets for path in coordinator_files)  # no copy of any hospital key
    assert {p.name for p in coordinator_files if b"PRIVATE KEY" in p.read_bytes()} == {"ca.key", "server.key"}
    # During the whole preparation no hospital private key was opened for reading: only created.
    paths = {str(path.resolve()) for pair in private.values() for path in pair}
    assert paths <= {str(Path(path).resolve()) for path, _, _ in opened}  # the listener did see them being written
    assert not paths & _read_opens(opened)
    assert str(federation.credentials.ca_key) in _read_opens(opened)  # ... while it saw the CA key being read


def test_cli_hospital_keys_then_sign_with_one_clear_error_for_bad_requests(tmp_path):
    assert _cli("credentials", "--out", str(tmp_path / "creds")).returncode == 0
    assert not (tmp_path / "creds" / "hospitals").exists()  # the coordinator makes no hospital key by default
    made = _cli("hospital-keys", "--name", "A", "--out", str(tmp_path / "siteA"))
    assert made.returncode == 0, made.stderr
    assert "Send to the coordinator" in made.stdout and "A-tls.csr" in made.stdout
    assert _cli("hospital-keys", "--name", "A", "--out", str(tmp_path / "siteA")).returncode == 2  # no overwrite
    ca = ["--ca-key", str(tmp_path / "creds" / "ca" / "ca.key"), "--ca-cert",
          str(tmp_path / "creds" / "coordinator" / "ca.crt")]
    signed = _cli("sign", "--csr", str(tmp_path / "siteA" / "A-tls.csr"), *ca, "--out", str(tmp_path / "A-tls.crt"),
                  "--name", "A")
    assert signed.returncode == 0, signed.stderr
    certificate = x509.load_pem_x509_certificate((tmp_path / "A-tls.crt").read_bytes())
    assert not certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    wrong_name = _cli("sign", "--csr", str(tmp_path / "siteA" / "A-tls.csr"), *ca, "--out", str(tmp_path / "B.crt"),
                      "--name", "B")
    assert wrong_name.returncode == 2 and "is for 'A'" in wrong_name.stderr and "Traceback" not in wrong_name.stderr
    (tmp_path / "bad.csr").write_text("not a request")
    bad = _cli("sign", "--csr", str(tmp_path / "bad.csr"), *ca, "--out", str(tmp_path / "bad.crt"))
    assert bad.returncode == 2 and "bad.csr" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "bad.crt").exists() and not (tmp_path / "B.crt").exists()


def test_waiting_for_a_service_names_it_when_it_exits_and_returns_once_ready(tmp_path):
    import os
    import sys

    from fedpriv.deployment.processes import ProcessSet, wait_until_ready

    with ProcessSet(os.environ) as processes:
        quitter = processes.start("quitter", [sys.executable, "-c", "print('bad config'); raise SystemExit(3)"],
                                  tmp_path / "quitter.log")
        with pytest.raises(DeploymentError, match=r"nginx exited with code 3; see .*quitter.log:\nbad config"):
            wait_until_ready(quitter, "nginx", lambda: False, timeout=60)
        sleeper = processes.start("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"],
                                  tmp_path / "sleeper.log")
        calls = []
        wait_until_ready(sleeper, "sleeper", lambda: calls.append(1) or len(calls) >= 3, timeout=60)
        assert len(calls) == 3 and sleeper.running()
        with pytest.raises(DeploymentError, match="sleeper did not answer on 127.0.0.1:9 within 0s"):
            wait_until_ready(sleeper, "sleeper", lambda: False, timeout=0, what="answer on 127.0.0.1:9")
    assert not sleeper.running()  # the set stopped it (by its PID)
