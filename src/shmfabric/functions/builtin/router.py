"""`router`: sends each IP packet to the port whose prefix holds its destination address.

The last step of a chain that unmodified programs' traffic crosses: TAP adapters started with
`--via NODE` hand their frames to NODE (a firewall, an IDS, ...) instead of to the destination
adapter, and the chain ends here, where the destination address picks the adapter to deliver to
(`ports:` in the topology, or `--port` of the runtime). Longest prefix wins (IPv4 and IPv6); a
packet no prefix holds goes to `default` (a port) or is dropped and counted. The config
reference is docs/functions.md, "`router`".
"""
from __future__ import annotations

import ipaddress
import struct
from typing import Any, ClassVar, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shmfabric.functions.api import FunctionContext, Verdict


# the destination address, read from any buffer (a fabric frame takes no slices)
_V4DST = struct.Struct("!16x4s").unpack_from
_V6DST = struct.Struct("!24x16s").unpack_from


class RouterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    routes: dict[str, str] = Field(default_factory=dict,
                                   description="prefix (10.77.0.2/32, fd00::/64) -> the port node it goes to")
    default: str | None = Field(None, description="the port for packets no prefix holds (none: drop them)")

    @field_validator("routes")
    @classmethod
    def _prefixes(cls, routes: dict[str, str]) -> dict[str, str]:
        for prefix in routes:
            try:
                ipaddress.ip_network(prefix, strict=True)
            except ValueError as exc:
                raise ValueError(f"route {prefix!r} is not a network prefix ({exc}); e.g. 10.77.0.0/24 or "
                                 "10.77.0.2/32") from None
        return routes


class Router:
    name: ClassVar[str] = "router"
    version: ClassVar[str] = "1"
    Config = RouterConfig

    def __init__(self, config: RouterConfig, ctx: FunctionContext | None = None):
        self.ctx = ctx or FunctionContext()
        self.c = {"routed": 0, "no_route": 0, "multicast": 0, "not_ip": 0}
        self._set(config)

    def _set(self, config: RouterConfig) -> None:
        ports = self.ctx.ports
        wanted = set(config.routes.values()) | ({config.default} if config.default else set())
        missing = sorted(n for n in wanted if n not in ports)
        if missing:
            raise ValueError(f"routes go to {missing}, which are not ports of this node (ports: {ports})")
        verdict = {name: Verdict.port(k) for k, name in enumerate(ports)}
        # By version, most specific first: a lookup tries each prefix length present, longest first
        # (a dict per length: one hash per length instead of a scan of every route).
        tables: dict[int, dict[int, dict[int, int]]] = {4: {}, 6: {}}
        for prefix, port in config.routes.items():
            net = ipaddress.ip_network(prefix)
            tables[net.version].setdefault(net.prefixlen, {})[int(net.network_address)] = verdict[port]
        self._tables = {v: sorted(t.items(), reverse=True) for v, t in tables.items()}
        self._default = verdict[config.default] if config.default else Verdict.DROP
        self._cache: dict[bytes, int] = {}  # destination address -> verdict

    def reconfigure(self, config: RouterConfig) -> None:
        self._set(config)  # ValueError (nothing changed) if a route names a node that is not a port

    def lookup(self, dst: bytes) -> int:
        """The verdict for destination address `dst` (4 or 16 bytes)."""
        verdict = self._cache.get(dst)
        if verdict is not None:
            return verdict
        bits = 32 if len(dst) == 4 else 128
        addr = int.from_bytes(dst, "big")
        verdict = self._default
        for length, table in self._tables[4 if bits == 32 else 6]:
            hit = table.get(addr >> (bits - length) << (bits - length) if length else 0)
            if hit is not None:
                verdict = hit
                break
        if len(self._cache) < 65536:
            self._cache[dst] = verdict
        return verdict

    def process(self, frames: Sequence[Any], now: float, out: bytearray) -> None:
        c = self.c
        lookup = self.lookup
        for i, f in enumerate(frames):
            n = len(f)
            version = f[0] >> 4 if n else 0
            if version == 4 and n >= 20:
                dst = _V4DST(f)[0]
                group = dst[0] >= 224  # multicast (and 255.255.255.255)
            elif version == 6 and n >= 40:
                dst = _V6DST(f)[0]
                group = dst[0] == 0xFF
            else:
                c["not_ip"] += 1  # ARP and the like, flooded to every node of the fabric
                out[i] = Verdict.DROP
                continue
            if group:  # flooded to every node already: a router does not forward it
                c["multicast"] += 1
                out[i] = Verdict.DROP
                continue
            verdict = lookup(dst)
            out[i] = verdict
            if verdict == Verdict.DROP:
                c["no_route"] += 1
            else:
                c["routed"] += 1

    def counters(self) -> dict[str, int]:
        return dict(self.c)
