"""Who is alive: the policy for noticing dead nodes and returning what they held.

A node entry records its pid, the process start time (so a reused pid is not mistaken for the
node) and its pid namespace. Within the same pid namespace a node is alive while /proc/PID/stat
shows the same start time; a node in another pid namespace (a container) is judged by its
heartbeat, which its process refreshes every `BEAT` seconds.
"""
from __future__ import annotations

import os
import sys
import time

from shmfabric.core import native
from shmfabric.core.region import MappedRegion, pid_namespace, proc_start_time

BEAT = 0.2          # seconds between liveness checks and heartbeats
STALE_NS = 2_000_000_000  # a heartbeat older than this, from another pid namespace, means dead

_MY_PIDNS = pid_namespace()


def node_alive(entry: dict, now_ns: int | None = None) -> bool:
    """True if the process behind a node entry still runs."""
    if entry["pidns"] == _MY_PIDNS or entry["pidns"] == 0:
        if entry["pid"] == os.getpid():
            return True
        st = proc_start_time(entry["pid"])
        return st is not None and st == entry["start_time"]
    now_ns = time.monotonic_ns() if now_ns is None else now_ns
    return now_ns - entry["heartbeat_ns"] < STALE_NS


def sweep(region: MappedRegion, attaching: bool = False) -> list[tuple[int, str, int]]:
    """Reclaim every node whose process is gone. Returns (index, name, slots returned) per node.

    An ATTACHING entry is only judged with `attaching=True`, which the caller may pass only while
    it holds the attach lock: claim_node makes an entry ATTACHING before it writes the new pid,
    so outside the lock the entry may still name its previous, dead owner while a live process
    is attaching to it.
    """
    done = []
    wanted = (native.NODE_UP, native.NODE_ATTACHING) if attaching else (native.NODE_UP,)
    for i in range(region.node_hwm()):
        state = region.core.node_state(i)
        if state == native.NODE_RECLAIM:
            # Left half-reclaimed by a reclaimer that died (a reclaim runs wholly under the pool
            # lock, so whoever gets the lock and still sees RECLAIM knows its reclaimer is gone);
            # the reclaim is idempotent and is run again. While a live reclaim is under way,
            # reclaim() waits for the lock, then finds the entry FREE and returns -1.
            e = region.node_entry(i)
        elif state not in wanted:
            continue
        else:
            e = region.node_entry(i)
            if node_alive(e):
                continue
        # gen too: if a new node claimed the slot since we read the entry, it is left alone
        freed = region.core.reclaim(i, state, e["gen"])
        if freed >= 0:
            done.append((i, e["name"], freed))
        elif freed == -2:
            # The pool lock is busy (a sweep, another reclaim, or a holder stopped): each try
            # waits 50 ms, so try the others at the next beat, not now; with many dead entries
            # the caller's heartbeats would stall past STALE_NS, and a live node in another pid
            # namespace would be judged dead.
            break
    _retry_sweep(region)
    if done:
        region.core.wake_all()  # blocked receivers re-check who is up
    return done


def _retry_sweep(region: MappedRegion) -> None:
    """Finish a pool sweep that could not run yet.

    A reclaim of a node killed inside a free-stack operation sweeps the pools for the slots it
    left nowhere. If another node was inside such an operation for the sweep's whole wait (it
    was descheduled, stopped, or is dead and not yet reclaimed), the sweep stays pending; it is
    tried again here, less often after each failure, since every pool operation waits while a
    sweep waits."""
    now = time.monotonic()
    if now < region.sweep_next:
        return
    try:
        got = region.core.sweep()
    except native.CoreError as exc:  # a corrupt free stack: say so once, keep the watchdog going
        if not region.sweep_warned:
            region.sweep_warned = True
            sys.stderr.write(f"shmfabric: fabric {region.name}: {exc}\n")
        got = -1
    if got < 0:
        region.sweep_gap = min(max(region.sweep_gap * 2, BEAT), 5.0)
        region.sweep_next = now + region.sweep_gap
    else:
        region.sweep_gap, region.sweep_next = 0.0, 0.0


def any_alive(region: MappedRegion) -> bool:
    """True if some attached node's process still runs."""
    for i in range(region.node_hwm()):
        if region.core.node_state(i) in (native.NODE_UP, native.NODE_ATTACHING) and node_alive(region.node_entry(i)):
            return True
    return False
