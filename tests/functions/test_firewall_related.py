"""ICMP errors about a tracked connection pass the firewall as *related* (Linux's ct state
related): path MTU discovery, unreachable ports, time exceeded, under `policy drop` without an
ICMP rule. Pure: frames built in memory, the table and the rules as the firewall function uses
them (`check_many` on IP packets)."""
from __future__ import annotations

import ipaddress

import pytest

from shmfabric.functions.rules import ConntrackTable, Firewall, Verdict
from shmfabric.net import build, icmp_error_quote, parse_5tuple_ip

C4, S4, R4 = "10.0.0.1", "10.0.1.1", "10.0.9.9"  # client, server, a router on the path
C6, S6, R6 = "fd00::1", "fd00:1::1", "fd00:9::9"
RULES = "policy drop\ntcp dport 80 accept\nudp dport 53 accept\nip6 daddr fd00:1::/64 tcp dport 80 accept"


def v4(l4: bytes, src: str, dst: str, proto: int) -> bytes:
    return build.ipv4(l4, src=src, dst=dst, proto=proto)


def v6(l4: bytes, src: str, dst: str, nh: int, ext=()) -> bytes:
    return build.ipv6(l4, src=src, dst=dst, next_header=nh, ext=ext)


def quote(packet: bytes, n: int = 28) -> bytes:
    """What an ICMPv4 error carries: the offending packet's IP header and the first 8 bytes after."""
    return packet[:n]


def err4(icmp_type: int, code: int, quoted: bytes, src: str, dst: str) -> bytes:
    return v4(build.icmp(icmp_type, code, quoted), src, dst, 1)


def err6(icmp_type: int, quoted: bytes, src: str, dst: str, code: int = 0) -> bytes:
    # (the 4 bytes after type, code and checksum: a packet too big's MTU, 1,280; unused in the others)
    return v6(build.icmpv6(icmp_type, code, quoted, src=src, dst=dst, sequence=1280 if icmp_type == 2 else 0),
              src, dst, 58)


def tcp4(src: str, dst: str, sport: int, dport: int, flags: str = "S", seq: int = 1000, ack: int = 0) -> bytes:
    return v4(build.tcp(sport, dport, b"", flags=flags, seq=seq, ack=ack, src=src, dst=dst), src, dst, 6)


def firewall() -> Firewall:
    return Firewall.from_text(RULES, "t.rules", conntrack=ConntrackTable(tcp_window="off"))


def run(fw: Firewall, packets: list[bytes], now: float = 1.0) -> list[Verdict]:
    keys = [parse_5tuple_ip(p) for p in packets]
    flags = [p[33] if p[9] == 6 else 0 for p in packets]  # (IPv4 TCP flags byte; 0 for the rest)
    dropped = set(fw.check_many(keys, now, flags, packets))
    return [Verdict.DROP if i in dropped else Verdict.ACCEPT for i in range(len(packets))]


def test_fragmentation_needed_for_a_tracked_tcp_connection_reaches_the_server() -> None:
    fw = firewall()
    syn = tcp4(C4, S4, 40000, 80)
    synack = tcp4(S4, C4, 80, 40000, "SA", seq=5000, ack=1001)
    big = tcp4(S4, C4, 80, 40000, "A", seq=5001, ack=1001)
    frag_needed = err4(3, 4, quote(big), R4, S4)  # a router tells the server its segment was too big
    assert run(fw, [syn, synack, frag_needed]) == [Verdict.ACCEPT] * 3
    assert fw.related == 1


def test_port_unreachable_for_an_accepted_udp_request_reaches_the_client() -> None:
    fw = firewall()
    req = v4(build.udp(50000, 53, b"q", src=C4, dst=S4), C4, S4, 17)
    unreachable = err4(3, 3, quote(req), S4, C4)
    assert run(fw, [req, unreachable]) == [Verdict.ACCEPT, Verdict.ACCEPT]
    assert fw.related == 1


def test_an_error_about_no_tracked_connection_is_invalid_and_dropped_before_the_rules() -> None:
    # (as Linux's conntrack: such an error is invalid, and the usual nft ruleset drops invalid
    # packets first; a rule accepting ICMP does not let it through, nor does it open an entry)
    fw = Firewall.from_text("policy drop\nmeta l4proto icmp accept", "t.rules")
    stray = v4(build.udp(50000, 53, b"q", src=C4, dst=S4), C4, S4, 17)  # never seen by the firewall
    assert run(fw, [err4(3, 3, quote(stray), S4, C4)]) == [Verdict.DROP]
    assert fw.related == 0 and fw.icmp_invalid == 1 and fw.policy_hits == 0
    assert len(fw.conntrack) == 0


def test_a_bad_checksum_is_no_related_error() -> None:
    fw = firewall()
    req = v4(build.udp(50000, 53, b"q", src=C4, dst=S4), C4, S4, 17)
    bad = bytearray(err4(3, 3, quote(req), S4, C4))
    bad[22] ^= 0xFF  # the ICMP checksum
    assert run(fw, [req, bytes(bad)]) == [Verdict.ACCEPT, Verdict.DROP]


def test_an_error_about_an_error_is_not_related() -> None:
    fw = Firewall.from_text("policy drop\nudp dport 53 accept", "t.rules")
    req = v4(build.udp(50000, 53, b"q", src=C4, dst=S4), C4, S4, 17)
    first = err4(3, 3, quote(req), S4, C4)
    assert run(fw, [req, first, err4(3, 1, first[:28], C4, S4)]) == [Verdict.ACCEPT, Verdict.ACCEPT, Verdict.DROP]


def test_packet_too_big_for_a_flow_behind_an_authentication_header() -> None:
    fw = Firewall.from_text("policy drop\nip6 daddr fd00:1::/64 tcp dport 80 accept", "t.rules",
                            conntrack=ConntrackTable(tcp_window="off"))
    ah = (6, 1)  # next header TCP, length (1 + 2) * 4 = 12 bytes
    syn = build.ipv6(bytes(ah) + bytes(10) + build.tcp(40000, 80, flags="S", src=C6, dst=S6), src=C6, dst=S6,
                     next_header=51)
    data = build.ipv6(bytes(ah) + bytes(10) + build.tcp(80, 40000, b"x" * 1400, flags="A", src=S6, dst=C6), src=S6,
                      dst=C6, next_header=51)
    assert run(fw, [syn, err6(2, data[:1232], R6, S6)]) == [Verdict.ACCEPT, Verdict.ACCEPT]


@pytest.mark.parametrize("name, packet", [
    ("an echo reply nobody asked for", v4(build.icmp(0, 0, b"x", identifier=9), S4, C4, 1)),
    ("a timestamp reply", v4(build.icmp(14, 0, bytes(12)), S4, C4, 1)),
    ("an unknown ICMP type", v4(build.icmp(42, 0, b""), S4, C4, 1)),
    ("an ICMPv6 echo reply nobody asked for", v6(build.icmpv6(129, 0, b"", src=S6, dst=C6, identifier=9), S6, C6, 58)),
    ("an unknown ICMPv6 type", v6(build.icmpv6(200, 0, b"", src=S6, dst=C6), S6, C6, 58)),
])
def test_icmp_linux_calls_invalid_is_dropped_even_where_a_rule_accepts_icmp(name: str, packet: bytes) -> None:
    fw = Firewall.from_text("policy drop\nmeta l4proto { icmp, icmpv6 } accept", "t.rules")
    assert run(fw, [packet]) == [Verdict.DROP], name
    assert fw.icmp_invalid == 1 and len(fw.conntrack) == 0


def test_a_ping_opens_a_connection_and_its_reply_and_errors_belong_to_it() -> None:
    fw = Firewall.from_text("policy drop\nip daddr 10.0.1.0/24 meta l4proto icmp accept", "t.rules")
    ping = v4(build.icmp(8, 0, b"x", identifier=7), C4, S4, 1)
    pong = v4(build.icmp(0, 0, b"x", identifier=7), S4, C4, 1)
    other = v4(build.icmp(0, 0, b"x", identifier=8), S4, C4, 1)
    assert run(fw, [ping, pong, other]) == [Verdict.ACCEPT, Verdict.ACCEPT, Verdict.DROP]


def test_neighbour_discovery_meets_the_rules_every_time_and_opens_nothing() -> None:
    fw = Firewall.from_text("policy drop\nip6 saddr fd00::/64 meta l4proto icmpv6 accept", "t.rules")
    ns = v6(build.icmpv6(135, 0, bytes(20), src=C6, dst=S6), C6, S6, 58)
    na = v6(build.icmpv6(136, 0, bytes(20), src=S6, dst=C6), S6, C6, 58)  # from outside the rule's prefix
    assert run(fw, [ns, na, ns]) == [Verdict.ACCEPT, Verdict.DROP, Verdict.ACCEPT]
    assert len(fw.conntrack) == 0 and fw.policy_hits == 1


def test_no_icmp_entry_lets_other_icmp_between_the_two_hosts_through() -> None:
    # a ping with identifier 0 is keyed (C, S, 1, 0, 0), as every message without an identifier
    # is: an error or another type from S under that key must not pass as established
    fw = Firewall.from_text("policy drop\nip saddr 10.0.0.1 meta l4proto icmp accept", "t.rules")
    ping0 = v4(build.icmp(8, 0, b"x", identifier=0), C4, S4, 1)
    stray = v4(build.udp(1, 2, src=C4, dst=S4), C4, S4, 17)
    assert run(fw, [ping0, err4(3, 3, quote(stray), S4, C4), v4(build.icmp(42, 0, b""), S4, C4, 1)]) == [
        Verdict.ACCEPT, Verdict.DROP, Verdict.DROP]


def test_an_error_sent_to_another_host_than_the_quoted_packets_sender_is_not_related() -> None:
    # as Linux: the outer destination must be the quoted packet's source (else an attacker who
    # knows a connection's 5-tuple could send anything anywhere as "related")
    fw = firewall()
    req = v4(build.udp(50000, 53, b"q", src=C4, dst=S4), C4, S4, 17)
    misdirected = err4(3, 3, quote(req), S4, "10.0.0.77")
    assert run(fw, [req, misdirected]) == [Verdict.ACCEPT, Verdict.DROP]


def test_an_expired_connection_has_no_related_errors() -> None:
    fw = firewall()
    req = v4(build.udp(50000, 53, b"q", src=C4, dst=S4), C4, S4, 17)
    assert run(fw, [req], now=1.0) == [Verdict.ACCEPT]
    assert run(fw, [err4(3, 3, quote(req), S4, C4)], now=1.0 + 31) == [Verdict.DROP]  # UDP unreplied: 30 s


def test_packet_too_big_and_time_exceeded_over_ipv6() -> None:
    fw = firewall()
    syn = v6(build.tcp(40000, 80, flags="S", src=C6, dst=S6), C6, S6, 6)
    data = v6(build.tcp(80, 40000, b"x" * 1400, flags="A", src=S6, dst=C6), S6, C6, 6)
    ptb = err6(2, data[:1232], R6, S6)  # as much of the packet as fits 1,280 bytes
    exceeded = err6(3, syn[:48], R6, C6)
    assert run(fw, [syn, ptb, exceeded]) == [Verdict.ACCEPT] * 3
    assert fw.related == 2


def test_an_error_quoting_a_ping_is_related_to_that_ping() -> None:
    fw = Firewall.from_text("policy drop\nip daddr 10.0.1.0/24 meta l4proto icmp accept", "t.rules")
    ping = v4(build.icmp(8, 0, b"x", identifier=7), C4, S4, 1)
    exceeded = err4(11, 0, ping[:28], R4, C4)
    assert run(fw, [ping, exceeded]) == [Verdict.ACCEPT, Verdict.ACCEPT]
    assert fw.related == 1


def test_without_connection_tracking_nothing_is_related() -> None:
    fw = Firewall.from_text("conntrack off\npolicy drop\nudp dport 53 accept", "t.rules")
    req = v4(build.udp(50000, 53, b"q", src=C4, dst=S4), C4, S4, 17)
    assert run(fw, [req, err4(3, 3, quote(req), S4, C4)]) == [Verdict.ACCEPT, Verdict.DROP]


@pytest.mark.parametrize("name, packet, want", [
    ("v4 unreachable quoting UDP", err4(3, 3, v4(build.udp(1, 2, src=C4, dst=S4), C4, S4, 17)[:28], S4, C4),
     ((int(ipaddress.ip_address(C4)), int(ipaddress.ip_address(S4)), 17, 1, 2), int(ipaddress.ip_address(C4)), -1)),
    ("v4 quote with IP options", err4(3, 3, build.ipv4(build.udp(1, 2, src=C4, dst=S4), src=C4, dst=S4, proto=17,
                                                      options=b"\x01" * 4)[:32], S4, C4),
     ((int(ipaddress.ip_address(C4)), int(ipaddress.ip_address(S4)), 17, 1, 2), int(ipaddress.ip_address(C4)), -1)),
    ("v4 echo request is no error", v4(build.icmp(8, 0, b"x", identifier=7), C4, S4, 1), None),
    ("v4 quote too short for ports", err4(3, 3, v4(build.udp(1, 2, src=C4, dst=S4), C4, S4, 17)[:21], S4, C4), None),
    ("v4 quote of a later fragment", err4(3, 3, build.ipv4(b"x" * 8, src=C4, dst=S4, proto=17, frag_offset=64)[:28],
                                          S4, C4), None),
    ("v4 quote of IPv6", err4(3, 3, v6(build.udp(1, 2, src=C6, dst=S6), C6, S6, 17)[:48], S4, C4), None),
    ("v6 quote behind a destination options header",
     err6(1, v6(build.udp(1, 2, src=C6, dst=S6), C6, S6, 17, ext=[build.ipv6_ext(60)])[:56], S6, C6),
     ((ipaddress.ip_address(C6).packed, ipaddress.ip_address(S6).packed, 17, 1, 2), ipaddress.ip_address(C6).packed,
      -1)),
    ("v4 quoting a ping", err4(11, 0, v4(build.icmp(8, 0, b"x", identifier=7), C4, S4, 1)[:28], R4, C4),
     ((int(ipaddress.ip_address(C4)), int(ipaddress.ip_address(S4)), 1, 7, 7), int(ipaddress.ip_address(C4)), 8)),
    ("v4 quoting an error", err4(11, 0, v4(build.icmp(3, 3, bytes(28)), C4, S4, 1)[:28], R4, C4), None),
    ("v6 echo reply is no error", v6(build.icmpv6(129, 0, b"", src=S6, dst=C6, identifier=3), S6, C6, 58), None),
    ("v6 neighbour solicitation is no error", v6(build.icmpv6(135, 0, bytes(20), src=S6, dst=C6), S6, C6, 58), None),
])
def test_icmp_error_quote(name: str, packet: bytes, want) -> None:
    assert icmp_error_quote(packet, "ip") == want, name


def test_icmp_error_quote_reads_ethernet_frames_too() -> None:
    req = v4(build.udp(1, 2, src=C4, dst=S4), C4, S4, 17)
    frame = build.ethernet(err4(3, 3, req[:28], S4, C4))
    assert icmp_error_quote(frame)[0][2:] == (17, 1, 2)  # type: ignore[index]


def test_icmp_error_quote_never_raises_on_cut_or_garbled_errors() -> None:
    req = v4(build.udp(1, 2, src=C4, dst=S4), C4, S4, 17)
    good = err4(3, 3, req[:28], S4, C4)
    for n in range(len(good) + 1):
        icmp_error_quote(good[:n], "ip")
    for i in range(20, len(good)):
        for b in (0, 0x45, 0x60, 0xFF):
            icmp_error_quote(good[:i] + bytes((b,)) + good[i + 1:], "ip")


# -- `ct state` matches -------------------------------------------------------------------------------
NFT_PREAMBLE = "ct state established,related accept\nct state invalid drop\n"


def test_the_usual_nft_preamble_is_taken_and_changes_nothing() -> None:
    body = "policy drop\nct state new tcp dport 80 accept\n"
    plain, nft = firewall(), Firewall.from_text(NFT_PREAMBLE + body, "t.rules",
                                                conntrack=ConntrackTable(tcp_window="off"))
    syn = tcp4(C4, S4, 40000, 80)
    synack = tcp4(S4, C4, 80, 40000, "SA", seq=5000, ack=1001)
    other = tcp4(C4, S4, 40001, 81)
    req = v4(build.udp(50000, 53, b"q", src=C4, dst=S4), C4, S4, 17)
    packets = [syn, synack, other, req]
    assert run(nft, packets) == [Verdict.ACCEPT, Verdict.ACCEPT, Verdict.DROP, Verdict.DROP]
    assert run(plain, packets)[:3] == [Verdict.ACCEPT, Verdict.ACCEPT, Verdict.DROP]
    assert [r["packets"] for r in nft.counters()] == [0, 0, 1]  # the preamble's rules never see a packet


@pytest.mark.parametrize("text, port, want", [
    ("ct state new tcp dport 80 accept", 80, Verdict.ACCEPT),
    ("conntrack off\nct state untracked tcp dport 80 accept", 80, Verdict.ACCEPT),
    ("ct state != established,related,invalid tcp dport 80 accept", 80, Verdict.ACCEPT),
    ("ct state { new, untracked } tcp dport 80 accept", 80, Verdict.ACCEPT),
    ("ct state new tcp dport 80 accept", 81, Verdict.DROP),
])
def test_ct_state_is_the_state_of_the_packets_the_rules_see(text: str, port: int, want: Verdict) -> None:
    fw = Firewall.from_text("policy drop\n" + text, "t.rules")
    assert run(fw, [tcp4(C4, S4, 40000, port)]) == [want]


@pytest.mark.parametrize("text, says", [
    ("ct state established drop", "'ct state established' packets are accepted before the rules"),
    ("ct state related,established reject", "'ct state established/related' packets are accepted"),
    ("ct state invalid accept", "give the firewall tcp_window: liberal"),
    ("ct state bogus accept", "unknown word 'bogus'"),
    ("ct status new accept", "did you mean 'state'?"),
    ("ct state new ct state untracked accept", "a rule can have one 'ct state'"),
    ("ct state established accept", "write 'ct state established,related accept'"),
    ("ct state vmap { established : accept }", "verdict maps are not supported"),
    ("ct state != new drop", "never matches: the rules see only new packets"),
    ("ct state untracked tcp dport 80 accept", "never matches: the rules see only new packets"),
    ("tcp dport 80 ct state new accept\nconntrack off", "never matches: the rules see only untracked packets"),
])
def test_a_ct_state_rule_that_could_never_apply_is_refused_with_the_line(text: str, says: str) -> None:
    from shmfabric.functions.rules import RuleSyntaxError

    with pytest.raises(RuleSyntaxError, match=r"t\.rules:2: ") as exc:
        Firewall.from_text("policy drop\n" + text, "t.rules")
    assert says in str(exc.value)
