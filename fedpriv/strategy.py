"""A budget-aware Flower strategy: parallel (FedAvg) or sequential (cyclic weight transfer) rounds.

The strategy learns each node's budget state by asking (QUERY). A hospital's name is the one the
coordinator registered its SuperNode key under (`flwr supernode register KEY --name NAME`; the
SuperLink binds that name to the node id it authenticates, and the ServerApp reads it with
`grid.get_nodes()`), never the name a node calls itself; only where no node carries a registered name
(simulation) does the node's own name count (:func:`fedpriv.roster.hospital_names`). It never asks a
locked hospital again, and ends the run early, saying why, when no hospital can train. Privacy figures
are reported per hospital and as a maximum: a weighted average of epsilons would mean nothing. A
hospital that fails or times out is logged and skipped; the round goes on with the rest.

This module holds the messaging and the round loop only: what the server knows of each hospital is
in :mod:`fedpriv.roster`, the checks on a reply in :mod:`fedpriv.update_checks`, the FedAvg and
server-step arithmetic in :mod:`fedpriv.aggregation`, the message keys in :mod:`fedpriv.protocol`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from fedpriv.aggregation import sequential_weight, server_step, weighted_average, weighted_metrics
from fedpriv.config import MAX_IN_FLIGHT, SEQUENTIAL_STEPS
from fedpriv.message_window import send_and_receive
from fedpriv.protocol import Content, Field, Metric, Status, figures_known, says_trained
from fedpriv.roster import HospitalState, Roster, RoundRecord, hospital_names
from fedpriv.update_checks import (evaluation_reply_problem, norm_outliers, reply_figures_problem, reply_text_problem,
                                   reply_weights_problem, update_norm)

log = logging.getLogger("fedpriv")

# How long to wait for a crashed hospital's budget state before keeping its last reported figures.
QUERY_TIMEOUT_S = 60.0

PARALLEL, SEQUENTIAL = "parallel", "sequential"

# Sequential mode: "full" takes each hospital's returned weights as they are (see sequential_weight).
FULL_STEP = SEQUENTIAL_STEPS[0]


RoundCallback = Callable[[RoundRecord, ArrayRecord, list[HospitalState]], None]


class Trained(NamedTuple):
    """A trained reply that passed the checks, with its weights decoded once (a round decodes each
    reply's weights once, not once per check: the cost that grows with the number of hospitals)."""

    reply: Message
    state: dict[str, torch.Tensor]

    @property
    def num_examples(self) -> float:
        return float(self.reply.content[Content.METRICS][Metric.NUM_EXAMPLES])


class BudgetAwareStrategy(Strategy):
    """Parallel or sequential training over hospitals that enforce their own privacy budgets."""

    def __init__(
        self,
        *,
        mode: str = PARALLEL,
        expected_hospitals: int,
        shuffle_order: bool = False,
        seed: int = 0,
        client_evaluate: bool = False,
        discovery_timeout: float = 300.0,
        max_update_norm_ratio: float = 10.0,
        server_lr: float = 1.0,
        sequential_step: str = FULL_STEP,
        max_in_flight: int = MAX_IN_FLIGHT,
        on_round_end: RoundCallback | None = None,
    ) -> None:
        if mode not in (PARALLEL, SEQUENTIAL):
            raise ValueError(f"mode must be {PARALLEL!r} or {SEQUENTIAL!r}, got {mode!r}")
        if sequential_step not in SEQUENTIAL_STEPS:
            raise ValueError(f"sequential_step must be one of {SEQUENTIAL_STEPS}, got {sequential_step!r}")
        self.mode = mode
        self.expected_hospitals = expected_hospitals
        self.shuffle_order = shuffle_order
        self.seed = seed
        self.client_evaluate = client_evaluate
        self.discovery_timeout = discovery_timeout
        self.on_round_end = on_round_end
        self.max_update_norm_ratio = max_update_norm_ratio
        self.server_lr = server_lr  # parallel: global += server_lr * (weighted mean - global)
        self.sequential_step = sequential_step  # sequential: see fedpriv.aggregation.sequential_weight
        self.max_in_flight = max_in_flight  # messages waiting at the SuperLink at once (0: all): message_window
        self.accepted_norms: list[float] = []  # norms of accepted updates so far (outlier reference)
        self.roster = Roster()
        self.history: list[RoundRecord] = []
        self.stop_reason = ""
        self.timeout: float | None = None

    @property
    def hospitals(self) -> list[HospitalState]:
        return self.roster.hospitals

    @property
    def excluded(self) -> dict[str, str]:
        """Hospitals kept out of the run (refused at discovery, or a rolled-back ledger) -> why."""
        return self.roster.excluded

    # ------------------------------------------------------------------ discovery

    def discover(self, grid: Grid) -> list[HospitalState]:
        """Wait for the expected hospitals to connect, then ask each who it is and its budget state."""
        deadline = time.monotonic() + self.discovery_timeout
        node_ids = sorted(grid.get_node_ids())
        while len(node_ids) < self.expected_hospitals and time.monotonic() < deadline:
            time.sleep(0.5)
            node_ids = sorted(grid.get_node_ids())
        if len(node_ids) < self.expected_hospitals:
            log.warning("only %d of %d hospitals connected within %.0fs; continuing with them",
                        len(node_ids), self.expected_hospitals, self.discovery_timeout)
        queries, answers = [_query(node) for node in node_ids], []
        for node, reply in self._exchange(grid, queries, self.timeout):
            if reply.has_error():
                log.warning("node %s did not answer the hospital query: %s", node, reply.error.reason)
                continue
            # Its name and message reach the logs and the run directory: bounded, one line each.
            fields, metrics = reply.content.get(Content.STATUS), reply.content.get(Content.METRICS)
            problem = ("reply lacks its status or metrics" if fields is None or metrics is None
                       else reply_text_problem(dict(fields), dict(metrics)))
            if problem:
                log.warning("node %s: its answer to the hospital query is unusable (%s); it takes no part", node,
                            problem)
                continue
            answers.append((node, reply))
        names = hospital_names({node: str(reply.content[Content.STATUS][Field.HOSPITAL]) for node, reply in answers},
                               registered_names(grid))
        hospitals = []
        for node, reply in answers:
            fields, name = reply.content[Content.STATUS], names[node]
            if fields[Field.STATUS] == Status.REFUSED:  # e.g. its ledger belongs to other data, or its disk is full
                log.warning("hospital %s (node %s) cannot take part in this run: %s", name, node, fields[Field.MESSAGE])
                self.roster.exclude(name, str(fields[Field.MESSAGE]))
                continue
            state = HospitalState(node, name, claimed_name=str(fields[Field.HOSPITAL]))
            state.update(reply.content[Content.METRICS], str(fields[Field.STATUS]), fields)
            hospitals.append(state)
        self.roster.admit(hospitals)
        log.info("hospitals: %s", self.roster.describe())
        return self.hospitals

    def active(self) -> list[HospitalState]:
        return self.roster.active()

    def training_order(self, server_round: int) -> list[HospitalState]:
        return self.roster.training_order(server_round, shuffle=self.mode == SEQUENTIAL and self.shuffle_order,
                                          seed=self.seed)

    # ------------------------------------------------------ Flower's strategy interface

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """One training message per active (non-locked) hospital."""
        return [self._train_message(h, server_round, arrays, config) for h in self.training_order(server_round)]

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Weighted mean (by num-examples) of the replies of hospitals that trained."""
        trained = [Trained(r, r.content[Content.ARRAYS].to_torch_state_dict()) for r in replies if _trained(r)]
        average = _average(trained)
        return (None, None) if average is None else (ArrayRecord(average), MetricRecord(self.roster.privacy_metrics()))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        if not self.client_evaluate:
            return []
        content = RecordDict({Content.ARRAYS: arrays,
                              Content.CONFIG: ConfigRecord({**dict(config), "server_round": server_round})})
        return [Message(content, dst_node_id=h.node_id, message_type=MessageType.EVALUATE) for h in self.hospitals]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Weighted mean of the hospitals' validation metrics (private data: not DP-covered)."""
        merged = weighted_metrics([dict(r.content[Content.METRICS]) for r in replies if not r.has_error()])
        return None if merged is None else MetricRecord(merged)

    def summary(self) -> None:
        log.info("BudgetAwareStrategy: mode=%s, expected hospitals=%d, shuffle_order=%s",
                 self.mode, self.expected_hospitals, self.shuffle_order)

    # ------------------------------------------------------------------- the run

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
        first_round: int = 1,
    ) -> Result:
        """Run rounds `first_round..num_rounds`, ending early when no hospital can train."""
        self.timeout = timeout
        self.summary()
        train_config = train_config or ConfigRecord()
        evaluate_config = evaluate_config or ConfigRecord()
        result = Result(arrays=initial_arrays)
        if not self.hospitals:
            self.discover(grid)
        arrays = initial_arrays
        for server_round in range(first_round, num_rounds + 1):
            if not self.active():
                self.stop_reason = (f"stopped before round {server_round}: no hospital can train "
                                    "(every privacy budget is spent; all hospitals are locked)")
                log.warning(self.stop_reason)
                break
            started = time.perf_counter()
            record = RoundRecord(server_round)
            if self.mode == PARALLEL:
                arrays = self._parallel_round(grid, server_round, arrays, train_config, record)
            else:
                arrays = self._sequential_round(grid, server_round, arrays, train_config, record)
            result.arrays = arrays
            self._refresh_privacy_figures(grid, record)
            if record.trained:
                result.train_metrics_clientapp[server_round] = MetricRecord(self.roster.privacy_metrics())
            if self.client_evaluate:
                self._evaluate_on_hospitals(grid, server_round, arrays, evaluate_config, record, result)
            if evaluate_fn is not None:
                server_metrics = evaluate_fn(server_round, arrays)
                if server_metrics is not None:
                    result.evaluate_metrics_serverapp[server_round] = server_metrics
                    record.server_metrics = dict(server_metrics)
            record.seconds = time.perf_counter() - started
            self.history.append(record)
            self._log_round(record, num_rounds)
            if self.on_round_end is not None:
                self.on_round_end(record, arrays, self.hospitals)
            if record.nobody_could_train:
                # Every hospital refused this run's request (nothing was charged) or is locked; the
                # next round would ask the same, so the run ends rather than repeat the refusals.
                self.stop_reason = (f"stopped after round {server_round}: no hospital can train this run's rounds "
                                    "(each refused the request or is locked; see the table)")
                log.warning(self.stop_reason)
                break
        else:
            self.stop_reason = f"completed all {num_rounds} rounds"
        if self.stop_reason.startswith("completed") and not self.active():
            self.stop_reason += "; every hospital is now locked (budgets spent)"
        return result

    def _evaluate_on_hospitals(self, grid: Grid, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                               record: RoundRecord, result: Result) -> None:
        messages, accepted = list(self.configure_evaluate(server_round, arrays, config, grid)), []
        for node, reply in self._exchange(grid, messages, self.timeout):
            hospital = self.roster.by_node(node)
            if hospital is None or reply.has_error():
                continue
            metrics, fields = reply.content.get(Content.METRICS), reply.content.get(Content.STATUS)
            problem = evaluation_reply_problem(None if metrics is None else dict(metrics),
                                               None if fields is None else dict(fields))
            if problem:  # validation figures only: left out of the record and the mean, the run goes on
                log.warning("round %d: hospital %s's evaluation reply is left out: %s", record.round,
                            hospital.name, problem)
                continue
            record.client_evaluation[hospital.name] = dict(metrics)
            accepted.append(reply)
        aggregated = self.aggregate_evaluate(server_round, accepted)
        if aggregated is not None:
            result.evaluate_metrics_clientapp[server_round] = aggregated

    def _refresh_privacy_figures(self, grid: Grid, record: RoundRecord) -> None:
        """Ask hospitals that crashed this round for their ledger state.

        A crash after the charge spends budget without a reply that says so; without this, the
        privacy table would show the hospital's last reported (too low) epsilon.
        """
        crashed = self.roster.crashed(record)
        if not crashed:
            return
        queries = [_query(h.node_id) for h in crashed]
        timeout = min(self.timeout, QUERY_TIMEOUT_S) if self.timeout else QUERY_TIMEOUT_S
        for node, reply in self._exchange(grid, queries, timeout):
            hospital = self.roster.by_node(node)
            if hospital is None or reply.has_error():
                continue
            metrics, fields = reply.content.get(Content.METRICS), reply.content.get(Content.STATUS)
            status = None if fields is None else str(fields.get(Field.STATUS, ""))
            # Checked as a training reply's figures are: text, counts, and no epsilon, budget or delta that
            # contradicts what the hospital reported before. A figure that cannot be believed changes nothing.
            problem = reply_figures_problem(
                None if metrics is None else dict(metrics), status, declared_examples=hospital.num_examples,
                last_epsilon=hospital.epsilon, last_budget=hospital.budget_epsilon, last_delta=hospital.delta,
                fields=None if fields is None else dict(fields))
            if problem:
                log.warning("round %d: hospital %s's ledger figures after its crash are left out: %s", record.round,
                            hospital.name, problem)
                continue
            if figures_known(metrics) and float(metrics[Metric.EPSILON]) >= hospital.epsilon:  # never backwards
                hospital.update(metrics, status, fields)

    def _parallel_round(self, grid, server_round, arrays, config, record: RoundRecord) -> ArrayRecord:
        messages = list(self.configure_train(server_round, arrays, config, grid))
        record.order = [self.roster.by_node(m.metadata.dst_node_id).name for m in messages]
        replies = self._exchange(grid, messages, self.timeout)
        reference = arrays.to_torch_state_dict()
        average = _average(self._note_replies(record, messages, replies, reference))
        if average is None:
            return arrays
        return ArrayRecord(average if self.server_lr == 1.0 else server_step(reference, average, self.server_lr))

    def _sequential_round(self, grid, server_round, arrays, config, record: RoundRecord) -> ArrayRecord:
        order = self.training_order(server_round)
        for hospital in order:
            record.order.append(hospital.name)
            message = self._train_message(hospital, server_round, arrays, config)
            replies = self._exchange(grid, [message], self.timeout)
            reference = arrays.to_torch_state_dict()
            accepted = self._note_replies(record, [message], replies, reference)
            if accepted:  # the next hospital starts from these weights
                returned, weight = accepted[0], self.sequential_weight(hospital, order)
                arrays = (returned.reply.content[Content.ARRAYS] if weight == 1.0 else
                          ArrayRecord(server_step(reference, returned.state, weight)))
        return arrays

    def sequential_weight(self, hospital: HospitalState, order: list[HospitalState]) -> float:
        """How far the global model moves towards `hospital`'s returned weights (sequential mode):
        :func:`fedpriv.aggregation.sequential_weight` of the round's record counts. Post-processing
        on the server: no privacy cost."""
        return sequential_weight(hospital.num_examples, [h.num_examples for h in order], self.sequential_step)

    def _exchange(self, grid: Grid, messages: list[Message], timeout: float | None) -> list[tuple[int, Message]]:
        """Send `messages` (at most max_in_flight waiting at once); each reply with the node it answers for."""
        replies = send_and_receive(grid, messages, timeout=timeout, max_in_flight=self.max_in_flight)
        asked = _destinations(messages)  # after sending: a message gets its id when it is pushed
        return [(_answered_node(reply, asked), reply) for reply in replies]

    def _train_message(self, hospital: HospitalState, server_round: int, arrays: ArrayRecord,
                       config: ConfigRecord) -> Message:
        content = RecordDict({Content.ARRAYS: arrays,
                              Content.CONFIG: ConfigRecord({**dict(config), "server_round": server_round})})
        # The message expires with the round: a node restarted later must not pull a training request
        # the server has given up on (it would spend budget on a round nobody waits for).
        return Message(content, dst_node_id=hospital.node_id, message_type=MessageType.TRAIN, ttl=self.timeout)

    def _note_replies(self, record: RoundRecord, messages: list[Message], replies: list[tuple[int, Message]],
                      reference: dict[str, torch.Tensor]) -> list[Trained]:
        """Record every reply (or its absence) and return the trained replies that pass the checks."""
        answered, candidates = set(), {}
        for node, reply in replies:
            hospital = self.roster.by_node(node)
            if hospital is None:  # not a reply to anything this round asked: never let it stop the run
                log.warning("round %d: ignoring a reply from unknown node %s", record.round, node)
                continue
            answered.add(hospital.node_id)
            if reply.has_error():
                self.roster.reject(record, hospital, Status.FAILED, reply.error.reason)
                continue
            metrics, fields = reply.content.get(Content.METRICS), reply.content.get(Content.STATUS)
            status = None if fields is None else str(fields[Field.STATUS])
            problem = reply_figures_problem(
                None if metrics is None else dict(metrics), status, declared_examples=hospital.num_examples,
                last_epsilon=hospital.epsilon, last_budget=hospital.budget_epsilon, last_delta=hospital.delta,
                fields=None if fields is None else dict(fields),
            ) or hospital.chain_problem(metrics, fields)
            if problem:  # its privacy figures cannot be believed either: what it spent is unknown
                self.roster.reject(record, hospital, Status.REJECTED, problem, figures_lost=True)
                continue
            if figures_known(metrics):
                # Believable figures count even when the weights are then rejected: the budget was spent.
                hospital.update(metrics, status, fields)
            arrays = reply.content.get(Content.ARRAYS) if status == Status.TRAINED else None
            state = None if arrays is None else arrays.to_torch_state_dict()
            problem = reply_weights_problem(status, reference, state)
            if problem:
                self.roster.reject(record, hospital, Status.REJECTED, problem)
                continue
            self.roster.note(record, hospital, fields, metrics)
            if status == Status.TRAINED:
                candidates[hospital.name] = Trained(reply, state)
            else:
                log.warning("round %d: hospital %s did not train (%s): %s", record.round, hospital.name,
                            status, fields[Field.MESSAGE])
        for message in messages:
            if message.metadata.dst_node_id not in answered:
                sent = message.metadata.message_id != ""  # unsent: the round ended before its turn (message_window)
                self.roster.reject(record, self.roster.by_node(message.metadata.dst_node_id), Status.TIMEOUT,
                                   f"no reply within {self.timeout}s; skipped" if sent else
                                   f"not asked: the round's {self.timeout}s ran out before its turn; skipped")
        return self._drop_norm_outliers(record, candidates, reference)

    def _drop_norm_outliers(self, record: RoundRecord, candidates: dict[str, Trained],
                            reference: dict[str, torch.Tensor]) -> list[Trained]:
        norms = {name: update_norm(reference, trained.state) for name, trained in candidates.items()}
        outliers = norm_outliers(norms, self.accepted_norms, self.max_update_norm_ratio)
        for name, reason in outliers.items():
            self.roster.reject(record, self.roster.by_name(name), Status.REJECTED, reason)
        self.accepted_norms += [norm for name, norm in norms.items() if name not in outliers]
        return [trained for name, trained in candidates.items() if name not in outliers]

    def _log_round(self, record: RoundRecord, num_rounds: int) -> None:
        auc = record.server_metrics.get("auc", math.nan)
        log.info("round %d/%d: %d/%d hospitals trained, test AUC %.3f, epsilon %s (%.1fs)", record.round,
                 num_rounds, len(record.trained), len(record.order), auc, self.roster.spent(), record.seconds)


def _trained(reply: Message) -> bool:
    """A reply that carries weights from training (its metrics say so)."""
    if reply.has_error() or Content.ARRAYS not in reply.content or Content.METRICS not in reply.content:
        return False
    return says_trained(reply.content[Content.METRICS])


def _average(trained: list[Trained]) -> dict[str, torch.Tensor] | None:
    """FedAvg of the trained replies' decoded weights, weighted by their record counts; None for none."""
    if not trained:
        return None
    return weighted_average([t.state for t in trained], [t.num_examples for t in trained])


def registered_names(grid: Grid) -> dict[int, str]:
    """node id -> the name its key was registered under (`flwr supernode register ... --name`), for the
    nodes that have one. Empty in simulation (nodes carry no registered name) and for grids without
    `get_nodes`."""
    get_nodes = getattr(grid, "get_nodes", None)
    if get_nodes is None:
        return {}
    return {int(info.node_id): str(info.name) for info in get_nodes() if getattr(info, "name", "")}


def _query(node_id: int) -> Message:
    """Ask a hospital who it is and what its ledger says (it spends nothing)."""
    return Message(RecordDict({Content.CONFIG: ConfigRecord({})}), dst_node_id=node_id,
                   message_type=MessageType.QUERY)


def _destinations(messages: Iterable[Message]) -> dict[str, int]:
    """Message id -> destination node of the messages sent; built once per exchange (not per reply,
    which would cost the square of the hospitals)."""
    return {m.metadata.message_id: m.metadata.dst_node_id for m in messages}


def _answered_node(reply: Message, asked: Mapping[str, int]) -> int:
    """The node a reply answers for: the destination of the message it replies to (`asked`, from
    :func:`_destinations`).

    Not the reply's source: errors the SuperLink writes itself (NODE_UNAVAILABLE for a SuperNode
    that stopped sending heartbeats, e.g. a crashed hospital) come from node 0, the SuperLink.
    """
    return asked.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
