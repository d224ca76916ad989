"""Membership inference against a trained model: was this record in its training set?

Two attacks, both black-box (they only need the model's logits on the candidate records):

* **Loss threshold** (Yeom et al., CSF 2018): members tend to have lower loss. The score is the
  negative cross-entropy loss; sweeping the threshold gives the ROC curve.
* **Offline LiRA** (Carlini et al., IEEE S&P 2022): shadow models trained the same way on data
  that does *not* contain the candidates give, for each candidate, the distribution of the
  model's logit-scaled confidence when the record is OUT. A Gaussian is fitted to it, and the
  score is how far above that distribution the target model's confidence lies (a one-sided
  likelihood-ratio test against OUT only; no IN models are needed).

Every score here is oriented the same way: larger means "more likely a member".
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve
from torch import nn
from torch.nn import functional as F

log = logging.getLogger(__name__)

# With this many OUT shadow models per record LiRA estimates a variance per record; with fewer it
# uses one variance pooled over records, which Carlini et al. found better for small shadow sets.
PER_EXAMPLE_VARIANCE_FROM = 32
_MIN_STD = 1e-6
# The low false-positive rates at which membership attacks are reported (Carlini et al.'s advice).
REPORTED_FPRS = (0.001, 0.01)


@torch.no_grad()
def model_logits(model: nn.Module, images: torch.Tensor, *, batch_size: int = 512, device: str = "cpu") -> torch.Tensor:
    """The model's logits for `images`, computed in batches, returned on the CPU."""
    model = model.to(device).eval()
    return torch.cat([model(images[i:i + batch_size].to(device)).cpu() for i in range(0, len(images), batch_size)])


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """Cross-entropy loss of each record."""
    return F.cross_entropy(logits, labels, reduction="none").numpy()


def logit_confidence(logits: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """LiRA's logit-scaled confidence log(p_y / (1 - p_y)), computed stably from the logits.

    The logit scaling makes the confidences of a record across models close to Gaussian.
    """
    true = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.clone()
    others.scatter_(1, labels[:, None], float("-inf"))
    return (true - torch.logsumexp(others, dim=1)).numpy()


def loss_scores(logits: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """Loss-threshold attack scores: the negative loss (members have lower loss)."""
    return -per_example_loss(logits, labels)


def lira_offline_scores(target_confidence: np.ndarray, out_confidence: np.ndarray) -> np.ndarray:
    """Offline LiRA scores from the target's confidences (N,) and the OUT shadows' (K, N).

    The score is the target confidence standardised under the OUT Gaussian, (c - mu) / sigma: the
    one-sided p-value 1 - Phi(score) orders records the same way, so the ROC is the same. With one
    shadow model a single Gaussian over all records is fitted; with fewer than
    :data:`PER_EXAMPLE_VARIANCE_FROM` the mean is per record and the variance pooled.
    """
    out = np.atleast_2d(np.asarray(out_confidence, dtype=np.float64))
    if out.shape[1] != len(target_confidence):
        raise ValueError(f"{out.shape[1]} shadow confidences per model for {len(target_confidence)} records")
    if out.shape[0] == 1:
        mean, std = out.mean(), out.std()
    elif out.shape[0] < PER_EXAMPLE_VARIANCE_FROM:
        mean, std = out.mean(axis=0), np.sqrt(out.var(axis=0, ddof=1).mean())
    else:
        mean, std = out.mean(axis=0), out.std(axis=0, ddof=1)
    return (np.asarray(target_confidence, dtype=np.float64) - mean) / np.maximum(std, _MIN_STD)


@dataclass
class AttackMetrics:
    """How well one attack separated members from non-members."""

    auc: float
    tpr_at: dict[float, float]  # false-positive rate -> best true-positive rate at or below it
    members: int
    non_members: int
    fpr: np.ndarray = field(repr=False)  # the ROC curve
    tpr: np.ndarray = field(repr=False)

    def as_dict(self) -> dict:
        return {"auc": self.auc, "tpr_at_fpr": {f"{k:g}": v for k, v in self.tpr_at.items()},
                "members": self.members, "non_members": self.non_members}


def evaluate_attack(scores: np.ndarray, is_member: np.ndarray, fprs: list[float] | tuple[float, ...]) -> AttackMetrics:
    """ROC-AUC, and TPR at each false-positive rate in `fprs`, of membership `scores`."""
    is_member = np.asarray(is_member, dtype=bool)
    if is_member.all() or not is_member.any():
        raise ValueError("membership evaluation needs both members and non-members")
    fpr, tpr, _ = roc_curve(is_member, scores)
    auc = float(roc_auc_score(is_member, scores))
    at = {float(level): tpr_at_fpr(fpr, tpr, level) for level in fprs}
    return AttackMetrics(auc, at, int(is_member.sum()), int((~is_member).sum()), fpr, tpr)


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, level: float) -> float:
    """The highest TPR on the ROC curve whose FPR does not exceed `level`."""
    allowed = fpr <= level + 1e-12
    return float(tpr[allowed].max()) if allowed.any() else 0.0
