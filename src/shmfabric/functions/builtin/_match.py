"""A small header match shared by `ratelimit` classes and the `monitor` capture filter.

    {"src": "10.0.0.0/8", "dst": ["192.0.2.0/24", "fd00::/64"], "proto": "tcp", "dport": [80, "8000-8080"]}

Every field is optional; all given fields must match (an empty match matches every packet with
a 5-tuple). Prefixes and ports are compiled once into ints so a match costs a few comparisons.
"""
from __future__ import annotations

import ipaddress
from typing import Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shmfabric.functions.rules import PORT_PROTOS
from shmfabric.net.flow import FiveTuple, to_proto

PortSpec = Union[int, str]


def _as_list(v: object) -> list:
    return v if isinstance(v, list) else [v]


def _prefixes(v: object, what: str) -> list[str]:
    out = []
    for item in _as_list(v):
        try:
            net = ipaddress.ip_network(str(item), strict=False)
        except ValueError:
            raise ValueError(f"{what} {item!r} is not an address or prefix (e.g. 10.0.0.0/8, fd00::/64)") from None
        host = ipaddress.ip_interface(str(item)).ip
        if host != net.network_address:
            # host bits set (10.0.0.1/8): most likely a typo for the host (/32) or the network, and
            # silently widening it would match traffic nobody asked for (router refuses it too)
            raise ValueError(f"{what} {str(item)!r} has host bits set; use {net}, or {host}/{net.max_prefixlen} "
                             "for one host")
        out.append(str(net))
    return out


def _ports(v: object, what: str) -> list[tuple[int, int]]:
    out = []
    for item in _as_list(v):
        text = str(item).strip()
        lo, sep, hi = text.partition("-")
        try:
            a, b = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise ValueError(f"{what} {item!r} is not a port or range (e.g. 80, \"8000-8080\")") from None
        if not (0 <= a <= b <= 65535):
            raise ValueError(f"{what} {item!r} is out of range (ports are 0..65535, low-high with low <= high)")
        out.append((a, b))
    return out


class Match(BaseModel):
    """Header fields a packet must have (all given ones)."""

    model_config = ConfigDict(extra="forbid")

    src: list[str] | None = Field(None, description="source prefixes (one or a list)")
    dst: list[str] | None = Field(None, description="destination prefixes (one or a list)")
    proto: list[int] | None = Field(None, description="protocol names or numbers (tcp, udp, icmp, 6, ...)")
    sport: list[tuple[int, int]] | None = Field(None, description="source ports or ranges")
    dport: list[tuple[int, int]] | None = Field(None, description="destination ports or ranges")

    @field_validator("src", "dst", mode="before")
    @classmethod
    def _nets(cls, v: object, info) -> list[str] | None:  # type: ignore[no-untyped-def]
        return None if v is None else _prefixes(v, info.field_name)

    @field_validator("proto", mode="before")
    @classmethod
    def _protos(cls, v: object) -> list[int] | None:
        if v is None:
            return None
        try:
            return [to_proto(p if isinstance(p, int) else str(p)) for p in _as_list(v)]
        except ValueError as e:
            raise ValueError(str(e)) from None

    @field_validator("sport", "dport", mode="before")
    @classmethod
    def _port_ranges(cls, v: object, info) -> list[tuple[int, int]] | None:  # type: ignore[no-untyped-def]
        return None if v is None else _ports(v, info.field_name)

    def compile(self) -> "CompiledMatch":
        return CompiledMatch(self)


def _compile_nets(nets: list[str] | None) -> tuple[tuple[bool, int, int], ...] | None:
    if nets is None:
        return None
    out = []
    for text in nets:
        n = ipaddress.ip_network(text)
        out.append((n.version == 4, int(n.network_address), int(n.netmask)))
    return tuple(out)


class CompiledMatch:
    """`Match` as ints; `matches(key)` takes a 5-tuple from `shmfabric.net.flow`."""

    __slots__ = ("src", "dst", "proto", "sport", "dport", "any")

    def __init__(self, m: Match) -> None:
        self.src = _compile_nets(m.src)
        self.dst = _compile_nets(m.dst)
        self.proto = frozenset(m.proto) if m.proto is not None else None
        self.sport = tuple(m.sport) if m.sport is not None else None
        self.dport = tuple(m.dport) if m.dport is not None else None
        self.any = all(x is None for x in (self.src, self.dst, self.proto, self.sport, self.dport))

    @staticmethod
    def _net_hit(nets: tuple[tuple[bool, int, int], ...], addr: int | bytes) -> bool:
        v4 = addr.__class__ is int
        a = addr if v4 else int.from_bytes(addr, "big")  # type: ignore[arg-type]
        for is4, net, mask in nets:
            if is4 == v4 and a & mask == net:
                return True
        return False

    def matches(self, key: FiveTuple) -> bool:
        if self.any:
            return True
        src, dst, proto, sport, dport = key
        if self.proto is not None and proto not in self.proto:
            return False
        if self.src is not None and not self._net_hit(self.src, src):
            return False
        if self.dst is not None and not self._net_hit(self.dst, dst):
            return False
        if (self.sport is not None or self.dport is not None) and proto not in PORT_PROTOS:
            return False  # ICMP & co. have no ports (their 5-tuple carries 0): a port condition fails
        if self.sport is not None and not any(lo <= sport <= hi for lo, hi in self.sport):
            return False
        if self.dport is not None and not any(lo <= dport <= hi for lo, hi in self.dport):
            return False
        return True
