"""What the server knows about each hospital and each round: taken from their replies, no Flower.

The hospital is the authority on its own figures; the server keeps the last ones it was told, and
its witness of each hospital's ledger chain. The strategy feeds replies in (as plain mappings); the
run directory (fedpriv.outputs) and the reports read the states and round records.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedpriv.protocol import Field, Metric, Status, figures_known, privacy_metrics
from fedpriv.rundir import format_epsilon

log = logging.getLogger("fedpriv")

ROLLED_BACK = "its privacy ledger went backwards"


@dataclass
class HospitalState:
    """What the server knows about one hospital (from its replies; the hospital is the authority)."""

    node_id: int
    name: str  # as registered with its key (deployment), or its own (simulation): see hospital_names
    claimed_name: str = ""  # what the node calls itself (its node config's name)
    num_examples: int = 0
    epsilon: float = 0.0
    delta: float = 0.0
    budget_epsilon: float = math.inf
    locked: bool = False
    failures: int = 0
    # The round from which this hospital may have spent budget it has not reported (it crashed or
    # went silent after being asked to train, and no later report came): its epsilon is then a
    # lower bound, and its own ledger holds the true figure. None when the figures are current.
    unreported_since: int | None = None
    # What the hospital says it did, from its replies (never from the run config).
    accountant: str = ""
    noise_seeded: bool = False
    unit: str = ""  # what one of its records is, "image" or "patient" ("" until it replied)
    device: str = ""  # the torch device it last trained on ("" until it trained)
    max_epsilon_per_round: float = math.inf  # its own caps (inf: none)
    max_epsilon_per_run: float = math.inf
    # The head of its ledger's chain as last reported: a witness. A later reply with a shorter
    # chain, or another head at the same length, means its ledger was rolled back or replaced.
    chain_length: int = 0
    chain_head: str = ""
    rolled_back: str | None = None  # why it was excluded from the run

    def update(self, metrics: Mapping[str, Any], status: str, fields: Mapping[str, Any] | None = None) -> None:
        """Take the figures of a believable reply (its metrics and its ``status`` record's `fields`)."""
        self.unreported_since = None
        if Metric.CHAIN_LENGTH in metrics:
            self.chain_length = int(metrics[Metric.CHAIN_LENGTH])
            self.noise_seeded = bool(metrics.get(Metric.NOISE_SEEDED, 0))
            self.unit = "patient" if metrics.get(Metric.PER_PATIENT, 0) else "image"
            self.max_epsilon_per_round = float(metrics.get(Metric.MAX_EPSILON_PER_ROUND, math.inf))
            self.max_epsilon_per_run = float(metrics.get(Metric.MAX_EPSILON_PER_RUN, math.inf))
        if fields is not None:
            self.chain_head = str(fields.get(Field.CHAIN_HEAD, self.chain_head))
            self.accountant = str(fields.get(Field.ACCOUNTANT, "")) or self.accountant
            self.device = str(fields.get(Field.DEVICE, "")) or self.device
        self.epsilon = float(metrics[Metric.EPSILON])
        self.delta = float(metrics[Metric.DELTA])
        self.budget_epsilon = float(metrics[Metric.BUDGET_EPSILON])
        self.locked = bool(metrics[Metric.LOCKED]) or status == Status.LOCKED
        if metrics.get(Metric.NUM_EXAMPLES):
            self.num_examples = int(metrics[Metric.NUM_EXAMPLES])

    def chain_problem(self, metrics: Mapping[str, Any], fields: Mapping[str, Any]) -> str | None:
        """Why a reply's ledger chain contradicts this hospital's last one (shorter, or another head
        at the same length), or None."""
        if not figures_known(metrics) or Metric.CHAIN_LENGTH not in metrics:
            return None
        length, head = int(metrics[Metric.CHAIN_LENGTH]), str(fields.get(Field.CHAIN_HEAD, ""))
        if length < self.chain_length or (length == self.chain_length and head != self.chain_head):
            return (f"{ROLLED_BACK}: it reported {length} ledger entries after {self.chain_length} earlier in this "
                    "run (or another head at the same length): its ledger was rolled back, replaced or deleted; "
                    "excluded from the run")
        return None


@dataclass
class RoundRecord:
    """Everything that happened in one round, for logs, metrics files and checkpoints."""

    round: int
    hospitals: dict[str, dict] = field(default_factory=dict)  # name -> status, message, metrics
    order: list[str] = field(default_factory=list)  # who was asked to train, in order
    server_metrics: dict[str, float] = field(default_factory=dict)
    client_evaluation: dict[str, dict] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def trained(self) -> list[str]:
        return [name for name, h in self.hospitals.items() if h.get("status") == Status.TRAINED]

    def status_of(self, name: str) -> str | None:
        return self.hospitals.get(name, {}).get("status")

    @property
    def nobody_could_train(self) -> bool:
        """Every hospital asked refused the request (nothing was charged) or is locked."""
        return (not self.trained and bool(self.hospitals)
                and all(row.get("status") in (Status.LOCKED, Status.REFUSED) for row in self.hospitals.values()))


class Roster:
    """The hospitals of a run, as the server knows them, and the bookkeeping of their replies."""

    def __init__(self) -> None:
        self.hospitals: list[HospitalState] = []
        self.excluded: dict[str, str] = {}  # hospitals kept out of the run -> why

    def admit(self, hospitals: list[HospitalState]) -> None:
        self.hospitals = sorted(hospitals, key=lambda h: h.name)

    def exclude(self, name: str, reason: str) -> None:
        self.excluded[name] = reason

    def active(self) -> list[HospitalState]:
        """Those that can still train: not locked, and not excluded for a rolled-back ledger."""
        return [h for h in self.hospitals if not h.locked and h.rolled_back is None]

    def training_order(self, server_round: int, *, shuffle: bool = False, seed: int = 0) -> list[HospitalState]:
        """The active hospitals, shuffled by `seed` and the round when asked (sequential mode)."""
        order = self.active()
        if shuffle:
            random.Random(seed * 100_003 + server_round).shuffle(order)
        return order

    def by_node(self, node_id: int) -> HospitalState | None:
        return next((h for h in self.hospitals if h.node_id == node_id), None)

    def by_name(self, name: str) -> HospitalState:
        return next(h for h in self.hospitals if h.name == name)

    def crashed(self, record: RoundRecord) -> list[HospitalState]:
        """Those whose reply this round was an error: they may have charged without saying so."""
        return [h for h in self.hospitals if record.status_of(h.name) == Status.FAILED]

    def note(self, record: RoundRecord, hospital: HospitalState, fields: Mapping[str, Any],
             metrics: Mapping[str, Any]) -> None:
        """Record an accepted reply in the round's record."""
        record.hospitals[hospital.name] = {"status": str(fields[Field.STATUS]), "message": str(fields[Field.MESSAGE]),
                                           **dict(metrics)}

    def reject(self, record: RoundRecord, hospital: HospitalState, status: Status, reason: str, *,
               figures_lost: bool = False) -> None:
        """Record a failed, silent or rejected reply; the round goes on without it."""
        hospital.failures += 1
        if (figures_lost or status in (Status.FAILED, Status.TIMEOUT)) and hospital.unreported_since is None:
            hospital.unreported_since = record.round  # it may have charged without a believable report
        if figures_lost and reason.startswith(ROLLED_BACK):
            hospital.rolled_back = reason
            self.exclude(hospital.name, reason)
        record.hospitals[hospital.name] = {"status": str(status), "message": reason}
        log.warning("round %d: hospital %s %s: %s (the round goes on without it)", record.round, hospital.name,
                    status, reason)

    def privacy_metrics(self) -> dict[str, float]:
        """The largest epsilon and each hospital's (never an average), and how many are locked."""
        return privacy_metrics({h.name: h.epsilon for h in self.hospitals}, sum(h.locked for h in self.hospitals))

    def describe(self) -> str:
        return ", ".join(f"{h.name} ({'LOCKED' if h.locked else 'open'}, epsilon "
                         f"{format_epsilon(h.epsilon, h.budget_epsilon)}/{h.budget_epsilon:g}{_per(h)})"
                         for h in self.hospitals)

    def spent(self) -> str:
        return ", ".join(f"{h.name} {format_epsilon(h.epsilon, h.budget_epsilon)}/{h.budget_epsilon:g}{_per(h)}"
                         f"{' LOCKED' if h.locked else ''}" for h in self.hospitals)


def _per(hospital: HospitalState) -> str:
    """" per image" or " per patient", as the hospital reported its unit; "" before it replied."""
    return f" per {hospital.unit}" if hospital.unit else ""


def hospital_names(claimed: dict[int, str], registered: dict[int, str]) -> dict[int, str]:
    """The name each node is reported under: node id -> name, every name distinct.

    Where any node has a registered name, every node is named by its registration (the key it
    authenticated with), whatever it calls itself: a node registered without a name is ``node-<id>``.
    Only where none has one (simulation) does a node's own name count. Two nodes left with one name
    (two keys registered under it, or two simulated nodes calling themselves alike) are both kept, as
    ``NAME#<node id>``: the run goes on, and neither can take the other's row.
    """
    names: dict[int, str] = {}
    for node, claim in claimed.items():
        if registered:
            names[node] = registered.get(node) or f"node-{node}"
            if node not in registered:
                log.warning("node %s has no registered name (register its key with `flwr supernode register KEY "
                            "<connection> --name NAME`); it is reported as %s", node, names[node])
            elif claim != names[node]:
                log.warning("node %s, registered as %s, calls itself %r in its node config; it is reported as %s",
                            node, names[node], claim, names[node])
        else:
            names[node] = claim
    taken: dict[str, list[int]] = {}
    for node, name in names.items():
        taken.setdefault(name, []).append(node)
    for name, nodes in taken.items():
        if len(nodes) > 1:
            log.warning("%d nodes (%s) go by the hospital name %s; each is reported as %s#<node id> (give each "
                        "hospital its own name)", len(nodes), ", ".join(map(str, nodes)), name, name)
            for node in nodes:
                names[node] = f"{name}#{node}"
    return names
