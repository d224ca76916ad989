"""Send a batch of messages with at most `max_in_flight` of them waiting at the SuperLink at once.

Flower's in-memory link state (the simulation's, and a SuperLink's without a database) walks every
stored message each time a node asks for its next one, and every node asks every 0.1 s in
simulation: with all of a round's messages pushed at once, each poll costs hospitals x messages
(BENCHMARKS.md section 4). Keeping at most `max_in_flight` messages stored bounds that work by
`max_in_flight` instead, without changing what a hospital receives: the same message, from the same
global model, in the same order. The rest are pushed as replies come back.

A message still unsent when `timeout` runs out is never sent: its hospital is treated as one that
did not reply in time, and since it never received a request, it spent nothing. Messages expire
(their TTL counts from their creation, before the first push) at the same deadline either way.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

# How often to ask for replies while messages are out: as often as the grid itself does (Flower's
# in-memory grid, the simulation's, says so in `pull_interval`: 0.1 s); its SuperLink client grid
# (a deployment) has no such setting and pulls every 3 s.
DEPLOYED_PULL_INTERVAL_S = 3.0


def send_and_receive(grid: Grid, messages: Iterable[Message], *, timeout: float | None,
                     max_in_flight: int) -> list[Message]:
    """Like ``grid.send_and_receive``, with at most `max_in_flight` messages unanswered at a time
    (0: all at once, as Flower does)."""
    messages = list(messages)
    if max_in_flight <= 0 or len(messages) <= max_in_flight:
        return list(grid.send_and_receive(messages, timeout=timeout))
    deadline = None if timeout is None else time.monotonic() + timeout
    interval = float(getattr(grid, "pull_interval", DEPLOYED_PULL_INTERVAL_S))
    unsent, waiting, replies = deque(messages), set(), []
    while unsent or waiting:
        room = max_in_flight - len(waiting)
        if unsent and room > 0:
            pushed = grid.push_messages([unsent.popleft() for _ in range(min(room, len(unsent)))])
            waiting.update(message_id for message_id in pushed if message_id)  # None: the SuperLink refused it
        arrived = list(grid.pull_messages(set(waiting)))
        replies += arrived
        waiting.difference_update(reply.metadata.reply_to_message_id for reply in arrived)
        if deadline is not None and time.monotonic() >= deadline:
            break
        if not arrived and (waiting or unsent):
            time.sleep(interval)
    return replies
