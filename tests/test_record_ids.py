"""Tests of the record ids the privacy ledger charges: content ids, MedMNIST and image-folder ids.

A record's id must follow the record: the same under a new image size, a re-ordered or grown file,
another split; and different for different records. Every file a test reads is written under tmp_path.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_data_loaders import COUNTS, medmnist_arrays, write_grey, write_npz

from fedpriv.data import LabeledImages, content_record_ids, dataset_fingerprint
from fedpriv.data.base import normalise
from fedpriv.data.imagefolder import file_record_id, load_image_folder
from fedpriv.data.medmnist import load_medmnist
from fedpriv.data.synthetic import make_synthetic
from fedpriv.errors import DataError

FLAG = "pneumoniamnist"


def random_records(n: int = 10, size: int = 8, seed: int = 0) -> LabeledImages:
    rng = np.random.default_rng(seed)
    images = normalise(torch.from_numpy(rng.integers(0, 256, (n, 1, size, size), dtype=np.uint8)))
    return LabeledImages(images, torch.from_numpy(rng.integers(0, 2, n)))


def content(root: Path, size: int = 28) -> dict[str, np.ndarray]:
    dataset = load_medmnist(FLAG, size, str(root), False, record_ids="content")
    return {split: getattr(dataset, split).ids() for split in COUNTS}


def folder_ids(root: Path, size: int) -> dict[str, str]:
    """Record id per image file (relative path), over all three splits."""
    dataset = load_image_folder(str(root), size, val_fraction=0.2, test_fraction=0.2, seed=0)
    ids = np.concatenate([part.ids() for part in (dataset.train, dataset.val, dataset.test)])
    # The folder is written so that each file's grey level names it: map ids back to files through it.
    images = torch.cat([part.images for part in (dataset.train, dataset.val, dataset.test)])
    levels = np.round((images.mean(dim=(1, 2, 3)).numpy() * 0.5 + 0.5) * 255).astype(int)
    return {f"level{level}": str(record) for level, record in zip(levels.tolist(), ids.tolist())}


def grey_folder(root: Path, levels: dict[str, list[int]], shape: tuple[int, int] = (40, 40)) -> None:
    for cls, values in levels.items():
        for value in values:
            write_grey(root / cls / f"{value}.png", value, shape)


# --------------------------------------------------------------------------- content ids


def test_content_ids_are_deterministic_hex_and_unique() -> None:
    records = random_records()
    ids = records.ids()
    assert ids.shape == (10,) and ids.dtype.kind == "U"
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    assert len(set(ids.tolist())) == 10
    again = LabeledImages(records.images.clone(), records.labels.clone())
    assert again.ids().tolist() == ids.tolist()
    assert records.ids() is ids, "content ids are computed once and cached"
    assert content_record_ids(records.images, records.labels).tolist() == ids.tolist()


@pytest.mark.slow
def test_content_ids_and_the_fingerprint_are_the_same_in_a_fresh_process() -> None:
    code = (
        "import torch; from fedpriv.data import LabeledImages, dataset_fingerprint;"
        "records = LabeledImages(torch.linspace(-1, 1, 128).reshape(2, 1, 8, 8), torch.tensor([0, 1]));"
        "print(','.join(records.ids())); print(dataset_fingerprint(records))"
    )
    records = LabeledImages(torch.linspace(-1, 1, 128).reshape(2, 1, 8, 8), torch.tensor([0, 1]))
    ids, fingerprint = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                      check=True).stdout.split()
    assert ids.split(",") == records.ids().tolist()
    assert fingerprint == dataset_fingerprint(records)


def test_one_pixel_or_one_label_changes_only_that_records_id() -> None:
    records = random_records()
    reference = records.ids()
    pixel = records.images.clone()
    pixel[3, 0, 4, 4] += 2 / 255
    changed = LabeledImages(pixel, records.labels).ids()
    assert changed[3] != reference[3]
    assert np.array_equal(np.delete(changed, 3), np.delete(reference, 3))
    label = records.labels.clone()
    label[7] = 1 - label[7]
    relabelled = LabeledImages(records.images, label).ids()
    assert relabelled[7] != reference[7]
    assert np.array_equal(np.delete(relabelled, 7), np.delete(reference, 7))


def test_content_ids_depend_on_the_shape_not_just_the_pixels() -> None:
    flat = torch.zeros(1, 1, 4, 16)
    square = flat.reshape(1, 1, 8, 8)
    assert LabeledImages(flat, torch.tensor([0])).ids()[0] != LabeledImages(square, torch.tensor([0])).ids()[0]


def test_ids_cannot_be_changed_through_the_returned_array() -> None:
    records = random_records()
    with pytest.raises(ValueError):
        records.ids()[0] = "someone-else"
    named = LabeledImages(records.images, records.labels, record_ids=np.array([f"r{i}" for i in range(10)]))
    with pytest.raises(ValueError):
        named.ids()[0] = "someone-else"


def test_five_thousand_small_images_hash_well_under_a_second() -> None:
    records = random_records(n=5000, size=28)
    start = time.perf_counter()
    ids = records.ids()
    assert time.perf_counter() - start < 0.5
    assert len(np.unique(ids)) == 5000


# --------------------------------------------------------------------------- subset and validation


def test_subset_keeps_content_ids_aligned_cached_or_not() -> None:
    records = random_records()
    picked = np.array([9, 2, 5])
    uncached = records.subset(picked).ids()  # computed from the subset's own images
    parent = records.ids()
    cached = records.subset(picked).ids()  # sliced from the parent's cache
    assert uncached.tolist() == cached.tolist() == parent[picked].tolist()
    nested = records.subset(np.arange(8)).subset([7, 0])
    assert nested.ids().tolist() == [parent[7], parent[0]]


def test_subset_keeps_given_record_ids_aligned() -> None:
    records = random_records()
    named = LabeledImages(records.images, records.labels, record_ids=np.array([f"r{i}" for i in range(10)]))
    picked = named.subset(torch.tensor([4, 1]))
    assert picked.ids().tolist() == ["r4", "r1"] and picked.record_ids.tolist() == ["r4", "r1"]
    assert torch.equal(picked.images, records.images[[4, 1]])
    with pytest.raises(ValueError, match="unique"):
        named.subset([1, 1])  # a record twice would be used twice but charged once


def test_given_record_ids_win_over_content_and_accept_lists() -> None:
    records = random_records(n=3)
    named = LabeledImages(records.images, records.labels, record_ids=["a", "b", "c"])  # type: ignore[arg-type]
    assert isinstance(named.record_ids, np.ndarray)
    assert named.ids().tolist() == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("record_ids", "expected"),
    [
        (np.array(["a", "b"]), "2 record_ids for 3 images"),
        (np.array(["a", "b", "a"]), "unique.*'a'"),
        (np.array(["a", "", "c"]), "empty"),
        (np.array(["a", "  ", "c"]), "empty"),
        (np.array([1, 2, 3]), "str"),
        (np.array([["a", "b", "c"]]), "1-D"),
    ],
)
def test_bad_record_ids_are_refused(record_ids: np.ndarray, expected: str) -> None:
    records = random_records(n=3)
    with pytest.raises(ValueError, match=expected):
        LabeledImages(records.images, records.labels, record_ids=record_ids)


# --------------------------------------------------------------------------- MedMNIST


def test_medmnist_index_ids_are_the_same_at_every_size(tmp_path: Path) -> None:
    write_npz(tmp_path, **medmnist_arrays(seed=0, size=28))
    write_npz(tmp_path, name=f"{FLAG}_64.npz", **medmnist_arrays(seed=1, size=64))

    small = load_medmnist(FLAG, 28, str(tmp_path), False)
    large = load_medmnist(FLAG, 64, str(tmp_path), False, record_ids="index")

    for split, n in COUNTS.items():
        expected = [f"{FLAG}/{split}/{i}" for i in range(n)]
        assert getattr(small, split).ids().tolist() == expected
        assert getattr(large, split).ids().tolist() == expected
    # Content ids, by contrast, are of the pixels: at another size every record would look new.
    assert set(content(tmp_path, 28)["train"]).isdisjoint(content(tmp_path, 64)["train"])


def test_medmnist_index_ids_survive_subsetting(tmp_path: Path) -> None:
    write_npz(tmp_path, **medmnist_arrays())
    train = load_medmnist(FLAG, 28, str(tmp_path), False).train
    assert train.subset([5, 0]).ids().tolist() == [f"{FLAG}/train/5", f"{FLAG}/train/0"]


def test_medmnist_content_ids_follow_records_through_a_reordering(tmp_path: Path) -> None:
    arrays = medmnist_arrays()
    write_npz(tmp_path / "before", **arrays)
    order = np.random.default_rng(1).permutation(COUNTS["train"])
    shuffled = {**arrays, "train_images": arrays["train_images"][order], "train_labels": arrays["train_labels"][order]}
    write_npz(tmp_path / "after", **shuffled)

    before, after = content(tmp_path / "before"), content(tmp_path / "after")

    assert after["train"].tolist() == before["train"][order].tolist()
    assert after["test"].tolist() == before["test"].tolist()
    assert len(set(before["train"])) == COUNTS["train"]


def test_medmnist_content_ids_of_old_records_survive_an_appended_record(tmp_path: Path) -> None:
    arrays = medmnist_arrays()
    write_npz(tmp_path / "before", **arrays)
    new_scan = np.random.default_rng(7).integers(0, 256, (1, 28, 28), dtype=np.uint8)
    grown = {**arrays, "train_images": np.concatenate([arrays["train_images"], new_scan]),
             "train_labels": np.concatenate([arrays["train_labels"], [[1]]]).astype(np.uint8)}
    write_npz(tmp_path / "after", **grown)

    before, after = content(tmp_path / "before"), content(tmp_path / "after")

    assert after["train"][:-1].tolist() == before["train"].tolist()
    assert after["train"][-1] not in set(before["train"])


def test_medmnist_index_ids_would_not_follow_a_reordering(tmp_path: Path) -> None:
    # Why deployed hospitals must use "content": positions name other records after a re-ordering.
    arrays = medmnist_arrays()
    order = np.arange(COUNTS["train"])[::-1]
    write_npz(tmp_path, **{**arrays, "train_images": arrays["train_images"][order],
                           "train_labels": arrays["train_labels"][order]})
    dataset = load_medmnist(FLAG, 28, str(tmp_path), False, record_ids="index")
    assert dataset.train.ids()[0] == f"{FLAG}/train/0"
    assert torch.equal(dataset.train.images[0, 0], normalise(torch.from_numpy(arrays["train_images"][-1])))


def test_medmnist_ids_stored_in_the_file_are_used(tmp_path: Path) -> None:
    arrays = medmnist_arrays()
    stored = np.array([f"patient-{i:03d}/scan-1" for i in range(COUNTS["train"])])
    write_npz(tmp_path, **arrays, train_ids=stored)

    dataset = load_medmnist(FLAG, 28, str(tmp_path), False, record_ids="content")
    default = content_record_ids(dataset.val.images, dataset.val.labels)

    assert dataset.train.ids().tolist() == stored.tolist()
    assert dataset.train.subset([3]).ids().tolist() == ["patient-003/scan-1"]
    assert dataset.val.ids().tolist() == default.tolist()  # no val_ids in the file: content ids
    # In "index" mode (official benchmark files) the positions are the ids, stored ids or not.
    indexed = load_medmnist(FLAG, 28, str(tmp_path), False)
    assert indexed.train.ids()[0] == f"{FLAG}/train/0"


@pytest.mark.parametrize(
    ("train_ids", "expected"),
    [
        (np.array([f"r{i}" for i in range(19)]), "19 record_ids for 20 images"),
        (np.array(["same"] * 20), "unique"),
        (np.array([""] + [f"r{i}" for i in range(19)]), "empty"),
        (np.arange(20), "dtype int64"),
        (np.array([f"r{i}" for i in range(20)]).reshape(4, 5), r"shape \(4, 5\)"),
    ],
)
def test_bad_ids_in_the_file_are_data_errors(tmp_path: Path, train_ids: np.ndarray, expected: str) -> None:
    path = write_npz(tmp_path, **medmnist_arrays(), train_ids=train_ids)
    with pytest.raises(DataError, match=expected) as caught:
        load_medmnist(FLAG, 28, str(tmp_path), False, record_ids="content")
    assert str(path) in str(caught.value) and "train_ids" in str(caught.value)


def test_identical_records_in_a_file_get_ids_of_their_own(tmp_path: Path, caplog) -> None:
    arrays = medmnist_arrays()
    arrays["train_images"][5] = arrays["train_images"][2]
    arrays["train_labels"][5] = arrays["train_labels"][2]
    write_npz(tmp_path, **arrays)

    with caplog.at_level(logging.WARNING, logger="fedpriv.data.medmnist"):
        ids = content(tmp_path)["train"]

    assert len(set(ids)) == COUNTS["train"], "each copy is used by DP-SGD, so each is charged"
    assert ids[5] == f"{ids[2]}#1"
    assert "repeat" in caplog.text


def test_unknown_record_id_kind_is_refused(tmp_path: Path) -> None:
    write_npz(tmp_path, **medmnist_arrays())
    with pytest.raises(ValueError, match="record_ids must be one of"):
        load_medmnist(FLAG, 28, str(tmp_path), False, record_ids="position")


# --------------------------------------------------------------------------- image folder


def test_image_folder_ids_do_not_change_with_size(tmp_path: Path) -> None:
    grey_folder(tmp_path, {"a": [10, 30, 50, 70, 90], "b": [110, 130, 150, 170, 190]})
    small, large = folder_ids(tmp_path, 8), folder_ids(tmp_path, 32)
    assert len(small) == 10 and small == large


def test_image_folder_ids_are_of_file_bytes_and_class(tmp_path: Path) -> None:
    grey_folder(tmp_path, {"a": [10, 30, 50, 70, 90], "b": [110, 130, 150, 170, 190]})
    ids = folder_ids(tmp_path, 8)
    assert ids["level30"] == file_record_id((tmp_path / "a" / "30.png").read_bytes(), "a")
    assert ids["level150"] == file_record_id((tmp_path / "b" / "150.png").read_bytes(), "b")
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids.values())
    same_bytes = (tmp_path / "a" / "30.png").read_bytes()
    assert file_record_id(same_bytes, "a") != file_record_id(same_bytes, "b")


def test_old_image_files_keep_their_ids_when_files_are_added(tmp_path: Path) -> None:
    levels = {"a": [10, 30, 50, 70, 90], "b": [110, 130, 150, 170, 190]}
    grey_folder(tmp_path, levels)
    before = folder_ids(tmp_path, 8)
    # New scans, one sorting before every old file (so positions and the split both shift).
    grey_folder(tmp_path, {"a": [5, 200], "b": [100]})
    after = folder_ids(tmp_path, 8)

    assert len(after) == 13
    assert {name: after[name] for name in before} == before
    assert len(set(after.values())) == 13


def test_image_folder_ids_survive_another_split(tmp_path: Path) -> None:
    grey_folder(tmp_path, {"a": [10, 30, 50, 70, 90], "b": [110, 130, 150, 170, 190]})

    def by_split(seed: int) -> tuple[dict[str, str], list[str]]:
        dataset = load_image_folder(str(tmp_path), 8, val_fraction=0.2, test_fraction=0.2, seed=seed)
        parts = (dataset.train, dataset.val, dataset.test)
        return dict(zip(np.concatenate([p.ids() for p in parts]).tolist(),
                        torch.cat([p.images for p in parts]).mean(dim=(1, 2, 3)).tolist())), dataset.test.ids().tolist()

    first, first_test = by_split(0)
    other, other_test = by_split(3)
    assert first == pytest.approx(other)  # every id still names the same image
    assert first_test != other_test  # though the split moved records around


def test_byte_identical_files_in_one_class_are_charged_separately(tmp_path: Path, caplog) -> None:
    grey_folder(tmp_path, {"a": [10, 30, 50, 70, 90], "b": [110, 130, 150, 170, 190]})
    (tmp_path / "a" / "copy.png").write_bytes((tmp_path / "a" / "30.png").read_bytes())

    with caplog.at_level(logging.WARNING, logger="fedpriv.data.imagefolder"):
        dataset = load_image_folder(str(tmp_path), 8, val_fraction=0.2, test_fraction=0.2, seed=0)

    ids = np.concatenate([p.ids() for p in (dataset.train, dataset.val, dataset.test)]).tolist()
    original = file_record_id((tmp_path / "a" / "30.png").read_bytes(), "a")
    assert len(set(ids)) == 11 and original in ids and f"{original}#1" in ids
    assert "repeat another file" in caplog.text


# --------------------------------------------------------------------------- synthetic


def test_synthetic_splits_carry_cached_content_ids() -> None:
    dataset = make_synthetic(120, 16, seed=2, val_fraction=0.1, test_fraction=0.2)
    again = make_synthetic(120, 16, seed=2, val_fraction=0.1, test_fraction=0.2)
    every = []
    for split in ("train", "val", "test"):
        part, repeat = getattr(dataset, split), getattr(again, split)
        assert part._content_ids is not None, "ids are hashed once, before the split"
        fresh = content_record_ids(part.images, part.labels)
        assert part.ids().tolist() == fresh.tolist() == repeat.ids().tolist()
        every += part.ids().tolist()
    assert len(set(every)) == 120
