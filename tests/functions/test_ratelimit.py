"""`ratelimit` on crafted packets (policing, shaping, classes, per-flow buckets, malformed frames),
the bucket's conformance property, and one chain with real processes (shaping loses nothing)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shmfabric.functions.api import FunctionConfigError, FunctionContext, NetworkFunction, Verdict, validate_config
from shmfabric.functions.builtin.ratelimit import Bucket, RateLimiter, parse_rate, parse_size
from shmfabric.functions.registry import load
from shmfabric.net import build

from ._chain import Chain

NEXT, DROP, CONSUMED = Verdict.NEXT, Verdict.DROP, Verdict.CONSUMED
MALFORMED = [b"", b"\x45", b"\x45\x00\x00\x14" + b"\x00" * 8, b"\x60" + b"\x00" * 10, bytes(range(64))]


def udp(src="10.0.0.1", dst="10.0.0.2", sport=1000, dport=53, size=0, tag=b"") -> bytes:
    payload = (tag + bytes(max(0, size - 28 - len(tag))))
    return build.ipv4(build.udp(sport, dport, payload, src=src, dst=dst), src=src, dst=dst, proto=17)


def tcp(src="10.0.0.1", dst="10.0.0.2", sport=1000, dport=80) -> bytes:
    return build.ipv4(build.tcp(sport, dport, b"", flags="S", src=src, dst=dst), src=src, dst=dst, proto=6)


def make(cfg: dict) -> RateLimiter:
    return RateLimiter(validate_config(RateLimiter, cfg), FunctionContext(node="rl"))


def run(fn, frames, now) -> list[int]:
    out = bytearray(len(frames))
    fn.process(frames, now, out)
    return list(out)


def emitted(fn) -> list[bytes]:
    out = [bytes(d) for v, d in fn.ctx.emitted]
    assert all(v == NEXT for v, _ in fn.ctx.emitted)
    fn.ctx.emitted.clear()
    return out


# --- units and configuration -------------------------------------------------------------------------

def test_rates_and_sizes_as_written():
    assert parse_rate("100pps") == (100.0, "packets")
    assert parse_rate("2kpps") == (2000.0, "packets")
    assert parse_rate("8kbit") == (1000.0, "bytes")
    assert parse_rate("1.5Gbit/s") == (1.5e9 / 8, "bytes")
    assert parse_rate("5MB/s") == (5e6, "bytes")
    assert parse_size("64kB") == 64000 and parse_size("2KiB") == 2048 and parse_size(32) == 32
    for bad, msg in [("10Mbps", "ambiguous.*10mbit.*10MB/s"), ("10", "needs a unit"), (10, "needs a unit"),
                     ("10furlongs", "unknown unit"), ("0pps", "positive"), ("fast", "not a number")]:
        with pytest.raises(ValueError, match=msg):
            parse_rate(bad)


@pytest.mark.parametrize("cfg, msg", [
    ({}, r"config.classes: Field required"),
    ({"classes": []}, r"config.classes: List should have at least 1 item"),
    ({"classes": [{"name": "a", "rate": "10Mbps"}]}, r"config.classes.0.rate: .*ambiguous"),
    ({"classes": [{"name": "a", "rate": "1mbit", "burst": 10}]}, r"under 64 bytes"),
    ({"classes": [{"name": "a", "rate": "10pps", "burst": "0.5"}]}, r"under one packet"),
    ({"classes": [{"name": "a", "rate": "10pps"}, {"name": "a", "rate": "1pps"}]}, r"used twice"),
    ({"classes": [{"name": "a", "rate": "10pps", "match": {"src": "10.0.0.300/8"}}]}, r"match.src: .*not an address"),
    ({"classes": [{"name": "a", "rate": "10pps", "match": {"dport": "90-80"}}]}, r"match.dport: .*out of range"),
    ({"classes": [{"name": "a", "rate": "10pps", "match": {"dst": "10.1.2.3/16"}}]},
     r"match.dst: dst '10.1.2.3/16' has host bits set; use 10.1.0.0/16, or 10.1.2.3/32 for one host"),
    ({"classes": [{"name": "a", "rate": "10pps", "match": {"proto": "tcpp"}}]}, r"match.proto: .*unknown protocol"),
    ({"classes": [{"name": "a", "rate": "10pps"}], "mode": "delay"}, r"config.mode: Input should be 'police' or 'shape'"),
    ({"classes": [{"name": "a", "rate": "10pps", "colour": 1}]}, r"config.classes.0.colour: Extra inputs"),
])
def test_config_errors_name_the_field(cfg, msg):
    with pytest.raises(FunctionConfigError, match=msg):
        validate_config(RateLimiter, cfg)


def test_registered_and_satisfies_the_protocol():
    cls = load("ratelimit")
    assert cls is RateLimiter
    assert isinstance(make({"classes": [{"name": "all", "rate": "1pps"}]}), NetworkFunction)


# --- policing -------------------------------------------------------------------------------------------

def test_police_packet_rate_burst_then_refill():
    # times and rates are chosen so the arithmetic is exact in binary floating point
    rl = make({"classes": [{"name": "all", "rate": "80pps", "burst": 10}]})
    assert run(rl, [udp()] * 30, now=5.0) == [NEXT] * 10 + [DROP] * 20
    assert run(rl, [udp()] * 10, now=5.0625) == [NEXT] * 5 + [DROP] * 5  # 1/16 s at 80/s = 5 tokens
    assert run(rl, [udp()] * 20, now=100.0) == [NEXT] * 10 + [DROP] * 10  # refill stops at the burst
    c = rl.counters()
    assert c["passed"] == 25 and c["dropped"] == 35 and c["class.all.passed"] == 25


def test_police_byte_rate_counts_packet_lengths_and_overhead():
    rl = make({"classes": [{"name": "all", "rate": "80kbit", "burst": 2000}], "overhead": 14})  # 10,000 B/s
    # 2000 bytes of burst: 18 packets of 100 + 14 = 114 bytes fit (2052 > 2000 for the 18th)
    assert run(rl, [udp(size=100)] * 20, now=1.0).count(NEXT) == 17
    # a packet larger than the burst can never conform: dropped and counted, not queued forever
    assert run(rl, [udp(size=1990)], now=50.0) == [DROP]
    assert rl.counters()["too_big"] == 1


def test_classes_first_match_wins_per_flow_buckets_and_unmatched():
    rl = make({"classes": [
        {"name": "web", "match": {"proto": "tcp", "dport": [80, "443"]}, "rate": "1pps", "burst": 1},
        {"name": "dns", "match": {"proto": "udp", "dport": 53}, "rate": "1pps", "burst": 2, "per": "flow"},
    ], "unmatched": "drop"})
    frames = [tcp(dport=80), tcp(dport=443), tcp(dport=443, sport=7),          # one bucket for web
              udp(sport=1), udp(sport=1), udp(sport=1), udp(sport=2), udp(sport=2),  # a bucket per flow
              tcp(dport=22), build.ipv4(build.icmp(8), src="1.1.1.1", dst="2.2.2.2", proto=1)]
    assert run(rl, frames, now=1.0) == [NEXT, DROP, DROP, NEXT, NEXT, DROP, NEXT, NEXT, DROP, DROP]
    c = rl.counters()
    assert c["unmatched"] == 2 and c["class.dns.flows"] == 2 and c["class.web.dropped"] == 2


def test_malformed_frames_pass_or_drop_by_config_and_never_raise():
    cfg = {"classes": [{"name": "all", "rate": "1pps", "burst": 1}]}
    assert run(make(cfg), MALFORMED, now=1.0) == [NEXT] * len(MALFORMED)
    rl = make({**cfg, "unparsed": "drop"})
    assert run(rl, MALFORMED, now=1.0) == [DROP] * len(MALFORMED)
    assert rl.counters()["unparsed"] == len(MALFORMED)


def test_frames_may_be_any_buffer():
    rl = make({"classes": [{"name": "all", "rate": "1pps", "burst": 2}]})
    p = udp()
    assert run(rl, [memoryview(p), bytearray(p), p], now=1.0) == [NEXT, NEXT, DROP]


def test_per_flow_table_is_bounded_idle_buckets_freed_first():
    rl = make({"classes": [{"name": "f", "rate": "10pps", "burst": 1, "per": "flow"}], "max_flows": 4})
    run(rl, [udp(sport=p) for p in range(4)], now=1.0)
    assert rl.counters()["flows"] == 4
    # at t=1.05 none has refilled (0.5 token): a fifth flow evicts the oldest bucket
    run(rl, [udp(sport=99)], now=1.05)
    assert rl.counters()["flows"] == 4 and rl.counters()["flows_evicted"] == 1
    # at t=5 all are full again: the sweep frees them without evicting anything
    rl.on_timer(5.0)
    assert rl.counters()["flows"] == 0 and rl.counters()["flows_evicted"] == 1


@settings(max_examples=200, deadline=None)
@given(rate=st.floats(1, 1e4), burst=st.integers(1, 50),
       gaps=st.lists(st.floats(0, 0.05), min_size=1, max_size=300))
def test_bucket_never_passes_more_than_burst_plus_rate_times_time(rate, burst, gaps):
    # the token-bucket contract: over any interval [t0, t1], at most burst + rate * (t1 - t0) pass
    b = Bucket(rate, float(burst))
    t, passed_at = 0.0, []
    for g in gaps:
        t += g
        if b.take(t, 1.0):
            passed_at.append(t)
    for i in range(len(passed_at)):
        for j in range(i, len(passed_at)):
            assert j - i + 1 <= burst + rate * (passed_at[j] - passed_at[i]) + 1e-6


# --- shaping --------------------------------------------------------------------------------------------

def test_shaping_holds_copies_and_releases_them_in_order_at_the_rate():
    # 64 pps: one token every 1/64 s, exact in binary floating point; burst 1: one frame at a time
    rl = make({"mode": "shape", "classes": [{"name": "all", "rate": "64pps", "burst": 1}]})
    frames = [udp(tag=bytes([i])) for i in range(5)]
    assert run(rl, frames, now=10.0) == [NEXT] + [CONSUMED] * 4
    assert rl.counters()["held"] == 4
    assert rl.next_deadline(10.0) == 10.015625
    rl.on_timer(10.0)
    assert emitted(rl) == []  # not yet due
    rl.on_timer(10.015625)
    assert emitted(rl) == [frames[1]]
    # a new frame while a backlog exists queues behind it (no reordering)
    late = udp(tag=b"\x09")
    assert run(rl, [late], now=10.046875) == [CONSUMED]
    assert emitted(rl) == [frames[2]]  # released by process() itself, before the new frame
    for t, want in [(10.2, frames[3]), (10.3, frames[4]), (10.4, late)]:
        rl.on_timer(t)
        assert emitted(rl) == [want]  # the burst (1) caps a late timer: never two back to back
    assert rl.next_deadline(10.4) is None
    c = rl.counters()
    assert c["delayed"] == 5 and c["released"] == 5 and c["held"] == 0 and c["shape_dropped"] == 0


def test_shaping_drops_what_would_wait_too_long_or_overflow():
    rl = make({"mode": "shape", "max_delay": 0.05, "classes": [{"name": "all", "rate": "100pps", "burst": 1}]})
    out = run(rl, [udp()] * 10, now=1.0)
    # 1 passes, frames 2..6 wait 10..50 ms, the rest would wait longer than 50 ms
    assert out == [NEXT] + [CONSUMED] * 5 + [DROP] * 4
    rl = make({"mode": "shape", "queue_limit": 2, "classes": [{"name": "all", "rate": "100pps", "burst": 1}]})
    assert run(rl, [udp()] * 5, now=1.0) == [NEXT, CONSUMED, CONSUMED, DROP, DROP]
    assert rl.counters()["shape_dropped"] == 2


def test_shape_and_police_classes_side_by_side():
    rl = make({"max_delay": 5, "classes": [
        {"name": "s", "match": {"dport": 1}, "rate": "1pps", "burst": 1, "mode": "shape"},
        {"name": "p", "rate": "1pps", "burst": 1}]})
    assert run(rl, [udp(dport=1), udp(dport=1), udp(dport=2), udp(dport=2)], now=1.0) == [NEXT, CONSUMED, NEXT, DROP]


def test_reconfigure_releases_held_frames_and_applies_new_rates():
    rl = make({"mode": "shape", "max_delay": 5, "classes": [{"name": "all", "rate": "1pps", "burst": 1}]})
    frames = [udp(tag=bytes([i])) for i in range(3)]
    run(rl, frames, now=1.0)
    rl.reconfigure(validate_config(RateLimiter, {"classes": [{"name": "all", "rate": "1000pps", "burst": 100}]}))
    assert emitted(rl) == frames[1:] and rl.next_deadline(1.0) is None
    assert run(rl, [udp()] * 50, now=1.0) == [NEXT] * 50


# --- with processes -------------------------------------------------------------------------------------

def test_shaping_chain_delays_but_loses_nothing(tmp_path):
    """generator -> ratelimit(shape) -> sink: every frame arrives, intact, none dropped; frames held
    when the generator is done are still released after SIGTERM (the graceful stop waits for them)."""
    ch = Chain(tmp_path)
    try:
        ch.start("sink", "sink", {"verify": True})
        ch.start("rl", "ratelimit", {"mode": "shape", "max_delay": 5, "queue_limit": 5000,
                                     "classes": [{"name": "all", "rate": "2000pps", "burst": 20}]}, "sink")
        ch.wait_attached("sink", "rl")
        ch.start("gen", "generator", {"count": 1000, "size": 128, "flows": 16}, "rl")
        ch.wait_exit("gen")
        rl = ch.stop("rl")  # most of the 1000 frames are still held (0.5 s at 2000/s): drained at the rate
        ch.wait_rx("sink", 1000, timeout=20)
        sink = ch.stop("sink")
        fc = rl["function_counters"]
        assert fc["delayed"] > 0 and fc["released"] == fc["delayed"] and fc["shape_dropped"] == 0, fc
        assert rl["counters"]["consumed"] == fc["delayed"] and rl["counters"]["emitted"] == fc["released"]
        s = sink["function_counters"]
        assert s["unique"] == 1000 and s["missing"] == 0 and s["corrupt"] == 0 and s["duplicates"] == 0, s
    finally:
        ch.close()


def test_ipv6_prefixes_and_mixed_families():
    def udp6(src):
        return build.ipv6(build.udp(1, 53, b"q", src=src, dst="fd00::53"), src=src, dst="fd00::53", next_header=17)

    rl = make({"classes": [{"name": "v6", "match": {"src": ["fd00:1::/32", "10.0.0.0/8"]}, "rate": "1pps", "burst": 1}],
               "unmatched": "drop"})
    assert run(rl, [udp6("fd00:1::5"), udp6("fd00:1::6"), udp6("fd00:2::1"), udp(src="10.1.1.1")], now=1.0) == \
        [NEXT, DROP, DROP, DROP]
    assert rl.counters()["unmatched"] == 1 and rl.counters()["class.v6.dropped"] == 2


def test_full_per_flow_table_evicts_the_least_recently_used_with_bounded_work():
    # Each new flow used to scan every bucket once the table was full (24 ms a flow at 65,536).
    rl = make({"classes": [{"name": "f", "rate": "1pps", "burst": 1, "per": "flow"}], "max_flows": 1000})
    run(rl, [udp(src=f"10.0.{i >> 8}.{i & 255}") for i in range(1000)], now=1.0)
    run(rl, [udp(src=f"10.0.{i >> 8}.{i & 255}") for i in range(500)], now=1.5)   # re-used: most recent
    before = rl.swept
    run(rl, [udp(src=f"10.9.0.{i}") for i in range(100)], now=1.6)
    c = rl.counters()
    assert c["flows"] == 1000 and c["flows_evicted"] == 100 and c["flows_freed"] == 0
    assert rl.swept - before <= 500 + 4 * 100  # re-queued once each, then a few looks per new flow
    # the evicted ones were the least recently used (flows 500..599): such a flow starts over with a
    # full bucket, while a kept flow that spent its token is still over the rate
    assert run(rl, [udp(src="10.0.2.44"), udp(src="10.0.2.188"), udp(src="10.0.0.1")], now=1.7) == [NEXT, DROP, DROP]


def test_idle_per_flow_buckets_are_reclaimed_without_the_timer():
    rl = make({"classes": [{"name": "f", "rate": "100pps", "burst": 1, "per": "flow"}]})
    run(rl, [udp(src=f"10.0.{i >> 8}.{i & 255}") for i in range(2000)], now=1.0)
    # 10 s later all are full again; the new flows free them as they come
    run(rl, [udp(src=f"10.1.{i >> 8}.{i & 255}") for i in range(2000)], now=11.0)
    assert rl.counters()["flows"] <= 2002 and rl.counters()["flows_freed"] >= 1998


@pytest.mark.parametrize("mtu,overhead,size", [(1600, 0, 1600), (1600, 24, 1600), (9000, 14, 9000)])
def test_default_burst_fits_the_largest_frame_of_the_network(mtu, overhead, size):
    # the default byte burst used to be max(10 ms, 1600 B): every larger frame was too_big, so a
    # tunnel network with MTU 1600 (or jumbo frames) lost all its large frames
    rl = RateLimiter(validate_config(RateLimiter, {"classes": [{"name": "slow", "rate": "1mbit"}], "overhead": overhead}),
                     FunctionContext(node="rl", mtu=mtu))
    assert run(rl, [udp(size=size)], now=1.0) == [NEXT]
    assert rl.counters()["too_big"] == 0
    assert rl.classes[0].burst == mtu + overhead


def test_explicit_burst_under_the_largest_frame_is_warned_and_counted():
    logged = []
    cfg = validate_config(RateLimiter, {"classes": [{"name": "small", "rate": "1mbit", "burst": 1500}]})
    rl = RateLimiter(cfg, FunctionContext(node="rl", mtu=1600, log=lambda e, f: logged.append((e, f))))
    assert logged and logged[0][0] == "config_warning" and "1600" in logged[0][1]["problem"]
    assert run(rl, [udp(size=1500), udp(size=1501)], now=1.0) == [NEXT, DROP]
    c = rl.counters()
    assert c["too_big"] == 1 and c["class.small.too_big"] == 1
    # packet rates count packets: no warning
    logged.clear()
    RateLimiter(validate_config(RateLimiter, {"classes": [{"name": "p", "rate": "10pps", "burst": 1}]}),
                FunctionContext(node="rl", mtu=1600, log=lambda e, f: logged.append(e)))
    assert logged == []
