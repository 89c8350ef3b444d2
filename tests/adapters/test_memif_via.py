"""A server memif port with `via`: unicast frames from the peer go to the chain's first function
(here a plain node "fw" standing in for it) instead of the node their MAC names; ARP goes straight
to that node, broadcasts to every node; with "fw" gone they are dropped and counted, and a new
incarnation of "fw" gets them, never whoever took the old one's id. No DPDK, no root."""
from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator

import pytest

from shmfabric.adapters import memif_wire as w
from shmfabric.fabric import Fabric, Node
from tests.adapters.test_memif_bad_peer import (
    IPV4,
    WAIT,
    Memory,
    RawPeer,
    Rig,
    load16,
    raw_setup,
    store16,
    wait_for,
)

pytestmark = pytest.mark.timeout(20)  # each test takes well under 10 s; this only bounds a hang

ARP = b"\x08\x06"
BROADCAST = b"\xff" * 6


class Client:
    """A raw memif client connected to the rig's server: frames written on its client->server
    ring, one publication (head store and kick) per `send`."""

    def __init__(self, rig: Rig):
        self.mem = Memory()  # a ring of 16
        self.peer = RawPeer(rig.path)
        assert raw_setup(self.peer, self.mem) == w.Connected("shmfabric")
        wait_for(lambda: rig.br.link_up, "link up")
        self.head = 0

    def send(self, *frames: bytes) -> None:
        mem = self.mem
        ring = mem.ring(True)
        size = 1 << mem.log2
        wait_for(lambda: (self.head - load16(mem.mm, ring + w.RING_TAIL)) & 0xFFFF <= size - len(frames),
                 "room on the client->server ring")
        for f in frames:
            slot = self.head & (size - 1)
            off = mem.plan.buffer_offset(True, slot)
            mem.mm[off:off + len(f)] = f
            w.DESC.pack_into(mem.mm, ring + w.RING_HEADER + slot * 16, 0, 0, len(f), off, 0)
            self.head = (self.head + 1) & 0xFFFF
        store16(mem.mm, ring + w.RING_HEAD, self.head)
        os.write(mem.s2m_efd, (1).to_bytes(8, "little"))

    def taken(self) -> bool:
        """The server read everything sent (its tail caught up)."""
        return load16(self.mem.mm, self.mem.ring(True) + w.RING_TAIL) == self.head

    def close(self) -> None:
        self.peer.close()
        self.mem.close()


def frames_of(node, n: int, timeout: float = WAIT) -> list[bytes]:
    """`n` frames `node` received (waiting up to `timeout`), whole; fewer if no more came."""
    out: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(out) < n and (left := deadline - time.monotonic()) > 0:
        with node.recv_batch(64, left) as b:
            for f in b:
                out.append(f.dst + f.src_mac + f.ethertype.to_bytes(2, "big") + f.tobytes())
    return out


def nothing_for(node) -> bool:
    """Nothing waiting for `node` (after the frames that could have reached it were taken)."""
    return frames_of(node, 1, 0.1) == []


@pytest.fixture
def via_rig() -> Iterator[tuple[Rig, Callable[[str], Node]]]:
    """A server port on node "mem" with via=node "fw" (not attached yet) and a sink; and a
    function attaching a node (detached at the end unless the test did)."""
    tmp = tempfile.mkdtemp(prefix="mbv", dir="/tmp")  # (unix socket paths: < 108 bytes)
    fab = Fabric.create(f"mbv{uuid.uuid4().hex[:8]}", ephemeral=True, networks=[{"mtu": 9000, "slots": 1024}])
    nodes = [fab.attach(n) for n in ("mem", "sink")]
    rig = Rig(fab, nodes[0], nodes[1], None, os.path.join(tmp, "m.sock"), b"")

    def attach(name: str) -> Node:
        node = fab.attach(name)
        nodes.append(node)
        return node

    try:
        rig.start(via=lambda: fab.node_ref("fw"))
        yield rig, attach
    finally:
        rig.stop_flag = True
        if rig.thread is not None:
            rig.thread.join(WAIT)
        for n in nodes:
            if fab.node_ref(n.name) is not None and fab.node_ref(n.name)[0] == n.id:
                n.detach()
        fab.close()
        shutil.rmtree(tmp, ignore_errors=True)


def to_sink(rig: Rig, payload: bytes, ethertype: bytes = IPV4) -> bytes:
    return rig.sink.mac + rig.mem.mac + ethertype + payload.ljust(46, b".")


def test_ip_to_the_sinks_mac_goes_to_via_and_arp_straight_to_the_sink(via_rig):
    rig, attach = via_rig
    fw = attach("fw")
    client = Client(rig)
    try:
        ip = [to_sink(rig, b"ip %d" % i) for i in range(3)]
        client.send(*ip)
        assert frames_of(fw, 3) == ip
        arp = to_sink(rig, b"arp", ARP)
        client.send(arp)
        assert frames_of(rig.sink, 1) == [arp]
        assert nothing_for(rig.sink) and nothing_for(fw)
        c = rig.c
        assert c["to_fabric"] == 4 and c["from_device"] == 4 and not any(k.startswith("drop_") for k in c)
        assert not rig.errors
    finally:
        client.close()


def test_with_no_via_node_ip_is_dropped_and_counted_until_one_attaches(via_rig):
    rig, attach = via_rig
    client = Client(rig)
    try:
        client.send(*(to_sink(rig, b"no fw %d" % i) for i in range(3)))
        wait_for(lambda: rig.c.get("drop_no_via") == 3, "3 frames dropped for want of fw")
        arp = to_sink(rig, b"arp", ARP)  # (ARP needs no via)
        client.send(arp)
        assert frames_of(rig.sink, 1) == [arp]
        fw = attach("fw")
        ip = to_sink(rig, b"fw is here")
        client.send(ip)
        assert frames_of(fw, 1) == [ip]
        assert nothing_for(rig.sink)
        c = rig.c
        assert c["drop_no_via"] == 3 and c["to_fabric"] == 2 and c["from_device"] == 5
        assert "drop_no_node" not in c and not rig.errors
    finally:
        client.close()


def test_a_via_node_that_restarts_under_its_id_gets_frames_only_as_its_new_incarnation(via_rig):
    rig, attach = via_rig
    fab = rig.fab
    fw = attach("fw")
    client = Client(rig)
    try:
        first = to_sink(rig, b"to the first fw")
        client.send(first)
        assert frames_of(fw, 1) == [first]
        old_id, old_gen = fab.node_ref("fw")
        fw.detach()
        fw2 = attach("fw")  # the lowest free id: the same one, another incarnation
        new_id, new_gen = fab.node_ref("fw")
        assert new_id == old_id == fw2.id and new_gen != old_gen
        stale = [to_sink(rig, b"resolved for the old fw %d" % i) for i in range(3)]
        client.send(*stale)  # one batch, sent with the old incarnation: refused by the core, dropped
        wait_for(lambda: rig.c.get("drop_no_node") == 3, "the batch for the old incarnation dropped")
        fresh = [to_sink(rig, b"for the new fw %d" % i) for i in range(2)]
        client.send(*fresh)  # resolved again: the new incarnation
        assert frames_of(fw2, 2) == fresh
        assert nothing_for(rig.sink)
        c = rig.c
        assert c["drop_no_node"] == 3 and c["to_fabric"] == 3 and c["from_device"] == 6 and not rig.errors
    finally:
        client.close()


def test_a_node_that_takes_the_via_nodes_id_never_gets_its_frames(via_rig):
    rig, attach = via_rig
    fw = attach("fw")
    client = Client(rig)
    try:
        first = to_sink(rig, b"to fw")
        client.send(first)
        assert frames_of(fw, 1) == [first]
        fw_id = fw.id
        fw.detach()
        spy = attach("spy")
        assert spy.id == fw_id
        client.send(*(to_sink(rig, b"meant for fw %d" % i) for i in range(3)))
        wait_for(lambda: rig.c.get("drop_no_node") == 3, "the batch for fw dropped")
        client.send(*(to_sink(rig, b"fw still gone %d" % i) for i in range(2)))
        wait_for(lambda: rig.c.get("drop_no_via") == 2, "frames dropped while fw is gone")
        assert nothing_for(spy), "frames meant for the firewall reached the node that took its id"
        spy.detach()
        fw2 = attach("fw")
        assert fw2.id == fw_id
        back = to_sink(rig, b"fw is back")
        client.send(back)
        assert frames_of(fw2, 1) == [back]
        assert nothing_for(rig.sink)
        c = rig.c
        assert c["drop_no_node"] == 3 and c["drop_no_via"] == 2 and c["to_fabric"] == 2
        assert c["from_device"] == 7 and not rig.errors
    finally:
        client.close()


def test_a_broadcast_from_the_peer_is_flooded_to_every_node(via_rig):
    rig, attach = via_rig
    fw = attach("fw")
    other = attach("other")
    client = Client(rig)
    try:
        bcast = BROADCAST + rig.mem.mac + IPV4 + b"to everyone".ljust(46, b".")
        client.send(bcast)
        assert frames_of(rig.sink, 1) == [bcast]  # (from the tape)
        assert frames_of(fw, 1) == [bcast]
        assert frames_of(other, 1) == [bcast]
        c = rig.c
        assert c["flooded"] == 1 and c["from_device"] == 1 and "to_fabric" not in c
        assert not any(k.startswith("drop_") for k in c) and not rig.errors
    finally:
        client.close()
