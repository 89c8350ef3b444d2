"""5-tuples: the fast path agrees with the full decoder on every input; FlowKey; stable hashes."""
import ipaddress
import os
import subprocess
import sys

import pytest
from hypothesis import given, settings, strategies as st

from shmfabric.net import build as b
from shmfabric.net.errors import Reason, ReasonCounter
from shmfabric.net.flow import (
    FlowKey, canonical, classify_batch, flow_hash, parse_5tuple, parse_5tuple_ip, symmetric_hash, tcp_flags, to_address, l4_payload_span,
    to_proto,
)
from shmfabric.net.packet import decode

from .strategies import build_flow, flows

A, B = int(ipaddress.IPv4Address("10.0.0.1")), int(ipaddress.IPv4Address("10.0.0.2"))


def test_common_cases():
    assert parse_5tuple(b.tcp_frame("10.0.0.1", "10.0.0.2", 1234, 80)) == (A, B, 6, 1234, 80)
    assert parse_5tuple(b.udp_frame("10.0.0.1", "10.0.0.2", 53, 53, b"")) == (A, B, 17, 53, 53)  # 42 bytes: slow path
    assert parse_5tuple(b.udp_frame("10.0.0.1", "10.0.0.2", 1, 2, b"x" * 30, vlan=9)) == (A, B, 17, 1, 2)
    six = parse_5tuple(b.tcp_frame("fd00::1", "fd00::2", 1, 2))
    assert six == (ipaddress.IPv6Address("fd00::1").packed, ipaddress.IPv6Address("fd00::2").packed, 6, 1, 2)
    assert parse_5tuple(b.icmp_echo_frame("10.0.0.1", "10.0.0.2", 9, 1)) == (A, B, 1, 9, 9)
    assert parse_5tuple(b.arp_frame(1, "02:00:00:00:00:01", "10.0.0.1")) is Reason.NOT_IP
    frag = b.ip_frame(b"x" * 16, src="10.0.0.1", dst="10.0.0.2", proto=6, frag_offset=1480)
    assert parse_5tuple(frag) is Reason.FRAGMENT
    first = b.ip_frame(b.tcp(5, 6, b"x" * 8), src="10.0.0.1", dst="10.0.0.2", proto=6, mf=True)
    assert parse_5tuple(first) == (A, B, 6, 5, 6)
    sctp = b.ip_frame(b"\x00\x07\x00\x09" + b"\0" * 8, src="10.0.0.1", dst="10.0.0.2", proto=132)
    assert parse_5tuple(sctp) == (A, B, 132, 7, 9)
    assert parse_5tuple(b.ip_frame(b"\0\7", src="10.0.0.1", dst="10.0.0.2", proto=132)) is Reason.TRUNCATED_L4
    gre = b.ip_frame(b"\0" * 4, src="10.0.0.1", dst="10.0.0.2", proto=47)
    assert parse_5tuple(gre) == (A, B, 47, 0, 0)
    nonext = b.ip_frame(b"", src="fd00::1", dst="fd00::2", proto=59)
    assert parse_5tuple(nonext) == (bytes.fromhex("fd00" + "0" * 27 + "1"), bytes.fromhex("fd00" + "0" * 27 + "2"), 59, 0, 0)
    assert parse_5tuple(b"") is Reason.TRUNCATED_ETHERNET


def test_fast_path_rejects_what_views_reject():
    good = bytearray(b.tcp_frame("10.0.0.1", "10.0.0.2", 1, 2, b"x" * 20))
    bad_off = bytearray(good)
    bad_off[46] = 0x40  # data offset 4
    assert parse_5tuple(bad_off) is Reason.BAD_TCP_OFFSET
    long_off = bytearray(good)
    long_off[46] = 0xF0  # 60-byte header, 40 present
    assert parse_5tuple(long_off) is Reason.TRUNCATED_TCP
    u = bytearray(b.udp_frame("10.0.0.1", "10.0.0.2", 1, 2, b"x" * 20))
    u[38:40] = (7).to_bytes(2, "big")
    assert parse_5tuple(u) is Reason.BAD_UDP_LENGTH
    u[38:40] = (29).to_bytes(2, "big")
    assert parse_5tuple(u) is Reason.TRUNCATED_UDP
    assert parse_5tuple(good[:50]) is Reason.TRUNCATED_IPV4_PAYLOAD


def test_link_ip_and_batches():
    frames = [b.tcp_frame("10.0.0.1", "10.0.0.2", i, 80, b"x" * 10) for i in range(5)]
    frames += [b.arp_frame(1, "02:00:00:00:00:01", "10.0.0.1"), b"\x00" * 5]
    c = ReasonCounter()
    out = classify_batch(frames, c)
    assert out[:5] == [(A, B, 6, i, 80) for i in range(5)]
    assert out[5:] == [Reason.NOT_IP, Reason.TRUNCATED_ETHERNET]
    assert c.as_dict() == {"not_ip": 1, "truncated_ethernet": 1} and c.malformed == 1
    ips = [bytes(memoryview(f)[14:]) for f in frames[:5]] + [b"\x45"]
    assert classify_batch(ips, link="ip") == out[:5] + [Reason.TRUNCATED_IPV4]
    assert parse_5tuple_ip(memoryview(ips[0])) == (A, B, 6, 0, 80)
    assert classify_batch([memoryview(f) for f in frames]) == out
    with pytest.raises(ValueError):
        classify_batch(frames, link="ppp")


def _mutations():
    return st.tuples(flows(), st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=3),
                     st.integers(0, 200))


@settings(max_examples=300, deadline=None)
@given(_mutations())
def test_fast_path_agrees_with_decode(m):
    """Flip bytes and cut frames anywhere: the fast path and the full decoder give the same answer."""
    f, flips, cut = m
    frame = bytearray(build_flow(f))
    for pos, val in flips:
        if pos < len(frame):
            frame[pos] = val
    frame = frame[: max(cut, 0) + 30]
    expect = decode(frame).five_tuple()
    assert parse_5tuple(frame) == expect
    assert classify_batch([frame]) == [expect]
    assert classify_batch([bytes(frame)]) == [expect]
    ip = frame[18:] if f["vlan"] is not None else frame[14:]
    assert parse_5tuple_ip(ip) == decode(ip, link="ip").five_tuple()


def test_flowkey():
    k = FlowKey.of("10.0.0.1", "10.0.0.2", "tcp", 1234, 80)
    assert k == (A, B, 6, 1234, 80) and hash(k) == hash((A, B, 6, 1234, 80))
    assert k.reversed() == (B, A, 6, 80, 1234)
    assert k.canonical() == k.reversed().canonical() == canonical(tuple(k.reversed()))
    assert str(k) == "tcp 10.0.0.1:1234 -> 10.0.0.2:80" and k.version == 4
    k6 = FlowKey.of("fd00::1", "fd00::2", 17, 5, 6)
    assert str(k6) == "udp [fd00::1]:5 -> [fd00::2]:6" and k6.version == 6
    assert {k: 1}[(A, B, 6, 1234, 80)] == 1
    assert to_proto("UDP") == 17 and to_proto("47") == 47
    for bad in ("tcpp", 300):
        with pytest.raises(ValueError):
            to_proto(bad)
    assert to_address(b"\x0a\0\0\x01") == A and to_address(ipaddress.IPv4Address("10.0.0.2")) == B
    for bad in (-1, 2**32, b"abc", "10.0.0.256"):
        with pytest.raises(ValueError):
            to_address(bad)
    # int 1 (0.0.0.1) and ::1 never collide: different types.
    assert FlowKey.of(1, 1, 6) != FlowKey.of("::1", "::1", 6)


def test_hashes_symmetric_and_spread():
    k = (A, B, 6, 1234, 80)
    assert symmetric_hash(k) == symmetric_hash((B, A, 6, 80, 1234))
    assert flow_hash(k) != flow_hash((B, A, 6, 80, 1234))
    assert flow_hash(k, seed=1) != flow_hash(k)
    six = FlowKey.of("fd00::1", "fd00::2", 6, 1, 2)
    assert symmetric_hash(six) == symmetric_hash(six.reversed())
    buckets = [0] * 8
    for p in range(8000):
        buckets[flow_hash((A, B, 6, p, 80)) % 8] += 1
    assert min(buckets) > 800  # roughly even (1000 expected per bucket)


def test_flow_hash_is_stable_across_processes():
    code = ("from shmfabric.net.flow import flow_hash, FlowKey;"
            "print(flow_hash(FlowKey.of('fd00::1','fd00::2',6,1,2)), flow_hash((1,2,6,3,4)))")
    outs = set()
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        outs.add(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                timeout=60, check=True).stdout)
    assert len(outs) == 1


@settings(deadline=None)  # wall-clock deadlines flake on a loaded 2-core CI
@given(flows(), st.integers(0, 80))
def test_tcp_flags_matches_decode(f, cut):
    frame = build_flow(f)
    for buf in (frame, frame[:cut]):
        p = decode(buf)
        expect = p.l4.flags if p.reason is None and p.l4 is not None and type(p.l4).__name__ == "TCP" else 0
        assert tcp_flags(buf) == expect
        off = 18 if f["vlan"] is not None else 14
        q = decode(buf[off:], link="ip")
        expect_ip = q.l4.flags if q.reason is None and q.l4 is not None and type(q.l4).__name__ == "TCP" else 0
        assert tcp_flags(buf[off:], link="ip") == expect_ip


@settings(deadline=None)  # wall-clock deadlines flake on a loaded 2-core CI
@given(st.lists(st.tuples(flows(), st.integers(0, 120)), max_size=8), st.sampled_from(["ethernet", "ip"]))
def test_classify_batch_with_flags(items, link):
    frames = []
    for f, cut in items:
        fr = build_flow(f)
        if link == "ip":
            fr = fr[18:] if f["vlan"] is not None else fr[14:]
        frames.append(fr[:cut] if cut < 20 else fr)
    fl: list[int] = []
    keys = classify_batch(frames, link=link, flags=fl)
    assert keys == classify_batch(frames, link=link)
    assert fl == [tcp_flags(fr, link) for fr in frames]
    assert all(x == 0 for x, k in zip(fl, keys) if type(k) is not tuple or k[2] != 6)


@settings(deadline=None)  # wall-clock deadlines flake on a loaded 2-core CI
@given(flows(), st.integers(0, 200), st.booleans(), st.sampled_from(["ethernet", "ip"]))
def test_l4_payload_span_matches_decode(f, cut, pad, link):
    frame = build_flow(f) + (b"\0" * 20 if pad else b"")  # padding must never count as payload
    if link == "ip":
        frame = frame[18:] if f["vlan"] is not None else frame[14:]
    for buf in (frame, frame[:cut]):
        p = decode(buf, link=link)
        expect = None if p.reason is not None or p.l4 is None else bytes(p.l4.payload)
        span = l4_payload_span(buf, link)
        assert (None if span is None else bytes(buf[span[0]:span[1]])) == expect
    if cut >= len(frame):
        assert bytes(frame[slice(*l4_payload_span(frame, link))]) == f["payload"]
