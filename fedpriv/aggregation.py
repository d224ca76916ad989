"""The server's arithmetic on hospitals' weights and metrics: FedAvg, the server step, no Flower.

Everything here is post-processing of what hospitals sent (their DP-SGD updates), so none of it
costs privacy. Pure functions over state dicts and plain dicts, tested against hand-computed arrays.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fedpriv.config import SEQUENTIAL_STEPS
from fedpriv.protocol import Metric

# Sequential mode: "full" takes each hospital's returned weights as they are (see sequential_weight).
FULL_STEP = SEQUENTIAL_STEPS[0]


def weighted_average(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """FedAvg: the per-tensor mean of `states` weighted by `weights` (e.g. records per hospital)."""
    total = sum(weights)
    averaged = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            averaged[key] = sum(w * s[key] for w, s in zip(weights, states)) / total
        else:
            averaged[key] = first.clone()  # integer buffers (counters) are not averaged
    return averaged


def server_step(old: Mapping[str, torch.Tensor], averaged: Mapping[str, torch.Tensor],
                server_lr: float) -> dict[str, torch.Tensor]:
    """FedAvg with a server learning rate: move the global model `server_lr` times the averaged update.

    1.0 is plain FedAvg. Above 1 it takes longer steps along the averaged update, whose DP noise the
    averaging over hospitals has already reduced (post-processing: no privacy cost).
    """
    return {key: old[key] + server_lr * (value - old[key]) if value.is_floating_point() else value.clone()
            for key, value in averaged.items()}


def sequential_weight(num_examples: int, round_examples: Sequence[int], step: str = FULL_STEP) -> float:
    """How far the global model moves towards one hospital's returned weights (sequential mode).

    `num_examples` is that hospital's record count, `round_examples` those of every hospital in the
    round's order. "full": all the way (classic cyclic weight transfer). "share": the hospital's
    share of the round's records times the number of hospitals, capped at 1, so a hospital with an
    average or larger share moves the model fully and a small one proportionally less. A small
    hospital's DP-SGD update is the noisiest (its noise is calibrated to few records), and FedAvg
    would give it the same small weight.
    """
    if step not in SEQUENTIAL_STEPS:
        raise ValueError(f"sequential_step must be one of {SEQUENTIAL_STEPS}, got {step!r}")
    total = sum(round_examples)
    if step == FULL_STEP or total <= 0 or num_examples <= 0:
        return 1.0
    return min(1.0, len(round_examples) * num_examples / total)


def weighted_metrics(rows: Sequence[Mapping[str, float]]) -> dict[str, float] | None:
    """The hospitals' evaluation metrics averaged, weighted by `num-examples`; None when none has any.

    Only keys every row has are averaged. The result is marked not DP-covered: hospitals compute
    these on their private validation splits without noise.
    """
    rows = [row for row in rows if row.get(Metric.NUM_EXAMPLES, 0) > 0]
    if not rows:
        return None
    total = sum(row[Metric.NUM_EXAMPLES] for row in rows)
    keys = set.intersection(*(set(row) for row in rows)) - {Metric.NUM_EXAMPLES, Metric.DP_COVERED}
    merged = {key: sum(row[key] * row[Metric.NUM_EXAMPLES] for row in rows) / total for key in keys}
    return {**merged, Metric.NUM_EXAMPLES: total, Metric.DP_COVERED: 0.0}
