"""faster-fifo: a shared-memory circular buffer queue with batch calls (put_many/get_many)."""
from __future__ import annotations

import queue
import time
from typing import Any

from .base import (
    Ctl,
    Spec,
    Transport,
    TransportUnavailable,
    frame_ping,
    frame_pong,
    make_payload,
    window_result,
)

#: Room in the queue's circular buffer: at least 16 MiB, at least 64 of the largest frames.
MIN_QUEUE_BYTES = 16 << 20
#: Pickled bytes carry a small header; leave room for it when sizing batches.
PICKLE_OVERHEAD = 64


class FasterFifoTransport(Transport):
    """`faster_fifo.Queue`, batched: put_many() of `batch` frames, get_many() of up to `batch`."""

    name = "faster-fifo"
    description = "faster_fifo.Queue, put_many()/get_many() batches (pickled bytes)"
    modes = ("throughput", "latency")

    def check_available(self) -> None:
        try:
            import faster_fifo  # noqa: F401
        except ImportError as exc:
            raise TransportUnavailable(f"faster-fifo is not installed ({exc}); pip install '.[bench]'") from exc

    def _queue_bytes(self, size: int) -> int:
        return max(MIN_QUEUE_BYTES, 64 * (size + PICKLE_OVERHEAD))

    def _batch(self, spec: Spec) -> int:
        # put_many() must fit in the buffer at once; a quarter keeps the writer and the reader
        # working on different parts of it.
        return max(1, min(spec.batch, self._queue_bytes(spec.size) // 4 // (spec.size + PICKLE_OVERHEAD)))

    def details(self, spec: Spec) -> dict[str, Any]:
        return {"batch": self._batch(spec)} if spec.mode == "throughput" else {}

    def setup(self, spec: Spec) -> Any:
        from faster_fifo import Queue

        qb = self._queue_bytes(spec.size)
        if spec.mode == "latency":
            return {"a": Queue(max_size_bytes=qb), "b": Queue(max_size_bytes=qb)}
        return {"q": Queue(max_size_bytes=qb)}

    def cleanup(self, chan: Any) -> None:
        for q in chan.values():
            q.close()

    def throughput_sender(self, chan: Any, spec: Spec, ctl: Ctl) -> dict[str, Any]:
        q = chan["q"]
        batch = [make_payload(spec.size)] * self._batch(spec)
        put_many = q.put_many
        stop = ctl.stop
        sent = 0
        ctl.ready()
        try:
            while not stop.value:
                try:
                    put_many(batch, True, 0.1)
                except queue.Full:
                    continue
                sent += len(batch)
        finally:
            ctl.done.value = 1
        return {"sent": sent}

    def throughput_receiver(self, chan: Any, spec: Spec, ctl: Ctl) -> dict[str, Any]:
        q = chan["q"]
        get_many = q.get_many
        most = self._batch(spec)
        ctl.ready()
        fs = get_many(True, spec.setup_timeout, most)
        b = fs[0][0]
        n = frames = 0
        now = t0 = time.perf_counter()
        t_end = t0 + spec.duration
        clock = time.perf_counter
        while now < t_end:
            try:
                fs = get_many(True, 0.1, most)
            except queue.Empty:
                if ctl.done.value:
                    raise RuntimeError("the sender stopped early") from None
                continue
            for f in fs:
                n += len(f)
                b = f[0]
            frames += len(fs)
            now = clock()
        ctl.stop.value = 1
        while True:  # drain, so the sender is never left waiting for room
            try:
                get_many(True, 0.05, most)
            except queue.Empty:
                if ctl.done.value:
                    break
        return window_result(frames, n, now - t0, b, batch=most)

    def latency_ping(self, chan: Any, spec: Spec, ctl: Ctl) -> dict[str, Any]:
        return frame_ping(chan["a"].put, chan["b"].get, spec, ctl, end=b"")

    def latency_pong(self, chan: Any, spec: Spec, ctl: Ctl) -> dict[str, Any]:
        return frame_pong(chan["a"].get, chan["b"].put, ctl)

