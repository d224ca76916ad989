"""Gradient inversion: what an honest-but-curious server can rebuild from one hospital's update.

The attack follows "Inverting Gradients" (Geiping et al., NeurIPS 2020): starting from noise, it
optimises candidate images so that the gradient they produce points in the same direction as the
observed update (cosine distance over all parameters), with a total-variation prior that favours
piecewise-smooth images, signed-gradient Adam, a stepped learning-rate decay and a box constraint to
the valid pixel range. The attacker knows the model weights and, as is common in this literature,
the labels of the batch (for one image they can be read off the last layer's gradient anyway).

The observed update is either the plain mean gradient of a batch (no privacy) or a DP-SGD update:
per-sample gradients clipped to norm C, summed, plus Gaussian noise of std sigma * C, divided by the
batch size, exactly what Opacus's DPOptimizer computes for one logical batch.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from torch import nn
from torch.nn import functional as F

from fedpriv.data.base import NORMALISATION_MEAN, NORMALISATION_STD

log = logging.getLogger(__name__)

# The learning rate drops tenfold at these fractions of the run (Geiping et al.'s schedule).
_DECAY_AT = (3 / 8, 5 / 8, 7 / 8)


class InversionNet(nn.Module):
    """A small ReLU conv net with a linear head over the flattened feature map (~55k parameters).

    Three 5x5 convolutions (strides 2, 2, 1) and no pooling or normalisation: the head's gradient
    keeps the spatial layout of the features, so its updates are what gradient inversion feeds on.
    It stands in for a hospital model that is easy to invert; fedpriv's SmallCNN (GroupNorm, global
    average pooling) is harder for this attack, which is not a privacy guarantee.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 2, image_size: int = 28, width: int = 32) -> None:
        super().__init__()
        side = math.ceil(math.ceil(image_size / 2) / 2)  # two stride-2 convolutions with padding 2
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 5, stride=2, padding=2), nn.ReLU(),
            nn.Conv2d(width, width, 5, stride=2, padding=2), nn.ReLU(),
            nn.Conv2d(width, width, 5, stride=1, padding=2), nn.ReLU(),
        )
        self.head = nn.Linear(width * side * side, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images).flatten(1))


def _parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _gradient(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, create_graph: bool = False):
    loss = F.cross_entropy(model(images), labels)
    return torch.autograd.grad(loss, _parameters(model), create_graph=create_graph)


def client_update(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    noise_multiplier: float | None = None,
    max_grad_norm: float | None = None,
    generator: torch.Generator | None = None,
) -> list[torch.Tensor]:
    """The gradient a server reads off one local step on `images` (weight change divided by -lr).

    Without `noise_multiplier`: the plain mean gradient. With it: DP-SGD's
    ``(sum_i clip_C(g_i) + N(0, (sigma C)^2 I)) / B``; `noise_multiplier=0` is clipping alone.
    """
    model.eval()  # no dropout or batch statistics here, but be explicit: the server knows the weights
    if noise_multiplier is None:
        return [g.detach() for g in _gradient(model, images, labels)]
    if max_grad_norm is None or not max_grad_norm > 0:
        raise ValueError("a DP-SGD update needs max_grad_norm > 0")
    total = [torch.zeros_like(p) for p in _parameters(model)]
    for image, label in zip(images, labels):  # batches here are tiny: a loop is clearer than vmap
        per_sample = _gradient(model, image[None], label[None])
        norm = torch.sqrt(sum(g.pow(2).sum() for g in per_sample))
        scale = torch.clamp(max_grad_norm / (norm + 1e-6), max=1.0)  # Opacus's clipping factor
        total = [t + g.detach() * scale for t, g in zip(total, per_sample)]
    std = noise_multiplier * max_grad_norm
    noisy = [t + std * torch.randn(t.shape, generator=generator).to(t.device) for t in total]
    return [n / len(images) for n in noisy]


@dataclass
class Inversion:
    """The attacker's reconstructions and how well their gradient matched (1 - cosine similarity)."""

    images: torch.Tensor
    gradient_distance: float


def pixel_range() -> tuple[float, float]:
    """The model-input values of pixel intensities 0 and 1 (the attack's box constraint)."""
    return -NORMALISATION_MEAN / NORMALISATION_STD, (1 - NORMALISATION_MEAN) / NORMALISATION_STD


def invert_gradients(
    model: nn.Module,
    observed: list[torch.Tensor],
    labels: torch.Tensor,
    *,
    image_shape: tuple[int, ...],
    iterations: int = 300,
    lr: float = 0.1,
    tv_weight: float = 0.05,
    restarts: int = 1,
    seed: int = 0,
) -> Inversion:
    """Reconstruct a batch of `len(labels)` images of `image_shape` (C, H, W) from an observed update.

    Runs `restarts` independent optimisations and keeps the one whose gradient matches best (the
    attacker can compute that without knowing the images).
    """
    model.eval()
    observed = [o.detach() for o in observed]
    best: Inversion | None = None
    for restart in range(restarts):
        candidate = _optimise(model, observed, labels, (len(labels), *image_shape),
                              iterations=iterations, lr=lr, tv_weight=tv_weight, seed=seed + restart)
        if best is None or candidate.gradient_distance < best.gradient_distance:
            best = candidate
    return best


def _optimise(model, observed, labels, shape, *, iterations, lr, tv_weight, seed) -> Inversion:
    low, high = pixel_range()
    generator = torch.Generator().manual_seed(seed)
    guess = torch.randn(shape, generator=generator).clamp(low, high).to(labels.device).requires_grad_(True)
    optimizer = torch.optim.Adam([guess], lr=lr)
    milestones = sorted({max(1, int(iterations * f)) for f in _DECAY_AT})
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)
    observed_norm = torch.sqrt(sum(o.pow(2).sum() for o in observed))
    for _ in range(iterations):
        optimizer.zero_grad()
        distance = _cosine_distance(_gradient(model, guess, labels, create_graph=True), observed, observed_norm)
        (distance + tv_weight * total_variation(guess)).backward()
        guess.grad.sign_()  # signed gradients: Geiping et al. found them more robust here
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            guess.clamp_(low, high)
    final = _cosine_distance(_gradient(model, guess, labels), observed, observed_norm).item()
    return Inversion(guess.detach(), final)


def _cosine_distance(gradient, observed, observed_norm) -> torch.Tensor:
    """1 - cosine similarity of the two gradients, over all parameters taken as one vector."""
    dot = sum((g * o).sum() for g, o in zip(gradient, observed))
    norm = torch.sqrt(sum(g.pow(2).sum() for g in gradient))
    return 1 - dot / (norm * observed_norm + 1e-12)


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbouring pixels (anisotropic total variation)."""
    vertical = (images[..., 1:, :] - images[..., :-1, :]).abs().mean()
    horizontal = (images[..., :, 1:] - images[..., :, :-1]).abs().mean()
    return vertical + horizontal


@dataclass
class ImageScore:
    """How close one reconstruction came to the true image it was paired with."""

    reconstruction: int  # index in the attacker's batch
    original: int  # the true image it is paired with (best one-to-one matching on SSIM)
    best_match: int  # the true image it resembles most (SSIM), which the pairing may not give it
    mse: float  # on pixel intensities in [0, 1]
    psnr: float  # dB, data range 1
    ssim: float


def to_unit(images: torch.Tensor) -> np.ndarray:
    """Model inputs back to pixel intensities in [0, 1], as a numpy array (N, C, H, W)."""
    unit = images.detach().cpu().numpy() * NORMALISATION_STD + NORMALISATION_MEAN
    return np.clip(unit, 0.0, 1.0)


def score_reconstructions(reconstructions: torch.Tensor, originals: torch.Tensor) -> list[ImageScore]:
    """MSE, PSNR and SSIM of each reconstruction against its true image.

    A batch's reconstructions come out in no guaranteed order (images with the same label are
    interchangeable for the attacker), so each is paired with a true image by the one-to-one
    matching that maximises total SSIM (Hungarian algorithm); `best_match` is reported as well.
    """
    recon, truth = to_unit(reconstructions), to_unit(originals)
    similarity = np.array([[_ssim(r, t) for t in truth] for r in recon])
    rows, cols = linear_sum_assignment(-similarity)
    scores = []
    for row, col in zip(rows, cols):
        mse = float(np.mean((recon[row] - truth[col]) ** 2))
        psnr = float(peak_signal_noise_ratio(truth[col], recon[row], data_range=1.0)) if mse > 0 else math.inf
        scores.append(ImageScore(int(row), int(col), int(similarity[row].argmax()), mse, psnr,
                                 float(similarity[row, col])))
    return scores


def _ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two (C, H, W) images in [0, 1]; the window shrinks for images smaller than 7 pixels."""
    side = min(a.shape[-2:])
    window = min(7, side if side % 2 else side - 1)
    return float(structural_similarity(a, b, data_range=1.0, channel_axis=0, win_size=window))
