"""pyzmq over ipc://: PUSH/PULL for throughput, PAIR for ping-pong."""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from .base import (
    Ctl,
    Spec,
    Transport,
    TransportUnavailable,
    frame_ping,
    frame_pong,
    frame_receiver,
    frame_sender,
    make_payload,
)

#: From this frame size on the receiver takes zero-copy `zmq.Frame`s (`recv(copy=False)`),
#: as pyzmq's docs advise for large messages; smaller ones are cheaper as plain bytes.
ZERO_COPY_FROM = 9000

DRAIN_QUIET_MS = 2_000


class ZmqTransport(Transport):
    """pyzmq `ipc://` sockets in a private temporary directory, default high-water marks."""

    name = "zmq-ipc"
    description = "pyzmq ipc:// PUSH/PULL (throughput), PAIR (latency); copy=False from 9000 B"
    modes = ("throughput", "latency")

    def check_available(self) -> None:
        try:
            import zmq  # noqa: F401
        except ImportError as exc:
            raise TransportUnavailable(f"pyzmq is not installed ({exc}); pip install '.[bench]'") from exc

    def setup(self, spec: Spec) -> Any:
        d = tempfile.mkdtemp(prefix=f"shmfabric-bench-zmq-{spec.tag}-")
        return {"dir": d, "a": f"ipc://{os.path.join(d, 'a')}", "b": f"ipc://{os.path.join(d, 'b')}"}

    def cleanup(self, chan: Any) -> None:
        shutil.rmtree(chan["dir"], ignore_errors=True)

    @staticmethod
    def _socket(kind: str, addr: str, bind: bool) -> Any:
        import zmq

        ctx = zmq.Context()
        s = ctx.socket(getattr(zmq, kind))
        s.setsockopt(zmq.LINGER, 1000)
        (s.bind if bind else s.connect)(addr)
        return s

    @staticmethod
    def _close(s: Any) -> None:
        ctx = s.context
        s.close()
        ctx.term()

    def _recv(self, s: Any, size: int) -> Any:
        if size < ZERO_COPY_FROM:
            return s.recv
        recv = s.recv

        def recv_view() -> memoryview:
            return recv(copy=False).buffer

        return recv_view

    def _first(self, s: Any, spec: Spec, recv: Any) -> Any:
        def first() -> Any:
            if not s.poll(int(spec.setup_timeout * 1000)):
                raise TimeoutError("no frame from the sender")
            return recv()

        return first

    @staticmethod
    def _drain(s: Any, recv: Any) -> Any:
        # The drain only lets a sender blocked at the high-water mark see the stop flag; the
        # window is already measured. Waiting for the end frame alone hung in 4 of 260 runs
        # with busy loops on both cores: the empty end frame never arrived although the sender
        # sent it and closed within its LINGER. So the drain also ends after a quiet spell.
        def drain() -> None:
            while s.poll(DRAIN_QUIET_MS) and len(recv()):
                pass

        return drain

    def throughput_sender(self, chan: Any, spec: Spec, ctl: Ctl) -> dict[str, Any]:
        s = self._socket("PUSH", chan["a"], bind=False)
        try:
            return frame_sender(s.send, make_payload(spec.size), ctl, end=b"")
        finally:
            self._close(s)

    def throughput_receiver(self, chan: Any, spec: Spec, ctl: Ctl) -> dict[str, Any]:
        s = self._socket("PULL", chan["a"], bind=True)
        try:
            recv = self._recv(s, spec.size)
            return frame_receiver(recv, spec, ctl, self._drain(s, recv), first=self._first(s, spec, recv))
        finally:
            self._close(s)

    def latency_ping(self, chan: Any, spec: Spec, ctl: Ctl) -> dict[str, Any]:
        s = self._socket("PAIR", chan["a"], bind=False)
        try:
            return frame_ping(s.send, self._recv(s, spec.size), spec, ctl, end=b"")
        finally:
            self._close(s)

    def latency_pong(self, chan: Any, spec: Spec, ctl: Ctl) -> dict[str, Any]:
        s = self._socket("PAIR", chan["a"], bind=True)
        try:
            return frame_pong(self._recv(s, spec.size), s.send, ctl)
        finally:
            self._close(s)
