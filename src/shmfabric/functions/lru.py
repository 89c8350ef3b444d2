"""Flow tables kept in least-recently-used order, lazily.

A packet of a known flow only updates its entry (an expiry time, a last-use time); it does not
move it. Each entry remembers the value it had when it was queued, so a sweep from the old end
tells an entry used since (queue it again at the new end) from one that was not: the first such
entry is the least recently used one, and every entry behind it was queued later. Used by the
l4lb flow table, the ids flow tracker and ratelimit's per-flow buckets, which must stay O(1) per
packet when full (a whole-table scan per new flow cost tens of milliseconds at 10^5-10^6 flows).
"""
from __future__ import annotations

from collections import OrderedDict
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
