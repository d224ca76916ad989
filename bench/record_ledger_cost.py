"""Cost of the per-record ledger in one hospital's round, for large record sets with long histories.

For each size (10,000 and 100,000 records by default) and each history it builds, as set-up through
the ledger's public API (not measured), a ledger with 200 rounds of DP-SGD history (PRV accountant,
batch 128, one local epoch a round, in runs of 40 rounds, each run with its own sigma). The set-up's
budget checks use the cheap RDP upper bound instead of PRV (`rdp_bound_accounting`: the same
records fit, and at 100,000 records it saves tens of minutes); every measured round uses PRV, as
fedpriv does.

- **stable**: the same records every round (one record set, one record group);
- **changing**: every 20 rounds new records arrive (5% of the final size) and some leave (2.5%, at
  random), so the history holds 10 distinct record sets, and the records held now fall into 10
  groups with different histories (by when they arrived); the set ends at the stated size.

Then it measures rounds as `fedpriv.hospital.train_round` runs them: the real function, with only
`train_local` replaced by a stub that trains nothing, so that what is timed is the hospital's own
`ledger_seconds` (open the ledger, `calibration_history`, the sigma of the run from `events()`,
`charge`, then after training `confirm` and `status`). Warm rounds (consecutive rounds of the
current run, in one process, as a simulated hospital's Ray worker runs them) give the median and
p90; one cold round (every in-process cache emptied: record sets, epsilon, PRV integrals: what a
deployed hospital pays, Flower starting a fresh process per message) and
one first round of a new run (which calibrates sigma) are reported beside them. One more warm round
runs under cProfile; its hot spots go to bench/results/record_ledger_cost_profile_*.txt.

Side by side, in the same run and interleaved with the ledger rounds, it times one default local
epoch of DP-SGD (`fedpriv.training.train_local`, the default CNN, Poisson batches of 128, one
torch thread as a simulated hospital has by default) on one hospital holding PneumoniaMNIST's
training records (`FEDPRIV_DATA_DIR`; synthetic images of the same shape if it is missing). A
round's training time grows linearly with its records (1/q steps of 128 records), so the share is
the ledger time over the measured training time per record x the records of the ledger.

    FEDPRIV_DATA_DIR=../shared/data .venv/bin/python bench/record_ledger_cost.py [--records 10000 100000]
        [--rounds 200] [--change-every 20] [--repeats 7] [--scenarios stable changing] [--out NAME] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import functools
import hashlib
import io
import json
import math
import os
import pstats
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).parent / "results"
BATCH = 128
BUDGET = 3.0  # fedpriv's default epsilon
DELTA = 1e-5
RUN_LENGTH = 40  # rounds per run in the history (fedpriv's default num_rounds)
HOSPITAL = "hospital_0"
PARTS = ("open", "calibration_history", "events", "calibrate", "charge", "confirm", "status", "close")


# --------------------------------------------------------------------- histories (set-up)


def make_ids(start: int, count: int) -> np.ndarray:
    """Record ids shaped like fedpriv's content ids (32 hex digits)."""
    return np.array([hashlib.sha256(f"bench-record/{i}".encode()).hexdigest()[:32]
                     for i in range(start, start + count)])


def record_sets(records: int, scenario: str, rounds: int, change_every: int, seed: int = 0) -> list[np.ndarray]:
    """The record set of each phase of `change_every` rounds; the last phase holds `records` records."""
    phases = max(1, math.ceil(rounds / change_every))
    if scenario == "stable":
        return [make_ids(0, records)] * phases
    arrive, leave = records // 20, records // 40
    first = records - (phases - 1) * (arrive - leave)
    rng = np.random.default_rng(seed)
    current, issued = make_ids(0, first), first
    sets = [current]
    for _ in range(phases - 1):
        kept = np.ones(len(current), dtype=bool)
        kept[rng.choice(len(current), size=leave, replace=False)] = False
        current = np.concatenate([current[kept], make_ids(issued, arrive)])
        issued += arrive
        sets.append(current)
    assert len(sets[-1]) == records
    return sets


def record_groups(sets: list[np.ndarray]) -> int:
    """How many groups with different histories the last set's records fall into."""
    from fedpriv.privacy.records import record_keys, signatures

    keys = record_keys(sets[-1])
    distinct = {s.tobytes(): s for s in sets}.values()
    membership = np.column_stack([np.isin(keys, record_keys(s)) for s in distinct])
    patterns, _ = signatures(membership)
    return len(patterns)


def base_sigma(records: int, rounds: int) -> float:
    """A sigma with which `rounds` one-epoch rounds on `records` records spend about epsilon 2 of 3."""
    from fedpriv.privacy.accounting import noise_multiplier_for
    from fedpriv.privacy.plan import steps_per_epoch

    q = BATCH / records
    return noise_multiplier_for(target_epsilon=2.0, delta=DELTA, sample_rate=q, steps=rounds * steps_per_epoch(q))


def run_of(history_round: int) -> tuple[str, int]:
    return f"history-{(history_round - 1) // RUN_LENGTH}", (history_round - 1) % RUN_LENGTH + 1


@contextlib.contextmanager
def rdp_bound_accounting():
    """During set-up only: the ledger's budget check uses the cheap RDP upper bound instead of PRV.

    That bound is never below PRV's epsilon (fedpriv's calibration relies on the same fact), so a
    record that fits by it fits by PRV too, and the history written is the one PRV would have let
    through; only each charge's informational ``projected_epsilon`` is the (higher) bound. Set-up of
    the changing 10,000-record ledger takes 8 s instead of 162 s. Nothing measured runs under it.
    """
    from fedpriv.privacy import accounting, rdp
    from fedpriv.privacy.ledger import PrivacyLedger

    original = PrivacyLedger._epsilon

    def bound(self, events, history):
        merged = accounting.merge_events(events)
        if not merged:
            return 0.0
        return rdp.rdp_epsilon([(e.noise_multiplier, e.sample_rate, e.steps) for e in merged],
                               history.delta, rdp.QUICK_ORDERS)

    PrivacyLedger._epsilon = bound
    try:
        yield
    finally:
        PrivacyLedger._epsilon = original


def build_history(path: Path, sets: list[np.ndarray], rounds: int, change_every: int, sigma: float) -> float:
    """Write `rounds` charged-and-confirmed rounds through the public API; returns seconds taken."""
    from fedpriv.privacy.ledger import PrivacyLedger
    from fedpriv.privacy.plan import steps_per_epoch

    started = time.perf_counter()
    with rdp_bound_accounting(), PrivacyLedger.open(path, budget_epsilon=BUDGET, delta=DELTA) as ledger:
        for number in range(1, rounds + 1):
            ids = sets[min((number - 1) // change_every, len(sets) - 1)]
            run_id, round_in_run = run_of(number)
            run_sigma = sigma * (1 + 0.05 * ((number - 1) // RUN_LENGTH))  # each run calibrated its own
            steps = steps_per_epoch(BATCH / len(ids))
            charge = ledger.charge(ids, noise_multiplier=run_sigma, batch_size=BATCH, steps=steps, run_id=run_id,
                                   round=round_in_run, hospital=HOSPITAL, min_records=BATCH, budget=BUDGET)
            if charge.num_records != len(ids):
                raise RuntimeError(f"set-up round {number}: only {charge.num_records} of {len(ids)} records fit")
            ledger.confirm(charge, steps_done=steps)
    return time.perf_counter() - started


# --------------------------------------------------------------------- measured rounds


@dataclass
class Scenario:
    name: str
    records: int
    path: Path
    ids: np.ndarray
    history_rounds: int
    distinct_sets: int
    groups: int
    next_round: int  # the next round number of the current run
    setup_seconds: float
    size_after_setup: int


class PartTimer:
    """Times the ledger's public calls (and the hospital's sigma calibration) made inside a round."""

    def __init__(self) -> None:
        self.parts: dict[str, float] = {}

    @contextlib.contextmanager
    def installed(self):
        import fedpriv.hospital as hospital
        from fedpriv.privacy.ledger import PrivacyLedger

        originals = {name: PrivacyLedger.__dict__[name] for name in
                     ("open", "calibration_history", "events", "charge", "confirm", "status", "close")}
        calibrate = hospital.noise_multiplier_for

        def timed(name, function):
            @functools.wraps(function)
            def wrapper(*args, **kwargs):
                started = time.perf_counter()
                try:
                    return function(*args, **kwargs)
                finally:
                    self.parts[name] = self.parts.get(name, 0.0) + time.perf_counter() - started
            return wrapper

        for name, original in originals.items():
            if isinstance(original, classmethod):
                setattr(PrivacyLedger, name, classmethod(timed(name, original.__func__)))
            else:
                setattr(PrivacyLedger, name, timed(name, original))
        hospital.noise_multiplier_for = timed("calibrate", calibrate)
        try:
            yield self
        finally:
            for name, original in originals.items():
                setattr(PrivacyLedger, name, original)
            hospital.noise_multiplier_for = calibrate


def stub_train_local(model, data, plan, **_):
    """Stands in for local training: the ledger's work around it is what is measured."""
    from fedpriv.training import LocalTrainResult

    return LocalTrainResult({}, [], plan.steps, len(data), 0.0, plan.private)


def clear_caches() -> None:
    """Empty every in-process cache the ledger's accounting uses (a fresh process)."""
    from fedpriv.privacy import accounting, prv, rdp, store

    accounting._epsilon_of_history.cache_clear()
    rdp.one_step_rdp.cache_clear()
    prv.clear_caches()  # grids, spectra and their powers, PRV integrals
    with store._SET_CACHE_LOCK:
        store._SET_CACHE.clear()


def ledger_round(scenario: Scenario, records, *, run_id: str, server_round: int, num_rounds: int,
                 profile: cProfile.Profile | None = None) -> dict:
    """One round through fedpriv.hospital.train_round with training stubbed; its ledger seconds, by part."""
    import fedpriv.hospital as hospital
    from fedpriv.hospital import HospitalSettings, RoundRequest

    settings = HospitalSettings(name=HOSPITAL, budget_epsilon=BUDGET, delta=DELTA, ledger_path=scenario.path,
                                accountant="prv", noise_seed=0, ledger_budget_epsilon=BUDGET)
    request = RoundRequest(run_id=run_id, server_round=server_round, num_rounds=num_rounds, batch_size=BATCH)
    timer = PartTimer()
    original = hospital.train_local
    hospital.train_local = stub_train_local
    try:
        with timer.installed():
            started = time.perf_counter()
            if profile is not None:
                profile.enable()
            outcome = hospital.train_round(torch.nn.Linear(1, 2), records, settings, request, num_classes=2)
            if profile is not None:
                profile.disable()
            wall = time.perf_counter() - started
    finally:
        hospital.train_local = original
    if outcome.status != hospital.TRAINED:
        raise RuntimeError(f"{scenario.name}: the round was not trained: {outcome.message}")
    if outcome.num_examples != len(records):
        raise RuntimeError(f"{scenario.name}: only {outcome.num_examples} of {len(records)} records were charged")
    return {"ledger_seconds": outcome.ledger_seconds, "train_round_wall_seconds": wall,
            "parts": timer.parts, "epsilon": outcome.epsilon, "records_charged": outcome.num_examples,
            "noise_multiplier": outcome.noise_multiplier}


def as_records(ids: np.ndarray):
    """The hospital's records as LabeledImages: placeholder 1x1 images, the ids are what the ledger sees."""
    from fedpriv.data import LabeledImages

    return LabeledImages(torch.zeros(len(ids), 1, 1, 1), torch.zeros(len(ids), dtype=torch.long), None, ids)


# --------------------------------------------------------------------- default training round


def training_setup():
    """One hospital holding PneumoniaMNIST's training records (as fedpriv prepares it), default model."""
    from fedpriv.app_config import compose_config
    from fedpriv.config import logit_shift
    from fedpriv.errors import FedprivError
    from fedpriv.experiment import prepare_experiment
    from fedpriv.models import build_model

    cfg = compose_config(["federation=iid", "federation.num_hospitals=1", "federation.ledger_scope=run"])
    torch.set_num_threads(cfg.federation.client_cpus)
    try:
        experiment = prepare_experiment(cfg)
        data = experiment.hospital_data(0)
        source = ("PneumoniaMNIST (one hospital holding the whole training split; 90% of it trains, "
                  "10% is its validation)")
        dataset = experiment.dataset
        shape = (dataset.in_channels, dataset.num_classes, dataset.image_size)
    except FedprivError as error:  # no PneumoniaMNIST here: synthetic images of the same shape
        from fedpriv.data.synthetic import make_synthetic

        data, source = make_synthetic(4237, 28, 0, 0.1, 0.1).train, f"synthetic 28x28 ({error.__class__.__name__})"
        shape = (1, 2, 28)

    def model():
        return build_model(cfg.model.name, in_channels=shape[0], num_classes=shape[1], image_size=shape[2],
                           width=cfg.model.width, activation=cfg.model.activation)

    return cfg, data, source, model, logit_shift(cfg, shape[1])


def train_epoch(cfg, data, model_factory, shift, seed: int) -> float:
    """Seconds of one default local epoch of DP-SGD on `data` (what a default round trains)."""
    from fedpriv.privacy.plan import PrivacyPlan, steps_per_epoch
    from fedpriv.training import train_local

    q = cfg.train.batch_size / len(data)
    plan = PrivacyPlan(steps_per_epoch(q), q, 1.0, cfg.privacy.max_grad_norm, cfg.privacy.accountant,
                       cfg.privacy.max_physical_batch_size)
    dataset = data.as_dataset()
    model = model_factory()
    started = time.perf_counter()
    train_local(model, dataset, plan, lr=cfg.train.lr, momentum=cfg.train.momentum, logit_shift=shift, seed=seed)
    return time.perf_counter() - started


# --------------------------------------------------------------------- reporting


def percentile(values: list[float], share: float) -> float:
    return float(np.percentile(np.asarray(values), share * 100))


# Where a round's ledger time goes: cumulative time of these functions in the profiled round. They
# can nest (the chain replay holds its SELECT; "sqlite execute" is every statement's own time,
# COMMIT's fsync included), so the rows do not add up to the round.
BREAKDOWN = {
    "PRV accountant (fedpriv.privacy.prv)": ("accounting.py", "_opacus_epsilon", "cumtime"),
    "  of it: discretising each (sigma, q) on a new grid": ("prv.py", "_discretize", "cumtime"),
    "  of it: powers of cached spectra (new step counts)": ("prv.py", "_power", "cumtime"),
    "  of it: composing (product of spectra, inverse FFT)": ("prv.py", "compose", "cumtime"),
    "  of it: epsilon from the composed pmf": ("prv.py", "upper_epsilon", "cumtime"),
    "record keys (sha256 of every record id)": ("records.py", "record_keys", "cumtime"),
    "chain replay (_history: read, JSON, HMAC of every entry)": ("ledger.py", "_history", "cumtime"),
    "record-set membership (numpy isin)": ("records.py", "contains", "cumtime"),
    "records table writes (charge)": ("store.py", "add_records", "cumtime"),
    "witness file (write, fsync, rename)": ("chain.py", "write_witness", "cumtime"),
    "sqlite execute (own time: queries, fsynced commits)": ("~", "<method 'execute' of 'sqlite3.Connection' objects>",
                                                            "tottime"),
}


def profile_report(profile: cProfile.Profile, path: Path, limit: int = 40) -> tuple[list[dict], dict[str, float]]:
    text = io.StringIO()
    stats = pstats.Stats(profile, stream=text)
    stats.sort_stats("tottime").print_stats(limit)
    stats.sort_stats("cumulative").print_stats(limit)
    rows, breakdown = [], {}
    for (file, line, function), (calls, _, tottime, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append({"function": f"{Path(file).name}:{line}({function})", "calls": calls,
                     "tottime_ms": tottime * 1000, "cumtime_ms": cumtime * 1000})
        for label, (name, wanted, column) in BREAKDOWN.items():
            if Path(file).name == name and function == wanted:
                breakdown[label] = breakdown.get(label, 0.0) + (cumtime if column == "cumtime" else tottime) * 1000
    breakdown = {label: breakdown.get(label, 0.0) for label in BREAKDOWN}
    text.write("\nbreakdown (ms, cumulative; rows can nest):\n")
    for label, value in breakdown.items():
        text.write(f"  {label}: {value:.1f}\n")
    path.write_text(text.getvalue())
    return sorted(rows, key=lambda r: -r["tottime_ms"])[:15], breakdown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--scenarios", nargs="+", default=["stable", "changing"], choices=["stable", "changing"])
    parser.add_argument("--rounds", type=int, default=200, help="rounds of history before the measured rounds")
    parser.add_argument("--change-every", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=7, help="warm rounds measured per ledger")
    parser.add_argument("--quick", action="store_true", help="2,000 records, 40 rounds of history, 3 repeats")
    parser.add_argument("--out", default="record_ledger_cost", help="name of the JSON written to bench/results/")
    args = parser.parse_args()
    if args.quick:
        args.records, args.rounds, args.repeats = [2_000], 40, 3
    folder = Path(tempfile.mkdtemp(prefix="fedpriv-record-ledger-cost-"))
    os.environ["FEDPRIV_KEY_DIR"] = str(folder / "keys")  # never the user's own key folder
    # A hospital's process holds one ledger; here up to four share one process and its PRV cache,
    # so the cache gets room for all of them (the default, 1 GiB, is sized for one).
    os.environ.setdefault("FEDPRIV_PRV_CACHE_MB", "4096")

    from fedpriv.privacy.accounting import PrivacyEvent, epsilon
    from fedpriv.privacy.ledger import read_ledger

    epsilon([PrivacyEvent(1.0, 0.01, 10)], DELTA, "prv")  # import Opacus before anything is timed
    cfg, train_data, source, model_factory, shift = training_setup()
    print(f"training data: {source}, {len(train_data)} records", flush=True)

    scenarios: list[Scenario] = []
    for records in args.records:
        sigma = base_sigma(records, args.rounds)
        for name in args.scenarios:
            sets = record_sets(records, name, args.rounds, args.change_every)
            path = folder / f"{name}-{records}" / "simulated-pneumoniamnist.db"
            seconds = build_history(path, sets, args.rounds, args.change_every, sigma)
            _, last_round = run_of(args.rounds)
            scenarios.append(Scenario(f"{name}-{records}", records, path, sets[-1], args.rounds,
                                      len({s.tobytes() for s in sets}), record_groups(sets),
                                      last_round + 1, seconds, path.stat().st_size))
            print(f"set up {scenarios[-1].name}: {args.rounds} rounds in {seconds:.1f} s, "
                  f"{scenarios[-1].distinct_sets} sets, {scenarios[-1].groups} groups, "
                  f"{path.stat().st_size / 1e6:.2f} MB", flush=True)
    records_of = {s.name: as_records(s.ids) for s in scenarios}
    current_run, _ = run_of(args.rounds)
    planned = scenarios[0].next_round + args.repeats + 1

    # Warm rounds, interleaved with the training epochs (machine noise hits both alike).
    train_seconds: list[float] = []
    warm: dict[str, list[dict]] = {s.name: [] for s in scenarios}
    train_epoch(cfg, train_data, model_factory, shift, seed=99)  # warm-up (first-use costs of Opacus)
    for s in scenarios:  # warm-up: the process's first round on this ledger loads its sets
        ledger_round(s, records_of[s.name], run_id=current_run, server_round=s.next_round, num_rounds=planned)
        s.next_round += 1
    for repeat in range(args.repeats):
        train_seconds.append(train_epoch(cfg, train_data, model_factory, shift, seed=repeat))
        for s in scenarios:
            warm[s.name].append(ledger_round(s, records_of[s.name], run_id=current_run, server_round=s.next_round,
                                             num_rounds=planned))
            s.next_round += 1
        print(f"repeat {repeat + 1}/{args.repeats}: training {train_seconds[-1]:.2f} s; ledger ms "
              + ", ".join(f"{n} {rows[-1]['ledger_seconds'] * 1000:.0f}" for n, rows in warm.items()), flush=True)
    per_record = statistics.median(train_seconds) / len(train_data)

    rows = []
    RESULTS.mkdir(exist_ok=True)
    profiled, hot, breakdowns = {}, {}, {}
    for s in scenarios:  # every warm round first: the cold rounds below empty the caches
        profile = cProfile.Profile()
        profiled[s.name] = ledger_round(s, records_of[s.name], run_id=current_run, server_round=s.next_round,
                                        num_rounds=planned, profile=profile)
        s.next_round += 1
        hot[s.name], breakdowns[s.name] = profile_report(profile, RESULTS / f"record_ledger_cost_profile_{s.name}.txt")
    for s in scenarios:
        clear_caches()
        cold = ledger_round(s, records_of[s.name], run_id=current_run, server_round=s.next_round, num_rounds=planned)
        s.next_round += 1
        first = ledger_round(s, records_of[s.name], run_id="new-run", server_round=1, num_rounds=RUN_LENGTH)
        with read_ledger(s.path) as ledger:
            report = ledger.verify()
            final = ledger.status(s.ids, budget=BUDGET)
        assert report.ok, report.problems
        from fedpriv.privacy.records import record_keys

        hashing = []
        for _ in range(3):  # the record keys alone, outside the profiler (a round computes them 3 times)
            started = time.perf_counter()
            record_keys(s.ids)
            hashing.append(time.perf_counter() - started)
        values = [r["ledger_seconds"] for r in warm[s.name]]
        median, p90 = statistics.median(values), percentile(values, 0.9)
        round_seconds = per_record * s.records
        rows.append({
            "scenario": s.name, "records": s.records, "history_rounds": s.history_rounds,
            "distinct_sets": s.distinct_sets, "record_groups": s.groups,
            "ledger_ms_median": median * 1000, "ledger_ms_p90": p90 * 1000,
            "ledger_ms_warm_all": [v * 1000 for v in values],
            "parts_ms_median": {part: statistics.median(r["parts"].get(part, 0.0) for r in warm[s.name]) * 1000
                                for part in PARTS},
            "train_round_seconds_scaled": round_seconds,
            "share_of_round_median": median / round_seconds, "share_of_round_p90": p90 / round_seconds,
            # each repeat's ledger round against the training epoch measured just before it
            "share_of_round_per_repeat": [r["ledger_seconds"] / (t / len(train_data) * s.records)
                                          for r, t in zip(warm[s.name], train_seconds, strict=True)],
            "cold_round_ms": cold["ledger_seconds"] * 1000,
            "cold_parts_ms": {k: v * 1000 for k, v in cold["parts"].items()},
            "first_round_of_run_ms": first["ledger_seconds"] * 1000,
            "first_round_parts_ms": {k: v * 1000 for k, v in first["parts"].items()},
            "profiled_round_ms": profiled[s.name]["ledger_seconds"] * 1000, "profile_top_tottime": hot[s.name],
            "profile_breakdown_ms": breakdowns[s.name],
            "record_keys_ms_once": statistics.median(hashing) * 1000,
            "ledger_bytes_after_setup": s.size_after_setup, "ledger_bytes_at_end": s.path.stat().st_size,
            "entries_at_end": report.entries, "events_at_end": report.events,
            "setup_seconds": s.setup_seconds, "epsilon_max_at_end": final.epsilon_spent,
            "epsilon_median_at_end": final.epsilon_median, "noise_multiplier": warm[s.name][-1]["noise_multiplier"],
        })
    result = {
        "args": vars(args), "training_data": source, "training_records": len(train_data),
        "torch_threads": torch.get_num_threads(),
        "train_epoch_seconds": train_seconds, "train_seconds_per_record": per_record, "ledgers": rows,
    }
    (RESULTS / f"{args.out}.json").write_text(json.dumps(result, indent=2))
    print(f"\ndefault epoch of DP-SGD: {statistics.median(train_seconds):.2f} s on {len(train_data)} records "
          f"({per_record * 1e3:.3f} ms per record)")
    print("| ledger | records | history | sets | groups | ledger ms median / p90 | share of a round (median; "
          "per repeat) | cold ms | first round of a run ms | size on disk |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        paired = r["share_of_round_per_repeat"]
        print(f"| {r['scenario']} | {r['records']:,} | {r['history_rounds']} | {r['distinct_sets']} | "
              f"{r['record_groups']} | {r['ledger_ms_median']:.0f} / {r['ledger_ms_p90']:.0f} | "
              f"{r['share_of_round_median']:.2%} ({min(paired):.2%}-{max(paired):.2%}) | {r['cold_round_ms']:.0f} | "
              f"{r['first_round_of_run_ms']:.0f} | {r['ledger_bytes_at_end'] / 1e6:.2f} MB |")
    for r in rows:
        print(r["scenario"], "parts (ms, median):", {k: round(v, 1) for k, v in r["parts_ms_median"].items()})
    for r in rows:
        print(f"{r['scenario']}: profiled round {r['profiled_round_ms']:.0f} ms;",
              "; ".join(f"{k.strip()} {v:.0f}" for k, v in r["profile_breakdown_ms"].items()))
    print(f"(ledgers kept in {folder})")


if __name__ == "__main__":
    main()
