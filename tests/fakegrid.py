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

    def get_node_ids(self):
        return list(self.node_ids)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for msg in messages:
            self.sent.append(msg)
            pid = int(msg.content[CONFIG_KEY][PARTITION_ID])
            if pid in self.fail_partitions:
                content = handle_train(_break(msg.content))
            else:
                content = handle_train(msg.content)
            if self.tamper is not None:
                content = self.tamper(pid, content)
            reply = Message(content=content, reply_to=msg)
            replies.append(reply)
            self.replies.append(reply)
        return replies


def _break(content):
    from flwr.app import ConfigRecord, RecordDict

    cfg = ConfigRecord(dict(content[CONFIG_KEY]))
    cfg[RUN_CONFIG] = "{not json"
    return RecordDict({BROADCAST_KEY: content[BROADCAST_KEY], QUANT_META_KEY: content[QUANT_META_KEY], CONFIG_KEY: cfg})
