"""The memif wire format and both handshakes, pure (no sockets, no memory)."""
from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shmfabric.adapters import memif_wire as w


def test_message_layouts_match_the_c_structs():
    # offsets from memif.h: type u16, then the packed union at byte 2
    raw = w.encode(w.AddRing(True, 0, 3, 0x1234, 10, 0))
    assert len(raw) == w.MSG_SIZE
    assert struct.unpack_from("<HHHHIBH", raw) == (w.MsgType.ADD_RING, 1, 0, 3, 0x1234, 10, 0)
    raw = w.encode(w.AddRegion(2, 1 << 33))  # sizes are 64-bit
    assert struct.unpack_from("<HHQ", raw) == (w.MsgType.ADD_REGION, 2, 1 << 33)
    raw = w.encode(w.Init(7, b"sekrit", "app"))
    assert struct.unpack_from("<HHIB", raw) == (w.MsgType.INIT, w.VERSION, 7, 0)
    assert raw[9:15] == b"sekrit" and raw[33:36] == b"app"
    raw = w.encode(w.Hello("srv", max_region=15, max_log2_ring_size=14))
    assert raw[2:5] == b"srv" and struct.unpack_from("<HHHHHB", raw, 34) == (w.VERSION, w.VERSION, 15, 0, 0, 14)
    raw = w.encode(w.Disconnect("bye", 3))
    assert struct.unpack_from("<HI", raw) == (w.MsgType.DISCONNECT, 3) and raw[6:9] == b"bye"
    assert w.DESC.size == 16 and w.ring_bytes(10) == 128 + 16 * 1024


@pytest.mark.parametrize("msg", [
    w.Hello("vpp", 0x0100, 0x0200, 3, 1, 2, 12), w.Init(4294967295, b"x" * 23, "n" * 31), w.AddRegion(0, 4096),
    w.AddRing(False, 0, 0, 4224, 10), w.Connect("memif0"), w.Connected("memif0/0"), w.Disconnect("r" * 95, 9),
    w.Ack(),
])
def test_round_trip(msg):
    assert w.decode(w.encode(msg)) == msg


def test_long_names_are_cut_to_fit_with_their_nul():
    msg = w.decode(w.encode(w.Connect("i" * 40)))
    assert msg.if_name == "i" * 31
    assert w.decode(w.encode(w.Init(1, b"s" * 30))).secret == b"s" * 23


@pytest.mark.parametrize("data, words", [
    (b"", "0 bytes"), (b"\x01" * 127, "127 bytes"), (b"\x01" * 129, "129 bytes"),
    (struct.pack("<H", 9).ljust(128, b"\0"), "unknown control message type 9"),
    (struct.pack("<H", 0).ljust(128, b"\0"), "unknown control message type 0"),
])
def test_malformed_messages_are_named(data, words):
    with pytest.raises(w.MemifProtocolError, match=words):
        w.decode(data)


@given(st.binary(min_size=128, max_size=128))
def test_any_128_bytes_decode_or_raise_the_protocol_error(data):
    try:
        msg = w.decode(data)
    except w.MemifProtocolError:
        return
    assert w.decode(w.encode(msg)) == msg or isinstance(msg, (w.Hello, w.Init, w.Connect, w.Connected, w.Disconnect))


# -- server -----------------------------------------------------------------------------------

def _server_through(hs: w.ServerHandshake, region_size: int = 1 << 20) -> None:
    assert hs.receive(w.Init(hs.id, hs.secret), None) == w.Ack()
    assert hs.receive(w.AddRegion(0, region_size), 10) == w.Ack()
    assert hs.receive(w.AddRing(True, 0, 0, 0, 10), 11) == w.Ack()
    assert hs.receive(w.AddRing(False, 0, 0, w.ring_bytes(10), 10), 12) == w.Ack()


def test_server_handshake_as_dpdk_drives_it():
    hs = w.ServerHandshake(5, b"pw")
    hello = hs.hello()
    assert (hello.min_version, hello.max_version, hello.max_m2s_ring, hello.max_s2m_ring) == (w.VERSION, w.VERSION, 0, 0)
    _server_through(hs)
    assert hs.receive(w.Connect("net_memif0"), None) == w.Connected(hs.name)
    assert hs.state == "connected" and hs.peer_if_name == "net_memif0"
    assert [(r.s2m, r.offset) for r in hs.rings] == [(True, 0), (False, w.ring_bytes(10))]


@pytest.mark.parametrize("msgs, words", [
    ([w.AddRegion(0, 10)], "expected INIT first, got ADD_REGION"),
    ([w.Init(1)], "ID not found: interface id 1 asked, this socket serves 0"),
    ([w.Init(0, version=0x0100)], "incompatible memif version 1.0"),
    ([w.Init(0, mode=1)], "only ethernet mode"),
    ([w.Init(0), w.AddRegion(1, 4096)], "invalid region index 1: expected 0"),
    ([w.Init(0), w.AddRegion(0, 0)], "region 0 size 0"),
    ([w.Init(0), w.AddRegion(0, 4096), w.AddRing(True, 0, 1, 0, 4)], "region 1, which was not added"),
    ([w.Init(0), w.AddRegion(0, 4096), w.AddRing(True, 0, 0, 0, 10)], "past region 0's 4096 bytes"),
    ([w.Init(0), w.AddRegion(0, 1 << 20), w.AddRing(True, 1, 0, 0, 4)], "invalid ring index 1"),
    ([w.Init(0), w.AddRegion(0, 1 << 20), w.AddRing(True, 0, 0, 0, 4), w.AddRing(True, 0, 0, 4096, 4)],
     "invalid ring index 0 \\(client-to-server\\)"),
    ([w.Init(0), w.AddRegion(0, 1 << 20), w.AddRing(True, 0, 0, 8, 4)], "not 64-byte aligned"),
    ([w.Init(0), w.AddRegion(0, 1 << 20), w.AddRing(True, 0, 0, 0, 15)], "past 2\\^14"),
    ([w.Init(0), w.AddRegion(0, 1 << 20), w.AddRing(True, 0, 0, 0, 4, 8)], "private headers"),
    ([w.Init(0), w.AddRegion(0, 1 << 20), w.AddRing(True, 0, 0, 0, 4), w.Connect()], "CONNECT before a ring each way"),
    ([w.Init(0), w.Hello("x")], "unexpected HELLO while setup"),
])
def test_server_refuses_with_the_reason(msgs, words):
    hs = w.ServerHandshake(0)
    with pytest.raises(w.MemifProtocolError, match=words):
        for m in msgs:
            hs.receive(m, 3)


def test_server_wants_the_fds():
    hs = w.ServerHandshake(0)
    hs.receive(w.Init(0), None)
    with pytest.raises(w.MemifProtocolError, match="missing region fd"):
        hs.receive(w.AddRegion(0, 4096), None)
    hs.receive(w.AddRegion(0, 4096), 5)
    with pytest.raises(w.MemifProtocolError, match="missing interrupt fd"):
        hs.receive(w.AddRing(True, 0, 0, 0, 2), None)


@pytest.mark.parametrize("given_secret, words", [(b"", "secret required"), (b"wrong", "incorrect secret")])
def test_server_checks_the_secret(given_secret, words):
    hs = w.ServerHandshake(0, b"right")
    with pytest.raises(w.MemifProtocolError, match=words):
        hs.receive(w.Init(0, given_secret), None)
    assert w.ServerHandshake(0, b"right").receive(w.Init(0, b"right"), None) == w.Ack()


def test_a_disconnect_at_any_step_says_why():
    hs = w.ServerHandshake(0)
    hs.receive(w.Init(0), None)
    with pytest.raises(w.PeerDisconnected, match="Device closed"):
        hs.receive(w.Disconnect("Device closed"), None)


# -- client -----------------------------------------------------------------------------------

def test_client_handshake_one_message_per_ack():
    hs = w.ClientHandshake(3, b"pw", log2_ring_size=12, buffer_size=2048)
    first = hs.receive(w.Hello("DPDK 22.11", max_log2_ring_size=10))
    assert first == (w.Init(3, b"pw", "shmfabric"), None)
    plan = hs.plan
    assert plan is not None and plan.log2_ring_size == 10  # the server's limit wins
    sent = [hs.receive(w.Ack()) for _ in range(4)]
    assert sent == [
        (w.AddRegion(0, plan.region_size), "region"),
        (w.AddRing(True, 0, 0, plan.s2m_offset, 10), "s2m"),
        (w.AddRing(False, 0, 0, plan.m2s_offset, 10), "m2s"),
        (w.Connect("shmfabric"), None),
    ]
    assert hs.state == "connecting"
    assert hs.receive(w.Connected("net_memif0")) is None and hs.state == "connected"


def test_client_plan_keeps_rings_and_buffers_apart_inside_the_region():
    plan = w.ClientPlan(4, 2048)
    assert plan.m2s_offset >= plan.s2m_offset + w.ring_bytes(4)
    assert plan.buffers_offset >= plan.m2s_offset + w.ring_bytes(4) and plan.buffers_offset % 64 == 0
    spans = sorted((plan.buffer_offset(s2m, i), plan.buffer_offset(s2m, i) + 2048)
                   for s2m in (True, False) for i in range(plan.ring_size))
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    assert spans[-1][1] <= plan.region_size and plan.region_size % 4096 == 0


@pytest.mark.parametrize("msg, words", [
    (w.Ack(), "expected HELLO first, got ACK"),
    (w.Hello("old", 0x0100, 0x0100), "incompatible memif version: the server speaks 1.0-1.0"),
])
def test_client_refuses(msg, words):
    with pytest.raises(w.MemifProtocolError, match=words):
        w.ClientHandshake(0).receive(msg)


def test_client_hears_the_servers_refusal():
    hs = w.ClientHandshake(0)
    hs.receive(w.Hello("DPDK"))
    with pytest.raises(w.PeerDisconnected, match="ID not found"):
        hs.receive(w.Disconnect("ID not found"))


def test_client_refuses_an_unexpected_message_mid_setup():
    hs = w.ClientHandshake(0)
    hs.receive(w.Hello("DPDK"))
    with pytest.raises(w.MemifProtocolError, match="unexpected CONNECTED while setup"):
        hs.receive(w.Connected("x"))
