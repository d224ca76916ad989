"""How far a classifier's confidence can be trusted: ECE, Brier score, reliability bins, temperature scaling.

Binning: ECE is the top-label ECE of Guo et al. (2017). Each image goes into one of
:data:`DEFAULT_BINS` (15) equal-width bins over [0, 1] by the confidence of its predicted class (its
largest probability). ECE is the average, weighted by the share of images in each bin, of
``|accuracy - mean confidence|``. A binary classifier never has a top-label confidence below 0.5,
so it only uses the upper bins.

Brier score: binary tasks use the usual ``mean((p(class 1) - y)^2)`` (0 is perfect, 0.25 is a coin
flip); multi-class tasks use Brier's original sum over classes, ``mean(sum_k (p_k - [y = k])^2)``.

Temperature scaling divides every logit by one number T > 0, fitted by minimising the negative
log-likelihood on a calibration split. T > 1 softens an over-confident model. Dividing by T changes
neither the predicted class nor the ROC-AUC of a binary task; only the stated confidence changes.
fedpriv fits T on the server's public calibration split (the official validation split), never on
a hospital's private data.

The fitted T is applied only when it lowers the ECE of that same calibration split (minimising the
NLL does not guarantee it: a model that ranks well but is confidently wrong on a few images can get
a T that makes its stated confidence worse). Otherwise the model keeps T = 1, and the report says
which was chosen and why (:attr:`CalibrationReport.decision`). A fitted T at an end of
:data:`TEMPERATURE_BOUNDS` is flagged either way: the fit did not find an interior optimum.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

from fedpriv.rundir import number

log = logging.getLogger(__name__)

DEFAULT_BINS = 15
#: Range searched for the temperature. A model that separates its calibration split perfectly would
#: push T towards 0 (infinite confidence); the lower bound stops that.
TEMPERATURE_BOUNDS = (0.05, 20.0)
BINNING = "equal-width bins over [0, 1] on the predicted-class (top-label) confidence"


@dataclass(frozen=True)
class ReliabilityBin:
    """One confidence bin: its edges, how many images fell in it, their mean confidence and accuracy."""

    lower: float
    upper: float
    count: int
    confidence: float  # NaN for an empty bin
    accuracy: float  # NaN for an empty bin


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Class probabilities of ``logits / temperature`` (float64, rows sum to 1)."""
    return np.exp(log_softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1))


def _check(probabilities: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probabilities, labels = np.asarray(probabilities, dtype=np.float64), np.asarray(labels).astype(np.int64)
    if probabilities.ndim != 2 or labels.shape != (len(probabilities),):
        raise ValueError(f"need (N, classes) probabilities and (N,) labels, got {probabilities.shape} "
                         f"and {labels.shape}")
    if len(labels) == 0:
        raise ValueError("cannot measure calibration on zero images")
    return probabilities, labels


def reliability_bins(probabilities: np.ndarray, labels: np.ndarray, n_bins: int = DEFAULT_BINS) -> list[ReliabilityBin]:
    """The reliability diagram's bins: images grouped by top-label confidence into ``n_bins`` equal bins.

    Bin ``b`` holds confidences in ``(b / n_bins, (b + 1) / n_bins]``; a confidence of exactly 0
    goes into the first bin.
    """
    probabilities, labels = _check(probabilities, labels)
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    index = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
    bins = []
    for b in range(n_bins):
        members = index == b
        count = int(members.sum())
        bins.append(ReliabilityBin(
            lower=b / n_bins, upper=(b + 1) / n_bins, count=count,
            confidence=float(confidence[members].mean()) if count else math.nan,
            accuracy=float(correct[members].mean()) if count else math.nan,
        ))
    return bins


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, n_bins: int = DEFAULT_BINS) -> float:
    """Top-label ECE over ``n_bins`` equal-width confidence bins (0 is perfectly calibrated)."""
    bins = reliability_bins(probabilities, labels, n_bins)
    total = sum(b.count for b in bins)
    return float(sum(b.count / total * abs(b.accuracy - b.confidence) for b in bins if b.count))


def brier_score(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Brier score: squared error of the positive-class probability (binary) or of the whole vector."""
    probabilities, labels = _check(probabilities, labels)
    if probabilities.shape[1] == 2:
        return float(np.mean((probabilities[:, 1] - (labels == 1)) ** 2))
    one_hot = np.eye(probabilities.shape[1])[labels]
    return float(np.mean(np.sum((probabilities - one_hot) ** 2, axis=1)))


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean cross-entropy of ``softmax(logits / temperature)`` against ``labels``."""
    logits, labels = _check(logits, labels)
    log_probabilities = log_softmax(logits / temperature, axis=1)
    return float(-np.mean(log_probabilities[np.arange(len(labels)), labels]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray,
                    bounds: tuple[float, float] = TEMPERATURE_BOUNDS) -> float:
    """The temperature T minimising the NLL of ``softmax(logits / T)`` on (``logits``, ``labels``).

    The NLL is convex in 1/T, so a bounded one-dimensional search over log T finds its minimum.
    """
    logits, labels = _check(logits, labels)
    result = minimize_scalar(lambda log_t: negative_log_likelihood(logits, labels, math.exp(log_t)),
                             bounds=(math.log(bounds[0]), math.log(bounds[1])), method="bounded",
                             options={"xatol": 1e-6})
    temperature = float(math.exp(result.x))
    if _at_bound(temperature, bounds):
        log.warning("fitted temperature %.3g sits at the edge of its search range %s", temperature, bounds)
    return temperature


@dataclass
class CalibrationMetrics:
    """Calibration of one set of predictions: ECE, Brier score, NLL, accuracy and the reliability bins."""

    ece: float
    brier: float
    nll: float
    accuracy: float
    bins: list[ReliabilityBin] = field(repr=False)

    @classmethod
    def from_logits(cls, logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0,
                    n_bins: int = DEFAULT_BINS) -> CalibrationMetrics:
        """Measure ``softmax(logits / temperature)`` against ``labels``."""
        probabilities = softmax(logits, temperature)
        labels = np.asarray(labels)
        return cls(
            ece=expected_calibration_error(probabilities, labels, n_bins),
            brier=brier_score(probabilities, labels),
            nll=negative_log_likelihood(logits, labels, temperature),
            accuracy=float((probabilities.argmax(axis=1) == labels).mean()),
            bins=reliability_bins(probabilities, labels, n_bins),
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CalibrationMetrics:
        bins = [ReliabilityBin(**{k: number(v) if k != "count" else int(v) for k, v in b.items()})
                for b in data["bins"]]
        return cls(*(number(data[key]) for key in ("ece", "brier", "nll", "accuracy")), bins=bins)


@dataclass
class CalibrationReport:
    """Calibration on the test split before and after temperature scaling, and where T came from.

    ``temperature`` is the one applied (what calibration.json gives fedpriv-predict): the fitted one
    when it lowered the calibration split's ECE, else 1. ``after`` measures the test split with the
    fitted temperature, applied or not, so the report can show what it would have done.
    """

    temperature: float
    n_bins: int
    fitted_on: str  # which split the temperature was fitted on (public to the server)
    evaluated_on: str  # which split the metrics are measured on
    before: CalibrationMetrics
    after: CalibrationMetrics
    binning: str = BINNING
    fitted_temperature: float = math.nan  # NaN: written before the choice existed (then equal to temperature)
    applied: bool = True
    decision: str = ""  # why the fitted temperature was, or was not, applied
    calibration_ece_before: float = math.nan  # ECE on the calibration split with T = 1
    calibration_ece_fitted: float = math.nan  # ... and with the fitted T

    def __post_init__(self) -> None:
        if math.isnan(self.fitted_temperature):
            self.fitted_temperature = self.temperature

    @property
    def at_bound(self) -> bool:
        """Whether the fitted temperature sits at an end of :data:`TEMPERATURE_BOUNDS`."""
        return _at_bound(self.fitted_temperature)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for calibration.json (:mod:`fedpriv.rundir` encodes NaN and infinity)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CalibrationReport:
        return cls(temperature=float(data["temperature"]), n_bins=int(data["n_bins"]),
                   fitted_on=str(data["fitted_on"]), evaluated_on=str(data["evaluated_on"]),
                   before=CalibrationMetrics.from_dict(data["before"]),
                   after=CalibrationMetrics.from_dict(data["after"]), binning=str(data.get("binning", BINNING)),
                   fitted_temperature=number(data.get("fitted_temperature")), applied=bool(data.get("applied", True)),
                   decision=str(data.get("decision", "")),
                   calibration_ece_before=number(data.get("calibration_ece_before")),
                   calibration_ece_fitted=number(data.get("calibration_ece_fitted")))


def calibrate(calibration_logits: np.ndarray, calibration_labels: np.ndarray, test_logits: np.ndarray,
              test_labels: np.ndarray, *, n_bins: int = DEFAULT_BINS, fitted_on: str = "calibration split",
              evaluated_on: str = "test split") -> CalibrationReport:
    """Fit T on the calibration split, keep it only if it lowers that split's ECE, and measure the test split.

    The test split is measured with T = 1 and with the fitted T; the choice never looks at it.
    """
    fitted = fit_temperature(calibration_logits, calibration_labels)
    ece_before, ece_fitted = (CalibrationMetrics.from_logits(calibration_logits, calibration_labels, t, n_bins).ece
                              for t in (1.0, fitted))
    applied, decision = choose_temperature(fitted, ece_before, ece_fitted)
    report = CalibrationReport(
        temperature=fitted if applied else 1.0, n_bins=n_bins, fitted_on=fitted_on, evaluated_on=evaluated_on,
        before=CalibrationMetrics.from_logits(test_logits, test_labels, 1.0, n_bins),
        after=CalibrationMetrics.from_logits(test_logits, test_labels, fitted, n_bins),
        fitted_temperature=fitted, applied=applied, decision=decision,
        calibration_ece_before=ece_before, calibration_ece_fitted=ece_fitted,
    )
    log.info("temperature %.3f fitted on %s, %s: %s; test ECE %.4f -> %.4f with it", fitted, fitted_on,
             "applied" if applied else "NOT applied", decision, report.before.ece, report.after.ece)
    return report


def choose_temperature(fitted: float, ece_before: float, ece_fitted: float) -> tuple[bool, str]:
    """Whether to apply the fitted temperature, and why: only if it lowers the calibration split's ECE."""
    edge = (f"; the fitted T {fitted:.3g} sits at the edge of its search range {TEMPERATURE_BOUNDS}, so the fit "
            "found no interior optimum" if _at_bound(fitted) else "")
    change = f"calibration-split ECE {ece_before:.4f} with T = 1, {ece_fitted:.4f} with T = {fitted:.3g}"
    if ece_fitted < ece_before:
        return True, f"applied: it lowers the {change}{edge}"
    return False, f"not applied (T = 1 kept): it does not lower the {change}{edge}"


def _at_bound(temperature: float, bounds: tuple[float, float] = TEMPERATURE_BOUNDS) -> bool:
    return min(abs(temperature - bound) / bound for bound in bounds) < 1e-3
