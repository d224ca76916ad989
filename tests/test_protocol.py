"""The wire vocabulary: one spelling of every key, codecs both sides share, defaults that agree."""

from __future__ import annotations

import dataclasses
import math

from fedpriv.config import PrivacyConfig, TrainConfig
from fedpriv.errors import LedgerError
from fedpriv.hospital import RoundOutcome, RoundRequest
from fedpriv.protocol import (
    Metric,
    Status,
    evaluation_metrics,
    figures_known,
    outcome_fields,
    outcome_metrics,
    told_to_server,
)


def test_a_round_requests_defaults_are_the_configs():
    """A request built with a field left out trains as the config's default would have it."""
    request = {f.name: f.default for f in dataclasses.fields(RoundRequest) if f.default is not dataclasses.MISSING}
    train, privacy = TrainConfig(), PrivacyConfig()
    for key in ("local_epochs", "batch_size", "lr", "lr_final", "momentum"):
        assert request[key] == getattr(train, key), key
    for key in ("max_grad_norm", "max_physical_batch_size"):
        assert request[key] == getattr(privacy, key), key


def test_an_outcome_travels_as_protocol_keys_and_its_status():
    outcome = RoundOutcome("hospital-1", Status.TRAINED, "trained with DP-SGD", num_examples=40, epsilon=1.5,
                           chain_head="abc")
    metrics = outcome_metrics(outcome)
    assert outcome.metrics() == metrics  # the hospital spells no key of its own
    assert metrics[Metric.NUM_EXAMPLES] == 40 and metrics[Metric.TRAINED] == 1 and metrics[Metric.EPSILON] == 1.5
    assert all(isinstance(key, str) and type(key) is str for key in metrics)  # plain str keys for Flower's records
    assert outcome_fields(outcome) == {"hospital": "hospital-1", "status": "trained", "message": "trained with DP-SGD",
                                       "chain-head": "abc", "accountant": "", "device": ""}
    assert outcome_fields(outcome, Status.OPEN)["status"] == "open"


def test_evaluation_metrics_are_finite_and_never_dp_covered():
    assert evaluation_metrics({"auc": 0.7, "ece": math.nan, "num-examples": 10}) == {
        "auc": 0.7, "num-examples": 10.0, "dp-covered": 0.0}


def test_unknown_figures_and_what_the_server_is_told():
    assert figures_known({"epsilon": 1.0}) and not figures_known({"epsilon": math.nan}) and not figures_known({})
    told = told_to_server(LedgerError("ledger /secret/path.db is corrupt", reason="its chain is broken"))
    assert "its chain is broken" in told and "/secret" not in told
