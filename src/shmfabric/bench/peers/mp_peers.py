"""multiprocessing.Queue and multiprocessing.Pipe, the two stdlib ways Python processes talk."""
from __future__ import annotations

import multiprocessing
from typing import Any

from .base import (
    Ctl,
    Spec,
    Transport,
    drain_until_end,
    frame_ping,
    frame_pong,
    frame_receiver,
    frame_sender,
    make_payload,
)

#: Bounded, as a producer faster than its consumer must be: an unbounded Queue would buffer
#: gigabytes of 65,000-byte frames in the sender's feeder thread during one second.
QUEUE_MAXSIZE = 1024


class QueueTransport(Transport):
    """`multiprocessing.Queue(maxsize)`: put/get of bytes objects (pickled, feeder thread)."""

    name = "mp.Queue"
    description = "multiprocessing.Queue, put()/get() of bytes, maxsize 1024"
    modes = ("throughput", "latency")

    def setup(self, spec: Spec) -> Any:
        ctx = multiprocessing.get_context(spec.start_method)
        if spec.mode == "latency":
            return {"a": ctx.Queue(1), "b": ctx.Queue(1)}
        return {"q": ctx.Queue(QUEUE_MAXSIZE)}

    def cleanup(self, chan: Any) -> None:
        for q in chan.values():
            q.close()
            q.cancel_join_thread()

    def throughput_sender(self, chan: Any, spec: Spec, ctl: Ctl) -> dict[str, Any]:
        q = chan["q"]
        res = frame_sender(q.put, make_payload(spec.size), ctl, end=b"")
        q.close()
        q.join_thread()  # the receiver drains up to the end frame, so this returns
        return res

    def throughput_receiver(self, chan: Any, spec: Spec, ctl: Ctl) -> dict[str, Any]:
        q = chan["q"]
        return frame_receiver(q.get, spec, ctl, drain_until_end(q.get),
                              first=lambda: q.get(timeout=spec.setup_timeout))

    def latency_ping(self, chan: Any, spec: Spec, ctl: Ctl) -> dict[str, Any]:
        res = frame_ping(chan["a"].put, chan["b"].get, spec, ctl, end=b"")
        chan["a"].close()
        chan["a"].join_thread()
        return res

    def latency_pong(self, chan: Any, spec: Spec, ctl: Ctl) -> dict[str, Any]:
        return frame_pong(chan["a"].get, chan["b"].put, ctl)


class PipeTransport(Transport):
    """`multiprocessing.Pipe()`: Connection.send_bytes/recv_bytes (no pickling of bytes)."""

    name = "mp.Pipe"
    description = "multiprocessing.Pipe, send_bytes()/recv_bytes()"
    modes = ("throughput", "latency")

    def setup(self, spec: Spec) -> Any:
        ctx = multiprocessing.get_context(spec.start_method)
        if spec.mode == "latency":
            return ctx.Pipe(duplex=True)
        return ctx.Pipe(duplex=False)

    def cleanup(self, chan: Any) -> None:
        for conn in chan:
            conn.close()

    def throughput_sender(self, chan: Any, spec: Spec, ctl: Ctl) -> dict[str, Any]:
        return frame_sender(chan[1].send_bytes, make_payload(spec.size), ctl, end=b"")

    def throughput_receiver(self, chan: Any, spec: Spec, ctl: Ctl) -> dict[str, Any]:
        r = chan[0]

        def first() -> bytes:
            if not r.poll(spec.setup_timeout):
                raise TimeoutError("no frame from the sender")
            return r.recv_bytes()

        return frame_receiver(r.recv_bytes, spec, ctl, drain_until_end(r.recv_bytes), first=first)

    def latency_ping(self, chan: Any, spec: Spec, ctl: Ctl) -> dict[str, Any]:
        return frame_ping(chan[0].send_bytes, chan[0].recv_bytes, spec, ctl, end=b"")

    def latency_pong(self, chan: Any, spec: Spec, ctl: Ctl) -> dict[str, Any]:
        return frame_pong(chan[1].recv_bytes, chan[1].send_bytes, ctl)


__all__ = ["QueueTransport", "PipeTransport"]
