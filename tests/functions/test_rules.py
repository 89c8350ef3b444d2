"""Firewall rules: parsing (with error messages), matching, rate limits, connection tracking."""
import pytest
from hypothesis import given, settings, strategies as st

from shmfabric.net import build as b
from shmfabric.net.errors import Reason
from shmfabric.net.flow import FlowKey, classify_batch
from shmfabric.functions.api import validate_config
from shmfabric.functions.builtin.firewall import FirewallFunction
from shmfabric.functions.rules import (
    FULL_REAP, ConntrackTable, Firewall, RuleSet, RuleSyntaxError, Timeouts, TokenBucket, Verdict,
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
    ("ct state established drop", "accepted before the rules", "conntrack off"),
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
    t = Timeouts(tcp_unreplied=5, tcp_established=100, tcp_closing=2, udp_unreplied=3, udp_replied=50,
                 tcp_half_open=4)
    ct = ConntrackTable(timeouts=t, gc_interval=1.0)
    tcp = (1, 2, 6, 10, 20)
    ct.add(tcp, 0.0)
    assert not ct.lookup(tcp, 5.0)                               # unreplied SYN expired after 5 s
    assert ct.expired == 1 and len(ct) == 0
    ct.add(tcp, 10.0)
    assert ct.lookup((2, 1, 6, 20, 10), 11.0, 0x12)              # SYN-ACK -> half-open (4 s)
    assert ct.lookup(tcp, 14.5, 0x10)                            # final ACK -> assured, established (100 s)
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
    assert [f.check((i, 9, 6, 1000, 80), 0.0) for i in range(2)] == [A, A]
    assert [f.check((9, i, 6, 80, 1000), 0.1) for i in range(2)] == [A, A]  # replies
    assert [f.check((i, 9, 6, 1000, 80), 0.15) for i in range(2)] == [A, A]  # final ACKs: both assured
    assert f.check((2, 9, 6, 1000, 80), 0.2) is D                 # full of assured entries: refused
    assert f.conntrack.full_drops == 1 and f.conntrack.early_drops == 0
    assert f.check((7, 9, 6, 1000, 80), 4000.0) is A             # expired entries make room


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


# --- repeated matches of one field: all must hold (as nft) -------------------------------------------

def both_ways(f, key, now=0.0, flags=0):
    """The verdict from `check` and from the `check_many` fast path (on a fresh copy of the rules)."""
    g = fw("\n".join(r.text for r in f.ruleset.rules) + f"\npolicy {f.ruleset.policy.name.lower()}"
           + ("" if f.ruleset.conntrack else "\nconntrack off"))
    many = D if g.check_many([key], now, [flags], [b"x"]) else A
    one = f.check(key, now, flags)
    assert (one is A) == (many is A)
    return one


def test_repeated_match_requires_all():
    f = fw("policy drop\nip saddr 10.0.0.0/8 ip saddr != 10.1.0.0/16 tcp dport 22 accept")
    assert both_ways(f, k("10.2.0.1", "10.9.9.9", "tcp", 1000, 22)) is A
    assert both_ways(f, k("10.1.0.1", "10.9.9.9", "tcp", 1000, 22)) is D
    assert both_ways(f, k("203.0.113.9", "10.9.9.9", "tcp", 1000, 22)) is D   # not in 10/8: was accepted
    f = fw("policy drop\ntcp dport 1-1024 tcp dport != 22 accept")
    assert [both_ways(f, k("1.1.1.1", "2.2.2.2", "tcp", 1000, p)) for p in (21, 22, 23, 1024, 1025, 8080)] == \
        [A, D, A, A, D, D]                                              # 8080 was accepted
    f = fw("policy drop\nip daddr 10.0.0.0/8 ip daddr 10.1.0.0/16 ip daddr != 10.1.2.0/24 accept")
    assert [both_ways(f, k("1.1.1.1", d, "udp", 1, 2)) for d in ("10.1.3.1", "10.1.2.1", "10.2.0.1")] == [A, D, D]
    f = fw("policy drop\nip6 saddr fd00::/16 ip6 saddr != fd00:1::/32 accept")
    assert [both_ways(f, k(a, "fd00::9", "udp", 1, 2)) for a in ("fd00:2::1", "fd00:1::1", "fd01::1")] == [A, D, D]
    f = fw("policy drop\ntcp dport 22 tcp dport 80 accept")             # nothing is both: never matches
    assert both_ways(f, k("1.1.1.1", "2.2.2.2", "tcp", 1, 22)) is D
    assert f.ruleset.candidates(6, 22) == () and f.ruleset.candidates(6, 80) == ()
    f = fw("policy drop\nth dport 0-100 tcp dport 50-200 accept")       # narrow result stays indexed
    assert both_ways(f, k("1.1.1.1", "2.2.2.2", "tcp", 1, 60)) is A
    assert f.ruleset.candidates(6, 60) and not f.ruleset.candidates(6, 101) and not f.ruleset.candidates(17, 60)
    with pytest.raises(RuleSyntaxError, match="one 'limit'"):          # two buckets: refused, not replaced
        RuleSet.parse("limit rate 5/second limit rate 1/second accept")


_ADDRS = ["0.0.0.0/0", "10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "10.1.2.3", "10.2.0.0/15", "192.0.2.0/24"]
_PORTS = st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40)).map(sorted), min_size=1, max_size=3).map(
    lambda rs: [f"{lo}-{hi}" if lo != hi else str(lo) for lo, hi in rs]) | st.just(["0-65535"])


@st.composite
def _match(draw, field):
    neg = "!= " if draw(st.booleans()) else ""
    vals = draw(st.lists(st.sampled_from(_ADDRS), min_size=1, max_size=3) if field in ("saddr", "daddr") else _PORTS)
    text = vals[0] if len(vals) == 1 else "{ " + ", ".join(vals) + " }"
    return f"{'ip' if field in ('saddr', 'daddr') else draw(st.sampled_from(['tcp', 'th']))} {field} {neg}{text}"


@settings(deadline=None)  # wall-clock deadlines flake on a loaded 2-core CI
@given(st.sampled_from(["saddr", "daddr", "sport", "dport"]).flatmap(
    lambda fld: st.lists(_match(fld), min_size=2, max_size=3)),
    st.lists(st.tuples(st.sampled_from([0x0A010203, 0x0A010299, 0x0A020001, 0x0A030001, 0x0B000001, 0xC0000205]),
                       st.sampled_from([0x0A010203, 0x0A0A0A0A, 0xC0000201]), st.sampled_from([6, 17]),
                       st.integers(0, 45), st.integers(0, 45)), min_size=1, max_size=10),
    st.booleans())
def test_repeated_match_is_the_conjunction(matches, packets, conntrack):
    """A rule repeating a match on one field decides as all of them together, in `check`, through
    the port index and in `check_many`."""
    opts = "policy drop\n" + ("" if conntrack else "conntrack off\n")
    combined, fast = fw(opts + " ".join(matches) + " accept"), fw(opts + " ".join(matches) + " accept")
    singles = [fw(f"policy drop\nconntrack off\n{m} accept") for m in matches]
    for i, key in enumerate(packets):
        expect = A if all(s.check(key, 0.0) is A for s in singles) else D
        combined.conntrack, fast.conntrack = ConntrackTable(), ConntrackTable()  # each packet new
        assert combined.check(key, float(i)) is expect
        assert fast.check_many([key], float(i), [0], [b""]) == ([] if expect is A else [0])


# --- connection tracking: full table, expiry work, TCP reuse, policy accept ---------------------------

def test_full_table_early_drops_unreplied_with_bounded_work():
    """A flood of unreplied flows that an accept rule lets in fills the table; new connections
    still get in (a non-assured entry is evicted, oldest first), each examining a bounded number
    of entries; only a table of assured connections refuses them."""
    n = 5000
    f = fw("policy drop\nudp dport 53 accept\ntcp dport 443 accept", conntrack=ConntrackTable(max_entries=n))
    ct = f.conntrack
    assert f.check_many([(0x0A000000 + i, 9, 17, 1024, 53) for i in range(n)], 100.0, [0] * n, [b""] * n) == []
    assert len(ct) == n
    f.check((9, 0x0A000000 + 7, 17, 53, 1024), 100.5)                # flow 7 got a reply
    f.check((0x0A000000 + 7, 9, 17, 1024, 53), 100.6)                # and a request after it: assured
    f.check((0x0A000000 + 3, 9, 17, 1024, 53), 100.5)                # flow 3 saw a packet: a second chance
    before = ct.examined
    new = [(0x0B000000 + i, 9, 6, 40000, 443) for i in range(1000)]
    assert f.check_many(new, 101.0, [2] * 1000, [b""] * 1000) == []  # all accepted (was: all dropped)
    assert ct.full_drops == 0 and ct.early_drops == 1000 and len(ct) == n
    assert ct.examined - before <= 1000 * 2 + FULL_REAP              # not a scan of the table per connection
    alive = {e[0] for e in ct.entries()}
    assert (0x0A000000 + 7, 9, 17, 1024, 53) in alive and (0x0A000000 + 3, 9, 17, 1024, 53) in alive
    assert (0x0A000000 + 2, 9, 17, 1024, 53) not in alive and (0x0A000000 + 1003, 9, 17, 1024, 53) in alive
    # replies to all the TCP connections and the rest of the UDP flows, then the original side
    # again (the final ACK, a next request): every entry assured
    for key, _, _ in ct.entries():
        f.check((key[1], key[0], key[2], key[4], key[3]), 102.0)
        f.check(key, 102.0)
    before = ct.examined
    assert f.check((0x0C000000, 9, 6, 40000, 443), 103.0) is D        # nothing to evict: refused, counted
    assert ct.full_drops == 1 and ct.examined - before <= n + 1000 + FULL_REAP  # the queue's stale rest, once
    before = ct.examined
    assert f.check_many([(0x0C000001 + i, 9, 6, 40000, 443) for i in range(100)], 103.0, [2] * 100,
                        [b""] * 100) == list(range(100))
    assert ct.full_drops == 101 and ct.examined - before <= 100 * 2


def test_reap_examines_only_due_entries():
    t = Timeouts(udp_unreplied=10, udp_replied=100)
    ct = ConntrackTable(timeouts=t)
    for i in range(2000):                                            # long-lived: assured at t=0
        ct.add((i, 1, 17, 5, 6), 0.0)
        ct.lookup((1, i, 17, 6, 5), 0.0)
        ct.lookup((i, 1, 17, 5, 6), 0.0)
    for i in range(10):
        ct.add((i, 2, 17, 5, 6), 0.0)                                # unreplied: due at 10 s
    assert ct.reap(50.0) == 10 and len(ct) == 2000
    assert ct.examined == 2010 + 2010    # the assured move once; the early-drop queue drops all 2010, once
    before = ct.examined
    for i in range(0, 2000, 2):
        ct.lookup((i, 1, 17, 5, 6), 60.0)                            # half see traffic at t=60
    assert ct.reap(99.0) == 0 and ct.examined == before              # nothing due yet: nothing examined
    assert ct.reap(101.0, limit=500) == 250 and ct.examined - before == 500   # bounded call
    assert ct.reap(101.0) == 750 and len(ct) == 1000                 # the 1000 refreshed ones move on
    assert ct.next_due() == 160.0
    assert ct.reap(161.0) == 1000 and len(ct) == 0 and ct.next_due() is None


def test_firewall_function_expires_under_continuous_traffic():
    cfg = validate_config(FirewallFunction, {"rules": "policy drop\nudp dport 53 accept", "max_connections": 1000})
    fn = FirewallFunction(cfg)
    frame = lambda i: b.ipv4(b.udp(1000 + i, 53, b"q", src="10.0.0.1", dst="10.0.0.2"),  # noqa: E731
                             src="10.0.0.1", dst="10.0.0.2", proto=17)
    out = bytearray(50)
    fn.process([frame(i) for i in range(50)], 0.0, out)
    assert len(fn.fw.conntrack) == 50
    steady = [frame(100)] * 8
    for t in range(1, 40):                                           # never idle: on_timer is not called
        fn.process(steady, float(t), bytearray(8))
    assert len(fn.fw.conntrack) == 1                                 # the 50 idle flows expired (30 s)
    nxt = fn.on_timer(40.0)
    assert nxt is not None and 40.0 < nxt <= 40.0 + 31               # the runtime's next call


def test_new_syn_reopens_a_closing_tcp_entry():
    """A 5-tuple reused after FIN (or RST) is a new connection with its own timeouts; the new
    SYN is decided by the rules, in `check` and in `check_many`."""
    c, s = FlowKey.of("10.0.0.5", "192.0.2.10", "tcp", 40000, 80), None
    out = tuple(c)
    back = tuple(c.reversed())
    S, SA, ACK, FA, PA = 0x02, 0x12, 0x10, 0x11, 0x18
    seq = [(out, S, 0), (back, SA, 0.1), (out, ACK, 0.2), (out, FA, 1), (back, FA, 1.1), (out, ACK, 1.2),
           (out, S, 5), (back, SA, 5.1), (out, ACK, 5.2), (back, PA, 30)]   # server data after 24.8 s idle
    ref = fw("policy drop\nip saddr 10.0.0.0/8 tcp dport 80 accept")
    fast = fw("policy drop\nip saddr 10.0.0.0/8 tcp dport 80 accept")
    for key, flags, t in seq:
        assert ref.check(key, t, flags) is A
        assert fast.check_many([key], t, [flags], [b""]) == []
    assert ref.conntrack.reopened == 1 and ref.ruleset.rules[0].packets == 2 and ref.conntrack.created == 2
    assert fast.conntrack.entries() == ref.conntrack.entries()
    # the new SYN meets the rules: with them changed to refuse, the reuse is dropped (the old
    # closing entry stays as it was until it expires; then the 5-tuple is gone for good)
    g = fw("policy drop\nip saddr 10.0.0.0/8 tcp dport 80 accept")
    for key, flags, t in seq[:6]:
        g.check(key, t, flags)
    g.ruleset = RuleSet.parse("policy drop")
    assert g.check(out, 5, S) is D and g.conntrack.reopened == 0 and len(g.conntrack) == 1
    assert g.check(out, 12, S) is D and g.check(back, 12.1, SA) is D and len(g.conntrack) == 0
    # a SYN retransmit on a live (not closing) entry is just part of that connection
    h = fw("policy drop\nip saddr 10.0.0.0/8 tcp dport 80 accept")
    h.check(out, 0, S)
    assert h.check(out, 1, S) is A and h.conntrack.reopened == 0 and h.conntrack.created == 1
    # documented limit: any RST in the path closes the entry (no sequence numbers tracked)
    h.check(back, 1.5, SA)
    h.check(back, 2, 0x04)
    assert h.check(back, 13, PA) is D


def test_policy_accept_full_table_drops_and_counts():
    f = fw("policy accept", conntrack=ConntrackTable(max_entries=16))
    for i in range(16):
        assert f.check((i, 99, 17, 1, 53), 1.0) is A
        assert f.check((99, i, 17, 53, 1), 1.1) is A                  # replied
        assert f.check((i, 99, 17, 1, 53), 1.2) is A                  # then a request: assured, not evictable
    assert f.check((200, 99, 17, 1, 53), 2.0) is D                   # was: accepted untracked
    assert f.conntrack.full_drops == 1 and len(f.conntrack) == 16 and f.policy_hits == 17
    assert f.check_many([(201, 99, 17, 1, 53)], 2.0, [0], [b""]) == [0]
    g = fw("policy accept", conntrack=ConntrackTable(max_entries=16))
    for i in range(16):
        g.check((i, 99, 17, 1, 53), 1.0)                              # unreplied: one is evicted
    assert g.check((200, 99, 17, 1, 53), 2.0) is A and g.conntrack.early_drops == 1 and len(g.conntrack) == 16


def test_syn_flood_answered_by_syn_ack_does_not_lock_new_connections_out():
    """Spoofed SYNs to an accepted port, each answered by the server's SYN-ACK, fill the table with
    half-open entries: replied but not assured (no final ACK), so they get the SYN_RECV timeout
    (60 s) and are early-dropped for new connections (before: 3600 s and never evicted, so every
    new connection was refused for an hour). A completed handshake is assured and stays."""
    S, SA, ACK, PA = 0x02, 0x12, 0x10, 0x18
    f = fw("policy drop\ntcp dport 80 accept\nip saddr 10.0.0.0/8 accept", conntrack=ConntrackTable(max_entries=1000))
    ct, srv, t = f.conntrack, 0x0A000001, 100.0
    legit = (0xCB007101, srv, 6, 55555, 80)                           # a real client, before the flood
    assert f.check(legit, t, S) is A and f.check((srv, 0xCB007101, 6, 80, 55555), t, SA) is A
    assert f.check_many([legit], t, [ACK], [b""]) == []              # the final ACK (fast path): assured
    for i in range(1000):
        src = 0xC6120000 + i                                          # spoofed 198.18.x.y
        assert f.check((src, srv, 6, 40000 + i, 80), t, S) is A
        assert f.check((srv, src, 6, 80, 40000 + i), t, SA) is A     # the server answers
    assert len(ct) == 1000 and ct.full_drops == 0 and ct.early_drops == 1
    for dt, n in ((1, 0), (30, 1)):
        assert f.check((0xCB007200 + n, srv, 6, 55556, 80), t + dt, S) is A     # new inbound connection
        assert f.check((srv, 0x08080808 + n, 6, 33333, 53), t + dt, S) is A     # new outbound connection
    assert ct.full_drops == 0 and ct.early_drops == 5
    assert f.check((srv, 0xCB007101, 6, 80, 55555), t + 30, PA) is A          # the live one was kept
    assert ct.reap(t + 61) >= 990 and len(ct) <= 10                  # half-open: 60 s, not 3600 s
    assert f.check(legit, t + 61, PA) is A                           # assured: established timeout


def test_udp_entry_assured_only_after_a_request_follows_a_response():
    """UDP: one response to a (spoofed) request leaves the entry evictable with the 30 s timeout;
    a request after a response makes it assured (120 s, never early-dropped)."""
    f = fw("policy drop\nudp dport 53 accept", conntrack=ConntrackTable(max_entries=16))
    ct = f.conntrack
    stream = (0x0A000099, 9, 17, 1024, 53)
    f.check(stream, 1.0)
    f.check((9, 0x0A000099, 17, 53, 1024), 1.0)
    assert f.check_many([stream], 1.1, [0], [b""]) == []             # request after response: assured
    for i in range(15):
        assert f.check((0x0A000000 + i, 9, 17, 1024, 53), 1.0) is A
        assert f.check((9, 0x0A000000 + i, 17, 53, 1024), 1.0) is A  # one response each
    assert len(ct) == 16
    for i in range(15):                                              # all evicted, the stream is not
        assert f.check((0x0B000000 + i, 9, 17, 1024, 53), 2.0) is A
    assert ct.full_drops == 0 and ct.early_drops == 15
    assert stream in {e[0] for e in ct.entries()}
    assert ct.reap(40.0) == 15 and len(ct) == 1                      # replied, not assured: 30 s
    assert ct.reap(121.0) == 0 and ct.reap(122.0) == 1               # assured: 120 s from 1.1


def test_forged_rst_then_refused_syn_does_not_cut_a_live_connection():
    """An off-path attacker's RST (any RST closes: documented) then SYN on the same 5-tuple: the
    SYN starts a new connection only if the rules accept it; here the limit is spent, so it is
    dropped and the live connection's entry stays as it was (before: removed, connection cut)."""
    S, SA, ACK, RST, PA = 0x02, 0x12, 0x10, 0x04, 0x18
    for batch in (False, True):
        f = fw("policy drop\ntcp dport 22 limit rate 2/minute accept")
        c = (0x0A000005, 0xC0000201, 6, 50000, 22)
        s = (c[1], c[0], 6, 22, 50000)
        assert f.check(c, 0.0, S) is A and f.check(s, 0.0, SA) is A and f.check(c, 0.0, ACK) is A
        for i in range(6):                                           # the attacker spends the limit
            f.check((0x0B000000 + i, 0xC0000201, 6, 1000 + i, 22), 1.0, S)
        assert f.check(s, 2.0, RST) is A                             # forged RST: closing (10 s)
        assert f.check(c, 2.1, S) is D                               # forged SYN: refused by the rules
        assert f.conntrack.reopened == 0 and c in {e[0] for e in f.conntrack.entries()}
        check = (lambda key, t, fl: D if f.check_many([key], t, [fl], [b""]) else A) if batch else f.check
        assert check(s, 2.2, PA) is A and check(c, 2.3, PA) is A     # the live connection goes on
        assert check(c, 11.0, PA) is A                               # (on the closing timeout, refreshed)
    # a SYN the rules accept does reopen the 5-tuple: a new, unreplied entry
    g = fw("policy drop\ntcp dport 22 accept")
    assert g.check(c, 0.0, S) is A and g.check(s, 0.0, SA) is A and g.check(c, 0.0, ACK) is A
    assert g.check(s, 2.0, RST) is A and g.check(c, 2.1, S) is A
    assert g.conntrack.reopened == 1 and g.conntrack.created == 2 and g.conntrack.entries()[0][2] is False
