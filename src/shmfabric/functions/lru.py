"""Flow tables kept in least-recently-used order, lazily.

A packet of a known flow only updates its entry (an expiry time, a last-use time); it does not
move it. Each entry remembers the value it had when it was queued, so a sweep from the old end
tells an entry used since (queue it again at the new end) from one that was not: the first such
entry is the least recently used one, and every entry behind it was queued later. Used by the
l4lb flow table, the ids flow tracker and ratelimit's per-flow buckets, which must stay O(1) per
packet when full (a whole-table scan per new flow cost tens of milliseconds at 10^5-10^6 flows);
`sweep_queue` does the same for a plain dict with a deque of its keys beside it (the monitor).
"""
from __future__ import annotations

from collections import OrderedDict, deque
from typing import Any, Callable


def sweep(table: OrderedDict, now: float, limit: int | None, done: Callable[[Any, float], bool],
          requeue: Callable[[Any], bool], evict: int = 0) -> tuple[int, int, int]:
    """Work from the old end of `table`: remove the entries that are `done(entry, now)`
    (expired), move to the new end those for which `requeue(entry)` is true (used since they
    were queued; it marks them queued anew), and stop at the first entry that is neither. With
    `evict`, remove up to that many such least recently used entries instead of stopping.
    `limit` bounds the entries looked at (None: no bound).

    Returns (removed as done, evicted, looked at). Each entry is looked at once when it is
    removed, plus once per re-queue, which needs a use in between: O(1) amortized per use.
    """
    removed = evicted = n = 0
    while table and (limit is None or n < limit):
        k = next(iter(table))
        e = table[k]
        n += 1
        if done(e, now):
            del table[k]
            removed += 1
        elif requeue(e):
            table.move_to_end(k)
        elif evicted < evict:
            del table[k]
            evicted += 1
        else:
            break
    return removed, evicted, n


def sweep_queue(table: dict, queue: deque, now: float, limit: int | None, done: Callable[[Any, float], bool],
                requeue: Callable[[Any], bool]) -> tuple[int, int]:
    """`sweep` for a plain dict `table` whose keys are also kept, in the order they were queued,
    in `queue` (append a key there when it is added to the table; remove table entries only
    through this sweep, or clear both). For a table read per packet: a plain dict's `get` is
    ~20 ns cheaper than an OrderedDict's, and popping a plain dict's oldest entries again and
    again is O(n) each, hence the deque beside it (8 bytes per entry).

    Returns (removed as done, looked at); the same amortized O(1) work per use as `sweep`."""
    removed = n = 0
    while queue and (limit is None or n < limit):
        k = queue[0]
        e = table.get(k)
        n += 1
        if e is None:  # gone from the table (it was cleared): nothing to do
            queue.popleft()
        elif done(e, now):
            queue.popleft()
            del table[k]
            removed += 1
        elif requeue(e):
            queue.popleft()
            queue.append(k)
        else:
            break
    return removed, n
