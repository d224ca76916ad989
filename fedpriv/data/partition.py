"""Dividing a training split among simulated hospitals, and summarising the result.

Three schemes model the heterogeneity seen between real hospitals:

* ``iid``: every hospital gets a random, equally sized share (or sized by explicit ``shares``);
* ``dirichlet``: label skew: each class is spread over hospitals by proportions drawn from
  Dirichlet(alpha), so with small alpha a hospital sees mostly a few classes;
* ``quantity``: size skew: hospital sizes drawn from Dirichlet(alpha) (or given as ``shares``),
  with labels spread IID.

Partitions are disjoint, cover every record exactly once, are sorted, and depend only on the seed.
Given patient ids (``groups``), the schemes divide patients, not images: every image of a patient
goes to the same hospital, as in real life.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np

from fedpriv.data.splits import group_members
from fedpriv.errors import ConfigError

logger = logging.getLogger(__name__)

SCHEMES = ("iid", "dirichlet", "quantity")
# Dirichlet draws that leave a hospital too small are redrawn; past this many tries the plan is
# taken to be impossible (or so unlikely that the user should change it) rather than looping forever.
MAX_DRAWS = 100

T = TypeVar("T")


def partition_indices(
    labels: np.ndarray,
    num_hospitals: int,
    scheme: str,
    *,
    alpha: float = 0.5,
    seed: int = 0,
    shares: list[float] | None = None,
    min_size: int = 1,
    groups: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Indices into ``labels`` for each hospital, by ``scheme`` ("iid", "dirichlet" or "quantity").

    ``shares`` (one positive weight per hospital, normalised here) fixes the sizes for "iid" and
    "quantity" and is ignored by "dirichlet". Every hospital gets at least ``min_size`` records,
    else :class:`ConfigError` names the config key to change. With ``groups`` (a patient id per
    record) the scheme divides patients (labelled by their first image; sizes and ``min_size`` count
    patients), and each hospital receives all the images of its patients.
    """
    labels = np.asarray(labels).reshape(-1)
    if groups is not None:
        first, inverse = group_members(groups)
        parts = _partition(labels[first], num_hospitals, scheme, alpha, seed, shares, min_size, unit="patients")
        return [np.flatnonzero(np.isin(inverse, part)).astype(np.int64) for part in parts]
    return _partition(labels, num_hospitals, scheme, alpha, seed, shares, min_size, unit="records")


def _partition(labels: np.ndarray, num_hospitals: int, scheme: str, alpha: float, seed: int,
               shares: Sequence[float] | None, min_size: int, unit: str) -> list[np.ndarray]:
    """Partition the units `labels` describes (records, or patients by their first image); `unit` names
    them in errors, so that a user who partitions patients is told about patients."""
    _check_plan(len(labels), num_hospitals, scheme, alpha, shares, min_size, unit)
    rng = np.random.default_rng(seed)
    if scheme == "dirichlet":
        if shares is not None:
            logger.warning("federation: hospital shares are ignored by the dirichlet partition")
        parts = _dirichlet(labels, num_hospitals, alpha, rng, min_size, unit)
    else:
        parts = _by_size(len(labels), num_hospitals, scheme, alpha, rng, shares, min_size, unit)
    return [np.sort(part).astype(np.int64) for part in parts]


def _check_plan(
    records: int, num_hospitals: int, scheme: str, alpha: float, shares: Sequence[float] | None, min_size: int,
    unit: str,
) -> None:
    if scheme not in SCHEMES:
        raise ConfigError("federation.partition", scheme, f"unknown scheme; known: {', '.join(SCHEMES)}",
                          "set federation.partition to one of them")
    if num_hospitals < 1:
        raise ConfigError("federation.num_hospitals", num_hospitals, "a federation needs at least 1 hospital",
                          "set federation.num_hospitals=3 (or more)")
    if num_hospitals * min_size > records:
        raise ConfigError("federation.num_hospitals", num_hospitals,
                          f"the training split has {records} {unit}, too few for {num_hospitals} "
                          f"hospitals with at least {min_size} each", "use fewer hospitals or a larger dataset")
    if scheme != "iid" and not (math.isfinite(alpha) and alpha > 0):
        raise ConfigError("federation.alpha", alpha, "must be a positive number",
                          "use e.g. federation.alpha=0.5 (smaller is more skewed)")
    if shares is not None and (
        len(shares) != num_hospitals or not all(math.isfinite(s) and s > 0 for s in shares)
    ):
        raise ConfigError("federation.hospitals.share", list(shares),
                          f"need one positive share per hospital ({num_hospitals})",
                          "give each hospital a share, e.g. 0.5, 0.3, 0.2")


def _sizes(proportions: np.ndarray, total: int) -> np.ndarray:
    """Integer sizes summing to ``total`` in the given proportions (largest-remainder rounding)."""
    proportions = np.asarray(proportions, dtype=np.float64)
    ideal = proportions / proportions.sum() * total
    sizes = np.floor(ideal).astype(np.int64)
    # Stable sort: equal remainders go to the lower index, so the result is deterministic.
    order = np.argsort(-(ideal - sizes), kind="stable")
    sizes[order[: total - int(sizes.sum())]] += 1
    return sizes


def _split(indices: np.ndarray, sizes: np.ndarray) -> list[np.ndarray]:
    return np.split(indices, np.cumsum(sizes)[:-1])


def _by_size(
    records: int, num_hospitals: int, scheme: str, alpha: float, rng: np.random.Generator,
    shares: Sequence[float] | None, min_size: int, unit: str,
) -> list[np.ndarray]:
    """"iid" and "quantity": pick hospital sizes, then deal a random permutation of the records."""
    if shares is not None or scheme == "iid":
        weights = np.asarray(shares if shares is not None else np.ones(num_hospitals), dtype=np.float64)
        sizes = _sizes(weights, records)
        if sizes.min() < min_size:  # fixed shares: redrawing cannot help
            small = int(sizes.argmin())
            raise ConfigError("federation.hospitals.share", list(weights),
                              f"hospital {small} would receive {sizes[small]} of {records} {unit} "
                              f"(needs at least {min_size})", "raise that hospital's share")
    else:
        sizes = _draw(lambda: _sizes(_dirichlet_draw(rng, alpha, num_hospitals), records), min_size, alpha, unit)
    return _split(rng.permutation(records), sizes)


def _dirichlet(
    labels: np.ndarray, num_hospitals: int, alpha: float, rng: np.random.Generator, min_size: int, unit: str
) -> list[np.ndarray]:
    """Label skew: each class's records are divided by their own Dirichlet(alpha) proportions."""
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]

    def attempt() -> list[list[np.ndarray]]:
        per_class = []
        for members in by_class:
            proportions = _dirichlet_draw(rng, alpha, num_hospitals)
            per_class.append(_split(rng.permutation(members), _sizes(proportions, len(members))))
        return per_class

    def hospital_sizes(per_class: list[list[np.ndarray]]) -> np.ndarray:
        return np.array([sum(len(chunks[h]) for chunks in per_class) for h in range(num_hospitals)])

    per_class = _draw(attempt, min_size, alpha, unit, size_of=hospital_sizes)
    return [np.concatenate([chunks[h] for chunks in per_class]) for h in range(num_hospitals)]


def _dirichlet_draw(rng: np.random.Generator, alpha: float, count: int) -> np.ndarray:
    proportions = rng.dirichlet(np.full(count, alpha))
    # With very small alpha the draw can underflow to all zeros (or NaN); that is a one-hot in the limit.
    if not np.all(np.isfinite(proportions)) or proportions.sum() <= 0:
        proportions = np.zeros(count)
        proportions[rng.integers(count)] = 1.0
    return proportions


def _draw(
    attempt: Callable[[], T], min_size: int, alpha: float, unit: str,
    size_of: Callable[[T], np.ndarray] | None = None,
) -> T:
    """Call ``attempt`` until every hospital has ``min_size`` records, at most MAX_DRAWS times.

    ``size_of`` maps an attempt's result to the hospital sizes (default: the result is the sizes).
    Redraws continue the same generator, so the outcome is still fixed by the seed.
    """
    size_of = size_of or (lambda result: result)  # type: ignore[assignment,return-value]
    for _ in range(MAX_DRAWS):
        result = attempt()
        sizes = size_of(result)
        if sizes.min() >= min_size:
            return result
    small = int(sizes.argmin())
    raise ConfigError("federation.alpha", alpha,
                      f"hospital {small} received {sizes[small]} {unit} (needs at least {min_size}) "
                      f"in each of {MAX_DRAWS} random draws",
                      "raise federation.alpha or use fewer hospitals (or federation.partition=iid)")


def partition_summary(
    labels: np.ndarray,
    partitions: list[np.ndarray],
    class_names: list[str],
    hospital_names: list[str] | None = None,
) -> list[dict[str, Any]]:
    """One row per hospital: name, record count, count per class and per-class share in percent.

    Row keys: ``"hospital"``, ``"records"``, then ``<class>`` (int) and ``"<class> %"`` (float,
    0-100, one decimal) for every class in ``class_names`` order.
    """
    labels = np.asarray(labels).reshape(-1)
    names = hospital_names or [f"hospital {i}" for i in range(len(partitions))]
    if len(names) != len(partitions):
        raise ValueError(f"{len(names)} hospital names for {len(partitions)} partitions")
    rows = []
    for name, part in zip(names, partitions):
        counts = np.bincount(labels[np.asarray(part, dtype=np.int64)], minlength=len(class_names))
        if len(counts) > len(class_names):
            raise ValueError(f"labels go up to {len(counts) - 1} but only {len(class_names)} class names given")
        row: dict[str, Any] = {"hospital": name, "records": int(len(part))}
        row |= {cls: int(n) for cls, n in zip(class_names, counts)}
        row |= {f"{cls} %": round(100.0 * int(n) / max(len(part), 1), 1) for cls, n in zip(class_names, counts)}
        rows.append(row)
    return rows


def format_partition_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table whose columns are padded, so it also reads well in a terminal."""
    if not rows:
        return "(no hospitals)"
    columns = list(dict.fromkeys(key for row in rows for key in row))
    cells = [[_cell(row.get(col, "")) for col in columns] for row in rows]
    numeric = [all(isinstance(row.get(col), (int, float)) for row in rows) for col in columns]
    widths = [max(len(col), 3, *(len(line[i]) for line in cells)) for i, col in enumerate(columns)]

    def line(values: list[str]) -> str:
        padded = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "| " + " | ".join(padded) + " |"

    # Markdown alignment row: numbers right-aligned, text left-aligned, matching the padding.
    rule = "| " + " | ".join("-" * (w - 1) + ":" if num else "-" * w for w, num in zip(widths, numeric)) + " |"
    return "\n".join([line(columns), rule, *(line(values) for values in cells)])


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)
