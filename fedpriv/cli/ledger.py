"""``fedpriv-ledger``: inspect and verify a hospital's privacy ledger.

``fedpriv-ledger show PATH [--json]`` lists every DP-SGD use of the dataset with the cumulative
epsilon after it, then the budget and whether the dataset is locked. ``fedpriv-ledger verify PATH``
recomputes the hash chain and every cumulative epsilon from the events; it exits 0 when the ledger
is intact and 1 (listing the problems) when it is not. A missing or corrupt ledger is reported as
one ``fedpriv-ledger: error: ...`` line on stderr with exit code 2. The tool never spends budget.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from fedpriv.errors import FedprivError
from fedpriv.privacy.ledger import PrivacyLedger, read_ledger

PROG = "fedpriv-ledger"
EXIT_OK, EXIT_PROBLEMS, EXIT_ERROR = 0, 1, 2
_TABLE_HEADER = (
    "id", "run", "round", "sigma", "sample rate", "steps", "status", "time (UTC)", "epsilon after",
)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    args = _parser().parse_args(argv)
    try:
        with read_ledger(args.path) as ledger:
            return args.command_fn(ledger, args)
    except (FedprivError, sqlite3.Error, OSError) as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return EXIT_ERROR


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Inspect a hospital's privacy ledger.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    show = commands.add_parser("show", help="list the ledger's events, the epsilon spent and the budget")
    show.add_argument("path", metavar="PATH", help="the ledger file")
    show.add_argument("--json", action="store_true", help="print JSON instead of a table")
    show.set_defaults(command_fn=_show)
    verify = commands.add_parser("verify", help="recompute the hash chain and epsilon; exit 1 on problems")
    verify.add_argument("path", metavar="PATH", help="the ledger file")
    verify.set_defaults(command_fn=_verify)
    return parser


def _show(ledger: PrivacyLedger, args: argparse.Namespace) -> int:
    summary = _summary(ledger)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(_render(summary))
    return EXIT_OK


def _summary(ledger: PrivacyLedger) -> dict[str, Any]:
    """Everything `show` prints, as JSON-ready data."""
    entries = ledger.entries()
    status = ledger.status()
    lock = ledger.lock_info
    return {
        "path": str(ledger.path),
        "fingerprint": ledger.fingerprint,
        "events": [asdict(entry) for entry in entries],
        "epsilon": status.epsilon_spent,
        "delta": status.delta,
        "budget_epsilon": status.budget_epsilon,
        "remaining_epsilon": status.remaining,
        "locked": status.locked,
        "locked_at": lock[0] if lock else None,
        "lock_reason": lock[1] if lock else None,
        "accountant": status.accountant,
    }


def _render(summary: dict[str, Any]) -> str:
    """The human-readable table, budget line and lock line."""
    rows = [
        (
            str(e["id"]), e["run_id"], str(e["round"]), f"{e['noise_multiplier']:.4g}",
            f"{e['sample_rate']:.4g}", _steps_cell(e), e["status"], e["created_at"][:19],
            f"{e['epsilon_after']:.4f}",
        )
        for e in summary["events"]
    ]
    if rows:
        lines = _table([_TABLE_HEADER, *rows])
    else:
        lines = ["(no events: this dataset was never used for training)"]
    lines.append(
        f"epsilon spent {summary['epsilon']:.4f} / budget {summary['budget_epsilon']:g} at delta "
        f"{summary['delta']:g} (accountant {summary['accountant']}), "
        f"remaining {summary['remaining_epsilon']:.4f}"
    )
    if summary["locked"]:
        lines.append(f"LOCKED since {summary['locked_at']}: {summary['lock_reason']}")
    else:
        lines.append("open")
    return "\n".join(lines)


def _steps_cell(event: dict[str, Any]) -> str:
    """Steps done, and the steps charged where a confirmation gave some back."""
    if event["steps"] == event["charged_steps"]:
        return str(event["steps"])
    return f"{event['steps']} (of {event['charged_steps']})"


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def _verify(ledger: PrivacyLedger, args: argparse.Namespace) -> int:
    report = ledger.verify()
    if report.ok:
        print(
            f"ok: {len(ledger.entries())} entries, hash chain intact, epsilon "
            f"{report.recomputed_epsilon:.4f} at delta {ledger.delta:g} ({ledger.accountant}) "
            f"matches the recorded {report.recorded_epsilon:.4f}"
        )
        return EXIT_OK
    print(f"FAILED: ledger {ledger.path} has {len(report.problems)} problem(s):")
    for problem in report.problems:
        print(f"  - {problem}")
    print(
        f"recorded epsilon {report.recorded_epsilon:.4f}, "
        f"recomputed from the events {report.recomputed_epsilon:.4f}"
    )
    return EXIT_PROBLEMS


if __name__ == "__main__":
    sys.exit(main())
