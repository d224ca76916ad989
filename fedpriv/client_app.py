"""Flower ClientApp: one hospital. Message handlers only; the work is in fedpriv.hospital.

- train: local training under the hospital's own ledger, or a clear locked/refused status. The
  reply carries the weights, the hospital's privacy figures and its ledger's chain head, nothing
  else computed from its records (no training loss: it would leak outside epsilon).
- evaluate: metrics on the hospital's private validation split (NOT covered by the DP guarantee),
  only where the hospital opted in (``share_validation_metrics``); otherwise a "declined" status.
- query: the hospital's name and budget state, so the server can map node ids to hospitals.

Who the hospital is comes from fedpriv.site (a simulated node's partition id) or
fedpriv.deployment.node (a deployed node's own node config); what a reply holds, from fedpriv.protocol.
"""

from __future__ import annotations

import logging
import math
import time

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedpriv.deployment.node import deployed_site
from fedpriv.errors import ConfigError, FedprivError
from fedpriv.faults import injected_corruption, injected_fault
from fedpriv.hospital import RoundOutcome, RoundRequest, budget_state, train_round
from fedpriv.protocol import (
    DECLINED,
    NOT_COVERED,
    Content,
    Metric,
    Status,
    evaluation_fields,
    evaluation_metrics,
    outcome_fields,
    outcome_metrics,
    told_to_server,
)
from fedpriv.site import HospitalSite, simulated_site
from fedpriv.training import evaluate

app = ClientApp()
log = logging.getLogger("fedpriv")


def _site(context: Context) -> HospitalSite:
    """Simulation nodes carry a partition id; a deployed hospital's node config names its own data."""
    if "partition-id" in context.node_config:
        return simulated_site(context.run_config, int(context.node_config["partition-id"]))
    return deployed_site(context)


def _reply(msg: Message, outcome: RoundOutcome, status: str | None = None) -> Message:
    return Message(content=RecordDict({Content.METRICS: MetricRecord(outcome_metrics(outcome)),
                                       Content.STATUS: ConfigRecord(outcome_fields(outcome, status))}), reply_to=msg)


def _unusable_site(msg: Message, context: Context, error: FedprivError) -> Message:
    """The reply of a hospital whose own setup (node config, data) is wrong: refused, with the one-line cause."""
    name = str(context.node_config.get("name", f"node-{context.node_id}"))
    log.error("hospital %s cannot take part: %s", name, error)
    return _reply(msg, RoundOutcome(name, Status.REFUSED, str(error), epsilon=math.nan))


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train one round under the hospital's budget; a spent budget is a status, not an error."""
    try:
        site = _site(context)
        model = site.global_model(msg.content[Content.ARRAYS].to_torch_state_dict())
        request = RoundRequest.from_record(dict(msg.content[Content.CONFIG]))
        request.check(site.num_classes, site.settings)
    except (FedprivError, TypeError, ValueError) as error:
        if not isinstance(error, FedprivError):  # a malformed request: refuse it, charge nothing
            error = ConfigError("config", "(the server's request)", f"malformed ({error})",
                                "send a request built by fedpriv's ServerApp")
        return _unusable_site(msg, context, error)
    try:
        outcome = train_round(model, site.train, site.settings, request, num_classes=site.num_classes,
                              after_charge=injected_fault(context.node_config, site.config, request.server_round))
    except FedprivError as error:  # e.g. a corrupt ledger or a full disk: refuse (fail closed), say why
        log.error("hospital %s: %s", site.settings.name, error)
        outcome = site.refusal(told_to_server(error))
    reply = _reply(msg, outcome)
    if outcome.state_dict is not None:
        reply.content[Content.ARRAYS] = ArrayRecord(injected_corruption(context.node_config, site.config,
                                                                        request.server_round, outcome.state_dict))
    return reply


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    """Evaluate the received model on the hospital's private validation split, if the hospital shares that."""
    try:
        site = _site(context)
        if not site.settings.share_validation_metrics:
            return _evaluation_reply(msg, site, Status.DECLINED, DECLINED, {Metric.NUM_EXAMPLES: 0})
        model = site.global_model(msg.content[Content.ARRAYS].to_torch_state_dict())
    except FedprivError as error:
        return _unusable_site(msg, context, error)
    metrics = {Metric.NUM_EXAMPLES: 0}
    started = time.perf_counter()
    if len(site.validation):
        metrics = evaluate(model, site.validation.as_dataset(), device=site.settings.device).metrics()
    metrics[Metric.EVAL_SECONDS] = time.perf_counter() - started
    return _evaluation_reply(msg, site, Status.EVALUATED, NOT_COVERED, metrics)


def _evaluation_reply(msg: Message, site: HospitalSite, status: Status, message: str, metrics: dict) -> Message:
    """Validation metrics are never covered by the DP guarantee: every reply says so (dp-covered 0)."""
    return Message(content=RecordDict({
        Content.METRICS: MetricRecord(evaluation_metrics(metrics)),
        Content.STATUS: ConfigRecord(evaluation_fields(site.settings.name, status, message))}), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Report the hospital's name and current budget state (reads the ledger, spends nothing)."""
    try:
        site = _site(context)
    except FedprivError as error:
        return _unusable_site(msg, context, error)
    try:
        state = budget_state(site.settings, site.train)
        status = Status.LOCKED if state.locked else Status.OPEN
    except FedprivError as error:
        log.error("hospital %s: %s", site.settings.name, error)
        state, status = site.refusal(told_to_server(error)), Status.REFUSED
    state.num_examples = len(site.train)
    return _reply(msg, state, status)
