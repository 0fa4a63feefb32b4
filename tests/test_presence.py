"""The server names every site it hears from, and a lost one within seconds (issue 19)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from pathlib import Path

import pytest
from flwr.app import Error, Message, Metadata, RecordDict

from fedmm.federation.presence import Presence, enrolled_names
from fedmm.runtime.grid import PromptGrid

UNAVAILABLE = "Error: Node Unavailable — The destination node failed to report a heartbeat within 2 × its expected interval."


def _message(*, src: int, dst: int, mid: str, reply_to: str = "", error: str | None = None) -> Message:
    metadata = Metadata(
        run_id=1, message_id=mid, src_node_id=src, dst_node_id=dst, reply_to_message_id=reply_to,
        group_id="1", created_at=time.time(), ttl=60.0, message_type="train",
    )
    if error is not None:
        return Message(error=Error(code=1, reason=error), metadata=metadata)
    return Message(content=RecordDict(), metadata=metadata)


class _Grid:
    """A SuperLink's view: node 2 died, so its message is answered by the SuperLink with an error."""

    def __init__(self) -> None:
        self.online = [1, 2]
        self.sent: dict[str, Message] = {}

    def get_node_ids(self) -> Iterable[int]:
        return list(self.online)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            self.sent[message.metadata.message_id] = message
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = []
        for mid in message_ids:
            node = self.sent[mid].metadata.dst_node_id
            if node == 2:  # the SuperLink answers for a node it declared offline, as itself (node 0)
                replies.append(_message(src=0, dst=0, mid=f"r{mid}", reply_to=mid, error=UNAVAILABLE))
            else:
                replies.append(_message(src=node, dst=0, mid=f"r{mid}", reply_to=mid))
        return replies


def test_a_node_the_superlink_calls_unavailable_is_named_lost_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    presence = Presence(tmp_path / "presence.json", {1: "george", 2: "theo"}.get)
    grid = PromptGrid(_Grid(), interval=0.01, presence=presence)  # type: ignore[arg-type]
    messages = [_message(src=0, dst=node, mid=f"q{node}") for node in (1, 2)]
    with caplog.at_level(logging.INFO, logger="flwr"):
        logging.getLogger("flwr").propagate = True
        try:
            replies = list(grid.send_and_receive(messages, timeout=5))
        finally:
            logging.getLogger("flwr").propagate = False
    assert len(replies) == 2
    sites = json.loads((tmp_path / "presence.json").read_text())["sites"]
    assert sites["george"]["state"] == "online" and sites["george"]["last_seen"] is not None
    assert sites["theo"]["state"] == "lost" and "heartbeat" in sites["theo"]["reason"] and sites["theo"]["lost_at"]
    assert any("site theo (node 2) LOST" in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_a_node_that_leaves_the_online_set_is_lost_and_its_return_is_seen(tmp_path: Path) -> None:
    presence = Presence(tmp_path / "presence.json", lambda node: None)
    presence.online([1, 2])
    presence.heard(1)
    presence.online([1])
    sites = json.loads((tmp_path / "presence.json").read_text())["sites"]
    assert sites["node 2"]["state"] == "lost" and sites["node 1"]["state"] == "online"  # no name yet: its number
    presence.online([1, 2])
    assert json.loads((tmp_path / "presence.json").read_text())["sites"]["node 2"]["state"] == "online"
    presence.heard(2, error=UNAVAILABLE)
    assert presence.nodes[2].state == "lost"
    presence.heard(2)
    assert presence.nodes[2].state == "online" and presence.nodes[2].reason is None


def test_nodes_are_named_by_the_enrolled_key_they_registered_with(tmp_path: Path) -> None:
    import sqlite3

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    keys = {name: ec.generate_private_key(ec.SECP384R1()).public_key() for name in ("george", "theo")}
    stranger = ec.generate_private_key(ec.SECP384R1()).public_key()
    pem = {name: key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo) for name, key in keys.items()}
    db = tmp_path / "superlink.db"
    with sqlite3.connect(db) as con:  # Flower's node table: its uint64 ids stored signed
        con.execute("CREATE TABLE node (node_id INTEGER, public_key BLOB)")
        con.executemany("INSERT INTO node VALUES (?, ?)", [
            (7, pem["george"]), (-5, pem["theo"]),
            (9, stranger.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)), (10, b"not a key"),
        ])
    assert enrolled_names(db, dict(keys)) == {7: "george", (1 << 64) - 5: "theo"}
    assert enrolled_names(tmp_path / "missing.db", dict(keys)) == {}


def test_at_ten_thousand_sites_replies_are_written_in_batches_and_a_loss_at_once(tmp_path: Path) -> None:
    # Every write covers every site: at 10,000 simulated sites a write a second took the interpreter
    # from the sites that train. A reply waits for the next write (<= 2 s here, and the round's flush); a loss never waits.
    path = tmp_path / "presence.json"
    presence = Presence(path, lambda node: f"site-{node}")
    presence.online(range(10_000))  # a change of state: written at once
    written = json.loads(path.read_text())
    assert len(written["sites"]) == 10_000 and written["sites"]["site-7"]["state"] == "online"
    presence.heard(7)
    assert json.loads(path.read_text())["sites"]["site-7"]["last_seen"] is None  # held back
    presence.online([n for n in range(10_000) if n != 9])  # site-9 lost: at once
    assert json.loads(path.read_text())["sites"]["site-9"]["state"] == "lost"
    presence.heard(8)
    presence.flush()
    assert json.loads(path.read_text())["sites"]["site-8"]["last_seen"] is not None
