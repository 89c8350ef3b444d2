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
    seconds (unless the node's output was blocked over that window, see below), in when it stays
    below `in_depth` for `in_for` seconds, never twice within `cooldown`.

    Feed one observation per poll with `observe(now, depth, instances)`; `depth` is the total
    frames waiting in the node's input rings over all its instances. Before each observation the
    supervisor sets `output_blocked`: whether the node's own sends were held up by its next hop at
    that poll (a full next-hop ring). A node whose output is blocked has a queue because its next
    hop does not take frames, and more instances of it would wait on the same rings. That is judged
    over the scale-out window, not per poll: when the depth has been above `out_depth` for `out_for`
    seconds, the scale-out is held back (`observe` answers `HELD`) only if the output was blocked
    at more than half the polls of the last `out_for` seconds *and* at this poll; otherwise it is
    taken (a node that is its chain's bottleneck still scales out when its next hop pauses now and
    then: a GC pause, a flush). `HELD` is answered once, until the depth has stayed at or below
    `out_depth` for `out_for` seconds or a step was taken, so that the skipped scale-out is reported
    (not at every poll). A count below `min_instances` is still repaired, and scale-in is not
    affected.
    """

    policy: ScalePolicy
    above_since: float | None = None  # depth above out_depth (blocked output or not): the scale-out window
    below_since: float | None = None
    last_action: float | None = None
    low_since: float | None = None  # depth at or below out_depth (ends a HELD episode after out_for)
    output_blocked: bool = False  # set by the supervisor before each observe (see above)
    held_told: bool = False  # HELD was answered in this episode of high depth
    # (time, output blocked) of the polls since `above_since`, those of the last `out_for` seconds
    samples: deque[tuple[float, bool]] = field(default_factory=deque)

    def observe(self, now: float, depth: int, instances: int) -> ScaleAction | None:
        """Record one observation; return the step to take now (or HELD: one skipped), if any."""
        p = self.policy
        mean = depth / max(1, instances)
        high = mean > p.out_depth
        blocked = bool(self.output_blocked)
        self.above_since = (self.above_since if self.above_since is not None else now) if high else None
        self.low_since = None if high else (self.low_since if self.low_since is not None else now)
        self.below_since = (self.below_since if self.below_since is not None else now) if mean < p.in_depth else None
        if high:
            self.samples.append((now, blocked))
            while self.samples and self.samples[0][0] < now - p.out_for:
                self.samples.popleft()
        else:
            self.samples.clear()
        if self.low_since is not None and now - self.low_since >= p.out_for:
            self.held_told = False
        if self.last_action is not None and now - self.last_action < p.cooldown:
            return None
        if instances < p.min_instances:
            return self._act(now, ScaleAction.OUT)
        if instances > p.max_instances:
            return self._act(now, ScaleAction.IN)
        if self.above_since is not None and now - self.above_since >= p.out_for and instances < p.max_instances:
            if not (blocked and self.blocked_polls()[0] * 2 > len(self.samples)):
                return self._act(now, ScaleAction.OUT)
            if not self.held_told:
                self.held_told = True  # not a step: no cooldown, and the window goes on
                return ScaleAction.HELD
            return None
        if self.below_since is not None and now - self.below_since >= p.in_for and instances > p.min_instances:
            return self._act(now, ScaleAction.IN)
        return None

    def blocked_polls(self) -> tuple[int, int]:
        """(polls with the output blocked, polls) over the last `out_for` seconds of high depth."""
        return sum(1 for _, b in self.samples if b), len(self.samples)

    def _act(self, now: float, action: ScaleAction) -> ScaleAction:
        # the new instance count changes the mean: measure afresh from here
        self.last_action = now
        self.above_since = self.below_since = self.low_since = None
        self.samples.clear()
        self.held_told = False
        return action

    def reset(self, now: float) -> None:
        """An operator (`scale`) or a reload changed the instance count or the policy: restart the
        measurement and the cooldown from `now`."""
        self._act(now, ScaleAction.OUT)

    def state(self) -> dict:
        """What `observe` changes, to put back with `restore` (a step decided but not taken)."""
        return {"above_since": self.above_since, "below_since": self.below_since, "last_action": self.last_action,
                "low_since": self.low_since, "held_told": self.held_told, "samples": deque(self.samples)}

    def restore(self, state: dict) -> None:
        """Put back what `state()` returned: as if the observations since were not made."""
        for k, v in state.items():
            setattr(self, k, deque(v) if k == "samples" else v)
