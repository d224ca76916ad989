"""What (epsilon, delta)-DP allows a membership attack, and a statistically careful check against it.

For any test that tells "record in" from "record out" of an (epsilon, delta)-DP mechanism
(add/remove neighbours, which is what Opacus accounts for), with false-positive rate FPR the
true-positive rate is at most

    TPR <= min(e^eps * FPR + delta,  1 - e^-eps * (1 - delta - FPR))

(Kairouz, Oh & Viswanath 2015; the second term is the same inequality applied to "out" vs "in").
An accountant certifies a whole curve of guarantees (epsilon(delta) for every delta), and each one
holds, so the minimum over several of them is a tighter ceiling: a numerical approximation from
above of the mechanism's f-DP trade-off curve. :class:`PrivacyCeiling` holds such a set.

An attack is measured on finitely many records, so its TPR and FPR are estimates. The check uses
Clopper-Pearson bounds: it flags a violation only if even the *lower* confidence bound of the TPR
exceeds the ceiling at the *upper* confidence bound of the FPR.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import beta

from fedpriv.privacy.accounting import PrivacyEvent, epsilon

log = logging.getLogger(__name__)


def dp_tpr_ceiling(fpr: np.ndarray | float, epsilon_: float, delta: float) -> np.ndarray:
    """The largest TPR an (epsilon_, delta)-DP mechanism allows at false-positive rate `fpr`."""
    fpr = np.clip(np.asarray(fpr, dtype=np.float64), 0.0, 1.0)
    if math.isinf(epsilon_):
        return np.ones_like(fpr)
    epsilon_ = max(epsilon_, 0.0)  # a negative epsilon from an accountant only means (0, delta)
    direct = math.exp(epsilon_) * fpr + delta
    swapped = 1.0 - math.exp(-epsilon_) * (1.0 - delta - fpr)
    return np.clip(np.minimum(direct, swapped), 0.0, 1.0)


def default_deltas(delta: float) -> list[float]:
    """The deltas at which the accountant is asked for epsilon to trace the trade-off curve."""
    grid = [delta * 1e-2, delta * 1e-1, delta, *np.logspace(-4, -1, 7), 0.2, 0.3, 0.5]
    return sorted({float(d) for d in grid if 0 < d < 1})


@dataclass(frozen=True)
class PrivacyCeiling:
    """A set of (epsilon, delta) guarantees that all hold; `epsilon`/`delta` are the headline one."""

    epsilon: float
    delta: float
    guarantees: tuple[tuple[float, float], ...]

    @classmethod
    def from_epsilon(cls, epsilon_: float, delta: float) -> PrivacyCeiling:
        """Only the headline guarantee (use `math.inf` for a model without any guarantee)."""
        return cls(epsilon_, delta, ((epsilon_, delta),))

    @classmethod
    def from_events(cls, events: Sequence[PrivacyEvent], delta: float, accountant: str = "prv",
                    deltas: Sequence[float] | None = None) -> PrivacyCeiling:
        """All guarantees the accountant certifies for `events` at `delta` and the grid `deltas`."""
        grid = sorted({delta, *(deltas if deltas is not None else default_deltas(delta))})
        pairs = tuple((epsilon(events, d, accountant), d) for d in grid)
        return cls(epsilon(events, delta, accountant), delta, pairs)

    def tpr(self, fpr: np.ndarray | float) -> np.ndarray:
        """The ceiling: the smallest TPR bound over every guarantee."""
        bounds = [dp_tpr_ceiling(fpr, e, d) for e, d in self.guarantees]
        return np.minimum.reduce(bounds)

    def tpr_headline(self, fpr: np.ndarray | float) -> np.ndarray:
        """The looser ceiling of the headline (epsilon, delta) alone."""
        return dp_tpr_ceiling(fpr, self.epsilon, self.delta)

    @property
    def private(self) -> bool:
        return math.isfinite(self.epsilon)


def clopper_pearson(successes: int, trials: int, confidence: float) -> tuple[float, float]:
    """One-sided Clopper-Pearson bounds: each holds with probability at least `confidence`."""
    if trials <= 0:
        return 0.0, 1.0
    alpha = 1.0 - confidence
    lower = float(beta.ppf(alpha, successes, trials - successes + 1)) if successes > 0 else 0.0
    upper = float(beta.ppf(1 - alpha, successes + 1, trials - successes)) if successes < trials else 1.0
    return lower, upper


def epsilon_lower_bound(tpr_lower: float, fpr_upper: float, delta: float) -> float:
    """The smallest epsilon compatible with an attack reaching (at least) `tpr_lower` at `fpr_upper`."""
    candidates = [0.0]
    if tpr_lower - delta > 0 and fpr_upper > 0:
        candidates.append(math.log((tpr_lower - delta) / fpr_upper))
    if tpr_lower < 1 and 1 - fpr_upper - delta > 0:
        candidates.append(math.log((1 - fpr_upper - delta) / (1 - tpr_lower)))
    return max(candidates)


@dataclass
class CeilingCheck:
    """One attack at one false-positive level, compared with the ceiling."""

    attack: str
    fpr_level: float
    threshold: float
    true_positives: int
    members: int
    false_positives: int
    non_members: int
    tpr_lower: float
    fpr_upper: float
    ceiling: float  # at fpr_upper; 1 when the model has no guarantee
    violated: bool
    epsilon_lower: float  # what this observation proves about epsilon, at the check's confidence

    @property
    def tpr(self) -> float:
        return self.true_positives / self.members

    @property
    def fpr(self) -> float:
        return self.false_positives / self.non_members

    def as_dict(self) -> dict:
        return {**asdict(self), "tpr": self.tpr, "fpr": self.fpr}


def check_attack(
    scores: np.ndarray,
    is_member: np.ndarray,
    ceiling: PrivacyCeiling,
    fpr_levels: Sequence[float],
    *,
    confidence: float,
    attack: str = "attack",
) -> list[CeilingCheck]:
    """Compare an attack's TPR at each false-positive level with the ceiling.

    At each level the threshold is the strictest one letting at most `level * non-members` false
    positives through. `confidence` is that of each single bound: callers making several
    comparisons split their error rate among them (see :func:`per_bound_confidence`).
    """
    scores, is_member = np.asarray(scores, dtype=np.float64), np.asarray(is_member, dtype=bool)
    member_scores, outsider_scores = scores[is_member], np.sort(scores[~is_member])[::-1]
    checks = []
    for level in fpr_levels:
        allowed = math.floor(level * len(outsider_scores))
        threshold = outsider_scores[allowed] if allowed < len(outsider_scores) else -math.inf
        true_pos = int((member_scores > threshold).sum())
        false_pos = int((outsider_scores > threshold).sum())
        tpr_lower, _ = clopper_pearson(true_pos, len(member_scores), confidence)
        _, fpr_upper = clopper_pearson(false_pos, len(outsider_scores), confidence)
        limit = float(ceiling.tpr(fpr_upper))
        checks.append(CeilingCheck(
            attack, float(level), float(threshold), true_pos, len(member_scores), false_pos,
            len(outsider_scores), tpr_lower, fpr_upper, limit,
            violated=ceiling.private and tpr_lower > limit + 1e-12,
            epsilon_lower=epsilon_lower_bound(tpr_lower, fpr_upper, ceiling.delta),
        ))
    return checks


def per_bound_confidence(confidence: float, comparisons: int) -> float:
    """Bonferroni: the confidence of each bound so that all 2 x `comparisons` hold together."""
    return 1.0 - (1.0 - confidence) / (2 * max(comparisons, 1))
