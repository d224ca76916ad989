"""Search DP-SGD hyperparameters for the default CNN on PneumoniaMNIST (centralised, one epsilon).

Selection uses the VALIDATION split. Note: tuning on private data is itself outside the DP
guarantee (see README); this script is for choosing fedpriv's defaults on a public benchmark.

    FEDPRIV_DATA_DIR=../shared/data .venv/bin/python bench/dp_hyperparameters.py --epsilon 3
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch

from fedpriv.config import DatasetConfig
from fedpriv.data import load_dataset
from fedpriv.models import build_model
from fedpriv.privacy import plan_local_training
from fedpriv.training import evaluate, train_local


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--epochs", type=int, nargs="+", default=[10, 20])
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    parser.add_argument("--clips", type=float, nargs="+", default=[1.0])
    parser.add_argument("--momentum", type=float, default=0.0)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--out", default="bench/results/dp_hyperparameters.jsonl")
    args = parser.parse_args()
    dataset = load_dataset(DatasetConfig(), seed=0)
    train, val, test = (split.as_dataset() for split in (dataset.train, dataset.val, dataset.test))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for batch, epochs, lr, clip in itertools.product(args.batch_sizes, args.epochs, args.lrs, args.clips):
        plan = plan_local_training(num_records=len(train), batch_size=batch, local_epochs=epochs, private=True,
                                   target_epsilon=args.epsilon, delta=1e-5, max_grad_norm=clip,
                                   max_physical_batch_size=256)
        torch.manual_seed(0)
        model = build_model("cnn", in_channels=1, num_classes=2, image_size=28, width=args.width)
        start = time.perf_counter()
        result = train_local(model, train, plan, lr=lr, momentum=args.momentum)
        model.load_state_dict(result.state_dict)
        row = {"epsilon": args.epsilon, "batch": batch, "epochs": epochs, "lr": lr, "clip": clip,
               "momentum": args.momentum, "width": args.width, "sigma": plan.noise_multiplier,
               "steps": plan.steps, "seconds": time.perf_counter() - start,
               "val_auc": evaluate(model, val).auc, "val_acc": evaluate(model, val).accuracy,
               "test_auc": evaluate(model, test).auc, "test_acc": evaluate(model, test).accuracy}
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as handle:
            handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
