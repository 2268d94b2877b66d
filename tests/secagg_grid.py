"""An in-process Grid that delivers every message through fedaqt's real ClientApp (``fedaqt.client.app.app``, with
its mods: Flower's ``secaggplus_mod`` for SecAgg+ messages), one persistent Flower ``Context`` per node.

Each delivery gets its own deep copy of the message content (Flower's mod pops keys from the incoming record, and a
real transport gives every node its own copy). A ClientApp that raises gives an error reply, as Flower's runtime does.
"""

from __future__ import annotations

import copy

from flwr.app import Context, Error, Message, RecordDict

from fedaqt.client.app import app as client_app


class AppGrid:
    def __init__(self, num_nodes: int, tamper=None, drop=None):
        self.node_ids = list(range(2000, 2000 + num_nodes))
        self.contexts = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={})
                         for n in self.node_ids}
        self.tamper = tamper  # (stage index, node, reply) -> reply
        self.drop = drop      # (stage index, node) -> True: no reply
        self.calls = 0

    def get_node_ids(self):
        return list(self.node_ids)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        stage = self.calls
        self.calls += 1
        for msg in messages:
            node = int(msg.metadata.dst_node_id)
            if self.drop is not None and self.drop(stage, node):
                continue
            delivered = Message(content=copy.deepcopy(msg.content), dst_node_id=node,
                                message_type=msg.metadata.message_type, group_id=msg.metadata.group_id)
            delivered.metadata.__dict__["_message_id"] = msg.metadata.message_id or f"m{stage}-{node}"
            try:
                reply = client_app(delivered, self.contexts[node])
            except Exception as exc:  # noqa: BLE001 - what Flower's runtime turns into an error reply
                reply = Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=delivered)
            if self.tamper is not None:
                reply = self.tamper(stage, node, reply)
            replies.append(reply)
        return replies
