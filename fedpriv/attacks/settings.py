"""Settings of the privacy audit (`fedpriv-audit`): which attacks run, and how hard they try."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class AuditConfig:
    """The `audit` section of the experiment config."""

    epsilons: list[float] = field(default_factory=lambda: [1.0, 8.0])  # DP models attacked besides non-private
    inversion_batch_sizes: list[int] = field(default_factory=lambda: [1, 4])
    inversion_iterations: int = 300
    shadow_models: int = 4
    target_records: int = 500  # records in the audited model's training set (members)
