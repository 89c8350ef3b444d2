"""Firewall rules: parsing (with error messages), matching, rate limits, connection tracking."""
import pytest
from hypothesis import given, settings, strategies as st

from shmfabric.net import build as b
from shmfabric.net.errors import Reason
from shmfabric.net.flow import FlowKey, classify_batch
from shmfabric.functions.rules import (
    ConntrackTable, Firewall, RuleSet, RuleSyntaxError, Timeouts, TokenBucket, Verdict,
)

A, D = Verdict.ACCEPT, Verdict.DROP
RULES = """
# web tier
policy drop
ip saddr 10.0.0.0/8 tcp dport { 80, 443, 8000-8080 } accept comment "web # kept"
ip6 saddr fd00::/64 udp dport 53 accept
ip saddr != 192.0.2.0/24 meta l4proto icmp accept
th dport 22 reject
ip daddr 198.51.100.7 counter drop
udp sport 1024-65535 udp dport 5000 limit rate 2/second burst 3 packets accept
"""


def fw(text=RULES, **kw):
    return Firewall.from_text(text, "edge.rules", **kw)


def k(src, dst, proto, sport=0, dport=0):
    return FlowKey.of(src, dst, proto, sport, dport)


def test_parse_structure():
    rs = RuleSet.parse(RULES, "edge.rules")
    assert rs.policy is D and rs.conntrack and len(rs.rules) == 6
    web = rs.rules[0]
    assert web.line == 4 and web.comment == "web # kept" and web.protos == frozenset({6})
    assert [(lo, hi) for lo, hi in web.dport.ranges] == [(80, 80), (443, 443), (8000, 8080)]
    assert rs.rules[3].verdict is Verdict.REJECT and rs.rules[3].protos == frozenset({6, 17, 132, 33, 136})
    assert RuleSet.parse("policy accept\nconntrack off").conntrack is False


@pytest.mark.parametrize("text,where,fix", [
    ("ip sadr 10.0.0.0/8 accept", "unknown word 'sadr'", "did you mean 'saddr'"),
    ("tcp dport 80", "rule has no verdict", "end it with accept"),
    ("tcp dport 80 acept", "unknown word 'acept'", "did you mean 'accept'"),
    ("accept tcp dport 80", "'tcp' after the verdict", "put matches before it"),
    ("ip saddr 10.0.0.0/33 accept", "not an address or prefix", "10.0.0.0/8"),
    ("ip saddr fd00::/8 accept", "is IPv6 but the match is IPv4", "ip6 saddr"),
    ("ip saddr 10.0.0.1 ip6 daddr ::1 accept", "both IPv4 and IPv6", "split it"),
    ("tcp dport 80-70 accept", "out of order", ""),
    ("tcp dport http accept", "not a port", "1024-65535"),
    ("tcp dport 80 udp sport 1 accept", "conflicts with the protocol", ""),
    ("meta l4proto tcpp accept", "unknown protocol 'tcpp'", ""),
    ("limit rate 5/fortnight accept", "not a rate", "N/second"),
    ("limit rate 5/second burst 10 bytes accept", "byte-based limits", "burst N packets"),
    ("ct state established accept", "'ct' matches are not supported", "conntrack off"),
    ("policy maybe", "bad policy line", "policy drop"),
    ("policy drop\npolicy accept", "policy given twice", ""),
    ("tcp dport { } accept", "empty set", ""),
    ('drop comment unquoted', "must be quoted", 'comment "text"'),
])
def test_errors_name_line_and_fix(text, where, fix):
    with pytest.raises(RuleSyntaxError) as ei:
        RuleSet.parse("# header\n\n" + text, "edge.rules")
    msg = str(ei.value)
    assert msg.startswith("edge.rules:3:") or msg.startswith("edge.rules:4:")
    assert where in msg and fix in msg


def test_first_match_and_policy():
    f = fw()
    assert f.check(k("10.1.2.3", "192.0.2.1", "tcp", 40000, 443), 0) is A
    assert f.check(k("10.1.2.3", "192.0.2.1", "tcp", 40000, 9000), 0) is D       # port not listed
    assert f.check(k("11.0.0.1", "192.0.2.1", "tcp", 40000, 443), 0) is D        # prefix
    assert f.check(k("fd00::5", "fd00::1", "udp", 999, 53), 0) is A
    assert f.check(k("fd01::5", "fd00::1", "udp", 999, 53), 0) is D
    assert f.check(k("10.9.9.9", "10.0.0.1", "udp", 1, 22), 0) is Verdict.REJECT
    assert f.check(k("203.0.113.1", "1.1.1.1", "icmp", 5, 5), 0) is A
    assert f.check(k("192.0.2.9", "1.1.1.1", "icmp", 5, 5), 0) is D               # negated prefix
    assert f.check(k("10.0.0.1", "198.51.100.7", "gre"), 0) is D
    counts = [c["packets"] for c in f.counters()]
    assert counts == [1, 1, 1, 1, 1, 0] and f.policy_hits == 4


def test_return_traffic_passes_via_conntrack():
    f = fw()
    out = k("10.1.2.3", "192.0.2.1", "tcp", 40000, 443)
    assert f.check(out, 0.0) is A
    assert f.check(out.reversed(), 0.1) is A                     # reply: no rule allows it, conntrack does
    assert f.established == 1 and len(f.conntrack) == 1
    assert f.check(k("192.0.2.1", "10.1.2.3", "tcp", 443, 40001), 0.2) is D  # a different flow does not
    stateless = fw(RULES + "conntrack off\n")
    stateless.check(out, 0.0)
    assert stateless.check(out.reversed(), 0.1) is D


def test_conntrack_timeouts_and_states():
    t = Timeouts(tcp_unreplied=5, tcp_established=100, tcp_closing=2, udp_unreplied=3, udp_replied=50)
    ct = ConntrackTable(timeouts=t, gc_interval=1.0)
    tcp = (1, 2, 6, 10, 20)
    ct.add(tcp, 0.0)
    assert not ct.lookup(tcp, 5.0)                               # unreplied SYN expired after 5 s
    assert ct.expired == 1 and len(ct) == 0
    ct.add(tcp, 10.0)
    assert ct.lookup((2, 1, 6, 20, 10), 11.0)                    # reply -> established (100 s)
    assert ct.lookup(tcp, 110.0)
    assert ct.lookup(tcp, 111.0, tcp_flags=0x01)                 # FIN -> closing (2 s)
    assert not ct.lookup(tcp, 113.5)
    udp = (1, 2, 17, 5, 6)
    ct.add(udp, 0.0)
    assert ct.expire(2.0) == 0 and ct.expire(2.5) == 0           # gc runs at most once per interval
    assert ct.expire(3.5) == 1 and len(ct) == 0
    assert ct.next_deadline(3.5) == 4.5


def test_conntrack_full_refuses_new_connections():
    f = fw("tcp dport 80 accept", conntrack=ConntrackTable(max_entries=2))
    assert [f.check((i, 9, 6, 1000, 80), 0.0) for i in range(3)] == [A, A, D]
    assert f.conntrack.full_drops == 1
    assert f.check((7, 9, 6, 1000, 80), 1000.0) is A             # expired entries make room


def test_rate_limit_and_over():
    f = fw()
    flows = [k("10.0.0.1", "10.0.0.2", "udp", 2000 + i, 5000) for i in range(10)]
    first = [f.check(x, 0.0) for x in flows[:5]]
    assert first == [A, A, A, D, D]                              # burst 3, then over the rate
    assert f.check(flows[5], 0.5) is A                           # 0.5 s at 2/s = 1 token
    assert f.check(flows[6], 0.5) is D
    over = fw("udp dport 9 limit rate over 1/second burst 1 packets drop\npolicy accept")
    verdicts = [over.check((i, 2, 17, 1, 9), 0.0) for i in range(1, 4)]
    assert verdicts == [A, D, D]                                 # the excess is dropped


def test_token_bucket():
    tb = TokenBucket(10, 2)
    assert [tb.take(0.0) for _ in range(3)] == [True, True, False]
    assert tb.take(0.1) and not tb.take(0.1)
    assert not tb.take(0.05)                                     # time going back never refills
    with pytest.raises(ValueError):
        TokenBucket(0, 1)


def test_batch_with_reasons_from_classify():
    frames = [b.tcp_frame("10.0.0.1", "192.0.2.1", 1, 443), b.arp_frame(1, "02:00:00:00:00:01", "10.0.0.1"),
              b.tcp_frame("10.0.0.1", "192.0.2.1", 1, 443)[:30], b.tcp_frame("172.16.0.1", "192.0.2.1", 1, 443)]
    keys = classify_batch(frames)
    assert keys[1] is Reason.NOT_IP and keys[2].malformed
    f = fw()
    assert f.check_batch(keys, 0.0) == [A, A, D, D]              # ARP passes, malformed drops
    assert f.no_key == 2
    g = fw()
    assert g.check_batch(keys, 0.0, tcp_flags=[2, 0, 0, 2], lengths=[60, 60, 30, 60]) == [A, A, D, D]
    assert g.counters()[0]["bytes"] == 60


@settings(deadline=None)  # wall-clock deadlines flake on a loaded 2-core CI
@given(st.integers(0, 2**32 - 1), st.integers(0, 32))
def test_prefix_match_agrees_with_ipaddress(addr, plen):
    import ipaddress
    net = ipaddress.ip_network(f"{ipaddress.IPv4Address(addr)}/{plen}", strict=False)
    f = fw(f"ip saddr {net} accept")
    probe = addr ^ (1 << (31 - min(plen, 31)))  # flip one bit inside or just outside the prefix
    for a in (addr, probe):
        expect = A if ipaddress.IPv4Address(a) in net else D
        assert f.check((a, 1, 6, 1, 1), 0.0) is expect


_rule_parts = st.tuples(
    st.sampled_from(["", "ip saddr 10.0.0.0/8 ", "ip daddr != 10.1.0.0/16 ", "ip6 saddr fd00::/8 "]),
    st.sampled_from(["", "tcp dport 80 ", "udp dport { 53, 5353 } ", "th dport 1000-1100 ", "tcp dport 1024-65535 ",
                     "tcp dport != 22 ", "meta l4proto icmp ", "tcp sport 80 ", "th dport 0-300 "]),
    st.sampled_from(["accept", "drop", "reject"]),
)


@settings(deadline=None)  # wall-clock deadlines flake on a loaded 2-core CI
@given(st.lists(_rule_parts, max_size=12), st.lists(st.tuples(
    st.sampled_from([0x0A000001, 0x0A010001, 0x0B000001, bytes.fromhex("fd00" + "00" * 13 + "01")]),
    st.sampled_from([1, 6, 17, 47]), st.integers(0, 2000), st.sampled_from([22, 53, 80, 299, 1050, 5353, 40000])),
    max_size=20))
def test_index_agrees_with_linear_walk(parts, packets):
    text = "conntrack off\n" + "\n".join("".join(p) for p in parts)
    f = fw(text)
    for src, proto, sport, dport in packets:
        dst = src
        key = (src, dst, proto, sport, dport)
        expect = next((r.verdict for r in f.ruleset.rules if r.matches(key, 0.0)), f.ruleset.policy)
        assert f.check(key, 0.0) is expect
