"""What the server keeps about each hospital, from plain reply mappings (no Flower)."""

from __future__ import annotations

import math

from fedpriv.protocol import Metric, Status, privacy_metrics
from fedpriv.roster import ROLLED_BACK, HospitalState, RoundRecord, Roster, hospital_names


def _metrics(epsilon=1.0, chain=3, **extra):
    return {Metric.EPSILON: epsilon, Metric.DELTA: 1e-5, Metric.BUDGET_EPSILON: 3.0, Metric.LOCKED: 0,
            Metric.NUM_EXAMPLES: 50, Metric.CHAIN_LENGTH: chain, **extra}


def test_update_takes_the_replys_figures_and_its_chain_witness():
    state = HospitalState(1, "a", unreported_since=2)
    state.update(_metrics(max_epsilon_per_round=0.5), Status.OPEN, {"chain-head": "abc", "accountant": "rdp"})
    assert (state.epsilon, state.budget_epsilon, state.num_examples, state.chain_length) == (1.0, 3.0, 50, 3)
    assert (state.chain_head, state.accountant, state.unreported_since, state.locked) == ("abc", "rdp", None, False)
    state.update(_metrics(), Status.LOCKED)
    assert state.locked  # a locked status locks it even if the metric says otherwise


def test_a_shorter_chain_or_another_head_is_a_rolled_back_ledger():
    state = HospitalState(1, "a", chain_length=3, chain_head="abc")
    assert state.chain_problem(_metrics(chain=4), {"chain-head": "def"}) is None
    assert state.chain_problem(_metrics(chain=3), {"chain-head": "abc"}) is None
    assert state.chain_problem(_metrics(chain=2), {"chain-head": "abc"}).startswith(ROLLED_BACK)
    assert state.chain_problem(_metrics(chain=3), {"chain-head": "xyz"}).startswith(ROLLED_BACK)
    assert state.chain_problem(_metrics(epsilon=math.nan, chain=0), {}) is None  # no figures: nothing to witness


def test_the_roster_orders_rejects_and_excludes():
    roster = Roster()
    roster.admit([HospitalState(2, "b"), HospitalState(1, "a"), HospitalState(3, "c", locked=True)])
    assert [h.name for h in roster.active()] == ["a", "b"]
    shuffled = {tuple(h.name for h in roster.training_order(r, shuffle=True, seed=1)) for r in range(1, 20)}
    assert shuffled == {("a", "b"), ("b", "a")}
    assert [h.name for h in roster.training_order(5, shuffle=True, seed=1)] == \
           [h.name for h in roster.training_order(5, shuffle=True, seed=1)]  # repeatable by seed and round
    record = RoundRecord(4)
    roster.reject(record, roster.by_node(1), Status.FAILED, "crashed")
    roster.reject(record, roster.by_name("b"), Status.REJECTED, f"{ROLLED_BACK}: 2 after 3", figures_lost=True)
    assert [h.name for h in roster.crashed(record)] == ["a"]
    assert roster.by_node(1).unreported_since == 4 and roster.by_node(1).failures == 1
    assert roster.by_node(2).rolled_back and "b" in roster.excluded and roster.active() == [roster.by_node(1)]
    assert roster.by_node(99) is None


def test_a_round_in_which_every_hospital_refused_or_is_locked_trains_nobody():
    assert RoundRecord(1, {"a": {"status": Status.REFUSED}, "b": {"status": "locked"}}).nobody_could_train
    assert not RoundRecord(1, {"a": {"status": Status.REFUSED}, "b": {"status": "trained"}}).nobody_could_train
    assert not RoundRecord(1, {"a": {"status": Status.FAILED}}).nobody_could_train
    assert not RoundRecord(1).nobody_could_train


def test_privacy_metrics_report_the_largest_epsilon_and_each_hospitals_never_an_average():
    assert privacy_metrics({"a": 1.0, "b": 2.5}, 1) == {"epsilon-max": 2.5, "hospitals-locked": 1.0,
                                                       "epsilon/a": 1.0, "epsilon/b": 2.5}
    assert privacy_metrics({}, 0)["epsilon-max"] == 0.0


def test_registered_names_win_and_duplicates_are_kept_apart():
    assert hospital_names({1: "a", 2: "b"}, {}) == {1: "a", 2: "b"}
    assert hospital_names({1: "a", 2: "b"}, {1: "x"}) == {1: "x", 2: "node-2"}
    assert hospital_names({1: "a", 2: "a"}, {}) == {1: "a#1", 2: "a#2"}
