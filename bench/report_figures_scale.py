"""The run report's per-hospital figures at many hospitals, for two checkouts, one after the other.

Draws the three figures whose size follows the number of hospitals (record_epsilon, privacy_spend,
hospital_bars) from made-up figures of N hospitals (32 records each, 3 rounds), as PNG, in a fresh
process per checkout (its own PYTHONPATH), and prints the seconds and pixel size of each.

    .venv/bin/python bench/report_figures_scale.py --before /tmp/fedpriv-old --after . --hospitals 300 1000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"

CHILD = r"""
import json, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import numpy as np
from fedpriv.report import figures
from fedpriv.report.fairness import HOSPITAL_METRICS, HospitalFairness

assert Path(figures.__file__).is_relative_to(Path(sys.argv[1])), figures.__file__
n = int(sys.argv[2])
rng = np.random.default_rng(0)
spreads = [(f"hospital-{h}", rng.uniform(0, 3.0, 32), 3.0) for h in range(n)]
rounds = [{"round": r, "privacy": [{"hospital": f"hospital-{h}", "epsilon": r, "budget_epsilon": 3.0, "locked": r == 3}
                                   for h in range(n)]} for r in (1, 2, 3)]
rows = [{"hospital": f"hospital-{h}", "num-examples": 30, **{m: 0.7 for m in HOSPITAL_METRICS}} for h in range(n)]
out = {}
for name, draw in (("record_epsilon", lambda: figures.record_epsilon(spreads)),
                   ("privacy_spend", lambda: figures.privacy_spend(rounds)),
                   ("hospital_bars", lambda: figures.hospital_bars(HospitalFairness(round=3, rows=rows, gaps=[])))):
    started = time.perf_counter()
    png = draw()
    out[name] = {"seconds": round(time.perf_counter() - started, 2),
                 "pixels": [int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")]}
print(json.dumps(out))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True)
    parser.add_argument("--after", type=Path, default=Path("."))
    parser.add_argument("--hospitals", type=int, nargs="+", default=[300, 1000])
    parser.add_argument("--out", type=Path, default=RESULTS / "report_figures_scale.json")
    args = parser.parse_args()
    rows = []
    for hospitals in args.hospitals:
        for label, checkout in (("before", args.before), ("after", args.after)):
            done = subprocess.run([sys.executable, "-c", CHILD, str(checkout.resolve()), str(hospitals)],
                                  capture_output=True, text=True, env={**os.environ, "MPLBACKEND": "Agg"},
                                  timeout=1800, check=True)
            figures = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append({"hospitals": hospitals, "checkout": label, **figures})
            print(f"{hospitals:5d} hospitals, {label:6s}: " + "; ".join(
                f"{name} {f['seconds']} s, {f['pixels'][0]} x {f['pixels'][1]} px" for name, f in figures.items()),
                flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
