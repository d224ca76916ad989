"""fedpriv-predict: good images predicted with the run's temperature, broken ones reported, CSV written."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from fedpriv import rundir
from fedpriv.cli.predict import EXIT_ERROR, EXIT_NOTHING_READ, EXIT_OK, NOT_FOR_CLINICAL_USE, REFER, main
from fedpriv.config import DatasetConfig, FedprivConfig, ModelConfig
from fedpriv.data.base import normalise
from fedpriv.data.imagefolder import read_image
from fedpriv.models import build_model
from fedpriv.report.calibration import softmax
from fedpriv.report.evaluation import evaluate_final_model


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run directory as a finished run leaves it: config.yaml, model.pt and calibration.json."""
    run = tmp_path_factory.mktemp("run")
    cfg = FedprivConfig(dataset=DatasetConfig(name="synthetic", num_samples=200), model=ModelConfig(width=4))
    OmegaConf.save(OmegaConf.structured(cfg), run / "config.yaml")
    torch.manual_seed(0)
    model = build_model("cnn", in_channels=1, num_classes=2, image_size=28, width=4)
    torch.save(model.state_dict(), run / "model.pt")
    evaluate_final_model(run)
    return run


def write_dicom(path: Path, pixels: np.ndarray) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import (
        ExplicitVRLittleEndian,
        SecondaryCaptureImageStorage,
        generate_uid,
    )

    meta = FileMetaDataset()
    meta.TransferSyntaxUID, meta.MediaStorageSOPClassUID = ExplicitVRLittleEndian, SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation, ds.SamplesPerPixel = 16, 12, 11, 0, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture
def images(tmp_path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    files = {"png": tmp_path / "chest.png", "jpeg": tmp_path / "colour.jpg", "dicom": tmp_path / "scan.dcm",
             "nested": tmp_path / "folder" / "deep" / "more.png", "corrupt": tmp_path / "corrupt.png",
             "text": tmp_path / "notes.txt"}
    Image.fromarray(rng.integers(0, 256, (40, 36), dtype=np.uint8)).save(files["png"])
    Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(files["jpeg"])
    write_dicom(files["dicom"], np.tile(np.linspace(100, 3000, 64), (64, 1)))
    files["nested"].parent.mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(files["nested"])
    files["corrupt"].write_bytes(files["png"].read_bytes()[:70])  # a PNG cut short
    files["text"].write_text("this is not an image")
    return files


def expected_probabilities(run_dir: Path, file: Path) -> np.ndarray:
    """What the prediction must be: the model's softmax(logits / T), computed here independently."""
    temperature = json.loads((run_dir / rundir.CALIBRATION).read_text())["temperature"]
    model = build_model("cnn", in_channels=1, num_classes=2, image_size=28, width=4)
    model.load_state_dict(torch.load(run_dir / "model.pt", weights_only=True))
    with torch.no_grad():
        logits = model.eval()(normalise(torch.from_numpy(np.array(read_image(file, 28)))[None, None])).double().numpy()
    return softmax(logits, temperature)[0]


SYNTHETIC_WARNING = f"[{NOT_FOR_CLINICAL_USE}: model trained on SYNTHETIC data] "


def unprefixed(line: str) -> str:
    """A prediction line without the warning a synthetic-data model puts first (the fixture's is one)."""
    assert line.startswith(SYNTHETIC_WARNING), line
    return line.removeprefix(SYNTHETIC_WARNING)


def test_good_images_are_predicted_broken_ones_reported_and_csv_written(run_dir, images, tmp_path, capsys):
    out = tmp_path / "predictions.csv"
    inputs = [images["png"], images["corrupt"], images["jpeg"], images["dicom"], images["text"],
              images["nested"].parent.parent]
    code = main([str(run_dir), *map(str, inputs), "--out", str(out)])
    captured = capsys.readouterr()
    assert code == EXIT_OK
    lines = [unprefixed(line) for line in captured.out.strip().splitlines()]
    assert [line.split()[0] for line in lines] == [str(images[k]) for k in ("png", "jpeg", "dicom", "nested")]
    assert all(line.split()[1] in ("normal", "opacity") for line in lines)
    errors = [line for line in captured.err.splitlines() if ": error: " in line]
    assert len(errors) == 2
    assert str(images["corrupt"]) in errors[0] and str(images["text"]) in errors[1]
    assert "Traceback" not in captured.err

    rows = list(csv.DictReader(out.open()))
    assert [r["path"] for r in rows] == [str(images[k]) for k in ("png", "corrupt", "jpeg", "dicom", "text", "nested")]
    assert [r["status"] for r in rows] == ["ok", "error", "ok", "ok", "error", "ok"]
    assert rows[1]["error"].startswith("cannot read image") and rows[1]["predicted_class"] == ""
    expected = expected_probabilities(run_dir, images["png"])
    first = rows[0]
    assert float(first["p_normal"]) == pytest.approx(expected[0], abs=1e-6)
    assert float(first["probability"]) == pytest.approx(expected.max(), abs=1e-6)
    assert first["predicted_class"] == ["normal", "opacity"][int(expected.argmax())]
    assert first["refer_to_human"] == ("yes" if expected.max() < 0.8 else "no")
    assert float(first["probability"]) == pytest.approx(float(lines[0].split()[2]), abs=1e-3)


@pytest.mark.parametrize(("threshold", "flagged"), [("1", True), ("0", False)])
def test_the_threshold_decides_who_is_referred_to_a_human(run_dir, images, capsys, threshold, flagged):
    assert main([str(run_dir / "model.pt"), str(images["png"]), str(images["jpeg"]), "--threshold", threshold]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all((REFER in line) == flagged for line in lines)


def test_exit_code_is_non_zero_only_when_no_image_could_be_read(run_dir, images, tmp_path, capsys):
    assert main([str(run_dir), str(images["corrupt"]), str(images["text"]), str(tmp_path / "absent.png")]) \
        == EXIT_NOTHING_READ
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count(": error: ") == 3


def test_a_missing_model_is_one_error_line(images, tmp_path, capsys):
    assert main([str(tmp_path / "no-run"), str(images["png"])]) == EXIT_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fedpriv-predict: error: model not found")


def test_without_calibration_the_probabilities_are_flagged_as_uncalibrated(run_dir, images, tmp_path, capsys):
    bare = tmp_path / "bare-run"
    bare.mkdir()
    for name in ("config.yaml", "model.pt"):
        shutil.copy(run_dir / name, bare / name)
    out = tmp_path / "p.csv"
    assert main([str(bare), str(images["png"]), "--out", str(out)]) == 0
    assert "NOT calibrated" in capsys.readouterr().err
    assert next(csv.DictReader(out.open()))["temperature"] == "1"


def test_a_temperature_the_report_did_not_apply_is_not_used_and_predict_says_why(run_dir, images, tmp_path, capsys):
    rejected = tmp_path / "rejected-run"
    shutil.copytree(run_dir, rejected)
    saved = json.loads((rejected / rundir.CALIBRATION).read_text())
    decision = "not applied (T = 1 kept): it does not lower the calibration-split ECE"
    rundir.write_json(rejected / rundir.CALIBRATION, {**saved, "temperature": 1.0, "fitted_temperature": 0.211,
                                                      "applied": False, "decision": decision})
    out = tmp_path / "p.csv"
    assert main([str(rejected), str(images["png"]), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "NOT calibrated" in err and f"the fitted temperature 0.211 {decision}" in err
    assert next(csv.DictReader(out.open()))["temperature"] == "1"


def _copy_run(run_dir: Path, to: Path, dataset: str | None = None, rounds_trained: int | None = None) -> Path:
    """A copy of the fixture's run, optionally claiming other data, with a result.json counting rounds trained."""
    shutil.copytree(run_dir, to)
    if dataset:
        config = OmegaConf.load(to / rundir.CONFIG)
        config.dataset.name = dataset
        OmegaConf.save(config, to / rundir.CONFIG)
    if rounds_trained is not None:
        rundir.write_result(to, {"rounds_trained": rounds_trained, "stop_reason": "test"}, "summary")
    return to


def _outputs(run: Path | str, images, out: Path, capsys) -> tuple[list[str], str, list[dict]]:
    assert main([str(run), str(images["png"]), str(images["corrupt"]), str(images["jpeg"]), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    return captured.out.strip().splitlines(), captured.err, list(csv.DictReader(out.open()))


def test_a_synthetic_data_model_warns_on_every_line_and_every_csv_row(run_dir, images, tmp_path, capsys):
    lines, err, rows = _outputs(run_dir, images, tmp_path / "p.csv", capsys)
    assert len(lines) == 2 and all(line.startswith(SYNTHETIC_WARNING) for line in lines)
    assert [r["status"] for r in rows] == ["ok", "error", "ok"]  # the unreadable file's row carries it too
    assert all(r["warning"] == SYNTHETIC_WARNING[1:-2] for r in rows)
    summary = [line for line in err.splitlines() if "image(s) predicted" in line]
    assert len(summary) == 1 and SYNTHETIC_WARNING.strip() in summary[0]


def test_a_model_no_hospital_trained_warns_on_every_line_whatever_its_data(run_dir, images, tmp_path, capsys):
    untrained = _copy_run(run_dir, tmp_path / "untrained", dataset="pneumoniamnist", rounds_trained=0)
    expected = f"{NOT_FOR_CLINICAL_USE}: model UNTRAINED (no hospital trained in any round)"
    lines, err, rows = _outputs(untrained, images, tmp_path / "p.csv", capsys)
    assert len(lines) == 2 and all(line.startswith(f"[{expected}] ") for line in lines)
    assert all(r["warning"] == expected for r in rows) and "SYNTHETIC" not in err
    # a round checkpoint says itself whether any round had trained
    checkpoint = rundir.checkpoint(untrained, 1)
    checkpoint.parent.mkdir()
    torch.save({"round": 1, "run_id": "x", "rounds_trained": 0,
                "state_dict": torch.load(untrained / rundir.MODEL, weights_only=True)}, checkpoint)
    (untrained / rundir.RESULT).unlink()
    lines, _, rows = _outputs(checkpoint, images, tmp_path / "q.csv", capsys)
    assert all(line.startswith(f"[{expected}] ") for line in lines) and all(r["warning"] == expected for r in rows)


def test_a_trained_model_on_real_data_carries_no_warning(run_dir, images, tmp_path, capsys):
    trained = _copy_run(run_dir, tmp_path / "trained", dataset="pneumoniamnist", rounds_trained=3)
    lines, err, rows = _outputs(trained, images, tmp_path / "p.csv", capsys)
    assert len(lines) == 2 and not any(NOT_FOR_CLINICAL_USE in line for line in lines)
    assert NOT_FOR_CLINICAL_USE not in err and all(r["warning"] == "" for r in rows)


def test_a_run_saved_before_activations_were_configurable_is_rebuilt_with_relu(tmp_path):
    cfg = OmegaConf.structured(FedprivConfig(dataset=DatasetConfig(name="synthetic")))
    OmegaConf.save(cfg, tmp_path / "config.yaml")
    assert rundir.read_config(tmp_path).model.activation == "tanh"  # written by this version: kept
    old = OmegaConf.to_container(cfg)
    del old["model"]["activation"]
    OmegaConf.save(OmegaConf.create(old), tmp_path / "config.yaml")
    assert rundir.read_config(tmp_path).model.activation == "relu"  # older runs all trained ReLU CNNs
