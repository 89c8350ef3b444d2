"""Restart and scale decisions, pure: the supervisor feeds observations and `now`, these say what to do.

Nothing here reads the clock, starts a process or touches the fabric, so every rule is tested with
hand-made time series (tests/manager/test_policy.py).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import Enum

from shmfabric.manager.config import RestartPolicy, ScalePolicy

__all__ = ["RestartTracker", "ScaleAction", "ScaleDecider"]


@dataclass
class RestartTracker:
    """When (if at all) to restart an instance that exited.

    The delay doubles per restart from `backoff_initial` up to `backoff_max` (deterministic, no
    jitter: one manager restarts one process, there is no herd to spread). More than
    `max_restarts` exits within `window` seconds means the instance is given up ("failed"). An
    instance that stayed up `stable_after` seconds starts again from the initial delay.
    """

    policy: RestartPolicy
    exits: deque[float] = field(default_factory=deque)
    consecutive: int = 0
    started_at: float | None = None

    def on_start(self, now: float) -> None:
        """The instance was (re)started at `now`."""
        self.started_at = now

    def on_exit(self, now: float) -> float | None:
        """The instance exited at `now`: return the time to restart it, or None to give up."""
        p = self.policy
        if self.started_at is not None and now - self.started_at >= p.stable_after:
            self.consecutive = 0
        self.started_at = None
        if not p.enabled:
            return None
        self.exits.append(now)
        while self.exits and now - self.exits[0] > p.window:
            self.exits.popleft()
        if len(self.exits) > p.max_restarts:
            return None
        delay = min(p.backoff_max, p.backoff_initial * (2 ** min(self.consecutive, 30)))
        self.consecutive += 1
        return now + delay

    def reset(self) -> None:
        """Forget the history (an operator restarted the node by hand)."""
        self.exits.clear()
        self.consecutive = 0


class ScaleAction(str, Enum):
    OUT = "out"
    IN = "in"


@dataclass
class ScaleDecider:
    """Scale out when the mean input depth per instance stays above `out_depth` for `out_for`
    seconds, in when it stays below `in_depth` for `in_for` seconds, never twice within `cooldown`.

    Feed one observation per poll with `observe(now, depth, instances)`; `depth` is the total
    frames waiting in the node's input rings over all its instances.
    """

    policy: ScalePolicy
    above_since: float | None = None
    below_since: float | None = None
    last_action: float | None = None

    def observe(self, now: float, depth: int, instances: int) -> ScaleAction | None:
        """Record one observation; return the step to take now, if any."""
        p = self.policy
        mean = depth / max(1, instances)
        self.above_since = (self.above_since if self.above_since is not None else now) if mean > p.out_depth else None
        self.below_since = (self.below_since if self.below_since is not None else now) if mean < p.in_depth else None
        if self.last_action is not None and now - self.last_action < p.cooldown:
            return None
        if instances < p.min_instances:
            return self._act(now, ScaleAction.OUT)
        if instances > p.max_instances:
            return self._act(now, ScaleAction.IN)
        if self.above_since is not None and now - self.above_since >= p.out_for and instances < p.max_instances:
            return self._act(now, ScaleAction.OUT)
        if self.below_since is not None and now - self.below_since >= p.in_for and instances > p.min_instances:
            return self._act(now, ScaleAction.IN)
        return None

    def _act(self, now: float, action: ScaleAction) -> ScaleAction:
        # the new instance count changes the mean: measure afresh from here
        self.last_action = now
        self.above_since = self.below_since = None
        return action

    def reset(self, now: float) -> None:
        """An operator changed the instance count: restart the measurement and the cooldown."""
        self._act(now, ScaleAction.OUT)
