"""The global address's dispatcher in one process, fed crafted frames by another node on its fabric
(any node may send it anything): what it keeps per sender is bounded, it answers only nodes of the
fabric, a refusal waits for a walk that began after the first packet, and frames are forwarded to
the member's ring without a copy."""
from __future__ import annotations

import ipaddress
import uuid

import pytest

from shmfabric.adapters import global_net
from shmfabric.adapters.conntable import NodeView
from shmfabric.adapters.global_net import GlobalDispatcher, GlobalError
from shmfabric.fabric import Fabric
from shmfabric.net import build

pytestmark = pytest.mark.timeout(60)

VIP = "10.9.0.100"
CLIENT = "10.9.0.1"


@pytest.fixture
def rig():
    fab = Fabric.create(f"gdisp{uuid.uuid4().hex[:8]}", ephemeral=True)
    gw, m1, client = fab.attach("gw"), fab.attach("m1"), fab.attach("client")
    d = GlobalDispatcher(fab, gw, VIP, [("m1", None)])
    d._refresh_members()
    # m1 listens on TCP 80 and UDP 53 (as a walk would show it); no thread walks here
    d.table.set_view("m1", NodeView(frozenset(), frozenset(), frozenset(), frozenset({(6, 80), (17, 53)})), 0)
    d.table.set_placeable("m1", True)
    yield fab, d, m1, client
    for n in (gw, m1, client):
        n.detach()
    fab.close()


def send(client, d, frames: list[bytes]) -> None:
    for i in range(0, len(frames), 200):
        assert client.send_batch(d.node.id, frames[i:i + 200], raw=True) == len(frames[i:i + 200])
        while d.pump(0):
            pass


def to_gw(d, frame: bytes, src_mac: bytes) -> bytes:
    return d.node.mac + src_mac + frame[12:]


def test_a_syn_is_forwarded_to_its_member_without_a_copy(rig) -> None:
    fab, d, m1, client = rig
    send(client, d, [to_gw(d, build.tcp_frame(CLIENT, VIP, 40000, 80, flags="S"), client.mac)])
    with m1.recv_batch(8, 1.0) as b:
        assert len(b) == 1 and b[0].src == d.node.id and b[0].dst == m1.mac
        assert bytes(b[0])[:20] == build.tcp_frame(CLIENT, VIP, 40000, 80, flags="S")[14:34]
    assert d.counters["to_m1"] == 1 and d.counters["table_placed"] == 1


def test_first_fragments_and_unplaced_keys_from_made_up_sources_are_bounded(rig, monkeypatch) -> None:
    fab, d, m1, client = rig
    monkeypatch.setattr(global_net, "MAX_PENDING", 100)
    frames = []
    for i in range(300):
        f = bytearray(build.udp_frame(CLIENT, VIP, 5000, 53, b"x" * 40))
        f[14 + 4:14 + 6] = i.to_bytes(2, "big")  # a new IP id each
        f[14 + 6:14 + 8] = (0x2000).to_bytes(2, "big")  # MF, offset 0: a first fragment
        frames.append(to_gw(d, bytes(f), client.mac))
    for i in range(300):  # UDP to a port nobody listens on, from 300 sources
        src = str(ipaddress.ip_address(CLIENT) + i)
        frames.append(to_gw(d, build.udp_frame(src, VIP, 5000, 54, b"q"), client.mac))
    send(client, d, frames)
    assert len(d._fragments) == 100 and len(d._unplaced) == 100
    with m1.recv_batch(512, 0.5) as b:  # the fragments themselves went on
        assert len(b) == 300


def test_a_refusal_waits_for_a_walk_begun_after_the_first_packet(rig) -> None:
    fab, d, m1, client = rig
    probe = to_gw(d, build.tcp_frame(CLIENT, VIP, 40000, 81, flags="S", seq=7), client.mac)
    send(client, d, [probe])
    send(client, d, [probe])  # the retry: no walk has begun since the first
    assert d.counters.get("refused", 0) == 0
    d._applied = d._unplaced[next(iter(d._unplaced))] + 0.001  # a walk begun after it reached the table
    send(client, d, [probe])
    assert d.counters["refused"] == 1
    with client.recv_batch(8, 1.0) as b:
        frame = b[0].raw
    assert frame[:6] == client.mac and frame[6:12] == d.node.mac
    tcp = frame[14 + 20:]
    assert tcp[13] & 0x14 == 0x14 and int.from_bytes(tcp[8:12], "big") == 8  # RST|ACK, ack = seq + 1


def test_answers_go_only_to_the_node_a_fabric_mac_names(rig) -> None:
    fab, d, m1, client = rig
    foreign = bytes.fromhex("525400000002")  # its last two bytes read as node id 2 if taken blindly
    send(client, d, [b"\xff" * 6 + foreign + b"\x08\x06" + build.arp(1, foreign, CLIENT, tpa=VIP)])
    assert d.counters.get("arp_replies", 0) == 0 and d.counters["drop_answer_unroutable"] == 1
    with m1.recv_batch(8, 0.2) as b:
        assert len(b) == 0
    send(client, d, [b"\xff" * 6 + client.mac + b"\x08\x06" + build.arp(1, client.mac, CLIENT, tpa=VIP)])
    assert d.counters["arp_replies"] == 1


def test_a_confirm_timeout_shorter_than_two_walks_is_refused(rig) -> None:
    fab, d, m1, client = rig
    with pytest.raises(GlobalError, match="shorter than two walks"):
        GlobalDispatcher(fab, d.node, VIP, [("m1", None)], walk_every=2, confirm_timeout=3)


def test_a_segment_of_a_connection_no_member_holds_is_reset_once_a_walk_agrees(rig) -> None:
    # (its member went away: the client is told, as a host tells it, instead of retrying for minutes)
    fab, d, m1, client = rig
    seg = to_gw(d, build.tcp_frame(CLIENT, VIP, 40001, 80, b"data", flags="A", seq=100, ack=5000), client.mac)
    send(client, d, [seg])
    assert d.counters["drop_not_opening"] == 1 and d.counters.get("refused", 0) == 0
    d._applied = d._unplaced[next(iter(d._unplaced))] + 0.001
    send(client, d, [seg])
    assert d.counters["refused"] == 1
    with client.recv_batch(8, 1.0) as b:
        tcp = b[0].raw[14 + 20:]
    assert tcp[13] & 0x04 and int.from_bytes(tcp[4:8], "big") == 5000  # a reset, its sequence the ACK's number


def test_no_reset_or_refusal_while_a_members_last_walk_failed(rig) -> None:
    # (it may hold the connection or listen on the port: a netlink hiccup must cut or refuse nothing)
    fab, d, m1, client = rig
    d._unwalked.add("m1")
    seg = to_gw(d, build.tcp_frame(CLIENT, VIP, 40002, 80, b"data", flags="A", seq=1, ack=2), client.mac)
    send(client, d, [seg])
    d._applied = d._unplaced[next(iter(d._unplaced))] + 0.001
    send(client, d, [seg])
    assert d.counters.get("refused", 0) == 0 and d.counters["drop_not_opening"] == 2
    syn = to_gw(d, build.tcp_frame(CLIENT, VIP, 40003, 81, flags="S"), client.mac)  # a SYN nobody listens for
    send(client, d, [syn])
    d._applied = d._unplaced[(6, int(ipaddress.ip_address(CLIENT)), 40003, 81)] + 0.001
    send(client, d, [syn])
    assert d.counters.get("refused", 0) == 0
    d._unwalked.clear()  # every member walked again
    send(client, d, [syn])
    assert d.counters["refused"] == 1


def test_a_member_whose_walks_keep_failing_is_set_aside_and_refusals_go_on(rig) -> None:
    from shmfabric.adapters.sockwalk import WalkError

    fab, d, m1, client = rig
    lines = []
    d._log = lines.append
    d._walk_failed("m1", WalkError("netlink failed during the TCP socket dump"), 100.0)
    d._walk_failed("m1", WalkError("netlink failed during the TCP socket dump"), 101.0)
    assert d._unwalked == {"m1"} and len(lines) == 1  # (said once)
    assert d.counters["members_unwalked"] == 1
    d._walk_failed("m1", WalkError("netlink failed during the TCP socket dump"), 106.0)  # past confirm_timeout
    assert not d._unwalked and d.table.describe()["nodes_away"] == 1
    assert any("m1 takes no new connections" in ln for ln in lines)
