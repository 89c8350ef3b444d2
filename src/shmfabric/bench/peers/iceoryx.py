"""iceoryx2's Python bindings, publish-subscribe over shared memory.

Used the way its Python examples do it (examples/python/publish_subscribe_dynamic_data): a
service with payload type `Slice[c_uint8]`, the publisher loans a sample of the frame's length
(`loan_slice_uninit`), writes the payload into the loaned shared memory and sends it (no copy
after that); the subscriber receives a sample and reads it in place through `payload()`.
The Python API has no batch calls, so every frame is one loan/send and one receive.

Delivery is made lossless for a fair comparison: safe overflow is off and the publisher's
backpressure strategy is RetryUntilDelivered (it waits while the subscriber's buffer is full).
Receivers busy-poll `receive()`; iceoryx2's blocking alternative is a separate event service.

What is measured is iceoryx2 *through its Python binding*, one Python call (or a few) per frame:
the figures are bound by the interpreter, not by iceoryx2's own (Rust/C++) transport.

Every case gives iceoryx2 a configuration of its own: a file prefix and a root directory named
after the case, instead of the shared defaults (`/dev/shm/iox2_*`, `/tmp/iceoryx2/`). Clean-up
then removes exactly what the case created, and nothing another iceoryx2 user has there.
"""
from __future__ import annotations

import ctypes
import glob
import os
import shutil
import tempfile
import time
from typing import Any

from .base import Ctl, Spec, Transport, TransportUnavailable, latency_result, make_payload, window_result

#: Samples a subscriber can hold before the publisher has to wait.
SUBSCRIBER_BUFFER = 256
#: Where iceoryx2 puts the shared-memory files (not configurable: its POSIX shm directory).
SHM_DIR = "/dev/shm"
#: Start of the per-case file prefix and root directory (the case tag follows).
NAME_PREFIX = "shmfabric-bench-iox2-"


def _iox() -> Any:
    import iceoryx2 as iox2

    iox2.set_log_level(iox2.LogLevel.Error)
    return iox2


class Iceoryx2Transport(Transport):
    """iceoryx2 IPC publish-subscribe with loaned samples."""

    name = "iceoryx2"
    label = "iceoryx2 (Python binding, one call per frame)"
    description = ("iceoryx2 through its Python binding, one call per frame: publish-subscribe, Slice[c_uint8], "
                   "loan_slice_uninit + send, busy-poll receive")
    modes = ("throughput", "latency")

    def busy_polls(self, spec: Spec) -> bool:
        return True

    def check_available(self) -> None:
        try:
            import iceoryx2  # noqa: F401
        except ImportError as exc:
            raise TransportUnavailable(f"iceoryx2 is not installed ({exc}); pip install '.[bench]'") from exc

    def setup(self, spec: Spec) -> Any:
        # The parent never creates an iceoryx2 node (it forks the workers of later cases); the
        # workers make every file, under the names below.
        return {"service": f"shmfabric-bench/{spec.tag}", "prefix": f"{NAME_PREFIX}{spec.tag}_",
                "root": os.path.join(tempfile.gettempdir(), f"{NAME_PREFIX}{spec.tag}") + "/"}

    def cleanup(self, chan: Any) -> None:
        # Called once every worker of the case has ended: the files named with the case's
        # prefix, and its root directory, belong to this case alone.
        for path in glob.glob(os.path.join(SHM_DIR, glob.escape(chan["prefix"]) + "*")):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        shutil.rmtree(chan["root"], ignore_errors=True)

    def _open(self, chan: Any, name: str) -> tuple[Any, Any, Any]:
        iox2 = _iox()
        cfg = iox2.config.default()
        g = cfg.global_cfg  # a view: setting its fields changes cfg
        g.prefix = iox2.FileName.new(chan["prefix"])
        g.root_path = iox2.Path.new(chan["root"])
        node = iox2.NodeBuilder.new().config(cfg).create(iox2.ServiceType.Ipc)
        service = (
            node.service_builder(iox2.ServiceName.new(name))
            .publish_subscribe(iox2.Slice[ctypes.c_uint8])
            .subscriber_max_buffer_size(SUBSCRIBER_BUFFER)
            .history_size(0)
            .max_publishers(1)
            .max_subscribers(1)
            .enable_safe_overflow(False)
            .open_or_create()
        )
        return iox2, node, service

    def _publisher(self, chan: Any, name: str, size: int) -> tuple[Any, Any]:
        iox2, node, service = self._open(chan, name)
        pub = (
            service.publisher_builder()
            .initial_max_slice_len(size)
            .backpressure_strategy(iox2.BackpressureStrategy.RetryUntilDelivered)
            .create()
        )
        return node, pub

    def _subscriber(self, chan: Any, name: str) -> tuple[Any, Any]:
        _, node, service = self._open(chan, name)
        return node, service.subscriber_builder().create()

    def throughput_sender(self, chan: Any, spec: Spec, ctl: Ctl) -> dict[str, Any]:
        node, pub = self._publisher(chan, chan["service"], spec.size)
        data = make_payload(spec.size)
        size = spec.size
        loan = pub.loan_slice_uninit
        memmove = ctypes.memmove
        stop = ctl.stop
        sent = 0
        ctl.ready()
        pub.update_connections()
        try:
            while not stop.value:
                for _ in range(64):
                    sample = loan(size)
                    memmove(sample.payload_ptr, data, size)
                    sample.assume_init().send()
                sent += 64
        finally:
            ctl.done.value = 1
        del pub, node
        return {"sent": sent}

    def throughput_receiver(self, chan: Any, spec: Spec, ctl: Ctl) -> dict[str, Any]:
        node, sub = self._subscriber(chan, chan["service"])
        receive = sub.receive
        ctl.ready()
        s = _first(receive, spec.setup_timeout)
        b = s.payload()[0]
        s.delete()
        n = frames = 0
        now = t0 = time.perf_counter()
        t_end = t0 + spec.duration
        clock = time.perf_counter
        while now < t_end:
            for _ in range(64):
                s = receive()
                while s is None:  # busy-poll, as the examples' loops do without the wait
                    s = receive()
                p = s.payload()
                n += p.len()
                b = p[0]
                s.delete()
            frames += 64
            now = clock()
        ctl.stop.value = 1
        while True:  # drain until the publisher stopped, so it never waits on us forever
            s = receive()
            if s is not None:
                s.delete()
            elif ctl.done.value:
                break
        del sub, node
        return window_result(frames, n, now - t0, b)

    def latency_ping(self, chan: Any, spec: Spec, ctl: Ctl) -> dict[str, Any]:
        node, pub = self._publisher(chan, chan["service"] + "/ping", spec.size)
        node2, sub = self._subscriber(chan, chan["service"] + "/pong")
        data = make_payload(spec.size)
        size = spec.size
        receive = sub.receive
        rtts: list[int] = []
        clock = time.perf_counter_ns
        ctl.ready()
        pub.update_connections()
        t_end = clock() + int(spec.duration * 1e9)
        b = 0
        try:
            while True:
                t0 = clock()
                sample = pub.loan_slice_uninit(size)
                ctypes.memmove(sample.payload_ptr, data, size)
                sample.assume_init().send()
                s = receive()
                while s is None:
                    s = receive()
                p = s.payload()
                k = p.len()
                b = p[0]
                s.delete()
                t1 = clock()
                rtts.append(t1 - t0)
                if t1 >= t_end or len(rtts) >= 1_000_000:
                    break
            if k != size:
                raise RuntimeError(f"echo of {size} bytes came back with {k}")
        finally:
            ctl.stop.value = 1
        del pub, sub, node, node2
        return latency_result(rtts, b)

    def latency_pong(self, chan: Any, spec: Spec, ctl: Ctl) -> dict[str, Any]:
        node, sub = self._subscriber(chan, chan["service"] + "/ping")
        node2, pub = self._publisher(chan, chan["service"] + "/pong", spec.size)
        receive = sub.receive
        stop = ctl.stop
        echoed = 0
        ctl.ready()
        pub.update_connections()
        while True:
            s = receive()
            if s is None:
                if stop.value:
                    break
                continue
            p = s.payload()
            k = p.len()
            b = p[0]  # noqa: F841
            out = pub.loan_slice_uninit(k)
            ctypes.memmove(out.payload_ptr, s.payload_ptr, k)
            s.delete()
            out.assume_init().send()
            echoed += 1
        del pub, sub, node, node2
        return {"echoed": echoed}


def _first(receive: Any, timeout: float) -> Any:
    end = time.monotonic() + timeout
    while True:
        s = receive()
        if s is not None:
            return s
        if time.monotonic() > end:
            raise TimeoutError("no sample from the publisher")


__all__ = ["Iceoryx2Transport"]
