"""Containers for labelled images and the helpers every loader shares.

Every loader returns a :class:`MedicalImageDataset` whose splits are :class:`LabeledImages` with
float32 images in ``(N, C, H, W)`` layout, normalised with fixed constants. The constants are not
estimated from data on purpose: a mean or standard deviation computed over the pooled images would
leak statistics of one hospital's records into every other hospital's preprocessing, outside the
privacy accounting.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

NORMALISATION_MEAN = 0.5
NORMALISATION_STD = 0.5

#: Environment variable naming the folder that holds MedMNIST npz files.
DATA_DIR_ENV = "FEDPRIV_DATA_DIR"

Indices = Sequence[int] | np.ndarray | torch.Tensor


def normalise(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Map pixel values to the model's input scale: ``(x / 255 - mean) / std`` as float32.

    ``images`` is either uint8 (0..255) or floating point already scaled to [0, 1]; any shape is
    accepted and kept (layout is the caller's business). With the fixed constants 0.5/0.5, pixel
    0 becomes -1.0 and pixel 255 becomes 1.0.
    """
    tensor = torch.as_tensor(images)
    if tensor.dtype == torch.uint8:
        unit = tensor.to(torch.float32) / 255.0
    elif tensor.is_floating_point():
        unit = tensor.to(torch.float32)
    else:
        raise TypeError(f"normalise expects uint8 or float images in [0, 1], got {tensor.dtype}")
    return (unit - NORMALISATION_MEAN) / NORMALISATION_STD


def _as_index_tensor(indices: Indices) -> torch.Tensor:
    index = torch.as_tensor(np.asarray(indices), dtype=torch.long)
    if index.ndim != 1:
        raise ValueError(f"indices must be one-dimensional, got shape {tuple(index.shape)}")
    return index


@dataclass
class LabeledImages:
    """Images with one integer label each (and optional per-image attributes, same order)."""

    images: torch.Tensor
    labels: torch.Tensor
    attributes: list[dict[str, str]] | None = None

    def __post_init__(self) -> None:
        # Fail at construction: a misaligned split would silently train on the wrong labels.
        if self.images.ndim != 4:
            raise ValueError(f"images must be (N, C, H, W), got shape {tuple(self.images.shape)}")
        if self.labels.ndim != 1 or len(self.labels) != len(self.images):
            raise ValueError(
                f"labels must be (N,) with N={len(self.images)}, got shape {tuple(self.labels.shape)}"
            )
        if self.attributes is not None and len(self.attributes) != len(self.images):
            raise ValueError(f"{len(self.attributes)} attribute rows for {len(self.images)} images")

    def __len__(self) -> int:
        """Number of images."""
        return len(self.labels)

    def subset(self, indices: Indices) -> LabeledImages:
        """The images at ``indices`` (in that order), with labels and attributes kept aligned."""
        index = _as_index_tensor(indices)
        attributes = None
        if self.attributes is not None:
            attributes = [self.attributes[i] for i in index.tolist()]
        return LabeledImages(self.images[index], self.labels[index], attributes)

    def as_dataset(self) -> TensorDataset:
        """A ``TensorDataset`` yielding ``(image, label)`` pairs, ready for a DataLoader."""
        return TensorDataset(self.images, self.labels)


@dataclass
class MedicalImageDataset:
    """A dataset split into train/val/test, with its class names and where it came from."""

    name: str
    train: LabeledImages
    val: LabeledImages
    test: LabeledImages
    class_names: list[str]
    synthetic: bool
    source: str

    @property
    def num_classes(self) -> int:
        """Number of classes (labels are 0 .. num_classes - 1)."""
        return len(self.class_names)

    @property
    def in_channels(self) -> int:
        """Channels per image (1 for greyscale, 3 for RGB)."""
        return int(self.train.images.shape[1])

    @property
    def image_size(self) -> int:
        """Side of the (square) images in pixels."""
        return int(self.train.images.shape[-1])

    def describe(self) -> str:
        """One line saying what the data is; synthetic data is flagged in capitals."""
        classes = ", ".join(self.class_names)
        shape = f"{self.in_channels}x{self.image_size}x{self.image_size}"
        line = (
            f"{self.name}: {len(self.train)}/{len(self.val)}/{len(self.test)} train/val/test images, "
            f"{shape}, {self.num_classes} classes ({classes}), from {self.source}"
        )
        if self.synthetic:
            # Loud on purpose: results on generated images must never pass for clinical results.
            return f"SYNTHETIC data (not patient images) - {line}"
        return line


def dataset_fingerprint(images: LabeledImages) -> str:
    """SHA-256 (hex) of the image bytes and labels, identical in every process for equal data.

    A hospital's privacy ledger is keyed by this value, so the budget spent on a set of records
    follows those records rather than a file name. Shapes are hashed too, so a reshape counts as
    other data; byte order is pinned to little-endian so the value does not depend on the machine.
    """
    pixels = np.ascontiguousarray(images.images.detach().cpu().numpy(), dtype="<f4")
    labels = np.ascontiguousarray(images.labels.detach().cpu().numpy(), dtype="<i8")
    digest = hashlib.sha256()
    digest.update(f"images{pixels.shape};labels{labels.shape};".encode())
    digest.update(pixels.tobytes())
    digest.update(labels.tobytes())
    return digest.hexdigest()


def default_data_dir() -> Path:
    """Folder searched for MedMNIST files: ``$FEDPRIV_DATA_DIR`` if set, else ``~/.cache/fedpriv/medmnist``."""
    configured = os.environ.get(DATA_DIR_ENV, "").strip()
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "fedpriv" / "medmnist"
