"""Fairness across hospitals (from metrics.json) and across subgroups (from per-image attributes)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedpriv.report.fairness import hospital_fairness, subgroup_fairness

# Eight test images: four women, four men. Class 1 is the positive class (e.g. pneumonia).
LABELS = np.array([1, 1, 0, 0, 1, 1, 0, 0])
P_POSITIVE = np.array([0.9, 0.4, 0.2, 0.6, 0.8, 0.7, 0.3, 0.55])
SEX = ["F", "F", "F", "F", "M", "M", "M", "M"]
SITE = ["a", "a", "b", "b", "a", "", "b", "b"]  # one image has no site


def probabilities() -> np.ndarray:
    return np.stack([1 - P_POSITIVE, P_POSITIVE], axis=1)


def test_subgroup_metrics_match_hand_computed_values():
    attributes = [{"sex": s, "site": t} for s, t in zip(SEX, SITE, strict=True)]
    result = subgroup_fairness(probabilities(), LABELS, attributes, ["normal", "pneumonia"])
    assert result.available and result.positive_class == "pneumonia"
    by_name = {a.attribute: a for a in result.attributes}
    women, men = by_name["sex"].groups
    # Women predict [1, 0, 0, 1] for labels [1, 1, 0, 0].
    assert (women.group, women.count, women.positives) == ("F", 4, 2)
    assert women.tpr == 0.5 and women.tnr == 0.5 and women.accuracy == 0.5 and women.selection_rate == 0.5
    assert women.auc == 0.75  # positives {0.9, 0.4} over negatives {0.2, 0.6}: 3 of 4 pairs ordered
    # Men predict [1, 1, 0, 1] for labels [1, 1, 0, 0].
    assert men.tpr == 1.0 and men.tnr == 0.5 and men.accuracy == 0.75 and men.selection_rate == 0.75
    assert men.auc == 1.0
    assert by_name["sex"].equal_opportunity_difference == pytest.approx(0.5)
    assert by_name["sex"].demographic_parity_difference == pytest.approx(0.25)
    site = by_name["site"]
    assert site.missing == 1 and [g.count for g in site.groups] == [3, 4]
    site_a = site.groups[0]  # images 0, 1, 4: all positive, predicted [1, 0, 1]
    assert site_a.tpr == pytest.approx(2 / 3) and math.isnan(site_a.tnr) and math.isnan(site_a.auc)
    # site b holds no positive, so its TPR is undefined and equal opportunity cannot be compared
    assert math.isnan(site.groups[1].tpr) and math.isnan(site.equal_opportunity_difference)
    assert site.demographic_parity_difference == pytest.approx(2 / 3 - 2 / 4)  # b predicts images 3 and 7 positive


def test_multi_class_gaps_take_the_worst_class():
    labels = np.array([0, 1, 2, 0, 1, 2])
    predictions = np.array([0, 1, 2, 0, 2, 2])  # group B misses its class-1 image
    probs = np.eye(3)[predictions] * 0.8 + 0.2 / 3
    result = subgroup_fairness(probs, labels, [{"g": g} for g in "AAABBB"], ["x", "y", "z"])
    attribute = result.attributes[0]
    assert attribute.equal_opportunity_difference == pytest.approx(1.0)  # class 1 recall: A 1, B 0
    assert attribute.demographic_parity_difference == pytest.approx(1 / 3)  # P(pred = 1) and P(pred = 2)
    assert math.isnan(attribute.groups[0].selection_rate)  # no single positive class


def test_data_without_attributes_says_so_instead_of_a_silent_gap():
    result = subgroup_fairness(probabilities(), LABELS, None, ["normal", "pneumonia"], dataset_name="pneumoniamnist")
    assert not result.available
    assert "pneumoniamnist" in result.missing_reason and "could NOT be assessed" in result.missing_reason


def test_an_identifier_column_is_not_split_into_groups():
    attributes = [{"patient": f"p{i}"} for i in range(25)]
    labels = np.arange(25) % 2
    probs = np.full((25, 2), 0.5)
    attribute = subgroup_fairness(probs, labels, attributes, ["a", "b"]).attributes[0]
    assert attribute.groups == [] and "25 distinct values" in attribute.skipped_reason


def _metrics(evaluation: dict) -> dict:
    return {"rounds": [{"round": 1, "client_evaluation": {}}, {"round": 2, "client_evaluation": evaluation}]}


def test_hospital_gaps_use_the_last_round():
    evaluation = {
        "h1": {"auc": 0.9, "accuracy": 0.8, "sensitivity": 0.7, "specificity": 0.9, "num-examples": 10.0},
        "h2": {"auc": 0.6, "accuracy": 0.85, "sensitivity": 0.95, "specificity": 0.5, "num-examples": 12.0},
        "h3": {"accuracy": 0.7, "sensitivity": 1.0, "specificity": 0.0, "num-examples": 4.0},  # AUC undefined
    }
    fairness = hospital_fairness(_metrics(evaluation))
    assert fairness.round == 2 and [r["hospital"] for r in fairness.rows] == ["h1", "h2", "h3"]
    assert math.isnan(fairness.rows[2]["auc"])
    gaps = {g.metric: g for g in fairness.gaps}
    assert (gaps["auc"].best, gaps["auc"].worst, gaps["auc"].gap) == ("h1", "h2", pytest.approx(0.3))
    assert (gaps["accuracy"].best, gaps["accuracy"].worst) == ("h2", "h3")
    assert gaps["specificity"].gap == pytest.approx(0.9)
    assert "PRIVATE" in fairness.note and "NOT covered" in fairness.note


def test_missing_hospital_metrics_are_explained():
    off = hospital_fairness(_metrics({}), client_evaluate=False)
    assert not off.available and "client_evaluate=false" in off.missing_reason
    silent = hospital_fairness(_metrics({}), client_evaluate=True)
    assert "no hospital shared" in silent.missing_reason
    # Hospitals that declined (the default for a deployed hospital) send no examples: not a row of zeros.
    declined = hospital_fairness(_metrics({"A": {"num-examples": 0, "dp-covered": 0.0}}), client_evaluate=True)
    assert not declined.available and "share-validation-metrics" in declined.missing_reason
    assert "no round finished" in hospital_fairness({"rounds": []}).missing_reason
