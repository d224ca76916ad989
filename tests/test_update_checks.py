"""Hostile or broken updates are rejected before aggregation, and the round goes on without them."""

from __future__ import annotations

import collections
import logging
import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from test_federation import federate

from fedpriv.update_checks import (
    MAX_REPLY_KEYS,
    MAX_REPLY_TEXT,
    evaluation_reply_problem,
    metrics_problem,
    norm_outliers,
    reply_figures_problem,
    reply_text_problem,
    update_norm,
    weights_problem,
)

REFERENCE = {"w": torch.zeros(3, 2), "b": torch.zeros(2), "steps": torch.tensor(0)}
GOOD_METRICS = {"num-examples": 50, "epsilon": 1.0, "budget-epsilon": 3.0, "delta": 1e-5}
TRAINED_METRICS = {**GOOD_METRICS, "trained": 1}  # a trained reply's metrics say so


@pytest.mark.parametrize(("update", "reason"), [
    ({"w": torch.full((3, 2), math.nan), "b": torch.zeros(2), "steps": torch.tensor(0)}, "NaN or Inf"),
    ({"w": torch.full((3, 2), math.inf), "b": torch.zeros(2), "steps": torch.tensor(0)}, "NaN or Inf"),
    ({"w": torch.zeros(2, 3), "b": torch.zeros(2), "steps": torch.tensor(0)}, "shape"),
    ({"w": torch.zeros(3, 2, dtype=torch.float64), "b": torch.zeros(2), "steps": torch.tensor(0)}, "dtype"),
    ({"w": torch.zeros(3, 2), "steps": torch.tensor(0)}, "missing keys"),
    ({**REFERENCE, "extra": torch.zeros(1)}, "unexpected keys"),
])
def test_broken_weights_are_named(update, reason):
    assert reason in weights_problem(REFERENCE, update)


def test_good_weights_pass():
    assert weights_problem(REFERENCE, {k: v + 1 if v.is_floating_point() else v for k, v in REFERENCE.items()}) is None


@pytest.mark.parametrize(("change", "reason"), [
    ({"num-examples": None}, "missing"),
    ({"num-examples": -1}, "non-negative"),
    ({"num-examples": 51}, "declared"),
    ({"epsilon": 0.5}, "down"),
    ({"budget-epsilon": 9.0}, "budget went up"),
    ({"delta": 1e-3}, "delta changed"),
])
def test_unbelievable_metrics_are_named(change, reason):
    metrics = {**GOOD_METRICS, **change}
    problem = metrics_problem(metrics, declared_examples=50, last_epsilon=0.8, last_budget=3.0, last_delta=1e-5)
    assert reason in problem
    assert metrics_problem(GOOD_METRICS, declared_examples=50, last_epsilon=0.8, last_budget=3.0,
                           last_delta=1e-5) is None


def test_norm_outliers_need_company_and_use_the_median():
    assert norm_outliers({"a": 1.0, "b": 100.0}, [], 10) == {}
    flagged = norm_outliers({"a": 1.0, "b": 1.2, "c": 50.0}, [], 10)
    assert list(flagged) == ["c"] and "median" in flagged["c"]
    assert norm_outliers({"a": 1.0, "b": 9.0}, [1.0, 1.1], 10) == {}
    assert update_norm(REFERENCE, {**REFERENCE, "w": torch.full((3, 2), 2.0)}) == pytest.approx(math.sqrt(24))


GOOD_FIELDS = {"hospital": "hospital-1", "status": "trained", "message": "trained with DP-SGD",
               "chain-head": "ab" * 32, "accountant": "prv", "device": "cuda:0"}


def _figures_problem(fields, metrics=TRAINED_METRICS):
    return reply_figures_problem(metrics, str(fields.get("status", "trained")), declared_examples=50,
                                 last_epsilon=0.8, last_budget=3.0, last_delta=1e-5, fields=fields)


def test_a_normal_reply_passes_the_text_checks():
    assert _figures_problem(GOOD_FIELDS) is None
    # Long but honest text (a refusal's reason), up to the limit, with non-ASCII letters and symbols.
    message = ("request refused, nothing charged: epsilon 2.99 of 3 \u2264 \u221e, H\u00f4pital " * 20)[:MAX_REPLY_TEXT]
    assert _figures_problem({**GOOD_FIELDS, "status": "refused", "message": message}) is None


@pytest.mark.parametrize("trained", [0, None])
def test_a_reply_that_says_it_trained_but_whose_metrics_say_not_is_named(trained):
    metrics = GOOD_METRICS | ({} if trained is None else {"trained": trained})
    assert _figures_problem(GOOD_FIELDS, metrics) == "status 'trained' but metric 'trained' is not 1"


def test_a_huge_string_in_a_reply_is_refused_and_named():
    problem = _figures_problem({**GOOD_FIELDS, "device": "x" * 10_000})
    assert problem == f"status field 'device' is 10000 characters long, over the limit of {MAX_REPLY_TEXT}"
    assert "x" * 50 not in problem
    problem = _figures_problem({**GOOD_FIELDS, "message": "m" * (MAX_REPLY_TEXT + 1)})
    assert "'message'" in problem and f"{MAX_REPLY_TEXT + 1} characters" in problem
    # The status string the server always reads, and a metric's name, are bounded too.
    assert "'status'" in reply_figures_problem(GOOD_METRICS, "t" * 10_000, declared_examples=50, last_epsilon=0.8,
                                               last_budget=3.0, last_delta=1e-5)
    assert "metric name" in _figures_problem(GOOD_FIELDS, {**GOOD_METRICS, "k" * 10_000: 1.0})


@pytest.mark.parametrize(("key", "value"), [
    ("message", "trained with DP-SGD\nround 9: every hospital within budget"),
    ("message", "ok\r"),
    ("accountant", "prv\x1b[2J"),
    ("device", "cpu\u2028forged line"),
    ("device", "cpu\u202e"),  # a right-to-left override would hide what follows
])
def test_a_line_break_or_control_character_in_a_reply_is_refused(key, value):
    problem = _figures_problem({**GOOD_FIELDS, key: value})
    assert problem.startswith(f"status field '{key}' contains the control character U+")
    assert "\n" not in problem and "\r" not in problem and "\x1b" not in problem


def test_a_hostile_key_is_refused_without_being_repeated():
    problem = reply_text_problem({"device\nforged": "cpu"})
    assert problem.startswith("the status field name 'device\\nforged' contains") and "\n" not in problem
    problem = reply_text_problem({"k" * 10_000: "cpu"})
    assert "10000 characters" in problem and len(problem) < 200


def _poison_weights(value):
    def tamper(reply):
        state = reply.content["arrays"].to_torch_state_dict()
        first = next(iter(state))
        state[first] = torch.full_like(state[first], value)
        reply.content["arrays"] = ArrayRecord(state)
        return reply
    return tamper


def _inflate_examples(reply):
    metrics = dict(reply.content["metrics"])
    metrics["num-examples"] = 10_000
    reply.content["metrics"] = MetricRecord(metrics)
    return reply


def _forge_log_line(reply):
    metrics = dict(reply.content["metrics"])
    metrics["epsilon\nround 1: every hospital trained"] = 0.0
    reply.content["metrics"] = MetricRecord(metrics)
    return reply


def _status_field(key, value):
    def tamper(reply):
        reply.content["status"] = ConfigRecord({**dict(reply.content["status"]), key: value})
        return reply
    return tamper


def _trained_metric(value):
    """Status 'trained', weights attached, but the 'trained' metric says otherwise (None: it is left out)."""
    def tamper(reply):
        metrics = dict(reply.content["metrics"])
        metrics.pop("trained") if value is None else metrics.update({"trained": value})
        reply.content["metrics"] = MetricRecord(metrics)
        return reply
    return tamper


@pytest.mark.slow
@pytest.mark.parametrize(("tamper", "reason"), [
    (_status_field("device", "cuda" * 2_500), "'device' is 10000 characters long"),
    (_trained_metric(0), "metric 'trained' is not 1"),
    (_trained_metric(None), "metric 'trained' is not 1"),  # once a KeyError that stopped the server
    (_status_field("message", "trained\nround 1: hospital-1 refused"), "'message' contains the control character"),
    (_poison_weights(math.nan), "NaN or Inf"),
    (_poison_weights(1e6), "median"),
    (_inflate_examples, "declared"),
    (_forge_log_line, "control character U+000A"),
])
def test_a_hostile_hospital_is_rejected_and_named_and_the_round_goes_on(tmp_path, tamper, reason):
    strategy, grid, run_dir = federate(tmp_path, "strategy.num_rounds=1",
                                       grid_hook=lambda g: g.tamper.update({(g.node_ids[2], 1): tamper}))
    record = strategy.history[0]
    assert record.hospitals["hospital-3"]["status"] == "rejected"
    assert reason in record.hospitals["hospital-3"]["message"]
    assert sorted(record.trained) == ["hospital-1", "hospital-2"]
    final = torch.load(run_dir / "model.pt", weights_only=True)
    assert all(torch.isfinite(t).all() and t.abs().max() < 1e3 for t in final.values() if t.is_floating_point())


def test_a_hospital_whose_query_answer_is_unloggable_takes_no_part(tmp_path, caplog):
    """Its name and message would reach the log and the run directory: a 10,000-character name keeps
    it out of the run (named by node id, never repeated), and the others train."""
    def huge_name(reply):
        return _status_field("hospital", "h" * 10_000)(reply)

    with caplog.at_level(logging.WARNING, logger="fedpriv"):
        strategy, grid, _ = federate(tmp_path, "strategy.num_rounds=1",
                                     grid_hook=lambda g: g.tamper_query.update({g.node_ids[2]: huge_name}))
    assert sorted(strategy.history[0].trained) == ["hospital-1", "hospital-2"]
    assert "h" * 10_000 not in caplog.text and "h" * 10_000 not in str(strategy.history[0].hospitals)
    warning = next(r.getMessage() for r in caplog.records if "hospital query is unusable" in r.getMessage())
    assert f"node {grid.node_ids[2]}" in warning and "'hospital' is 10000 characters long" in warning


GOOD_EVALUATION = ({"num-examples": 40, "accuracy": 0.8, "auc": 0.9, "dp-covered": 0.0},
                   {"hospital": "hospital-1", "status": "evaluated", "message": "not covered by DP"})


@pytest.mark.parametrize(("metrics", "fields", "reason"), [
    (None, GOOD_EVALUATION[1], "lacks its metrics"),
    (GOOD_EVALUATION[0], None, "lacks its metrics"),
    ({**GOOD_EVALUATION[0], "accuracy": math.nan}, GOOD_EVALUATION[1], "'accuracy' is not a finite number"),
    ({**GOOD_EVALUATION[0], "auc": math.inf}, GOOD_EVALUATION[1], "'auc' is not a finite number"),
    ({**GOOD_EVALUATION[0], "auc": [0.1, 0.2]}, GOOD_EVALUATION[1], "'auc' is not a finite number"),
    ({**GOOD_EVALUATION[0], "num-examples": -5}, GOOD_EVALUATION[1], "'num-examples' is negative"),
    ({**GOOD_EVALUATION[0], "auc\nround 1: forged": 0.5}, GOOD_EVALUATION[1], "control character U+000A"),
    ({**GOOD_EVALUATION[0], "k" * 10_000: 0.5}, GOOD_EVALUATION[1], "10000 characters"),
    (GOOD_EVALUATION[0], {**GOOD_EVALUATION[1], "message": "x\x1b[2J"}, "control character U+001B"),
    ({**GOOD_EVALUATION[0], **{f"m{i}": 0.0 for i in range(MAX_REPLY_KEYS)}}, GOOD_EVALUATION[1],
     f"metrics, over the limit of {MAX_REPLY_KEYS}"),
])
def test_an_evaluation_reply_that_cannot_be_recorded_is_named(metrics, fields, reason):
    problem = evaluation_reply_problem(metrics, fields)
    assert problem is not None and reason in problem and "\n" not in problem and len(problem) < 200


def test_fedprivs_own_evaluation_reply_passes():
    assert evaluation_reply_problem(*GOOD_EVALUATION) is None


def test_a_training_reply_with_too_many_metrics_is_refused():
    problem = reply_text_problem({"status": "trained"}, {**GOOD_METRICS, **{f"m{i}": 0.0 for i in range(100)}})
    assert problem == f"the reply holds 104 metrics, over the limit of {MAX_REPLY_KEYS}"
    assert reply_text_problem({"status": "trained"}, GOOD_METRICS) is None


def _poison_evaluation(reply):
    metrics = dict(reply.content["metrics"])
    metrics.update({"accuracy": math.nan, "num-examples": 1e9, "auc\nround 1: every hospital trained": 1.0})
    reply.content["metrics"] = MetricRecord(metrics)
    return reply


def test_a_hostile_evaluation_reply_is_left_out_of_the_record_and_the_mean(tmp_path, caplog, monkeypatch):
    """Validation figures are not privacy figures, but they reach the log, metrics.json and the mean of
    every hospital's figures: a NaN with a huge weight, or a forged log line, is left out and named."""
    from fedpriv.strategy import BudgetAwareStrategy

    means = []
    aggregate = BudgetAwareStrategy.aggregate_evaluate
    monkeypatch.setattr(BudgetAwareStrategy, "aggregate_evaluate",
                        lambda self, server_round, replies: means.append(aggregate(self, server_round, replies))
                        or means[-1])
    with caplog.at_level(logging.WARNING, logger="fedpriv"):
        strategy, _, run_dir = federate(tmp_path, "strategy.num_rounds=1", "strategy.client_evaluate=true",
                                        grid_hook=lambda g: g.tamper_evaluate.update({g.node_ids[2]: _poison_evaluation}))
    record = strategy.history[0]
    assert sorted(record.client_evaluation) == ["hospital-1", "hospital-2"]
    assert sorted(record.trained) == ["hospital-1", "hospital-2", "hospital-3"]  # its training still counts
    rows = list(record.client_evaluation.values())
    total = sum(row["num-examples"] for row in rows)
    [mean] = means  # the weighted mean of the two good hospitals alone, finite
    assert mean["num-examples"] == total < 1e9
    assert mean["accuracy"] == pytest.approx(sum(row["accuracy"] * row["num-examples"] for row in rows) / total)
    warning = next(r.getMessage() for r in caplog.records if "evaluation reply is left out" in r.getMessage())
    assert "hospital-3" in warning and "control character U+000A" in warning
    lines = caplog.text.splitlines() + (run_dir / "metrics.json").read_text().splitlines()
    assert not any(line.lstrip().startswith("round 1: every hospital trained") for line in lines)


def _raise_budget(reply):
    metrics = dict(reply.content["metrics"])
    metrics.update({"budget-epsilon": 1e9, "epsilon": 0.5})
    reply.content["metrics"] = MetricRecord(metrics)
    return reply


def _drop_metrics(reply):
    reply.content = RecordDict({"status": reply.content["status"]})
    return reply


@pytest.mark.parametrize(("lie", "reason"), [(_raise_budget, "budget went up from 3 to 1e+09"),
                                             (_drop_metrics, "lacks its metrics or status")])
def test_a_crashed_hospitals_unbelievable_ledger_figures_change_nothing(tmp_path, caplog, lie, reason):
    """After a hospital's training reply is an error, the server asks for its ledger figures (it may
    have charged before it crashed). That answer is checked as a training reply's figures are."""
    answers = []

    def second_answer_lies(reply):  # the opening query is answered honestly, the one after the crash not
        answers.append(reply)
        return reply if len(answers) == 1 else lie(reply)

    def hook(grid):
        grid.fail.add((grid.node_ids[2], 1))
        grid.tamper_query[grid.node_ids[2]] = second_answer_lies

    with caplog.at_level(logging.WARNING, logger="fedpriv"):
        strategy, _, run_dir = federate(tmp_path, "strategy.num_rounds=1", grid_hook=hook)
    assert len(answers) == 2  # the server did ask again after the crash
    hospital = next(h for h in strategy.hospitals if h.name == "hospital-3")
    assert hospital.budget_epsilon == 3.0 and hospital.epsilon == 0.0
    warning = next(r.getMessage() for r in caplog.records if "figures after its crash are left out" in r.getMessage())
    assert "hospital-3" in warning and reason in warning
    assert "1e+09" not in (run_dir / "summary.md").read_text()


def test_a_reply_is_matched_to_the_node_it_was_asked_of_not_its_sender():
    from fedpriv.strategy import _answered_node, _destinations

    class Meta:
        def __init__(self, message_id="", dst=0, reply_to="", src=0):
            self.message_id, self.dst_node_id = message_id, dst
            self.reply_to_message_id, self.src_node_id = reply_to, src

    class Msg:
        def __init__(self, **kw):
            self.metadata = Meta(**kw)

    asked = _destinations([Msg(message_id="a", dst=11), Msg(message_id="b", dst=12)])
    assert asked == {"a": 11, "b": 12}
    assert _answered_node(Msg(reply_to="b", src=0), asked) == 12  # the SuperLink's own error reply (node 0)
    assert _answered_node(Msg(reply_to="zzz", src=99), asked) == 99  # not a reply to anything asked


@pytest.mark.slow
def test_sequential_continues_from_the_last_good_weights_after_a_rejection(tmp_path):
    strategy, grid, _ = federate(tmp_path, "strategy=sequential", "strategy.num_rounds=1",
                                 grid_hook=lambda g: g.tamper.update({(g.node_ids[1], 1): _poison_weights(math.inf)}))
    (_, first_reply), _, (third_message, _) = grid.train_exchanges()
    first, third = first_reply.content["arrays"].to_torch_state_dict(), third_message.content["arrays"].to_torch_state_dict()
    assert all(torch.equal(first[k], third[k]) for k in first)
    assert strategy.history[0].hospitals["hospital-2"]["status"] == "rejected"


@pytest.mark.slow
def test_a_parallel_round_decodes_each_replys_weights_once(tmp_path, monkeypatch):
    """The checks, the outlier test and the average share one decoding of a reply's weights: per
    reply the server's cost, the one that grows with the number of hospitals."""
    decoded = collections.Counter()
    decode = ArrayRecord.to_torch_state_dict

    def counted(self, *args, **kwargs):
        decoded[id(self)] += 1
        return decode(self, *args, **kwargs)

    monkeypatch.setattr(ArrayRecord, "to_torch_state_dict", counted)
    strategy, grid, _ = federate(tmp_path, "strategy.num_rounds=2", "strategy.server_lr=1.5")
    replies = [reply for _, reply in grid.train_exchanges()]
    assert len(replies) == 6 and all(r is not None and not r.has_error() for r in replies)
    assert [decoded[id(r.content["arrays"])] for r in replies] == [1] * 6
    assert all(sorted(record.trained) == ["hospital-1", "hospital-2", "hospital-3"] for record in strategy.history)
