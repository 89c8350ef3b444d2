"""In-order response merge for one client connection (shared by the HTTP and Redis splicers).

The splicer sends the requests of one client connection to several backend connections at
once, so their responses complete in any order. `OrderedMerge` holds one *slot* per request,
numbered by a sequence number in request order, and hands out bytes only in that order:

* bytes appended to the *head* slot (the oldest request not yet fully answered) are ready at
  once, so a long response at the head streams to the client as it arrives;
* bytes appended to any later slot are held until every slot before it is finished;
* `finish(seq)` marks a slot complete; when the head finishes, the held bytes of the following
  slots become ready, up to and including the next unfinished slot's bytes so far.

The merge is bounded by two numbers, the slots it holds (requests read but not answered) and the
bytes it holds (response bytes not yet handed out). It never refuses work itself; the I/O shell
reads `full` after each step and stops reading the client while it is true, and reads
`drained` (both numbers at or below half their limits, so reading does not flap on and off at
the limit) before it resumes.

This module is pure: no asyncio, no sockets, no clock.
"""
from __future__ import annotations

from collections import deque

__all__ = ["BoundedSlots", "OrderedMerge", "OrderedMergeError"]


class OrderedMergeError(Exception):
    """A slot was used out of its life cycle (a bug in the caller, never bad input)."""


class _Slot:
    __slots__ = ("chunks", "done")

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.done = False


class BoundedSlots:
    """What every in-order merge of responses shares: the slots of one client connection, the
    bytes ready for it, and the bounds that drive backpressure (`full` stops reading the client,
    `drained` at half of both limits resumes it, so reading does not flap at the limit)."""

    __slots__ = ("max_slots", "max_bytes", "_slots", "_base", "_ready", "held_bytes")

    def __init__(self, max_slots: int, max_bytes: int) -> None:
        if max_slots < 1 or max_bytes < 1:
            raise ValueError("max_slots and max_bytes must be at least 1")
        self.max_slots = max_slots
        self.max_bytes = max_bytes
        self._slots: deque = deque()
        self._base = 0  # sequence number of self._slots[0] (the head)
        self._ready: list[bytes] = []
        self.held_bytes = 0  # bytes in slots behind the head plus bytes ready but not popped

    @property
    def pending(self) -> int:
        """Slots open (requests read and not yet fully answered)."""
        return len(self._slots)

    @property
    def full(self) -> bool:
        """True when the shell should stop reading the client."""
        return len(self._slots) >= self.max_slots or self.held_bytes >= self.max_bytes

    @property
    def drained(self) -> bool:
        """True when a paused shell may resume reading (hysteresis: half of each limit)."""
        return len(self._slots) <= self.max_slots // 2 and self.held_bytes <= self.max_bytes // 2

    @property
    def idle(self) -> bool:
        """True when no slot is open and nothing waits to be written."""
        return not self._slots and not self._ready


class OrderedMerge(BoundedSlots):
    """Response slots of one client connection, released strictly in request order.

    Args:
        max_slots: requests that may be held (read, not yet fully written back) before `full`.
        max_bytes: response bytes that may be held (not yet handed out) before `full`.
    """

    __slots__ = ("_next", "peak_slots", "_last")

    def __init__(self, max_slots: int = 128, max_bytes: int = 4 * 1024 * 1024) -> None:
        super().__init__(max_slots, max_bytes)
        self._next = 0  # sequence number the next open() returns
        self.peak_slots = 0  # high-water mark of open slots (for tests and metrics)
        self._last: int | None = None  # set by cut_after: no slot after this one is released

    def cut_after(self, seq: int) -> None:
        """Release nothing after slot `seq`: the connection ends with it (a response broke off
        mid-body, so whatever followed would be read as the rest of that body). Bytes already
        held for later slots are dropped, and later ones are ignored."""
        if self._last is not None and self._last <= seq:
            return
        self._last = seq
        for idx in range(max(0, seq + 1 - self._base), len(self._slots)):
            slot = self._slots[idx]
            for chunk in slot.chunks:
                self.held_bytes -= len(chunk)
            slot.chunks = []

    # -- producer side -------------------------------------------------------------------
    def open(self) -> int:
        """Reserve the next slot and return its sequence number."""
        slots = self._slots
        slots.append(_Slot())
        if len(slots) > self.peak_slots:
            self.peak_slots = len(slots)
        seq = self._next
        self._next += 1
        return seq

    def append(self, seq: int, data: bytes) -> None:
        """Add response bytes to slot `seq` (ready at once if `seq` is the head)."""
        if not data or (self._last is not None and seq > self._last):
            return
        idx = seq - self._base
        if idx < 0 or idx >= len(self._slots):
            raise OrderedMergeError(f"slot {seq} is not open")
        slot = self._slots[idx]
        if slot.done:
            raise OrderedMergeError(f"slot {seq} is already finished")
        self.held_bytes += len(data)
        if idx == 0:
            self._ready.append(data)
        else:
            slot.chunks.append(data)

    def finish(self, seq: int, data: bytes = b"") -> None:
        """Mark slot `seq` complete, optionally appending its last bytes first."""
        if data:
            self.append(seq, data)
        idx = seq - self._base
        if idx < 0 or idx >= len(self._slots):
            raise OrderedMergeError(f"slot {seq} is not open")
        slot = self._slots[idx]
        if slot.done:
            raise OrderedMergeError(f"slot {seq} is already finished")
        slot.done = True
        if idx == 0:
            self._advance()

    def _advance(self) -> None:
        slots = self._slots
        ready = self._ready
        last = self._last
        while slots and slots[0].done:
            slots.popleft()
            self._base += 1
            if last is not None and self._base > last:
                break  # cut: the slots after the last one are never released
            if slots:
                head = slots[0]
                if head.chunks:
                    ready.extend(head.chunks)
                    head.chunks = []

    # -- consumer side -------------------------------------------------------------------
    def pop_ready(self) -> list[bytes]:
        """Return (and forget) the bytes that may be written to the client now, in order."""
        ready = self._ready
        if not ready:
            return ready
        self._ready = []
        for chunk in ready:
            self.held_bytes -= len(chunk)
        return ready

    def replace_unsent(self, seq: int, old: bytes, new: bytes) -> bool:
        """Put `new` in place of chunk `old` (the same object) of slot `seq`, if that chunk has not
        been handed out yet; True if it was replaced."""
        idx = seq - self._base
        if idx < 0 or idx >= len(self._slots):
            return False
        chunks = self._ready if idx == 0 else self._slots[idx].chunks
        for i, chunk in enumerate(chunks):
            if chunk is old:
                chunks[i] = new
                self.held_bytes += len(new) - len(old)
                return True
        return False

    @property
    def opened(self) -> int:
        """How many slots `open` has handed out (the next sequence number)."""
        return self._next

    def is_head(self, seq: int) -> bool:
        """True if `seq` is the oldest unfinished slot (its bytes go out at once)."""
        return seq == self._base and bool(self._slots)

    @property
    def head(self) -> int | None:
        """Sequence number of the head slot, or None when no slot is open."""
        return self._base if self._slots else None
