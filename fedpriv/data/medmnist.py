"""Loading MedMNIST 2D datasets from their official npz files, with their official splits.

The file is read with ``numpy.load(allow_pickle=False)`` and checked key by key before use, so a
truncated, replaced or mislabelled file fails with a one-line :class:`DataError` instead of a
shape error deep inside training. Nothing is downloaded unless ``download`` is true, and then
only when the file is absent (medmnist re-checks the MD5 of an existing file on every download
call, which would reject legitimately re-ordered copies).

Record ids (what the privacy ledger charges) come in two kinds. ``"index"`` names a record by its
place in the official file, ``{flag}/{split}/{index}``: the official files list the same records in
the same order at every size, so switching ``dataset.size`` does not hand the records a fresh
budget. ``"content"`` (deployed hospitals, whose files may be re-ordered or grow) hashes each image
and label, or takes the ids stored in the file as ``<split>_ids``.

A file may also hold ``<split>_patient_ids`` (one string per image, repeated across a patient's
images) for ``privacy.unit=patient``. The official MedMNIST files, PneumoniaMNIST included, have no
patient ids: MedMNIST does not release which images belong to one patient.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import pickle
import sys
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedpriv.data.base import (
    DATA_DIR_ENV,
    LabeledImages,
    MedicalImageDataset,
    check_patient_ids,
    check_record_ids,
    default_data_dir,
    normalise,
    number_repeats,
)
from fedpriv.errors import DataError

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
SIZES = (28, 64, 128, 224)
RECORD_ID_KINDS = ("index", "content")
_FIX = "re-download or replace the file"


def npz_filename(flag: str, size: int) -> str:
    """MedMNIST's file name: ``{flag}.npz`` at 28 pixels, ``{flag}_{size}.npz`` otherwise."""
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


def load_medmnist(
    flag: str, size: int, root: str | None, download: bool, *, record_ids: str = "index",
    required: tuple[str, ...] = SPLITS, optional: tuple[str, ...] = (),
) -> MedicalImageDataset:
    """Load the MedMNIST 2D dataset ``flag`` at ``size`` pixels from ``root`` (or the default folder).

    ``record_ids`` picks the records' ids: ``"index"`` (official files) gives ``{flag}/{split}/{i}``,
    the same at every size; ``"content"`` (a hospital's own file) uses the file's ``<split>_ids``
    array when present, else content ids. Raises :class:`DataError` when the file is missing (and
    ``download`` is false), unreadable or malformed, when its ids are unusable, or when the flag is
    unknown, 3D or multi-label.

    ``required`` splits must be in the file; ``optional`` ones are read when present; any other split
    is never read, and every split not read is empty (a hospital needs no ``test`` arrays, the
    coordinator no ``train`` arrays).
    """
    if record_ids not in RECORD_ID_KINDS:
        raise ValueError(f"record_ids must be one of {', '.join(map(repr, RECORD_ID_KINDS))}, got {record_ids!r}")
    info = _flag_info(flag, size)
    folder = Path(root).expanduser() if root else default_data_dir()
    file = folder / npz_filename(flag, size)
    if not file.is_file():
        if not download:
            raise DataError(_missing_message(file))
        _download(flag, size, folder, info)
    splits = _read_npz(file, info, size, flag, record_ids, required, optional)
    class_names = [info["label"][key] for key in sorted(info["label"], key=int)]
    dataset = MedicalImageDataset(
        name=flag, train=splits["train"], val=splits["val"], test=splits["test"],
        class_names=class_names, synthetic=False, source=str(file),
    )
    logger.info("Loaded %s", dataset.describe())
    return dataset


@functools.cache
def medmnist_info() -> dict[str, dict[str, Any]]:
    """medmnist's table of datasets (``INFO``: task, labels, channels per flag), read from its info module alone.

    ``import medmnist`` runs the package's ``__init__``, which loads scikit-learn, torchvision and
    PIL: about 2 s of start-up in every process that only needs the table (the CLI, the ServerApp,
    each hospital). ``medmnist/info.py`` imports nothing of medmnist's, so it is loaded by itself;
    the package is imported only to download a file.
    """
    if "medmnist" in sys.modules:  # already paid for: use the package's own table
        return sys.modules["medmnist"].INFO
    package = importlib.util.find_spec("medmnist")  # finds the package without running its __init__
    if package is None or not package.submodule_search_locations:
        raise DataError("the medmnist package is not installed; reinstall fedpriv (pip install -e .)")
    path = Path(next(iter(package.submodule_search_locations))) / "info.py"
    spec = importlib.util.spec_from_file_location("fedpriv._medmnist_info", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.INFO


def medmnist_2d_flags() -> tuple[str, ...]:
    """The MedMNIST 2D dataset flags (the 3D ones are left out)."""
    return tuple(flag for flag in medmnist_info() if not flag.endswith("3d"))


def _flag_info(flag: str, size: int) -> dict[str, Any]:
    INFO = medmnist_info()  # noqa: N806 - medmnist's own name for the table
    if flag not in INFO or flag.endswith("3d"):
        known = ", ".join(f for f in INFO if not f.endswith("3d"))
        raise DataError(f"unknown MedMNIST 2D dataset {flag!r}; known: {known}")
    info = INFO[flag]
    if "multi-label" in info["task"]:
        raise DataError(f"{flag} is a multi-label task, which fedpriv does not support; "
                        "use a single-label flag such as pneumoniamnist")
    if size not in SIZES:
        raise DataError(f"MedMNIST ships {flag} at sizes {', '.join(map(str, SIZES))} only, not {size}")
    return info


def _missing_message(file: Path) -> str:
    return (
        f"MedMNIST file not found: {file}. Set dataset.root (or the {DATA_DIR_ENV} environment "
        f"variable) to a folder holding {file.name}, or set dataset.download=true to let medmnist "
        f"fetch it (needs internet)"
    )


def _download(flag: str, size: int, folder: Path, info: dict[str, Any]) -> None:
    import medmnist

    logger.info("Downloading %s (size %d) into %s", flag, size, folder)
    folder.mkdir(parents=True, exist_ok=True)
    dataset_class = getattr(medmnist, info["python_class"])
    try:
        dataset_class(split="train", root=str(folder), size=size, download=True)
    except Exception as exc:  # medmnist wraps every failure in a bare RuntimeError; keep its cause
        first_line = next((line.strip() for line in str(exc).splitlines() if line.strip()), repr(exc))
        raise DataError(
            f"could not download {npz_filename(flag, size)} into {folder}: {first_line}. Without "
            f"internet, copy the file there yourself and set dataset.root or {DATA_DIR_ENV}"
        ) from exc


def _read_npz(file: Path, info: dict[str, Any], size: int, flag: str, record_ids: str,
              required: tuple[str, ...] = SPLITS, optional: tuple[str, ...] = ()) -> dict[str, LabeledImages]:
    try:
        archive = np.load(file, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):  # a bare .npy array under an .npz name
            raise DataError(f"{file} is not a valid npz archive (it holds a single array); {_FIX}")
        with archive:  # members are read lazily, so corruption inside the zip surfaces here too
            present = [split for split in optional if f"{split}_images" in archive.files]
            splits = {split: _read_split(file, archive, split, info, size, flag, record_ids)
                      for split in (*required, *present)}
        some = next(iter(splits.values()))
        return {split: splits[split] if split in splits else some.subset([]) for split in SPLITS}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, pickle.UnpicklingError) as exc:
        raise DataError(f"{file} is not a valid npz archive ({type(exc).__name__}: {exc}); {_FIX}") from exc


def _read_split(
    file: Path, archive: Any, split: str, info: dict[str, Any], size: int, flag: str, record_ids: str
) -> LabeledImages:
    for key in (f"{split}_images", f"{split}_labels"):
        if key not in archive.files:
            raise DataError(f"{file} lacks the key {key!r} (has: {', '.join(archive.files)}); {_FIX}")
    images = archive[f"{split}_images"]
    labels = archive[f"{split}_labels"]
    _check_images(file, split, images, int(info["n_channels"]), size)
    labels = _check_labels(file, split, labels, len(images), {int(k) for k in info["label"]})
    tensor = torch.from_numpy(np.ascontiguousarray(images))
    # MedMNIST stores greyscale as (N, H, W) and RGB as (N, H, W, 3); models want (N, C, H, W).
    tensor = tensor.unsqueeze(1) if tensor.ndim == 3 else tensor.permute(0, 3, 1, 2)
    pixels, targets = normalise(tensor).contiguous(), torch.from_numpy(labels)
    records = _read_records(file, archive, split, flag, record_ids, pixels, targets)
    key = f"{split}_patient_ids"
    if key in archive.files:
        patients = archive[key]
        if patients.ndim != 1 or patients.dtype.kind != "U":
            raise DataError(f"{file}: {key} has shape {patients.shape} and dtype {patients.dtype}, expected "
                            f"({len(images)},) strings (one patient id per image); fix or remove {key}")
        try:
            records.patient_ids = check_patient_ids(patients, len(images))
        except ValueError as exc:
            raise DataError(f"{file}: {key} is unusable: {exc}; fix or remove {key}") from exc
    return records


def _read_records(file: Path, archive: Any, split: str, flag: str, record_ids: str, pixels: torch.Tensor,
                  targets: torch.Tensor) -> LabeledImages:
    """The split's images with their record ids (see the module docstring)."""
    images = pixels
    if record_ids == "index":
        # Position in the official file: equal at every size, so a new size is not a fresh budget.
        ids = np.asarray([f"{flag}/{split}/{i}" for i in range(len(images))])
        return LabeledImages(pixels, targets, record_ids=ids)
    if f"{split}_ids" in archive.files:
        return LabeledImages(pixels, targets, record_ids=_stored_ids(file, f"{split}_ids", archive[f"{split}_ids"],
                                                                     len(images)))
    records = LabeledImages(pixels, targets)
    ids, repeats = number_repeats(records.ids())
    if repeats:
        # Identical (image, label) records share a content id, yet DP-SGD uses every copy: number them.
        logger.warning("%s: %d %s images repeat an earlier image with the same label; each copy is charged "
                       "as a record of its own (store %s_ids to name them yourself)", file, repeats, split, split)
        records = LabeledImages(pixels, targets, record_ids=ids)
    return records


def _stored_ids(file: Path, key: str, ids: np.ndarray, count: int) -> np.ndarray:
    """The file's own record ids under ``key``, checked: one unique, non-empty string per image."""
    if ids.ndim != 1 or ids.dtype.kind != "U":
        raise DataError(f"{file}: {key} has shape {ids.shape} and dtype {ids.dtype}, expected ({count},) "
                        f"strings (one record id per image); fix or remove {key}")
    try:
        return check_record_ids(ids, count)
    except ValueError as exc:
        raise DataError(f"{file}: {key} is unusable: {exc}; fix or remove {key}") from exc


def _check_images(file: Path, split: str, images: np.ndarray, channels: int, size: int) -> None:
    expected = (size, size) if channels == 1 else (size, size, 3)
    if images.dtype != np.uint8 or images.ndim != 1 + len(expected) or images.shape[1:] != expected:
        raise DataError(
            f"{file}: {split}_images has shape {images.shape} and dtype {images.dtype}, expected "
            f"(N, {', '.join(map(str, expected))}) uint8; {_FIX}"
        )
    if len(images) == 0:
        raise DataError(f"{file}: {split}_images is empty; {_FIX}")


def _check_labels(file: Path, split: str, labels: np.ndarray, count: int, allowed: set[int]) -> np.ndarray:
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{file}: {split}_labels has shape {labels.shape} and dtype {labels.dtype}, "
                        f"expected (N, 1) or (N,) integers; {_FIX}")
    if len(labels) != count:
        raise DataError(f"{file}: {split}_labels has {len(labels)} entries for {count} images; {_FIX}")
    unknown = sorted(set(np.unique(labels).tolist()) - allowed)
    if unknown:
        raise DataError(f"{file}: {split}_labels contains {unknown[:5]}, outside the dataset's labels "
                        f"{sorted(allowed)}; {_FIX}")
    return labels.astype(np.int64)
