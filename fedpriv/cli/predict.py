"""``fedpriv-predict MODEL IMAGES...``: classify images, with calibrated confidence and a referral flag.

MODEL is a run directory, or a model file inside one (model.pt, or checkpoints/round-NNN.pt). The
architecture, image size and classes come from config.yaml beside it. The temperature comes from
calibration.json (written with the run report) when that file was fitted for these weights;
otherwise probabilities are uncalibrated (temperature 1) and a warning says so. IMAGES are
PNG/JPEG/DICOM files, or folders searched recursively for .png, .jpg, .jpeg and .dcm files.
Images are read as in training: greyscale, resized to the model's size. DICOM goes through the same
modality rescaling and MONOCHROME1 inversion as in training.

For each image, stdout gets one line: the path, the predicted class and its calibrated probability.
When that probability is below ``--threshold`` (default 0.8), the line ends with "REFER TO A HUMAN".
A file that cannot be read gets a ``fedpriv-predict: error: ...`` line on stderr, and the others are
still processed. ``--out FILE.csv`` writes one row per input file, unreadable ones included, with
their error.

A model trained on synthetic data, or never trained (no hospital trained in any round), must not be
trusted on any image: then every stdout line starts with ``[NOT FOR CLINICAL USE: ...]``, the
summary line on stderr says the same, and every CSV row carries it in its ``warning`` column
(empty otherwise).

Exit codes: 0 when at least one image was predicted, even if others could not be read; 1 when no
image could be read; 2 when the model cannot be loaded, the CSV cannot be written, or the arguments
are wrong.
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedpriv import rundir
from fedpriv.errors import DataError, FedprivError

if TYPE_CHECKING:  # annotations only: the model stack is imported when a command runs
    from fedpriv.report.evaluation import RunModel

PROG = "fedpriv-predict"
EXIT_OK, EXIT_NOTHING_READ, EXIT_ERROR = 0, 1, 2
DEFAULT_THRESHOLD = 0.8
REFER = "REFER TO A HUMAN"
NOT_FOR_CLINICAL_USE = "NOT FOR CLINICAL USE"


@dataclass
class Prediction:
    """One input file's outcome: calibrated and raw probabilities, or why it could not be read."""

    path: str
    calibrated: np.ndarray | None = None
    raw: np.ndarray | None = None
    error: str = ""

    @property
    def index(self) -> int:
        return int(np.argmax(self.calibrated))

    @property
    def probability(self) -> float:
        return float(self.calibrated[self.index])


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format=f"{PROG}: %(levelname)s: %(message)s")
    from fedpriv.report.evaluation import load_run_model  # deferred: torch; --help answers at once

    try:
        loaded = load_run_model(args.model)
    except (FedprivError, OSError) as exc:
        return _fail(str(exc))
    if loaded.uncalibrated_reason:
        print(f"{PROG}: warning: probabilities are NOT calibrated (temperature 1): {loaded.uncalibrated_reason}",
              file=sys.stderr)
    warning = untrusted_warning(loaded.untrusted)
    if warning:
        print(f"{PROG}: warning: {warning}: this model's predictions say nothing about real patients",
              file=sys.stderr)
    predictions = predict_files(loaded, args.images)
    for prediction in predictions:
        if prediction.error:
            print(f"{PROG}: error: {prediction.error}", file=sys.stderr)
    names = loaded.info.class_names
    _print_predictions(predictions, names, args.threshold, warning)
    if args.out:
        try:
            write_csv(args.out, predictions, names, args.threshold, loaded.temperature, warning)
        except OSError as exc:
            return _fail(f"cannot write {args.out}: {exc}")
    return _finish(predictions, args.threshold, loaded.temperature, warning)


def untrusted_warning(reasons: list[str]) -> str:
    """The warning every output line carries when the model must not be trusted; empty when it may."""
    return f"{NOT_FOR_CLINICAL_USE}: model {' and '.join(reasons)}" if reasons else ""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Classify images with a fedpriv run's model, with "
                                     "calibrated confidence; low-confidence images are flagged for a human.")
    parser.add_argument("model", metavar="MODEL", help=f"a run directory, or a {rundir.MODEL} / checkpoint inside one")
    parser.add_argument("images", metavar="IMAGES", nargs="+", help="PNG/JPEG/DICOM files or folders of them")
    parser.add_argument("--threshold", type=_probability, default=DEFAULT_THRESHOLD,
                        help=f"flag images whose calibrated probability is below this (default {DEFAULT_THRESHOLD})")
    parser.add_argument("--out", metavar="FILE.csv", help="also write the predictions as CSV")
    return parser


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be a probability between 0 and 1, got {text!r}")
    return value


def _fail(message: str) -> int:
    print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr)
    return EXIT_ERROR


# ------------------------------------------------------------------------------------ reading


def collect_images(paths: list[str]) -> list[Prediction | Path]:
    """Files to read, in order: named files as given, folders expanded; problems as failed Predictions."""
    from fedpriv.data.imagefolder import EXTENSIONS  # deferred: loads torch (see load_run_model)

    found: list[Prediction | Path] = []
    for name in paths:
        path = Path(name).expanduser()
        if path.is_dir():
            files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in EXTENSIONS
                           and not any(part.startswith(".") for part in f.relative_to(path).parts))
            found += files or [Prediction(name, error=f"{name}: folder holds no images ({', '.join(EXTENSIONS)})")]
        elif path.is_file():
            found.append(path)
        else:
            found.append(Prediction(name, error=f"{name}: no such file or folder"))
    return found


def read_pixels(file: Path, size: int, channels: int) -> np.ndarray:
    """One image as ``(channels, size, size)`` uint8, read as training read it; DataError if unreadable."""
    from fedpriv.data.imagefolder import DICOM_EXTENSIONS, read_image  # deferred: loads torch (see load_run_model)

    if channels == 1:
        return read_image(file, size)[None]
    if channels != 3:
        raise DataError(f"the model expects {channels}-channel images; only 1 (greyscale) or 3 (RGB) can be read")
    if file.suffix.lower() in DICOM_EXTENSIONS:
        return np.repeat(read_image(file, size)[None], 3, axis=0)
    from PIL import Image

    try:
        with Image.open(file) as opened:
            rgb = opened.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    except Exception as exc:  # any decoder failure means this file cannot be used; say which one
        raise DataError(f"cannot read image {file}: {type(exc).__name__}: {exc}. Fix or remove the file") from exc
    return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)


def predict_files(loaded: RunModel, paths: list[str]) -> list[Prediction]:
    """Read every image (skipping unreadable ones, with their error) and predict the rest in one batch."""
    import torch

    from fedpriv.data.base import normalise  # deferred: loads torch (see load_run_model)

    predictions, pixels = [], []
    for item in collect_images(paths):
        if isinstance(item, Prediction):
            predictions.append(item)
            continue
        try:
            pixels.append(read_pixels(item, loaded.info.image_size, loaded.info.in_channels))
            predictions.append(Prediction(str(item)))
        except DataError as exc:
            predictions.append(Prediction(str(item), error=" ".join(str(exc).split())))
    if pixels:
        calibrated, raw = loaded.probabilities(normalise(torch.from_numpy(np.stack(pixels))))
        for prediction, cal, unc in zip([p for p in predictions if not p.error], calibrated, raw, strict=True):
            prediction.calibrated, prediction.raw = cal, unc
    return predictions


# ------------------------------------------------------------------------------------ writing


def _print_predictions(predictions: list[Prediction], names: list[str], threshold: float, warning: str = "") -> None:
    good = [p for p in predictions if not p.error]
    if not good:
        return
    path_width = max(len(p.path) for p in good)
    name_width = max(len(names[p.index]) for p in good)
    for p in good:
        flag = f"  {REFER} (below {threshold:g})" if p.probability < threshold else ""
        prefix = f"[{warning}] " if warning else ""
        print(f"{prefix}{p.path:<{path_width}}  {names[p.index]:<{name_width}}  {p.probability:.3f}{flag}")


def write_csv(path: str, predictions: list[Prediction], names: list[str], threshold: float,
              temperature: float, warning: str = "") -> None:
    """One row per input: path, status, class, calibrated and raw probability, referral, per-class
    probabilities, error, and the model's warning (on every row, empty when the model may be trusted)."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "status", "predicted_class", "probability", "refer_to_human",
                         "uncalibrated_probability", "temperature", *(f"p_{name}" for name in names), "error",
                         "warning"])
        for p in predictions:
            if p.error:
                writer.writerow([p.path, "error", "", "", "", "", "", *([""] * len(names)), p.error, warning])
                continue
            writer.writerow([p.path, "ok", names[p.index], f"{p.probability:.6f}",
                             "yes" if p.probability < threshold else "no", f"{p.raw[p.index]:.6f}",
                             f"{temperature:.6g}", *(f"{q:.6f}" for q in p.calibrated), "", warning])


def _finish(predictions: list[Prediction], threshold: float, temperature: float, warning: str = "") -> int:
    done = [p for p in predictions if not p.error]
    referred = sum(p.probability < threshold for p in done)
    prefix = f"[{warning}] " if warning else ""
    print(f"{PROG}: {prefix}{len(done)} image(s) predicted, {referred} to refer to a human (probability below "
          f"{threshold:g}), {len(predictions) - len(done)} could not be read; temperature {temperature:.3g}",
          file=sys.stderr)
    return EXIT_OK if done else EXIT_NOTHING_READ


if __name__ == "__main__":
    sys.exit(main())
