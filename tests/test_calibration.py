"""Calibration measures (ECE, Brier score) and temperature scaling, on synthetic predictors with known answers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedpriv.report.calibration import (
    CalibrationReport,
    brier_score,
    calibrate,
    expected_calibration_error,
    fit_temperature,
    reliability_bins,
    softmax,
)


def calibrated_predictor(n: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels DRAWN from softmax(logits): perfectly calibrated by construction."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 2.0, size=(n, classes))
    probabilities = softmax(logits)
    labels = (rng.uniform(size=(n, 1)) > probabilities.cumsum(axis=1)).sum(axis=1)
    return logits, labels


@pytest.mark.parametrize("classes", [2, 4])
def test_ece_is_about_zero_when_calibrated_and_large_when_over_confident(classes):
    logits, labels = calibrated_predictor(100_000, classes, seed=classes)
    assert expected_calibration_error(softmax(logits), labels) < 0.01
    over_confident = softmax(4.0 * logits)  # same decisions, far more sure of them
    assert expected_calibration_error(over_confident, labels) > 0.1


def test_ece_and_brier_match_hand_computed_values():
    # confidences 0.9 (right), 0.75 (wrong), 0.65 (right), 0.7 (right); 5 bins of width 0.2
    probabilities = np.array([[0.1, 0.9], [0.25, 0.75], [0.35, 0.65], [0.3, 0.7]])
    labels = np.array([1, 0, 1, 1])
    bins = reliability_bins(probabilities, labels, n_bins=5)
    assert [b.count for b in bins] == [0, 0, 0, 3, 1]
    assert bins[3].confidence == pytest.approx(0.7) and bins[3].accuracy == pytest.approx(2 / 3)
    # (1/4)|1 - 0.9| + (3/4)|2/3 - 0.7| = 0.025 + 0.025
    assert expected_calibration_error(probabilities, labels, n_bins=5) == pytest.approx(0.05)
    # binary Brier: mean squared error of p(class 1): (0.01 + 0.5625 + 0.1225 + 0.09) / 4
    assert brier_score(probabilities, labels) == pytest.approx(0.19625)
    # multi-class Brier sums over classes: here one image, (0.2^2 + 0.3^2 + 0.5^2)
    assert brier_score(np.array([[0.2, 0.5, 0.3]]), np.array([1])) == pytest.approx(0.04 + 0.25 + 0.09)


@pytest.mark.parametrize(("scale", "expected"), [(3.0, 3.0), (0.4, 0.4)])
def test_fitted_temperature_undoes_a_known_distortion(scale, expected):
    logits, labels = calibrated_predictor(40_000, 3, seed=7)
    assert fit_temperature(scale * logits, labels) == pytest.approx(expected, rel=0.05)


def test_temperature_scaling_lowers_the_ece_of_an_over_confident_model():
    logits, labels = calibrated_predictor(40_000, 2, seed=11)
    over_confident = 3.0 * logits
    report = calibrate(over_confident[:20_000], labels[:20_000], over_confident[20_000:], labels[20_000:],
                       fitted_on="validation", evaluated_on="test")
    assert report.temperature > 1
    assert report.before.ece > 0.1
    assert report.after.ece < report.before.ece / 4
    assert report.after.brier < report.before.brier and report.after.nll < report.before.nll
    assert report.after.accuracy == report.before.accuracy  # dividing by T never changes the predicted class


def test_calibration_report_survives_a_json_round_trip():
    logits, labels = calibrated_predictor(2_000, 2, seed=3)
    report = calibrate(2 * logits[:1000], labels[:1000], 2 * logits[1000:], labels[1000:])
    restored = CalibrationReport.from_dict(json.loads(json.dumps(report.to_dict())))
    assert restored.temperature == report.temperature
    assert restored.after.ece == report.after.ece
    assert [b.count for b in restored.before.bins] == [b.count for b in report.before.bins]
    assert np.isnan(restored.before.bins[0].accuracy)  # empty bins stay empty (null in JSON)
