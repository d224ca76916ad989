"""``fedpriv-ledger``: inspect, verify and migrate a hospital's privacy ledger.

``fedpriv-ledger show PATH [--json] [--key KEYFILE] [--record ID]`` prints the budget (epsilon per
record, delta, accountant), how many records the ledger knows, the distribution of their epsilon
(min, median, max), how many are exhausted and whether the ledger is locked (every record
exhausted), the hospital's locks, and every event: id, time, run, round, hospital, private or NOT
PRIVATE, sigma, sample rate, steps confirmed (of those charged), and how many records its set held.
With ``--record ID`` it prints that record's history instead: the events whose set held it, its
epsilon, whether it is exhausted, and the entry that first saw it; an id the ledger does not know
exits 1. An epsilon is never rounded up to, or down from, the budget (as many digits as that takes),
and infinity (after a non-private round) is printed as ``inf``. ``--json`` prints the same as JSON,
with every infinite number as the string ``"inf"``.

``fedpriv-ledger verify PATH [--key KEYFILE]`` checks the keyed chain, its witness and every record
set (:meth:`~fedpriv.privacy.ledger.PrivacyLedger.verify`): exit 0 and ``ok: N entries, M events,
chain and witness intact`` when intact, exit 1 listing the problems when not, and exit 1 when the
ledger's key is missing (naming where it was looked for), since then nothing can be verified.

``fedpriv-ledger migrate OLD_PATH --data NPZ_OR_FOLDER [--dataset FLAG] [--size N] [--out NEW_PATH]
[--key KEYFILE]`` migrates a ledger of fedpriv's first format (schema version 1: one budget for a
whole record set named by its fingerprint) to a new, per-record ledger
(:mod:`fedpriv.privacy.migrate`). It loads the data as a deployed node does (content record ids),
refuses unless its train split has the old ledger's fingerprint, refuses a broken old hash chain,
and writes a NEW ledger (default ``OLD_PATH`` with the suffix ``.v2.db``; an existing file is never
overwritten) with the old budget, delta and accountant, every old entry as a charge on all those
records (same sigma, sample rate, steps, run, round and time) and the old lock as a lock of every
record. The old file is left untouched.

Errors (a missing, corrupt or old-format ledger on show/verify, a missing key on show, unusable
data) are one ``fedpriv-ledger: error: ...`` line on stderr with exit code 2, never a traceback.
The tool never spends budget: show and verify open the ledger read-only.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fedpriv import rundir
from fedpriv.deployment.node import DEFAULT_DATASET, load_protected_records
from fedpriv.errors import FedprivError
from fedpriv.privacy.chain import ChainKey, key_path_for
from fedpriv.privacy.ledger import LedgerEvent, PrivacyLedger, read_ledger
from fedpriv.privacy.migrate import default_output, migrate_ledger, read_old_ledger
from fedpriv.privacy.store import LegacyLedger
from fedpriv.rundir import format_epsilon  # the one rule for showing an epsilon (re-exported for the tests)

PROG = "fedpriv-ledger"
EXIT_OK, EXIT_PROBLEMS, EXIT_ERROR = 0, 1, 2
_TABLE_HEADER = ("id", "time (UTC)", "run", "round", "hospital", "privacy", "sigma", "sample rate", "steps",
                 "status", "records")


class _KeyMissing(FedprivError):
    """The ledger's key is not where it was looked for."""


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    args = _parser().parse_args(argv)
    try:
        return args.command_fn(args)
    except LegacyLedger as exc:
        _error(f"ledger {exc.path} is in the old format (fedpriv's first, schema version 1: one budget for a whole "
               f"record set, no record ids), which this fedpriv does not read. Migrate it with `{PROG} migrate "
               f"{exc.path} --data NPZ_OR_FOLDER [--dataset FLAG]` (the old file is kept as it is)")
    except (FedprivError, sqlite3.Error, OSError) as exc:
        _error(str(exc) or type(exc).__name__)
    return EXIT_ERROR


def _error(message: str) -> None:
    print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Inspect, verify and migrate a hospital's privacy ledger.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    key_help = "the ledger's key file (default: the file for PATH in $FEDPRIV_KEY_DIR or the user config folder)"

    show = commands.add_parser("show", help="the budget, per-record epsilon, exhausted records and events")
    show.add_argument("path", metavar="PATH", type=Path, help="the ledger file")
    show.add_argument("--json", action="store_true", help='print JSON instead of text (infinity is the string "inf")')
    show.add_argument("--key", metavar="KEYFILE", type=Path, help=key_help)
    show.add_argument("--record", metavar="ID", help="show this record's history instead (exit 1 if unknown)")
    show.set_defaults(command_fn=_show)

    verify = commands.add_parser("verify", help="check the keyed chain, witness and record sets; exit 1 on problems")
    verify.add_argument("path", metavar="PATH", type=Path, help="the ledger file")
    verify.add_argument("--key", metavar="KEYFILE", type=Path, help=key_help)
    verify.set_defaults(command_fn=_verify)

    migrate = commands.add_parser("migrate", help="write a new per-record ledger from a first-format one")
    migrate.add_argument("old_path", metavar="OLD_PATH", type=Path, help="the first-format ledger (kept unchanged)")
    migrate.add_argument("--data", required=True, metavar="NPZ_OR_FOLDER", type=Path,
                         help="the data the old ledger protected: a MedMNIST npz, a folder holding one, or an "
                              "image folder (as the node's data=); its train split must have the old fingerprint")
    migrate.add_argument("--dataset", metavar="FLAG", default=None,
                         help="the MedMNIST flag of an npz (default: the node's default, pneumoniamnist)")
    migrate.add_argument("--size", metavar="N", type=int, default=None,
                         help="image size of a folder (default: try each MedMNIST size)")
    migrate.add_argument("--out", metavar="NEW_PATH", type=Path, default=None,
                         help="the new ledger (default: OLD_PATH with the suffix .v2.db; never overwritten)")
    migrate.add_argument("--key", metavar="KEYFILE", type=Path,
                         help="where the new ledger's key goes (default: the file for NEW_PATH in the key folder)")
    migrate.set_defaults(command_fn=_migrate)
    return parser


# --------------------------------------------------------------------- opening


def _open(args: argparse.Namespace) -> PrivacyLedger:
    """The ledger, read-only; _KeyMissing when its key is not there (checked after its format)."""
    ledger = read_ledger(args.path, key_path=args.key)
    key = _key_file(args)
    if not key.is_file():
        ledger.close()
        where = "--key" if args.key else "$FEDPRIV_KEY_DIR or the user config folder"
        raise _KeyMissing(f"the key of ledger {args.path} was not found at {key} (looked in {where}); without it "
                          "the ledger's entries cannot be authenticated. Fix: restore the key file, point --key at "
                          "it, or set FEDPRIV_KEY_DIR to the folder holding it")
    return ledger


def _key_file(args: argparse.Namespace) -> Path:
    return args.key if args.key else key_path_for(args.path)


# --------------------------------------------------------------------- show


def _show(args: argparse.Namespace) -> int:
    with _open(args) as ledger:
        if args.record is not None:
            return _show_record(ledger, args)
        summary = _summary(ledger)
    print(json.dumps(rundir.encode(summary), indent=2) if args.json else _render(summary))
    return EXIT_OK


def _summary(ledger: PrivacyLedger) -> dict[str, Any]:
    """Everything `show` prints, as data (floats as they are; infinity is made "inf" for JSON only, as in a run directory)."""
    status = ledger.status()
    events = ledger.events()
    return {
        "path": str(ledger.path),
        "budget_epsilon": status.budget_epsilon,
        "delta": status.delta,
        "accountant": status.accountant,
        "unit": status.unit,  # what a record is: an image, or a patient (all of a patient's images)
        "records": status.records,
        "exhausted": status.exhausted,
        "open_records": status.records - status.exhausted,
        "locked": status.locked,
        "epsilon": {"min": status.epsilon_min, "median": status.epsilon_median, "max": status.epsilon_spent},
        "remaining_epsilon": status.remaining,
        "locks": _locks(ledger),
        "hospitals": _hospitals(events),
        "events": [_event(e) for e in events],
        "chain_length": status.chain_length,
        "chain_head": status.chain_head,
    }


def _hospitals(events: list[LedgerEvent]) -> dict[str, int]:
    """Which hospitals used this ledger's records, and in how many events (simulated hospitals share one)."""
    counts: dict[str, int] = {}
    for event in events:
        counts[event.hospital] = counts.get(event.hospital, 0) + 1
    return dict(sorted(counts.items()))


def _event(event: LedgerEvent) -> dict[str, Any]:
    return {**asdict(event), "status": event.status}


def _locks(ledger: PrivacyLedger) -> list[dict[str, Any]]:
    """The hospital's locks: when, why, on how many records (read from the ledger's verified replay)."""
    with ledger._store.transaction("DEFERRED") as conn:
        history = ledger._history(conn)
        return [{"at": at, "reason": reason, "records": len(ledger._store.load_set(conn, digest))}
                for digest, reason, at in history.locks]


def _render(summary: dict[str, Any]) -> str:
    budget = summary["budget_epsilon"]
    spread = summary["epsilon"]
    lines = [
        f"ledger {summary['path']}",
        f"budget: epsilon {budget:g} per record at delta {summary['delta']:g} (accountant {summary['accountant']}); "
        f"a record is one {summary['unit']}",
    ]
    if summary["hospitals"]:
        lines.append("used by: " + ", ".join(
            f"{name or '(no name)'} ({count} event{'s' if count != 1 else ''})"
            for name, count in summary["hospitals"].items()))
    if summary["records"]:
        lines.append(
            f"records: {summary['records']} known; epsilon per record min {format_epsilon(spread['min'], budget)}, "
            f"median {format_epsilon(spread['median'], budget)}, max {format_epsilon(spread['max'], budget)}; "
            f"{summary['exhausted']} exhausted, {summary['open_records']} open")
    else:
        lines.append("records: none known yet (no round has used any)")
    if summary["locked"]:
        lines.append(f"LOCKED: every one of the {summary['records']} records is exhausted; none trains again")
    elif summary["records"]:
        lines.append(f"open: the open records can still spend up to "
                     f"{format_epsilon(summary['remaining_epsilon'], budget)} of {budget:g}")
    else:
        lines.append("open")
    for lock in summary["locks"]:
        lines.append(f"lock at {lock['at'][:19].replace('T', ' ')} on {lock['records']} records: {lock['reason']}")
    lines.append(_events_block(summary["events"]))
    return "\n".join(lines)


def _events_block(events: list[dict[str, Any]]) -> str:
    if not events:
        return "events: none (the data was never used for training)"
    rows = [(str(e["id"]), e["created_at"][:19].replace("T", " "), e["run_id"], str(e["round"]),
             e["hospital"] or "-", "private" if e["private"] else "NOT PRIVATE",
             f"{e['noise_multiplier']:.4g}" if e["private"] else "-", f"{e['sample_rate']:.4g}", _steps_cell(e),
             e["status"], str(e["set_size"])) for e in events]
    return "\n".join([f"events ({len(events)}):", *_table([_TABLE_HEADER, *rows])])


def _steps_cell(event: dict[str, Any]) -> str:
    """Steps done, and the steps charged where a confirmation gave some back."""
    if event["steps"] == event["charged_steps"]:
        return str(event["steps"])
    return f"{event['steps']} (of {event['charged_steps']})"


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]


def _show_record(ledger: PrivacyLedger, args: argparse.Namespace) -> int:
    events, value, exhausted, first = ledger.record_history(args.record)
    budget = ledger.budget_epsilon
    if first is None and not events:
        if args.json:
            print(json.dumps({"path": str(ledger.path), "record": args.record, "known": False}, indent=2))
        else:
            print(f"{PROG}: record {args.record!r} is not known to ledger {ledger.path} (no round has used it)",
                  file=sys.stderr)
        return EXIT_PROBLEMS
    record = {
        "path": str(ledger.path), "record": args.record, "known": True, "epsilon": value, "exhausted": exhausted,
        "first_entry": first, "budget_epsilon": budget, "delta": ledger.delta, "accountant": ledger.accountant,
        "events": [_event(e) for e in events],
    }
    if args.json:
        print(json.dumps(rundir.encode(record), indent=2))
        return EXIT_OK
    state = "EXHAUSTED (it never trains again)" if exhausted else "not exhausted"
    seen = f"first seen in entry {first}" if first is not None else "first entry unknown"
    print("\n".join([
        f"record {args.record} in ledger {ledger.path}",
        f"epsilon {format_epsilon(value, budget)} of budget {budget:g} at delta {ledger.delta:g} "
        f"(accountant {ledger.accountant}); {state}; {seen}",
        _events_block(record["events"]),
    ]))
    return EXIT_OK


# --------------------------------------------------------------------- verify


def _verify(args: argparse.Namespace) -> int:
    try:
        ledger = _open(args)
    except _KeyMissing as exc:
        print(f"FAILED: cannot verify ledger {args.path}: {' '.join(str(exc).split())}")
        return EXIT_PROBLEMS
    with ledger:
        report = ledger.verify()
    if not report.ok:
        print(f"FAILED: ledger {args.path} has {len(report.problems)} problem(s):")
        for problem in report.problems:
            print(f"  - {problem}")
        return EXIT_PROBLEMS
    witness = ChainKey.load(_key_file(args)).witness()
    if report.entries and witness is None:
        print(f"ok: {report.entries} entries, {report.events} events, chain intact; but its witness "
              f"{_key_file(args).with_suffix('.head')} is missing, so cut-off entries or an older copy of the file "
              "cannot be ruled out")
    else:
        print(f"ok: {report.entries} entries, {report.events} events, chain and witness intact")
    return EXIT_OK


# --------------------------------------------------------------------- migrate


def _migrate(args: argparse.Namespace) -> int:
    old_path: Path = args.old_path
    if old_path.is_file():
        try:  # a ledger already in the new format says so, rather than "not the first format"
            read_ledger(old_path).close()
        except LegacyLedger:
            pass
        else:
            raise FedprivError(f"ledger {old_path} is already in the current format; there is nothing to migrate")
    old = read_old_ledger(old_path)
    out = args.out if args.out else default_output(old_path)
    if out.exists():
        raise FedprivError(f"{out} already exists; a migration never overwrites a file (choose another --out)")
    records = load_protected_records(old, args.data, args.dataset or DEFAULT_DATASET, args.size)
    result = migrate_ledger(old, records.ids, out, key_path=args.key)
    budget = result.budget_epsilon
    lowered = (f" (created with {result.initial_budget_epsilon:g}, lowered since)"
               if result.budget_epsilon < result.initial_budget_epsilon else "")
    print("\n".join([
        f"migrated the old-format ledger {result.old_path} to {result.new_path}",
        f"  data: the train split of {records.source} ({records.image_size} pixels), {result.records} records "
        f"(fingerprint {old.fingerprint[:16]}... matches)",
        f"  budget: epsilon {budget:g} per record{lowered} at delta {result.delta:g} "
        f"(accountant {result.accountant})",
        f"  events: {result.events} ({result.confirmed} confirmed, {result.events - result.confirmed} charged, "
        f"unconfirmed), each charged to all {result.records} records with its sigma, sample rate, steps, run, "
        "round and time",
        f"  epsilon per record: {format_epsilon(result.epsilon, budget)} (the old ledger's cumulative epsilon: "
        f"{format_epsilon(result.old_epsilon, budget)})",
        f"  locked: {'yes, every record (the old ledger was locked)' if old.locked_at else 'no'}",
        f"  {result.entries} entries, keyed with {result.key_path}",
        f"the old file is unchanged. Point the node's ledger= at {result.new_path} (its key is named by that "
        "path: if you move the file, keep the key with ledger-key=)",
    ]))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
