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
    """Calibration on the test split before and after temperature scaling, and where T came from."""

    temperature: float
    n_bins: int
    fitted_on: str  # which split the temperature was fitted on (public to the server)
    evaluated_on: str  # which split the metrics are measured on
    before: CalibrationMetrics
    after: CalibrationMetrics
    binning: str = BINNING

    @property
    def at_bound(self) -> bool:
        """Whether the fitted temperature sits at an end of :data:`TEMPERATURE_BOUNDS`."""
        return _at_bound(self.temperature)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for calibration.json (:mod:`fedpriv.rundir` encodes NaN and infinity)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CalibrationReport:
        return cls(temperature=float(data["temperature"]), n_bins=int(data["n_bins"]),
                   fitted_on=str(data["fitted_on"]), evaluated_on=str(data["evaluated_on"]),
                   before=CalibrationMetrics.from_dict(data["before"]),
                   after=CalibrationMetrics.from_dict(data["after"]), binning=str(data.get("binning", BINNING)))


def calibrate(calibration_logits: np.ndarray, calibration_labels: np.ndarray, test_logits: np.ndarray,
              test_labels: np.ndarray, *, n_bins: int = DEFAULT_BINS, fitted_on: str = "calibration split",
              evaluated_on: str = "test split") -> CalibrationReport:
    """Fit T on the calibration split, then measure the test split with T = 1 and with the fitted T."""
    temperature = fit_temperature(calibration_logits, calibration_labels)
    report = CalibrationReport(
        temperature=temperature, n_bins=n_bins, fitted_on=fitted_on, evaluated_on=evaluated_on,
        before=CalibrationMetrics.from_logits(test_logits, test_labels, 1.0, n_bins),
        after=CalibrationMetrics.from_logits(test_logits, test_labels, temperature, n_bins),
    )
    log.info("temperature %.3f fitted on %s; test ECE %.4f -> %.4f, Brier %.4f -> %.4f", temperature, fitted_on,
             report.before.ece, report.after.ece, report.before.brier, report.after.brier)
    return report


def _at_bound(temperature: float, bounds: tuple[float, float] = TEMPERATURE_BOUNDS) -> bool:
    return min(abs(temperature - bound) / bound for bound in bounds) < 1e-3
