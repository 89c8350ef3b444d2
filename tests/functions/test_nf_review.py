"""Fixes from the review of ratelimit, monitor and l4lb: configuration errors of any type are one
line (never a traceback out of the runtime), IP fragments in all three functions, bounded Maglev
tables, whole-or-nothing reconfiguration, one table build per l4lb reconfigure, the monitor's lazy
flow expiry, and the smaller counter fixes."""
from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, field_validator

from shmfabric.fabric import Fabric
from shmfabric.functions import maglev
from shmfabric.functions.api import FunctionConfigError, FunctionContext, Verdict, validate_config
from shmfabric.functions.builtin import monitor as monitor_mod
from shmfabric.functions.builtin.l4lb import L4LoadBalancer
from shmfabric.functions.builtin.monitor import Monitor
from shmfabric.functions.builtin.ratelimit import RateLimiter, parse_rate, parse_size
from shmfabric.functions.control import ControlClient
from shmfabric.functions.maglev import MaglevBalancer
from shmfabric.functions.runtime import FunctionRunner
from shmfabric.net import build
from shmfabric.net.errors import Reason
from shmfabric.net.flow import classify_batch, parse_5tuple_ip
from shmfabric.net.packet import LINK_IP, decode

NEXT, DROP = int(Verdict.NEXT), int(Verdict.DROP)
PY = sys.executable


def run(fn, frames, now) -> list[int]:
    out = bytearray(len(frames))
    fn.process(frames, now, out)
    return list(out)


def make(cls, cfg, ports=()):
    return cls(validate_config(cls, cfg), FunctionContext(node="t", ports=list(ports)))


def udp(src="10.0.0.1", dst="10.0.0.2", sport=1000, dport=53, size=0) -> bytes:
    if ":" in src:
        return build.ipv6(build.udp(sport, dport, bytes(max(0, size - 48)), src=src, dst=dst), src=src, dst=dst,
                          next_header=17)
    return build.ipv4(build.udp(sport, dport, bytes(max(0, size - 28)), src=src, dst=dst), src=src, dst=dst, proto=17)


def frags4(src="10.0.0.1", dst="10.0.0.2", sport=1000, dport=53, ident=7, size=2960, step=1480,
           proto=17) -> list[bytes]:
    """An IPv4 UDP datagram (`size` bytes of UDP) cut into fragments of `step` bytes."""
    l4 = build.udp(sport, dport, bytes(size - 8), src=src, dst=dst)
    return [build.ipv4(l4[o:o + step], src=src, dst=dst, proto=proto, ident=ident, mf=o + step < len(l4),
                       frag_offset=o) for o in range(0, len(l4), step)]


def frags6(src="fd00::1", dst="fd00::2", sport=1000, dport=53, ident=7, size=2960, step=1448,
           ext=()) -> list[bytes]:
    """An IPv6 UDP datagram cut into fragments (a Fragment header, after the headers in `ext`)."""
    l4 = build.udp(sport, dport, bytes(size - 8), src=src, dst=dst)
    return [build.ipv6(l4[o:o + step], src=src, dst=dst, next_header=17,
                       ext=[*ext, build.ipv6_fragment(o, o + step < len(l4), ident)])
            for o in range(0, len(l4), step)]


_PAIRS: dict[str, tuple] = {}  # fabric name -> (sender, receiver) nodes


@pytest.fixture
def fab():
    name = f"nfr-{uuid.uuid4().hex[:8]}"
    f = Fabric.create(name, ephemeral=True, networks=[{"mtu": 2048, "slots": 512}], ring_size=256)
    yield f
    _PAIRS.pop(name, None)
    f.close()
    Fabric.destroy(name)  # now, not when the test process ends


def as_batch(fab, frames):
    """The frames as a fabric FrameBatch (zero-copy views; `gather` available)."""
    tx, rx = _pair(fab)
    assert tx.send_batch(rx.id, frames, ethertype=0x0800) == len(frames)
    batch = rx.recv_batch(len(frames), 2.0)
    assert len(batch) == len(frames)
    return batch


def _pair(fab):
    if fab.name not in _PAIRS:
        _PAIRS[fab.name] = (fab.attach("tx"), fab.attach("rx"))
    return _PAIRS[fab.name]


# --- 1. configuration errors of any type ------------------------------------------------------------

@pytest.mark.parametrize("bad", [None, "", [], ["1pps"], {"a": 1}, True, b"10pps"])
def test_rate_of_any_type_is_a_value_error_and_a_one_line_config_error(bad):
    with pytest.raises(ValueError, match="rate"):
        parse_rate(bad)
    with pytest.raises(FunctionConfigError) as e:
        validate_config(RateLimiter, {"classes": [{"name": "a", "rate": bad}]})
    assert "config.classes.0.rate: rate " in str(e.value) and "\n" not in str(e.value)


def test_empty_rate_in_a_topology_is_a_config_error_not_a_type_error():
    from shmfabric.functions.registry import load
    from shmfabric.manager.config import ConfigError, parse_topology
    text = ("fabric:\n  name: nfr\n  networks:\n    - {name: lan, mtu: 1500, slots: 1024}\n"
            "nodes:\n  - name: rl\n    function: ratelimit\n    config:\n      classes:\n"
            "        - name: web\n          rate:\n")
    with pytest.raises(ConfigError, match="rate is empty"):
        parse_topology(text, "t.yaml", load)


@pytest.mark.parametrize("bad", [None, [], True, False, {"x": 1}])
def test_size_of_any_type_is_a_value_error(bad):
    with pytest.raises(ValueError, match="burst"):
        parse_size(bad)


class BoomConfig(BaseModel):
    x: object = 0

    @field_validator("x", mode="before")
    @classmethod
    def _v(cls, v: object) -> object:
        if v == "type":
            raise TypeError("not a ValueError")  # pydantic passes anything but ValueError through
        return v


class Boom:
    """A function whose validator lets a TypeError out, and whose __init__ or reconfigure() raise."""

    name = "boom"
    version = "1"
    Config = BoomConfig

    def __init__(self, config: BoomConfig, ctx: FunctionContext) -> None:
        if config.x == "init":
            raise RuntimeError("cannot build")
        self.ctx = ctx

    def process(self, frames, now, out) -> None:
        pass

    def reconfigure(self, config: BoomConfig) -> None:
        if config.x == "reconf":
            raise KeyError("half applied")


def test_runner_turns_unexpected_exceptions_into_error_replies_and_one_line_start_errors(fab):
    replies = []
    r = FunctionRunner(fab, "boom", Boom, {})
    try:
        r._reply = lambda dst, msg: replies.append(msg)
        for i, cfg in enumerate([{"x": "type"}, {"x": "reconf"}, {"x": 1}]):
            r._on_message(0, json.dumps({"op": "reconfigure", "id": i, "config": cfg}).encode())
        assert [m["ok"] for m in replies] == [False, False, True]
        assert "TypeError: not a ValueError" in replies[0]["error"]
        assert "KeyError" in replies[1]["error"] and "half applied" in replies[1]["error"]
        # the runner goes on answering
        r._on_message(0, json.dumps({"op": "stats", "id": 9}).encode())
        assert replies[-1]["ok"] and replies[-1]["id"] == 9
    finally:
        r.close()
    for cfg, msg in [({"x": "type"}, "TypeError: not a ValueError"), ({"x": "init"}, "RuntimeError: cannot build")]:
        with pytest.raises(FunctionConfigError, match=msg):
            FunctionRunner(fab, "boom2", Boom, cfg)
    with pytest.raises(FunctionConfigError, match="rate is empty"):
        FunctionRunner(fab, "rl", RateLimiter, {"classes": [{"name": "a", "rate": None}]})


def test_a_node_survives_a_bad_live_reconfigure_and_a_bad_start_is_exit_2():
    name = f"nfr-{uuid.uuid4().hex[:8]}"
    fab = Fabric.create(name, networks=[{"mtu": 1500, "slots": 1024}], ring_size=256)
    p = None
    try:
        bad = subprocess.run([PY, "-m", "shmfabric.functions.run", "--fabric", name, "--node", "rl0",
                              "--function", "ratelimit", "--config", '{"classes": [{"name": "a", "rate": null}]}'],
                             capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
        assert bad.stderr.strip().endswith("rate is empty; write a number with a unit, e.g. 1000pps, 10mbit or 5MB/s")
        assert len(bad.stderr.strip().splitlines()) == 1
        p = subprocess.Popen([PY, "-m", "shmfabric.functions.run", "--fabric", name, "--node", "rl",
                              "--function", "ratelimit", "--config", '{"classes": [{"name": "a", "rate": "10pps"}]}'],
                             stderr=subprocess.PIPE, text=True)
        end = time.monotonic() + 30
        while fab.node_id("rl") is None:
            assert time.monotonic() < end and p.poll() is None, "rl did not attach"
            time.sleep(0.02)
        ctl = ControlClient(fab, "manager")
        try:
            for cfg in ({"classes": [{"name": "a", "rate": None}]}, {"classes": [{"name": "a", "rate": ["1pps"]}]}):
                reply = ctl.request("rl", {"op": "reconfigure", "config": cfg}, timeout=20)
                assert not reply["ok"] and "config.classes.0.rate: rate" in reply["error"]
            assert p.poll() is None, "the node went down"
            assert ctl.request("rl", {"op": "stats"}, timeout=20)["ok"]
            assert ctl.request("rl", {"op": "reconfigure", "config": {"classes": [{"name": "a", "rate": "5pps"}]}},
                               timeout=20)["ok"]
            assert ctl.request("rl", {"op": "stop"}, timeout=20)["ok"]
        finally:
            ctl.close()
        assert p.wait(timeout=30) == 0
    finally:
        if p is not None and p.poll() is None:
            p.kill()
            p.wait()
        fab.close()
        Fabric.destroy(name)


# --- 2. ratelimit: fragments ------------------------------------------------------------------------

def test_non_first_fragments_are_policed_by_src_dst_proto_v4_and_v6():
    for fr in (frags4, frags6):
        src = "10.0.0.1" if fr is frags4 else "fd00::1"
        rl = make(RateLimiter, {"classes": [
            {"name": "dns", "match": {"proto": "udp", "dport": 53}, "rate": "1000pps", "burst": 1000},
            {"name": "udp-from-src", "match": {"proto": "udp", "src": src}, "rate": "10pps", "burst": 3}],
            "unmatched": "drop"})
        datagrams = [fr(ident=i) for i in range(10)]  # two fragments each
        firsts = run(rl, [d[0] for d in datagrams], 1.0)
        rest = run(rl, [d[1] for d in datagrams], 1.0)
        assert firsts == [NEXT] * 10  # the first fragment has ports: the dns class
        assert rest == [NEXT] * 3 + [DROP] * 7  # a port-based class never takes a fragment
        c = rl.counters()
        assert c["fragments"] == 10 and c["unparsed"] == 0
        assert c["class.udp-from-src.passed"] == 3 and c["class.udp-from-src.dropped"] == 7
        assert c["class.dns.passed"] == 10


def test_fragments_option_pass_drop_and_per_flow_buckets():
    later = [frags4(src=f"10.0.0.{i % 2 + 1}", ident=i)[1] for i in range(8)]
    base = {"classes": [{"name": "all", "rate": "10pps", "burst": 2, "per": "flow"}]}
    rl = make(RateLimiter, base)
    assert rl.cfg.fragments == "police"
    assert run(rl, later, 1.0) == [NEXT] * 4 + [DROP] * 4  # 2 per (src, dst, proto)
    assert rl.counters()["flows"] == 2
    rl = make(RateLimiter, {**base, "fragments": "pass", "unparsed": "drop"})
    assert run(rl, later, 1.0) == [NEXT] * 8 and rl.counters()["fragments"] == 8
    rl = make(RateLimiter, {**base, "fragments": "drop"})
    assert run(rl, later, 1.0) == [DROP] * 8
    with pytest.raises(FunctionConfigError, match="config.fragments"):
        validate_config(RateLimiter, {**base, "fragments": "reassemble"})


def test_unmatched_fragments_follow_unmatched():
    later = frags4()[1]
    rl = make(RateLimiter, {"classes": [{"name": "web", "match": {"dport": 80}, "rate": "1pps"}],
                            "unmatched": "drop"})
    assert run(rl, [later], 1.0) == [DROP]
    assert rl.counters()["unmatched"] == 1 and rl.counters()["fragments"] == 1


# --- 3. l4lb: fragments -----------------------------------------------------------------------------

NAMES = [f"s{i}" for i in range(8)]


def _lb(**cfg):
    return make(L4LoadBalancer, {"backends": [{"node": n} for n in NAMES], **cfg}, NAMES)


def _datagrams():
    out = []
    for i in range(40):
        out.append(frags4(src=f"10.1.{i}.1", sport=2000 + i, ident=i, size=4000))
        out.append(frags6(src=f"fd00::{i + 1:x}", sport=2000 + i, ident=i, size=4000))
    out.append(frags6(src="fd00::99", ext=[build.ipv6_ext(0)]))  # hop-by-hop before the Fragment header
    out.append(frags6(src="fd00::98", ext=[build.ipv6_ext(60)]))  # destination options before it
    return out


@pytest.mark.parametrize("kind", ["list", "batch"])
def test_all_fragments_of_a_datagram_go_to_one_backend(fab, kind):
    lb = _lb()
    grams = _datagrams()
    frames = [f for g in grams for f in g]
    if kind == "batch":
        batch = as_batch(fab, frames)
        try:
            out = run(lb, batch, 1.0)
        finally:
            batch.release()
    else:
        out = run(lb, frames, 1.0)
    assert DROP not in out and lb.counters()["no_backend"] == 0
    i = 0
    for g in grams:
        assert len(set(out[i:i + len(g)])) == 1, g
        i += len(g)
    assert len(set(out)) > 4  # spread over the backends by (src, dst, proto)
    assert lb.counters()["fragments"] == len(frames)


def test_fragments_use_the_3_tuple_unfragmented_packets_keep_the_5_tuple():
    lb = _lb(symmetric=False)
    ref = MaglevBalancer(NAMES, table_size=65537)
    pkts = [udp(src=f"10.2.0.{i}", sport=3000 + i, dport=80) for i in range(1, 60)]
    port = {n: int(Verdict.port(k)) for k, n in enumerate(NAMES)}
    assert run(lb, pkts, 1.0) == [port[ref.pick(parse_5tuple_ip(p), 1.0)] for p in pkts]
    first, later = frags4(src="10.3.0.1", dst="10.9.9.9")
    want = port[ref.pick((parse_5tuple_ip(first)[0], parse_5tuple_ip(first)[1], 17, 0, 0), 1.0)]
    assert run(lb, [first, later], 2.0) == [want, want]
    # an unfragmented packet of the same 5-tuple as the first fragment is a flow of its own
    assert lb.counters()["fragments"] == 2


def test_symmetric_fragments_of_both_directions_go_to_one_backend():
    lb = _lb()
    for i in range(20):
        a, b = f"10.4.0.{i + 1}", "10.9.0.1"
        out = run(lb, frags4(src=a, dst=b, ident=i) + frags4(src=b, dst=a, sport=53, dport=1000, ident=i), 1.0)
        assert len(set(out)) == 1


def _reference(frames, keys):
    """fragment_keys by decode(): fragments (MF set or offset > 0; IPv6 atomic fragments are not)
    get (src, dst, proto, 0, 0)."""
    out = []
    for f, k in zip(frames, keys):
        ip = decode(f, 0, LINK_IP).ip
        if k.__class__ is tuple and ip is not None and (ip.first_fragment if ip.version == 6 else ip.is_fragment):
            k = (k[0], k[1], k[2], 0, 0)
        elif k is Reason.FRAGMENT:
            k = (ip.src, ip.dst, ip.proto, 0, 0)
        out.append(k)
    return out


ATOMIC6 = build.ipv6(build.udp(1, 2, b"x"), src="fd00::1", dst="fd00::2", next_header=17,
                     ext=[build.ipv6_fragment(0, False, 5)])
SAMPLES = ([udp(), udp(size=300), udp(src="fd00::5", dst="fd00::6", size=120),
            build.ipv4(build.tcp(1, 80, b"", src="10.0.0.1", dst="10.0.0.2"), src="10.0.0.1", dst="10.0.0.2",
                       proto=6, df=True),
            build.ipv4(build.icmp(8, payload=bytes(40), identifier=3), src="10.0.0.1", dst="10.0.0.2", proto=1),
            build.ipv6(build.icmpv6(128, src="fd00::1", dst="fd00::2", identifier=4), src="fd00::1", dst="fd00::2",
                       next_header=58),
            build.ipv6(build.udp(1, 2, b"x"), src="fd00::1", dst="fd00::2", next_header=17, ext=[build.ipv6_ext(0)]),
            build.ipv4(build.udp(1, 2, bytes(16)), src="10.0.0.1", dst="10.0.0.2", proto=17, options=b"\x01" * 4,
                       mf=True),
            ATOMIC6, b"", b"\x45", b"\x45\x00\x00\x14", bytes(range(40)), b"\x60" + bytes(47)]
           + frags4(size=3000, step=1000) + frags6(size=3000, step=1000)
           + frags6(src="fd00::7", ext=[build.ipv6_ext(0), build.ipv6_ext(60)], size=2000, step=1000)
           + frags4(proto=6, size=600, step=200))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(SAMPLES), max_size=40))
def test_fragment_keys_agrees_with_decode(frames):
    from shmfabric.functions.maglev import fragment_keys
    keys = classify_batch(frames, None, "ip")
    want = _reference(frames, keys)
    changed = fragment_keys(frames, keys)
    assert keys == want
    assert changed == sum(1 for a, b in zip(classify_batch(frames, None, "ip"), want) if a != b)


def test_fragment_keys_on_a_fabric_batch_agrees_with_decode(fab):
    from shmfabric.functions.maglev import fragment_keys
    frames = [f for f in SAMPLES if f] * 3
    batch = as_batch(fab, frames)
    try:
        keys = classify_batch(batch, None, "ip")
        want = _reference(frames, classify_batch(frames, None, "ip"))
        fragment_keys(batch, keys)
        assert keys == want
    finally:
        batch.release()


@pytest.mark.parametrize("frames", [
    frags4(size=3000, step=1000)[1:],  # IPv4 only, no first fragment: MF clear on the last one
    [udp()] * 5 + frags4(size=3000, step=1000)[2:],  # the last fragment alone: offset, no MF
    frags6(ext=[build.ipv6_ext(0)]) + [udp(src="fd00::5", dst="fd00::6")],  # IPv6 only, hop-by-hop first
    [udp(src="fd00::5", dst="fd00::6")] * 3 + [ATOMIC6],  # IPv6 only, an atomic fragment: unfragmented
    [udp()] * 4,
], ids=["v4-later", "v4-last", "v6-hbh", "v6-atomic", "v4-none"])
@pytest.mark.parametrize("kind", ["list", "batch"])
def test_fragment_keys_on_uniform_batches(fab, frames, kind):
    from shmfabric.functions.maglev import fragment_keys
    want = _reference(frames, classify_batch(frames, None, "ip"))
    src = as_batch(fab, frames) if kind == "batch" else frames
    try:
        keys = classify_batch(src, None, "ip")
        fragment_keys(src, keys)
        assert keys == want
    finally:
        if kind == "batch":
            src.release()


# --- 4. table_size bounds ---------------------------------------------------------------------------

def test_table_size_is_bounded_before_the_primality_test():
    for big in (10**12 + 39, (1 << 20) + 7):  # primes; the first was accepted, then MemoryError at start
        with pytest.raises(FunctionConfigError, match=r"config.table_size: table_size \d+ is too large: at most 1048576"):
            validate_config(L4LoadBalancer, {"table_size": big})
        with pytest.raises(ValueError, match="too large"):
            MaglevBalancer(["a"], table_size=big)
    assert validate_config(L4LoadBalancer, {"table_size": 1048573}).table_size == 1048573
    with pytest.raises(FunctionConfigError, match="must be a prime"):
        validate_config(L4LoadBalancer, {"table_size": 65536})
    from shmfabric.functions.maglev import MAX_TABLE_SIZE, check_table_size
    assert MAX_TABLE_SIZE == 1 << 20
    t0 = time.monotonic()
    for big in (2**61 - 1, 2**127 - 1):  # Mersenne primes: trial division would never end
        with pytest.raises(ValueError, match="too large"):
            check_table_size(big)
    assert time.monotonic() - t0 < 10


def test_a_huge_table_size_does_not_hang_the_config_check():
    code = ("from shmfabric.functions.api import validate_config, FunctionConfigError\n"
            "from shmfabric.functions.builtin.l4lb import L4LoadBalancer\n"
            "try:\n validate_config(L4LoadBalancer, {'table_size': 2**61 - 1})\n"
            "except FunctionConfigError as e:\n print(e)\n")
    r = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=60)
    assert "too large" in r.stdout, r.stderr


# --- 5. monitor: whole-or-nothing reconfigure -------------------------------------------------------

def test_failed_monitor_reconfigure_changes_nothing(tmp_path):
    a = tmp_path / "a.pcap"
    (tmp_path / "adir").mkdir()
    m = make(Monitor, {"capture": {"path": str(a)}, "top_k": 4, "flow_timeout": 60})
    run(m, [udp()] * 3, 1.0)
    old_cfg, old_cap, old_top = m.cfg, m.capture, m.top_talkers()
    with pytest.raises(FunctionConfigError, match="cannot open capture file"):
        m.reconfigure(validate_config(Monitor, {"capture": {"path": str(tmp_path / "adir")}, "top_k": 8,
                                                "flow_timeout": 5}))
    assert m.cfg is old_cfg and m.capture is old_cap and m.top_talkers() == old_top
    run(m, [udp()] * 2, 2.0)
    assert m.counters()["captured"] == 5
    # a reconfigure that does not touch top_k/top_by keeps the top talkers; a new capture file
    # replaces the old one only once it is open
    b = tmp_path / "b.pcap"
    m.reconfigure(validate_config(Monitor, {"capture": {"path": str(b)}, "top_k": 4, "report_interval": 10}))
    assert m.top_talkers() == [{"talker": "udp 10.0.0.1:1000 -> 10.0.0.2:53", "bytes": 5 * 28, "error": 0}]
    run(m, [udp()], 3.0)
    m.close()
    assert a.stat().st_size == 24 + 5 * (16 + 14 + 28) and b.stat().st_size == 24 + 16 + 14 + 28


def test_reconfigure_to_the_same_capture_path_with_new_settings(tmp_path):
    a = tmp_path / "a.pcap"
    m = make(Monitor, {"capture": {"path": str(a)}})
    run(m, [udp()] * 3, 1.0)
    m.reconfigure(validate_config(Monitor, {"capture": {"path": str(a), "snaplen": 64}}))
    run(m, [udp(size=200)], 2.0)
    m.close()
    # the earlier capture is kept whole (never truncated); the new settings write the next file:
    # one header, one record cut to 64 bytes
    assert len(a.read_bytes()) == 24 + 3 * (16 + len(udp()) + 14)
    assert len((tmp_path / "a_00001.pcap").read_bytes()) == 24 + 16 + 64


# --- 6. monitor: fragments ----------------------------------------------------------------------------

def test_monitor_counts_fragments_by_address_and_under_a_3_tuple_flow():
    m = make(Monitor, {"top_k": 4, "top_by": "src"})
    batch = []
    for i in range(10):
        batch += frags4(src="10.0.0.66", ident=i, size=7400)
        batch += [udp(src="10.0.0.77", size=1400)] * 2
    run(m, batch, 1.0)
    wire = Counter()
    for f in batch:
        wire[".".join(map(str, f[12:16]))] += len(f)
    assert {t["talker"]: t["bytes"] for t in m.top_talkers()} == dict(wire)
    c = m.counters()
    assert c["fragments"] == 40 and c["unparsed"] == 0
    flows = {f["flow"]: f for f in m.flows()}
    assert flows["udp 10.0.0.66 -> 10.0.0.2 fragments"]["packets"] == 40
    assert flows["udp 10.0.0.66:1000 -> 10.0.0.2:53"]["packets"] == 10  # the first fragments
    m = make(Monitor, {"top_k": 4})
    run(m, frags6(), 1.0)
    assert {t["talker"] for t in m.top_talkers()} == {"udp [fd00::1]:1000 -> [fd00::2]:53",
                                                        "udp fd00::1 -> fd00::2 fragments"}


def test_capture_filter_takes_fragments_by_address_not_by_port(tmp_path):
    p1, p2 = tmp_path / "a.pcap", tmp_path / "b.pcap"
    by_proto = make(Monitor, {"capture": {"path": str(p1), "match": {"proto": "udp", "src": "10.0.0.0/8"}}})
    by_port = make(Monitor, {"capture": {"path": str(p2), "match": {"dport": 53}}})
    fr = frags4()
    for m in (by_proto, by_port):
        run(m, fr, 1.0)
    assert by_proto.counters()["captured"] == 2 and by_port.counters()["captured"] == 1


# --- 7, 8, 13. l4lb reconfigure and seed ----------------------------------------------------------------

def test_l4lb_reconfigure_builds_the_table_once(monkeypatch):
    names = [f"s{i}" for i in range(20)]
    lb = make(L4LoadBalancer, {"backends": [{"node": n} for n in names[:2]], "table_size": 4099}, names)
    builds = []
    orig = maglev.MaglevTable.__init__

    def counting(self, *a, **k):
        builds.append(1)
        orig(self, *a, **k)
    monkeypatch.setattr(maglev.MaglevTable, "__init__", counting)
    lb.reconfigure(validate_config(L4LoadBalancer, {"backends": [{"node": n} for n in names], "table_size": 4099}))
    assert len(builds) == 1 and len(lb.lb.table.backends) == 20
    lb.reconfigure(validate_config(L4LoadBalancer, {"backends": [{"node": n, "weight": 2} for n in names[1:]]
                                                    + [{"node": "s0", "state": "drain"}], "table_size": 4099}))
    assert len(builds) == 2 and lb.lb.weights["s5"] == 2 and lb.lb.states["s0"].value == "drain"
    lb.reconfigure(validate_config(L4LoadBalancer, {"backends": [{"node": n, "weight": 2} for n in names[1:]]
                                                    + [{"node": "s0", "state": "drain"}], "table_size": 4099}))
    assert len(builds) == 2  # nothing changed: no build
    lb.reconfigure(validate_config(L4LoadBalancer, {"backends": [{"node": n} for n in names[:5]], "table_size": 251,
                                                    "seed": 3}))
    assert len(builds) == 3 and len(lb.lb.table.table) == 251 and lb.lb.table.backends == sorted(names[:5])
    with pytest.raises(FunctionConfigError, match="20 backends do not fit a table of 11 slots"):
        validate_config(L4LoadBalancer, {"backends": [{"node": n} for n in names], "table_size": 11})


def test_l4lb_reconfigure_applies_table_size_and_seed_and_refuses_symmetric():
    lb = make(L4LoadBalancer, {"backends": [{"node": "a"}, {"node": "b"}]}, ["a", "b", "c"])
    pkts = [udp(src=f"10.5.0.{i}", sport=i) for i in range(1, 50)]
    before = run(lb, pkts, 1.0)
    lb.reconfigure(validate_config(L4LoadBalancer, {"backends": [{"node": "a"}, {"node": "b"}],
                                                    "table_size": 4099, "seed": 9}))
    assert lb.lb.table_size == 4099 and len(lb.lb.table.table) == 4099 and lb.lb.seed == 9
    assert run(lb, pkts, 2.0) == before  # remembered flows stay
    with pytest.raises(FunctionConfigError, match="symmetric cannot change live.*restart"):
        lb.reconfigure(validate_config(L4LoadBalancer, {"backends": [{"node": "c"}], "symmetric": False}))
    assert sorted(lb.lb.weights) == ["a", "b"] and lb.lb.symmetric  # nothing applied


def test_l4lb_seed_reaches_the_balancer():
    cfg = {"backends": [{"node": n} for n in NAMES], "table_size": 4099}
    a, b = make(L4LoadBalancer, cfg, NAMES), make(L4LoadBalancer, {**cfg, "seed": 12345}, NAMES)
    assert b.lb.seed == 12345 and a.lb.seed == 0
    assert a.lb.table.table != b.lb.table.table
    pkts = [udp(src=f"10.6.{i // 200}.{i % 200}", sport=i) for i in range(400)]
    assert run(a, pkts, 1.0) != run(b, pkts, 1.0)
    for bad in (-1, 2**32, "x"):
        with pytest.raises(FunctionConfigError, match="config.seed"):
            validate_config(L4LoadBalancer, {"seed": bad})


# --- 9, 10. monitor flow table ----------------------------------------------------------------------

def test_monitor_expiry_is_lazy_and_bounded(monkeypatch):
    looked = []
    orig = monitor_mod._flow_idle
    monkeypatch.setattr(monitor_mod, "_flow_idle", lambda e, t: looked.append(1) or orig(e, t))
    m = make(Monitor, {"flow_timeout": 60, "max_flows": 100_000})
    run(m, [udp(src=f"10.7.{i // 250}.{i % 250}") for i in range(10_000)], 1.0)
    looked.clear()
    assert m.on_timer(30.0) is not None and m.counters()["flows_expired"] == 0
    assert len(looked) <= 2  # nothing due: a look at the oldest flow, not a scan of 10,000
    looked.clear()
    nxt = m.on_timer(100.0)
    assert nxt == 100.0  # more due: called again at once
    assert len(looked) <= monitor_mod.SWEEP_SLICE and m.counters()["flows_expired"] == monitor_mod.SWEEP_SLICE
    while m.flow_table:
        m.on_timer(100.0)
    assert m.counters()["flows_expired"] == 10_000


def test_monitor_full_table_frees_idle_flows_for_new_ones_and_counts_untracked_packets():
    m = make(Monitor, {"max_flows": 1})
    run(m, [udp(sport=1)] + [udp(sport=2)] * 1000, 1.0)
    c = m.counters()
    assert c["packets_untracked"] == 1000 and "flows_untracked" not in c
    m = make(Monitor, {"max_flows": 3, "flow_timeout": 10})
    run(m, [udp(sport=p) for p in range(3)], 0.0)
    run(m, [udp(sport=9)], 20.0)  # idle flows make room (two per new flow), without waiting for the timer
    c = m.counters()
    assert c["packets_untracked"] == 0 and c["flows_expired"] == 2 and c["flows"] == 2
    assert "udp 10.0.0.1:9 -> 10.0.0.2:53" in {f["flow"] for f in m.flows()}


# --- 11. maglev: an expired flow that sends again ---------------------------------------------------------

def test_expired_flow_that_sends_again_is_counted_expired():
    b = MaglevBalancer(["a", "b"], table_size=251, flow_timeout=10)
    k = (1, 2, 17, 3, 4)
    b.pick(k, 0.0)
    b.pick(k, 100.0)
    assert (b.expired_flows, b.new_flows, b.flows()) == (1, 2, 1)


# --- 12. burst units against the rate's kind --------------------------------------------------------

@pytest.mark.parametrize("rate, burst, msg", [
    ("10pps", "64kB", "burst '64kB' is in bytes but rate '10pps' counts packets"),
    ("10pps", "2MiB", "is in bytes but rate '10pps' counts packets"),
    ("10mbit", "10p", "burst '10p' is in packets but rate '10mbit' counts bytes"),
    ("10pps", True, "burst True is not a size"),
    ("10pps", [1], r"burst \[1\] is not a size"),
])
def test_burst_unit_must_fit_the_rate(rate, burst, msg):
    with pytest.raises(FunctionConfigError, match=msg) as e:
        validate_config(RateLimiter, {"classes": [{"name": "a", "rate": rate, "burst": burst}]})
    assert str(e.value).count("config.") == 1  # one message, not one per union member


def test_burst_accepts_floats_and_plain_numbers_for_either_kind():
    from shmfabric.functions.builtin.ratelimit import size_and_kind
    rl = make(RateLimiter, {"classes": [{"name": "a", "rate": "10pps", "burst": 1.5},
                                        {"name": "b", "rate": "1mbit", "burst": 1600.0},
                                        {"name": "c", "rate": "10kpps", "burst": "2k"},
                                        {"name": "d", "rate": "10pps", "burst": "3p"}]})
    assert [cl.burst for cl in rl.classes] == [1.5, 1600.0, 2000.0, 3.0]
    assert size_and_kind("64kB") == (64000.0, "bytes") and size_and_kind(5) == (5.0, None)


def test_ipv6_fragments_with_options_after_the_fragment_header_share_one_key() -> None:
    """A first fragment whose fragmentable part starts with a Destination Options header got the
    protocol found after walking it (UDP), the later fragments the Fragment header's next header
    (60): two keys, so a balancer could send one datagram's fragments two ways."""
    from shmfabric.functions.maglev import fragment_keys
    from shmfabric.net import build as b
    from shmfabric.net.flow import classify_batch

    src, dst = "2001:db8::1", "2001:db8::2"
    seg = b.udp(40000, 53, b"x" * 40, src=src, dst=dst)
    opts = b.ipv6_ext(60)
    first = b.ipv6(seg[:16], src=src, dst=dst, next_header=17, ext=[b.ipv6_fragment(0, True, 7), opts])
    later = b.ipv6(seg[16:], src=src, dst=dst, next_header=60, ext=[b.ipv6_fragment(24, False, 7)])
    frames = [first, later]
    keys = classify_batch(frames, None, "ip")
    assert fragment_keys(frames, keys) == 2
    assert keys[0] == keys[1] and keys[0][2] == 60 and keys[0][3:] == (0, 0)
