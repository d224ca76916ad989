"""Tests of partitioning a training split among hospitals and of the partition summary table."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedpriv.data import format_partition_table, partition_indices, partition_summary
from fedpriv.errors import ConfigError

SCHEMES = ("iid", "dirichlet", "quantity")


def balanced_labels(records: int, classes: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.arange(records) % classes)


def assert_exact_cover(parts: list[np.ndarray], records: int) -> None:
    joined = np.concatenate(parts)
    assert len(joined) == records, "partitions overlap or miss records"
    assert np.array_equal(np.sort(joined), np.arange(records))
    for part in parts:
        assert part.dtype.kind == "i" and np.all(np.diff(part) > 0), "each partition is sorted, no repeats"


def label_skew(labels: np.ndarray, parts: list[np.ndarray], classes: int) -> float:
    """Mean total-variation distance of each hospital's class distribution from the global one."""
    overall = np.bincount(labels, minlength=classes) / len(labels)
    distances = [0.5 * np.abs(np.bincount(labels[p], minlength=classes) / len(p) - overall).sum() for p in parts]
    return float(np.mean(distances))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    records=st.integers(10, 400),
    classes=st.integers(1, 5),
    num_hospitals=st.integers(1, 8),
    scheme=st.sampled_from(SCHEMES),
    alpha=st.floats(0.5, 50),
    seed=st.integers(0, 2**32 - 1),
)
def test_partitions_are_disjoint_complete_sorted_and_deterministic(
    records: int, classes: int, num_hospitals: int, scheme: str, alpha: float, seed: int
) -> None:
    labels = balanced_labels(records, classes, seed % 7)
    try:
        parts = partition_indices(labels, num_hospitals, scheme, alpha=alpha, seed=seed)
    except ConfigError as error:
        # Only a skewed draw may fail (a hospital left empty in every redraw), and only with the alpha key.
        assert scheme != "iid" and error.key == "federation.alpha"
        assert records < 20 * num_hospitals, "failed on data large enough to serve every hospital"
        return
    assert len(parts) == num_hospitals
    assert_exact_cover(parts, records)
    assert all(len(p) >= 1 for p in parts)
    again = partition_indices(labels, num_hospitals, scheme, alpha=alpha, seed=seed)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("num_hospitals", [2, 3, 7])
def test_another_seed_gives_another_partition(scheme: str, num_hospitals: int) -> None:
    labels = balanced_labels(300, 3)
    first = partition_indices(labels, num_hospitals, scheme, seed=0)
    second = partition_indices(labels, num_hospitals, scheme, seed=1)
    assert_exact_cover(first, 300)
    assert_exact_cover(second, 300)
    assert any(not np.array_equal(a, b) for a, b in zip(first, second))


def test_iid_sizes_are_near_equal_and_labels_unskewed() -> None:
    labels = balanced_labels(1001, 4)
    parts = partition_indices(labels, 5, "iid", seed=3)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 1001
    assert label_skew(labels, parts, 4) < 0.08


def test_dirichlet_small_alpha_skews_labels_more_than_iid() -> None:
    labels = balanced_labels(2000, 4)
    iid = label_skew(labels, partition_indices(labels, 5, "iid", seed=0), 4)
    skewed = label_skew(labels, partition_indices(labels, 5, "dirichlet", alpha=0.1, seed=0), 4)
    mild = label_skew(labels, partition_indices(labels, 5, "dirichlet", alpha=100.0, seed=0), 4)
    assert iid < 0.05
    assert skewed > 0.3
    assert mild < skewed, "larger alpha must be closer to IID"


def test_quantity_gives_unequal_sizes_with_iid_labels() -> None:
    labels = balanced_labels(3000, 3)
    parts = partition_indices(labels, 5, "quantity", alpha=0.5, seed=2)
    sizes = np.array([len(p) for p in parts])
    assert sizes.max() > 2 * sizes.min()
    big = [p for p in parts if len(p) >= 200]
    assert big and label_skew(labels, big, 3) < 0.06


def test_shares_fix_sizes_for_iid_and_quantity() -> None:
    labels = balanced_labels(100, 2)
    for scheme in ("iid", "quantity"):
        parts = partition_indices(labels, 3, scheme, shares=[5.0, 3.0, 2.0], seed=0)
        assert [len(p) for p in parts] == [50, 30, 20]
    odd = partition_indices(balanced_labels(10, 2), 3, "iid", shares=[1, 1, 1], seed=0)
    assert sorted(len(p) for p in odd) == [3, 3, 4]


def test_min_size_is_respected_by_redrawing() -> None:
    labels = balanced_labels(200, 2)
    parts = partition_indices(labels, 4, "quantity", alpha=1.0, seed=0, min_size=15)
    assert min(len(p) for p in parts) >= 15
    assert_exact_cover(parts, 200)


def test_more_hospitals_than_records_names_num_hospitals() -> None:
    for scheme in SCHEMES:
        with pytest.raises(ConfigError) as caught:
            partition_indices(np.array([0, 1, 0]), 4, scheme)
        assert caught.value.key == "federation.num_hospitals" and caught.value.value == 4


def test_impossible_dirichlet_names_alpha_and_the_empty_hospital() -> None:
    # Two records per class and a tiny alpha: each class lands on one hospital, so one of three stays empty.
    with pytest.raises(ConfigError) as caught:
        partition_indices(np.array([0, 0, 1, 1]), 3, "dirichlet", alpha=0.001, seed=0)
    assert caught.value.key == "federation.alpha"
    assert "hospital" in caught.value.problem and "raise federation.alpha" in str(caught.value)


def test_impossible_quantity_with_min_size_names_alpha() -> None:
    with pytest.raises(ConfigError) as caught:
        partition_indices(balanced_labels(12, 2), 4, "quantity", alpha=0.01, seed=0, min_size=3)
    assert caught.value.key == "federation.alpha"


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"scheme": "round-robin"}, "federation.partition"),
        ({"num_hospitals": 0}, "federation.num_hospitals"),
        ({"scheme": "dirichlet", "alpha": 0.0}, "federation.alpha"),
        ({"scheme": "quantity", "alpha": float("nan")}, "federation.alpha"),
        ({"shares": [1.0, 2.0]}, "federation.hospitals.share"),
        ({"shares": [1.0, -1.0, 1.0]}, "federation.hospitals.share"),
        ({"shares": [1000.0, 1.0, 1.0]}, "federation.hospitals.share"),  # rounds a hospital to 0 records
    ],
)
def test_invalid_plans_raise_config_error_with_key(kwargs: dict, key: str) -> None:
    arguments = {"num_hospitals": 3, "scheme": "iid"} | kwargs
    with pytest.raises(ConfigError) as caught:
        partition_indices(balanced_labels(50, 2), **arguments)
    assert caught.value.key == key


def test_summary_counts_match_and_table_names_every_hospital() -> None:
    labels = balanced_labels(90, 3)
    parts = partition_indices(labels, 3, "dirichlet", alpha=0.5, seed=1)
    names = ["St Mary", "General", "Children's"]
    rows = partition_summary(labels, parts, ["normal", "pneumonia", "covid"], names)

    assert [row["hospital"] for row in rows] == names
    for row, part in zip(rows, parts):
        counts = np.bincount(labels[part], minlength=3)
        assert row["records"] == len(part)
        assert [row["normal"], row["pneumonia"], row["covid"]] == counts.tolist()
        assert row["normal %"] == pytest.approx(100 * counts[0] / len(part), abs=0.05)
        assert sum(row[f"{c} %"] for c in ("normal", "pneumonia", "covid")) == pytest.approx(100, abs=0.2)

    table = format_partition_table(rows)
    lines = table.splitlines()
    assert len(lines) == 2 + len(rows)
    assert lines[0].startswith("| hospital") and "normal %" in lines[0]
    assert set(lines[1]) <= set("|-: ")
    assert len({len(line) for line in lines}) == 1, "columns are padded to a fixed width"
    for name in names:
        assert name in table


def test_summary_default_names_and_empty_table() -> None:
    rows = partition_summary(np.array([0, 1, 1]), [np.array([0]), np.array([1, 2])], ["a", "b"])
    assert [row["hospital"] for row in rows] == ["hospital 0", "hospital 1"]
    assert rows[1]["b %"] == 100.0 and rows[0]["b"] == 0
    assert "hospital 1" in format_partition_table(rows)
    assert format_partition_table([]) == "(no hospitals)"
