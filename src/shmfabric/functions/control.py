"""Control requests from a manager to running functions, over the fabric itself.

The client is a node of its own; requests and replies are control messages (JSON), which never
reach a function's frame batches.

A reply that fits one frame (the sender's network MTU) is one message, the JSON object itself.
A longer one (a firewall's `stats` with a counter per rule) is sent as several parts, each
`PART_MAGIC` + `PART_HEADER` (the sender's reply number, the part's index, the number of parts;
big-endian u32 each) + a piece of the JSON; `Reassembler` puts them back together. A part never
starts like JSON (0x1E is not a JSON character), so a reader that only knows whole replies sees
"reply is not JSON" for parts and still reads short replies as before.
"""
from __future__ import annotations

import itertools
import json
import struct
import time
from typing import Iterator

from shmfabric.fabric import Fabric, Node

PART_MAGIC = b"\x1e\x01"  # ASCII record separator + format version: never the start of JSON
PART_HEADER = struct.Struct("!III")  # reply number (per sender), part index, part count
PART_OVERHEAD = len(PART_MAGIC) + PART_HEADER.size
MAX_REPLY = 4 << 20  # the longest reply sent (bytes of JSON); a longer one is refused as an error
MAX_PENDING = 16  # replies being reassembled at once per client; the oldest is dropped beyond


def split_reply(data: bytes, mtu: int, seq: int) -> list[bytes]:
    """`data` (one JSON reply) as control messages of at most `mtu` bytes each: itself if it fits,
    else parts numbered `seq` (see the module docstring). ValueError if `mtu` has no room for a part."""
    if len(data) <= mtu:
        return [data]
    room = mtu - PART_OVERHEAD
    if room < 1:
        raise ValueError(f"an MTU of {mtu} bytes has no room for a control reply part")
    count = -(-len(data) // room)
    seq &= 0xFFFFFFFF
    return [PART_MAGIC + PART_HEADER.pack(seq, i, count) + data[i * room:(i + 1) * room] for i in range(count)]


class Reassembler:
    """Puts the parts of long replies back together, per sender.

    `add(src, payload)` returns a whole reply's bytes: the payload itself when it is not a part,
    the joined parts once the last has come, None while parts are missing. Parts of one reply
    come in order (one ring per sender); a part that does not follow the one before (a sender
    that restarted, a reply it gave up) drops what was gathered for that reply."""

    def __init__(self, max_pending: int = MAX_PENDING, max_bytes: int = MAX_REPLY):
        self.max_pending, self.max_bytes = max_pending, max_bytes
        self._pending: dict[tuple[int, int], tuple[int, list[bytes], int]] = {}  # key -> (count, chunks, bytes)

    @staticmethod
    def is_part(payload: bytes) -> bool:
        return payload[:len(PART_MAGIC)] == PART_MAGIC

    def add(self, src: int, payload: bytes) -> bytes | None:
        if payload[:len(PART_MAGIC)] != PART_MAGIC:
            return payload
        if len(payload) < PART_OVERHEAD:
            return None
        seq, index, count = PART_HEADER.unpack_from(payload, len(PART_MAGIC))
        chunk = bytes(payload[PART_OVERHEAD:])
        key = (src, seq)
        if index == 0:
            # A sender sends its replies one after another: a new one ends any it left unfinished,
            # so one sender holds one pending reply at most and cannot push out others' replies
            for k in [k for k in self._pending if k[0] == src]:
                del self._pending[k]
            if count < 1:
                return None
            if count == 1:
                return chunk
            while len(self._pending) >= self.max_pending:  # the oldest reply nobody completes
                self._pending.pop(next(iter(self._pending)))
            self._pending[key] = (count, [chunk], len(chunk))
            return None
        got = self._pending.get(key)
        if got is None or got[0] != count or len(got[1]) != index or got[2] + len(chunk) > self.max_bytes:
            self._pending.pop(key, None)  # out of order or too long: this reply is lost
            return None
        got[1].append(chunk)
        size = got[2] + len(chunk)
        if index + 1 < count:
            self._pending[key] = (count, got[1], size)
            return None
        del self._pending[key]
        return b"".join(got[1])

    def pending(self) -> Iterator[tuple[int, int]]:
        return iter(self._pending)


class ControlError(RuntimeError):
    """A control request failed: no such node, no reply in time, or the node said no."""


class ControlClient:
    """Send `{"op": ...}` requests to function nodes and wait for their replies."""

    def __init__(self, fabric: Fabric, node_name: str = "manager"):
        self.fabric = fabric
        self.node: Node = fabric.attach(node_name)
        self.node.set_wait_mode("block")
        self._replies: list[tuple[int, dict]] = []
        self._parts = Reassembler()
        self.node.on_message = self._on_message
        self._ids = itertools.count(1)

    def _on_message(self, src: int, payload: bytes) -> None:
        whole = self._parts.add(src, payload)
        if whole is not None:
            self._replies.append((src, _loads(whole)))

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
            # Wait for anything, then take the control messages. (A receive would go on waiting
            # for data frames until its timeout once a reply had come: 50 ms per request.)
            if self.node.wait(min(left, 0.05)) and not self.node.recv_control():
                # a data frame ahead of them (a control client uses none): dropped with what
                # the receive passes, which hands on the control messages behind it
                self.node.recv_batch(64, 0).release()

    def close(self) -> None:
        self.node.detach()


def _loads(payload: bytes) -> dict:
    try:
        v = json.loads(payload)
        return v if isinstance(v, dict) else {"ok": False, "error": "reply is not an object"}
    except ValueError:
        return {"ok": False, "error": "reply is not JSON"}
