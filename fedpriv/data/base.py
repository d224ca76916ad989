"""Containers for labelled images and the helpers every loader shares.

Every loader returns a :class:`MedicalImageDataset` whose splits are :class:`LabeledImages` with
float32 images in ``(N, C, H, W)`` layout, normalised with fixed constants. The constants are not
estimated from data on purpose: a mean or standard deviation computed over the pooled images would
leak statistics of one hospital's records into every other hospital's preprocessing, outside the
privacy accounting.

Every image also has a record id (:meth:`LabeledImages.ids`), the key under which the privacy
ledger charges each DP-SGD use to the records it was drawn from. By default it is a hash of the
image and its label (the same record gets the same id in every process); loaders that know a
record's identity better (a MedMNIST file's position, an image file's bytes) supply their own.

An image may also carry a patient id (:attr:`LabeledImages.patient_ids`, from an attributes CSV's
``patient_id`` column, an npz file's ``<split>_patient_ids`` array, or generated for synthetic data).
With ``privacy.unit=patient`` the ledger's record is the patient: every image of a patient shares the
patient's record (:meth:`LabeledImages.unit_ids`), and splits keep a patient's images together.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from fedpriv.errors import DataError

NORMALISATION_MEAN = 0.5
NORMALISATION_STD = 0.5

#: Environment variable naming the folder that holds MedMNIST npz files.
DATA_DIR_ENV = "FEDPRIV_DATA_DIR"

Indices = Sequence[int] | np.ndarray | torch.Tensor

#: Hashed first into every default record id; bump the version if the recipe ever changes, so old
#: and new ids can never be confused in a ledger.
RECORD_ID_PREFIX = b"fedpriv-record/v1\n"


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
    """Images with one integer label each (and optional per-image attributes and ids, same order).

    ``record_ids`` names each image's record for the privacy ledger; without it :meth:`ids` falls
    back to content ids (see :func:`content_record_ids`). ``patient_ids`` (optional, one non-empty
    string per image, repeated across a patient's images) says whose image it is.
    """

    images: torch.Tensor
    labels: torch.Tensor
    attributes: list[dict[str, str]] | None = None
    record_ids: np.ndarray | None = None
    patient_ids: np.ndarray | None = None
    # Content ids, computed on first use of ids() and handed on to subsets (hashing is the slow part).
    _content_ids: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

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
        if self.record_ids is not None:
            self.record_ids = check_record_ids(self.record_ids, len(self.images))
        if self.patient_ids is not None:
            self.patient_ids = check_patient_ids(self.patient_ids, len(self.images))

    def __len__(self) -> int:
        """Number of images."""
        return len(self.labels)

    def ids(self) -> np.ndarray:
        """One record id (str) per image, same order: ``record_ids`` if given, else content ids.

        The array is read-only: the ids are shared with subsets and must not drift from the images.
        """
        if self.record_ids is not None:
            return self.record_ids
        if self._content_ids is None:
            self._content_ids = content_record_ids(self.images, self.labels)
        return self._content_ids

    def subset(self, indices: Indices) -> LabeledImages:
        """The images at ``indices`` (in that order), with labels, attributes and ids kept aligned.

        With ``record_ids`` set, repeating an index raises ValueError: a record drawn twice would be
        used twice but charged once.
        """
        index = _as_index_tensor(indices)
        attributes = None
        if self.attributes is not None:
            attributes = [self.attributes[i] for i in index.tolist()]
        positions = index.numpy()
        record_ids = None if self.record_ids is None else self.record_ids[positions]
        patient_ids = None if self.patient_ids is None else self.patient_ids[positions]
        part = LabeledImages(self.images[index], self.labels[index], attributes, record_ids, patient_ids)
        if self._content_ids is not None:
            # Content ids depend only on image and label, so slicing equals recomputing, only faster.
            part._content_ids = _read_only(self._content_ids[positions])
        return part

    def patients(self, *, where: str = "this data") -> tuple[np.ndarray, np.ndarray]:
        """The distinct patient ids (sorted) and, per image, the index of its patient among them.

        Raises :class:`~fedpriv.errors.DataError` when the images carry no patient ids; ``where``
        names the data in that message.
        """
        if self.patient_ids is None:
            raise DataError(f"{where} has no patient ids, so privacy.unit=patient cannot protect patients: give "
                            "each image a patient id (image folder: a 'patient_id' column in dataset.attributes_csv; "
                            "npz: a <split>_patient_ids array; synthetic: dataset.images_per_patient=K), or use "
                            "privacy.unit=image (PneumoniaMNIST has no patient ids)")
        patients, index = np.unique(self.patient_ids, return_inverse=True)
        return _read_only(patients), index.reshape(-1)

    def unit_ids(self, unit: str) -> np.ndarray:
        """The ledger's record ids for the privacy unit: :meth:`ids` per image, or the distinct patient ids."""
        if unit == "image":
            return self.ids()
        if unit == "patient":
            return self.patients()[0]
        raise ValueError(f"unknown privacy unit {unit!r}; known: image, patient")

    def as_dataset(self) -> TensorDataset:
        """A ``TensorDataset`` yielding ``(image, label)`` pairs, ready for a DataLoader."""
        return TensorDataset(self.images, self.labels)


def content_record_ids(images: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """Default record ids: per image, hex of the first 16 bytes of a SHA-256 over its content.

    Hashed are :data:`RECORD_ID_PREFIX`, the image's ``(C, H, W)`` shape, its pixels as
    little-endian float32 and its label as a little-endian int64, so the id is the same in every
    process and on every machine, and changes with any pixel or the label. Identical
    (image, label) pairs get the same id: as far as content can tell they are one record.
    """
    pixels = np.ascontiguousarray(images.detach().cpu().numpy(), dtype="<f4")
    labels_le = np.ascontiguousarray(labels.detach().cpu().numpy(), dtype="<i8")
    if pixels.ndim != 4 or len(labels_le) != len(pixels):
        raise ValueError(f"content ids need (N, C, H, W) images and N labels, got shapes "
                         f"{pixels.shape} and {labels_le.shape}")
    header = RECORD_ID_PREFIX + f"shape={tuple(int(d) for d in pixels.shape[1:])}\n".encode()
    rows = pixels.reshape(len(pixels), -1)
    ids = []
    for row, label in zip(rows, labels_le):
        digest = hashlib.sha256(header)
        digest.update(row)  # a contiguous view: hashed without copying the pixels
        digest.update(label.tobytes())
        ids.append(digest.digest()[:16].hex())
    return _read_only(np.asarray(ids, dtype="<U32"))


def _one_string_per_image(values: Sequence[str] | np.ndarray, name: str, count: int, each: str) -> np.ndarray:
    """``values`` as a new 1-D str array of ``count`` entries; ValueError naming ``name`` otherwise.

    Always a copy, so the caller's array stays writable; an empty array is typed str too.
    """
    ids = np.asarray(values)
    if ids.dtype == object and all(isinstance(value, str) for value in ids.ravel()):
        ids = ids.astype(str)
    if ids.ndim != 1 or (ids.dtype.kind != "U" and len(ids) > 0):
        raise ValueError(f"{name} must be a 1-D array of str, got shape {ids.shape} and dtype {ids.dtype}")
    if len(ids) != count:
        raise ValueError(f"{len(ids)} {name} for {count} images; give exactly one {each} per image")
    return ids.astype(str)


def check_record_ids(record_ids: Sequence[str] | np.ndarray, count: int) -> np.ndarray:
    """``record_ids`` as a read-only 1-D str array; ValueError unless one unique, non-empty id per image."""
    ids = _one_string_per_image(record_ids, "record_ids", count, "id")
    empty = np.flatnonzero(np.char.str_len(np.char.strip(ids)) == 0)
    if len(empty):
        raise ValueError(f"record_ids must not be empty or blank; {len(empty)} are (first at position {empty[0]})")
    duplicates = duplicate_ids(ids)
    if duplicates:
        raise ValueError(f"record_ids must be unique (the privacy ledger charges each id as one record); "
                         f"repeated: {', '.join(map(repr, duplicates[:5]))}")
    return _read_only(ids)


def check_patient_ids(patient_ids: Sequence[str] | np.ndarray, count: int) -> np.ndarray:
    """``patient_ids`` as a read-only 1-D str array; ValueError unless one non-empty id per image (repeats allowed)."""
    # " P1" and "P1" are one patient: a CSV cell's spaces are not part of an id.
    ids = np.char.strip(_one_string_per_image(patient_ids, "patient_ids", count, "patient id"))
    empty = np.flatnonzero(np.char.str_len(ids) == 0)
    if len(empty):
        raise ValueError(f"patient_ids must not be empty or blank; {len(empty)} are (first at position {empty[0]})")
    return _read_only(ids)


def duplicate_ids(ids: np.ndarray) -> list[str]:
    """The ids that occur more than once in ``ids`` (sorted), empty when all are unique."""
    values, counts = np.unique(ids, return_counts=True)
    return values[counts > 1].tolist()


def number_repeats(ids: np.ndarray) -> tuple[np.ndarray, int]:
    """``ids`` made unique by suffixing ``#k`` to the k-th repeat (k >= 1) of an id; and how many were.

    For loaders whose data may hold identical records (the same scan saved twice): each copy is
    used by DP-SGD, so each must be charged as a record of its own. The first occurrence keeps the
    plain id, so adding a copy later leaves the existing records' ids (and spent budget) alone;
    which copy is the first does not matter, since the copies are indistinguishable.
    """
    seen: dict[str, int] = {}
    numbered = []
    for value in ids.tolist():
        count = seen.get(value, 0)
        seen[value] = count + 1
        numbered.append(value if count == 0 else f"{value}#{count}")
    repeats = len(numbered) - len(seen)
    return (np.asarray(numbered) if repeats else ids), repeats


def _read_only(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


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
        return int(self._shaped.images.shape[1])

    @property
    def image_size(self) -> int:
        """Side of the (square) images in pixels."""
        return int(self._shaped.images.shape[-1])

    @property
    def _shaped(self) -> LabeledImages:
        # A coordinator holds only test (and val) images, a hospital only train (and val): any split
        # tells the shape, every split has it even when empty.
        return self.train if len(self.train) else self.test if len(self.test) else self.val

    def describe(self) -> str:
        """One line saying what the data is; synthetic data is flagged in capitals."""
        classes = ", ".join(self.class_names)
        shape = f"{self.in_channels}x{self.image_size}x{self.image_size}"
        held = [(split, len(getattr(self, split))) for split in ("train", "val", "test")]
        if any(count == 0 for _, count in held):  # only some splits loaded: name those, not 0s
            counts = ", ".join(f"{count} {split}" for split, count in held if count) + " images"
        else:
            counts = f"{len(self.train)}/{len(self.val)}/{len(self.test)} train/val/test images"
        line = (
            f"{self.name}: {counts}, "
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
