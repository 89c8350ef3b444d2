"""The firewall, ids and l4lb plugins on crafted packets, malformed ones included (no processes)."""
from __future__ import annotations

import pytest

from shmfabric.functions.api import FunctionConfigError, FunctionContext, NetworkFunction, Verdict, validate_config
from shmfabric.functions.registry import UnknownFunctionError, available, load
from shmfabric.functions.snort import hyperscan
from shmfabric.net import build

IDS_ENGINES = pytest.mark.parametrize("engine", [
    "pyahocorasick",
    pytest.param("hyperscan", marks=pytest.mark.skipif(hyperscan is None, reason="hyperscan not installed"))])


def make(name: str, cfg: dict, ports: list[str] | None = None, log=None):
    cls = load(name)
    ctx = FunctionContext(node=name, ports=ports or [], log=log or (lambda e, f: None))
    return cls(validate_config(cls, cfg), ctx)


def udp(src: str, dst: str, sport: int, dport: int, payload: bytes = b"x" * 10) -> bytes:
    return build.ipv4(build.udp(sport, dport, payload, src=src, dst=dst), src=src, dst=dst, proto=17)


def tcp(src: str, dst: str, sport: int, dport: int, payload: bytes = b"", flags: str = "S") -> bytes:
    return build.ipv4(build.tcp(sport, dport, payload, flags=flags, src=src, dst=dst), src=src, dst=dst, proto=6)


MALFORMED = [b"", b"\x45", b"\x45\x00\x00\x14" + b"\x00" * 8, b"\x60" + b"\x00" * 10, bytes(range(64))]


def run(fn, frames, now=1.0) -> list[int]:
    out = bytearray(len(frames))
    fn.process(frames, now, out)
    return list(out)


def test_every_builtin_is_registered_and_satisfies_the_protocol():
    for name in ("generator", "sink", "firewall", "ids", "l4lb"):
        cls = load(name)
        assert cls.name == name
        assert hasattr(cls, "Config")
        if name != "generator":
            assert isinstance(make(name, {} if name != "l4lb" else {"backends": [{"node": "a"}]}, ["a"]), NetworkFunction)
    assert set(available()) >= {"firewall", "ids", "l4lb", "ratelimit", "monitor", "compress", "encrypt"}


def test_unknown_function_suggests_a_name():
    with pytest.raises(UnknownFunctionError, match="did you mean 'firewall'"):
        load("firewal")


def test_firewall_rules_and_return_traffic():
    fw = make("firewall", {"rules": "policy drop\nip saddr 10.0.0.0/8 tcp dport 80 accept\n"})
    out = run(fw, [tcp("10.0.0.1", "192.0.2.1", 4000, 80), tcp("192.0.2.1", "10.0.0.1", 80, 4000, flags="SA"),
                   tcp("192.0.2.9", "10.0.0.1", 5555, 80), udp("10.0.0.1", "192.0.2.1", 4000, 80)])
    # allowed; its return traffic (conntrack); not allowed; other protocol
    assert out == [Verdict.NEXT, Verdict.NEXT, Verdict.DROP, Verdict.DROP]
    c = fw.counters()
    assert c["rule1_packets"] == 1 and c["established"] == 1 and c["dropped"] == 2


def test_firewall_malformed_packets_are_dropped_not_raised():
    fw = make("firewall", {"rules": "policy accept"})
    assert run(fw, MALFORMED) == [Verdict.DROP] * len(MALFORMED)
    assert fw.counters()["no_5tuple"] == len(MALFORMED)


def test_firewall_reconfigure_keeps_connections():
    fw = make("firewall", {"rules": "policy drop\nip saddr 10.0.0.0/8 accept"})
    run(fw, [udp("10.0.0.1", "10.9.9.9", 1, 2)])
    fw.reconfigure(validate_config(type(fw), {"rules": "policy drop"}))
    assert run(fw, [udp("10.9.9.9", "10.0.0.1", 2, 1), udp("10.0.0.5", "10.9.9.9", 1, 2)]) == [Verdict.NEXT, Verdict.DROP]


def test_firewall_config_errors_name_the_line():
    with pytest.raises(FunctionConfigError, match=r"config: .*rules:2: .*sadr.*did you mean 'saddr'"):
        validate_config(load("firewall"), {"rules": "policy drop\nip sadr 10.0.0.0/8 accept"})
    with pytest.raises(FunctionConfigError, match=r"config.bogus: Extra inputs are not permitted"):
        validate_config(load("firewall"), {"bogus": 1})


@IDS_ENGINES
def test_ids_alerts_and_drops_by_mode(engine):
    rules = ('alert udp any any -> any 53 (msg:"bad dns"; content:"evil"; nocase; sid:10;)\n'
             'drop tcp any any -> any 80 (msg:"bad web"; content:"|de ad|"; sid:11;)\n')
    logged = []
    ids = make("ids", {"rules": rules, "mode": "drop", "engine": engine}, log=lambda e, f: logged.append((e, f)))
    frames = [udp("10.0.0.1", "10.0.0.2", 999, 53, b"xxEVILxx"), udp("10.0.0.1", "10.0.0.2", 999, 54, b"evil"),
              tcp("10.0.0.1", "10.0.0.2", 999, 80, b"\x01\xde\xad\x02", "PA"), tcp("10.0.0.1", "10.0.0.2", 999, 80, b"ok", "PA"),
              *MALFORMED]
    out = run(ids, frames)
    assert out[:4] == [Verdict.NEXT, Verdict.NEXT, Verdict.DROP, Verdict.NEXT]
    assert out[4:] == [Verdict.NEXT] * len(MALFORMED)  # the IDS is not a firewall: no 5-tuple, no opinion
    assert [f["sid"] for e, f in logged] == [10, 11]
    c = ids.counters()
    assert c["sid10"] == 1 and c["sid11"] == 1 and c["alerts"] == 2 and c["dropped"] == 1
    alert_mode = make("ids", {"rules": rules, "mode": "alert", "engine": engine})
    assert run(alert_mode, frames[:4]) == [Verdict.NEXT] * 4


@IDS_ENGINES
def test_ids_match_does_not_span_two_packets(engine):
    ids = make("ids", {"rules": 'alert udp any any -> any any (msg:"x"; content:"abcd"; sid:1;)', "engine": engine})
    run(ids, [udp("10.0.0.1", "10.0.0.2", 1, 2, b"zzab"), udp("10.0.0.1", "10.0.0.2", 1, 2, b"cdzz")])
    assert ids.counters()["alerts"] == 0


@IDS_ENGINES
def test_ids_batch_equals_per_packet_matching(engine):
    import random

    rnd = random.Random(3)
    pats = ["abc", "needle", "|00 01|", "XyZ"]
    rules = "\n".join(f'alert ip any any -> any any (msg:"p{i}"; content:"{p}";{" nocase;" if i % 2 else ""} sid:{i + 1};)'
                      for i, p in enumerate(pats))
    ids = make("ids", {"rules": rules, "engine": engine})
    assert ids.ids.signatures.engine == engine
    frames = []
    for _ in range(200):
        body = bytes(rnd.choice(b"abcnedlXyZxyz\x00\x01") for _ in range(rnd.randrange(0, 30)))
        frames.append(udp("10.0.0.1", "10.0.0.2", 1, 2, body))
    run(ids, frames)
    batch_hits = ids.counters()
    one = make("ids", {"rules": rules, "engine": engine})
    for f in frames:
        run(one, [f])
    assert one.counters() == batch_hits


def test_l4lb_spreads_flows_and_keeps_them():
    lb = make("l4lb", {"backends": [{"node": "a"}, {"node": "b"}, {"node": "c"}]}, ["a", "b", "c"])
    flows = [udp("10.0.0.1", "10.0.0.2", 1000 + i, 80) for i in range(300)]
    first = run(lb, flows)
    assert set(first) == {Verdict.port(0), Verdict.port(1), Verdict.port(2)}
    assert run(lb, flows, now=2.0) == first  # same flow, same backend
    lb.reconfigure(validate_config(type(lb), {"backends": [{"node": "a"}, {"node": "b", "state": "drain"},
                                                           {"node": "c", "state": "maint"}]}))
    after = run(lb, flows, now=3.0)
    for f, a in zip(first, after):
        if f == Verdict.port(2):
            assert a != Verdict.port(2)  # maint: its flows move
        else:
            assert a == f  # drain keeps its flows; a's stay
    new = run(lb, [udp("10.9.0.1", "10.0.0.2", 1, 80 + i) for i in range(50)], now=4.0)
    assert set(new) == {Verdict.port(0)}  # only 'ready' takes new flows
    assert run(lb, MALFORMED) == [Verdict.DROP] * len(MALFORMED)


def test_l4lb_config_errors():
    with pytest.raises(FunctionConfigError, match="table_size must be a prime"):
        validate_config(load("l4lb"), {"backends": [], "table_size": 1000})
    with pytest.raises(FunctionConfigError, match=r"listed twice"):
        validate_config(load("l4lb"), {"backends": [{"node": "a"}, {"node": "a"}]})


def test_generator_and_sink_verify_each_other():
    gen = make("generator", {"size": 64, "flows": 8, "count": 100})
    frames = []
    now = 0.0
    while gen.next_deadline(now) is not None:
        frames += gen.produce(now, 32)
    assert len(frames) == 100 and all(len(f) == 50 for f in frames)
    sink = make("sink", {})
    broken = bytearray(frames[5])
    broken[-1] ^= 0xFF
    run(sink, frames + [frames[3], bytes(broken)])
    c = sink.counters()
    assert c["unique"] == 100 and c["duplicates"] == 1 and c["corrupt"] == 1 and c["missing"] == 0
