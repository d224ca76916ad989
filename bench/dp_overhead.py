"""DP-SGD training overhead: time per training sample of the private step over the non-private one.

Same model (default CNN), same data, same logical batch, on this CPU. Every configuration runs in a
fresh subprocess (for a clean peak-memory reading), and configurations are interleaved over
repeats so that machine noise hits them alike; figures are medians of the repeats.

    FEDPRIV_DATA_DIR=../shared/data .venv/bin/python bench/dp_overhead.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
MODES = ["non-private", "hooks", "functorch", "ew"]


def measure(mode: str, steps: int, batch: int, physical: int, threads: int) -> dict:
    """Run `steps` training steps in this process and report seconds per sample and peak RSS."""
    import torch

    from fedpriv.config import DatasetConfig
    from fedpriv.data import load_dataset
    from fedpriv.data.synthetic import make_synthetic
    from fedpriv.errors import FedprivError
    from fedpriv.models import build_model
    from fedpriv.privacy import PrivacyPlan
    from fedpriv.training import train_local

    torch.set_num_threads(threads)
    try:
        data = load_dataset(DatasetConfig(), seed=0).train.as_dataset()
    except FedprivError:  # no PneumoniaMNIST here: synthetic images of the same shape
        data = make_synthetic(6000, 28, 0, 0.1, 0.1).train.as_dataset()
    q = batch / len(data)
    if mode == "non-private":
        plan = PrivacyPlan.non_private(steps=steps, sample_rate=q, max_physical_batch_size=physical)
    else:
        plan = PrivacyPlan(steps, q, 1.0, 1.0, max_physical_batch_size=physical, grad_sample_mode=mode)
    model = build_model("cnn", in_channels=1, num_classes=2, image_size=28)
    train_local(model, data, PrivacyPlan(2, q, plan.noise_multiplier, plan.max_grad_norm,
                                         max_physical_batch_size=physical, grad_sample_mode=plan.grad_sample_mode),
                lr=0.1)  # warm-up: imports, allocator, hooks
    start = time.perf_counter()
    train_local(model, data, plan, lr=0.1)
    seconds = time.perf_counter() - start
    return {"mode": mode, "seconds_per_sample": seconds / (steps * batch), "seconds": seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few steps, one repeat")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--physical", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one measurement, JSON on stdout
    args = parser.parse_args()
    if args.measure:
        mode, physical = args.measure.split(":")
        print(json.dumps(measure(mode, args.steps, args.batch, int(physical), args.threads)))
        return
    steps, repeats = (5, 1) if args.quick else (args.steps, args.repeats)
    runs: dict[tuple[str, int], list[dict]] = {}
    for _ in range(repeats):
        for physical in args.physical:
            for mode in MODES:
                command = [sys.executable, __file__, "--measure", f"{mode}:{physical}", "--steps", str(steps),
                           "--batch", str(args.batch), "--threads", str(args.threads)]
                output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
                runs.setdefault((mode, physical), []).append(json.loads(output.strip().splitlines()[-1]))
    rows = []
    for (mode, physical), samples in runs.items():
        base = statistics.median(s["seconds_per_sample"] for s in runs[("non-private", physical)])
        per_sample = statistics.median(s["seconds_per_sample"] for s in samples)
        rows.append({"mode": mode, "physical_batch": physical, "ms_per_sample": per_sample * 1e3,
                     "ratio_to_non_private": per_sample / base,
                     "peak_rss_mb": max(s["peak_rss_mb"] for s in samples), "repeats": len(samples)})
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "dp_overhead.json").write_text(json.dumps({"batch": args.batch, "steps": steps,
                                                          "threads": args.threads, "rows": rows}, indent=2))
    print(f"\nlogical batch {args.batch}, {steps} steps, {args.threads} threads, median of {repeats}\n")
    print("| mode | physical batch | ms / sample | x non-private | peak RSS MB |\n|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['mode']} | {r['physical_batch']} | {r['ms_per_sample']:.3f} | {r['ratio_to_non_private']:.2f} "
              f"| {r['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
