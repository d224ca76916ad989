"""A hospital runs only the Flower app it approved: the launcher between its SuperNode and any app code.

Whoever can reach a SuperLink's Control API can submit a run, and the SuperNodes then fetch and
run that run's ClientApp. Flower's own check (``--trusted-entities``) accepts only apps signed
through Flower Hub, so fedpriv puts its own check on Flower's process-isolation path instead:

- the SuperNode runs with ``--isolation process``: it starts no app code itself;
- ``fedpriv-hospital-exec --approved-apps HASH[,HASH]`` takes its place as the SuperExec. Every
  ClientApp task it starts runs ``fedpriv-approved-clientapp`` instead of Flower's
  ``flwr-clientapp``; a task whose announced app (FAB) hash is not approved is logged with its run
  id and hash, and a task that is not a ClientApp is not started at all;
- ``fedpriv-approved-clientapp`` hashes the app bytes it actually pulled (the SuperLink could lie
  about the hash) and, unless they match an approved hash, refuses before installing, importing or
  handing anything to the app: the task ends as failed, nothing of the app runs, no reply is sent.

fedpriv's app (``write_app``) holds only a pyproject.toml naming fedpriv's installed components,
so its hash is the same on every machine: ``fedpriv-deploy app-hash`` prints it. Approving it
means "run the fedpriv installed here", whose ClientApp is the one the ledger binds.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

from fedpriv.deployment.app_user import unreadable_problem
from fedpriv.errors import ConfigError

log = logging.getLogger(__name__)

APPROVED_ENV = "FEDPRIV_APPROVED_APPS"  # how the launcher hands its approved hashes to the apps it starts
CLIENTAPP_COMMAND = "fedpriv-approved-clientapp"
_HASH = re.compile(r"[0-9a-f]{64}")


class UnapprovedApp(Exception):
    """An app this hospital did not approve: nothing of it is installed or run."""


def parse_approved(text: str, where: str = "--approved-apps") -> frozenset[str]:
    """Comma-separated FAB hashes (sha256, 64 hex digits); at least one."""
    hashes = [part.strip().lower() for part in str(text).split(",") if part.strip()]
    bad = [h for h in hashes if not _HASH.fullmatch(h)]
    if not hashes or bad:
        raise ConfigError(where, text, "must list the sha256 hashes (64 hex digits) of the apps this hospital runs",
                          "print fedpriv's with `fedpriv-deploy app-hash` and pass it, e.g. --approved-apps 3f2a...")
    return frozenset(hashes)


def fab_hash(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def app_hash(app_dir: Path) -> str:
    """The hash `flwr run APP_DIR` will give the app it uploads (Flower builds FABs reproducibly)."""
    from flwr.cli.build import build_fab_from_disk

    return fab_hash(build_fab_from_disk(app_dir))


def fedpriv_app_hash() -> str:
    """The hash of fedpriv's own app (``fedpriv.app_config.write_app``), the same on every machine."""
    from fedpriv.app_config import write_app  # deferred: loads torch; the hospital's launcher must start fast

    with tempfile.TemporaryDirectory() as folder:
        return app_hash(write_app(Path(folder) / "app"))


def refusal(run_id: int, app: str, approved: Iterable[str]) -> str | None:
    """Why the app with hash `app` may not run here (None: it is approved)."""
    if app in approved:
        return None
    return (f"refused run {run_id}: its app {app or '(no hash)'} is not one this hospital approved; "
            "nothing of it was installed or run")


# ------------------------------------------------------------------ the launcher (the SuperExec)


def approving_plugin(base: type, approved: frozenset[str]) -> type:
    """Flower's SuperExec plugin, refusing any task that is not a ClientApp of an approved app."""
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor import LaunchResult

    class ApprovingPlugin(base):  # type: ignore[misc, valid-type]
        def launch_task(self, token, task):  # noqa: ANN001, ANN202 (Flower's signature)
            if task.type != TaskType.CLIENT_APP:
                reason = f"refused run {task.run_id}: a hospital runs ClientApps only, not {task.type}"
                log.error("fedpriv-hospital-exec: %s", reason)
                return LaunchResult.failed(reason)
            reason = refusal(task.run_id, getattr(task, "fab_hash", ""), approved)
            if reason is not None:
                # Still handed to fedpriv-approved-clientapp, which refuses it on its bytes before any
                # of it is installed and ends the task; a task never started would stay pending and
                # hold up the SuperNode's later messages (Flower re-offers it until it expires).
                log.error("fedpriv-hospital-exec: %s", reason)
            return super().launch_task(token, task)

    return ApprovingPlugin


def launcher_main(argv: list[str] | None = None) -> None:
    """``fedpriv-hospital-exec --approved-apps HASH[,HASH] [--unreadable KEY[,KEY]] <flower-superexec's arguments>``.

    With ``--unreadable`` it first tries to open each file (the SuperNode's private keys) and refuses
    to start if it can: the apps it starts run as its user.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        position = next(i for i, a in enumerate(args) if a == "--approved-apps" or a.startswith("--approved-apps="))
    except StopIteration:
        sys.exit("fedpriv-hospital-exec: --approved-apps is required (fix: pass the hash "
                 "`fedpriv-deploy app-hash` prints)")
    text = args.pop(position).partition("=")[2] or (args.pop(position) if position < len(args) else "")
    try:
        approved = parse_approved(text)
    except ConfigError as error:
        sys.exit(f"fedpriv-hospital-exec: {error}")
    # The SuperNode's private keys: this launcher (and every app it starts) must not be able to open them.
    secrets = _pop_option(args, "--unreadable")
    if secrets:

        problem = unreadable_problem([Path(p) for p in secrets.split(",") if p.strip()])
        if problem:
            sys.exit(f"fedpriv-hospital-exec: refused to start: {problem}")
        log.info("fedpriv-hospital-exec: running as uid %d, which cannot read %s", os.geteuid(), secrets)
    from flwr.supercore import constant
    from flwr.supercore.cli.flower_superexec import flower_superexec
    from flwr.supercore.superexec import run_superexec

    # Every ClientApp this SuperExec starts is fedpriv's checking wrapper, which re-checks the bytes.
    constant.TASK_TYPE_TO_COMMAND[constant.TaskType.CLIENT_APP] = str(Path(sys.executable).parent / CLIENTAPP_COMMAND)
    run_superexec.AutoExecPlugin = approving_plugin(run_superexec.AutoExecPlugin, approved)
    os.environ[APPROVED_ENV] = ",".join(sorted(approved))
    log.info("fedpriv-hospital-exec: this hospital runs only the apps %s", ", ".join(sorted(approved)))
    sys.argv = ["flower-superexec", *args]
    flower_superexec()


def _pop_option(args: list[str], name: str) -> str:
    """Remove `name VALUE` or `name=VALUE` from `args`; its value ("" if absent)."""
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            del args[i]
            return args.pop(i)
        if arg.startswith(name + "="):
            return args.pop(i).partition("=")[2]
    return ""


# ------------------------------------------------------------------ the ClientApp process


def clientapp_main() -> None:
    """``fedpriv-approved-clientapp``: Flower's ``flwr-clientapp``, refusing an app whose bytes are not approved."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    approved = parse_approved(os.environ.get(APPROVED_ENV, ""), APPROVED_ENV)
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp
    from flwr.supernode.runtime import run_clientapp

    run_clientapp.pull_task_input = checked_pull(run_clientapp.pull_task_input, approved, _refuse_in_flower)
    flwr_clientapp()


def _refuse_in_flower(client, message, context, reason: str) -> None:  # noqa: ANN001
    """Answer the message with an error, so that the SuperNode is not left waiting for a reply."""
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode
    from flwr.supernode.runtime.run_clientapp import push_message

    push_message(client, Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message),
                 context)


def checked_pull(pull, approved: frozenset[str], answer=None):  # noqa: ANN001, ANN201 (Flower's pull_task_input)
    """Flower's pull of a task's input, raising UnapprovedApp unless the pulled app's bytes are approved.

    `answer(client, message, context, reason)` replies to the refused message first.
    """

    def pull_approved(client):  # noqa: ANN001, ANN202
        message, context, run, fab = pull(client)
        reason = refusal(run.run_id, fab_hash(fab.content), approved)
        if reason is not None:  # before the app is installed, loaded or given the message
            log.error("fedpriv-approved-clientapp: %s", reason)
            if answer is not None:
                answer(client, message, context, reason)
            raise UnapprovedApp(reason)
        return message, context, run, fab

    return pull_approved
