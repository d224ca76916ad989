"""fedpriv.message_window: a round's requests go out at most `max_in_flight` at a time."""

from __future__ import annotations

import itertools

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedpriv.message_window import send_and_receive


class SlowGrid:
    """A grid whose nodes answer a request on the `delay`-th pull after it was pushed (never for `silent`)."""

    pull_interval = 0.01  # as Flower's in-memory grid declares its own

    def __init__(self, delay: int = 2, silent: frozenset[int] = frozenset(), refused: frozenset[int] = frozenset()):
        self.delay, self.silent, self.refused = delay, silent, refused
        self.pushed: list[Message] = []
        self.waiting: dict[str, list] = {}  # message id -> [pulls left, message]
        self.peak = 0
        self.whole_batches: list[int] = []  # sizes of batches handed to send_and_receive
        self._ids = itertools.count(1)

    def push_messages(self, messages):
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = f"m{next(self._ids)}"
            self.pushed.append(message)
            if message.metadata.dst_node_id in self.refused:  # as the SuperLink client grid reports a refused push
                ids.append(None)
                continue
            self.waiting[message.metadata.message_id] = [self.delay, message]
            ids.append(message.metadata.message_id)
        self.peak = max(self.peak, len(self.waiting))
        return ids

    def pull_messages(self, message_ids):
        if any(not isinstance(message_id, str) for message_id in message_ids):
            raise TypeError("message ids are strings")  # as the SuperLink's PullMessages request is typed
        replies = []
        for message_id in message_ids:
            entry = self.waiting.get(message_id)
            if entry is None or entry[1].metadata.dst_node_id in self.silent:
                continue
            entry[0] -= 1
            if entry[0] <= 0:
                del self.waiting[message_id]
                replies.append(Message(RecordDict(), reply_to=entry[1]))
        return replies

    def send_and_receive(self, messages, *, timeout=None):  # the all-at-once path: only counted
        self.whole_batches.append(len(list(messages)))
        return []


def _requests(count: int) -> list[Message]:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, 0
    return [Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=100 + i, message_type="query", ttl=60)
            for i in range(count)]


def test_no_more_than_max_in_flight_wait_at_once_and_each_request_goes_out_once_in_order():
    grid, requests = SlowGrid(delay=3), _requests(10)
    replies = send_and_receive(grid, requests, timeout=60, max_in_flight=3)
    assert grid.peak == 3
    assert [m.metadata.dst_node_id for m in grid.pushed] == [m.metadata.dst_node_id for m in requests]
    assert sorted(r.metadata.src_node_id for r in replies) == [100 + i for i in range(10)]  # every one answered
    assert grid.whole_batches == []


def test_zero_or_a_batch_within_the_limit_goes_out_at_once_as_flower_sends_it():
    grid = SlowGrid()
    send_and_receive(grid, _requests(5), timeout=60, max_in_flight=0)
    send_and_receive(grid, _requests(5), timeout=60, max_in_flight=5)
    assert grid.whole_batches == [5, 5] and grid.pushed == []


def test_requests_whose_turn_has_not_come_by_the_deadline_are_never_sent():
    # The first node never answers and holds the only place: the others must not receive a request
    # after the round has been given up on (they would spend budget on a round nobody waits for).
    grid, requests = SlowGrid(delay=1, silent=frozenset({100})), _requests(4)
    replies = send_and_receive(grid, requests, timeout=0.3, max_in_flight=1)
    assert replies == []
    assert [m.metadata.dst_node_id for m in grid.pushed] == [100]
    assert [m.metadata.message_id for m in requests[1:]] == ["", "", ""]


def test_a_request_the_superlink_refused_frees_its_place_and_the_others_are_answered():
    grid, requests = SlowGrid(delay=2, refused=frozenset({101})), _requests(5)
    replies = send_and_receive(grid, requests, timeout=60, max_in_flight=2)
    assert sorted(r.metadata.src_node_id for r in replies) == [100, 102, 103, 104]
    assert len(grid.pushed) == 5
