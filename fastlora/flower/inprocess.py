"""An in-process Flower engine for tests and notebooks: a Grid that runs a ClientApp in this
process (no Ray, no network), each message through Flower's protobuf serialisation."""
from __future__ import annotations

import time
import uuid
from typing import Dict, Iterable, List, Optional

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid


class InProcessGrid(Grid):
    """A :class:`flwr.serverapp.Grid` that runs a ClientApp in this process, one call per
    message, for fast tests. Each node has its own persistent :class:`~flwr.app.Context`
    (``node_config`` ``partition-id`` / ``num-partitions`` as in the simulation engine).
    With ``serialize=True`` (default) every message, and the context, goes through Flower's
    protobuf serialisation both ways, as on a real wire. Exceptions in the ClientApp become
    error replies (``CLIENT_APP_RAISED_EXCEPTION``), as in Flower's engines.

    ``sent`` / ``received`` keep every message pushed and every reply, for inspection.
    :meth:`run_server` runs a ServerApp against the nodes; another one run later on the same
    grid is a restarted server whose nodes kept their state.
    Uses Flower's semi-private ``flwr.common.serde`` and ``flwr.supercore.run.Run`` (1.42).
    """

    def __init__(self, client_app, num_nodes: int, *, run_id: int = 1, run_config: Optional[dict] = None,
                 node_configs: Optional[List[dict]] = None, serialize: bool = True):
        from flwr.supercore.run import Run

        if num_nodes < 1:
            raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
        self.client_app = client_app
        self.serialize = serialize
        self.run_config = dict(run_config or {})
        self._run = Run.create_empty(run_id)
        self.contexts: Dict[int, Context] = {}
        for i in range(num_nodes):
            node_id = 1000 + i
            node_config = {"partition-id": i, "num-partitions": num_nodes}
            if node_configs is not None:
                node_config.update(node_configs[i])
            self.contexts[node_id] = Context(run_id=run_id, node_id=node_id, node_config=node_config,
                                             state=RecordDict(), run_config=dict(self.run_config))
        self._replies: Dict[str, Message] = {}
        self.sent: List[Message] = []
        self.received: List[Message] = []

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    @staticmethod
    def _wire(msg: Message) -> Message:
        from flwr.common.serde import message_from_proto, message_to_proto
        from flwr.proto.message_pb2 import Message as ProtoMessage

        return message_from_proto(ProtoMessage.FromString(message_to_proto(msg).SerializeToString()))

    def _call(self, msg: Message) -> Message:
        from flwr.common.constant import ErrorCode

        node = msg.metadata.dst_node_id
        if node not in self.contexts:
            return Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason=f"no node {node}"), reply_to=msg)
        context = self.contexts[node]
        delivered = self._wire(msg) if self.serialize else msg
        try:
            reply = self.client_app(delivered, context)
        except Exception as e:  # as Flower's engines: an error reply, the round goes on
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(e).__name__}: {e}"),
                           reply_to=msg)
        if self.serialize:
            from flwr.common.serde import context_from_proto, context_to_proto
            from flwr.proto.message_pb2 import Context as ProtoContext

            self.contexts[node] = context_from_proto(
                ProtoContext.FromString(context_to_proto(context).SerializeToString()))
            reply = self._wire(reply)
        return reply

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            self.sent.append(msg)
            reply = self._call(msg)
            self.received.append(reply)
            self._replies[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: Optional[float] = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))

    def run_server(self, server_app) -> "InProcessGrid":
        """Runs a ServerApp against this grid's nodes (a fresh server context; the nodes keep
        theirs) and returns the grid; ``elapsed_s`` is the ServerApp's time. Sets Flower's task
        identity for the duration (restored afterwards)."""
        from flwr.common.constant import SUPERLINK_NODE_ID
        from flwr.supercore.task_identity import TaskIdentity

        saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, self.run.run_id, SUPERLINK_NODE_ID
        try:
            ctx = Context(run_id=self.run.run_id, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(),
                          run_config=dict(self.run_config))
            t0 = time.perf_counter()
            server_app(self, ctx)
            self.elapsed_s = time.perf_counter() - t0
        finally:
            TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
        return self


def run_in_process(server_app, client_app, num_nodes: int, *, run_config: Optional[dict] = None,
                   serialize: bool = True) -> InProcessGrid:
    """Runs a ServerApp against ``num_nodes`` in-process ClientApp nodes (a new
    :class:`InProcessGrid`) and returns the grid (its contexts, sent and received messages)."""
    return InProcessGrid(client_app, num_nodes, run_config=run_config, serialize=serialize).run_server(server_app)
