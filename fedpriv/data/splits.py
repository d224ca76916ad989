"""Stratified train/val/test splitting shared by the loaders that have no official split.

When the images carry patient ids, every split is made over patients, not images: one patient's
images all land on the same side (train, validation or test; a hospital's training or its own
validation; one simulated hospital), so no split leaks a patient across.
"""

from __future__ import annotations

import math

import numpy as np

from fedpriv.errors import ConfigError, DataError


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    """Raise :class:`ConfigError` unless both fractions are in (0, 1) and leave data for training."""
    for key, value in (("dataset.val_fraction", val_fraction), ("dataset.test_fraction", test_fraction)):
        if not 0 < value < 1:
            raise ConfigError(key, value, "must be between 0 and 1", f"use e.g. {key}=0.1")
    if val_fraction + test_fraction >= 1:
        raise ConfigError("dataset.val_fraction", val_fraction,
                          f"with dataset.test_fraction={test_fraction} nothing is left for training",
                          "lower dataset.val_fraction or dataset.test_fraction")


def stratified_split(
    labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int, *, where: str,
    groups: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of train, val and test, stratified by label and deterministic by ``seed``.

    Each split is sorted and non-empty; ``where`` names the data in the error raised when there
    are too few images per class to give every split a share. With ``groups`` (a patient id per
    image) the split is made over patients, stratified by each patient's first label, and the
    fractions count patients.
    """
    if groups is not None:
        first, inverse = group_members(groups)
        labels = np.asarray(labels)
        parts = stratified_split(labels[first], val_fraction, test_fraction, seed, where=f"{where} (by patient)")
        return tuple(np.flatnonzero(np.isin(inverse, part)) for part in parts)  # type: ignore[return-value]
    from sklearn.model_selection import (
        train_test_split,  # deferred: sklearn is slow to import
    )

    check_fractions(val_fraction, test_fraction)
    labels = np.asarray(labels)
    everything = np.arange(len(labels))
    # Counts, not fractions, go to sklearn: a fraction of the remainder (val / (1 - test)) picks up
    # rounding error and can take one image more than asked. Rounding up keeps small splits non-empty.
    n_test, n_val = (math.ceil(f * len(labels) - 1e-9) for f in (test_fraction, val_fraction))
    try:
        if n_test + n_val >= len(labels):
            raise ValueError("no images left for training")
        rest, test = train_test_split(everything, test_size=n_test, stratify=labels, random_state=seed)
        train, val = train_test_split(rest, test_size=n_val, stratify=labels[rest], random_state=seed)
    except ValueError as exc:
        raise DataError(_too_small(labels, val_fraction, test_fraction, where)) from exc
    splits = tuple(np.sort(part) for part in (train, val, test))
    if any(len(part) == 0 for part in splits):
        raise DataError(_too_small(labels, val_fraction, test_fraction, where))
    return splits  # type: ignore[return-value]


def _too_small(labels: np.ndarray, val_fraction: float, test_fraction: float, where: str) -> str:
    classes, counts = np.unique(labels, return_counts=True)
    per_class = ", ".join(f"class {c}: {n}" for c, n in zip(classes.tolist(), counts.tolist()))
    return (
        f"{where} is too small to split into train/val/test stratified by class ({per_class}; "
        f"val_fraction={val_fraction}, test_fraction={test_fraction}). Add images so every class has "
        f"some in each split, or raise dataset.val_fraction/dataset.test_fraction"
    )


def group_members(groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per distinct group (sorted): the index of its first member; and per item, the index of its group."""
    _, first, inverse = np.unique(np.asarray(groups), return_index=True, return_inverse=True)
    return first, inverse.reshape(-1)


def hold_out(part: np.ndarray, fraction: float, rng: np.random.Generator,
             groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Split the indices ``part`` into (kept, held out): about ``fraction`` of them held out, at random.

    Without ``groups`` it takes ``int(fraction * len(part))`` indices (at most all but one). With
    ``groups`` (a patient id per index of ``part``) whole patients are held out, in random order, as
    long as the images held out stay within that count; at least one patient is kept.
    """
    part = np.asarray(part)
    target = min(int(fraction * len(part)), max(len(part) - 1, 0))
    if groups is None:
        shuffled = rng.permutation(part)
        return np.sort(shuffled[target:]), np.sort(shuffled[:target])
    _, inverse = group_members(groups)
    order = rng.permutation(inverse.max() + 1 if len(inverse) else 0)
    sizes = np.bincount(inverse, minlength=len(order))[order]
    count = int(np.searchsorted(np.cumsum(sizes), target, side="right"))
    held = np.isin(inverse, order[:min(count, len(order) - 1)])
    return np.sort(part[~held]), np.sort(part[held])
