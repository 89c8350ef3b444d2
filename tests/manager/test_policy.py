"""Restart and scale decisions from hand-made time series (time is an input)."""
from __future__ import annotations

from shmfabric.manager.config import RestartPolicy, ScalePolicy
from shmfabric.manager.policy import RestartTracker, ScaleAction, ScaleDecider


def test_backoff_doubles_up_to_the_cap():
    t = RestartTracker(RestartPolicy(backoff_initial=0.5, backoff_max=3, max_restarts=10, window=1000, stable_after=100))
    now, delays = 0.0, []
    for _ in range(5):
        t.on_start(now)
        now += 1
        at = t.on_exit(now)
        delays.append(at - now)
        now = at
    assert delays == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_gives_up_after_max_restarts_within_the_window():
    t = RestartTracker(RestartPolicy(backoff_initial=0, max_restarts=2, window=10))
    assert t.on_exit(1.0) == 1.0
    assert t.on_exit(2.0) == 2.0
    assert t.on_exit(3.0) is None  # the third exit within 10 s


def test_exits_older_than_the_window_are_forgotten():
    t = RestartTracker(RestartPolicy(backoff_initial=0, max_restarts=2, window=10))
    assert t.on_exit(0.0) is not None
    assert t.on_exit(5.0) is not None
    assert t.on_exit(12.0) is not None  # the exit at 0.0 left the window
    assert t.on_exit(13.0) is None      # 5, 12, 13: three within 10 s


def test_a_stable_run_resets_the_backoff():
    t = RestartTracker(RestartPolicy(backoff_initial=1, backoff_max=30, max_restarts=100, window=1000, stable_after=5))
    t.on_start(0)
    assert t.on_exit(1) == 2          # 1 s
    t.on_start(2)
    assert t.on_exit(3) == 5          # 2 s
    t.on_start(5)
    assert t.on_exit(50) == 51        # ran 45 s > stable_after: back to 1 s


def test_restart_disabled():
    assert RestartTracker(RestartPolicy(enabled=False)).on_exit(1.0) is None


def feed(d: ScaleDecider, series: list[tuple[float, int, int]]) -> list[tuple[float, ScaleAction]]:
    return [(now, a) for now, depth, n in series if (a := d.observe(now, depth, n)) is not None]


POL = ScalePolicy(min_instances=1, max_instances=3, out_depth=100, out_for=2, in_depth=10, in_for=5, cooldown=3)


def test_scale_out_only_when_depth_stays_high():
    d = ScaleDecider(POL)
    # a spike (one high sample) does nothing; a sustained queue does after out_for seconds
    acts = feed(d, [(0, 500, 1), (0.5, 0, 1), (1, 500, 1), (2, 500, 1), (2.9, 500, 1), (3.0, 500, 1)])
    assert acts == [(3.0, ScaleAction.OUT)]


def test_depth_is_per_instance_and_cooldown_holds():
    d = ScaleDecider(POL)
    assert feed(d, [(0, 300, 2), (2, 300, 2)]) == [(2, ScaleAction.OUT)]      # mean 150 > 100
    # right after a step, nothing for `cooldown` seconds even though the mean stays high
    assert feed(d, [(2.5, 400, 3), (4.9, 400, 3)]) == []
    d2 = ScaleDecider(POL)
    assert feed(d2, [(0, 190, 2), (5, 190, 2)]) == []                        # mean 95 < 100


def test_never_beyond_max_or_below_min():
    d = ScaleDecider(POL)
    assert feed(d, [(t, 1000, 3) for t in range(10)]) == []
    d = ScaleDecider(POL)
    assert feed(d, [(t, 0, 1) for t in range(20)]) == []


def test_scale_in_after_a_quiet_period():
    d = ScaleDecider(POL)
    acts = feed(d, [(0, 5, 3), (4, 5, 3), (4.5, 50, 3), (5, 5, 3), (9.9, 5, 3), (10, 5, 3)])
    assert acts == [(10, ScaleAction.IN)]  # the sample at 4.5 restarted the quiet period


def test_below_min_is_repaired_at_once():
    d = ScaleDecider(ScalePolicy(min_instances=2, max_instances=3))
    assert d.observe(0, 0, 1) is ScaleAction.OUT


def test_reset_starts_a_cooldown():
    d = ScaleDecider(POL)
    d.reset(10)
    assert feed(d, [(10, 500, 1), (12.5, 500, 1)]) == []
    assert feed(d, [(13, 500, 1)]) == [(13, ScaleAction.OUT)]


def feed_blocked(d: ScaleDecider, series: list[tuple[float, int, int, bool]]) -> list[tuple[float, ScaleAction]]:
    """Like `feed`, each sample with whether the node's own output was blocked at that poll."""
    out = []
    for now, depth, n, blocked in series:
        d.output_blocked = blocked
        if (a := d.observe(now, depth, n)) is not None:
            out.append((now, a))
    return out


def test_a_node_whose_output_is_blocked_is_not_scaled_out_and_the_skip_is_told_once():
    d = ScaleDecider(POL)
    # a deep queue, but its sends are refused by a full next hop all along: no step, one HELD
    acts = feed_blocked(d, [(t / 2, 500, 1, True) for t in range(0, 20)])
    assert acts == [(2.0, ScaleAction.HELD)]
    assert d.last_action is None  # HELD is no step: no cooldown started


def test_a_blocked_output_holds_the_scale_out_only_while_it_is_blocked_at_most_polls_and_now():
    d = ScaleDecider(POL)
    acts = feed_blocked(d, [(0, 500, 1, True), (1, 500, 1, True), (2, 500, 1, True),  # HELD at 2
                            (2.5, 500, 1, True),                                      # told once
                            (3, 500, 1, False)])                                      # flowing now
    # blocked at most polls of the window, but not at this one: the output flows, the queue stays:
    # the scale-out is taken
    assert acts == [(2, ScaleAction.HELD), (3, ScaleAction.OUT)]
    # blocked now, but at a minority of the window's polls: taken too
    d = ScaleDecider(POL)
    acts = feed_blocked(d, [(0, 500, 1, False), (0.5, 500, 1, False), (1, 500, 1, True), (1.5, 500, 1, False),
                            (2, 500, 1, True)])
    assert acts == [(2, ScaleAction.OUT)]
    # a tie is no majority: taken
    d = ScaleDecider(POL)
    assert feed_blocked(d, [(0, 500, 1, False), (1, 500, 1, True), (1.5, 500, 1, False),
                            (2, 500, 1, True)]) == [(2, ScaleAction.OUT)]
    # only the polls of the last out_for seconds count (here the cooldown of a reset held the
    # decision back to 3): blocked at 0, 0.5, 1 and 3, flowing at 1.5 to 2.5. At 3, blocked now and
    # at 2 of the 5 polls of [1, 3]: taken (over all 7 polls since 0 it would be 4: held)
    d = ScaleDecider(POL)
    d.reset(0)
    series = [(0, 500, 1, True), (0.5, 500, 1, True), (1, 500, 1, True), (1.5, 500, 1, False),
              (2, 500, 1, False), (2.5, 500, 1, False), (3, 500, 1, True)]
    assert feed_blocked(d, series) == [(3, ScaleAction.OUT)]
    d = ScaleDecider(POL)
    d.reset(0)
    series[3] = (1.5, 500, 1, True)  # now 4 of [1, 3]'s 5 polls: held
    assert feed_blocked(d, series) == [(3, ScaleAction.HELD)]


def test_a_bottleneck_whose_next_hop_pauses_now_and_then_is_scaled_out():
    # the node cannot keep up (its queue deep all along); its next hop pauses briefly (a GC pause, a
    # flush) once a second, so one poll in four finds its output blocked, this one among them.
    # Before, each such poll restarted the window: never 2 s of flowing output, never scaled out
    d = ScaleDecider(POL)
    series = [(k / 4, 500, 1, k % 4 == 0) for k in range(0, 41)]
    acts = feed_blocked(d, series)
    assert acts and acts[0] == (2.0, ScaleAction.OUT), acts
    assert ScaleAction.HELD not in [a for _, a in acts]


def test_a_step_not_taken_is_put_back():
    # the supervisor could not start the step's thread: the decider as before the round decides it
    # again at the next (no cooldown begun, the window not cleared)
    d = ScaleDecider(POL)
    assert feed(d, [(0, 500, 1), (1, 500, 1)]) == []
    saved = d.state()
    assert d.observe(2, 500, 1) is ScaleAction.OUT and d.last_action == 2
    d.restore(saved)
    assert d.last_action is None and d.above_since == 0
    assert d.observe(2.1, 500, 1) is ScaleAction.OUT


def test_held_is_told_again_after_the_depth_stayed_low():
    d = ScaleDecider(POL)
    series = [(0, 500, 1, True), (2, 500, 1, True), (3, 500, 1, True),   # HELD at 2, not again at 3
              (3.5, 0, 1, True), (4, 500, 1, True), (6, 500, 1, True),    # a dip shorter than out_for
              (7, 0, 1, False), (9, 0, 1, False),                         # low for out_for: episode over
              (10, 500, 1, True), (12, 500, 1, True)]
    assert feed_blocked(d, series) == [(2, ScaleAction.HELD), (12, ScaleAction.HELD)]


def test_blocked_or_not_a_count_below_min_is_repaired_and_in_still_works():
    d = ScaleDecider(ScalePolicy(min_instances=2, max_instances=3))
    assert feed_blocked(d, [(0, 5000, 1, True)]) == [(0, ScaleAction.OUT)]
    d = ScaleDecider(POL)
    assert feed_blocked(d, [(0, 0, 2, True), (5, 0, 2, True)]) == [(5, ScaleAction.IN)]
    # at max_instances nothing is skipped: there is no step to skip
    d = ScaleDecider(POL)
    assert feed_blocked(d, [(t, 1000, 3, True) for t in range(10)]) == []

