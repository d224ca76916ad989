"""Generated chest-X-ray-like images for tests, demos and benchmarks without patient data.

Each image shows a dark background, a thorax and two bright, smooth lung-shaped fields, with
per-image jitter in position, size and exposure plus pixel noise. Class 1 ("opacity") adds a smooth
bright blob at a random place inside one lung field: a localised signal that a small CNN learns in
a few epochs, while the jitter keeps the task from being trivial. Everything is vectorised numpy
and deterministic by seed.

With ``images_per_patient=K`` the images belong to generated patients of 1..K images each (drawn
uniformly): a patient's images share its label and its anatomy (the position and size of the thorax),
and each has its own exposure, noise and, for "opacity", blob. Splits then keep patients whole.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from fedpriv.data.base import LabeledImages, MedicalImageDataset, normalise
from fedpriv.data.splits import check_fractions, stratified_split
from fedpriv.errors import DataError

logger = logging.getLogger(__name__)

CLASS_NAMES = ["normal", "opacity"]
# Images are generated in chunks so memory stays bounded at large sizes (e.g. 224 x 224).
_CHUNK = 256


def make_synthetic(
    num_samples: int, size: int, seed: int, val_fraction: float, test_fraction: float,
    images_per_patient: int | None = None,
) -> MedicalImageDataset:
    """``num_samples`` greyscale ``size x size`` images, half 'normal' and half 'opacity', split stratified.

    The same arguments give the same images, labels, splits and record ids (content ids) in every
    process. ``images_per_patient=K`` groups them into patients of 1..K images (see the module
    docstring); None (the default) gives no patient ids and exactly the images it always gave.
    """
    check_fractions(val_fraction, test_fraction)
    if num_samples < 2 or size < 8:
        raise DataError(f"synthetic data needs at least 2 images of at least 8 pixels, got "
                        f"num_samples={num_samples}, size={size}")
    if images_per_patient is not None:
        return _make_patients(num_samples, size, seed, val_fraction, test_fraction, images_per_patient)
    rng = np.random.default_rng(seed)
    # Alternating labels, shuffled: exactly balanced (to within one image) whatever the seed.
    labels = rng.permutation(np.arange(num_samples) % 2).astype(np.int64)
    pixels = np.concatenate([
        _render(labels[start:start + _CHUNK], size, rng) for start in range(0, num_samples, _CHUNK)
    ])
    everything = LabeledImages(normalise(torch.from_numpy(pixels).unsqueeze(1)), torch.from_numpy(labels))
    return _split(everything, labels, seed, val_fraction, test_fraction, source=f"synthetic (generated, seed={seed})")


def _make_patients(num_samples: int, size: int, seed: int, val_fraction: float, test_fraction: float,
                   images_per_patient: int) -> MedicalImageDataset:
    """Synthetic images of generated patients with 1..``images_per_patient`` images each, split by patient."""
    if images_per_patient < 1:
        raise DataError(f"dataset.images_per_patient must be at least 1, got {images_per_patient}")
    rng = np.random.default_rng([seed, images_per_patient])
    counts: list[int] = []
    while sum(counts) < num_samples:
        counts.append(int(rng.integers(1, images_per_patient + 1)))
    counts[-1] -= sum(counts) - num_samples  # the last patient takes what is left: exactly num_samples images
    patients = len(counts)
    patient_labels = rng.permutation(np.arange(patients) % 2).astype(np.int64)
    owner = np.repeat(np.arange(patients), counts)
    labels = patient_labels[owner]
    anatomy = rng.uniform([-0.06, -0.06, 0.9], [0.06, 0.06, 1.1], size=(patients, 3)).astype(np.float32)[owner]
    pixels = np.concatenate([
        _render(labels[start:start + _CHUNK], size, rng, anatomy[start:start + _CHUNK])
        for start in range(0, num_samples, _CHUNK)
    ])
    width = len(str(patients - 1))
    patient_ids = np.asarray([f"synthetic-patient-{p:0{width}d}" for p in owner])
    everything = LabeledImages(normalise(torch.from_numpy(pixels).unsqueeze(1)), torch.from_numpy(labels),
                               patient_ids=patient_ids)
    return _split(everything, labels, seed, val_fraction, test_fraction, groups=patient_ids,
                  source=f"synthetic (generated, seed={seed}, {patients} patients of 1-{images_per_patient} images)")


def _split(everything: LabeledImages, labels: np.ndarray, seed: int, val_fraction: float, test_fraction: float,
           *, source: str, groups: np.ndarray | None = None) -> MedicalImageDataset:
    """The generated images split into train/val/test (stratified; by ``groups`` when given)."""
    everything.ids()  # content ids, hashed once here and handed on to train/val/test by subset()
    train, val, test = stratified_split(labels, val_fraction, test_fraction, seed, groups=groups,
                                        where=f"the synthetic dataset (num_samples={len(labels)})")
    dataset = MedicalImageDataset(
        name="synthetic", train=everything.subset(train), val=everything.subset(val),
        test=everything.subset(test), class_names=list(CLASS_NAMES), synthetic=True, source=source,
    )
    logger.info("Generated %s", dataset.describe())
    return dataset


def _render(labels: np.ndarray, size: int, rng: np.random.Generator,
            anatomy: np.ndarray | None = None) -> np.ndarray:
    """uint8 images ``(len(labels), size, size)``; coordinates run over [-1, 1] in both axes.

    ``anatomy`` (per image: x shift, y shift, scale) fixes the thorax's place and size (a patient's
    images share it); None draws it per image.
    """
    n = len(labels)
    axis = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    y, x = axis[None, :, None], axis[None, None, :]

    def draw(low: float, high: float) -> np.ndarray:
        return rng.uniform(low, high, size=(n, 1, 1)).astype(np.float32)

    if anatomy is None:
        shift_x, shift_y, scale = draw(-0.06, 0.06), draw(-0.06, 0.06), draw(0.9, 1.1)
    else:
        shift_x, shift_y, scale = (anatomy[:, i, None, None] for i in range(3))
    thorax = _soft_ellipse(x - shift_x, y - shift_y, 0.85 * scale, 0.9 * scale)
    left = _soft_ellipse(x - shift_x + 0.38 * scale, y - shift_y, 0.27 * scale, 0.6 * scale)
    right = _soft_ellipse(x - shift_x - 0.38 * scale, y - shift_y, 0.27 * scale, 0.6 * scale)
    image = 0.08 + 0.2 * thorax + draw(0.3, 0.45) * (left + right)

    # The blob sits inside one lung: pick a side, then a point within the inner part of that field.
    side = np.where(rng.random((n, 1, 1)) < 0.5, -0.38, 0.38).astype(np.float32)
    blob_x = shift_x + scale * (side + draw(-0.12, 0.12))
    blob_y = shift_y + scale * draw(-0.35, 0.35)
    radius = draw(0.2, 0.35)  # large enough to survive the global average pooling of a small CNN
    blob = np.exp(-((x - blob_x) ** 2 + (y - blob_y) ** 2) / (2 * radius**2))
    image += labels[:, None, None].astype(np.float32) * draw(0.35, 0.5) * blob * (left + right)

    image = image * draw(0.85, 1.15) + rng.normal(0.0, 0.04, size=image.shape).astype(np.float32)
    return np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)


def _soft_ellipse(dx: np.ndarray, dy: np.ndarray, rx: np.ndarray | float, ry: np.ndarray | float) -> np.ndarray:
    """About 1 inside the ellipse and 0 outside, with a smooth edge (no aliasing at small sizes)."""
    distance = (dx / rx) ** 2 + (dy / ry) ** 2
    # Clipped exponent: far corners would overflow float32 for no visible difference.
    return 1.0 / (1.0 + np.exp(np.minimum((distance - 1.0) * 8.0, 60.0)))
