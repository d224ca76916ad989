"""A hospital runs only the app it approved (fedpriv.deployment.approval), checked without a SuperLink.

The whole path, with a real SuperLink and a rogue app, is in tests/test_deployment_federation.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from flwr.proto.task_pb2 import Task
from flwr.supercore.superexec.executor import LaunchResult
from flwr.supercore.superexec.plugin import AutoExecPlugin

from fedpriv.deployment.approval import (
    UnapprovedApp,
    approving_plugin,
    checked_pull,
    fab_hash,
    fedpriv_app_hash,
    parse_approved,
)
from fedpriv.errors import ConfigError

APPROVED = fab_hash(b"the approved app")


class RecordingExecutor:
    """Stands in for Flower's subprocess executor: records what it was asked to start."""

    def __init__(self) -> None:
        self.launched = []

    def launch(self, spec):
        self.launched.append(spec)
        return LaunchResult.accepted()


def _plugin():
    executor = RecordingExecutor()
    plugin = approving_plugin(AutoExecPlugin, frozenset({APPROVED}))(
        runtime_api_address="127.0.0.1:9094", insecure=True, root_certificates_path=None, executor=executor)
    return plugin, executor


def test_the_launcher_starts_nothing_but_clientapps(caplog):
    plugin, executor = _plugin()
    result = plugin.launch_task("token", Task(task_id=1, type="flwr-serverapp", run_id=77, fab_hash=APPROVED))
    assert result == LaunchResult.failed(result.message) and "ClientApps only" in result.message
    assert executor.launched == [] and "refused run 77" in caplog.text


@pytest.mark.parametrize("fab", [fab_hash(b"a rogue app"), "", APPROVED])
def test_every_clientapp_task_is_started_and_an_unapproved_one_is_logged(fab, caplog):
    plugin, executor = _plugin()
    result = plugin.launch_task("token", Task(task_id=2, type="flwr-clientapp", run_id=78, fab_hash=fab))
    # Started, so that the task ends (as fedpriv-approved-clientapp, which checks the bytes: launcher_main
    # maps ClientApp tasks to it; tests/test_deployment_federation.py runs that path).
    assert result == LaunchResult.accepted() and [spec.fab_hash or "" for spec in executor.launched] == [fab]
    assert ("refused run 78" in caplog.text) == (fab != APPROVED)


def test_the_clientapp_refuses_app_bytes_that_are_not_approved_whatever_hash_the_superlink_claims():
    def pull_from(content):
        fab = SimpleNamespace(content=content, hash_str=APPROVED)  # a SuperLink may claim any hash
        return lambda client: ("message", "context", SimpleNamespace(run_id=79), fab)

    answered = []

    def answer(client, message, context, reason):  # the error reply that ends the SuperNode's wait
        answered.append((message, reason))

    with pytest.raises(UnapprovedApp, match="refused run 79"):
        checked_pull(pull_from(b"a rogue app"), frozenset({APPROVED}), answer)(None)
    assert [message for message, _ in answered] == ["message"] and "refused run 79" in answered[0][1]
    assert checked_pull(pull_from(b"the approved app"), frozenset({APPROVED}), answer)(None)[0] == "message"
    assert len(answered) == 1


def test_fedpriv_apps_hash_is_what_flwr_run_uploads(tmp_path):
    from flwr.cli.build import build_fab_from_disk

    from fedpriv.app_config import write_app

    assert fedpriv_app_hash() == fab_hash(build_fab_from_disk(write_app(tmp_path / "app")))
    assert fedpriv_app_hash() == fedpriv_app_hash()  # the same on every machine and every time


@pytest.mark.parametrize("text", ["", "abc", "z" * 64, f"{APPROVED},nothex"])
def test_an_approved_list_that_is_not_sha256_hashes_is_refused(text):
    with pytest.raises(ConfigError, match="sha256"):
        parse_approved(text)
