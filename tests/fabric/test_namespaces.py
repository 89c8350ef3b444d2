"""A node inside another network namespace maps the same region and exchanges frames.

Needs root (ip netns add); skipped with the reason otherwise.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid

import pytest

from shmfabric import programs
from shmfabric.fabric import Fabric

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
    pytest.mark.skipif(programs.find("ip") is None,
                       reason=programs.not_found("ip", fix="Debian iproute2: `make setup` installs it as root")),
]

WORKER = textwrap.dedent("""
    import sys, os
    from shmfabric.fabric import Fabric
    fab = Fabric.open(sys.argv[1])
    node = fab.attach("in-netns")
    peer = node.wait_for_peer("host", timeout=10)
    # prove where we run: the namespace has only its own loopback
    netns = os.readlink("/proc/self/ns/net")
    node.send(peer, netns.encode())
    with node.recv_batch(1, timeout=10) as b:
        assert len(b) == 1, "no reply from the host node"
        node.send(peer, b"echo:" + b[0].tobytes())
    node.detach()
    fab.close()
""")


def test_node_in_other_network_namespace_exchanges_frames(tmp_path):
    ns = f"sf-{uuid.uuid4().hex[:8]}"
    name = f"nstest-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    fab = Fabric.create(name)
    try:
        host = fab.attach("host")
        script = tmp_path / "worker.py"
        script.write_text(WORKER)
        proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, str(script), name])
        try:
            with host.recv_batch(1, timeout=15) as b:
                assert len(b) == 1
                their_ns = b[0].tobytes().decode()
                src = b[0].src
            assert their_ns != os.readlink("/proc/self/ns/net"), "worker did not run in another namespace"
            assert host.send(src, b"ping")
            with host.recv_batch(1, timeout=15) as b:
                assert b[0].tobytes() == b"echo:ping"
            assert proc.wait(timeout=15) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
    finally:
        fab.close()
        Fabric.destroy(name)
        subprocess.run(["ip", "netns", "del", ns], check=False)
