"""Loading a hospital's own images from a folder with one subfolder per class.

PNG/JPEG files are read with Pillow and DICOM files with pydicom; every image becomes a greyscale
``size x size`` picture. DICOM values are first mapped to modality units (RescaleSlope/Intercept),
MONOCHROME1 images are inverted so bright means dense everywhere, and each image is min-max scaled
to 0..255 on its own, because raw DICOM ranges differ between scanners and vendors. Optional
per-image attributes (e.g. sex, age band, scanner) come from a CSV and stay aligned with the images
through every split. A ``patient_id`` column in that CSV names each image's patient: the splits then
keep a patient's images together, and ``privacy.unit=patient`` protects patients (it is taken out of
the attributes, so subgroup reports never group by patient).

Each image's record id (what the privacy ledger charges) is a hash of the original file's bytes and
its class name (:func:`file_record_id`), so it stays the same at every ``dataset.size``, when other
files are added, and however the folder is split.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image

from fedpriv.data.base import LabeledImages, MedicalImageDataset, normalise, number_repeats
from fedpriv.data.splits import check_fractions, stratified_split
from fedpriv.errors import DataError

logger = logging.getLogger(__name__)

PILLOW_EXTENSIONS = (".png", ".jpg", ".jpeg")
DICOM_EXTENSIONS = (".dcm",)
EXTENSIONS = PILLOW_EXTENSIONS + DICOM_EXTENSIONS
# Pillow modes holding more than 8 bits per pixel: converting them to "L" would clip, not scale.
_WIDE_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
#: Hashed first into every image file's record id (versioned, like the default content ids).
FILE_RECORD_ID_PREFIX = b"fedpriv-file/v1\n"


def load_image_folder(
    path: str,
    size: int,
    *,
    attributes_csv: str | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> MedicalImageDataset:
    """Load ``path/<class>/**/<image>`` as a dataset split stratified by class (deterministic by seed).

    Class names are the sorted subfolder names. Raises :class:`DataError` for a missing folder, no
    images, a single class, an unreadable image, a bad attributes CSV, or too few images to split.
    """
    check_fractions(val_fraction, test_fraction)
    everything = load_image_records(path, size, attributes_csv=attributes_csv)
    root = Path(path).expanduser()
    labels = everything.train.labels.numpy()
    train, val, test = stratified_split(labels, val_fraction, test_fraction, seed, where=f"image folder {root}",
                                        groups=everything.train.patient_ids)
    dataset = MedicalImageDataset(
        name="imagefolder", train=everything.train.subset(train), val=everything.train.subset(val),
        test=everything.train.subset(test), class_names=everything.class_names, synthetic=False, source=str(root),
    )
    logger.info("Loaded %s", dataset.describe())
    return dataset


def load_image_records(path: str, size: int, *, attributes_csv: str | None = None) -> MedicalImageDataset:
    """Every image of ``path/<class>/**/<image>`` as the train split, val and test empty (no split made).

    What a deployed hospital loads: it decides itself what, if anything, to hold out.
    """
    root = Path(path).expanduser()
    class_names, files, labels = _scan(root)
    pictures, ids = [], []
    for file, label in zip(files, labels.tolist()):
        content = _read_bytes(file)  # read once: decoded for the pixels, hashed for the record id
        pictures.append(read_image(file, size, content=content))
        ids.append(file_record_id(content, class_names[label]))
    images = np.stack(pictures)
    relative = [file.relative_to(root).as_posix() for file in files]
    attributes = _attributes_for(root, attributes_csv, relative) if attributes_csv else None
    patient_ids = _patient_ids(attributes, relative, attributes_csv) if attributes is not None else None
    record_ids, repeats = number_repeats(np.asarray(ids))
    if repeats:
        # A file copied within its class folder is used twice by DP-SGD, so each copy is its own record.
        logger.warning("%d image files in %s repeat another file of their class byte for byte; each copy is "
                       "charged as a record of its own (remove the copies if they are the same scan)",
                       repeats, root)
    everything = LabeledImages(normalise(torch.from_numpy(images).unsqueeze(1)),
                               torch.from_numpy(labels), attributes, record_ids, patient_ids)
    return MedicalImageDataset(name="imagefolder", train=everything, val=everything.subset([]),
                               test=everything.subset([]), class_names=class_names, synthetic=False, source=str(root))


def _scan(root: Path) -> tuple[list[str], list[Path], np.ndarray]:
    """Class names, image files (sorted, so the order is reproducible) and their labels."""
    if not root.is_dir():
        raise DataError(f"image folder not found: {root} (set dataset.path to a folder with one "
                        f"subfolder per class)")
    readable = ", ".join(EXTENSIONS)
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{root} has no class subfolders; expected one subfolder per class holding "
                        f"{readable} files")
    files: list[Path] = []
    labels: list[int] = []
    for label, class_dir in enumerate(class_dirs):
        found = _image_files(class_dir)
        if not found:
            raise DataError(f"class folder {class_dir} holds no images (read: {readable}); add images "
                            f"or remove the folder")
        files += found
        labels += [label] * len(found)
    if len(class_dirs) < 2:
        raise DataError(f"{root} has a single class folder ({class_dirs[0].name}); a classifier needs "
                        f"at least two classes, one subfolder each")
    return [d.name for d in class_dirs], files, np.asarray(labels, dtype=np.int64)


def _image_files(folder: Path) -> list[Path]:
    # Nested folders (e.g. one per patient) are allowed; hidden files such as .DS_Store are not images.
    return sorted(
        f for f in folder.rglob("*")
        if f.is_file() and f.suffix.lower() in EXTENSIONS
        and not any(part.startswith(".") for part in f.relative_to(folder).parts)
    )


def file_record_id(content: bytes, class_name: str) -> str:
    """Record id of an image file: first 32 hex digits of a SHA-256 over its class and original bytes.

    The class name (length-prefixed, so no two (class, bytes) pairs hash the same input) rather
    than its label number: adding a class folder renumbers the labels but must not rename records.
    """
    name = class_name.encode()
    digest = hashlib.sha256(FILE_RECORD_ID_PREFIX + f"class={len(name)}:".encode() + name + b"\n")
    digest.update(content)
    return digest.hexdigest()[:32]


def _read_bytes(file: Path) -> bytes:
    try:
        return file.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read image {file}: {exc}. Fix its permissions or remove the file") from exc


def read_image(file: Path, size: int, *, content: bytes | None = None) -> np.ndarray:
    """One image file as a ``(size, size)`` uint8 greyscale array; :class:`DataError` if unreadable.

    ``content`` is the file's bytes when the caller has read them already (decoded instead of
    opening ``file`` again; ``file`` still picks the decoder by suffix and names it in errors).
    """
    source: Path | io.BytesIO = file if content is None else io.BytesIO(content)
    try:
        if file.suffix.lower() in DICOM_EXTENSIONS:
            picture = Image.fromarray(_dicom_to_uint8(source, file))
        else:
            picture = _pillow_greyscale(source)
        picture = picture.resize((size, size), Image.Resampling.BILINEAR)
    except DataError:
        raise
    except Exception as exc:  # any decoder failure means this file cannot be used; say which one
        raise DataError(f"cannot read image {file}: {type(exc).__name__}: {exc}. Fix or remove the file") from exc
    return np.asarray(picture, dtype=np.uint8)


def _pillow_greyscale(source: Path | io.BytesIO) -> Image.Image:
    with Image.open(source) as opened:
        opened.load()
        if opened.mode in _WIDE_MODES:
            return Image.fromarray(_min_max_uint8(np.asarray(opened, dtype=np.float64)))
        return opened.convert("L")


def _dicom_to_uint8(source: Path | io.BytesIO, file: Path) -> np.ndarray:
    import pydicom  # deferred: only needed when a folder holds DICOM files

    ds = pydicom.dcmread(source)
    pixels = np.asarray(ds.pixel_array, dtype=np.float64)
    if pixels.ndim == 3 and int(ds.get("SamplesPerPixel", 1)) == 3:
        pixels = pixels @ np.array([0.299, 0.587, 0.114])  # ITU-R 601 luma, as Pillow's "L"
    if pixels.ndim != 2:
        raise DataError(f"cannot read image {file}: {pixels.ndim}-dimensional pixel data (multi-frame "
                        f"DICOM?); export one frame per file")
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None or intercept is not None:
        pixels = pixels * float(slope if slope is not None else 1) + float(intercept or 0)
    scaled = _min_max_uint8(pixels)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        scaled = 255 - scaled  # MONOCHROME1 shows low values bright; flip to the usual convention
    return scaled


def _min_max_uint8(pixels: np.ndarray) -> np.ndarray:
    low, high = float(pixels.min()), float(pixels.max())
    if high <= low:  # a flat image carries no contrast; map it to black rather than divide by zero
        return np.zeros(pixels.shape, dtype=np.uint8)
    return np.round((pixels - low) / (high - low) * 255).astype(np.uint8)


def _attributes_for(root: Path, attributes_csv: str, relative: list[str]) -> list[dict[str, str]]:
    """Attributes per image (same order as ``relative``); images absent from the CSV get ``{}``."""
    table = _read_attributes(_locate_csv(root, attributes_csv))
    attributes = [dict(table.get(path, {})) for path in relative]
    unmatched = len(table.keys() - set(relative))
    if unmatched:
        logger.warning("%d rows of %s name no image in %s", unmatched, attributes_csv, root)
    missing = sum(1 for path in relative if path not in table)
    if missing:
        logger.warning("%d of %d images in %s have no row in %s", missing, len(relative), root, attributes_csv)
    return attributes


PATIENT_ID_COLUMN = "patient_id"


def _patient_ids(attributes: list[dict[str, str]], relative: list[str], attributes_csv: str) -> np.ndarray | None:
    """The CSV's ``patient_id`` per image (removed from the attributes), or None without that column.

    With the column, every image needs a non-blank patient id: an image without one could be any
    patient's, and would escape the patient-level guarantee.
    """
    if not any(PATIENT_ID_COLUMN in row for row in attributes):
        return None
    ids = [row.pop(PATIENT_ID_COLUMN, "").strip() for row in attributes]
    missing = [path for path, value in zip(relative, ids) if not value]
    if missing:
        raise DataError(f"attributes CSV {attributes_csv} has a {PATIENT_ID_COLUMN} column, but {len(missing)} of "
                        f"{len(relative)} images have no patient id there (first: {missing[0]}); give every image "
                        f"a row with its {PATIENT_ID_COLUMN}, or drop the column")
    return np.asarray(ids)


def _locate_csv(root: Path, attributes_csv: str) -> Path:
    csv_path = Path(attributes_csv).expanduser()
    # A relative name that does not exist from the working directory is tried inside the folder,
    # so a CSV shipped with the images can be named by its file name alone.
    if not csv_path.is_file() and not csv_path.is_absolute() and (root / csv_path).is_file():
        csv_path = root / csv_path
    if not csv_path.is_file():
        raise DataError(f"attributes CSV not found: {csv_path} (set dataset.attributes_csv to an existing file)")
    return csv_path


def _read_attributes(csv_path: Path) -> dict[str, dict[str, str]]:
    try:
        # utf-8-sig: spreadsheets often prepend a byte-order mark, which would rename the first column.
        with csv_path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None or "path" not in reader.fieldnames:
                raise DataError(f"attributes CSV {csv_path} has no 'path' column (columns: "
                                f"{', '.join(reader.fieldnames or [])}); add one with image paths "
                                f"relative to the image folder, e.g. normal/img1.png")
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read attributes CSV {csv_path}: {exc}") from exc
    table: dict[str, dict[str, str]] = {}
    for row in rows:
        key = _normalise_relative(row.pop("path") or "")
        if key in table:
            raise DataError(f"attributes CSV {csv_path} lists {key} twice; keep one row per image")
        row.pop(None, None)  # cells beyond the header row: DictReader files them under the key None
        table[key] = {name: value or "" for name, value in row.items()}
    return table


def _normalise_relative(path: str) -> str:
    # Accept Windows separators and a leading "./" so hand-written CSVs still match.
    return PurePosixPath(path.strip().replace("\\", "/")).as_posix().removeprefix("./")
