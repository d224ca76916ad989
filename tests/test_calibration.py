"""Calibration measures (ECE, Brier score) and temperature scaling, on synthetic predictors with known answers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedpriv.report.calibration import (
    TEMPERATURE_BOUNDS,
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


def confidently_wrong_outliers(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A calibrated bulk plus 2% of images the model is wrong about with a huge margin.

    Those few images dominate the NLL, so its minimiser is a large T that makes the calibrated bulk
    under-confident: the ECE gets worse, not better.
    """
    logits, labels = calibrated_predictor(n, 2, seed=seed)
    outliers = np.arange(0, n, 50)
    logits[outliers] = 0.0
    logits[outliers, 1 - labels[outliers]] = 30.0
    return logits, labels


def test_a_fitted_temperature_that_worsens_calibration_is_not_applied():
    logits, labels = confidently_wrong_outliers(4_000, seed=5)
    report = calibrate(logits[:2000], labels[:2000], logits[2000:], labels[2000:])
    assert report.fitted_temperature > 1.5  # the NLL fit moved far from 1 ...
    assert report.calibration_ece_fitted > report.calibration_ece_before  # ... and it made calibration worse
    assert not report.applied and report.temperature == 1.0
    assert report.decision.startswith("not applied") and f"{report.calibration_ece_fitted:.4f}" in report.decision
    restored = CalibrationReport.from_dict(json.loads(json.dumps(report.to_dict())))
    assert (restored.applied, restored.temperature, restored.fitted_temperature) == (
        False, 1.0, report.fitted_temperature)


def test_a_temperature_that_helps_is_applied_and_says_why():
    logits, labels = calibrated_predictor(4_000, 2, seed=13)
    report = calibrate(3 * logits[:2000], labels[:2000], 3 * logits[2000:], labels[2000:])
    assert report.applied and report.temperature == report.fitted_temperature > 1
    assert report.calibration_ece_fitted < report.calibration_ece_before
    assert report.decision.startswith("applied: it lowers") and not report.at_bound


def test_a_temperature_at_the_edge_of_its_range_is_flagged():
    logits, labels = calibrated_predictor(1_000, 2, seed=17)
    labels = logits.argmax(axis=1)  # a split the model separates perfectly: the NLL wants T -> 0
    report = calibrate(logits, labels, logits, labels)
    assert report.fitted_temperature == pytest.approx(TEMPERATURE_BOUNDS[0], rel=1e-3) and report.at_bound
    assert "edge of its search range" in report.decision


def test_the_report_says_which_temperature_was_chosen_and_why():
    from fedpriv.report.document import to_markdown
    from fedpriv.report.run_report import _calibration, _calibration_rows

    logits, labels = confidently_wrong_outliers(4_000, seed=5)
    rejected = calibrate(logits[:2000], labels[:2000], logits[2000:], labels[2000:])
    text = to_markdown("report", _calibration(rejected, ""), "figures")
    assert "Temperature scaling was NOT applied" in text and "The applied T = 1.000" in text
    assert f"with fitted T = {rejected.fitted_temperature:.3f}, NOT applied" in text
    rows = dict(_calibration_rows(rejected))
    assert rows["temperature applied"].startswith(f"1 (the fitted T = {rejected.fitted_temperature:.3f} was not applied")
    edge = calibrate(logits[:1000], logits[:1000].argmax(axis=1), logits[1000:], labels[1000:])
    edge_text = to_markdown("report", _calibration(edge, ""), "figures")
    assert "reached the edge of its search range" in edge_text
    assert "AT THE EDGE" in " ".join(v for _, v in _calibration_rows(edge))
