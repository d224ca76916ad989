"""A budget-aware Flower strategy: parallel (FedAvg) or sequential (cyclic weight transfer) rounds.

The strategy learns each node's budget state by asking (QUERY). A hospital's name is the one the
coordinator registered its SuperNode key under (`flwr supernode register KEY --name NAME`; the
SuperLink binds that name to the node id it authenticates, and the ServerApp reads it with
`grid.get_nodes()`), never the name a node calls itself; only where no node carries a registered name
(simulation) does the node's own name count (:func:`hospital_names`). It never asks a locked hospital
again, and ends the run early, saying why, when no hospital can train. Privacy figures are reported
per hospital and as a maximum: a weighted average of epsilons would mean nothing. A hospital that
fails or times out is logged and skipped; the round goes on with the rest.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterable

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

from fedpriv.config import SEQUENTIAL_STEPS
from fedpriv.protocol import Status
from fedpriv.roster import HospitalState, RoundRecord
from fedpriv.update_checks import (
    metrics_problem,
    norm_outliers,
    update_norm,
    weights_problem,
)

log = logging.getLogger("fedpriv")

# How long to wait for a crashed hospital's budget state before keeping its last reported figures.
QUERY_TIMEOUT_S = 60.0

PARALLEL, SEQUENTIAL = "parallel", "sequential"

# Sequential mode: "full" takes each hospital's returned weights as they are (see sequential_weight).
FULL_STEP = SEQUENTIAL_STEPS[0]


RoundCallback = Callable[[RoundRecord, ArrayRecord, list[HospitalState]], None]


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
        on_round_end: RoundCallback | None = None,
    ) -> None:
        if mode not in (PARALLEL, SEQUENTIAL):
            raise ValueError(f"mode must be {PARALLEL!r} or {SEQUENTIAL!r}, got {mode!r}")
        self.mode = mode
        self.expected_hospitals = expected_hospitals
        self.shuffle_order = shuffle_order
        self.seed = seed
        self.client_evaluate = client_evaluate
        self.discovery_timeout = discovery_timeout
        self.on_round_end = on_round_end
        self.max_update_norm_ratio = max_update_norm_ratio
        self.server_lr = server_lr  # parallel: global += server_lr * (weighted mean - global)
        if sequential_step not in SEQUENTIAL_STEPS:
            raise ValueError(f"sequential_step must be one of {SEQUENTIAL_STEPS}, got {sequential_step!r}")
        self.sequential_step = sequential_step  # sequential: see sequential_weight()
        self.accepted_norms: list[float] = []  # norms of accepted updates so far (outlier reference)
        self.hospitals: list[HospitalState] = []
        self.excluded: dict[str, str] = {}  # hospitals that refused at discovery -> why
        self.history: list[RoundRecord] = []
        self.stop_reason = ""
        self.timeout: float | None = None

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
        registered = registered_names(grid)
        queries = [_query(node) for node in node_ids]
        answers = []
        for reply in grid.send_and_receive(queries, timeout=self.timeout):
            node = _answered_node(reply, queries)
            if reply.has_error():
                log.warning("node %s did not answer the hospital query: %s", node, reply.error.reason)
                continue
            answers.append((node, reply))
        names = hospital_names({node: str(reply.content["status"]["hospital"]) for node, reply in answers},
                               registered)
        hospitals = []
        for node, reply in answers:
            status, name = reply.content["status"], names[node]
            if status["status"] == Status.REFUSED:  # e.g. its ledger belongs to other data, or its disk is full
                log.warning("hospital %s (node %s) cannot take part in this run: %s", name, node, status["message"])
                self.excluded[name] = str(status["message"])
                continue
            state = HospitalState(node, name, claimed_name=str(status["hospital"]))
            _update_state(state, reply.content["metrics"], str(status["status"]), status)
            hospitals.append(state)
        self.hospitals = sorted(hospitals, key=lambda h: h.name)
        log.info("hospitals: %s", ", ".join(f"{h.name} ({'LOCKED' if h.locked else 'open'}, "
                                            f"epsilon {h.epsilon:.3g}/{h.budget_epsilon:g})" for h in self.hospitals))
        return self.hospitals

    def active(self) -> list[HospitalState]:
        return [h for h in self.hospitals if not h.locked and h.rolled_back is None]

    def training_order(self, server_round: int) -> list[HospitalState]:
        order = self.active()
        if self.mode == SEQUENTIAL and self.shuffle_order:
            random.Random(self.seed * 100_003 + server_round).shuffle(order)
        return order

    # ------------------------------------------------------ Flower's strategy interface

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """One training message per active (non-locked) hospital."""
        return [self._train_message(h, server_round, arrays, config) for h in self.training_order(server_round)]

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Weighted mean (by num-examples) of the replies of hospitals that trained."""
        trained = [r for r in replies if not r.has_error() and "arrays" in r.content
                   and r.content["metrics"]["trained"] == 1]
        if not trained:
            return None, None
        weights = [float(r.content["metrics"]["num-examples"]) for r in trained]
        states = [r.content["arrays"].to_torch_state_dict() for r in trained]
        return ArrayRecord(weighted_average(states, weights)), self._train_metrics()

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        if not self.client_evaluate:
            return []
        content = RecordDict({"arrays": arrays, "config": ConfigRecord({**dict(config), "server_round": server_round})})
        return [Message(content, dst_node_id=h.node_id, message_type=MessageType.EVALUATE) for h in self.hospitals]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Weighted mean of the hospitals' validation metrics (private data: not DP-covered)."""
        rows = [dict(r.content["metrics"]) for r in replies if not r.has_error()]
        rows = [row for row in rows if row.get("num-examples", 0) > 0]
        if not rows:
            return None
        total = sum(row["num-examples"] for row in rows)
        keys = set.intersection(*(set(row) for row in rows)) - {"num-examples", "dp-covered"}
        merged = {key: sum(row[key] * row["num-examples"] for row in rows) / total for key in keys}
        return MetricRecord({**merged, "num-examples": total, "dp-covered": 0.0})

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
                result.train_metrics_clientapp[server_round] = self._train_metrics()
            if self.client_evaluate:
                messages = list(self.configure_evaluate(server_round, arrays, evaluate_config, grid))
                replies = list(grid.send_and_receive(messages, timeout=timeout))
                record.client_evaluation = {self._by_node(_answered_node(r, messages)).name: dict(r.content["metrics"])
                                            for r in replies if not r.has_error()}
                aggregated = self.aggregate_evaluate(server_round, replies)
                if aggregated is not None:
                    result.evaluate_metrics_clientapp[server_round] = aggregated
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
            if not record.trained and record.hospitals and all(
                    row.get("status") in (Status.LOCKED, Status.REFUSED) for row in record.hospitals.values()):
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

    def _refresh_privacy_figures(self, grid: Grid, record: RoundRecord) -> None:
        """Ask hospitals that crashed this round for their ledger state.

        A crash after the charge spends budget without a reply that says so; without this, the
        privacy table would show the hospital's last reported (too low) epsilon.
        """
        crashed = [h for h in self.hospitals if record.hospitals.get(h.name, {}).get("status") == Status.FAILED]
        if not crashed:
            return
        queries = [_query(h.node_id) for h in crashed]
        timeout = min(self.timeout, QUERY_TIMEOUT_S) if self.timeout else QUERY_TIMEOUT_S
        for reply in grid.send_and_receive(queries, timeout=timeout):
            if reply.has_error() or not _figures_known(reply.content["metrics"]):
                continue
            hospital = self._by_node(_answered_node(reply, queries))
            metrics = reply.content["metrics"]
            if float(metrics["epsilon"]) >= hospital.epsilon:  # figures never go backwards
                _update_state(hospital, metrics, str(reply.content["status"]["status"]), reply.content["status"])

    def _parallel_round(self, grid, server_round, arrays, config, record: RoundRecord) -> ArrayRecord:
        messages = list(self.configure_train(server_round, arrays, config, grid))
        record.order = [self._by_node(m.metadata.dst_node_id).name for m in messages]
        replies = list(grid.send_and_receive(messages, timeout=self.timeout))
        accepted = self._note_replies(record, messages, replies, arrays.to_torch_state_dict())
        new_arrays, _ = self.aggregate_train(server_round, accepted)
        if new_arrays is None:
            return arrays
        if self.server_lr != 1.0:
            new_arrays = ArrayRecord(server_step(arrays.to_torch_state_dict(), new_arrays.to_torch_state_dict(),
                                                 self.server_lr))
        return new_arrays

    def _sequential_round(self, grid, server_round, arrays, config, record: RoundRecord) -> ArrayRecord:
        order = self.training_order(server_round)
        for hospital in order:
            record.order.append(hospital.name)
            message = self._train_message(hospital, server_round, arrays, config)
            replies = list(grid.send_and_receive([message], timeout=self.timeout))
            accepted = self._note_replies(record, [message], replies, arrays.to_torch_state_dict())
            if accepted:  # the next hospital starts from these weights
                returned = accepted[0].content["arrays"]
                weight = self.sequential_weight(hospital, order)
                arrays = returned if weight == 1.0 else ArrayRecord(server_step(
                    arrays.to_torch_state_dict(), returned.to_torch_state_dict(), weight))
        return arrays

    def sequential_weight(self, hospital: HospitalState, order: list[HospitalState]) -> float:
        """How far the global model moves towards `hospital`'s returned weights (sequential mode).

        "full": all the way (classic cyclic weight transfer). "share": the hospital's share of the
        round's records times the number of hospitals, capped at 1, so a hospital with an average or
        larger share moves the model fully and a small one proportionally less. A small hospital's
        DP-SGD update is the noisiest (its noise is calibrated to few records), and FedAvg would give
        it the same small weight. Post-processing on the server: no privacy cost.
        """
        total = sum(h.num_examples for h in order)
        if self.sequential_step == FULL_STEP or total <= 0 or hospital.num_examples <= 0:
            return 1.0
        return min(1.0, len(order) * hospital.num_examples / total)

    def _train_message(self, hospital: HospitalState, server_round: int, arrays: ArrayRecord,
                       config: ConfigRecord) -> Message:
        content = RecordDict({"arrays": arrays, "config": ConfigRecord({**dict(config), "server_round": server_round})})
        # The message expires with the round: a node restarted later must not pull a training request
        # the server has given up on (it would spend budget on a round nobody waits for).
        return Message(content, dst_node_id=hospital.node_id, message_type=MessageType.TRAIN, ttl=self.timeout)

    def _note_replies(self, record: RoundRecord, messages: list[Message], replies: list[Message],
                      reference: dict[str, torch.Tensor]) -> list[Message]:
        """Record every reply (or its absence) and return the trained replies that pass the checks."""
        answered, candidates = set(), {}
        for reply in replies:
            node = _answered_node(reply, messages)
            hospital = next((h for h in self.hospitals if h.node_id == node), None)
            if hospital is None:  # not a reply to anything this round asked: never let it stop the run
                log.warning("round %d: ignoring a reply from unknown node %s", record.round, node)
                continue
            answered.add(hospital.node_id)
            if reply.has_error():
                self._reject(record, hospital, Status.FAILED, reply.error.reason)
                continue
            problem = self._metrics_problem(reply, hospital) or _chain_problem(reply, hospital)
            if problem:  # its privacy figures cannot be believed either: what it spent is unknown
                self._reject(record, hospital, Status.REJECTED, problem, figures_lost=True)
                if problem.startswith(ROLLED_BACK):
                    hospital.rolled_back = problem
                    self.excluded[hospital.name] = problem
                continue
            status = reply.content["status"]
            if _figures_known(reply.content["metrics"]):
                # Believable figures count even when the weights are then rejected: the budget was spent.
                _update_state(hospital, reply.content["metrics"], str(status["status"]), status)
            problem = self._weights_problem(reply, reference)
            if problem:
                self._reject(record, hospital, Status.REJECTED, problem)
                continue
            record.hospitals[hospital.name] = {"status": str(status["status"]), "message": str(status["message"]),
                                               **dict(reply.content["metrics"])}
            if status["status"] == Status.TRAINED:
                candidates[hospital.name] = reply
            else:
                log.warning("round %d: hospital %s did not train (%s): %s", record.round, hospital.name,
                            status["status"], status["message"])
        for message in messages:
            if message.metadata.dst_node_id not in answered:
                self._reject(record, self._by_node(message.metadata.dst_node_id), Status.TIMEOUT,
                             f"no reply within {self.timeout}s; skipped")
        return self._drop_norm_outliers(record, candidates, reference)

    def _metrics_problem(self, reply: Message, hospital: HospitalState) -> str | None:
        content = reply.content
        if "metrics" not in content or "status" not in content:
            return "reply lacks its metrics or status"
        metrics = dict(content["metrics"])
        if content["status"]["status"] != Status.TRAINED and not _figures_known(metrics):
            return None  # a refusal from a hospital whose ledger is unreadable: nothing to check or use
        return metrics_problem(metrics, declared_examples=hospital.num_examples, last_epsilon=hospital.epsilon,
                               last_budget=hospital.budget_epsilon, last_delta=hospital.delta)

    @staticmethod
    def _weights_problem(reply: Message, reference: dict[str, torch.Tensor]) -> str | None:
        if reply.content["status"]["status"] != Status.TRAINED:
            return None
        if "arrays" not in reply.content:
            return "a trained reply without weights"
        return weights_problem(reference, reply.content["arrays"].to_torch_state_dict())

    def _drop_norm_outliers(self, record: RoundRecord, candidates: dict[str, Message],
                            reference: dict[str, torch.Tensor]) -> list[Message]:
        norms = {name: update_norm(reference, reply.content["arrays"].to_torch_state_dict())
                 for name, reply in candidates.items()}
        outliers = norm_outliers(norms, self.accepted_norms, self.max_update_norm_ratio)
        for name, reason in outliers.items():
            self._reject(record, next(h for h in self.hospitals if h.name == name), Status.REJECTED, reason)
        self.accepted_norms += [norm for name, norm in norms.items() if name not in outliers]
        return [reply for name, reply in candidates.items() if name not in outliers]

    def _reject(self, record: RoundRecord, hospital: HospitalState, status: Status, reason: str, *,
                figures_lost: bool = False) -> None:
        hospital.failures += 1
        if (figures_lost or status in (Status.FAILED, Status.TIMEOUT)) and hospital.unreported_since is None:
            hospital.unreported_since = record.round  # it may have charged without a believable report
        record.hospitals[hospital.name] = {"status": str(status), "message": reason}
        log.warning("round %d: hospital %s %s: %s (the round goes on without it)", record.round, hospital.name,
                    status, reason)

    def _train_metrics(self) -> MetricRecord:
        """Privacy-correct aggregation: the max and each hospital's epsilon, never an average."""
        metrics: dict[str, float] = {
            "epsilon-max": max((h.epsilon for h in self.hospitals), default=0.0),
            "hospitals-locked": float(sum(h.locked for h in self.hospitals)),
        }
        for hospital in self.hospitals:
            metrics[f"epsilon/{hospital.name}"] = hospital.epsilon
        return MetricRecord(metrics)

    def _by_node(self, node_id: int) -> HospitalState:
        return next(h for h in self.hospitals if h.node_id == node_id)

    def _log_round(self, record: RoundRecord, num_rounds: int) -> None:
        auc = record.server_metrics.get("auc", math.nan)
        spent = ", ".join(f"{h.name} {h.epsilon:.2f}/{h.budget_epsilon:g}{' LOCKED' if h.locked else ''}"
                          for h in self.hospitals)
        log.info("round %d/%d: %d/%d hospitals trained, test AUC %.3f, epsilon %s (%.1fs)", record.round,
                 num_rounds, len(record.trained), len(record.order), auc, spent, record.seconds)


def registered_names(grid: Grid) -> dict[int, str]:
    """node id -> the name its key was registered under (`flwr supernode register ... --name`), for the
    nodes that have one. Empty in simulation (nodes carry no registered name) and for grids without
    `get_nodes`."""
    get_nodes = getattr(grid, "get_nodes", None)
    if get_nodes is None:
        return {}
    return {int(info.node_id): str(info.name) for info in get_nodes() if getattr(info, "name", "")}


def hospital_names(claimed: dict[int, str], registered: dict[int, str]) -> dict[int, str]:
    """The name each node is reported under: node id -> name, every name distinct.

    Where any node has a registered name, every node is named by its registration (the key it
    authenticated with), whatever it calls itself: a node registered without a name is ``node-<id>``.
    Only where none has one (simulation) does a node's own name count. Two nodes left with one name
    (two keys registered under it, or two simulated nodes calling themselves alike) are both kept, as
    ``NAME#<node id>``: the run goes on, and neither can take the other's row.
    """
    names: dict[int, str] = {}
    for node, claim in claimed.items():
        if registered:
            names[node] = registered.get(node) or f"node-{node}"
            if node not in registered:
                log.warning("node %s has no registered name (register its key with `flwr supernode register KEY "
                            "<connection> --name NAME`); it is reported as %s", node, names[node])
            elif claim != names[node]:
                log.warning("node %s, registered as %s, calls itself %r in its node config; it is reported as %s",
                            node, names[node], claim, names[node])
        else:
            names[node] = claim
    taken: dict[str, list[int]] = {}
    for node, name in names.items():
        taken.setdefault(name, []).append(node)
    for name, nodes in taken.items():
        if len(nodes) > 1:
            log.warning("%d nodes (%s) go by the hospital name %s; each is reported as %s#<node id> (give each "
                        "hospital its own name)", len(nodes), ", ".join(map(str, nodes)), name, name)
            for node in nodes:
                names[node] = f"{name}#{node}"
    return names


def _figures_known(metrics) -> bool:
    """False for a refusal whose hospital could not read its own ledger (epsilon NaN: unknown)."""
    try:
        return not math.isnan(float(metrics["epsilon"]))
    except (KeyError, TypeError, ValueError):
        return False


def _query(node_id: int) -> Message:
    """Ask a hospital who it is and what its ledger says (it spends nothing)."""
    return Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node_id, message_type=MessageType.QUERY)


def _answered_node(reply: Message, messages: list[Message]) -> int:
    """The node a reply answers for: the destination of the message it replies to.

    Not the reply's source: errors the SuperLink writes itself (NODE_UNAVAILABLE for a SuperNode
    that stopped sending heartbeats, e.g. a crashed hospital) come from node 0, the SuperLink.
    """
    asked = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
    return asked.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)


ROLLED_BACK = "its privacy ledger went backwards"


def _chain_problem(reply: Message, hospital: HospitalState) -> str | None:
    """A reply whose ledger chain is shorter than, or differs from, the one this hospital last reported."""
    metrics, status = reply.content["metrics"], reply.content["status"]
    if not _figures_known(metrics) or "chain-length" not in metrics:
        return None
    length, head = int(metrics["chain-length"]), str(status.get("chain-head", ""))
    if length < hospital.chain_length or (length == hospital.chain_length and head != hospital.chain_head):
        return (f"{ROLLED_BACK}: it reported {length} ledger entries after {hospital.chain_length} earlier in this "
                "run (or another head at the same length): its ledger was rolled back, replaced or deleted; "
                "excluded from the run")
    return None


def _update_state(state: HospitalState, metrics: MetricRecord, status: str, record: ConfigRecord | None = None) -> None:
    state.unreported_since = None
    if "chain-length" in metrics:
        state.chain_length = int(metrics["chain-length"])
        state.noise_seeded = bool(metrics.get("noise-seeded", 0))
        state.max_epsilon_per_round = float(metrics.get("max-epsilon-per-round", math.inf))
        state.max_epsilon_per_run = float(metrics.get("max-epsilon-per-run", math.inf))
    if record is not None:
        state.chain_head = str(record.get("chain-head", state.chain_head))
        state.accountant = str(record.get("accountant", "")) or state.accountant
    state.epsilon = float(metrics["epsilon"])
    state.delta = float(metrics["delta"])
    state.budget_epsilon = float(metrics["budget-epsilon"])
    state.locked = bool(metrics["locked"]) or status == Status.LOCKED
    if "num-examples" in metrics and metrics["num-examples"]:
        state.num_examples = int(metrics["num-examples"])


def weighted_average(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """FedAvg: the per-tensor mean of `states` weighted by `weights` (e.g. records per hospital)."""
    total = sum(weights)
    averaged = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            averaged[key] = sum(w * s[key] for w, s in zip(weights, states)) / total
        else:
            averaged[key] = first.clone()  # integer buffers (counters) are not averaged
    return averaged


def server_step(old: dict[str, torch.Tensor], averaged: dict[str, torch.Tensor],
                server_lr: float) -> dict[str, torch.Tensor]:
    """FedAvg with a server learning rate: move the global model `server_lr` times the averaged update.

    1.0 is plain FedAvg. Above 1 it takes longer steps along the averaged update, whose DP noise the
    averaging over hospitals has already reduced (post-processing: no privacy cost).
    """
    return {key: old[key] + server_lr * (value - old[key]) if value.is_floating_point() else value.clone()
            for key, value in averaged.items()}
