"""Reconnect backoff and health bookkeeping for backend servers (shared by the HTTP and Redis splicers).

Both are pure: the caller passes `now` (seconds, any monotonic clock) and schedules timers itself.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

__all__ = ["Backoff", "HealthState"]


@dataclass(slots=True)
class Backoff:
    """Exponential backoff with full jitter (AWS "exponential backoff and jitter").

    Jitter keeps many splicer workers from reconnecting to a recovering server in lock step.
    `next_delay()` returns the delay before the next attempt; `reset()` after a success.
    """

    base: float = 0.05
    cap: float = 5.0
    attempts: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.base * (2 ** min(self.attempts, 30)))
        self.attempts += 1
        return self.rng.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempts = 0


@dataclass(slots=True)
class HealthState:
    """Up/down decision from check results, as HAProxy's `rise` and `fall`.

    A server goes down after `fall` consecutive failures and comes back after `rise` consecutive
    successes. The HTTP pool also records its own connects (a refused one counts like a failed
    check, so a dead server leaves rotation before the next active check; a successful one like
    a passing check, unless the active check is an HTTP one); the Redis splicer records its
    active checks only.
    """

    rise: int = 2
    fall: int = 3
    up: bool = True
    _ok_run: int = 0
    _fail_run: int = 0

    def mark_down(self) -> None:
        """Down now, whatever the runs so far (passive health: live traffic failed); back after
        `rise` successes as usual."""
        self.up = False
        self._ok_run = 0
        self._fail_run = 0

    def record(self, ok: bool) -> bool | None:
        """Record one result; return the new state if it changed, else None."""
        if ok:
            self._fail_run = 0
            self._ok_run += 1
            if not self.up and self._ok_run >= self.rise:
                self.up = True
                return True
        else:
            self._ok_run = 0
            self._fail_run += 1
            if self.up and self._fail_run >= self.fall:
                self.up = False
                return False
        return None
