"""The OS user a hospital's ClientApps run as: one that cannot read the SuperNode's private keys.

The launcher (``fedpriv-hospital-exec``) and every ClientApp it starts run the app's code. Run as
the SuperNode's own user, that code could read the SuperNode's authentication key (``A.key``) and
its TLS client key, and act as the hospital. So the launcher runs as another OS user:

- ``fedpriv-deploy node --clientapp-user NAME`` (as root) checks, before it starts anything, that
  NAME cannot read the SuperNode's keys (their owner, group and mode bits, and no ACL), and that it
  can read the data, write the ledger's folder and the ledger key's folder, and write its own
  Flower home (where ClientApps are installed); then it starts the launcher with
  ``user=NAME, group=<NAME's group>, extra_groups=[]`` (no supplementary groups);
- without root, a process cannot start another as a different user: the launcher then runs in a
  systemd unit of its own with ``User=`` (docs/deployment.md, section 3), via
  ``fedpriv-deploy launcher``;
- either way the launcher itself tries to open each key at start-up and refuses to run if it can
  (``--unreadable``), so a wrong ``User=``, a chmod gone wrong or an ACL is caught where it matters.

The mode-bit checks are what the kernel does for a process with the user's uid and groups: the
owner class if the uid owns the file, else the group class if one of its groups owns it, else
"other"; every folder above the file must be searchable. For the keys, every group the user
belongs to (``/etc/group`` included) counts, since a systemd unit's ``User=`` gives it them; for
the data and the ledger only its primary group counts, the one the launcher is started with.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedpriv.errors import ConfigError

FLAG = "--clientapp-user"
SEPARATE_UNIT = ("run the launcher in a systemd unit of its own with User=<that user> "
                 "(`fedpriv-deploy launcher`, docs/deployment.md section 3) and start the node with --separate-launcher")
_BITS = {"r": 4, "w": 2, "x": 1}


@dataclass(frozen=True)
class AppUser:
    """An OS user that runs ClientApps: uid, primary gid, and every group it belongs to."""

    name: str
    uid: int
    gid: int
    groups: frozenset[int]
    home: Path


def lookup_app_user(name: str) -> AppUser:
    """The user `name`; ConfigError if it does not exist or is root."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise ConfigError(FLAG, name, "no such OS user on this machine",
                          f"create one for ClientApps: useradd --system --shell /usr/sbin/nologin {name}") from None
    if entry.pw_uid == 0:
        raise ConfigError(FLAG, name, "is root, which can read every file (the SuperNode's keys too)",
                          "name an unprivileged user of its own, e.g. useradd --system fedpriv-app")
    groups = {entry.pw_gid} | {group.gr_gid for group in grp.getgrall() if name in group.gr_mem}
    return AppUser(name, entry.pw_uid, entry.pw_gid, frozenset(groups), Path(entry.pw_dir))


def _allows(info: os.stat_result, uid: int, groups: frozenset[int], want: str) -> bool:
    """Whether the mode bits give `uid` (with `groups`) every permission in `want` ("r", "wx", ...)."""
    if uid == 0:
        return True
    shift = 6 if info.st_uid == uid else 3 if info.st_gid in groups else 0
    return all(info.st_mode & (_BITS[bit] << shift) for bit in want)


def _who(info: os.stat_result) -> str:
    def name(lookup, number: int) -> str:  # noqa: ANN001
        try:
            return lookup(number)[0]
        except KeyError:
            return str(number)

    return (f"mode {stat.S_IMODE(info.st_mode):04o}, owner {name(pwd.getpwuid, info.st_uid)}:"
            f"{name(grp.getgrgid, info.st_gid)}")


def _has_acl(path: Path) -> bool:
    try:
        return any(attribute.startswith("system.posix_acl") for attribute in os.listxattr(path))
    except OSError:
        return False


def access_problem(path: Path, user: AppUser, want: str, *, primary_only: bool = True) -> str | None:
    """Why `user` lacks `want` on `path` (every folder above it searched), or None if it has it."""
    groups = frozenset({user.gid}) if primary_only else user.groups
    path = Path(path).absolute()
    for folder in reversed(path.parents):
        info = folder.stat()
        if not _allows(info, user.uid, groups, "x"):
            return f"{user.name} cannot enter the folder {folder} ({_who(info)})"
    try:
        info = path.stat()
    except FileNotFoundError:
        return f"{path} does not exist"
    if not _allows(info, user.uid, groups, want):
        needs = " and ".join({"r": "read", "w": "write", "x": "enter"}[bit] for bit in want)
        return f"{user.name} cannot {needs} {path} ({_who(info)})"
    return None


def key_exposure(key: Path, user: AppUser) -> str | None:
    """Why `user` could read the private key `key` (its own mode bits, any of its groups), or None."""
    info = Path(key).stat()
    if _allows(info, user.uid, user.groups, "r"):
        return (f"{user.name} can read the SuperNode's private key {key} ({_who(info)}), so the apps it "
                "runs could act as this hospital")
    if _has_acl(key):
        return f"{key} carries a POSIX ACL, which may let {user.name} read it"
    return None


def _data_problem(data: Path, user: AppUser) -> str | None:
    if data.is_file():
        return access_problem(data, user, "r")
    problem = access_problem(data, user, "rx")
    for folder, folders, files in os.walk(data):
        if problem:
            return problem
        for name in folders:
            problem = problem or access_problem(Path(folder) / name, user, "rx")
        for name in files:
            problem = problem or access_problem(Path(folder) / name, user, "r")
    return problem


def check_app_user(user: AppUser, *, secret_keys: Sequence[Path], data: Path, ledger: Path, ledger_key: Path,
                   home: Path, programs: Sequence[Path] = ()) -> None:
    """Refuse (ConfigError, one problem with its fix) unless `user` fits to run this hospital's ClientApps."""
    for key in secret_keys:
        key = Path(key).resolve()
        problem = key_exposure(key, user)
        if problem:
            raise ConfigError(FLAG, user.name, problem,
                              f"chmod 600 {key}; chown <the SuperNode's user> {key}" +
                              (f"; setfacl -b {key}" if "ACL" in problem else "") +
                              f"; and keep {user.name} out of the key's group")
    checks = [("data", data, "r" if Path(data).is_file() else "rx", "let it read the data: "
               f"chgrp -R {_group(user)} {data} && chmod -R g+rX {data}"),
              ("ledger", Path(ledger).parent, "wx", f"chown {user.name} {Path(ledger).parent} (the ClientApp "
               "writes the ledger)"),
              ("ledger-key", Path(ledger_key).parent, "wx", f"chown {user.name} {Path(ledger_key).parent} && "
               f"chmod 700 {Path(ledger_key).parent}")]
    if Path(ledger).exists():
        checks.append(("ledger", Path(ledger), "rw", f"chown {user.name} {ledger}"))
    if Path(ledger_key).exists():
        checks.append(("ledger-key", Path(ledger_key), "rw", f"chown {user.name} {ledger_key}"))
    checks.append(("--clientapp-home", Path(home), "wx", f"mkdir -p {home} && chown {user.name} {home}"))
    checks += [("--clientapp-user", Path(program), "rx", f"install fedpriv where {user.name} can run it "
                "(e.g. /opt/fedpriv/.venv, mode 755)") for program in programs]
    for key, path, want, fix in checks:
        problem = _data_problem(Path(path), user) if key == "data" else access_problem(Path(path), user, want)
        if problem:
            raise ConfigError(key, str(path), f"the ClientApp user: {problem}", fix)


def _group(user: AppUser) -> str:
    try:
        return grp.getgrgid(user.gid).gr_name
    except KeyError:
        return str(user.gid)


def start_as(command: Sequence[str], user: AppUser | None, *, env: Mapping[str, str] | None = None,
             cwd: Path | None = None, stdout=None) -> subprocess.Popen:  # noqa: ANN001
    """Start `command` as `user` (its primary group only, no supplementary groups); as ourselves if None.

    Only root can start a process as another user: otherwise one ConfigError saying what to do instead.
    """
    identity: dict = {}
    if user is not None:
        if os.geteuid() != 0:
            raise ConfigError(FLAG, user.name, "starting the launcher as another user needs root, and this runs "
                              f"as uid {os.geteuid()}", SEPARATE_UNIT)
        identity = {"user": user.uid, "group": user.gid, "extra_groups": []}
    return subprocess.Popen(list(command), env=None if env is None else dict(env), cwd=cwd, stdin=subprocess.DEVNULL,
                            stdout=stdout, stderr=subprocess.STDOUT if stdout is not None else None, **identity)


def launcher_programs(command: Sequence[str]) -> list[Path]:
    """What must be runnable to start `command`: its executable and, for a script, its interpreter."""
    program = Path(command[0]).resolve()
    programs = [program]
    try:
        with open(program, "rb") as file:
            first = file.readline(512)
    except OSError:
        return programs
    if first.startswith(b"#!"):
        interpreter = first[2:].decode(errors="replace").split()
        if interpreter and interpreter[0] != "/usr/bin/env":
            programs.append(Path(interpreter[0]).resolve())
    return programs


def unreadable_problem(paths: Sequence[Path]) -> str | None:
    """Run by the launcher itself: why it must not run (it can open one of `paths`), or None."""
    for path in paths:
        try:
            with open(path, "rb"):
                pass
        except PermissionError:
            continue
        except FileNotFoundError:
            return f"{path} does not exist, so it cannot check that it is unreadable here (fix the path)"
        try:
            name = pwd.getpwuid(os.geteuid()).pw_name
        except KeyError:
            name = "?"
        return (f"this launcher (user {name}, uid {os.geteuid()}) can read the SuperNode's private key {path}, so "
                f"the apps it starts could act as this hospital. Fix: run it as another OS user (User= in its own "
                f"unit, or `fedpriv-deploy node --clientapp-user NAME`), and chmod 600 {path}; chown <the "
                "SuperNode's user> it")
    return None
