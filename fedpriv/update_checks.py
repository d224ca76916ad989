"""Checks on a hospital's training reply before it may touch the global model.

A buggy or hostile hospital must not corrupt the federation: weights with NaN/Inf, the wrong keys,
shapes or dtypes, an absurd update norm, a bad `num-examples`, privacy figures that contradict
what the hospital reported before, or text the server cannot log or write as it is (a string over
:data:`MAX_REPLY_TEXT` characters, or one with a line break or another control character) are all
rejected, with the reason, and the round goes on without them. Pure functions over state dicts and
metric mappings, so they are tested without Flower.
"""

from __future__ import annotations

import math
import statistics
import unicodedata
from collections.abc import Mapping

import torch

from fedpriv.protocol import Field, Metric, Status, figures_known, says_trained

# Reported epsilons are recomputed by an accountant with a small numeric error; allow for it.
_EPSILON_TOLERANCE = 1e-6

# The longest string a reply may carry (a key or a value: the hospital's name, status, message, device,
# accountant, chain head): what the server logs and writes into summary.md and result.json stays
# bounded. An honest hospital's longest message (a ConfigError, told to the server) is ~350 characters.
MAX_REPLY_TEXT = 500
MAX_REPLY_KEYS = 64  # metrics or status fields in one reply: fedpriv's own replies hold about 20
# Line breaks, ANSI escapes and other control or format characters would let a hospital forge lines in
# the server's log (log injection) or hide text in the summary.
_CONTROL_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp"})


def weights_problem(reference: Mapping[str, torch.Tensor], update: Mapping[str, torch.Tensor]) -> str | None:
    """Why `update` cannot replace `reference` (keys, shapes, dtypes, non-finite values), or None."""
    missing, extra = sorted(set(reference) - set(update)), sorted(set(update) - set(reference))
    if missing or extra:
        return f"weights have missing keys {missing[:3]} / unexpected keys {extra[:3]}"
    for key, expected in reference.items():
        got = update[key]
        if tuple(got.shape) != tuple(expected.shape):
            return f"weights {key!r} have shape {tuple(got.shape)}, expected {tuple(expected.shape)}"
        if got.dtype != expected.dtype:
            return f"weights {key!r} have dtype {got.dtype}, expected {expected.dtype}"
        if got.is_floating_point() and not torch.isfinite(got).all():
            return f"weights {key!r} contain NaN or Inf"
    return None


def update_norm(reference: Mapping[str, torch.Tensor], update: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of the change `update - reference` over all floating-point tensors."""
    squares = [((update[k].double() - reference[k].double()) ** 2).sum() for k in reference
               if reference[k].is_floating_point()]
    return math.sqrt(float(sum(squares))) if squares else 0.0


def norm_outliers(norms: Mapping[str, float], history: list[float], max_ratio: float) -> dict[str, str]:
    """Updates whose norm exceeds `max_ratio` times the median of this round's and earlier norms.

    A median needs company: with fewer than three norms to compare with, nothing is flagged.
    """
    pool = [*history, *norms.values()]
    if len(pool) < 3:
        return {}
    median = statistics.median(pool)
    return {name: f"update norm {norm:.3g} is over {max_ratio:g}x the median {median:.3g}"
            for name, norm in norms.items() if median > 0 and norm > max_ratio * median}


def metrics_problem(metrics: Mapping[str, object], *, declared_examples: int, last_epsilon: float,
                    last_budget: float, last_delta: float) -> str | None:
    """Why a training reply's metrics are not believable, or None.

    `declared_examples` is what the hospital said it holds (its query reply); the privacy figures
    may not go backwards: cumulative epsilon never falls, a budget never rises, delta never changes.
    """
    examples = metrics.get(Metric.NUM_EXAMPLES)
    if not isinstance(examples, (int, float)) or isinstance(examples, bool) or not math.isfinite(examples):
        return f"num-examples is missing or not a number ({examples!r})"
    if examples < 0 or examples != int(examples):
        return f"num-examples {examples} is not a non-negative integer"
    if declared_examples and examples > declared_examples:
        return f"num-examples {int(examples)} exceeds the {declared_examples} records the hospital declared"
    try:
        epsilon, budget, delta = (float(metrics[k]) for k in (Metric.EPSILON, Metric.BUDGET_EPSILON, Metric.DELTA))
    except (KeyError, TypeError, ValueError):
        return "privacy figures (epsilon, budget-epsilon, delta) are missing"
    if math.isnan(epsilon) or epsilon < last_epsilon - _EPSILON_TOLERANCE:
        return f"cumulative epsilon went from {last_epsilon:.6g} down to {epsilon:.6g}"
    if budget > last_budget + _EPSILON_TOLERANCE:
        return f"budget went up from {last_budget:g} to {budget:g}"
    if last_delta and delta != last_delta:
        return f"delta changed from {last_delta:g} to {delta:g}"
    return None


def text_problem(text: str) -> str | None:
    """Why `text` from a hospital cannot be logged or written as it is (too long, a control
    character), or None. The text itself is never quoted: the problem is logged too."""
    if len(text) > MAX_REPLY_TEXT:
        return f"is {len(text)} characters long, over the limit of {MAX_REPLY_TEXT}"
    bad = next((char for char in text if unicodedata.category(char) in _CONTROL_CATEGORIES), None)
    if bad is not None:
        return f"contains the control character U+{ord(bad):04X} (a line break or other control character)"
    return None


def _key_shown(key: object) -> str:
    """A hospital's key as a problem may quote it: ASCII, without control characters, short."""
    return ascii(str(key)[:40])


def reply_text_problem(fields: Mapping[str, object] | None, metrics: Mapping[str, object] | None = None) -> str | None:
    """Why the text of a reply cannot be logged or written as it is (see :func:`text_problem`), or None:
    every key and string value of its status record (`fields`: hospital, status, message, device,
    accountant, chain head, and whatever else it holds) and every key of its `metrics`; and at most
    :data:`MAX_REPLY_KEYS` of each (every one is written to the run directory)."""
    for record, what in ((fields or {}, "status fields"), (metrics or {}, "metrics")):
        if len(record) > MAX_REPLY_KEYS:
            return f"the reply holds {len(record)} {what}, over the limit of {MAX_REPLY_KEYS}"
    for record, what in ((fields or {}, "status field"), (metrics or {}, "metric")):
        for key, value in record.items():
            problem = text_problem(str(key))
            if problem:
                return f"a {what} name {_key_shown(key)}... {problem}" if len(str(key)) > 40 \
                    else f"the {what} name {_key_shown(key)} {problem}"
            for item in value if isinstance(value, (list, tuple)) else (value,):
                problem = text_problem(item) if isinstance(item, str) else None
                if problem:
                    return f"{what} {_key_shown(key)} {problem}"
    return None


def reply_figures_problem(metrics: Mapping[str, object] | None, status: str | None, *, declared_examples: int,
                          last_epsilon: float, last_budget: float, last_delta: float,
                          fields: Mapping[str, object] | None = None) -> str | None:
    """Why a reply's metrics cannot be believed (see metrics_problem), or its text cannot be logged (see
    :func:`reply_text_problem`: its `status`, the rest of its status record `fields` when given, the
    names of its metrics), or None.

    A refusal from a hospital that could not read its own ledger carries no figures (epsilon NaN):
    there is nothing to check or to use, and that is no problem.
    """
    if metrics is None or status is None:
        return "reply lacks its metrics or status"
    problem = reply_text_problem({**(fields or {}), Field.STATUS: status}, metrics)
    if problem:
        return problem
    if status == Status.TRAINED and not says_trained(metrics):  # it says it trained, its metrics say not
        return f"status '{Status.TRAINED}' but metric '{Metric.TRAINED}' is not 1"
    if status != Status.TRAINED and not figures_known(metrics):
        return None
    return metrics_problem(metrics, declared_examples=declared_examples, last_epsilon=last_epsilon,
                           last_budget=last_budget, last_delta=last_delta)


def evaluation_reply_problem(metrics: Mapping[str, object] | None, fields: Mapping[str, object] | None) -> str | None:
    """Why a hospital's evaluation reply cannot be recorded or averaged, or None: it lacks its
    metrics or status, has more keys or text than the log and run directory can take
    (:func:`reply_text_problem`), or a metric that is not one finite number
    (a NaN or an infinity would poison the weighted mean of every hospital's figures), or a negative
    example count."""
    if metrics is None or fields is None:
        return "reply lacks its metrics or status"
    problem = reply_text_problem(fields, metrics)
    if problem:
        return problem
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"metric {_key_shown(key)} is not a finite number"
    if float(metrics.get(Metric.NUM_EXAMPLES, 0)) < 0:
        return f"metric '{Metric.NUM_EXAMPLES}' is negative"
    return None


def reply_weights_problem(status: str, reference: Mapping[str, torch.Tensor],
                          update: Mapping[str, torch.Tensor] | None) -> str | None:
    """Why a reply's weights cannot replace `reference` (see weights_problem), or None; only a
    trained reply carries weights."""
    if status != Status.TRAINED:
        return None
    if update is None:
        return "a trained reply without weights"
    return weights_problem(reference, update)
