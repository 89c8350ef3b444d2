"""The batch fast paths decide exactly as the per-packet reference: `Firewall.check_many` as
`Firewall.check`, `MaglevBalancer.pick_into` as `pick`, and the ids function's lazy path (5-tuples
only for packets with hits) as `Ids.inspect` per packet. Property tests over mixed traffic:
both directions, TCP flags (FIN/RST close), UDP, ICMP, IPv6, malformed, and time jumps past the
idle timeouts."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from shmfabric.functions.api import FunctionContext, Verdict, validate_config
from shmfabric.functions.maglev import MaglevBalancer
from shmfabric.functions.registry import load
from shmfabric.functions.rules import ConntrackTable, Firewall, RuleSet, Timeouts
from shmfabric.functions.rules import Verdict as RuleVerdict
from shmfabric.functions.tcp_track import BatchSegments, segment
from shmfabric.functions.snort import Ids, IdsVerdict, hyperscan
from shmfabric.net import build
from shmfabric.net.flow import classify_batch, l4_payload_span, parse_5tuple_ip

# a few flows, seen both ways, so connections open, get replies, close and expire
FLOWS = [("udp", "10.0.0.1", "10.0.0.2", 5000, 53), ("tcp", "10.0.0.1", "10.0.0.2", 5000, 80),
         ("tcp", "10.0.0.2", "10.0.0.1", 5001, 80), ("tcp", "192.0.2.7", "10.0.0.1", 7, 9),
         ("udp", "192.0.2.7", "10.0.0.2", 7, 9), ("udp", "10.0.0.3", "10.0.0.2", 5002, 80),
         ("icmp", "10.0.0.1", "192.0.2.7", 1, 0), ("udp6", "fd00::1", "fd00::2", 5000, 53)]
RULES = """policy drop
ip saddr 10.0.0.0/8 udp dport { 53, 80 } accept
ip saddr 10.0.0.0/8 tcp dport 80 accept
ip saddr 192.0.2.0/24 th dport 9 limit rate 2/second burst 2 packets accept
ip6 saddr fd00::/64 accept
meta l4proto icmp accept
"""


@st.composite
def packet(draw) -> bytes:
    if draw(st.integers(0, 9)) == 0:
        return draw(st.sampled_from([b"", b"\x45", b"\x45\x00\x00\x14" + b"\x00" * 8, bytes(range(48)),
                                     build.ipv4(build.udp(1, 2, b"abc"), src="10.0.0.1", dst="10.0.0.2", proto=17)[:30]]))
    kind, src, dst, sport, dport = draw(st.sampled_from(FLOWS))
    if draw(st.booleans()):
        src, dst, sport, dport = dst, src, dport, sport
    payload = draw(st.sampled_from([b"", b"hello", b"GET /secret HTTP/1.1", b"xxneedlexx", b"\x00" * 30,
                                    b"\x00" * 300, b"\x00" * 290 + b"NeEdLe", b"-" * 400 + b"SECRET"]))  # long: prefilter
    if kind == "udp6":
        return build.ipv6(build.udp(sport, dport, payload, src=src, dst=dst), src=src, dst=dst, next_header=17)
    if kind == "icmp":
        return build.ipv4(build.icmp(8, 0, payload, identifier=sport), src=src, dst=dst, proto=1)
    if kind == "udp":
        return build.ipv4(build.udp(sport, dport, payload, src=src, dst=dst), src=src, dst=dst, proto=17)
    flags = draw(st.sampled_from(["S", "SA", "A", "PA", "FA", "R", "RA"]))
    # sequence numbers near 0 and near the wrap, so window tracking sees in- and out-of-window segments
    seq = draw(st.sampled_from([0, 1, 5, 6, 70_000, 0xFFFFFFF0, 0x80000000]))
    ack = draw(st.sampled_from([0, 1, 6, 70_000, 0xFFFFFFFF]))
    return build.ipv4(build.tcp(sport, dport, payload, flags=flags, seq=seq, ack=ack, src=src, dst=dst),
                      src=src, dst=dst, proto=6)


# batches of packets, each with the time it is seen at (steps up to past the UDP/TCP timeouts)
batches = st.lists(st.tuples(st.floats(0, 25), st.lists(packet(), max_size=12)), min_size=1, max_size=10)
TIMEOUTS = Timeouts(tcp_unreplied=20, tcp_established=60, tcp_closing=5, udp_unreplied=10, udp_replied=30)


@settings(deadline=None, max_examples=150)
@given(batches, st.booleans())
def test_firewall_check_many_equals_check(seq, conntrack):
    text = RULES if conntrack else RULES + "conntrack off\n"
    fast = Firewall(RuleSet.parse(text), ConntrackTable(timeouts=TIMEOUTS, max_entries=6))
    ref = Firewall(RuleSet.parse(text), ConntrackTable(timeouts=TIMEOUTS, max_entries=6))
    now = 0.0
    for step, frames in seq:
        now += step
        flags: list[int] = []
        keys = classify_batch(frames, None, "ip", flags=flags)
        rejected = fast.check_many(keys, now, flags, frames, BatchSegments(frames) if step > 10 else None)  # both ways
        expect = [i for i, k in enumerate(keys)
                  if ref.check(k, now, flags[i], len(frames[i]), segment(frames[i]) if k.__class__ is tuple and k[2] == 6 else None)
                  is not RuleVerdict.ACCEPT]
        assert rejected == expect
    assert (fast.established, fast.policy_hits, fast.no_key) == (ref.established, ref.policy_hits, ref.no_key)
    assert fast.counters() == ref.counters()
    assert fast.conntrack.entries() == ref.conntrack.entries()
    assert (fast.conntrack.created, fast.conntrack.expired, fast.conntrack.full_drops) == \
        (ref.conntrack.created, ref.conntrack.expired, ref.conntrack.full_drops)
    assert (fast.conntrack.tcp_invalid, fast.conntrack.rst_ignored) == (ref.conntrack.tcp_invalid, ref.conntrack.rst_ignored)


@settings(deadline=None, max_examples=150)
@given(batches, st.booleans(), st.lists(st.tuples(st.integers(0, 2), st.sampled_from(["ready", "drain", "maint"])),
                                        max_size=4))
def test_maglev_pick_into_equals_pick(seq, symmetric, changes):
    names = ["a", "b", "c"]
    fast = MaglevBalancer(names, table_size=251, flow_timeout=15, symmetric=symmetric, max_flows=5)
    ref = MaglevBalancer(names, table_size=251, flow_timeout=15, symmetric=symmetric, max_flows=5)
    codes = {n: 3 + i for i, n in enumerate(names)}
    now = 0.0
    for j, (step, frames) in enumerate(seq):
        now += step
        if j < len(changes):  # a backend changes state between batches
            b, state = changes[j]
            fast.set_state(names[b], state)
            ref.set_state(names[b], state)
        keys = classify_batch(frames, None, "ip")
        out = bytearray(len(keys))
        misses = fast.pick_into(keys, now, out, codes, Verdict.DROP)
        picks = [ref.pick(k, now) if isinstance(k, tuple) else None for k in keys]
        assert list(out) == [Verdict.DROP if p is None else codes[p] for p in picks]
        assert misses == picks.count(None)
    assert (fast.new_flows, fast.moved_flows, fast.no_backend, fast.table_full) == \
        (ref.new_flows, ref.moved_flows, ref.no_backend, ref.table_full)
    assert fast.status() == ref.status()


IDS_RULES = "\n".join([
    'alert ip any any -> any any (msg:"n"; content:"needle"; sid:1;)',
    'drop tcp any any -> any 80 (msg:"s"; content:"secret"; nocase; sid:2;)',
    'alert udp any any -> any any (msg:"h"; content:"hello"; offset:0; depth:5; sid:3;)',
    'alert tcp any any -> any any (msg:"g"; content:"GET"; content:!"POST"; sid:4;)',
    'alert ip any any -> any any (msg:"z"; content:"|00 00 00 00|"; sid:5;)',
])


def ids_reference(frames: list[bytes], mode: str, engine: str = "auto") -> tuple[list[int], dict, int]:
    """The pre-batch algorithm: classify, slice each payload, `Ids.inspect` per packet."""
    cls = load("ids")
    ids = Ids(validate_config(cls, {"rules": IDS_RULES, "engine": engine}).signatures, mode=mode)
    out, no_key = [], 0
    for f in frames:
        key = parse_5tuple_ip(f)
        if not isinstance(key, tuple):
            no_key += 1
            out.append(0)
            continue
        span = l4_payload_span(f, "ip")
        if span is None:
            out.append(0)
            continue
        verdict, _ = ids.inspect(bytes(f)[span[0]:span[1]], key, 1.0)
        out.append(Verdict.DROP if verdict is IdsVerdict.DROP else 0)
    return out, {"alerts": ids.alerts, "dropped": ids.dropped, "passed": ids.passed, **ids.counters()}, no_key


@pytest.mark.parametrize("engine", [
    "pyahocorasick",
    pytest.param("hyperscan", marks=pytest.mark.skipif(hyperscan is None, reason="hyperscan not installed"))])
@settings(deadline=None, max_examples=150)
@given(frames=st.lists(packet(), max_size=40), mode=st.sampled_from(["alert", "drop"]))
def test_ids_lazy_path_equals_per_packet_inspect(engine, frames, mode):
    cls = load("ids")
    alerts: list[dict] = []
    fn = cls(validate_config(cls, {"rules": IDS_RULES, "mode": mode, "engine": engine}),
             FunctionContext(log=lambda event, fields: alerts.append(fields)))
    assert not fn.ids.signatures.needs_every_key  # so process() takes the lazy path
    out = bytearray(len(frames))
    fn.process(frames, 1.0, out)
    expect_out, expect, no_key = ids_reference(frames, mode, engine)
    assert list(out) == expect_out
    c = fn.counters()
    assert fn.no_5tuple == no_key and c["alerts"] == expect["alerts"] == len(alerts)
    assert {k: v for k, v in fn.ids.counters().items()} == {k: v for k, v in expect.items() if isinstance(k, int)}
