"""shmfabric itself, through its public API (shmfabric.Fabric), as one more transport.

Throughput: the sender copies payloads into pool slots with `send_batch`; the receiver takes
zero-copy frame views with `recv_batch`, touches each, and releases the batch. Latency: one
`send` and a blocking or busy-polling `recv_batch`; the echo side forwards the received frame
back without copying. Forwarding: the middle node `forward_batch`es what it received.

`shmfabric` moves `--batch` frames per call (256 by default): the batch API, its intended use,
against the other transports' per-frame calls. `shmfabric-1` makes one call per frame
(`send`, `recv_batch(max_frames=1)`, `forward`), like the per-frame socket calls it is shown
next to.

The batched throughput receiver also notes how many distinct pool slots the frames it saw came
from (every frame of one `recv_batch` in 512, outside the per-frame work): the ring's working
set, which the harness copies with memcpy as the in-cache reference for bytes/s.

Each case gets its own fabric region (named after the case), created in the parent and
destroyed after the case whatever happened.
"""
from __future__ import annotations

import ctypes
import os
import time
from typing import Any

from .base import Ctl, Spec, Transport, TransportUnavailable, latency_result, make_payload, window_result

#: Largest payload a network's MTU allows (issue 2: MTU 1,490 to 65,536 bytes).
MAX_MTU = 65536
MIN_MTU = 1490
RING_SIZE = 1024
#: The batched receiver samples the payload addresses of every frame of one `recv_batch` in
#: this many (a power of two), to count the pool slots the ring cycles through.
SLOT_SAMPLE_EVERY = 512


def _slots(mtu: int) -> int:
    # Enough for every ring of a case to be full twice over, while keeping the region of the
    # 65,000-byte case near 130 MiB of /dev/shm.
    return 4096 if mtu <= 9000 else 2048


class ShmfabricTransport(Transport):
    """shmfabric nodes on one fabric; `wait_mode` is the receive mode of every node."""

    name = "shmfabric"
    description = "shmfabric send_batch / recv_batch of --batch frames per call (batch API), zero-copy views, busy-poll"
    modes = ("throughput", "latency", "forward")
    max_size = MAX_MTU
    max_size_reason = "a fabric network's MTU is at most 65,536 bytes"
    wait_mode = "poll"
    #: Receive mode of the three forwarding nodes; None: "poll" when every process has a core
    #: of its own, else "block" (on two cores a spinning node takes the core its neighbour
    #: needs: measured 0.4 M frames/s polling against 5-7 M blocking, 64 B).
    forward_wait_mode: str | None = None

    def check_available(self) -> None:
        try:
            from shmfabric import Fabric  # noqa: F401
        except ImportError as exc:
            raise TransportUnavailable(
                f"the fabric core is not importable yet (from shmfabric import Fabric: {exc})"
            ) from exc

    def _forward_mode(self) -> str:
        if self.forward_wait_mode:
            return self.forward_wait_mode
        return "poll" if len(os.sched_getaffinity(0)) >= 3 else "block"

    def _batch(self, spec: Spec) -> int:
        """Frames per call of this case (the per-frame subclass: 1)."""
        return spec.batch

    def _wait_mode(self, spec: Spec) -> str:
        return self._forward_mode() if spec.mode == "forward" else self.wait_mode

    def details(self, spec: Spec) -> dict[str, Any]:
        d: dict[str, Any] = {"wait_mode": self._wait_mode(spec)}
        if spec.mode != "latency":
            batch = self._batch(spec)
            d["batch"] = batch
            d["calls"] = ("batch API vs per-frame socket calls" if batch > 1
                          else "per-frame calls, like the sockets")
        return d

    def busy_polls(self, spec: Spec) -> bool:
        return self._wait_mode(spec) == "poll"

    def setup(self, spec: Spec) -> Any:
        from shmfabric import Fabric

        name = f"bench-{spec.tag}"  # fabric names are at most 31 bytes; the tag is unique per case
        mtu = max(MIN_MTU, spec.size)
        fab = Fabric.create(
            name,
            max_nodes=4,
            ring_size=RING_SIZE,
            networks=[{"mtu": mtu, "slots": _slots(mtu)}],
            ephemeral=False,
        )
        fab.close()
        return {"name": name}

    def cleanup(self, chan: Any) -> None:
        from shmfabric import Fabric

        try:
            Fabric.destroy(chan["name"])
        except Exception:  # already gone (or never made): nothing to clean
            if os.path.exists(f"/dev/shm/shmfabric-{chan['name']}"):
                os.unlink(f"/dev/shm/shmfabric-{chan['name']}")

    # --- plumbing ----------------------------------------------------------------------

    def _node(self, chan: Any, spec: Spec, me: str, wait_mode: str) -> tuple[Any, Any]:
        from shmfabric import Fabric

        fab = Fabric.open(chan["name"])
        node = fab.attach(me, network=0)
        node.set_wait_mode(wait_mode)
        return fab, node

    @staticmethod
    def _close(fab: Any, node: Any) -> None:
        try:
            node.detach()
        finally:
            fab.close()

    def _sender(self, chan: Any, spec: Spec, ctl: Ctl, me: str, to: str, wait_mode: str) -> dict[str, Any]:
        fab, node = self._node(chan, spec, me, wait_mode)
        try:
            peer = node.wait_for_peer(to, timeout=spec.setup_timeout)
            batch = self._batch(spec)
            data = make_payload(spec.size)
            payloads = [data] * batch
            send_batch = node.send_batch
            send = node.send
            yield_cpu = os.sched_yield
            stop = ctl.stop
            sent = 0
            ctl.ready()
            try:
                if batch == 1:  # one send() per frame, as the per-frame transports do
                    while not stop.value:
                        for _ in range(64):
                            if send(peer, data):
                                sent += 1
                            else:  # ring full: let the receiver run
                                yield_cpu()
                else:
                    while not stop.value:
                        k = send_batch(peer, payloads)
                        sent += k
                        if not k:  # ring full: let the receiver run (matters when cores are shared)
                            yield_cpu()
            finally:
                ctl.done.value = 1
            return {"sent": sent, "stats": node.stats()}
        finally:
            self._close(fab, node)

    def _sink(self, chan: Any, spec: Spec, ctl: Ctl, me: str, frm: str, wait_mode: str,
              upstream_done: Any, sample_slots: bool = False) -> dict[str, Any]:
        fab, node = self._node(chan, spec, me, wait_mode)
        try:
            node.wait_for_peer(frm, timeout=spec.setup_timeout)
            recv_batch = node.recv_batch
            most = self._batch(spec)
            sample_slots = sample_slots and most > 1  # a per-frame loop gets no extra work
            slots: set[int] = set()
            sampled = calls = 0
            ctl.ready()
            batch = recv_batch(max_frames=most, timeout=spec.setup_timeout)
            if not len(batch):
                raise TimeoutError("no frame from the sender")
            for f in batch:
                b = f[0]
            batch.release()
            n = frames = 0
            now = t0 = time.perf_counter()
            t_end = t0 + spec.duration
            clock = time.perf_counter
            if sample_slots:
                mask = SLOT_SAMPLE_EVERY - 1
                while now < t_end:
                    batch = recv_batch(max_frames=most, timeout=0.1)
                    for f in batch:
                        n += len(f)
                        b = f[0]
                    frames += len(batch)
                    if not calls & mask:
                        sampled += _note_slots(batch, slots)
                    calls += 1
                    batch.release()
                    now = clock()
            while now < t_end:
                batch = recv_batch(max_frames=most, timeout=0.1)
                for f in batch:
                    n += len(f)
                    b = f[0]
                frames += len(batch)
                batch.release()
                now = clock()
            ctl.stop.value = 1
            while True:  # drain until upstream stopped, so no sender waits on a full ring
                batch = recv_batch(max_frames=most, timeout=0.05)
                k = len(batch)
                batch.release()
                if not k and upstream_done.value:
                    break
            extra: dict[str, Any] = {"stats": node.stats()}
            if sample_slots:
                extra.update(slots_cycled=len(slots), slot_samples=sampled)
            return window_result(frames, n, now - t0, b, **extra)
        finally:
            self._close(fab, node)

    # --- throughput ----------------------------------------------------------------------

    def throughput_sender(self, chan: Any, spec: Spec, ctl: Ctl) -> dict[str, Any]:
        return self._sender(chan, spec, ctl, "tx", "rx", self.wait_mode)

    def throughput_receiver(self, chan: Any, spec: Spec, ctl: Ctl) -> dict[str, Any]:
        return self._sink(chan, spec, ctl, "rx", "tx", self.wait_mode, ctl.done, sample_slots=True)

    # --- latency ---------------------------------------------------------------------------

    def latency_ping(self, chan: Any, spec: Spec, ctl: Ctl) -> dict[str, Any]:
        fab, node = self._node(chan, spec, "ping", self.wait_mode)
        try:
            peer = node.wait_for_peer("pong", timeout=spec.setup_timeout)
            data = make_payload(spec.size)
            send = node.send
            recv_batch = node.recv_batch
            rtts: list[int] = []
            clock = time.perf_counter_ns
            b = k = 0
            ctl.ready()
            t_end = clock() + int(spec.duration * 1e9)
            try:
                while True:
                    t0 = clock()
                    if not send(peer, data):
                        raise RuntimeError("ring full with one frame in flight")
                    batch = recv_batch(max_frames=1, timeout=spec.setup_timeout)
                    for f in batch:
                        k = len(f)
                        b = f[0]
                    got = len(batch)
                    batch.release()
                    t1 = clock()
                    if not got:
                        raise TimeoutError("no echo within the setup timeout")
                    rtts.append(t1 - t0)
                    if t1 >= t_end or len(rtts) >= 1_000_000:
                        break
                if k != spec.size:
                    raise RuntimeError(f"echo of {spec.size} bytes came back with {k}")
            finally:
                ctl.stop.value = 1
            return latency_result(rtts, b, stats=node.stats())
        finally:
            self._close(fab, node)

    def latency_pong(self, chan: Any, spec: Spec, ctl: Ctl) -> dict[str, Any]:
        fab, node = self._node(chan, spec, "pong", self.wait_mode)
        try:
            peer = node.wait_for_peer("ping", timeout=spec.setup_timeout)
            recv_batch = node.recv_batch
            forward = node.forward
            stop = ctl.stop
            echoed = 0
            ctl.ready()
            while True:
                batch = recv_batch(max_frames=16, timeout=0.05)
                for f in batch:
                    b = f[0]  # noqa: F841 - the touch
                    if not forward(peer, f):
                        raise RuntimeError("ring full with one frame in flight")
                    echoed += 1
                got = len(batch)
                batch.release()
                if not got and stop.value:
                    break
            return {"echoed": echoed}
        finally:
            self._close(fab, node)

    # --- forwarding ------------------------------------------------------------------------

    def forward_source(self, chan: Any, spec: Spec, ctl: Ctl) -> dict[str, Any]:
        return self._sender(chan, spec, ctl, "a", "b", self._forward_mode())

    def forward_middle(self, chan: Any, spec: Spec, ctl: Ctl) -> dict[str, Any]:
        fab, node = self._node(chan, spec, "b", self._forward_mode())
        try:
            node.wait_for_peer("a", timeout=spec.setup_timeout)
            sink = node.wait_for_peer("c", timeout=spec.setup_timeout)
            recv_batch = node.recv_batch
            forward_batch = node.forward_batch
            forward = node.forward
            most = self._batch(spec)
            done = ctl.done
            forwarded = 0
            ctl.ready()
            try:
                while most == 1:  # one forward() per frame
                    batch = recv_batch(max_frames=1, timeout=0.05)
                    got = 0
                    for f in batch:
                        b = f[0]  # noqa: F841 - the touch
                        while not forward(sink, f) and not ctl.stop.value:
                            os.sched_yield()  # the sink's ring is full
                        got = 1
                    batch.release()
                    if got:
                        forwarded += 1
                    elif done.value:
                        break
                while most > 1:
                    batch = recv_batch(max_frames=most, timeout=0.05)
                    got = len(batch)
                    if not got:
                        batch.release()
                        if done.value:
                            break
                        continue
                    for f in batch:
                        b = f[0]  # noqa: F841 - the touch
                    k = forward_batch(sink, batch)
                    while k < got and not ctl.stop.value:
                        # The sink's ring is full. forward_batch skips frames it already
                        # forwarded, so calling it again sends the rest as room appears.
                        os.sched_yield()
                        k += forward_batch(sink, batch)
                    forwarded += got
                    batch.release()
            finally:
                ctl.middle_done.value = 1
            return {"forwarded": forwarded, "stats": node.stats()}
        finally:
            self._close(fab, node)

    def forward_sink(self, chan: Any, spec: Spec, ctl: Ctl) -> dict[str, Any]:
        return self._sink(chan, spec, ctl, "c", "b", self._forward_mode(), ctl.middle_done)


class ShmfabricPerFrameTransport(ShmfabricTransport):
    """shmfabric with one call per frame (batch 1), next to the per-frame socket calls."""

    name = "shmfabric-1"
    label = "shmfabric, per-frame calls"
    description = "shmfabric one frame per call: send() / recv_batch(max_frames=1) / forward(), busy-poll"
    modes = ("throughput", "forward")

    def _batch(self, spec: Spec) -> int:
        return 1


class ShmfabricBlockingTransport(ShmfabricTransport):
    """shmfabric with blocking wake-ups (eventfd/futex): the p99 latency target's mode."""

    name = "shmfabric-block"
    description = "shmfabric as above, blocking wake-ups"
    modes = ("throughput", "latency")
    wait_mode = "block"


def _note_slots(batch: Any, slots: set[int]) -> int:
    """Add the payload address of every frame of `batch` (one per pool slot) to `slots`."""
    k = 0
    for f in batch:
        c = ctypes.c_char.from_buffer(f.payload)
        slots.add(ctypes.addressof(c))
        del c  # drop the export before the batch is released
        k += 1
    return k


__all__ = ["ShmfabricTransport", "ShmfabricPerFrameTransport", "ShmfabricBlockingTransport"]
