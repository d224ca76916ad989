"""A hospital's ClientApps run as an OS user that cannot read the SuperNode's private keys (issue 19, item 2).

`fedpriv-deploy node --clientapp-user NAME` (as root) checks NAME against the keys, the data, the
ledger and the ledger key before anything starts, then starts the launcher as NAME with no
supplementary groups. The first test drives that real code path with `nobody` and a stand-in for
the launcher (the real one needs a live SuperNode, and this machine's Python environment lies under
/root, which `nobody` cannot enter; the stand-in is the system Python running fedpriv's own
launcher-side check). The rest are the refusals, as fast unit tests.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fedpriv.cli import deploy
from fedpriv.deployment import app_user, processes
from fedpriv.deployment.app_user import AppUser, check_app_user, lookup_app_user, start_as, unreadable_problem
from fedpriv.deployment.approval import launcher_main
from fedpriv.errors import ConfigError

pytestmark = pytest.mark.processes  # starts real processes; each test stops what it started

ROOT = Path(__file__).resolve().parents[1]
HASH = "ab" * 32
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="starting or checking another user's access needs root")

# The launcher's stand-in: runs fedpriv's launcher-side check, then starts a child (as the launcher
# starts a ClientApp) that tries to read the key; both report to $HOME/probe.json.
PROBE = r"""
import json, os, subprocess, sys
from fedpriv.deployment.app_user import unreadable_problem
key = os.environ["PROBE_KEY"]
child = subprocess.run([sys.executable, "-c", '''
import json, os, sys
try:
    open(sys.argv[1], "rb").read()
    result = "read"
except PermissionError as error:
    result = type(error).__name__
print(json.dumps({"uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(), "groups": os.getgroups(),
                  "read": result}))
''', key], capture_output=True, text=True)
report = {"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(), "argv": sys.argv[1:],
          "launcher_check": unreadable_problem([key]), "child": json.loads(child.stdout),
          "flwr_home": os.environ.get("FLWR_HOME")}
with open(os.path.join(os.environ["HOME"], "probe.json"), "w") as out:
    json.dump(report, out)
"""


@pytest.fixture
def site():
    """A hospital's folders where `nobody` may enter (/tmp, mode 755), as a deployment would lay them out.

    Keys root-owned 0600; data world-readable; ledger and ledger-key folders owned by nobody.
    """
    if os.geteuid() != 0:
        pytest.skip("needs root (chown)")
    top = Path(tempfile.mkdtemp(prefix="fedpriv-app-user-", dir="/tmp"))
    os.chmod(top, 0o755)
    nobody = lookup_app_user("nobody")
    keys, data, ledger, ledger_key, home = (top / n for n in ("keys", "xrays", "ledger", "ledger-key", "app-home"))
    keys.mkdir(mode=0o755)
    for name in ("A.key", "A-tls.key"):
        (keys / name).write_bytes(b"-----BEGIN OPENSSH PRIVATE KEY----- stand-in\n")
        os.chmod(keys / name, 0o600)
    for name in ("ca.crt", "A-tls.crt"):
        (keys / name).write_text("stand-in certificate\n")
    data.mkdir(mode=0o755)
    from tests.test_deployment_federation import make_share

    share = make_share(data)
    os.chmod(share, 0o644)
    for folder in (ledger, ledger_key, home):
        folder.mkdir(mode=0o700)
        os.chown(folder, nobody.uid, nobody.gid)
    yield {"top": top, "keys": keys, "data": data, "ledger": ledger / "ledger.db", "ledger_key": ledger_key / "ledger.key",
           "home": home, "user": nobody}
    shutil.rmtree(top, ignore_errors=True)


def _node_args(site, *extra: str) -> list[str]:
    keys = site["keys"]
    return ["node", "--name", "A", "--data", str(site["data"]), "--budget-epsilon", "3", "--delta", "1e-5",
            "--ledger", str(site["ledger"]), "--superlink", "127.0.0.1:1", "--root-certificates", str(keys / "ca.crt"),
            "--auth-key", str(keys / "A.key"), "--tls-certificate", str(keys / "A-tls.crt"),
            "--tls-key", str(keys / "A-tls.key"), "--approved-apps", HASH, "--port", "9199", *extra]


def _check(site, **changes) -> None:
    values = {"secret_keys": [site["keys"] / "A.key", site["keys"] / "A-tls.key"], "data": site["data"],
              "ledger": site["ledger"], "ledger_key": site["ledger_key"], "home": site["home"]}
    check_app_user(site["user"], **{**values, **changes})


# ------------------------------------------------------------------ the real spawning path, as nobody


@as_root
def test_node_starts_the_launcher_as_the_clientapp_user_who_cannot_read_the_supernode_key(site, monkeypatch):
    """`fedpriv-deploy node --clientapp-user nobody`: what it starts runs as uid 65534, with no
    supplementary groups; it and the process it starts get PermissionError on the 0600 root-owned key,
    which the SuperNode's side (this process, root) reads."""
    started, superNode, launcher_kwargs = [], [], {}
    real_command, real_start = processes.hospital_exec_command, app_user.start_as

    def stand_in_launcher(**kwargs):
        launcher_kwargs.update(kwargs)
        real_command(**kwargs)  # the real command is built too (it must accept the keys)
        return ["/usr/bin/python3", "-c", PROBE]

    def recording_start(command, user, **kwargs):
        kwargs["env"] = {**kwargs["env"], "PYTHONPATH": str(ROOT), "PROBE_KEY": str(site["keys"] / "A.key")}
        process = real_start(command, user, **kwargs)
        started.append(process)
        return process

    monkeypatch.setattr(processes, "hospital_exec_command", stand_in_launcher)
    monkeypatch.setattr(app_user, "start_as", recording_start)
    monkeypatch.setattr(deploy, "_exec", lambda command, print_only, **_: superNode.append(command) or 0)
    try:
        code = deploy.main(_node_args(site, "--clientapp-user", "nobody", "--clientapp-home", str(site["home"]),
                                      "--ledger-key", str(site["ledger_key"])))
        assert code == 0
        assert len(started) == 1 and len(superNode) == 1
        started[0].wait(timeout=120)
    finally:
        for process in started:  # stopped by its PID if it is still running
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
    assert started[0].returncode == 0
    report = json.loads((site["home"] / "probe.json").read_text())
    assert (report["uid"], report["gid"], report["groups"]) == (65534, 65534, [])
    assert report["child"] == {"uid": 65534, "euid": 65534, "gid": 65534, "groups": [], "read": "PermissionError"}
    assert report["launcher_check"] is None  # the launcher's own check passes: it cannot open the key
    assert report["flwr_home"] == str(site["home"])  # its own Flower home, not the SuperNode's
    assert report["argv"][:1] == ["--parent-pid"]  # it follows the SuperNode's PID
    # The launcher was told to refuse to start should it be able to read either key.
    assert [Path(p) for p in launcher_kwargs["unreadable"]] == [site["keys"] / "A.key", site["keys"] / "A-tls.key"]
    # The SuperNode's side: its command names the key, which it (root here) reads.
    command = superNode[0]
    key = Path(command[command.index("--auth-supernode-private-key") + 1])
    assert key.read_bytes().startswith(b"-----BEGIN OPENSSH") and stat.S_IMODE(key.stat().st_mode) == 0o600


@as_root
def test_start_as_gives_the_user_only_its_primary_group(site):
    """extra_groups=[]: root's groups (and the user's supplementary ones) are not handed on."""
    out = site["home"] / "ids.txt"
    ours = os.getgroups()
    os.setgroups([0, 4])  # this (root) process holds supplementary groups root and adm for the moment
    try:
        process = start_as(["/bin/sh", "-c", f"id -u > {out}; id -G >> {out}"], site["user"],
                           env={"PATH": "/usr/bin:/bin"}, cwd=site["home"])
    finally:
        os.setgroups(ours)
    try:
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
    assert out.read_text().split() == ["65534", "65534"]  # uid, then its only group: neither 0 nor 4


# ------------------------------------------------------------------ refusals


@as_root
def test_a_key_the_clientapp_user_can_read_is_refused_naming_the_file_and_the_fix(site):
    _check(site)  # the site as laid out passes
    key = site["keys"] / "A.key"
    os.chmod(key, 0o644)  # readable by others
    with pytest.raises(ConfigError) as refused:
        _check(site)
    assert str(key) in str(refused.value) and "nobody can read" in str(refused.value)
    assert f"chmod 600 {key}" in str(refused.value)
    os.chmod(key, 0o640)
    os.chown(key, 0, site["user"].gid)  # readable through the user's group
    with pytest.raises(ConfigError, match="mode 0640, owner root:nogroup"):
        _check(site)
    os.chown(key, site["user"].uid, 0)
    os.chmod(key, 0o600)  # owned by the ClientApp user itself
    with pytest.raises(ConfigError, match="nobody can read the SuperNode's private key"):
        _check(site)
    os.chown(key, 0, 0)
    tls = site["keys"] / "A-tls.key"
    os.chmod(tls, 0o604)  # the TLS key counts too
    with pytest.raises(ConfigError, match=str(tls)):
        _check(site)


@as_root
def test_a_ledger_folder_or_key_folder_the_user_cannot_write_is_refused(site):
    os.chown(site["ledger"].parent, 0, 0)
    with pytest.raises(ConfigError) as refused:
        _check(site)
    assert refused.value.key == "ledger" and "cannot write" in str(refused.value)
    assert f"chown nobody {site['ledger'].parent}" in str(refused.value)
    os.chown(site["ledger"].parent, site["user"].uid, site["user"].gid)
    os.chmod(site["ledger_key"].parent, 0o500)
    with pytest.raises(ConfigError) as refused:
        _check(site)
    assert refused.value.key == "ledger-key"


@as_root
def test_data_the_user_cannot_read_is_refused(site):
    share = next(site["data"].iterdir())
    os.chmod(share, 0o600)
    with pytest.raises(ConfigError) as refused:
        _check(site)
    assert refused.value.key == "data" and str(share) in str(refused.value) and "chmod -R g+rX" in str(refused.value)


@as_root
def test_the_cli_refuses_before_starting_anything(site, monkeypatch, capsys):
    started = []
    monkeypatch.setattr(app_user, "start_as", lambda *a, **k: started.append(a))
    monkeypatch.setattr(deploy, "_exec", lambda *a, **k: started.append(a) or 0)
    os.chmod(site["keys"] / "A.key", 0o644)
    args = _node_args(site, "--clientapp-user", "nobody", "--clientapp-home", str(site["home"]),
                      "--ledger-key", str(site["ledger_key"]))
    assert deploy.main(args) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "A.key" in error and "chmod 600" in error and "Traceback" not in error
    os.chmod(site["keys"] / "A.key", 0o600)
    # As root, without --clientapp-user, the ClientApps would run as root: refused.
    assert deploy.main(_node_args(site)) == 2
    assert "--clientapp-user" in capsys.readouterr().err
    # Another user needs the ledger key named (its default folder would be that user's own).
    monkeypatch.delenv("FEDPRIV_KEY_DIR", raising=False)
    assert deploy.main(_node_args(site, "--clientapp-user", "nobody", "--clientapp-home", str(site["home"]))) == 2
    assert "--ledger-key" in capsys.readouterr().err
    assert deploy.main(_node_args(site, "--clientapp-user", "no-such-user-here")) == 2
    assert "no such OS user" in capsys.readouterr().err
    assert started == []


def test_asking_for_another_user_without_root_says_to_use_a_unit_of_its_own(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(ConfigError) as refused:
        start_as(["/bin/true"], AppUser("nobody", 65534, 65534, frozenset({65534}), Path("/nonexistent")))
    assert "needs root" in str(refused.value) and "User=" in str(refused.value)



def _stand_in_keys(keys: Path) -> Path:
    """A hospital's key folder with stand-in files, the private keys at 0600."""
    keys.mkdir()
    for name in ("A.key", "A-tls.key", "ca.crt", "A-tls.crt"):
        (keys / name).write_text("stand-in\n")
    os.chmod(keys / "A.key", 0o600)
    os.chmod(keys / "A-tls.key", 0o600)
    return keys

def test_the_node_cli_without_root_refuses_clientapp_user_in_one_line(tmp_path, monkeypatch, capsys):
    from tests.test_deployment_federation import make_share

    share = make_share(tmp_path / "xrays")
    (tmp_path / "ledger").mkdir()
    keys = _stand_in_keys(tmp_path / "keys")
    site = {"data": share, "ledger": tmp_path / "ledger" / "l.db", "keys": keys}
    started = []
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(app_user, "start_as", lambda *a, **k: started.append(a))
    monkeypatch.setattr(deploy, "_exec", lambda *a, **k: started.append(a) or 0)
    assert deploy.main(_node_args(site, "--clientapp-user", "nobody", "--ledger-key", str(tmp_path / "k"))) == 2
    error = capsys.readouterr().err
    assert "needs root" in error and "systemd unit" in error and "User=" in error and "--separate-launcher" in error
    assert started == []
    # Without the flag (not root) it starts a same-user launcher, loudly.
    assert deploy.main(_node_args(site)) == 0
    assert "warning: ClientApps run as this same OS user" in capsys.readouterr().err
    assert len(started) == 2 and started[0][1] is None  # launcher (as ourselves), then the SuperNode


def test_separate_launcher_starts_only_the_supernode_and_the_launcher_command_checks_the_keys(tmp_path, capsys):
    from tests.test_deployment_federation import make_share

    keys = _stand_in_keys(tmp_path / "keys")
    (tmp_path / "ledger").mkdir()
    site = {"data": make_share(tmp_path / "xrays"), "ledger": tmp_path / "ledger" / "l.db", "keys": keys}
    os.chmod(keys / "A-tls.key", 0o640)  # a group-readable key is refused, whoever runs the ClientApps
    assert deploy.main(_node_args(site, "--separate-launcher", "--print-command")) == 2
    assert f"chmod 600 {keys / 'A-tls.key'}" in capsys.readouterr().err
    os.chmod(keys / "A-tls.key", 0o600)
    assert deploy.main(_node_args(site, "--separate-launcher", "--print-command")) == 0
    printed = capsys.readouterr().out
    assert "fedpriv-hospital-exec" not in printed and "fedpriv-supernode" in printed
    assert deploy.main(["launcher", "--port", "9199", "--supernode-keys", f"{keys / 'A.key'},{keys / 'A-tls.key'}",
                        "--approved-apps", HASH, "--print-command"]) == 0
    printed = capsys.readouterr().out
    assert f"fedpriv-hospital-exec --approved-apps {HASH} --runtime-api-address 127.0.0.1:9199 --insecure " \
           f"--unreadable {keys / 'A.key'},{keys / 'A-tls.key'}" in printed


def test_the_launcher_refuses_to_start_when_it_can_read_a_supernode_key(tmp_path):
    """Run as the key's owner (as here), fedpriv-hospital-exec stops before Flower's SuperExec starts."""
    key = tmp_path / "A.key"
    key.write_text("secret\n")
    os.chmod(key, 0o600)
    with pytest.raises(SystemExit) as refused:
        launcher_main(["--approved-apps", HASH, "--unreadable", str(key), "--runtime-api-address", "127.0.0.1:1",
                       "--insecure"])
    assert f"can read the SuperNode's private key {key}" in str(refused.value.code)
    assert "refused to start" in str(refused.value.code)
    assert "does not exist" in unreadable_problem([tmp_path / "missing.key"])


@as_root
def test_the_launcher_check_passes_for_a_user_who_cannot_read_the_key(site):
    """The same check, run as nobody (system Python, fedpriv's module): no problem; as root: a problem."""
    key = site["keys"] / "A.key"
    code = f"from fedpriv.deployment.app_user import unreadable_problem; print(unreadable_problem([{str(key)!r}]))"
    process = start_as(["/usr/bin/python3", "-c", code], site["user"],
                       env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}, cwd=site["home"], stdout=subprocess.PIPE)
    try:
        out, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert out.decode().strip() == "None"
    assert "can read" in unreadable_problem([key])
