"""Patient-level vs image-level DP-SGD at the same epsilon: test AUC and the DP step's cost per patient.

Two datasets, each trained centrally (one hospital, no federation) with fedpriv's own `train_local`:

* synthetic X-ray-like images of generated patients with 1 to 10 images each
  (`dataset.images_per_patient=10`);
* PneumoniaMNIST with its training images grouped into SIMULATED patients of 1 to 4 images (at
  random, within each class: MedMNIST releases no patient ids, so these patients are made up and say
  nothing about the real data's patients).

Every unit trains at the same epsilon, delta and accountant, with the same Poisson sample rate q
(image-level: over images; patient-level: over patients) and the same number of steps, so the
calibrated sigma is the same and each step sees the same number of images in expectation. What
differs is the guarantee (one image vs all of a patient's images) and the signal: a patient-level
step averages over q x patients clipped gradients instead of q x images, so the same noise weighs
more. Configurations are interleaved per seed in one process, so machine noise hits them alike.

    FEDPRIV_DATA_DIR=../shared/data .venv/bin/python bench/patient_level.py [--quick] [--seeds 0 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from fedpriv.app_config import compose_config
from fedpriv.config import logit_shift
from fedpriv.data import LabeledImages, load_dataset
from fedpriv.data.synthetic import make_synthetic
from fedpriv.models import build_model
from fedpriv.privacy import PrivacyPlan
from fedpriv.privacy.accounting import epsilon as epsilon_of
from fedpriv.privacy.accounting import noise_multiplier_for
from fedpriv.privacy.plan import steps_per_epoch
from fedpriv.training import evaluate, train_local

RESULTS = Path(__file__).parent / "results"
EPSILON, DELTA, CLIP, LR = 3.0, 1e-5, 1.0, 2.0
# (label, unit, max images per patient and step)
UNITS = [("image-level", "image", None), ("patient-level", "patient", None), ("patient-level, max 4", "patient", 4)]


def simulated_patients(labels: np.ndarray, most: int, seed: int) -> np.ndarray:
    """SIMULATED patient ids: each class's images, shuffled, dealt into patients of 1..`most` images."""
    rng = np.random.default_rng(seed)
    ids = np.empty(len(labels), dtype=object)
    count = 0
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        start = 0
        while start < len(members):
            size = int(rng.integers(1, most + 1))
            ids[members[start:start + size]] = f"simulated-{count}"
            start, count = start + size, count + 1
    return ids.astype(str)


def run_one(name: str, train: LabeledImages, test: LabeledImages, unit: str, max_images: int | None, *,
            sample_rate: float, steps: int, sigma: float, seed: int, shift, in_channels: int, size: int) -> dict:
    patients, owner = train.patients()
    groups = owner if unit == "patient" else None
    plan = PrivacyPlan(steps, sample_rate, sigma, CLIP, "prv", max_physical_batch_size=256)
    torch.manual_seed(seed)
    model = build_model("cnn", in_channels=in_channels, num_classes=2, image_size=size)
    start = time.perf_counter()
    result = train_local(model, train.as_dataset(), plan, lr=LR, seed=seed, logit_shift=shift, groups=groups,
                         max_images_per_group=max_images)
    seconds = time.perf_counter() - start
    model.load_state_dict(result.state_dict)
    metrics = evaluate(model, test.as_dataset())
    # Each patient is drawn (as a patient, or image by image) at rate q in expectation, so both units
    # handle q x patients patients per step: the cost per patient is comparable directly.
    images_used = len(train) if max_images is None else int(np.minimum(np.bincount(owner), max_images).sum())
    return {"data": name, "unit": unit, "max_images_per_patient": max_images, "seed": seed,
            "epsilon": result.epsilon(DELTA), "sigma": sigma, "sample_rate": sample_rate, "steps": steps,
            "train_seconds": seconds, "seconds_per_step": seconds / steps,
            "ms_per_patient": 1000 * seconds / (steps * sample_rate * len(patients)),
            "ms_per_image": 1000 * seconds / (steps * sample_rate * images_used),
            "auc": metrics.auc, "accuracy": metrics.accuracy, "patients": len(patients), "images": len(train)}


def bench(name: str, train: LabeledImages, test: LabeledImages, *, image_batch: int, epochs: int,
          seeds: list[int], shift, rows: list[dict], units: list[tuple[str, str, int | None]]) -> None:
    sample_rate = image_batch / len(train)  # the same q for both units: same sigma, same images per step
    steps = epochs * steps_per_epoch(sample_rate)
    sigma = noise_multiplier_for(target_epsilon=EPSILON, delta=DELTA, sample_rate=sample_rate, steps=steps,
                                 accountant="prv")
    counts = np.bincount(train.patients()[1])
    print(f"{name}: {len(train)} images of {len(counts)} patients ({counts.min()}-{counts.max()} images, mean "
          f"{counts.mean():.2f}); q {sample_rate:.4f}, {steps} steps, sigma {sigma:.3f}", flush=True)
    for seed in seeds:
        for label, unit, most in units:
            row = run_one(name, train, test, unit, most, sample_rate=sample_rate, steps=steps, sigma=sigma,
                          seed=seed, shift=shift, in_channels=train.images.shape[1], size=train.images.shape[-1])
            row["label"] = label
            rows.append(row)
            print(f"  seed {seed} {label:22s} eps {row['epsilon']:.2f} AUC {row['auc']:.3f} acc {row['accuracy']:.3f} "
                  f"{row['seconds_per_step']:.3f} s/step {row['ms_per_patient']:.1f} ms/patient "
                  f"{row['ms_per_image']:.2f} ms/image", flush=True)


def table(rows: list[dict]) -> str:
    lines = ["| data | unit | epsilon (per unit) | test AUC | test accuracy | s per step | ms per patient | "
             "ms per image |", "|---|---|---|---|---|---|---|---|"]
    for data in dict.fromkeys(r["data"] for r in rows):
        for label in dict.fromkeys(r["label"] for r in rows if r["data"] == data):
            group = [r for r in rows if r["data"] == data and r["label"] == label]

            def stat(key: str, digits: int = 3) -> str:
                values = [r[key] for r in group]
                mean = statistics.mean(values)
                return f"{mean:.{digits}f}" + (f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else "")

            lines.append(f"| {data} | {label} | {group[0]['epsilon']:.2f} | {stat('auc')} | {stat('accuracy')} | "
                         f"{stat('seconds_per_step', 3)} | {stat('ms_per_patient', 1)} | {stat('ms_per_image', 2)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few steps only (checks the script runs)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--skip-pneumonia", action="store_true")
    parser.add_argument("--skip-synthetic", action="store_true")
    parser.add_argument("--out", default="patient_level", help="results file name in bench/results (no .json)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows: list[dict] = []
    started = time.perf_counter()
    synthetic = make_synthetic(600 if args.quick else 1600, 28, 0, 0.1, 0.2, images_per_patient=10)
    if not args.skip_synthetic:
            bench("synthetic, 1-10 images per patient", synthetic.train, synthetic.test, image_batch=160,
              epochs=1 if args.quick else 4, seeds=args.seeds, shift=None, rows=rows, units=UNITS)
    if not args.skip_pneumonia:
        cfg = compose_config([])
        dataset = load_dataset(cfg.dataset, 0)
        train = dataset.train
        train = LabeledImages(train.images, train.labels, record_ids=train.record_ids,
                              patient_ids=simulated_patients(train.labels.numpy(), 4, seed=0))
        # Patients of at most 4 images: a cap of 4 changes nothing there, so it is not run.
        bench("PneumoniaMNIST, SIMULATED patients of 1-4 images", train, dataset.test, image_batch=256,
              epochs=1 if args.quick else 3, seeds=args.seeds[:1], shift=logit_shift(cfg, 2), rows=rows,
              units=UNITS[:2])
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / (f"{args.out}_quick.json" if args.quick else f"{args.out}.json")
    out.write_text(json.dumps({"rows": rows, "seconds": time.perf_counter() - started,
                               "epsilon": EPSILON, "delta": DELTA, "clip": CLIP, "lr": LR}, indent=1))
    print(table(rows))
    print(f"wrote {out} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
