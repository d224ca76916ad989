"""Fault injection for reliability tests and benchmarks: off by default, simulated hospitals only.

`faults.train_failure_rate` crashes a hospital's round right after its ledger charge (the worst
moment: budget spent, nothing returned); `faults.corrupt_update_rate` poisons a trained update
with NaN (a buggy or hostile site). Draws are deterministic per (seed, hospital, round), so tests
and benchmarks know exactly which rounds were hit. A deployed hospital (no partition id in its
node config) never injects anything, whatever the run config says.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping
from typing import Any

import torch

from fedpriv.config import FedprivConfig


class InjectedFault(RuntimeError):
    """A crash injected by `faults.train_failure_rate` (reliability tests only)."""


def injected_fault(node_config: Mapping[str, Any], cfg: FedprivConfig, server_round: int) -> Callable[[], None] | None:
    """For simulated hospitals only: maybe crash right after the charge, as a killed node would."""
    rate = cfg.faults.train_failure_rate
    if not rate or "partition-id" not in node_config:
        return None
    hospital = int(node_config["partition-id"])
    if not fault_drawn(cfg.seed, hospital, server_round, rate):
        return None

    def crash() -> None:
        raise InjectedFault(f"injected failure: hospital {hospital + 1}, round {server_round}, after its charge")

    return crash


def injected_corruption(node_config: Mapping[str, Any], cfg: FedprivConfig, server_round: int,
                        state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """For simulated hospitals only: maybe poison the weights with NaN, as a buggy site would."""
    rate = cfg.faults.corrupt_update_rate
    if not rate or "partition-id" not in node_config:
        return state
    hospital = int(node_config["partition-id"])
    if not fault_drawn(cfg.seed, hospital, server_round, rate, kind="corrupt"):
        return state
    poisoned = dict(state)
    name = next(key for key, value in state.items() if value.is_floating_point())
    poisoned[name] = torch.full_like(state[name], math.nan)
    return poisoned


def fault_drawn(seed: int, hospital: int, server_round: int, rate: float, kind: str = "fault") -> bool:
    """The same draw in every process, so tests and benchmarks know which rounds were made to fail."""
    return bool(random.Random(f"{kind}-{seed}-{hospital}-{server_round}").random() < rate)
