"""`router`: the destination address picks the port (pure: no fabric)."""
from __future__ import annotations

import ipaddress
import struct

import pytest
from pydantic import ValidationError

from shmfabric.functions.api import FunctionContext, Verdict
from shmfabric.functions.builtin.router import Router, RouterConfig

PORTS = ["a", "b", "c"]


def v4(dst: str) -> bytes:
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20, 0, 0, 64, 17, 0, bytes(4), ipaddress.IPv4Address(dst).packed)


def v6(dst: str) -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, 0, 17, 64, bytes(16), ipaddress.IPv6Address(dst).packed)


def route(config: dict, frames: list[bytes]) -> tuple[list[int], dict]:
    r = Router(RouterConfig(**config), FunctionContext(ports=PORTS))
    out = bytearray(len(frames))
    r.process(frames, 0.0, out)
    return list(out), r.counters()


def test_the_longest_prefix_wins_in_ipv4_and_ipv6() -> None:
    cfg = {"routes": {"10.0.0.0/8": "a", "10.1.0.0/16": "b", "10.1.2.3/32": "c", "fd00::/8": "a",
                      "fd00:1::/32": "b", "0.0.0.0/0": "c"}}
    out, c = route(cfg, [v4("10.9.9.9"), v4("10.1.9.9"), v4("10.1.2.3"), v4("192.0.2.1"), v6("fd00::1"),
                         v6("fd00:1::1"), v6("2001:db8::1")])
    assert out == [Verdict.port(0), Verdict.port(1), Verdict.port(2), Verdict.port(2), Verdict.port(0),
                   Verdict.port(1), Verdict.DROP]
    assert c == {"routed": 6, "no_route": 1, "multicast": 0, "not_ip": 0}


def test_default_multicast_and_what_is_not_ip() -> None:
    out, c = route({"routes": {"10.0.0.0/24": "a"}, "default": "b"},
                   [v4("10.0.0.7"), v4("172.16.0.1"), v4("239.1.1.1"), v6("ff02::1"), b"\x00" * 28, b""])
    assert out == [Verdict.port(0), Verdict.port(1), Verdict.DROP, Verdict.DROP, Verdict.DROP, Verdict.DROP]
    assert c == {"routed": 2, "no_route": 0, "multicast": 2, "not_ip": 2}


def test_frames_as_memoryviews_and_repeated_destinations() -> None:
    r = Router(RouterConfig(routes={"10.0.0.2/32": "b"}), FunctionContext(ports=PORTS))
    frames = [memoryview(v4("10.0.0.2"))] * 5 + [memoryview(v4("10.0.0.3"))]
    out = bytearray(6)
    r.process(frames, 0.0, out)
    assert list(out) == [Verdict.port(1)] * 5 + [Verdict.DROP]


def test_config_errors_say_what_and_how() -> None:
    with pytest.raises(ValidationError, match="'10.0.0.1/24' is not a network prefix"):
        RouterConfig(routes={"10.0.0.1/24": "a"})
    with pytest.raises(ValueError, match=r"routes go to \['z'\], which are not ports of this node"):
        Router(RouterConfig(routes={"10.0.0.0/24": "z"}), FunctionContext(ports=PORTS))
    with pytest.raises(ValidationError):
        RouterConfig(routes={}, gateway="a")  # unknown field


def test_reconfigure_changes_routes_and_a_bad_one_changes_nothing() -> None:
    r = Router(RouterConfig(routes={"10.0.0.0/24": "a"}), FunctionContext(ports=PORTS))
    assert r.lookup(ipaddress.IPv4Address("10.0.0.1").packed) == Verdict.port(0)
    r.reconfigure(RouterConfig(routes={"10.0.0.0/24": "b"}))
    assert r.lookup(ipaddress.IPv4Address("10.0.0.1").packed) == Verdict.port(1)  # (the cache went too)
    with pytest.raises(ValueError):
        r.reconfigure(RouterConfig(routes={"10.0.0.0/24": "nope"}))
    assert r.lookup(ipaddress.IPv4Address("10.0.0.1").packed) == Verdict.port(1)
