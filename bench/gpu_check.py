"""GPU check: a default federation trained on CUDA, with its wall time, test AUC and epsilon.

On a machine with a CUDA device it runs `fedpriv device=cuda` as a user would (the default config:
PneumoniaMNIST, the CNN, epsilon 3 per hospital, 3 hospitals; 10 rounds unless --rounds says
otherwise) with a throw-away ledger, checks from the run's result.json that every hospital reported
training on CUDA, and writes its figures to bench/results/gpu_check.json and gpu_check.md.
`--cpu-baseline` runs the same federation with device=cpu right after, on the same machine, for a
side-by-side. Without a CUDA device it prints one line saying it was skipped, and exits 0.

Simulated hospitals are Ray workers, and Ray hides every GPU from a worker given no GPU share
(CUDA_VISIBLE_DEVICES=""). Unless the caller sets RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO itself, this
script sets it to 0 (Ray's own switch) so the hospitals see the GPU; a run's GPU share can instead
be given with the overrides, where fedpriv has a setting for it.

    FEDPRIV_DATA_DIR=../shared/data .venv/bin/python bench/gpu_check.py [--rounds 10] [--cpu-baseline] [overrides...]
    .venv/bin/python bench/gpu_check.py --quick   # 2 rounds on small synthetic data (experiment=smoke)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
RAY_SWITCH = "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"  # 0: Ray leaves CUDA_VISIBLE_DEVICES alone for no-GPU workers


def run_federation(device: str, rounds: int, overrides: list[str]) -> dict:
    """Run `fedpriv device=DEVICE` in a fresh run directory; its figures (raises on a failed run)."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"fedpriv-gpu-check-{device.replace(':', '')}-"))
    command = [sys.executable, "-m", "fedpriv.cli.main", f"device={device}", f"strategy.num_rounds={rounds}",
               f"hydra.run.dir={run_dir}", "federation.ledger_scope=run", *overrides]  # a throw-away ledger
    env = {**os.environ}
    env.setdefault(RAY_SWITCH, "0")
    started = time.perf_counter()
    done = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise SystemExit(f"gpu_check: `fedpriv device={device}` failed (exit {done.returncode}); run directory "
                         f"{run_dir}\n{tail}")
    result = json.loads((run_dir / "result.json").read_text())
    rounds_seen = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    train = sum(float(h.get("train-seconds") or 0) for r in rounds_seen for h in r["hospitals"].values())
    epsilons = [float(h["epsilon"]) for h in result["hospitals"]]
    return {
        "device_asked": device, "wall_seconds": round(wall, 1), "server_seconds": round(result["server_seconds"], 1),
        "hospital_train_seconds": round(train, 1), "rounds_run": result["rounds_run"],
        "test_auc": result["test"].get("auc", math.nan), "test_accuracy": result["test"].get("accuracy", math.nan),
        "epsilon_max": max(epsilons, default=math.nan), "epsilon_budget": result["epsilon_budget"],
        "hospital_devices": result.get("devices", {}), "server_device": result.get("server_device", ""),
        "run_dir": str(run_dir),
    }


def markdown(rows: list[dict], gpu: str, settings: dict) -> str:
    lines = [f"# GPU check ({time.strftime('%Y-%m-%d %H:%M')})", "",
             f"GPU: {gpu}; torch {settings['torch']}; {settings['rounds']} rounds; overrides: "
             f"{' '.join(settings['overrides']) or 'none'}; {RAY_SWITCH}={settings['ray_switch']}", "",
             "| device asked | hospitals trained on | server evaluated on | wall s | hospitals' train s | test AUC "
             "| epsilon (max) |", "|---|---|---|---:|---:|---:|---:|"]
    for row in rows:
        trained = ", ".join(sorted(set(row["hospital_devices"].values()))) or "none reported"
        lines.append(f"| {row['device_asked']} | {trained} | {row['server_device']} | {row['wall_seconds']} | "
                     f"{row['hospital_train_seconds']} | {row['test_auc']:.4f} | {row['epsilon_max']:.3f} "
                     f"of {row['epsilon_budget']:g} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="2 rounds on small synthetic data (experiment=smoke)")
    parser.add_argument("--cpu-baseline", action="store_true", help="also run it with device=cpu, for comparison")
    parser.add_argument("overrides", nargs="*", help="fedpriv overrides, e.g. federation.num_hospitals=5")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print(f"gpu_check: skipped: no CUDA device on this machine (torch {torch.__version__}: "
              "torch.cuda.is_available() is False); nothing was run")
        return
    if args.quick:
        args.rounds, args.overrides = 2, ["experiment=smoke", *args.overrides]
    gpu = torch.cuda.get_device_name(0)
    rows = [run_federation("cuda", args.rounds, args.overrides)]
    if args.cpu_baseline:
        rows.append(run_federation("cpu", args.rounds, args.overrides))
    settings = {"torch": torch.__version__, "rounds": args.rounds, "overrides": args.overrides,
                "ray_switch": os.environ.get(RAY_SWITCH, "0")}
    off_gpu = {name: device for name, device in rows[0]["hospital_devices"].items() if not device.startswith("cuda")}
    ok = bool(rows[0]["hospital_devices"]) and not off_gpu and rows[0]["server_device"].startswith("cuda")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gpu_check.json").write_text(json.dumps({"ok": ok, "gpu": gpu, **settings, "runs": rows}, indent=2))
    (RESULTS / "gpu_check.md").write_text(markdown(rows, gpu, settings))
    print(markdown(rows, gpu, settings))
    if not ok:
        raise SystemExit(f"gpu_check: device=cuda did not train every hospital on CUDA: "
                         f"{off_gpu or 'no hospital reported a device'} (see {RESULTS / 'gpu_check.json'})")


if __name__ == "__main__":
    main()
