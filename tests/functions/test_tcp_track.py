"""TCP tracking in the firewall's connection table (functions.tcp_track): a real Linux TCP
exchange passes untouched, forged segments do not steer the table. (test_tcp_linux.py compares
the port with the running kernel's conntrack, segment by segment.)"""
from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from shmfabric.functions.rules import INVALID, KNOWN, ConntrackTable, Firewall, RuleSet
from shmfabric.fabric import Fabric
from shmfabric.functions.tcp_track import BatchSegments, Segment, segment
from shmfabric.net import build
from shmfabric.net.flow import classify_batch

C, S = "10.0.0.1", "10.0.0.2"
RULES = "policy drop\ntcp dport 80 accept\n"
WSCALE7 = b"\x01\x03\x03\x07"  # NOP, window scale 7


def pkt(src: str, dst: str, sport: int, dport: int, flags: str, seq: int, ack: int = 0, payload: bytes = b"",
        window: int = 65535, options: bytes = b"") -> bytes:
    seg = build.tcp(sport, dport, payload, flags=flags, seq=seq, ack=ack, window=window, options=options, src=src, dst=dst)
    return build.ipv4(seg, src=src, dst=dst, proto=6)


def run(fw: Firewall, frames: list[bytes], now: float = 1.0) -> list[int]:
    """check_many over `frames`; the indices it drops."""
    flags: list[int] = []
    keys = classify_batch(frames, None, "ip", flags=flags)
    return fw.check_many(keys, now, flags, frames)


def handshake(fw: Firewall, isn_c: int = 1000, isn_s: int = 5000) -> None:
    assert run(fw, [pkt(C, S, 40000, 80, "S", isn_c, options=WSCALE7),
                    pkt(S, C, 80, 40000, "SA", isn_s, isn_c + 1, window=65160, options=WSCALE7),
                    pkt(C, S, 40000, 80, "A", isn_c + 1, isn_s + 1, window=502)]) == []


def entry(fw: Firewall):
    return fw.conntrack._by_key[(0x0A000001, 0x0A000002, 6, 40000, 80)]


def test_segment_reads_headers_and_options():
    seg = segment(pkt(C, S, 1, 2, "S", 7, options=WSCALE7, window=1234))
    assert seg == Segment(7, 0, 1234, 1, 0x02, 7)  # a SYN takes one sequence number
    seg = segment(pkt(C, S, 1, 2, "FA", 0xFFFFFFFF, 9, payload=b"abc"))
    assert seg == (0xFFFFFFFF, 9, 65535, 4, 0x11, -1)
    eth = build.tcp_frame(C, S, 1, 2, b"xy", flags="PA", seq=3, ack=4)
    assert segment(eth, "ethernet")[:5] == (3, 4, 65535, 2, 0x18)
    assert segment(build.ipv4(build.udp(1, 2, b"x", src=C, dst=S), src=C, dst=S, proto=17)) is None
    assert segment(b"\x45" + bytes(10)) is None  # truncated: no segment, no exception


def test_spoofed_handshake_ack_is_dropped_and_never_assured():
    fw = Firewall(RuleSet.parse(RULES), ConntrackTable())
    assert run(fw, [pkt(C, S, 40000, 80, "S", 1000), pkt(S, C, 80, 40000, "SA", 5000, 1001)]) == []
    # A blind attacker who sent the SYN cannot know the server's ISN (5000): its ACK guesses.
    assert run(fw, [pkt(C, S, 40000, 80, "A", 1001, 123456789)]) == [0]
    e = entry(fw)
    assert not e.assured and fw.conntrack.tcp_invalid == 1
    assert run(fw, [pkt(C, S, 40000, 80, "A", 1001, 5001)]) == []  # the real final ACK
    assert e.assured


def test_synack_with_wrong_ack_is_dropped():
    fw = Firewall(RuleSet.parse(RULES), ConntrackTable())
    assert run(fw, [pkt(C, S, 40000, 80, "S", 1000)]) == []
    assert run(fw, [pkt(S, C, 80, 40000, "SA", 5000, 999_999)]) == [0]
    assert not entry(fw).replied


def test_rst_must_be_exact_to_close():
    fw = Firewall(RuleSet.parse(RULES), ConntrackTable())
    handshake(fw)
    assert run(fw, [pkt(C, S, 40000, 80, "PA", 1001, 5001, b"x" * 100, window=502)]) == []
    e = entry(fw)
    # in the client's window (the server may send up to 502 << 7 bytes) but not what it expects
    assert run(fw, [pkt(S, C, 80, 40000, "R", 5001 + 3000)]) == []
    assert not e.closing and fw.conntrack.rst_ignored == 1
    assert run(fw, [pkt(S, C, 80, 40000, "R", 5001 + 10_000_000)]) == [0]  # far out of window
    assert not e.closing
    assert run(fw, [pkt(S, C, 80, 40000, "R", 4000)]) == [0]  # below what the client acknowledged
    assert not e.closing
    assert run(fw, [pkt(S, C, 80, 40000, "A", 5001, 1101, window=509)]) == []  # the server acks the 100 bytes
    assert run(fw, [pkt(C, S, 40000, 80, "R", 1101)]) == []  # exactly the server's last ack: closes
    assert e.closing


def test_out_of_window_data_is_dropped_in_strict_passed_in_liberal():
    for mode, dropped in (("strict", [0]), ("liberal", []), ("off", [])):
        fw = Firewall(RuleSet.parse(RULES), ConntrackTable(tcp_window=mode))
        handshake(fw)
        assert run(fw, [pkt(C, S, 40000, 80, "PA", 1001 + 0x40000000, 5001, b"x")]) == dropped, mode
        assert run(fw, [pkt(C, S, 40000, 80, "PA", 1001, 5001, b"y")]) == []


def test_midstream_pickup_is_liberal():
    fw = Firewall(RuleSet.parse(RULES), ConntrackTable())
    assert run(fw, [pkt(C, S, 40000, 80, "PA", 77, 88, b"a")]) == []
    e = entry(fw)
    assert e.tcp.sides[0].liberal and e.tcp.sides[1].liberal
    assert run(fw, [pkt(S, C, 80, 40000, "PA", 0x70000000, 78, b"b"),
                    pkt(C, S, 40000, 80, "PA", 0x30000000, 5, b"c")]) == []
    assert e.assured
    # RSTs are still judged: this one is below what the server acknowledged last (78)
    assert run(fw, [pkt(C, S, 40000, 80, "R", 10)]) == [0] and not e.closing
    # and a first packet that cannot open a connection (a FIN) is invalid, whatever the rules
    assert run(fw, [pkt(C, S, 40001, 80, "FA", 1, 1)]) == [0]


def test_seq_wraparound():
    fw = Firewall(RuleSet.parse(RULES), ConntrackTable())
    handshake(fw, isn_c=0xFFFFFF00, isn_s=9)
    assert run(fw, [pkt(C, S, 40000, 80, "PA", 0xFFFFFF01, 10, b"x" * 0x200, window=502)]) == []  # crosses 2^32
    e = entry(fw)
    assert e.tcp.sides[0].end == 0x101
    assert run(fw, [pkt(S, C, 80, 40000, "A", 10, 0x101, window=509)]) == []
    assert run(fw, [pkt(C, S, 40000, 80, "R", 0x100)]) == [0] and not e.closing  # below the server's ack
    assert run(fw, [pkt(C, S, 40000, 80, "R", 0x101)]) == [] and e.closing       # exactly it


def test_syn_on_open_connection_changes_nothing():
    fw = Firewall(RuleSet.parse(RULES), ConntrackTable())
    handshake(fw)
    e = entry(fw)
    before = (e.tcp.sides[0].end, e.tcp.sides[0].maxack)
    assert run(fw, [pkt(C, S, 40000, 80, "S", 99_999_999)]) == []  # a stray SYN: Linux ignores it
    assert (e.tcp.sides[0].end, e.tcp.sides[0].maxack) == before and e.assured
    assert fw.conntrack.track((0x0A000001, 0x0A000002, 6, 40000, 80), 2.0, 0x10,
                              segment(pkt(C, S, 40000, 80, "A", 1001, 5001))) == KNOWN
    assert fw.conntrack.track((0x0A000001, 0x0A000002, 6, 40000, 80), 2.0, 0x10,
                              segment(pkt(C, S, 40000, 80, "A", 1001, 0x7FFFFFFF))) == INVALID


def test_config_rejects_unknown_mode():
    with pytest.raises(ValueError, match="tcp_window must be one of strict, liberal, off"):
        ConntrackTable(tcp_window="loose")


# --- a real Linux TCP exchange ---------------------------------------------------------------------

SOL_PACKET, PACKET_STATISTICS, SO_RCVBUFFORCE = 263, 6, 33


def _capture(port: int, stop: threading.Event, out: list[bytes], drops: list[int]) -> None:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0800))
    s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 256 << 20)  # a missed packet would fail the replay
    s.bind(("lo", 0))
    s.settimeout(0.05)
    try:
        while not stop.is_set():
            try:
                data, addr = s.recvfrom(70000)
            except socket.timeout:
                continue
            if addr[2] == socket.PACKET_OUTGOING:  # loopback shows each packet twice
                continue
            if len(data) >= 40 and data[9] == 6 and port in (int.from_bytes(data[20:22], "big"),
                                                             int.from_bytes(data[22:24], "big")):
                out.append(data)
        drops.append(int.from_bytes(s.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)[4:], "little"))
    finally:
        s.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="capturing loopback traffic (AF_PACKET) needs root")
def test_real_tcp_exchange_passes_strict_tracking():
    """A real exchange (window scaling, SACK, timestamps, a 4 MB transfer both ways, FIN) captured
    on loopback and replayed through the firewall: nothing is out of window, the entry ends closing."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    frames: list[bytes] = []
    drops: list[int] = []
    stop = threading.Event()
    cap = threading.Thread(target=_capture, args=(port, stop, frames, drops), daemon=True)
    cap.start()
    time.sleep(0.2)
    blob = os.urandom(4 << 20)

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            got = 0
            while got < len(blob):
                got += len(conn.recv(1 << 20))
            conn.sendall(blob)
            conn.shutdown(socket.SHUT_WR)
            while conn.recv(65536):
                pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)  # a small window: the sender waits on it
        c.sendall(blob)
        got = 0
        while True:
            d = c.recv(1 << 16)
            if not d:
                break
            got += len(d)
            if got < len(blob) // 2:
                time.sleep(0.0005)  # a slow reader: zero windows and window updates
        assert got == len(blob)
    t.join(10)
    time.sleep(0.2)
    stop.set()
    cap.join(5)
    srv.close()
    assert drops == [0], "the capture missed packets (see drops)"
    assert len(frames) > 100 and frames[0][33] & 0x3F == 0x02  # starts with the SYN
    fw = Firewall(RuleSet.parse(f"policy drop\ntcp dport {port} accept\n"), ConntrackTable())
    for i in range(0, len(frames), 32):
        assert run(fw, frames[i:i + 32]) == [], f"batch at packet {i} dropped"
    ct = fw.conntrack
    assert (ct.tcp_invalid, ct.rst_ignored, len(ct)) == (0, 0, 1)
    (e,) = {id(v): v for v in ct._by_key.values()}.values()
    # both FINs and the last ACK seen, as Linux would show it: TIME_WAIT, assured
    assert e.assured and e.closing and e.tcp.state_name == "TIME_WAIT" and not e.tcp.sides[0].liberal


def test_batch_segments_match_segment():
    """BatchSegments reads the same fields as tcp_track.segment, from a fabric batch (one gather)
    and from a list of buffers; what the fixed offsets do not fit (a SYN's options) it hands to
    segment, and a frame that is not TCP gives None."""
    frames = [pkt(C, S, 1, 80, "PA", 0xFFFFFFF0, 7, b"abc", window=999), pkt(C, S, 1, 80, "FA", 5, 6),
              pkt(C, S, 1, 80, "S", 1, options=WSCALE7), build.ipv4(build.udp(1, 2, b"x", src=C, dst=S), src=C, dst=S, proto=17),
              pkt(C, S, 1, 80, "RA", 9, 10)]
    fab = Fabric.create(f"bseg-{os.getpid()}", ephemeral=True, networks=[{"mtu": 1500, "slots": 64}])
    try:
        a, b = fab.attach("a"), fab.attach("b")
        a.send_batch(b.id, frames, ethertype=0x0800)
        with b.recv_batch(16, 1.0) as batch:
            for segs in (BatchSegments(batch), BatchSegments(frames)):
                assert segs[0] == segment(frames[0]) == (0xFFFFFFF0, 7, 999, 3, 0x18, -1)
                assert segs[1] == segment(frames[1]) and segs[4] == segment(frames[4])
                assert segs[2].wscale == 7 and segs[3] is None
    finally:
        fab.close()
