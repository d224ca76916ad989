"""`fedpriv-sweep-report DIR`: the table and privacy-utility plot of a finished sweep."""

from __future__ import annotations

import argparse
import logging
import sys

from fedpriv.errors import FedprivError
from fedpriv.report.sweep import write_sweep_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedpriv-sweep-report", description=__doc__)
    parser.add_argument("directory", help="a multirun directory (e.g. multirun/2026-01-31/12-00-00)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        report = write_sweep_report(args.directory)
    except (FileNotFoundError, FedprivError) as error:  # no finished run, or an unreadable result.json
        print(f"fedpriv-sweep-report: error: {error}", file=sys.stderr)
        return 2
    print(report.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
