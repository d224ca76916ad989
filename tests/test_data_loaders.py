"""Tests of the data loaders (MedMNIST npz, image folder, synthetic) and the dataset fingerprint.

Every file a test reads is written by the test itself under tmp_path; nothing is downloaded.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fedpriv.data as data_api
from fedpriv.config import DatasetConfig
from fedpriv.data import (
    NORMALISATION_MEAN,
    NORMALISATION_STD,
    LabeledImages,
    dataset_fingerprint,
    default_data_dir,
    load_dataset,
)
from fedpriv.data.base import normalise
from fedpriv.data.imagefolder import load_image_folder
from fedpriv.data.synthetic import make_synthetic
from fedpriv.errors import ConfigError, DataError

COUNTS = {"train": 20, "val": 6, "test": 6}


# --------------------------------------------------------------------------- MedMNIST helpers


def medmnist_arrays(seed: int = 0, size: int = 28, rgb: bool = False, classes: int = 2) -> dict[str, np.ndarray]:
    """Arrays in MedMNIST's npz layout: uint8 images, labels (N, 1)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in COUNTS.items():
        shape = (n, size, size, 3) if rgb else (n, size, size)
        arrays[f"{split}_images"] = rng.integers(0, 256, size=shape, dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, classes, size=(n, 1)).astype(np.uint8)
    return arrays


def write_npz(folder: Path, name: str = "pneumoniamnist.npz", **arrays: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    np.savez_compressed(path, **arrays)
    return path


# --------------------------------------------------------------------------- MedMNIST


def test_medmnist_npz_loads_with_shapes_dtypes_labels_and_normalisation(tmp_path: Path) -> None:
    arrays = medmnist_arrays()
    arrays["train_images"][0, 0, :3] = [0, 255, 51]
    write_npz(tmp_path, **arrays)

    dataset = load_dataset(DatasetConfig(name="pneumoniamnist", root=str(tmp_path)), seed=0)

    assert dataset.name == "pneumoniamnist"
    assert dataset.class_names == ["normal", "pneumonia"]
    assert not dataset.synthetic and "SYNTHETIC" not in dataset.describe()
    assert dataset.source == str(tmp_path / "pneumoniamnist.npz")
    assert (dataset.num_classes, dataset.in_channels, dataset.image_size) == (2, 1, 28)
    for split, n in COUNTS.items():
        part = getattr(dataset, split)
        assert part.images.shape == (n, 1, 28, 28)
        assert part.images.dtype == torch.float32
        assert part.labels.dtype == torch.int64
        assert part.labels.tolist() == arrays[f"{split}_labels"][:, 0].tolist()
        expected = (arrays[f"{split}_images"] / 255.0 - 0.5) / 0.5
        np.testing.assert_allclose(part.images[:, 0].numpy(), expected, atol=1e-6)
    assert dataset.train.images[0, 0, 0, :3].tolist() == pytest.approx([-1.0, 1.0, -0.6], abs=1e-6)
    assert (NORMALISATION_MEAN, NORMALISATION_STD) == (0.5, 0.5)


def test_medmnist_rgb_flag_keeps_three_channels_in_nchw_order(tmp_path: Path) -> None:
    arrays = medmnist_arrays(rgb=True, classes=8)
    arrays["val_images"][2, 5, 7] = [0, 255, 0]  # pure green at row 5, column 7
    write_npz(tmp_path, name="bloodmnist.npz", **arrays)

    dataset = load_dataset(DatasetConfig(name="bloodmnist", root=str(tmp_path)), seed=0)

    assert dataset.in_channels == 3 and dataset.num_classes == 8
    assert dataset.val.images.shape == (6, 3, 28, 28)
    assert dataset.val.images[2, :, 5, 7].tolist() == [-1.0, 1.0, -1.0]


def test_medmnist_larger_size_uses_suffixed_file_name(tmp_path: Path) -> None:
    write_npz(tmp_path, name="pneumoniamnist_64.npz", **medmnist_arrays(size=64))
    dataset = load_dataset(DatasetConfig(name="pneumoniamnist", root=str(tmp_path), size=64), seed=0)
    assert dataset.image_size == 64 and dataset.train.images.shape == (20, 1, 64, 64)


def test_data_dir_environment_variable_is_used_when_root_is_none(tmp_path: Path, monkeypatch) -> None:
    arrays = medmnist_arrays(seed=3)
    write_npz(tmp_path / "env-data", **arrays)
    monkeypatch.setenv("FEDPRIV_DATA_DIR", str(tmp_path / "env-data"))

    assert default_data_dir() == tmp_path / "env-data"
    dataset = load_dataset(DatasetConfig(name="pneumoniamnist", root=None), seed=0)
    assert dataset.test.labels.tolist() == arrays["test_labels"][:, 0].tolist()


def test_default_data_dir_without_environment_is_the_user_cache(monkeypatch) -> None:
    monkeypatch.delenv("FEDPRIV_DATA_DIR", raising=False)
    assert default_data_dir() == Path.home() / ".cache" / "fedpriv" / "medmnist"


def test_missing_file_says_where_it_looked_and_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(DataError) as caught:
        load_dataset(DatasetConfig(name="pneumoniamnist", root=str(tmp_path), size=128), seed=0)
    message = str(caught.value)
    assert str(tmp_path / "pneumoniamnist_128.npz") in message
    assert "FEDPRIV_DATA_DIR" in message and "dataset.root" in message and "dataset.download=true" in message


def test_download_fetches_only_a_missing_file_through_medmnist(tmp_path: Path, monkeypatch) -> None:
    import medmnist

    calls = []

    class FakePneumonia:  # stands in for medmnist's class: writes the file instead of downloading it
        def __init__(self, split: str, root: str, size: int, download: bool) -> None:
            calls.append((split, root, size, download))
            write_npz(Path(root), **medmnist_arrays(seed=9))

    monkeypatch.setattr(medmnist, "PneumoniaMNIST", FakePneumonia)
    root = tmp_path / "new-folder"
    dataset = load_dataset(DatasetConfig(name="pneumoniamnist", root=str(root), download=True), seed=0)
    assert calls == [("train", str(root), 28, True)]
    assert len(dataset.train) == COUNTS["train"]

    load_dataset(DatasetConfig(name="pneumoniamnist", root=str(root), download=True), seed=0)
    assert len(calls) == 1, "an existing file must not be downloaded (and MD5-checked) again"


def test_failed_download_is_a_data_error(tmp_path: Path, monkeypatch) -> None:
    import medmnist

    class Offline:
        def __init__(self, **_: object) -> None:
            raise RuntimeError("\n   Automatic download failed! Please download manually.\n")

    monkeypatch.setattr(medmnist, "PneumoniaMNIST", Offline)
    with pytest.raises(DataError, match="could not download pneumoniamnist.npz.*Automatic download failed"):
        load_dataset(DatasetConfig(name="pneumoniamnist", root=str(tmp_path), download=True), seed=0)


def test_random_bytes_are_not_an_npz(tmp_path: Path) -> None:
    path = tmp_path / "pneumoniamnist.npz"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    with pytest.raises(DataError, match="not a valid npz.*re-download or replace the file") as caught:
        load_dataset(DatasetConfig(root=str(tmp_path)), seed=0)
    assert str(path) in str(caught.value)


def test_truncated_npz_is_a_data_error(tmp_path: Path) -> None:
    path = write_npz(tmp_path, **medmnist_arrays())
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match="re-download or replace the file"):
        load_dataset(DatasetConfig(root=str(tmp_path)), seed=0)


def test_missing_key_is_named(tmp_path: Path) -> None:
    arrays = medmnist_arrays()
    del arrays["val_labels"]
    write_npz(tmp_path, **arrays)
    with pytest.raises(DataError, match="lacks the key 'val_labels'.*re-download or replace the file"):
        load_dataset(DatasetConfig(root=str(tmp_path)), seed=0)


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("train_images", np.zeros((20, 27, 27), np.uint8), "train_images has shape"),
        ("test_images", np.zeros((6, 28, 28), np.float32), "test_images has shape .* float32"),
        ("train_images", np.zeros((20, 28, 28, 3), np.uint8), "train_images has shape"),  # RGB for a grey flag
        ("val_labels", np.zeros((5, 1), np.uint8), "val_labels has 5 entries for 6 images"),
        ("val_labels", np.zeros((6, 2), np.uint8), "val_labels has shape"),
        ("test_labels", np.zeros((6, 1), np.float64), "test_labels has shape .* float64"),
        ("train_labels", np.full((20, 1), 2, np.uint8), r"train_labels contains \[2\]"),
        ("train_labels", np.full((20, 1), -1, np.int64), r"train_labels contains \[-1\]"),
    ],
)
def test_malformed_arrays_are_data_errors(tmp_path: Path, key: str, value: np.ndarray, expected: str) -> None:
    arrays = medmnist_arrays()
    arrays[key] = value
    write_npz(tmp_path, **arrays)
    with pytest.raises(DataError, match=expected):
        load_dataset(DatasetConfig(root=str(tmp_path)), seed=0)


def test_flat_labels_are_accepted(tmp_path: Path) -> None:
    arrays = medmnist_arrays()
    arrays["train_labels"] = arrays["train_labels"][:, 0].astype(np.int64)
    write_npz(tmp_path, **arrays)
    dataset = load_dataset(DatasetConfig(root=str(tmp_path)), seed=0)
    assert dataset.train.labels.tolist() == arrays["train_labels"].tolist()


def test_multi_label_and_unknown_flags_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="multi-label"):
        load_dataset(DatasetConfig(name="chestmnist", root=str(tmp_path)), seed=0)
    with pytest.raises(DataError, match="unknown MedMNIST 2D dataset"):
        load_dataset(DatasetConfig(name="organmnist3d", root=str(tmp_path)), seed=0)


# --------------------------------------------------------------------------- image folder helpers


def write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2",
                slope: float | None = None, intercept: float | None = None) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import (
        ExplicitVRLittleEndian,
        SecondaryCaptureImageStorage,
        generate_uid,
    )

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation, ds.SamplesPerPixel = 0, 1
    ds.PhotometricInterpretation = photometric
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def ramp(rows: int, cols: int) -> np.ndarray:
    """12-bit values rising from left (100) to right (3000): dark left, bright right."""
    return np.tile(np.linspace(100, 3000, cols), (rows, 1)).astype(np.uint16)


def write_grey(path: Path, value: int, shape: tuple[int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(shape, value, dtype=np.uint8)).save(path)


def build_folder(root: Path) -> list[dict[str, str]]:
    """Two classes, PNG + JPEG + DICOM of assorted sizes; returns the attribute rows written."""
    rows = []
    for index in range(5):
        value = 20 + 10 * index
        write_grey(root / "normal" / f"n{index}.png", value, (40, 32))
        rows.append({"path": f"normal/n{index}.png", "value": str(value), "site": "A"})
    for index in range(3):
        value = 150 + 20 * index
        write_grey(root / "pneumonia" / f"p{index}.jpg", value, (50, 50))
        rows.append({"path": f"pneumonia/p{index}.jpg", "value": str(value), "site": "B"})
    write_grey(root / "pneumonia" / "p3.JPEG", 230, (30, 30))  # upper-case extension, not in the CSV
    write_dicom(root / "normal" / "d0.dcm", ramp(64, 64))
    write_dicom(root / "pneumonia" / "scan" / "d1.dcm", ramp(48, 64), "MONOCHROME1", slope=2.0, intercept=-1024.0)
    rows.append({"path": "normal/d0.dcm", "value": "", "site": "A"})
    rows.append({"path": "./pneumonia/scan/d1.dcm", "value": "", "site": "B"})
    (root / "normal" / "notes.txt").write_text("not an image")
    return rows


def write_csv(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


# --------------------------------------------------------------------------- image folder


def test_image_folder_reads_png_jpeg_dicom_with_aligned_attributes(tmp_path: Path) -> None:
    root = tmp_path / "images"
    write_csv(tmp_path / "attributes.csv", build_folder(root))
    cfg = DatasetConfig(name="imagefolder", path=str(root), size=16, attributes_csv=str(tmp_path / "attributes.csv"),
                        val_fraction=0.2, test_fraction=0.2)

    dataset = load_dataset(cfg, seed=0)

    assert dataset.class_names == ["normal", "pneumonia"]
    assert (dataset.in_channels, dataset.image_size) == (1, 16)
    assert not dataset.synthetic and dataset.source == str(root)
    splits = [dataset.train, dataset.val, dataset.test]
    assert sum(len(s) for s in splits) == 11 and all(len(s) > 0 for s in splits)
    seen = set()
    for part in splits:
        assert part.images.shape[1:] == (1, 16, 16) and part.images.dtype == torch.float32
        assert part.attributes is not None and len(part.attributes) == len(part)
        for image, label, attributes in zip(part.images, part.labels.tolist(), part.attributes):
            if not attributes:  # the one image missing from the CSV
                assert label == 1 and image.mean().item() == pytest.approx((230 / 255 - 0.5) / 0.5, abs=0.02)
                seen.add("p3")
                continue
            assert "path" not in attributes
            assert attributes["site"] == ("A" if label == 0 else "B")  # attributes follow their image
            if attributes["value"]:  # uniform PNG/JPEG: its grey level, resized, survives
                expected = (int(attributes["value"]) / 255 - 0.5) / 0.5
                assert image.mean().item() == pytest.approx(expected, abs=0.02)
                seen.add(attributes["value"])
            else:
                seen.add(f"dicom{label}")
                left, right = image[0, :, 0].mean().item(), image[0, :, -1].mean().item()
                if label == 0:  # MONOCHROME2 ramp: dark left, bright right, min-max scaled to -1..1
                    assert left == pytest.approx(-1, abs=0.15) and right == pytest.approx(1, abs=0.15)
                else:  # MONOCHROME1 (and rescaled): inverted
                    assert left == pytest.approx(1, abs=0.15) and right == pytest.approx(-1, abs=0.15)
    assert len(seen) == 11, "every image appears exactly once across the splits"


def test_image_folder_split_is_stratified_and_deterministic(tmp_path: Path) -> None:
    root = tmp_path / "images"
    for cls, count in (("a", 20), ("b", 10)):
        for index in range(count):
            write_grey(root / cls / f"{index}.png", (index * 7) % 256, (8, 8))

    def load(seed: int):
        return load_image_folder(str(root), 8, attributes_csv=None, val_fraction=0.2, test_fraction=0.3, seed=seed)

    first, again, other = load(0), load(0), load(1)
    assert first.train.attributes is None
    assert torch.equal(first.train.images, again.train.images)
    assert not torch.equal(first.train.images, other.train.images)
    assert torch.bincount(first.test.labels).tolist() == [6, 3]  # 30% of each class
    assert torch.bincount(first.val.labels).tolist() == [4, 2]


def test_image_folder_csv_name_relative_to_folder(tmp_path: Path) -> None:
    root = tmp_path / "images"
    write_csv(root / "meta.csv", build_folder(root))
    dataset = load_image_folder(str(root), 16, attributes_csv="meta.csv", val_fraction=0.2, test_fraction=0.2, seed=0)
    attributes = dataset.train.attributes + dataset.val.attributes + dataset.test.attributes
    assert sum(1 for a in attributes if a) == 10


def test_missing_image_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="image folder not found") as caught:
        load_image_folder(str(tmp_path / "nowhere"), 16, attributes_csv=None, val_fraction=0.1,
                          test_fraction=0.2, seed=0)
    assert str(tmp_path / "nowhere") in str(caught.value)


def test_empty_image_folder_names_folder_and_extensions(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no class subfolders.*\\.png.*\\.dcm") as caught:
        load_image_folder(str(tmp_path), 16, attributes_csv=None, val_fraction=0.1, test_fraction=0.2, seed=0)
    assert str(tmp_path) in str(caught.value)


def test_class_folder_without_images(tmp_path: Path) -> None:
    write_grey(tmp_path / "a" / "1.png", 5, (8, 8))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match="holds no images.*\\.jpeg") as caught:
        load_image_folder(str(tmp_path), 8, attributes_csv=None, val_fraction=0.1, test_fraction=0.2, seed=0)
    assert str(tmp_path / "b") in str(caught.value)


def test_single_class_is_refused(tmp_path: Path) -> None:
    for index in range(10):
        write_grey(tmp_path / "normal" / f"{index}.png", index, (8, 8))
    with pytest.raises(DataError, match="at least two classes"):
        load_image_folder(str(tmp_path), 8, attributes_csv=None, val_fraction=0.1, test_fraction=0.2, seed=0)


@pytest.mark.parametrize("name", ["broken.png", "broken.dcm"])
def test_unreadable_image_names_the_file(tmp_path: Path, name: str) -> None:
    for cls in ("a", "b"):
        for index in range(5):
            write_grey(tmp_path / cls / f"{index}.png", index, (8, 8))
    (tmp_path / "b" / name).write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(DataError, match="cannot read image") as caught:
        load_image_folder(str(tmp_path), 8, attributes_csv=None, val_fraction=0.1, test_fraction=0.2, seed=0)
    assert str(tmp_path / "b" / name) in str(caught.value)


def test_too_small_folder_to_split(tmp_path: Path) -> None:
    write_grey(tmp_path / "a" / "1.png", 1, (8, 8))
    write_grey(tmp_path / "b" / "1.png", 2, (8, 8))
    with pytest.raises(DataError, match="too small to split"):
        load_image_folder(str(tmp_path), 8, attributes_csv=None, val_fraction=0.1, test_fraction=0.2, seed=0)


def test_attributes_csv_without_path_column(tmp_path: Path) -> None:
    root = tmp_path / "images"
    build_folder(root)
    write_csv(tmp_path / "bad.csv", [{"file": "normal/n0.png", "site": "A"}])
    with pytest.raises(DataError, match="no 'path' column"):
        load_image_folder(str(root), 16, attributes_csv=str(tmp_path / "bad.csv"), val_fraction=0.2,
                          test_fraction=0.2, seed=0)


def test_imagefolder_without_path_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as caught:
        load_dataset(DatasetConfig(name="imagefolder"), seed=0)
    assert caught.value.key == "dataset.path"


# --------------------------------------------------------------------------- synthetic


def lung_peak_features(images: torch.Tensor) -> np.ndarray:
    """Brightest 3x3 neighbourhood, and how far it stands above the image's 90th percentile."""
    pooled = torch.nn.functional.avg_pool2d(images, 3, stride=1).flatten(1)
    peak = pooled.max(dim=1).values
    return torch.stack([peak, peak - pooled.quantile(0.9, dim=1)], dim=1).numpy()


def test_synthetic_is_deterministic_balanced_and_flagged() -> None:
    cfg = DatasetConfig(name="synthetic", num_samples=300, size=28)
    first, again, other = load_dataset(cfg, seed=4), load_dataset(cfg, seed=4), load_dataset(cfg, seed=5)

    assert torch.equal(first.train.images, again.train.images) and torch.equal(first.test.labels, again.test.labels)
    assert dataset_fingerprint(first.train) == dataset_fingerprint(again.train)
    assert dataset_fingerprint(first.train) != dataset_fingerprint(other.train)
    assert first.synthetic and "SYNTHETIC" in first.describe() and "synthetic" in first.source
    assert "seed=4" in first.source
    assert first.class_names == ["normal", "opacity"]
    assert sum(len(s) for s in (first.train, first.val, first.test)) == 300
    assert (len(first.val), len(first.test)) == (30, 60)
    every_label = torch.cat([first.train.labels, first.val.labels, first.test.labels])
    assert torch.bincount(every_label).tolist() == [150, 150]
    assert first.train.images.shape[1:] == (1, 28, 28) and first.train.images.dtype == torch.float32
    assert first.train.images.min() >= -1 and first.train.images.max() <= 1


def test_synthetic_signal_is_learnable() -> None:
    from sklearn.linear_model import LogisticRegression

    dataset = make_synthetic(600, 28, seed=0, val_fraction=0.1, test_fraction=0.2)
    # Opacity brightens the lung fields on average ...
    lungs = dataset.train.images[:, 0, 6:22, 4:24].mean(dim=(1, 2))
    assert lungs[dataset.train.labels == 1].mean() > lungs[dataset.train.labels == 0].mean() + 0.05
    # ... and locally: a two-feature classifier (what a small CNN's pooling can compute) separates them.
    model = LogisticRegression().fit(lung_peak_features(dataset.train.images), dataset.train.labels.numpy())
    accuracy = model.score(lung_peak_features(dataset.test.images), dataset.test.labels.numpy())
    assert accuracy > 0.9


def test_synthetic_other_size_and_too_small() -> None:
    dataset = make_synthetic(40, 64, seed=1, val_fraction=0.1, test_fraction=0.2)
    assert dataset.image_size == 64
    with pytest.raises(DataError, match="too small to split"):
        make_synthetic(4, 28, seed=0, val_fraction=0.1, test_fraction=0.2)


# --------------------------------------------------------------------------- containers and fingerprint


def test_fingerprint_changes_with_one_pixel_or_one_label() -> None:
    rng = np.random.default_rng(0)
    images = normalise(torch.from_numpy(rng.integers(0, 256, (10, 1, 8, 8), dtype=np.uint8)))
    labels = torch.from_numpy(rng.integers(0, 2, 10))
    base = LabeledImages(images, labels)
    reference = dataset_fingerprint(base)

    assert len(reference) == 64 and int(reference, 16) >= 0
    assert dataset_fingerprint(LabeledImages(images.clone(), labels.clone())) == reference
    pixel = images.clone()
    pixel[3, 0, 4, 4] += 2 / 255
    assert dataset_fingerprint(LabeledImages(pixel, labels)) != reference
    label = labels.clone()
    label[7] = 1 - label[7]
    assert dataset_fingerprint(LabeledImages(images, label)) != reference


def test_subset_keeps_attributes_aligned_and_as_dataset_pairs() -> None:
    images = torch.arange(5, dtype=torch.float32).reshape(5, 1, 1, 1).expand(5, 1, 2, 2).contiguous()
    part = LabeledImages(images, torch.tensor([0, 1, 0, 1, 1]), [{"id": str(i)} for i in range(5)])
    picked = part.subset(np.array([4, 1]))
    assert len(picked) == 2
    assert picked.labels.tolist() == [1, 1] and picked.attributes == [{"id": "4"}, {"id": "1"}]
    assert picked.images[:, 0, 0, 0].tolist() == [4.0, 1.0]
    image, label = picked.as_dataset()[0]
    assert image.shape == (1, 2, 2) and label.item() == 1
    with pytest.raises(ValueError):
        LabeledImages(images, torch.tensor([0, 1]))


def test_normalise_rejects_other_integer_types_and_accepts_unit_floats() -> None:
    assert normalise(np.array([0.0, 0.5, 1.0])).tolist() == [-1.0, 0.0, 1.0]
    with pytest.raises(TypeError):
        normalise(np.array([0, 1000], dtype=np.int32))


def test_public_api_is_exported() -> None:
    for name in ("LabeledImages", "MedicalImageDataset", "load_dataset", "partition_indices", "partition_summary",
                 "format_partition_table", "dataset_fingerprint", "default_data_dir", "NORMALISATION_MEAN",
                 "NORMALISATION_STD"):
        assert hasattr(data_api, name), name


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    for cls in ("a", "b"):
        for index in range(5):
            wide = np.tile(np.linspace(0, 4000 + index, 16), (16, 1)).astype(np.uint16)
            path = tmp_path / cls / f"{index}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(wide).save(path)  # Pillow writes a 16-bit greyscale PNG
    dataset = load_image_folder(str(tmp_path), 16, attributes_csv=None, val_fraction=0.2, test_fraction=0.2, seed=0)
    row = dataset.train.images[0, 0, 0]
    assert row[0].item() == -1.0 and row[-1].item() == 1.0
    assert torch.all(row[1:] > row[:-1]), "a clipped conversion would saturate most of the ramp"


def test_single_array_file_is_not_an_npz(tmp_path: Path) -> None:
    with (tmp_path / "pneumoniamnist.npz").open("wb") as handle:
        np.save(handle, np.zeros((3, 28, 28), np.uint8))
    with pytest.raises(DataError, match="not a valid npz archive"):
        load_dataset(DatasetConfig(root=str(tmp_path)), seed=0)
