"""The baseline's ServerApp: Flower's FedAvg, a test-split evaluation after every round, and the
time each round ended (written to `timing-file`, for bench/opacus_comparison.py)."""

from __future__ import annotations

import json
import time

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from opacus_baseline.task import evaluate, model, test_split

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    torch.manual_seed(0)
    net, test = model(), test_split(str(context.run_config["data-file"]))
    ended: list[dict] = []

    def evaluate_on_test(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        net.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy = evaluate(net, test)
        ended.append({"round": server_round, "time": time.time(), "accuracy": accuracy})
        return MetricRecord({"loss": loss, "accuracy": accuracy})

    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=1, min_evaluate_nodes=1,
                      min_available_nodes=1)
    strategy.start(grid=grid, initial_arrays=ArrayRecord(net.state_dict()),
                   num_rounds=int(context.run_config["num-server-rounds"]), evaluate_fn=evaluate_on_test)
    if context.run_config.get("timing-file"):
        with open(str(context.run_config["timing-file"]), "w") as file:
            json.dump(ended, file)
