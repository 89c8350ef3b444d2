"""Control requests from a manager to running functions, over the fabric itself.

The client is a node of its own; requests and replies are control messages (JSON), which never
reach a function's frame batches.
"""
from __future__ import annotations

import itertools
import json
import time

from shmfabric.fabric import Fabric, Node


class ControlError(RuntimeError):
    """A control request failed: no such node, no reply in time, or the node said no."""


class ControlClient:
    """Send `{"op": ...}` requests to function nodes and wait for their replies."""

    def __init__(self, fabric: Fabric, node_name: str = "manager"):
        self.fabric = fabric
        self.node: Node = fabric.attach(node_name)
        self.node.set_wait_mode("block")
        self._replies: list[tuple[int, dict]] = []
        self.node.on_message = lambda src, payload: self._replies.append((src, _loads(payload)))
        self._ids = itertools.count(1)

    def request(self, target: str | int, op: dict, timeout: float = 5.0) -> dict:
        """Send `op` to node `target` (name or id) and return its reply (ControlError if none)."""
        dst = target if isinstance(target, int) else self.fabric.node_id(target)
        if dst is None:
            raise ControlError(f"no node named {target!r} is attached")
        rid = next(self._ids)
        msg = dict(op)
        if msg.get("op") != "stop":
            msg["id"] = rid
        deadline = time.monotonic() + timeout
        while not self.node.send_control(dst, json.dumps(msg).encode()):
            if time.monotonic() > deadline:
                raise ControlError(f"node {target!r} does not take control messages (ring full)")
            time.sleep(0.001)
        while True:
            for i, (src, reply) in enumerate(self._replies):
                if src == dst and (reply.get("id") == rid or ("id" not in reply and msg["op"] == "stop")):
                    del self._replies[i]
                    return reply
            left = deadline - time.monotonic()
            if left <= 0:
                raise ControlError(f"no reply from node {target!r} to {op.get('op')!r} within {timeout} s")
            self.node.recv_batch(16, min(left, 0.05)).release()

    def close(self) -> None:
        self.node.detach()


def _loads(payload: bytes) -> dict:
    try:
        v = json.loads(payload)
        return v if isinstance(v, dict) else {"ok": False, "error": "reply is not an object"}
    except ValueError:
        return {"ok": False, "error": "reply is not JSON"}
