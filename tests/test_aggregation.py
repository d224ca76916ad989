"""The server's FedAvg and server-step arithmetic, against arrays worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from fedpriv.aggregation import sequential_weight, server_step, weighted_average, weighted_metrics


def test_weighted_average_weights_each_hospital_by_its_records():
    # (1*[0, 2] + 3*[4, 6]) / 4 = [12/4, 20/4] = [3, 5]
    states = [{"w": torch.tensor([0.0, 2.0]), "steps": torch.tensor(7)},
              {"w": torch.tensor([4.0, 6.0]), "steps": torch.tensor(9)}]
    averaged = weighted_average(states, [1.0, 3.0])
    assert torch.equal(averaged["w"], torch.tensor([3.0, 5.0]))
    assert averaged["steps"].item() == 7  # integer buffers are the first state's, not averaged


def test_weighted_average_with_equal_weights_is_the_plain_mean():
    states = [{"w": torch.tensor([[1.0, -1.0]])}, {"w": torch.tensor([[3.0, 1.0]])}, {"w": torch.tensor([[2.0, 3.0]])}]
    assert torch.allclose(weighted_average(states, [5.0, 5.0, 5.0])["w"], torch.tensor([[2.0, 1.0]]))


def test_server_step_moves_the_model_server_lr_times_the_averaged_update():
    old = {"w": torch.tensor([1.0, 1.0]), "count": torch.tensor(3)}
    averaged = {"w": torch.tensor([3.0, 0.0]), "count": torch.tensor(4)}
    # update = [2, -1]; 1.5 times it from [1, 1] = [4, -0.5]
    stepped = server_step(old, averaged, 1.5)
    assert torch.equal(stepped["w"], torch.tensor([4.0, -0.5]))
    assert stepped["count"].item() == 4
    assert torch.equal(server_step(old, averaged, 1.0)["w"], averaged["w"])  # 1.0: plain FedAvg


@pytest.mark.parametrize(("examples", "step", "expected"), [
    (100, "full", 1.0),
    (100, "share", 0.75),  # 3 hospitals * 100 / 400 records
    (200, "share", 1.0),  # 3 * 200 / 400 = 1.5, capped at 1
    (0, "share", 1.0),  # nothing known of its records: a full step
])
def test_sequential_weight(examples, step, expected):
    assert sequential_weight(examples, [examples, 100, 300 - examples], step) == pytest.approx(expected)


def test_sequential_weight_refuses_an_unknown_step():
    with pytest.raises(ValueError, match="sequential_step"):
        sequential_weight(1, [1], "half")


def test_weighted_metrics_average_by_records_and_say_they_are_not_dp_covered():
    rows = [{"num-examples": 10, "auc": 0.5, "loss": 1.0, "dp-covered": 0.0},
            {"num-examples": 30, "auc": 0.9},
            {"num-examples": 0, "auc": 0.0}]  # a hospital that shared nothing is left out
    merged = weighted_metrics(rows)
    assert merged == {"auc": pytest.approx((10 * 0.5 + 30 * 0.9) / 40), "num-examples": 40, "dp-covered": 0.0}
    assert weighted_metrics([{"num-examples": 0}]) is None
    assert not any(math.isnan(v) for v in merged.values())
