"""Centralised reference points on PneumoniaMNIST: the default CNN, non-private and DP at eps 1/3/8.

All records in one place (no federation), trained with fedpriv's own `train_local`, evaluated on the
official test split. Writes JSON to bench/results/centralised.json and prints a Markdown table.

    FEDPRIV_DATA_DIR=../shared/data .venv/bin/python bench/centralised.py [--quick] [--seeds 0 1 2] [overrides]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from fedpriv.app_config import compose_config
from fedpriv.config import logit_shift
from fedpriv.data import load_dataset
from fedpriv.models import build_model
from fedpriv.privacy import plan_local_training
from fedpriv.training import evaluate, train_local

RESULTS = Path(__file__).parent / "results"


def run_one(cfg, dataset, epsilon: float | None, seed: int, epochs: int, batch_size: int, lr: float,
            momentum: float) -> dict:
    train = dataset.train.as_dataset()
    plan = plan_local_training(
        num_records=len(train), batch_size=batch_size, local_epochs=epochs, private=epsilon is not None,
        target_epsilon=epsilon, delta=1e-5, max_grad_norm=1.0, max_physical_batch_size=256,
    )
    torch.manual_seed(seed)
    model = build_model("cnn", in_channels=dataset.in_channels, num_classes=dataset.num_classes,
                        image_size=dataset.image_size, activation=cfg.model.activation)
    start = time.perf_counter()
    result = train_local(model, train, plan, lr=lr, momentum=momentum, seed=seed,
                         logit_shift=logit_shift(cfg, dataset.num_classes))
    seconds = time.perf_counter() - start
    model.load_state_dict(result.state_dict)
    test = evaluate(model, dataset.test.as_dataset())
    return {"epsilon_target": epsilon, "epsilon_spent": result.epsilon(1e-5), "seed": seed,
            "sigma": plan.noise_multiplier, "steps": plan.steps, "train_seconds": seconds,
            "auc": test.auc, "accuracy": test.accuracy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 epochs, one seed (smoke run)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--out", default=str(RESULTS / "centralised.json"))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model.activation=relu")
    args = parser.parse_args()
    epochs, seeds = (2, [0]) if args.quick else (args.epochs, args.seeds)
    cfg = compose_config(args.overrides)  # fedpriv's defaults: the same model and loss as a federated run
    dataset = load_dataset(cfg.dataset, seed=0)
    # (epsilon, batch, lr, momentum): DP settings chosen on the validation split by
    # bench/dp_hyperparameters.py (large batches, plain SGD with a high learning rate).
    settings = [(None, 64, 0.02, 0.9), (1.0, 256, 2.0, 0.0), (3.0, 256, 2.0, 0.0), (8.0, 256, 2.0, 0.0)]
    rows = []
    for epsilon, batch_size, lr, momentum in settings:
        for seed in seeds:
            row = run_one(cfg, dataset, epsilon, seed, epochs, batch_size, lr, momentum)
            row.update(batch_size=batch_size, lr=lr, momentum=momentum, epochs=epochs,
                       activation=cfg.model.activation, logit_adjustment=cfg.train.logit_adjustment)
            rows.append(row)
            print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))
    print("\n| setting | epsilon spent | test AUC | test accuracy | train s |\n|---|---|---|---|---|")
    for epsilon, *_ in settings:
        group = [r for r in rows if r["epsilon_target"] == epsilon]
        auc = [r["auc"] for r in group]
        acc = [r["accuracy"] for r in group]
        spread = lambda xs: f" ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else ""  # noqa: E731
        label = "non-private" if epsilon is None else f"DP, epsilon {epsilon:g}"
        print(f"| {label} | {group[0]['epsilon_spent']:.2f} | {statistics.mean(auc):.3f}{spread(auc)} | "
              f"{statistics.mean(acc):.3f}{spread(acc)} | {statistics.mean(r['train_seconds'] for r in group):.0f} |")


if __name__ == "__main__":
    main()
