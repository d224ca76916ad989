"""An in-process stand-in for Flower's Grid: real ClientApp handlers, no SuperLink, no Ray.

It lets the strategy and the ClientApp be tested together in milliseconds. Every message and
reply is recorded, and a node can be told to fail in a given round.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=E0611
from flwr.supercore.task_identity import TaskIdentity

from fedpriv.client_app import app as client_app


class InProcessGrid:
    """Delivers each message to the ClientApp of its destination node, in this process."""

    def __init__(self, num_nodes: int, run_config: dict, *, run_id: int = 7) -> None:
        self.node_ids = [1000 + i for i in range(num_nodes)]
        self.contexts = {
            node: Context(run_id=run_id, node_id=node, node_config={"partition-id": i, "num-partitions": num_nodes},
                          state=RecordDict(), run_config=dict(run_config))
            for i, node in enumerate(self.node_ids)
        }
        self.sent: list[Message] = []
        self.replies: list[Message] = []
        self.fail: set[tuple[int, int]] = set()  # (node id, server round) pairs that raise in train
        self.silent: set[tuple[int, int]] = set()  # (node id, server round) pairs that never reply
        # Nodes the SuperLink answers for with an error from node 0, as Flower does for an offline node.
        self.unavailable: set[int] = set()
        self.tamper: dict[tuple[int, int], Callable[[Message], Message]] = {}  # rewrite a train reply
        self.tamper_query: dict[int, Callable[[Message], Message]] = {}  # rewrite a node's answer to the query
        self.tamper_evaluate: dict[int, Callable[[Message], Message]] = {}  # rewrite a node's evaluation replies
        self.registered: dict[int, str] = {}  # node id -> name its key was registered under (deployment)
        self.waiting: dict[str, Message | None] = {}  # message id -> its reply, until pulled (None: silent)
        self.waiting_peak = 0  # the most requests that were waiting at once
        self._ids = itertools.count(1)
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = run_id, 1, 0

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def get_nodes(self) -> Iterable[NodeInfo]:
        """As the SuperLink answers: a registered name only for nodes registered with one."""
        return [NodeInfo(node_id=node, name=self.registered[node]) if node in self.registered else
                NodeInfo(node_id=node) for node in self.node_ids]

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Deliver each message now; its reply waits until pulled (a silent node's never comes)."""
        ids = []
        for message in messages:
            message_id = f"m{next(self._ids)}"
            message.metadata.__dict__["_message_id"] = message_id
            self.sent.append(message)
            self.waiting[message_id] = self._reply(message)
            self.waiting_peak = max(self.waiting_peak, len(self.waiting))
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        replies = [self.waiting.pop(i) for i in list(message_ids) if self.waiting.get(i) is not None]
        self.replies.extend(replies)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        ids = self.push_messages(messages)
        replies = self.pull_messages(ids)
        for message_id in ids:  # a silent node's request: given up on, as Flower's grid does at the timeout
            self.waiting.pop(message_id, None)
        return replies

    def _reply(self, message: Message) -> Message | None:
        node = message.metadata.dst_node_id
        server_round = int(message.content["config"].get("server_round", 0)) if "config" in message.content else 0
        if (node, server_round) in self.silent and message.metadata.message_type == "train":
            return None
        if node in self.unavailable:
            reply = Message(Error(code=3, reason=f"node {node} is offline"), reply_to=message)
            reply.metadata.__dict__["_src_node_id"] = 0
            return reply
        if (node, server_round) in self.fail and message.metadata.message_type == "train":
            reply = Message(Error(code=1, reason=f"injected failure at node {node}"), reply_to=message)
        else:
            try:
                reply = client_app(message, self.contexts[node])
            except Exception as exc:  # as Flower does: a crashing ClientApp becomes an error reply
                reply = Message(Error(code=2, reason=f"{type(exc).__name__}: {exc}"), reply_to=message)
            if (node, server_round) in self.tamper and message.metadata.message_type == "train":
                reply = self.tamper[(node, server_round)](reply)
            if node in self.tamper_query and message.metadata.message_type == "query":
                reply = self.tamper_query[node](reply)
            if node in self.tamper_evaluate and message.metadata.message_type == "evaluate":
                reply = self.tamper_evaluate[node](reply)
        reply.metadata.__dict__["_src_node_id"] = node
        return reply

    def train_exchanges(self) -> list[tuple[Message, Message | None]]:
        """(train message, its reply or None) in sending order."""
        by_request = {r.metadata.reply_to_message_id: r for r in self.replies}
        return [(m, by_request.get(m.metadata.message_id)) for m in self.sent if m.metadata.message_type == "train"]
