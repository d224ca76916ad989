"""The baseline's ClientApp: train one round with a fresh Opacus PrivacyEngine, evaluate locally.

As in Flower's Opacus example, each round builds a new PrivacyEngine, so the epsilon it reports covers
that round alone (not the run), and nothing is kept on disk: no ledger, no budget, no refusal.
"""

from __future__ import annotations

import logging
import warnings

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from opacus import PrivacyEngine

from opacus_baseline.task import evaluate, hospital_share, model

app = ClientApp()
warnings.filterwarnings("ignore", module="opacus")


def _share(context: Context):
    return hospital_share(str(context.run_config["data-file"]), int(context.node_config["partition-id"]),
                          int(context.node_config["num-partitions"]))


@app.train()
def train(msg: Message, context: Context) -> Message:
    net = model()
    net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    data, _ = _share(context)
    loader = torch.utils.data.DataLoader(data, batch_size=int(context.run_config["batch-size"]), shuffle=True)
    optimizer = torch.optim.SGD(net.parameters(), lr=float(context.run_config["lr"]))
    engine = PrivacyEngine(secure_mode=False)
    net, optimizer, loader = engine.make_private(
        module=net, optimizer=optimizer, data_loader=loader,
        noise_multiplier=float(context.run_config["noise-multiplier"]),
        max_grad_norm=float(context.run_config["max-grad-norm"]))
    logging.getLogger("flwr").setLevel(logging.INFO)  # importing Opacus lowers it
    net.train()
    for _ in range(int(context.run_config["local-epochs"])):
        for x, y in loader:
            if len(y) == 0:
                continue
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            optimizer.step()
    epsilon = engine.get_epsilon(1e-5)  # this round only, as the example reports it
    content = RecordDict({"arrays": ArrayRecord(net._module.state_dict()),
                          "metrics": MetricRecord({"num-examples": len(data), "epsilon-this-round": epsilon})})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate_local(msg: Message, context: Context) -> Message:
    net = model()
    net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    _, validation = _share(context)
    loss, accuracy = evaluate(net, validation)
    metrics = MetricRecord({"num-examples": len(validation), "loss": loss, "accuracy": accuracy})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
