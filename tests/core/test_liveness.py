"""Liveness policy: a node entry is alive while its pid runs with the same start time (same pid
namespace), or while its heartbeat is fresh (another pid namespace)."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from shmfabric.core.liveness import STALE_NS, node_alive
from shmfabric.core.region import pid_namespace, proc_start_time

pytestmark = pytest.mark.timeout(30)


def _entry(pid: int, start: int | None, pidns: int | None = None, beat: int = 0) -> dict:
    return {"pid": pid, "start_time": start or 0, "pidns": pid_namespace() if pidns is None else pidns,
            "heartbeat_ns": beat}


def test_proc_start_time_of_self_and_missing():
    assert proc_start_time(os.getpid()) > 0
    assert proc_start_time(0x3FFFFFFF) is None


def test_process_with_spaces_and_parens_in_its_name():
    # comm may hold ") (" and spaces; field 22 must still be found after the last ')'
    code = "import sys; open('/proc/self/comm', 'w').write('a) (b c'); print('ok', flush=True); sys.stdin.read()"
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline() == "ok\n"
        with open(f"/proc/{p.pid}/comm") as f:
            assert f.read().strip() == "a) (b c"
        st = proc_start_time(p.pid)
        assert st is not None and st > 0
        assert node_alive(_entry(p.pid, st))
    finally:
        p.stdin.close()
        p.wait(timeout=10)


def test_alive_dead_and_reused_pid():
    p = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    start = proc_start_time(p.pid)
    e = _entry(p.pid, start)
    assert node_alive(e)
    assert not node_alive(_entry(p.pid, start + 1))  # same pid, other process: a reused pid
    p.stdin.close()
    p.wait(timeout=10)
    assert not node_alive(e)  # exited (and reaped)


def test_zombie_counts_as_dead():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    start = None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{p.pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
        except FileNotFoundError:
            break
        time.sleep(0.01)
    assert not node_alive(_entry(p.pid, start or 1))
    p.wait(timeout=10)


def test_other_pid_namespace_uses_heartbeat():
    now = time.monotonic_ns()
    other = pid_namespace() + 1
    assert node_alive(_entry(1, 1, pidns=other, beat=now - 100_000_000), now_ns=now)
    assert not node_alive(_entry(1, 1, pidns=other, beat=now - STALE_NS - 1), now_ns=now)


def test_watchdog_sweep_leaves_an_entry_being_attached(tmp_path):
    """claim_node makes an entry ATTACHING before it writes the new pid, so for a moment the entry
    still shows its previous (dead) owner. A periodic sweep must not reclaim such an entry under
    a live attacher; only attach's own sweep, which holds the attach lock (so no claim can be in
    flight), reclaims ATTACHING entries left by attachers that died."""
    import struct

    from shmfabric.core import native
    from shmfabric.core.liveness import sweep
    from shmfabric.core.native import LAYOUT as L
    from shmfabric.fabric import Fabric

    fab = Fabric.create(str(tmp_path / "r"), max_nodes=4, networks=[{"mtu": 1500, "slots": 64}], n_mcast=0)
    try:
        a, b = fab.attach("a"), fab.attach("b")
        b.detach()
        region = fab.region
        # entry b: as if another process had just won the claim (ATTACHING) and not yet written
        # its pid, which still names b's previous owner; make that owner a dead process
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        base = region.layout.off_nodes + b.id * region.layout.node_size
        struct.pack_into("<I", region.mm, base + L["sf_node.pid"], dead.pid)
        assert region.core.cas_node_state(b.id, native.NODE_FREE, native.NODE_ATTACHING)
        assert sweep(region) == []  # the watchdog's sweep
        assert region.core.node_state(b.id) == native.NODE_ATTACHING
        c = fab.attach("c")  # under the attach lock: the stale ATTACHING entry is reclaimed and reused
        assert c.id == b.id and region.core.node_state(b.id) == native.NODE_UP
    finally:
        fab.close()
