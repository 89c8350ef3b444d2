"""A node that cannot start for a reason that clears by itself (its name held by a live node, a
full node table, its TAP device held by another process) exits with status 75 (EX_TEMPFAIL), so a
service manager restarts it; a configuration error stays status 2, which is not retried."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid

import pytest

from shmfabric.core.errors import EXIT_RETRY
from shmfabric.fabric import Fabric

SHMFABRIC = [sys.executable, "-m", "shmfabric"]
root = pytest.mark.skipif(os.geteuid() != 0, reason="a TAP device needs root")


@pytest.fixture
def fab():
    name = f"rex-{uuid.uuid4().hex[:8]}"
    f = Fabric.create(name, max_nodes=4, networks=[{"mtu": 1500, "slots": 256}], ring_size=64)
    yield f
    f.close()
    Fabric.destroy(name)


def run_function(fab, node: str, **extra) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "shmfabric.functions.run", "--fabric", fab.name, "--node", node,
            "--function", "sink", "--duration", "1", "--config", "{}"]
    for k, v in extra.items():
        argv += [f"--{k}", str(v)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def one_line(p: subprocess.CompletedProcess, says: str) -> None:
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0] and "Traceback" not in p.stderr, p.stderr


def test_a_function_whose_name_is_held_exits_75_and_starts_once_it_is_free(fab):
    held = fab.attach("fw")
    p = run_function(fab, "fw")
    assert p.returncode == EXIT_RETRY, (p.returncode, p.stderr)
    one_line(p, "a node named 'fw' is already attached")
    held.detach()
    p = run_function(fab, "fw")
    assert p.returncode == 0, p.stderr


def test_a_function_on_a_full_fabric_exits_75(fab):
    nodes = [fab.attach(f"n{i}") for i in range(4)]
    p = run_function(fab, "fw")
    assert p.returncode == EXIT_RETRY, (p.returncode, p.stderr)
    one_line(p, "is full (4 nodes)")
    for n in nodes:
        n.detach()


def test_a_function_on_a_network_that_does_not_exist_still_exits_2(fab):
    p = run_function(fab, "fw", network=3)
    assert p.returncode == 2, (p.returncode, p.stderr)
    one_line(p, "network 3 does not exist")


def test_memif_whose_name_is_held_exits_75(fab, tmp_path):
    held = fab.attach("m0")
    p = subprocess.run(SHMFABRIC + ["memif", fab.name, "m0", "--socket", str(tmp_path / "m.sock"), "--seconds", "1"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == EXIT_RETRY, (p.returncode, p.stderr)
    one_line(p, "a node named 'm0' is already attached")
    held.detach()


def _link_exists(ifname: str) -> bool:
    return subprocess.run(["ip", "link", "show", ifname], capture_output=True).returncode == 0


@root
@pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2's ip")
def test_an_adapter_whose_name_or_device_is_held_exits_75_and_leaves_nothing(fab):
    from shmfabric.adapters.tap import open_tap

    ifname = f"rx{uuid.uuid4().hex[:6]}"
    adapter = SHMFABRIC + ["adapter", fab.name, "a0", "--ifname", ifname, "--address", "10.91.0.1/24",
                           "--seconds", "1"]
    held = fab.attach("a0")
    p = subprocess.run(adapter, capture_output=True, text=True, timeout=60)
    assert p.returncode == EXIT_RETRY, (p.returncode, p.stderr)
    one_line(p, "a node named 'a0' is already attached")
    assert not _link_exists(ifname)  # the TAP device it opened went with it
    held.detach()
    # the device held open by another process (a previous adapter still exiting, say)
    tap = open_tap(ifname, segments=False)
    try:
        p = subprocess.run(adapter, capture_output=True, text=True, timeout=60)
        assert p.returncode == EXIT_RETRY, (p.returncode, p.stderr)
        one_line(p, "another process has it open")
        assert fab.node_id("a0") is None  # refused before it attached
    finally:
        tap.close()
    # a bad address is still a configuration error
    bad = [a if a != "10.91.0.1/24" else "10.91.0.1" for a in adapter]
    p = subprocess.run(bad, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, (p.returncode, p.stderr)
    # and with nothing held it runs
    p = subprocess.run(adapter, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr


def test_up_on_a_fabric_another_process_still_uses_exits_75(tmp_path):
    # (a killed manager's nodes stop by themselves within seconds: `up` says to try again, and
    # a service manager that restarts on 75 does)
    name = f"rex-{uuid.uuid4().hex[:8]}"
    holder = Fabric.create(name, max_nodes=4)
    n1 = holder.attach("n1")
    topo = tmp_path / "t.yaml"
    topo.write_text(f"fabric: {{name: {name}}}\napi: null\nnodes:\n  - {{name: gen, function: generator}}\n"
                    "  - {name: snk, function: sink}\nchains:\n  - {name: c, nodes: [gen, snk]}\n")
    env = dict(os.environ, SHMFABRIC_STATE_DIR=str(tmp_path / "state"))
    try:
        p = subprocess.run(SHMFABRIC + ["up", str(topo), "--duration", "1"], capture_output=True, text=True,
                           timeout=60, env=env)
        assert p.returncode == EXIT_RETRY, (p.returncode, p.stderr)
        assert f"fabric {name!r} is in use by n1" in p.stderr and "try again" in p.stderr, p.stderr
    finally:
        n1.detach()
        holder.close()
        Fabric.destroy(name)


def _port_argv(kind: str, fabric: str, tmp_path) -> list[str]:
    if kind == "memif":
        return SHMFABRIC + ["memif", fabric, "p0", "--socket", str(tmp_path / "m.sock")]
    return SHMFABRIC + ["adapter", fabric, "p0", "--ifname", f"sfow{uuid.uuid4().hex[:6]}",
                        "--address", "10.203.7.1/24"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["memif", pytest.param("adapter", marks=root)])
def test_a_port_started_before_its_fabric_waits_with_open_timeout_and_fails_at_once_without(kind, tmp_path):
    # A unit started before the one that creates its fabric: with --open-timeout it waits and
    # attaches once the fabric exists (as the function runtime does); without, one line, status 2.
    import signal
    import time

    name = f"rex-{uuid.uuid4().hex[:8]}"
    p = subprocess.run(_port_argv(kind, name, tmp_path), capture_output=True, text=True, timeout=30)
    assert p.returncode == 2, (p.returncode, p.stderr)
    one_line(p, f"no fabric {name!r}")
    proc = subprocess.Popen(_port_argv(kind, name, tmp_path) + ["--open-timeout", "30"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    f = None
    try:
        time.sleep(0.5)
        assert proc.poll() is None, proc.stderr.read()  # waiting, not failed
        f = Fabric.create(name, max_nodes=4, networks=[{"mtu": 1500, "slots": 256}], ring_size=64)
        deadline = time.monotonic() + 20
        while f.node_id("p0") is None and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert f.node_id("p0") is not None, proc.stderr.read() if proc.poll() is not None else "not attached"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if f is not None:
            f.close()
            Fabric.destroy(name)


def test_an_open_timeout_out_of_range_is_refused(tmp_path):
    p = subprocess.run(SHMFABRIC + ["memif", "nofab", "p0", "--socket", str(tmp_path / "m.sock"), "--open-timeout", "-1"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 2
    one_line(p, "--open-timeout -1 is out of range")
