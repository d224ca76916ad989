"""fedpriv against a plain Flower + Opacus app, at equal work, side by side in one invocation.

The baseline (bench/opacus_baseline/) is the kind of app Flower's own Opacus example shows: FedAvg, a
ClientApp that wraps the model with a fresh Opacus PrivacyEngine every round, no ledger, no budget, no
reply checks. Both apps run the same work: PneumoniaMNIST, 3 IID hospitals, N rounds of one local
epoch, Poisson batches of 128 (DP-SGD, clipping 1.0), the same CNN (fedpriv's default), a local
evaluation on each hospital's validation share and a server evaluation on the test split every round.
Both are started the same way, `flwr run <app> local --stream` with a fresh home folder (so each
starts its own local SuperLink), and they alternate (baseline, fedpriv, baseline, fedpriv, ...).

Per run: wall time of `flwr run`; the CPU time (user + system) of every process the run started, in
all and per round (less disturbed by other load on the machine than wall time); the time of each round (from one round's end to the next: the
baseline's server notes each end, fedpriv's is seen when its metrics.json gains the round); and the
memory of every process the run started (they all carry its home folder in their environment),
PSS summed, sampled every 0.5 s: the peak, and the median over the rounds. Every process is stopped
by PID afterwards.

    FEDPRIV_DATA_DIR=../shared/data .venv/bin/python bench/opacus_comparison.py [--pairs 2] [--rounds 10]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from fedpriv.simulation import free_ports

PROJECT = Path(__file__).resolve().parents[1]
BASELINE = Path(__file__).resolve().parent / "opacus_baseline"
RESULTS = Path(__file__).parent / "results"
FEDERATION = "num-supernodes=3 client-resources-num-cpus=1"


def _run_processes(home: Path, known: dict[tuple[int, float], bool] | None = None) -> list[psutil.Process]:
    """Every process whose environment names `home` as HOME: what this run's `flwr run` started.
    `known` remembers the answer per (pid, start time), so that sampling reads each environment once."""
    found = []
    known = {} if known is None else known
    for process in psutil.process_iter():
        try:
            key = (process.pid, process.create_time())
            if key not in known:
                known[key] = process.environ().get("HOME") == str(home)
            if known[key]:
                found.append(process)
        except (psutil.Error, OSError):
            pass
    return found


def _cpu_seconds(processes: list[psutil.Process], seen: dict[tuple[int, float], float]) -> float:
    """CPU time (user + system) used so far by every process of the run, those that ended included
    (each counts with the last figure sampled from it). Less disturbed by other load than wall time."""
    for process in processes:
        try:
            times = process.cpu_times()
            seen[(process.pid, process.create_time())] = times.user + times.system
        except (psutil.Error, OSError):
            pass
    return sum(seen.values())


def _pss_mb(processes: list[psutil.Process]) -> float:
    total = 0
    for process in processes:
        try:
            total += process.memory_full_info().pss
        except (psutil.Error, OSError):
            pass
    return total / 2**20


def _stop(home: Path) -> None:
    processes = _run_processes(home)
    for process in processes:
        try:
            process.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(processes, timeout=10)
    for process in alive:
        try:
            process.kill()
        except psutil.Error:
            pass


def run_once(app: str, rounds: int, data_dir: Path, keep: bool = False) -> dict:
    home = Path(tempfile.mkdtemp(prefix=f"opacus-cmp-{app}-"))
    superlink, control = free_ports(2)
    env = {**os.environ, "HOME": str(home), "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(superlink),
           "FLWR_LOCAL_CONTROL_API_PORT": str(control), "FEDPRIV_KEY_DIR": str(home / "keys"),
           "FEDPRIV_LEDGER_DIR": str(home / "ledgers"), "FEDPRIV_DATA_DIR": str(data_dir),
           # both use this environment: no `uv sync` of the app's dependencies into a fresh one per run
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    run_dir, timing = home / "run", home / "timing.json"
    if app == "baseline":
        target = BASELINE
        config = (f'data-file="{data_dir / "pneumoniamnist.npz"}" timing-file="{timing}" '
                  f"num-server-rounds={rounds}")
    else:
        target = PROJECT
        # client_evaluate: the baseline's FedAvg evaluates on every hospital too (fedpriv's default does not)
        config = (f'overrides="federation=iid strategy.num_rounds={rounds} strategy.client_evaluate=true '
                  f'federation.ledger_scope=run" '
                  f'run-dir="{run_dir}"')
    command = ["flwr", "run", str(target), "local", "--stream", "--federation-config", FEDERATION,
               "--run-config", config]
    ends: dict[int, float] = {}
    memory: list[tuple[float, float]] = []
    cpu: list[tuple[float, float]] = []  # (time, CPU seconds of the run so far)
    known: dict[tuple[int, float], bool] = {}
    used: dict[tuple[int, float], float] = {}
    started = time.time()
    log = home / "flwr-run.log"
    try:
        with open(log, "w") as out:
            process = subprocess.Popen(command, cwd=target, env=env, stdout=out, stderr=subprocess.STDOUT)
            next_sample = 0.0
            while process.poll() is None:
                now = time.time()
                if now >= next_sample:
                    processes = _run_processes(home, known)
                    memory.append((now, _pss_mb(processes)))
                    cpu.append((now, _cpu_seconds(processes, used)))
                    next_sample = now + 0.5
                if app == "fedpriv" and (run_dir / "metrics.json").is_file():
                    try:
                        seen = json.loads((run_dir / "metrics.json").read_text())["rounds"]
                    except (ValueError, KeyError):
                        seen = []
                    for record in seen:
                        ends.setdefault(int(record["round"]), time.time())
                time.sleep(0.1)
        wall = time.time() - started
        if process.returncode != 0:
            raise SystemExit(f"{app} run failed ({process.returncode}); its log: {log}\n"
                             + log.read_text()[-3000:])
    finally:
        _stop(home)
    if not keep:
        shutil.rmtree(home / ".flwr", ignore_errors=True)
    if app == "baseline":
        ends = {r["round"]: r["time"] for r in json.loads(timing.read_text()) if r["round"] > 0}
        accuracy = json.loads(timing.read_text())[-1]["accuracy"]
    else:
        last = json.loads((run_dir / "metrics.json").read_text())["rounds"][-1]
        accuracy = last["server"].get("accuracy")
    assert sorted(ends) == list(range(1, rounds + 1)), (app, sorted(ends))
    periods = [ends[r] - ends[r - 1] for r in range(2, rounds + 1)]
    in_rounds = [mb for when, mb in memory if ends[1] - 0.5 <= when <= ends[rounds]] or [0.0]
    cpu_per_round = (_at(cpu, ends[rounds]) - _at(cpu, ends[1])) / (rounds - 1)
    return {"app": app, "rounds": rounds, "wall_s": wall, "cpu_s": cpu[-1][1], "round_cpu_s": cpu_per_round,
            "round_s_median": statistics.median(periods),
            "round_s_mean": statistics.fmean(periods), "first_round_end_s": ends[1] - started,
            "peak_pss_mb": max(mb for _, mb in memory), "median_pss_mb_in_rounds": statistics.median(in_rounds),
            "test_accuracy": accuracy, "load": os.getloadavg()[0]}


def _at(series: list[tuple[float, float]], when: float) -> float:
    """The sampled value of `series` at time `when`, interpolated between the samples around it."""
    before = max((p for p in series if p[0] <= when), default=series[0], key=lambda p: p[0])
    after = min((p for p in series if p[0] >= when), default=series[-1], key=lambda p: p[0])
    if after[0] == before[0]:
        return before[1]
    return before[1] + (after[1] - before[1]) * (when - before[0]) / (after[0] - before[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    data_dir = Path(os.environ.get("FEDPRIV_DATA_DIR", "")).resolve()
    if not (data_dir / "pneumoniamnist.npz").is_file():
        raise SystemExit("set FEDPRIV_DATA_DIR to the folder holding pneumoniamnist.npz")
    rows = []
    for pair in range(args.pairs):
        for app in ("baseline", "fedpriv"):
            row = run_once(app, args.rounds, data_dir) | {"pair": pair}
            rows.append(row)
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / "opacus_comparison.jsonl", "a") as file:
        for row in rows:
            file.write(json.dumps(row) + "\n")
    for pair in range(args.pairs):
        base, ours = (next(r for r in rows if r["pair"] == pair and r["app"] == app) for app in ("baseline", "fedpriv"))
        print(f"pair {pair}: fedpriv / baseline: round {ours['round_s_median'] / base['round_s_median']:.2f}x, "
              f"CPU per round {ours['round_cpu_s'] / base['round_cpu_s']:.2f}x, CPU {ours['cpu_s'] / base['cpu_s']:.2f}x, "
              f"wall {ours['wall_s'] / base['wall_s']:.2f}x, peak PSS {ours['peak_pss_mb'] / base['peak_pss_mb']:.2f}x, "
              f"PSS in rounds {ours['median_pss_mb_in_rounds'] / base['median_pss_mb_in_rounds']:.2f}x")


if __name__ == "__main__":
    main()
