"""An in-process stand-in for Flower's Grid: delivers train messages to the ClientApp logic directly.

Used by tests to drive the real strategies and server loop without starting Ray.
"""

from __future__ import annotations

from flwr.app import Message

from fedaqt.client.app import handle_train
from fedaqt.protocol import BROADCAST_KEY, CONFIG_KEY, PARTITION_ID, QUANT_META_KEY, RUN_CONFIG


class FakeGrid:
    def __init__(self, num_nodes: int, fail_partitions: set[int] | None = None, tamper=None):
        self.node_ids = list(range(1000, 1000 + num_nodes))
        self.fail_partitions = fail_partitions or set()
        self.tamper = tamper  # (partition_id, reply RecordDict) -> RecordDict
        self.sent: list[Message] = []
        self.replies: list[Message] = []
        self._pending: dict[str, Message] = {}

    def get_node_ids(self):
        return list(self.node_ids)

    def _reply(self, msg):
        self.sent.append(msg)
        pid = int(msg.content[CONFIG_KEY][PARTITION_ID])
        if pid in self.fail_partitions:
            content = handle_train(_break(msg.content))
        else:
            content = handle_train(msg.content)
        if self.tamper is not None:
            content = self.tamper(pid, content)
        reply = Message(content=content, reply_to=msg)
        self.replies.append(reply)
        return reply

    def send_and_receive(self, messages, timeout=None):
        return [self._reply(msg) for msg in messages]

    # the two calls Grid.send_and_receive is made of (the server's streaming path uses them)
    def push_messages(self, messages):
        ids = []
        for msg in messages:
            mid = f"m{len(self.sent) + len(self._pending)}"
            msg.metadata.__dict__["_message_id"] = mid
            self._pending[mid] = msg
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids):
        """Every pending reply at once through :meth:`send_and_receive` (which test subclasses override), in
        REVERSED send order (arrival order must not matter)."""
        wanted = [m for m in list(self._pending) if m in set(message_ids)]
        out = list(self.send_and_receive([self._pending.pop(m) for m in wanted]))
        return out[::-1]


def _break(content):
    from flwr.app import ConfigRecord, RecordDict

    cfg = ConfigRecord(dict(content[CONFIG_KEY]))
    cfg[RUN_CONFIG] = "{not json"
    return RecordDict({BROADCAST_KEY: content[BROADCAST_KEY], QUANT_META_KEY: content[QUANT_META_KEY], CONFIG_KEY: cfg})
