"""A hostile server cannot make a hospital leak, burn or lock its budget, or misreport what it did."""

from __future__ import annotations

import dataclasses

import pytest
from flwr.app import ConfigRecord, MetricRecord
from test_federation import federate, hospital_records, ledger_of

from fedpriv import client_app
from fedpriv.devices import resolve_device
from fedpriv.privacy.ledger import read_ledger
from independent_accounting import events_epsilon


def _chain(run_dir, index):
    with read_ledger(ledger_of(run_dir)) as ledger:
        return ledger.status(hospital_records(run_dir, index))


@pytest.mark.slow
@pytest.mark.parametrize("field,value", [
    ("max_grad_norm", 0.0), ("max_physical_batch_size", 0), ("batch_size", 0), ("local_epochs", 400),
    ("noise_multiplier", 0.01), ("lr", float("nan")), ("momentum", 1.5),
])
def test_a_crafted_training_request_is_refused_and_charges_nothing(tmp_path, field, value):
    def craft(grid):
        real = grid.send_and_receive

        def send(messages, timeout=None):
            for message in messages:
                if message.metadata.message_type == "train" and message.content["config"]["server_round"] == 2:
                    message.content["config"][field] = value
            return real(messages, timeout=timeout)

        grid.send_and_receive = send

    strategy, _, run_dir = federate(tmp_path, "strategy.num_rounds=3", grid_hook=craft)
    second = strategy.history[1]
    assert all(row["status"] == "refused" for row in second.hospitals.values())
    assert all("nothing was trained or charged" in row["message"] for row in second.hospitals.values())
    with read_ledger(ledger_of(run_dir)) as ledger:
        assert {e.round for e in ledger.events()} == {1}  # round 2 charged nothing, anywhere
        assert not ledger.status().locked


@pytest.mark.slow
def test_a_ledger_rolled_back_behind_the_servers_back_is_reported_and_excluded(tmp_path):
    def roll_back(grid):
        node = grid.node_ids[1]

        def shorter(reply):  # what a hospital whose ledger file was replaced by an older copy reports
            metrics = dict(reply.content["metrics"])
            metrics["chain-length"] = 2
            reply.content["metrics"] = MetricRecord(metrics)
            return reply

        grid.tamper[(node, 2)] = shorter

    strategy, grid, run_dir = federate(tmp_path, "strategy.num_rounds=3", grid_hook=roll_back)
    assert strategy.history[1].hospitals["hospital-2"]["status"] == "rejected"
    assert "ledger went backwards" in strategy.excluded["hospital-2"]
    assert "hospital-2" not in strategy.history[2].order  # not asked again
    assert "ledger went backwards" in (run_dir / "summary.md").read_text()


@pytest.mark.slow
def test_the_report_says_what_the_hospitals_did_not_what_the_run_config_asked(tmp_path, monkeypatch):
    # The run config asks for RDP and seeded noise; these hospitals' own settings say PRV and fresh
    # entropy (as a deployed hospital's node config would).
    real = client_app.simulated_site

    def own_settings(run_config, partition_id):
        site = real(run_config, partition_id)
        budget = 2.5 if partition_id == 0 else site.settings.budget_epsilon  # its own budget, not the config's 3
        return dataclasses.replace(site, settings=dataclasses.replace(site.settings, accountant="prv",
                                                                      noise_seed=None, budget_epsilon=budget))

    monkeypatch.setattr(client_app, "simulated_site", own_settings)
    strategy, _, run_dir = federate(tmp_path, "privacy.accountant=rdp", "privacy.noise_seed=1234",
                                    "strategy.num_rounds=1")
    summary = (run_dir / "summary.md").read_text()
    assert "accountant prv" in summary and "asked for rdp" in summary
    assert "WARNING" not in summary and "no hospital used it" in summary
    assert "budgets are the hospitals' own, not the run config's privacy.epsilon=3: hospital-1 2.5\n" in summary
    result = __import__("json").loads((run_dir / "result.json").read_text())
    assert result["noise_seeded"] is False and set(result["accountants"].values()) == {"prv"}
    assert all(h.accountant == "prv" and not h.noise_seeded for h in strategy.hospitals)
    assert _chain(run_dir, 0).accountant == "prv"


def test_a_status_record_cannot_smuggle_more_than_its_fields(tmp_path):
    strategy, grid, _ = federate(tmp_path, "strategy.num_rounds=1")
    for _, reply in grid.train_exchanges():
        # "device": the torch device it trained on (its hardware, nothing computed from its records).
        assert set(dict(reply.content["status"])) == {"hospital", "status", "message", "chain-head", "accountant",
                                                      "device"}
        assert dict(reply.content["status"])["device"] == resolve_device("auto")  # the run's device=auto, here
        assert isinstance(reply.content["status"], ConfigRecord)
        assert not any("loss" in key for key in dict(reply.content["metrics"]))


@pytest.mark.slow
def test_simulated_hospitals_enforce_and_report_their_own_limits(tmp_path):
    # Each hospital's own entry in the hospital list sets its limits; the server's fixed sigma 2 and
    # four rounds ask for more than hospital a's per-run cap and less noise than hospital c accepts.
    strategy, _, run_dir = federate(
        tmp_path, "privacy.noise_multiplier=2.0", "privacy.epsilon=50", "strategy.num_rounds=4",
        "federation.hospitals=[{name: a, max_epsilon_per_run: 2.0}, {name: b}, {name: c, min_noise_multiplier: 3.0}]")
    rows = {name: [record.hospitals[name] for record in strategy.history] for name in ("a", "b", "c")}
    assert all(row["status"] == "trained" for row in rows["b"])
    assert all(row["status"] == "refused" and "privacy.noise_multiplier" in row["message"] for row in rows["c"])
    assert rows["a"][0]["status"] == "trained" and rows["a"][-1]["status"] == "refused"
    assert "per-run cap of 2" in rows["a"][-1]["message"]
    with read_ledger(ledger_of(run_dir)) as ledger:
        events = ledger.events()
        assert {e.hospital for e in events} == {"a", "b"}  # c's refusals charged nothing
        a_events = [e for e in events if e.hospital == "a"]
        assert events_epsilon(a_events, ledger.delta, ledger.accountant) <= 2.0 * 1.03
    summary = (run_dir / "summary.md").read_text()
    assert "caps: round / run" in summary and "| a |" in summary and "none / 2 |" in summary
    result = __import__("json").loads((run_dir / "result.json").read_text())
    assert {h["hospital"]: h["max_epsilon_per_run"] for h in result["hospitals"]}["a"] == 2.0
