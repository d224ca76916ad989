"""Does the final model work equally well for every hospital and every patient subgroup?

Hospitals: each hospital's metrics of the final global model on its own private validation split,
read from the last round's ``client_evaluation`` in metrics.json. These figures are computed on
private data and are NOT covered by the differential-privacy guarantee. The gap of a metric is its
best hospital's value minus its worst's.

Subgroups: when the test images carry attributes (an image folder's attributes CSV, e.g. sex or age
band), metrics per attribute value, and per attribute:

- equal-opportunity difference: the largest gap in true-positive rate (sensitivity) between groups;
- demographic-parity difference: the largest gap in selection rate (share predicted positive).

For a binary task the positive class is class 1 (e.g. pneumonia). For a multi-class task each class
in turn is the positive one (one-vs-rest) and the largest gap over classes is reported. Groups
where a rate is undefined (e.g. no positives, so no TPR) are left out of that gap. These are the
definitions of Fairlearn's ``equal_opportunity_difference`` and ``demographic_parity_difference``,
computed here with numpy and scikit-learn.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from fedpriv.rundir import number
from fedpriv.training import roc_auc

log = logging.getLogger(__name__)

HOSPITAL_METRICS = ("auc", "accuracy", "sensitivity", "specificity")
PRIVATE_NOTE = ("Computed by each hospital on its own PRIVATE validation split: these figures are "
                "NOT covered by the differential-privacy guarantee.")
#: An attribute with more distinct values than this is taken to be an identifier or a continuous
#: value (e.g. patient id, exact age) and is not split into groups.
MAX_GROUPS = 20
MISSING = ""


@dataclass(frozen=True)
class MetricGap:
    """Best and worst group (or hospital) on one metric, and the gap between them."""

    metric: str
    best: str
    best_value: float
    worst: str
    worst_value: float

    @property
    def gap(self) -> float:
        return self.best_value - self.worst_value


def metric_gaps(rows: Sequence[dict[str, Any]], name_key: str, metrics: Sequence[str]) -> list[MetricGap]:
    """For each metric, the row with the highest and the lowest finite value (rows lacking it are skipped)."""
    gaps = []
    for metric in metrics:
        scored = [(float(row[metric]), str(row[name_key])) for row in rows
                  if row.get(metric) is not None and math.isfinite(float(row[metric]))]
        if scored:
            (low, worst), (high, best) = min(scored), max(scored)
            gaps.append(MetricGap(metric, best, high, worst, low))
    return gaps


# ---------------------------------------------------------------------------------------- hospitals


@dataclass
class HospitalFairness:
    """Per-hospital metrics of the final global model, or why there are none."""

    round: int | None
    rows: list[dict[str, Any]]  # hospital, num-examples and HOSPITAL_METRICS (NaN when not reported)
    gaps: list[MetricGap]
    missing_reason: str = ""  # non-empty when no hospital metrics exist
    note: str = PRIVATE_NOTE

    @property
    def available(self) -> bool:
        return bool(self.rows)


def hospital_fairness(metrics: dict[str, Any] | None, *, client_evaluate: bool = True) -> HospitalFairness:
    """Read per-hospital validation metrics from the last round of a run's metrics.json contents."""
    rounds = (metrics or {}).get("rounds") or []
    if not rounds:
        return HospitalFairness(None, [], [], "no round finished, so there is no final model to evaluate")
    last = rounds[-1]
    # A hospital that declined (its validation metrics are not DP-covered) answers with no examples.
    evaluation = {name: values for name, values in (last.get("client_evaluation") or {}).items()
                  if values.get("num-examples", 0) > 0}
    if not evaluation:
        reason = ("hospital-side evaluation is off (strategy.client_evaluate=false, the default: metrics on "
                  "private validation data are not covered by the DP guarantee)" if not client_evaluate
                  else f"no hospital shared validation metrics in the last round (round {last['round']}); "
                       "a deployed hospital shares them only with share-validation-metrics=true")
        return HospitalFairness(last["round"], [], [], reason)
    rows = [_hospital_row(name, values) for name, values in sorted(evaluation.items())]
    return HospitalFairness(last["round"], rows, metric_gaps(rows, "hospital", HOSPITAL_METRICS))


def _hospital_row(name: str, values: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {"hospital": name, "num-examples": int(float(values.get("num-examples") or 0))}
    for metric in HOSPITAL_METRICS:
        value = values.get(metric)
        row[metric] = math.nan if value is None else float(value)
    return row


# ---------------------------------------------------------------------------------------- subgroups


@dataclass
class GroupMetrics:
    """The model's metrics on the test images of one attribute value."""

    group: str
    count: int
    positives: int  # images of the positive class (binary) or -1 for multi-class
    auc: float
    accuracy: float
    tpr: float  # sensitivity: recall of class 1 (binary) or mean recall over classes
    tnr: float  # specificity: recall of class 0 (binary) or mean one-vs-rest specificity
    selection_rate: float  # share predicted as class 1 (binary); NaN for multi-class


@dataclass
class AttributeFairness:
    """Every group of one attribute, and the largest gaps between them."""

    attribute: str
    groups: list[GroupMetrics]
    equal_opportunity_difference: float
    demographic_parity_difference: float
    missing: int = 0  # test images with no value for this attribute (left out)
    skipped_reason: str = ""  # non-empty when the attribute was not split into groups

    @property
    def gaps(self) -> list[MetricGap]:
        rows = [asdict(g) for g in self.groups]
        return metric_gaps(rows, "group", ("auc", "accuracy", "tpr", "tnr", "selection_rate"))


@dataclass
class SubgroupFairness:
    """Subgroup analysis of the test split, or why none could be made."""

    evaluated_on: str
    positive_class: str
    attributes: list[AttributeFairness] = field(default_factory=list)
    missing_reason: str = ""

    @property
    def available(self) -> bool:
        return bool(self.attributes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SubgroupFairness:
        attributes = [
            AttributeFairness(
                attribute=a["attribute"], groups=[GroupMetrics(**_numbers(g)) for g in a["groups"]],
                equal_opportunity_difference=number(a["equal_opportunity_difference"]),
                demographic_parity_difference=number(a["demographic_parity_difference"]),
                missing=int(a.get("missing", 0)), skipped_reason=a.get("skipped_reason", ""))
            for a in data.get("attributes", [])
        ]
        return cls(data["evaluated_on"], data["positive_class"], attributes, data.get("missing_reason", ""))


def no_attributes(evaluated_on: str, dataset_name: str) -> SubgroupFairness:
    """The explicit 'not assessed' result for data without per-image attributes."""
    reason = (f"the {dataset_name} test images carry no per-image attributes (such as sex, age band or "
              "scanner), so subgroup fairness could NOT be assessed. Image-folder datasets can add them "
              "with dataset.attributes_csv")
    return SubgroupFairness(evaluated_on, "", [], reason)


def subgroup_fairness(probabilities: np.ndarray, labels: np.ndarray, attributes: Sequence[dict[str, str]] | None,
                      class_names: Sequence[str], *, evaluated_on: str = "test split",
                      dataset_name: str = "dataset") -> SubgroupFairness:
    """Metrics per value of every attribute in ``attributes`` (one dict per image, same order as ``labels``)."""
    probabilities, labels = np.asarray(probabilities, dtype=np.float64), np.asarray(labels).astype(np.int64)
    if not attributes or not any(attributes):
        return no_attributes(evaluated_on, dataset_name)
    if len(attributes) != len(labels):
        raise ValueError(f"{len(attributes)} attribute rows for {len(labels)} images")
    names = sorted({key for row in attributes for key in row})
    positive = class_names[1] if len(class_names) == 2 else "each class in turn (one-vs-rest)"
    per_attribute = [_attribute(name, probabilities, labels, attributes) for name in names]
    return SubgroupFairness(evaluated_on, positive, per_attribute)


def _attribute(name: str, probabilities: np.ndarray, labels: np.ndarray,
               attributes: Sequence[dict[str, str]]) -> AttributeFairness:
    values = np.array([str(row.get(name, MISSING) or MISSING).strip() for row in attributes], dtype=object)
    present = values != MISSING
    groups = sorted(set(values[present].tolist()))
    if len(groups) > MAX_GROUPS:
        return AttributeFairness(name, [], math.nan, math.nan, int((~present).sum()),
                                 f"{len(groups)} distinct values (an identifier or a continuous value?); "
                                 f"group it into at most {MAX_GROUPS} bands to analyse it")
    predictions = probabilities.argmax(axis=1)
    num_classes = probabilities.shape[1]
    members = {group: values == group for group in groups}
    rows = [_group(group, probabilities[m], predictions[m], labels[m]) for group, m in members.items()]
    positives = [1] if num_classes == 2 else list(range(num_classes))
    tpr = [[_rate(predictions[m] == k, labels[m] == k) for m in members.values()] for k in positives]
    selection = [[float(np.mean(predictions[m] == k)) for m in members.values()] for k in positives]
    return AttributeFairness(name, rows, _largest_gap(tpr), _largest_gap(selection), int((~present).sum()))


def _group(group: str, probabilities: np.ndarray, predictions: np.ndarray, labels: np.ndarray) -> GroupMetrics:
    num_classes = probabilities.shape[1]
    recall = [_rate(predictions == k, labels == k) for k in range(num_classes)]
    specificity = [_rate(predictions != k, labels != k) for k in range(num_classes)]
    binary = num_classes == 2
    return GroupMetrics(
        group=group, count=len(labels), positives=int((labels == 1).sum()) if binary else -1,
        auc=roc_auc(labels, probabilities), accuracy=float(np.mean(predictions == labels)),
        tpr=recall[1] if binary else _nanmean(recall), tnr=recall[0] if binary else _nanmean(specificity),
        selection_rate=float(np.mean(predictions == 1)) if binary else math.nan,
    )


def _rate(hit: np.ndarray, among: np.ndarray) -> float:
    """Share of ``hit`` among the images where ``among`` holds; NaN when there are none."""
    total = int(among.sum())
    return float((hit & among).sum() / total) if total else math.nan


def _largest_gap(per_class: list[list[float]]) -> float:
    """Max over classes of (max - min over groups), ignoring undefined (NaN) rates."""
    gaps = []
    for rates in per_class:
        finite = [r for r in rates if math.isfinite(r)]
        if len(finite) >= 2:
            gaps.append(max(finite) - min(finite))
    return max(gaps) if gaps else math.nan


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def _numbers(group: dict[str, Any]) -> dict[str, Any]:
    return {k: (v if k in ("group", "count", "positives") else number(v)) for k, v in group.items()}
