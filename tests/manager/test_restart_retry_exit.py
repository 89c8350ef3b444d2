"""An instance whose restart finds its node name held by a live node (a stray process attached
under it) exits 75, a condition that clears: the manager retries it after its backoff and it comes
up once the name is free. Before, the runtime exited 2 ("invalid configuration") and the manager
marked the instance failed for good.

Real function processes on a real fabric, the supervisor's loop as under `shmfabric up`."""
from __future__ import annotations

import os
import signal

import pytest

from shmfabric.fabric import Fabric
from tests.manager.test_adapter_gaps import _until, explain
from tests.manager.test_router_steer_adapter_down import _functions_topology

pytestmark = pytest.mark.timeout(150)

SLOW = "    restart: {backoff_initial: 1, backoff_max: 1, max_restarts: 1000, window: 1}\n"


def test_a_restart_that_finds_its_name_held_is_retried_and_comes_up_once_it_is_free(run_topology, loop):
    text = _functions_topology("").replace("  - name: sink-a\n    function: sink\n",
                                           "  - name: sink-a\n    function: sink\n" + SLOW)
    sup = run_topology(text)
    loop(sup)
    sink_a = sup.nodes["sink-a"].instances[0]
    stray_fab = Fabric.open(sup.fabric.name)
    try:
        os.kill(sink_a.pid, signal.SIGKILL)
        assert _until(lambda: sink_a.state == "backoff"), explain(sup, "sink-a")
        stray = stray_fab.attach("sink-a")  # (the dead holder is reclaimed by this attach)
        restarts = sink_a.restarts
        # its restart exits 75 naming the holder, and it is in backoff again, not failed
        assert _until(lambda: sink_a.restarts > restarts and sink_a.state == "backoff"
                      and "already attached" in (sink_a.error or "")), explain(sup, "sink-a")
        assert sink_a.exit_code == 75, explain(sup, "sink-a")
        assert not [e for e in sup.events if e["kind"] == "failed" and e["node"] == "sink-a"], explain(sup, "sink-a")
        stray.detach()
        assert _until(lambda: sink_a.state == "running" and sup.fabric.node_id("sink-a") is not None), \
            explain(sup, "sink-a")
    finally:
        stray_fab.close()
