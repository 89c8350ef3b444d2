"""The bridge's device side against a stand-in device (a SOCK_SEQPACKET pair keeps frame
boundaries as a TAP does): no root needed."""
from __future__ import annotations

import socket
import uuid

import pytest

from shmfabric.adapters.bridge import TapBridge, fair_share
from shmfabric.adapters.ethernet import VNET_ZERO
from shmfabric.adapters.tap import Tap
from shmfabric.fabric import Fabric
from shmfabric.fabric.control import node_mac


@pytest.fixture
def rig(tmp_path):
    fab = Fabric.create(f"brunit{uuid.uuid4().hex[:8]}", ephemeral=True)
    a, b = fab.attach("a"), fab.attach("b")
    dev, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    dev.setblocking(False)
    bridge = TapBridge(a, Tap(dev.fileno(), "fake0"), batch=64, in_flight=8)
    yield fab, a, b, bridge, kernel
    dev.close()
    kernel.close()
    a.detach()
    b.detach()
    fab.close()


def frame_to(node_id: int, src: bytes, payload: bytes = b"p" * 50) -> bytes:
    return VNET_ZERO + node_mac(node_id) + src + b"\x08\x00" + payload


def test_with_the_pool_empty_each_frame_is_read_and_dropped_once(rig) -> None:
    fab, a, b, bridge, kernel = rig

    def no_slot():
        raise MemoryError("packet pool exhausted")

    a.alloc = no_slot
    bridge.node.alloc = no_slot
    for _ in range(5):
        kernel.send(frame_to(b.id, a.mac))
    assert bridge.pump_device() == 5
    assert bridge.counters["drop_pool_empty"] == 5 and bridge.counters["from_device"] == 5
    assert bridge.pump_device() == 0  # nothing left readable: the loop would sleep, not spin


def test_a_receiver_that_takes_nothing_gets_at_most_in_flight_frames(rig) -> None:
    fab, a, b, bridge, kernel = rig
    for _ in range(50):
        kernel.send(frame_to(b.id, a.mac))
    assert bridge.pump_device() == 50
    c = bridge.counters
    assert c["to_fabric"] == 8 and c["drop_ring_full"] == 42
    assert a.ring_depth(b.id) == 8
    with b.recv_batch(64, 1) as got:
        assert len(got) == 8 and got[0].src == a.id and bytes(got[0])[:4] == b"pppp"
    # taken: room again
    for _ in range(3):
        kernel.send(frame_to(b.id, a.mac))
    bridge.pump_device()
    assert bridge.counters["to_fabric"] == 11


def test_fair_share_bounds() -> None:
    assert fair_share(1024, 3, 1024) == 170  # three adapters on a 65536:1024 network
    assert fair_share(1024, 32, 1024) == 16
    assert fair_share(4096, 1, 1024) == 1024  # (counted as two at least)
    assert fair_share(64, 9, 1024) == 3  # 8 senders to one stopped node: 24 of 64 slots
    assert fair_share(64, 1024, 1024) == 2  # never below 2
    assert fair_share(1 << 20, 2, 256) == 256  # never past a ring


def test_the_share_is_asked_again_as_nodes_come_and_go(rig, monkeypatch) -> None:
    fab, a, b, bridge, kernel = rig
    shares = iter([5, 3])
    monkeypatch.setattr("shmfabric.adapters.bridge.SHARE_EVERY", 0.0)
    bridge2 = TapBridge(a, bridge.tap, in_flight=lambda: next(shares))
    assert bridge2.in_flight == 5
    kernel.send(frame_to(b.id, a.mac))
    bridge2.pump_device()
    assert bridge2.in_flight == 3


def test_frames_with_another_source_mac_take_from_the_same_bound(rig) -> None:
    # (a bridge in the namespace: sent as they are, from a copy) the bound holds for them too
    fab, a, b, bridge, kernel = rig
    for _ in range(50):
        kernel.send(frame_to(b.id, bytes.fromhex("02aabbccddee")))
    assert bridge.pump_device() == 50
    assert bridge.counters["to_fabric"] == 8 and bridge.counters["drop_ring_full"] == 42
    assert a.ring_depth(b.id) == 8
    with b.recv_batch(64, 1) as got:
        assert len(got) == 8 and got[0].src_mac == bytes.fromhex("02aabbccddee")


def test_a_smaller_share_applies_to_budgets_already_handed_out(rig, monkeypatch) -> None:
    fab, a, b, bridge, kernel = rig
    shares = iter([256, 16])
    bridge2 = TapBridge(a, bridge.tap, in_flight=lambda: next(shares))
    kernel.send(frame_to(b.id, a.mac))
    bridge2.pump_device()  # a budget of 255 for b
    monkeypatch.setattr("shmfabric.adapters.bridge.SHARE_EVERY", 0.0)
    for _ in range(60):
        kernel.send(frame_to(b.id, a.mac))
    bridge2.pump_device()
    assert bridge2.in_flight == 16
    assert a.ring_depth(b.id) == 16


def test_a_via_node_whose_id_another_node_took_never_gets_its_frames(rig) -> None:
    # ids are reused: frames for the chain's first function must not reach whoever holds its id now
    fab, a, b, bridge, kernel = rig
    c_node = fab.attach("c")
    via = TapBridge(a, bridge.tap, in_flight=64, via=lambda: fab.node_ref("fw"))
    fw = fab.attach("fw")
    via._resolve_via()
    kernel.send(frame_to(b.id, a.mac))  # addressed to b: goes to fw
    assert via.pump_device() == 1
    with fw.recv_batch(8, 1) as got:
        assert len(got) == 1
    fw_id = fw.id
    fw.detach()
    spy = fab.attach("spy")  # the lowest free id: fw's
    assert spy.id == fw_id
    for _ in range(3):
        kernel.send(frame_to(b.id, a.mac))
    assert via.pump_device() == 3
    with spy.recv_batch(8, 0.2) as got:
        assert len(got) == 0, "frames meant for the firewall reached another node"
    assert via.counters["drop_no_node"] + via.counters["drop_no_via"] == 3
    spy.detach()
    c_node.detach()
