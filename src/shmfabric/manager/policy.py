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
    # a scale-out the depth asks for, not taken: the node's own output is blocked (see ScaleDecider)
    HELD = "held"


@dataclass
class ScaleDecider:
    """Scale out when the mean input depth per instance stays above `out_depth` for `out_for`
    seconds while the node's output flows, in when it stays below `in_depth` for `in_for` seconds,
    never twice within `cooldown`.

    Feed one observation per poll with `observe(now, depth, instances)`; `depth` is the total
    frames waiting in the node's input rings over all its instances. Before each observation the
    supervisor sets `output_blocked`: whether the node's own sends were held up by its next hop at
    that poll (a full next-hop ring). A node whose output is blocked has a queue because its next
    hop does not take frames, and more instances of it would wait on the same rings: such a
    sample does not count towards the scale-out window (it starts again once the output flows),
    and when the depth has been above `out_depth` for `out_for` seconds with the output blocked,
    `observe` answers `HELD`, once until the depth has stayed at or below `out_depth` for `out_for`
    seconds or a step was taken, so that the skipped scale-out is reported (not at every poll). A
    count below `min_instances` is still repaired.
    """

    policy: ScalePolicy
    above_since: float | None = None  # depth above out_depth, output flowing: the scale-out window
    below_since: float | None = None
    last_action: float | None = None
    high_since: float | None = None  # depth above out_depth, whatever the output did
    low_since: float | None = None  # depth at or below out_depth (ends a HELD episode after out_for)
    output_blocked: bool = False  # set by the supervisor before each observe (see above)
    held_told: bool = False  # HELD was answered in this episode of high depth

    def observe(self, now: float, depth: int, instances: int) -> ScaleAction | None:
        """Record one observation; return the step to take now (or HELD: one skipped), if any."""
        p = self.policy
        mean = depth / max(1, instances)
        high = mean > p.out_depth
        blocked = bool(self.output_blocked)
        self.high_since = (self.high_since if self.high_since is not None else now) if high else None
        self.low_since = None if high else (self.low_since if self.low_since is not None else now)
        self.above_since = (self.above_since if self.above_since is not None else now) if high and not blocked else None
        self.below_since = (self.below_since if self.below_since is not None else now) if mean < p.in_depth else None
        if self.low_since is not None and now - self.low_since >= p.out_for:
            self.held_told = False
        if self.last_action is not None and now - self.last_action < p.cooldown:
            return None
        if instances < p.min_instances:
            return self._act(now, ScaleAction.OUT)
        if instances > p.max_instances:
            return self._act(now, ScaleAction.IN)
        if self.above_since is not None and now - self.above_since >= p.out_for and instances < p.max_instances:
            return self._act(now, ScaleAction.OUT)
        if (blocked and self.high_since is not None and now - self.high_since >= p.out_for
                and instances < p.max_instances and not self.held_told):
            self.held_told = True  # not a step: no cooldown, and the window goes on
            return ScaleAction.HELD
        if self.below_since is not None and now - self.below_since >= p.in_for and instances > p.min_instances:
            return self._act(now, ScaleAction.IN)
        return None

    def _act(self, now: float, action: ScaleAction) -> ScaleAction:
        # the new instance count changes the mean: measure afresh from here
        self.last_action = now
        self.above_since = self.below_since = self.high_since = self.low_since = None
        self.held_told = False
        return action

    def reset(self, now: float) -> None:
        """An operator (`scale`) or a reload changed the instance count or the policy: restart the
        measurement and the cooldown from `now`."""
        self._act(now, ScaleAction.OUT)
