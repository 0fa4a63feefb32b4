"""Run a ServerApp's protocol against ClientApps in this process: for tests and benchmarks.

:class:`LocalGrid` is a Flower :class:`Grid` whose "network" is a function call: each
message goes to the destination node's ClientApp with that node's own
:class:`Context` (its node config and persistent state), and the reply comes back, as
a SuperNode would deliver it. Nothing is simulated about the protocol itself: SecAgg+
runs Flower's own server workflow and client mod, with real keys and masks.

Two hooks make it useful for tests:

- ``drop(node_id, message) -> bool``: the node never answers that message (a site that
  went away mid-round);
- ``received``: with ``record=True``, every reply the server received, in order, as
  ``(node_id, stage, content)``, so a test can check what the server ever held.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.serverapp import Grid
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

__all__ = ["LocalGrid", "stage_of"]


def stage_of(message: Message) -> str:
    """The SecAgg+ stage a server message starts (``setup``, ``share_keys``, ...), or ``plain``."""
    record = message.content.config_records.get(RECORD_KEY_CONFIGS) if message.has_content() else None
    return str(record.get(Key.STAGE, "plain")) if record is not None else "plain"


class LocalGrid(Grid):
    """A Grid that delivers every message to an in-process ClientApp (see the module docstring)."""

    def __init__(
        self, client_app: ClientApp, node_configs: Iterable[Mapping[str, Any]], run_config: Mapping[str, Any], *,
        drop: Callable[[int, Message], bool] | None = None, record: bool = False, run_id: int = 1,
    ) -> None:
        self.app = client_app
        self.drop = drop
        self.record = record
        self.received: list[tuple[int, str, RecordDict]] = []
        self.contexts = {
            node: Context(run_id=run_id, node_id=node, node_config=dict(cfg), state=RecordDict(), run_config=dict(run_config))
            for node, cfg in enumerate(node_configs, start=101)
        }
        self._run = Run.create_empty(run_id)
        # Flower stamps messages with the identity of the process's task, as the SuperLink sets it.
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, SUPERLINK_NODE_ID, 1
        self._replies: dict[str, Message] = {}

    def set_run(self, run: Run) -> None:  # the run is fixed at construction
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            node = message.metadata.dst_node_id
            if self.drop is not None and self.drop(node, message):
                continue  # the node has gone: no reply will come
            stage = stage_of(message)
            delivered = copy.deepcopy(message)  # what crosses a network is a copy, never the server's object
            try:
                reply = self.app(delivered, self.contexts[node])
            except Exception as err:  # a ClientApp that raises answers with an error, as a SuperNode does
                reply = Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=delivered)
            if self.record and reply.has_content():
                self.received.append((node, stage, copy.deepcopy(reply.content)))
            self._replies[message.metadata.message_id] = reply
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return list(self.pull_messages(self.push_messages(messages)))
