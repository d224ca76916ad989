"""Real process faults: a hospital's SuperNode and the coordinator are SIGKILLed mid-round.

1. Deployment (TLS SuperLink, authenticated SuperNodes on loopback): one hospital's SuperNode and
   its ClientApp are killed after the hospital charged its (own) ledger for a round and before it
   confirmed it. The run goes on without it; the charge stays in its ledger; after a restart with
   the same node config the hospital trains again and its epsilon counts the interrupted round.
2. Simulation: the whole `fedpriv` process group is killed after round 2, with round 3 in flight.
   Nothing it started may outlive it (the SuperLink and Ray run in sessions of their own); a
   resumed run continues from the last checkpoint, and no charge of the shared simulation ledger is
   lost: a hospital that paid for the interrupted round affords one round fewer.

Every process these tests start is stopped by PID (also on failure), never by name.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from fedpriv.app_config import compose_config
from fedpriv.deployment.processes import ManagedProcess, online_nodes
from fedpriv.deployment.rehearsal import LocalFederation
from fedpriv.experiment import prepare_experiment
from fedpriv.privacy.accounting import epsilon
from fedpriv.privacy.ledger import LedgerEvent, read_ledger
from fedpriv.process_tree import alive, descendants, group_members, processes_mentioning, start_time, terminate_tree
from fedpriv.simulation import executable
from fedpriv.site import simulation_ledger_path

pytestmark = [pytest.mark.slow, pytest.mark.processes]

# ------------------------------------------------------------------------------------------ helpers


def _describe(pids: list[int]) -> str:
    lines = []
    for pid in pids:
        try:
            lines.append(f"{pid}: " + " ".join(psutil.Process(pid).cmdline())[:160])
        except psutil.Error:
            lines.append(f"{pid}: (gone)")
    return "\n".join(lines)


def _kill_by_pid(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _wait_until_gone(marker: str, timeout: float) -> list[int]:
    """Wait up to `timeout` s for every process mentioning `marker` to end; the PIDs still alive."""
    deadline = time.monotonic() + timeout
    while (left := processes_mentioning(marker)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def _events(ledger: Path, key: Path | None = None) -> list[LedgerEvent]:
    """A ledger's events (charges, with their confirmations); [] while it does not exist yet.

    `key`: the ledger's key file where it is not the default one under $FEDPRIV_KEY_DIR (a deployed
    hospital names its own in its node config).
    """
    if not ledger.is_file():
        return []
    with read_ledger(ledger, key_path=key) as book:
        return book.events()


def _verified(ledger: Path, key: Path | None = None, records=None, budget: float | None = None):
    """(verify report, budget status of `records` (default: every record it knows), events), read once."""
    with read_ledger(ledger, key_path=key) as book:
        return book.verify(), book.status(records, budget=budget), book.events()


# ------------------------------------------------ 1. a hospital's SuperNode is killed mid-round

DEPLOY = ["dataset=synthetic", "dataset.num_samples=1200", "federation=iid", "train.batch_size=16",
          "train.local_epochs=1", "train.momentum=0.0", "model.width=4", "privacy.noise_multiplier=1.0",
          "strategy.client_evaluate=false"]
BUDGET = 40.0
# A healthy round takes ~15 s here (a fresh ClientApp process per message); the killed hospital's
# round waits this long for it.
ROUND_TIMEOUT = 40


def _kill_supernode(managed: ManagedProcess, launcher: ManagedProcess) -> list[int]:
    """SIGKILL a SuperNode, its launcher and the ClientApp processes the launcher spawned (PIDs checked
    by start time), as a machine that loses power would."""
    for process in (managed, launcher):
        process.note_descendants()
    children = [(pid, start_time(pid)) for process in (managed, launcher) for pid in descendants(process.pid)]
    _kill_by_pid([managed.pid, launcher.pid])  # first, so that neither can start another ClientApp
    _kill_by_pid([pid for pid, started in children if started is not None and alive((pid, started))])
    for process in (managed, launcher):
        process.process.wait(timeout=10)
    return [managed.pid, launcher.pid, *(pid for pid, _ in children)]


def _wait_for_unconfirmed_charge(ledger: Path, key: Path, run: threading.Thread, timeout: float) -> LedgerEvent:
    """The first ledger event seen between charge and confirm (the hospital is training it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and run.is_alive():
        charged = [event for event in _events(ledger, key) if not event.confirmed]
        if charged:
            return charged[-1]
        time.sleep(0.02)
    pytest.fail(f"never saw an unconfirmed charge in {ledger}: training is too short to catch between "
                "charge and confirm (use more records per hospital)")


def _wait_until_offline(federation: LocalFederation, node_id: int, timeout: float) -> float:
    """Flower 1.42 refuses to activate a node id it still lists as online (the new SuperNode exits
    with code 305, 'Failed to activate SuperNode'), and lists a crashed one as online until it missed
    two heartbeats (up to 60 s). Wait for that before restarting the hospital."""
    started = time.monotonic()
    while node_id in online_nodes(federation.env):
        assert time.monotonic() - started < timeout, f"node {node_id} still listed online after {timeout:.0f}s"
        time.sleep(2)
    return time.monotonic() - started


def test_a_hospital_killed_between_charge_and_confirm_is_skipped_and_keeps_its_charge(tmp_path):
    interrupted_cfg = compose_config([*DEPLOY, "strategy.num_rounds=2", f"strategy.round_timeout={ROUND_TIMEOUT}"])
    rejoin_cfg = compose_config([*DEPLOY, "strategy.num_rounds=1", "strategy.round_timeout=300"])
    out = tmp_path / "deployment"
    federation = LocalFederation(prepare_experiment(interrupted_cfg), out, budgets=[BUDGET] * 3, startup_timeout=120)
    outcomes: dict[str, object] = {}
    runner: threading.Thread | None = None

    def run(cfg, name):
        try:
            outcomes[name] = federation.run(cfg, name, timeout=600)
        except Exception as error:  # noqa: BLE001 - reported by the assertions below
            outcomes[name] = error

    try:
        federation.__enter__()
        victim, others = federation.hospitals[0], federation.hospitals[1:]
        runner = threading.Thread(target=run, args=(interrupted_cfg, "interrupted"), daemon=True)
        runner.start()

        # Kill the victim while it trains: after its ledger charge, before the confirmation.
        charge = _wait_for_unconfirmed_charge(victim.ledger, victim.ledger_key, runner, timeout=300)
        killed = _kill_supernode(victim.process, victim.launcher)
        left = _wait_until_gone(f"{victim.folder}{os.sep}", timeout=10)  # its FLWR_HOME, ledger, data
        assert not left, f"killed {killed}, still running:\n{_describe(left)}"
        after_kill = _events(victim.ledger, victim.ledger_key)
        assert after_kill[-1] == charge and charge.status == "charged", "the kill landed after the confirmation"
        assert charge.steps == charge.charged_steps > 0  # an unconfirmed charge counts in full

        runner.join(timeout=600)
        assert not runner.is_alive(), "the interrupted run did not end"
        outcome = outcomes["interrupted"]
        assert not isinstance(outcome, Exception), f"the run failed when a hospital died: {outcome}"

        # The run went on: every round completed, the victim skipped from the round it died in.
        run_dir = outcome.run_dir
        rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
        assert [r["round"] for r in rounds] == [1, 2]
        for record in rounds:
            assert all(record["hospitals"][h.name]["status"] == "trained" for h in others), record["hospitals"]
            status = record["hospitals"][victim.name]["status"]
            expected = ("trained",) if record["round"] < charge.round else ("timeout", "failed")
            assert status in expected, (record["round"], record["hospitals"][victim.name])
        assert "completed all 2 rounds" in (run_dir / "summary.md").read_text()
        model = torch.load(run_dir / "model.pt", weights_only=True)
        assert model and all(torch.isfinite(t).all() for t in model.values() if t.is_floating_point())

        # The interrupted charge stays (charged, in full); nothing was added while the node was down.
        report, _, events = _verified(victim.ledger, victim.ledger_key)
        assert report.ok, report.problems
        assert events == after_kill
        for hospital in others:
            report, _, events = _verified(hospital.ledger, hospital.ledger_key)
            assert report.ok, (hospital.name, report.problems)
            assert [(e.round, e.status, e.hospital) for e in events] == [
                (r, "confirmed", hospital.name) for r in (1, 2)], hospital.name

        # Restart the victim with the same node config (same key, ledger and data); it rejoins.
        waited = _wait_until_offline(federation, victim.node_id, timeout=120)
        victim.process = federation.start_supernode(victim)
        federation.wait_until_online()
        run(rejoin_cfg, "rejoined")
        rejoined = outcomes["rejoined"]
        assert not isinstance(rejoined, Exception), f"the restarted hospital could not take part: {rejoined}"
        reply = json.loads((rejoined.run_dir / "metrics.json").read_text())["rounds"][0]["hospitals"][victim.name]
        assert reply["status"] == "trained", reply

        report, status, events = _verified(victim.ledger, victim.ledger_key)
        assert report.ok, report.problems
        assert events[: len(after_kill)] == after_kill  # never removed, never rewritten, still charged
        new = events[len(after_kill):]
        assert [e.status for e in new] == ["confirmed"] and new[0].run_id != charge.run_id
        assert not status.locked and status.exhausted == 0
        # Its epsilon (every record of it took part in every event) counts the interrupted round, in
        # full: the composition of ALL its events, more than the new round alone.
        assert status.epsilon_spent == pytest.approx(epsilon([e.event() for e in events], status.delta,
                                                             status.accountant), rel=1e-9)
        assert status.epsilon_spent > epsilon([new[0].event()], status.delta, status.accountant) * 1.05
        assert reply["epsilon"] == pytest.approx(status.epsilon_spent, rel=1e-9)  # what it told the server
        print(f"victim killed in round {charge.round}; restart possible after {waited:.0f}s; "
              f"epsilon {status.epsilon_spent:.3f} (the new round alone: "
              f"{epsilon([new[0].event()], status.delta, status.accountant):.3f})")
    finally:
        federation.stop()  # also ends a run still going (its thread then returns)
        if runner is not None:
            runner.join(timeout=30)
    assert federation.processes is not None and federation.processes.leftovers() == []
    left = processes_mentioning(str(out))
    _kill_by_pid(left)
    assert not left, _describe(left)


# ------------------------------------------------------ 2. the coordinator is killed mid-run

ROUNDS = 4
TINY = ["dataset=synthetic", "dataset.num_samples=240", "federation=iid", "train.batch_size=16",
        "train.local_epochs=1", "model.width=4", "strategy.client_evaluate=false", "privacy.accountant=rdp",
        f"strategy.num_rounds={ROUNDS}"]
MARKER = "FEDPRIV_PROCESS_FAULT_TEST"


def _simulated_hospitals(overrides: list[str]):
    """The ledger every simulated hospital shares, and each hospital's (record ids, budget epsilon)."""
    cfg = compose_config(overrides)
    experiment = prepare_experiment(cfg)
    return simulation_ledger_path(cfg, None), {hospital.name: (experiment.hospital_data(i).ids(), hospital.epsilon)
                                               for i, hospital in enumerate(experiment.hospitals)}


def _by_hospital(events: list[LedgerEvent], names) -> dict[str, list[LedgerEvent]]:
    return {name: [e for e in events if e.hospital == name] for name in names}


def _flower_homes(marker: str) -> set[Path]:
    """The temporary FLWR_HOME folders (fedpriv-flwr-*) in the environment of the run's processes."""
    homes = set()
    for pid in processes_mentioning(marker):
        try:
            home = psutil.Process(pid).environ().get("FLWR_HOME")
        except psutil.Error:
            continue
        if home:
            homes.add(Path(home))
    return {home for home in homes if home.name.startswith("fedpriv-flwr-")}


def _start_fedpriv(args: list[str], cwd: Path, log: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(log, "ab") as handle:
        return subprocess.Popen([executable("fedpriv"), *args], cwd=cwd, env=env, stdout=handle,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)


def test_a_killed_coordinator_leaves_nothing_running_and_its_run_resumes(tmp_path):
    ledger_dir, first, resumed = tmp_path / "ledgers", tmp_path / "first", tmp_path / "resumed"
    overrides = [*TINY, f"federation.ledger_dir={ledger_dir}"]
    ledger, hospitals = _simulated_hospitals(overrides)
    assert ledger.parent == ledger_dir
    # Every process fedpriv starts inherits this variable: stragglers outside its group are found by it.
    env = {**os.environ, MARKER: str(tmp_path)}
    started = time.monotonic()
    cli = _start_fedpriv([*overrides, f"hydra.run.dir={first}"], tmp_path, tmp_path / "first.log", env)
    try:
        # Kill once round 2 is checkpointed and round 3 is in flight (a hospital has charged it).
        deadline = time.monotonic() + 300
        while not ((first / "checkpoints" / "round-002.pt").is_file()
                   and any(e.round == 3 for e in _events(ledger))):
            assert cli.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "round 3 never started"
            time.sleep(0.02)
        homes = _flower_homes(str(tmp_path))  # this run's SuperLink folder (other runs may have their own)
        assert homes, "the run's FLWR_HOME was not found in its processes' environment"
        os.killpg(cli.pid, signal.SIGKILL)  # the group's id is the PID of the process we started
        killed_at = time.monotonic()
        cli.wait(timeout=10)
        group = group_members(cli.pid)
        assert not group, _describe(group)
        # The SuperLink, the ServerApp and Ray run in sessions of their own: nothing of them may stay.
        left = _wait_until_gone(str(tmp_path), timeout=45)
        assert not left, "left running after fedpriv was killed:\n" + _describe(left)
        cleanup_seconds = time.monotonic() - killed_at
        # ... and the watchdog removes the SuperLink's temporary folder once it has stopped everything.
        deadline = time.monotonic() + 10
        while any(home.exists() for home in homes) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [home for home in homes if home.exists()]
    finally:
        _kill_by_pid(group_members(cli.pid))
        _kill_by_pid(processes_mentioning(str(tmp_path)))
    first_seconds = killed_at - started

    checkpoints = sorted(int(p.stem.split("-")[1]) for p in (first / "checkpoints").glob("round-*.pt"))
    last = checkpoints[-1]
    assert 2 <= last < ROUNDS, checkpoints
    before_all = _events(ledger)
    before = _by_hospital(before_all, hospitals)
    assert sum(map(len, before.values())) == len(before_all), [e.hospital for e in before_all]
    # Charges made for rounds after the last checkpoint: work the resumed run will redo.
    in_flight = {name: [e for e in events if e.round > last] for name, events in before.items()}
    if last == 2:
        assert any(in_flight.values())

    started = time.monotonic()
    cli = _start_fedpriv([*overrides, f"resume={first}", f"hydra.run.dir={resumed}"], tmp_path,
                         tmp_path / "resumed.log", env)
    try:
        code = cli.wait(timeout=400)
    finally:
        if cli.poll() is None:
            terminate_tree(cli.pid, grace=5)
            cli.wait(timeout=10)
    resumed_seconds = time.monotonic() - started
    assert code == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    left = _wait_until_gone(str(tmp_path), timeout=10)
    _kill_by_pid(left)
    assert not left, _describe(left)

    # Auto sigma spreads each budget over exactly the planned rounds (and the resumed run, the same
    # run id, keeps each hospital's sigma), so every record of a hospital is exhausted (less than 1%
    # of its budget left: the calibration lands within 0.01 of epsilon 3) once it has paid for
    # ROUNDS rounds. A hospital that charged the interrupted round pays for it once more: it affords
    # that many fewer rounds. Its last trained reply already says "locked" (every record exhausted),
    # so the strategy never asks it again: it is neither "refused" nor "locked" in a later round, it
    # is simply not in that round's table. Once no hospital is left, the run stops before the next
    # round.
    affordable = {name: ROUNDS - last - len(in_flight[name]) for name in hospitals}
    rounds_run = max(affordable.values())

    # Round numbering continues from the last checkpoint, in the same run (same run id).
    metrics = json.loads((resumed / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == list(range(last + 1, last + 1 + rounds_run)), affordable
    assert metrics["run_id"] == torch.load(first / "checkpoints" / f"round-{last:03d}.pt",
                                           weights_only=True)["run_id"]
    assert (resumed / "model.pt").is_file() and (resumed / "summary.md").is_file()
    stop_reason = json.loads((resumed / "result.json").read_text())["stop_reason"]
    assert stop_reason == (f"completed all {ROUNDS} rounds; every hospital is now locked (budgets spent)"
                           if last + rounds_run == ROUNDS else
                           f"stopped before round {last + rounds_run + 1}: no hospital can train (every privacy "
                           "budget is spent; all hospitals are locked)"), (stop_reason, affordable)

    report, overall, after_all = _verified(ledger)
    assert report.ok, report.problems
    assert after_all[: len(before_all)] == before_all  # every earlier event kept, none rewritten
    assert overall.locked and overall.epsilon_spent <= overall.budget_epsilon + 1e-9  # no record over budget
    after = _by_hospital(after_all, hospitals)
    assert sum(map(len, after.values())) == len(after_all), [e.hospital for e in after_all]
    for name, (records, budget) in hospitals.items():
        _, status, _ = _verified(ledger, records=records, budget=budget)
        events = after[name]
        assert events[: len(before[name])] == before[name], name  # every charge kept, none rewritten
        assert status.records == len(records) and status.epsilon_spent <= status.budget_epsilon + 1e-9, name
        # Every record of it took part in every event: its epsilon composes ALL its events, the
        # interrupted charge included, in full.
        assert status.epsilon_spent == pytest.approx(epsilon([e.event() for e in events], status.delta,
                                                             status.accountant), rel=1e-9), name
        reported = next(p for p in metrics["rounds"][-1]["privacy"] if p["hospital"] == name)
        assert reported["epsilon"] == pytest.approx(status.epsilon_spent, rel=1e-6), name
        assert reported["locked"] and status.locked and status.exhausted == len(records), (name, reported)
        statuses = [r["hospitals"][name]["status"] for r in metrics["rounds"] if name in r["hospitals"]]
        assert statuses == ["trained"] * affordable[name], (name, statuses, [(e.round, e.status) for e in events])
        new = events[len(before[name]):]
        assert [(e.round, e.status) for e in new] == [(r, "confirmed") for r in
                                                       range(last + 1, last + 1 + affordable[name])], name
    print(f"killed after {first_seconds:.0f}s with checkpoints {checkpoints}, in flight "
          f"{ {n: [(e.round, e.status) for e in v] for n, v in in_flight.items()} }; everything stopped "
          f"{cleanup_seconds:.1f}s after the kill; resumed run {resumed_seconds:.0f}s")
