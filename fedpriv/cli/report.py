"""``fedpriv-report RUN_DIR``: (re)write a finished run's report.html and report.md.

The report is rebuilt from the run's files. Calibration and subgroup metrics are read from
calibration.json and subgroups.json. When either file is missing, or with ``--recompute``, they are
computed from model.pt and the data that config.yaml names. If that data cannot be loaded (e.g. the
npz moved; set FEDPRIV_DATA_DIR or dataset.root), the report is still written, with a warning where
calibration would be. The per-record epsilon of simulated hospitals is read, read-only, from their
ledger, naming each hospital's records from the data; without the ledger (a deployment), its key or
the data, the report shows the hospitals' reported figures instead and says why.

Exit codes: 0 when the report was written (a warning on stderr if calibration could not be
computed), 2 when RUN_DIR is not a readable run directory (one ``fedpriv-report: error: ...`` line).
"""

from __future__ import annotations

import argparse
import logging
import sys

from fedpriv import rundir
from fedpriv.errors import FedprivError

PROG = "fedpriv-report"
EXIT_OK, EXIT_ERROR = 0, 2


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format=f"{PROG}: %(levelname)s: %(message)s")
    from fedpriv.report.run_report import write_run_report  # deferred: torch; --help answers at once

    try:
        written = write_run_report(args.run_dir, recompute=args.recompute)
    except (FedprivError, OSError) as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return EXIT_ERROR
    for warning in written.warnings:
        print(f"{PROG}: warning: {' '.join(warning.split())}", file=sys.stderr)
    print(written.html)
    print(written.markdown)
    return EXIT_OK


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=f"Write a finished run's {rundir.REPORT_HTML} and {rundir.REPORT_MD}.")
    parser.add_argument("run_dir", metavar="RUN_DIR",
                        help=f"a run directory (holding {rundir.CONFIG}, {rundir.METRICS_JSON}, ...)")
    parser.add_argument("--recompute", action="store_true",
                        help=f"recompute calibration and subgroup metrics from {rundir.MODEL} and the data even if "
                             f"{rundir.CALIBRATION} and {rundir.SUBGROUPS} exist")
    return parser

if __name__ == "__main__":
    sys.exit(main())
