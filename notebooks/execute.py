"""Execute walkthrough.ipynb in place and record what produced its saved outputs.

The walkthrough is committed with the outputs of a full-mode run on PneumoniaMNIST, so that it reads
as a finished story on a web page. Those outputs are only worth reading while they match the code.
This script runs the notebook (in ``notebooks/``, where its ``outputs/`` folder is git-ignored) and
stores in the notebook's metadata, under ``fedpriv``:

- ``cells``: a digest of the code cells' source. Editing a cell without re-running makes it stale.
- ``fingerprint``: the results of a small fixed computation through the stages the notebook's numbers
  come from (synthetic data and its split across hospitals, the privacy plan and accountant, one
  round of DP-SGD at a hospital with a fixed noise seed, the test metrics of the model it trained,
  and the epsilon shown by the one formatting rule), rounded to 4 significant digits so that
  floating-point noise across machines does not count. A change of the code that changes those
  results makes the saved outputs stale.
- ``mode``, ``executed_at`` and ``commit`` (git's HEAD when it ran), for people.

``tests/test_notebook.py`` recomputes both and fails with the command below when either differs::

    FEDPRIV_DATA_DIR=$PWD/../shared/data .venv/bin/python notebooks/execute.py

(``--small`` runs the synthetic small mode instead, into a copy, for trying the notebook out; the
committed notebook holds a full-mode run.)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nbformat
import torch
from nbclient import NotebookClient

from fedpriv.app_config import compose_config
from fedpriv.experiment import prepare_experiment
from fedpriv.hospital import HospitalSettings, RoundRequest, train_round
from fedpriv.models import build_model
from fedpriv.privacy import PrivacyEvent, epsilon, plan_local_training
from fedpriv.rundir import format_epsilon
from fedpriv.training import evaluate

HERE = Path(__file__).resolve().parent
NOTEBOOK = HERE / "walkthrough.ipynb"
CELL_TIMEOUT_S = 3600  # a full-mode cell runs up to three 40-round federations on two cores
SMALL_ENV = "FEDPRIV_NOTEBOOK_SMALL"

# The fixed computation behind the fingerprint: the notebook's small-mode data, model and training.
PROBE = ["dataset=synthetic", "dataset.num_samples=300", "federation=iid", "federation.num_hospitals=2",
         "model.width=4", "train.batch_size=16"]
PROBE_SIGMA, PROBE_BUDGET, PROBE_NOISE_SEED = 1.5, 3.0, 2024


def _significant(value: float, digits: int = 4) -> float | str:
    """`value` rounded to `digits` significant digits (non-finite values as text, for JSON)."""
    value = float(value)
    if not math.isfinite(value):
        return str(value)
    return float(f"{value:.{digits}g}")


def cells_digest(notebook: nbformat.NotebookNode) -> str:
    """SHA-256 of the code cells' source, in order (Markdown edits do not change any output)."""
    digest = hashlib.sha256()
    for cell in notebook.cells:
        if cell.cell_type == "code":
            digest.update(cell.source.strip().encode())
            digest.update(b"\0")
    return digest.hexdigest()


def fingerprint() -> dict[str, Any]:
    """The results of a small fixed run through the stages behind the notebook's numbers (a few seconds)."""
    cfg = compose_config(PROBE)
    experiment = prepare_experiment(cfg)
    dataset, hospital = experiment.dataset, experiment.hospitals[0]
    data = experiment.hospital_data(0)
    plan = plan_local_training(num_records=len(data), batch_size=cfg.train.batch_size, local_epochs=1, private=True,
                               noise_multiplier=PROBE_SIGMA, max_grad_norm=cfg.privacy.max_grad_norm,
                               accountant=cfg.privacy.accountant)
    torch.manual_seed(cfg.seed)  # the model's initial weights
    model = build_model(cfg.model.name, in_channels=dataset.in_channels, num_classes=dataset.num_classes,
                        image_size=dataset.image_size, width=cfg.model.width)
    with tempfile.TemporaryDirectory() as folder:
        settings = HospitalSettings(hospital.name, budget_epsilon=PROBE_BUDGET, delta=hospital.delta,
                                    ledger_path=Path(folder) / "ledger.db", accountant=cfg.privacy.accountant,
                                    noise_seed=PROBE_NOISE_SEED, ledger_key=Path(folder) / "keys")
        request = RoundRequest(run_id="fingerprint", server_round=1, num_rounds=1, batch_size=cfg.train.batch_size,
                               lr=cfg.train.lr, momentum=cfg.train.momentum, max_grad_norm=cfg.privacy.max_grad_norm,
                               noise_multiplier=PROBE_SIGMA, seed=cfg.seed)
        outcome = train_round(model, data, settings, request)
    if outcome.state_dict is None:
        raise RuntimeError(f"the fingerprint's hospital did not train: {outcome.status} {outcome.message}")
    model.load_state_dict(outcome.state_dict)
    weights = torch.cat([tensor.flatten().double() for tensor in outcome.state_dict.values()])
    test = evaluate(model, dataset.test.as_dataset()).metrics()
    return {
        "data": dataset.describe(),
        "partition": experiment.partition_rows,
        "plan": {"steps": plan.steps, "sample_rate": _significant(plan.sample_rate)},
        "epsilon_after_3_rounds": _significant(epsilon([PrivacyEvent(PROBE_SIGMA, plan.sample_rate, 3 * plan.steps)],
                                                       hospital.delta, cfg.privacy.accountant)),
        "round": {"status": str(outcome.status), "steps": outcome.steps, "epsilon": _significant(outcome.epsilon)},
        "weights": {"sum": _significant(weights.sum()), "norm": _significant(weights.norm())},
        "test": {name: _significant(test[name]) for name in ("auc", "accuracy", "loss") if name in test},
        "shown": format_epsilon(outcome.epsilon, PROBE_BUDGET),
    }


def relative_paths(notebook: nbformat.NotebookNode, folder: Path) -> None:
    """Show paths below `folder` (the kernel's working directory) relative to it in every saved output.

    The command-line tools print absolute paths; on a web page the machine's folders say nothing
    and the notebook's own ``outputs/...`` does.
    """
    prefix = f"{folder}/"
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if output.output_type == "stream":
                output.text = output.text.replace(prefix, "")
            for kind in ("text/plain", "text/markdown"):
                if kind in output.get("data", {}):
                    output.data[kind] = output.data[kind].replace(prefix, "")


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def execute(small: bool, output: Path) -> Path:
    """Run the notebook (full or small mode) with HERE as its working directory; write it to `output`."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    os.environ.pop(SMALL_ENV, None)
    if small:
        os.environ[SMALL_ENV] = "1"  # the kernel inherits this environment
    elif not (Path(os.environ.get("FEDPRIV_DATA_DIR", "")) / "pneumoniamnist.npz").is_file():
        raise SystemExit("full mode reads pneumoniamnist.npz from $FEDPRIV_DATA_DIR: set it (or pass --small)")
    started = time.monotonic()
    client = NotebookClient(notebook, kernel_name="python3", timeout=CELL_TIMEOUT_S, startup_timeout=180,
                            resources={"metadata": {"path": str(HERE)}})
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails
    relative_paths(notebook, HERE)
    notebook.metadata["fedpriv"] = {
        "mode": "small" if small else "full",
        "executed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.monotonic() - started),
        "commit": _commit(),
        "cells": cells_digest(notebook),
        "fingerprint": fingerprint(),
    }
    nbformat.write(notebook, output)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="synthetic small mode, written to a copy")
    parser.add_argument("--fingerprint", action="store_true", help="print the fingerprint only")
    args = parser.parse_args(argv)
    if args.fingerprint:
        print(json.dumps(fingerprint(), indent=1))
        return 0
    output = NOTEBOOK.with_name("walkthrough.small.ipynb") if args.small else NOTEBOOK
    print(f"executed into {execute(args.small, output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
