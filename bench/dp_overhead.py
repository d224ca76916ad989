"""DP-SGD training overhead: time per training sample of the private step over the non-private one.

Same model (`--model`, default the CNN), same data, same logical batch, on this CPU, for each of
Opacus's grad-sample modes (hooks, functorch, expanded weights "ew", ghost clipping "ghost"). Every
configuration runs in a fresh subprocess (for a clean peak-memory reading), and configurations are
interleaved over repeats so that machine noise hits them alike; figures are medians of the repeats.
Peak RSS is given twice: for the whole process (data loading included) and during the timed
training call alone (the kernel's high-water mark is reset just before it, /proc/self/clear_refs),
with the growth over the RSS the process had when that call started.

    FEDPRIV_DATA_DIR=../shared/data .venv/bin/python bench/dp_overhead.py [--quick]
    FEDPRIV_DATA_DIR=../shared/data .venv/bin/python bench/dp_overhead.py --model resnet18 --batch 64 --physical 32 64
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
MODES = ["non-private", "hooks", "functorch", "ew", "ghost"]
# "hooks-full-backward": hooks mode with an ordinary backward pass, which also computes the batch
# gradients DP-SGD never uses (fedpriv before it backpropagated only towards the images); kept so
# that the saving can be measured side by side.
EXTRA_MODES = ["hooks-full-backward"]


def _status_kb(field: str) -> float | None:
    """A `VmRSS` / `VmHWM` figure of this process in kB (None where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark (VmHWM); False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure(mode: str, steps: int, batch: int, physical: int, threads: int, model_name: str = "cnn") -> dict:
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
    label = mode
    if mode == "hooks-full-backward":
        import fedpriv.training as training

        run_steps = training._run_steps
        training._run_steps = lambda *a, **k: run_steps(*a, **{**k, "per_sample_only": False})
        mode = "hooks"
    if mode == "non-private":
        plan = PrivacyPlan.non_private(steps=steps, sample_rate=q, max_physical_batch_size=physical)
    else:
        plan = PrivacyPlan(steps, q, 1.0, 1.0, max_physical_batch_size=physical, grad_sample_mode=mode)
    width = 32 if model_name == "scatnet" else 16  # each model's configured width (conf/model/)
    model = build_model(model_name, in_channels=1, num_classes=2, image_size=28, width=width)
    if model_name == "scatnet":  # a hospital trains on its precomputed coefficients (fedpriv.site.HospitalSite)
        from fedpriv.data import LabeledImages
        from fedpriv.scatnet import precomputed

        images, labels = data.tensors
        data = precomputed(model, LabeledImages(images, labels)).as_dataset()
    train_local(model, data, PrivacyPlan(2, q, plan.noise_multiplier, plan.max_grad_norm,
                                         max_physical_batch_size=physical, grad_sample_mode=plan.grad_sample_mode),
                lr=0.1)  # warm-up: imports, allocator, hooks
    rss_before_kb = _status_kb("VmRSS")
    reset = _reset_peak_rss()
    start, cpu_start = time.perf_counter(), time.process_time()
    train_local(model, data, plan, lr=0.1)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    train_peak_kb = _status_kb("VmHWM") if reset else None
    return {"mode": label, "model": model_name, "seconds_per_sample": seconds / (steps * batch), "seconds": seconds,
            "cpu_seconds_per_sample": cpu_seconds / (steps * batch),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "train_peak_rss_mb": None if train_peak_kb is None else train_peak_kb / 1024,
            "train_rss_growth_mb": None if train_peak_kb is None or rss_before_kb is None
            else (train_peak_kb - rss_before_kb) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few steps, one repeat")
    parser.add_argument("--model", default="cnn", choices=["cnn", "resnet18", "scatnet"])
    parser.add_argument("--modes", nargs="+", default=MODES, choices=MODES + EXTRA_MODES,
                        help="modes to compare (non-private is always run: it is the reference)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--physical", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one measurement, JSON on stdout
    args = parser.parse_args()
    if args.measure:
        mode, physical = args.measure.split(":")
        print(json.dumps(measure(mode, args.steps, args.batch, int(physical), args.threads, args.model)))
        return
    steps, repeats = (5, 1) if args.quick else (args.steps, args.repeats)
    modes = ["non-private"] + [m for m in args.modes if m != "non-private"]
    runs: dict[tuple[str, int], list[dict]] = {}
    failures: dict[tuple[str, int], str] = {}
    for repeat in range(repeats):
        for physical in args.physical:
            for mode in modes:
                command = [sys.executable, __file__, "--measure", f"{mode}:{physical}", "--steps", str(steps),
                           "--batch", str(args.batch), "--threads", str(args.threads), "--model", args.model]
                done = subprocess.run(command, capture_output=True, text=True, check=False)
                if done.returncode != 0:  # e.g. out of memory: recorded, the other modes still run
                    lines = (done.stderr.strip() or f"exit {done.returncode}").splitlines()
                    failures[(mode, physical)] = lines[-1][:200] if lines else f"exit {done.returncode}"
                    continue
                sample = json.loads(done.stdout.strip().splitlines()[-1])
                runs.setdefault((mode, physical), []).append({**sample, "repeat": repeat})
    rows = []
    for physical in args.physical:
        reference = runs.get(("non-private", physical))
        base = statistics.median(s["seconds_per_sample"] for s in reference) if reference else None
        cpu_base = statistics.median(s["cpu_seconds_per_sample"] for s in reference) if reference else None
        for mode in modes:
            samples = runs.get((mode, physical))
            if not samples:
                rows.append({"mode": mode, "physical_batch": physical, "failed": failures.get((mode, physical))})
                continue
            per_sample = statistics.median(s["seconds_per_sample"] for s in samples)
            cpu_per_sample = statistics.median(s["cpu_seconds_per_sample"] for s in samples)
            growth = [s["train_rss_growth_mb"] for s in samples if s["train_rss_growth_mb"] is not None]
            train_peak = [s["train_peak_rss_mb"] for s in samples if s["train_peak_rss_mb"] is not None]
            rows.append({"mode": mode, "physical_batch": physical, "ms_per_sample": per_sample * 1e3,
                         "ratio_to_non_private": per_sample / base if base else None,
                         "cpu_ratio_to_non_private": cpu_per_sample / cpu_base if cpu_base else None,
                         "ratios_per_repeat": [s["seconds_per_sample"] / r["seconds_per_sample"]
                                               for s in samples for r in reference or []
                                               if r["repeat"] == s["repeat"]],
                         "peak_rss_mb": max(s["peak_rss_mb"] for s in samples),
                         "train_peak_rss_mb": max(train_peak) if train_peak else None,
                         "train_rss_growth_mb": max(growth) if growth else None,
                         "repeats": len(samples), "failed": failures.get((mode, physical))})
    RESULTS.mkdir(exist_ok=True)
    name = "dp_overhead.json" if args.model == "cnn" else f"dp_overhead-{args.model}.json"
    (RESULTS / name).write_text(json.dumps({"model": args.model, "batch": args.batch, "steps": steps,
                                            "threads": args.threads, "repeats": repeats, "rows": rows}, indent=2))
    print(f"\nmodel {args.model}, logical batch {args.batch}, {steps} steps, {args.threads} threads, "
          f"median of {repeats}\n")
    print("| mode | physical batch | ms / sample | x non-private | x per repeat | x non-private (CPU time) "
          "| peak RSS MB (process) | peak RSS MB (training) | RSS growth MB (training) |\n"
          "|---|---:|---:|---:|---|---:|---:|---:|---:|")
    for r in rows:
        if "ms_per_sample" not in r:
            print(f"| {r['mode']} | {r['physical_batch']} | failed: {r['failed']} | | | | | | |")
            continue
        ratio = "-" if r["ratio_to_non_private"] is None else f"{r['ratio_to_non_private']:.2f}"
        each = " ".join(f"{x:.2f}" for x in r["ratios_per_repeat"])
        train_peak = "-" if r["train_peak_rss_mb"] is None else f"{r['train_peak_rss_mb']:.0f}"
        growth = "-" if r["train_rss_growth_mb"] is None else f"{r['train_rss_growth_mb']:.0f}"
        cpu_ratio = "-" if r["cpu_ratio_to_non_private"] is None else f"{r['cpu_ratio_to_non_private']:.2f}"
        print(f"| {r['mode']} | {r['physical_batch']} | {r['ms_per_sample']:.3f} | {ratio} | {each} | {cpu_ratio} "
              f"| {r['peak_rss_mb']:.0f} | {train_peak} | {growth} |")


if __name__ == "__main__":
    main()
