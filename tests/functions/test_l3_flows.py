"""Flows and payloads of IP protocols without ports: IPv6 ESP and "no next header" have a 5-tuple
(ports 0), as IPv4 ESP does; `ip_payload_span` gives the bytes an IDS matches for any protocol."""
from __future__ import annotations

import pytest

from shmfabric.functions.api import FunctionContext, Verdict, validate_config
from shmfabric.functions.builtin.firewall import FirewallFunction
from shmfabric.functions.builtin.l4lb import L4LoadBalancer
from shmfabric.net import build, ip_payload_span, l4_payload_span
from shmfabric.net.errors import Reason
from shmfabric.net.flow import classify_batch, parse_5tuple, parse_5tuple_ip
from shmfabric.net.packet import LINK_IP, decode

S6, D6 = "fd00::1", "fd00::2"
ESP = b"\x00\x00\x10\x01" + b"\x00\x00\x00\x07" + b"ciphertext"


def _v6(addr: str) -> bytes:
    import ipaddress
    return ipaddress.IPv6Address(addr).packed


@pytest.mark.parametrize("nh", [50, 59])
def test_ipv6_esp_and_no_next_header_are_l3_flows(nh):
    pkt = build.ipv6(ESP if nh == 50 else b"", src=S6, dst=D6, next_header=nh)
    want = (_v6(S6), _v6(D6), nh, 0, 0)
    assert parse_5tuple_ip(pkt) == want  # was Reason.NO_L4
    assert decode(pkt, 0, LINK_IP).five_tuple() == want
    assert classify_batch([pkt], None, LINK_IP) == [want]
    assert parse_5tuple(build.ethernet(pkt, ethertype=0x86DD)) == want
    # behind a hop-by-hop header as well
    hbh = build.ipv6(ESP, src=S6, dst=D6, next_header=50, ext=[build.ipv6_ext(0)])
    assert parse_5tuple_ip(hbh) == (_v6(S6), _v6(D6), 50, 0, 0)


def test_a_non_first_fragment_of_esp_is_still_a_fragment():
    later = build.ipv6(ESP, src=S6, dst=D6, next_header=50, ext=[build.ipv6_fragment(offset=1480, ident=9)])
    assert parse_5tuple_ip(later) is Reason.FRAGMENT
    first = build.ipv6(ESP, src=S6, dst=D6, next_header=50, ext=[build.ipv6_fragment(more=True, ident=9)])
    assert parse_5tuple_ip(first) == (_v6(S6), _v6(D6), 50, 0, 0)


def _fw(rules: str) -> FirewallFunction:
    return FirewallFunction(validate_config(FirewallFunction, {"rules": rules}), FunctionContext(node="t"))


def _run(fn, frames) -> list[int]:
    out = bytearray(len(frames))
    fn.process(frames, 1.0, out)
    return list(out)


def test_the_firewall_applies_its_rules_to_ipv6_esp():
    # was: every IPv6 ESP packet counted as no_5tuple and dropped, whatever the rules said
    esp6 = build.ipv6(ESP, src=S6, dst=D6, next_header=50)
    esp4 = build.ipv4(ESP, src="10.0.0.1", dst="10.0.0.2", proto=50)
    fw = _fw("policy accept")
    assert _run(fw, [esp6, esp4]) == [Verdict.NEXT, Verdict.NEXT]
    assert fw.counters()["no_5tuple"] == 0
    fw = _fw("policy drop\nmeta l4proto esp accept")
    assert _run(fw, [esp6, esp4]) == [Verdict.NEXT, Verdict.NEXT]
    assert fw.counters()["rule1_packets"] == 2
    fw = _fw("policy accept\nip6 saddr fd00::1 drop")
    assert _run(fw, [esp6]) == [Verdict.DROP]


def test_the_load_balancer_sends_ipv6_esp_to_a_backend():
    lb = L4LoadBalancer(validate_config(L4LoadBalancer, {"backends": [{"node": n} for n in "abc"]}),
                        FunctionContext(node="t", ports=["a", "b", "c"]))
    esp6 = [build.ipv6(ESP, src=f"fd00::{k + 1:x}", dst=D6, next_header=50) for k in range(20)]
    out = _run(lb, esp6)
    assert Verdict.DROP not in out, out
    assert out == _run(lb, esp6)  # a flow stays put


def _inner() -> bytes:
    return build.ipv4(build.udp(1, 53, b"dns", src="10.0.0.1", dst="10.0.0.2"), src="10.0.0.1", dst="10.0.0.2",
                      proto=17)


@pytest.mark.parametrize("name, pkt, start", [
    ("gre", build.ipv4(b"\x00\x00\x08\x00" + b"GREPAYLOAD", src="10.0.0.1", dst="10.0.0.2", proto=47), 20),
    ("esp", build.ipv4(ESP, src="10.0.0.1", dst="10.0.0.2", proto=50), 20),
    ("ip in ip", build.ipv4(b"I" * 28, src="10.0.0.1", dst="10.0.0.2", proto=4), 20),
    ("sctp", build.ipv4(b"\x00" * 12 + b"chunk", src="10.0.0.1", dst="10.0.0.2", proto=132), 20),
    ("gre, ip options", build.ipv4(b"\x00\x00\x08\x00xy", src="10.0.0.1", dst="10.0.0.2", proto=47,
                                   options=b"\x01" * 4), 24),
    ("v6 esp", build.ipv6(ESP, src=S6, dst=D6, next_header=50), 40),
    ("v6 hbh gre", build.ipv6(b"\x00\x00\x86\xddxy", src=S6, dst=D6, next_header=47, ext=[build.ipv6_ext(0)]), 48),
])
def test_ip_payload_span_is_the_ip_payload_of_other_protocols(name, pkt, start):
    assert l4_payload_span(pkt, LINK_IP) is None  # no TCP/UDP/ICMP header: not an L4 payload
    assert ip_payload_span(pkt, LINK_IP) == (start, len(pkt))


def test_ip_payload_span_agrees_with_l4_payload_span_and_refuses_what_it_cannot_place():
    udp = _inner()
    assert ip_payload_span(udp, LINK_IP) == l4_payload_span(udp, LINK_IP) == (28, len(udp))
    padded = build.ipv4(b"\x00\x00\x08\x00GRE", src="10.0.0.1", dst="10.0.0.2", proto=47) + b"\x00" * 6
    assert ip_payload_span(padded, LINK_IP) == (20, len(padded) - 6)  # Ethernet padding is not payload
    later = build.ipv4(b"x" * 16, src="10.0.0.1", dst="10.0.0.2", proto=47, frag_offset=1480)
    assert ip_payload_span(later, LINK_IP) is None  # a non-first fragment
    short_sctp = build.ipv4(b"\x00\x07", src="10.0.0.1", dst="10.0.0.2", proto=132)
    assert ip_payload_span(short_sctp, LINK_IP) is None  # truncated: malformed
