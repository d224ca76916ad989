"""What the server knows about each hospital and each round: taken from their replies, no Flower.

The hospital is the authority on its own figures; the server keeps the last ones it was told, and
its witness of each hospital's ledger chain. The strategy fills these in; the run directory
(fedpriv.outputs) and the reports read them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from fedpriv.protocol import Status


@dataclass
class HospitalState:
    """What the server knows about one hospital (from its replies; the hospital is the authority)."""

    node_id: int
    name: str  # as registered with its key (deployment), or its own (simulation): see strategy.hospital_names
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
    max_epsilon_per_round: float = math.inf  # its own caps (inf: none)
    max_epsilon_per_run: float = math.inf
    # The head of its ledger's chain as last reported: a witness. A later reply with a shorter
    # chain, or another head at the same length, means its ledger was rolled back or replaced.
    chain_length: int = 0
    chain_head: str = ""
    rolled_back: str | None = None  # why it was excluded from the run


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
