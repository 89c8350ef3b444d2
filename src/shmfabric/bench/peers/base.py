"""What every transport of `shmfabric bench transport` implements, and the shared plumbing.

A transport is a small class. The harness (``shmfabric.bench.transport``) calls, in the parent
process, ``setup(spec)`` to make whatever must exist before the worker processes start (a socket
pair, a queue, a path name, a fabric region) and ``cleanup(chan)`` afterwards, always, whatever
happened. In between it starts one process per *role* of the mode being measured and calls
``run(role, chan, spec, ctl)`` in each. Roles:

- ``throughput``: ``sender`` sends frames as fast as it can; ``receiver`` touches each frame
  and counts frames and bytes during a timed window that starts at its first frame.
- ``latency``: ``pong`` echoes each frame back; ``ping`` sends one frame, waits for the echo,
  and records the round trip, many times. One-way latency is half a round trip.
- ``forward``: ``source`` sends, ``middle`` receives, touches and forwards each frame,
  ``sink`` touches and counts like ``receiver``.

"Touching" a frame means what a user's code would at least do with it: read its length and one
byte of payload (``n += len(f); b = f[0]``), for every transport alike. A figure that counts
frames nobody looked at is not a result.

Ending a run: the measuring side (receiver, ping, sink) sets ``ctl.stop`` when its window is
over; the sending side notices, stops, and sets ``ctl.done``; the measuring side then drains
what is still in flight so that nobody stays blocked on a full queue. Reliable per-frame
transports end the stream in-band with one zero-length frame (cheaper than a timeout on every
receive); the others receive with a timeout and look at the flags when nothing came.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

#: First byte of every payload the benchmark sends; receivers report the last first byte they
#: read so a test can check that real payload bytes arrived (no extra work in the hot loop).
MARKER = 0x5A

#: Receivers look at the clock once per this many frames (per-frame transports).
CHECK_EVERY = 64

MODES = ("throughput", "latency", "forward")
ROLES: dict[str, tuple[str, ...]] = {
    "throughput": ("sender", "receiver"),
    "latency": ("pong", "ping"),
    "forward": ("source", "middle", "sink"),
}
#: The role whose result carries the figures, per mode.
MEASURING_ROLE = {"throughput": "receiver", "latency": "ping", "forward": "sink"}

#: Upper bound of round-trip samples kept per latency case (memory stays small).
MAX_SAMPLES = 1_000_000


class TransportUnavailable(Exception):
    """The transport cannot run here at all (library missing, core not built)."""


@dataclass(frozen=True)
class Spec:
    """One case: a frame size, a mode, and how long to measure."""

    size: int
    mode: str
    duration: float
    setup_timeout: float = 10.0
    #: Frames per batch for transports that have batch calls.
    batch: int = 256
    #: How the harness starts the workers ("fork" or "spawn"); objects shared with them
    #: (queues, locks) must come from the same multiprocessing context.
    start_method: str = "fork"
    #: Unique token for names of paths, services and regions created for this case.
    tag: str = field(default_factory=lambda: f"{os.getpid()}-{time.monotonic_ns() % 10**9}")


class Ctl:
    """Flags and the start barrier shared by the processes of one case (made before fork)."""

    def __init__(self, mp_ctx: Any, parties: int, setup_timeout: float) -> None:
        self._barrier = mp_ctx.Barrier(parties)
        self._timeout = setup_timeout
        # Raw shared bytes: a read is a plain memory load, cheap enough for hot loops.
        self.stop = mp_ctx.RawValue("b", 0)
        self.done = mp_ctx.RawValue("b", 0)
        self.middle_done = mp_ctx.RawValue("b", 0)

    def ready(self) -> None:
        """Wait until every process of the case has finished its own setup."""
        self._barrier.wait(self._timeout)

    def abort(self) -> None:
        """Release everybody: a process failed or the case ran out of time."""
        self.stop.value = 1
        self.done.value = 1
        self.middle_done.value = 1
        self._barrier.abort()


def make_payload(size: int) -> bytes:
    """A payload of `size` bytes whose first byte is MARKER (size 0 gives the end frame)."""
    if size <= 0:
        return b""
    return bytes([MARKER]) + bytes((i * 7) & 0xFF for i in range(1, min(size, 256))) + bytes(max(0, size - 256))


def window_result(frames: int, nbytes: int, elapsed: float, last_byte: int, **extra: Any) -> dict[str, Any]:
    """The measuring side's result for throughput and forward cases."""
    return {"frames": frames, "bytes": nbytes, "elapsed": elapsed, "last_byte": last_byte, **extra}


def latency_result(rtts_ns: list[int], last_byte: int, **extra: Any) -> dict[str, Any]:
    """The ping side's result: one-way latency percentiles from round trips in nanoseconds.

    The first 1% of samples (at most 100) are dropped as warm-up: first-touch page faults and
    cold caches belong to start-up, not to the steady state the figure describes.
    """
    warm = min(100, len(rtts_ns) // 100)
    s = sorted(rtts_ns[warm:] or rtts_ns)
    if not s:
        raise RuntimeError("no round trip completed")

    def pct(p: float) -> float:
        return s[min(len(s) - 1, int(p * len(s)))] / 2 / 1000.0

    return {
        "samples": len(s),
        "p50_us": pct(0.50),
        "p99_us": pct(0.99),
        "min_us": s[0] / 2 / 1000.0,
        "max_us": s[-1] / 2 / 1000.0,
        "last_byte": last_byte,
        **extra,
    }


class Transport:
    """Base class of a benchmarked transport. Subclasses implement ``<mode>_<role>`` methods.

    Methods run in worker processes get ``(chan, spec, ctl)`` and return a small dict.
    They must call ``ctl.ready()`` once their own setup is done and before timing starts.
    """

    #: Name used in JSON and ``--only``.
    name: ClassVar[str] = ""
    #: Name shown in the table (and the rows' ``label``) when it needs saying how the
    #: transport is driven; empty: the name.
    label: ClassVar[str] = ""
    #: One line for the docs and the table's note column.
    description: ClassVar[str] = ""
    #: Modes this transport takes part in.
    modes: ClassVar[tuple[str, ...]] = ("throughput", "latency")
    #: Largest payload it can carry, or None for no limit of its own.
    max_size: ClassVar[int | None] = None
    max_size_reason: ClassVar[str] = ""

    def check_available(self) -> None:
        """Raise TransportUnavailable with a reason if this transport cannot run here."""

    def unsupported(self, spec: Spec) -> str | None:
        """Why this case cannot be measured ('n/a' row), or None."""
        if spec.mode not in self.modes:
            return f"{self.name} does not take part in {spec.mode}"
        if self.max_size is not None and spec.size > self.max_size:
            return self.max_size_reason or f"frames above {self.max_size} bytes are not supported"
        return None

    def details(self, spec: Spec) -> dict[str, Any]:
        """How the case is run (batching, wait mode...), recorded in the result row."""
        return {}

    def busy_polls(self, spec: Spec) -> bool:
        """True if the receiving side of this case spins on the CPU instead of sleeping until a
        frame arrives. Latency is compared like for like: busy-polling rows against a
        busy-polling seqpacket, blocking rows against the blocking one."""
        return False

    def setup(self, spec: Spec) -> Any:
        """Create shared resources in the parent before the workers start; returns `chan`."""
        return None

    def cleanup(self, chan: Any) -> None:
        """Remove whatever `setup` or the workers created; called even after failures."""

    def run(self, role: str, chan: Any, spec: Spec, ctl: Ctl) -> dict[str, Any]:
        """Run one role of the case in the current (worker) process."""
        fn = getattr(self, f"{spec.mode}_{role}", None)
        if fn is None:
            raise NotImplementedError(f"{self.name}: no {spec.mode} {role}")
        return fn(chan, spec, ctl)


def wait_flag(flag: Any, timeout: float) -> bool:
    """Sleep-poll a shared flag (outside hot loops only); True if it was set in time."""
    end = time.monotonic() + timeout
    while not flag.value:
        if time.monotonic() > end:
            return False
        time.sleep(0.001)
    return True


# --- Loops shared by per-frame transports -------------------------------------------------
# `send` and `recv` are bound methods of the transport's own objects (Connection.send_bytes,
# socket.recv, Queue.get...), held in locals, so the loops below cost what an inlined loop costs.


def frame_sender(send: Any, data: Any, ctl: Ctl, end: Any = None) -> dict[str, Any]:
    """Send `data` until the receiver says stop; then send the end frame `end` if given."""
    stop = ctl.stop
    sent = 0
    ctl.ready()
    try:
        while not stop.value:
            for _ in range(CHECK_EVERY):
                send(data)
            sent += CHECK_EVERY
        if end is not None:
            send(end)
    finally:
        ctl.done.value = 1
    return {"sent": sent}


def frame_receiver(recv: Any, spec: Spec, ctl: Ctl, drain: Any, first: Any = None) -> dict[str, Any]:
    """Touch every frame for `spec.duration` seconds from the first one; then `drain()`.

    `first` receives the first frame with a bounded wait (default: `recv`).
    """
    ctl.ready()
    f = (first or recv)()
    b = f[0]
    n = frames = 0
    now = t0 = time.perf_counter()
    t_end = t0 + spec.duration
    clock = time.perf_counter
    while now < t_end:
        for _ in range(CHECK_EVERY):
            f = recv()
            n += len(f)
            b = f[0]
        frames += CHECK_EVERY
        now = clock()
    ctl.stop.value = 1
    drain()
    return window_result(frames, n, now - t0, b)


def drain_until_end(recv: Any) -> Any:
    """A drain for in-band ended streams: receive until the zero-length end frame."""

    def drain() -> None:
        while len(recv()):
            pass

    return drain


def frame_ping(send: Any, recv: Any, spec: Spec, ctl: Ctl, end: Any = None, **extra: Any) -> dict[str, Any]:
    """Round trips of one frame for `spec.duration` seconds; then send `end` if given."""
    data = make_payload(spec.size)
    rtts: list[int] = []
    append = rtts.append
    clock = time.perf_counter_ns
    b = 0
    ctl.ready()
    t_end = clock() + int(spec.duration * 1e9)
    try:
        while True:
            t0 = clock()
            send(data)
            f = recv()
            n = len(f)
            b = f[0]
            t1 = clock()
            append(t1 - t0)
            if t1 >= t_end or len(rtts) >= MAX_SAMPLES:
                break
        if n != spec.size:
            raise RuntimeError(f"echo of {spec.size} bytes came back with {n}")
    finally:
        ctl.stop.value = 1
    if end is not None:
        send(end)
    return latency_result(rtts, b, **extra)


def frame_pong(recv: Any, send: Any, ctl: Ctl) -> dict[str, Any]:
    """Echo frames until the zero-length end frame."""
    ctl.ready()
    echoed = 0
    while True:
        f = recv()
        if not len(f):
            break
        b = f[0]  # noqa: F841 - the touch every receiver does
        send(f)
        echoed += 1
    return {"echoed": echoed}


def frame_middle(recv: Any, send: Any, ctl: Ctl) -> dict[str, Any]:
    """Receive, touch and forward each frame; the end frame is forwarded too, then we stop."""
    ctl.ready()
    forwarded = 0
    try:
        while True:
            f = recv()
            if not len(f):
                send(f)
                break
            b = f[0]  # noqa: F841
            send(f)
            forwarded += 1
    finally:
        ctl.middle_done.value = 1
    return {"forwarded": forwarded}
