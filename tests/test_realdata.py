"""Real PneumoniaMNIST: one hospital of the default Dirichlet federation trains privately at epsilon 3.

Runs when FEDPRIV_DATA_DIR holds pneumoniamnist.npz (CI points it at ../shared/data and sets
FEDPRIV_REQUIRE_REALDATA=1, which turns a missing file into a failure instead of a skip).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from fedpriv.config import FedprivConfig
from fedpriv.experiment import prepare_experiment
from fedpriv.models import build_model
from fedpriv.privacy import plan_local_training
from fedpriv.training import evaluate, train_local

pytestmark = pytest.mark.realdata


@pytest.fixture(scope="module")
def real_experiment():
    folder = os.environ.get("FEDPRIV_DATA_DIR")
    if not folder or not (Path(folder) / "pneumoniamnist.npz").is_file():
        if os.environ.get("FEDPRIV_REQUIRE_REALDATA"):
            pytest.fail(f"FEDPRIV_REQUIRE_REALDATA is set but {folder}/pneumoniamnist.npz is missing")
        pytest.skip("set FEDPRIV_DATA_DIR to a folder holding pneumoniamnist.npz")
    return prepare_experiment(FedprivConfig())  # the defaults: 3 hospitals, Dirichlet(0.5)


@pytest.mark.slow
def test_one_hospital_trains_privately_at_epsilon_3(real_experiment):
    hospital = real_experiment.hospitals[0]
    data = real_experiment.hospital_data(0)
    config = real_experiment.config
    plan = plan_local_training(
        num_records=len(data), batch_size=config.train.batch_size, local_epochs=5, private=True,
        target_epsilon=hospital.epsilon, delta=hospital.delta, max_grad_norm=config.privacy.max_grad_norm,
    )
    torch.manual_seed(0)
    model = build_model("cnn", in_channels=1, num_classes=2, image_size=28)
    result = train_local(model, data.as_dataset(), plan, lr=0.2, momentum=0.9)
    spent = result.epsilon(hospital.delta)
    assert 2.5 < spent <= 3.0 + 0.05
    model.load_state_dict(result.state_dict)
    test = evaluate(model, real_experiment.dataset.test.as_dataset())
    print(f"\nhospital {hospital.name}: {len(data)} records, sigma={plan.noise_multiplier:.3f}, "
          f"epsilon={spent:.3f}, test AUC={test.auc:.3f}, accuracy={test.accuracy:.3f}")
    assert test.auc > 0.75  # one hospital's ~1,100 records at epsilon 3: useful, well above chance
