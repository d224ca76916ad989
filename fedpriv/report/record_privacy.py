"""Per-record epsilon of each hospital, for the run report: from its ledger, or as it reported it.

Simulated hospitals share one ledger per data source on the server's machine, so the report reads
it (:func:`~fedpriv.privacy.ledger.read_ledger`: no entry, witness or key is written) and asks it
for each hospital's training records. Naming those records needs the data (record ids are content
ids). A deployed hospital keeps its ledger on its own machine; then, or when the ledger, its key or
the data cannot be read, the report shows what the hospitals reported in their last replies
(largest and median epsilon, exhausted records) and says why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedpriv import data
from fedpriv.config import FedprivConfig
from fedpriv.data import MedicalImageDataset
from fedpriv.errors import FedprivError
from fedpriv.experiment import Experiment, partition_experiment
from fedpriv.privacy.ledger import read_ledger
from fedpriv.rundir import number


@dataclass(frozen=True)
class RecordSpread:
    """One hospital's per-record epsilon: the whole distribution (``epsilon``) or the reported summary."""

    hospital: str
    budget: float
    records: int | None
    exhausted: int | None
    minimum: float
    median: float
    maximum: float
    epsilon: np.ndarray | None = None  # every record's epsilon (from the ledger), else None
    reported_round: int | None = None  # the round of the reply the figures come from


@dataclass(frozen=True)
class LedgerSpreads:
    """Per-record epsilon from the simulated ledger, where it is and how many later charges it holds."""

    path: Path
    spreads: list[RecordSpread]
    later_charges: int  # charges of other runs after this run's last one


def ledger_spreads(cfg: FedprivConfig, run_dir: Path, run_id: str,
                   dataset: MedicalImageDataset | None) -> LedgerSpreads | str:
    """Each simulated hospital's per-record epsilon, read from the run's ledger; or why it cannot be."""
    from fedpriv.site import simulation_ledger_key, simulation_ledger_path  # deferred: loads Opacus (~2 s), for reports

    try:
        path = simulation_ledger_path(cfg, run_dir)
    except FedprivError as exc:
        return f"the simulated hospitals' ledger cannot be located ({_one_line(exc)})"
    if not path.is_file():
        return (f"the server holds no ledger for this run (none at {path}): the hospitals keep their ledgers "
                "on their own machines, as deployed hospitals do")
    try:
        with read_ledger(path, key_path=simulation_ledger_key(cfg, path)) as ledger:
            events = ledger.events()  # replays and authenticates the chain: a missing key or tampering fails here
            ours = [e.id for e in events if e.run_id == run_id]
            if not ours:
                return (f"the ledger {path} holds no use of data by this run ({run_id}): its hospitals kept their "
                        "ledgers elsewhere (a deployment), or no round trained")
            experiment = _experiment(cfg, dataset)
            if isinstance(experiment, str):
                return experiment
            spreads = []
            for index, hospital in enumerate(experiment.hospitals):
                # The hospital's own budget, as it asks the ledger (simulated hospitals share one).
                budgets = ledger.budgets(experiment.hospital_data(index).unit_ids(ledger.unit),
                                         budget=hospital.epsilon)
                status = budgets.status()
                spreads.append(RecordSpread(hospital.name, budgets.budget_epsilon, status.records, status.exhausted,
                                            status.epsilon_min, status.epsilon_median, status.epsilon_spent,
                                            budgets.epsilon))
    except (FedprivError, OSError, ValueError, RuntimeError) as exc:
        return f"the ledger {path} cannot be read ({_one_line(exc)})"
    later = sum(1 for e in events if e.id > max(ours) and e.run_id != run_id)
    return LedgerSpreads(path, spreads, later)


def _experiment(cfg: FedprivConfig, dataset: MedicalImageDataset | None) -> Experiment | str:
    """The hospitals' shares of the data, or why the data cannot be had."""
    if dataset is None:
        try:
            dataset = data.load_dataset(cfg.dataset, cfg.seed)  # looked up at call time: tests stand in for it
        except (FedprivError, OSError, ValueError) as exc:
            return (f"naming each hospital's records needs the data (record ids are content ids), and it cannot "
                    f"be loaded ({_one_line(exc)})")
    return partition_experiment(cfg, dataset)


def reported_spreads(rounds: list[dict[str, Any]], final: dict[str, dict[str, Any]]) -> list[RecordSpread]:
    """What each hospital last reported about its records: largest and median epsilon, exhausted records.

    A hospital reports no smallest epsilon. Without a believable reply in any round, only its final
    state (result.json: largest epsilon, training records) is known.
    """
    spreads = []
    for name, state in final.items():
        reply, round_number = next(((r["hospitals"][name], r["round"]) for r in reversed(rounds)
                                    if "epsilon-median" in r["hospitals"].get(name, {})), ({}, None))
        records, exhausted = reply.get("records", state.get("records")), reply.get("exhausted-records")
        spreads.append(RecordSpread(
            name, number(reply.get("budget-epsilon", state.get("budget_epsilon"))),
            None if records is None else int(records), None if exhausted is None else int(exhausted),
            math.nan, number(reply.get("epsilon-median")), number(reply.get("epsilon", state.get("epsilon"))),
            reported_round=round_number))
    return spreads


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
