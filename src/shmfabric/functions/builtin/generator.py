"""`generator`: synthesizes flows (sizes, rates, protocol mix) or replays a pcap at a target rate.

Frames are IPv4 packets (the fabric frame's payload). With `stamp` on, each UDP/TCP payload
starts with a stamp (magic, sequence number, CRC-32 of the rest) that the `sink` verifies, so a
chain's losses, duplicates and corruption are counted end to end. The config reference is
docs/functions.md, "`generator`: synthesized flows or a pcap replay".
"""
from __future__ import annotations

import random
import struct
import zlib
from typing import ClassVar, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shmfabric.functions.api import FunctionContext
from shmfabric.net import build
from shmfabric.net.flow import to_address

STAMP = struct.Struct("!4sQI")  # magic, sequence, crc32 of what follows the stamp
MAGIC = b"SFGN"
ETH_HLEN = 14
MIN_SIZE = ETH_HLEN + 20 + 8 + STAMP.size  # Ethernet + IPv4 + UDP + stamp
MIN_TCP_SIZE = ETH_HLEN + 20 + 20 + STAMP.size


class GeneratorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rate: float = Field(0, ge=0, description="frames per second; 0 = as fast as the chain takes them")
    size: int = Field(64, ge=MIN_SIZE, le=65535, description="frame size in bytes, Ethernet header included "
                      "(size - 14 must fit the network's MTU)")
    flows: int = Field(1024, ge=1, le=1_000_000, description="distinct 5-tuples, cycled through")
    tcp_share: float = Field(0.0, ge=0, le=1, description="share of flows that are TCP (the rest UDP)")
    src_net: str = Field("10.1.0.0/16", description="IPv4 prefix the flows' source addresses are drawn from")
    dst_net: str = Field("10.2.0.0/16", description="IPv4 prefix the flows' destination addresses are drawn from")
    dst_ports: list[int] = Field(default_factory=lambda: [80, 443, 53, 8080],
                                 description="destination ports, flow i gets the (i mod length)-th")
    count: int = Field(0, ge=0, description="stop after this many frames; 0 = no limit")
    stamp: bool = Field(True, description="sequence + CRC in each frame, checked by the sink")
    payloads: list[str] = Field(default_factory=list, description="strings placed after the stamp, cycled (e.g. to trip IDS rules)")
    pcap: str | None = Field(None, description="replay this pcap's IP packets instead of synthesizing")
    fill: Literal["zeros", "random", "text"] = Field(
        "zeros", description="the rest of each payload: zeros, random bytes (like encrypted traffic) or ASCII text")
    seed: int = Field(1, description="the same seed gives the same flows, addresses, ports and fill")

    @model_validator(mode="after")
    def _tcp_fits(self) -> "GeneratorConfig":
        if self.tcp_share > 0 and self.size < MIN_TCP_SIZE:
            raise ValueError(f"size {self.size} is too small for TCP flows; use size >= {MIN_TCP_SIZE} or tcp_share 0")
        return self

    @field_validator("dst_ports")
    @classmethod
    def _ports(cls, v: list[int]) -> list[int]:
        if not v or any(not 0 < p < 65536 for p in v):
            raise ValueError("dst_ports must be a non-empty list of ports 1..65535")
        return v


_WORDS = (b"GET POST HTTP/1.1 Host: Accept: text/html application/json User-Agent: Mozilla/5.0 "
          b"Content-Length: Cookie: session= id= user name value the of and to in is for on with").split()


def _fill(kind: str, n: int, rnd: random.Random) -> bytes:
    """n bytes of payload filler of the given kind."""
    if kind == "random":
        return rnd.randbytes(n)
    if kind == "text":
        out = bytearray()
        while len(out) < n:
            out += rnd.choice(_WORDS) + b" "
        return bytes(out[:n])
    return bytes(n)


def _hosts(net: str, n: int, rnd: random.Random) -> list[int]:
    import ipaddress

    nw = ipaddress.ip_network(net, strict=False)
    if nw.version != 4:
        raise ValueError(f"{net}: the generator synthesizes IPv4 flows; give an IPv4 prefix")
    base, size = int(nw.network_address), max(nw.num_addresses - 2, 1)
    return [base + 1 + rnd.randrange(size) for _ in range(n)]


def read_pcap(path: str) -> list[bytes]:
    """IP packets of a pcap file (Ethernet or raw-IP link types)."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 24:
        raise ValueError(f"{path}: not a pcap file (too short)")
    magic = data[:4]
    endian = {b"\xd4\xc3\xb2\xa1": "<", b"\xa1\xb2\xc3\xd4": ">", b"\x4d\x3c\xb2\xa1": "<", b"\xa1\xb2\x3c\x4d": ">"}.get(magic)
    if endian is None:
        raise ValueError(f"{path}: not a pcap file (magic {magic.hex()}); pcapng is not supported, convert with editcap -F pcap")
    linktype = struct.unpack_from(endian + "I", data, 20)[0]
    out, off = [], 24
    while off + 16 <= len(data):
        incl = struct.unpack_from(endian + "I", data, off + 8)[0]
        pkt = data[off + 16: off + 16 + incl]
        off += 16 + incl
        if linktype == 1 and len(pkt) >= ETH_HLEN:
            if pkt[12:14] in (b"\x08\x00", b"\x86\xdd"):
                out.append(pkt[ETH_HLEN:])
        elif linktype in (101, 228, 229):
            out.append(pkt)
    if not out:
        raise ValueError(f"{path}: no IP packets found (link type {linktype})")
    return out


class Generator:
    """Source function: produce() returns the frames due now."""

    name: ClassVar[str] = "generator"
    version: ClassVar[str] = "1"
    Config = GeneratorConfig

    def __init__(self, config: GeneratorConfig, ctx: FunctionContext | None = None):
        self.cfg = config
        self._build()
        self.seq = 0
        self.sent = 0
        self._base = 0  # `sent` when pacing (t0) last restarted
        self.t0: float | None = None

    def _build(self) -> None:
        c = self.cfg
        rnd = random.Random(c.seed)
        # what the runtime sends the frames as: synthesized flows are IPv4; a pcap may mix
        # versions, so the runtime checks each frame (None)
        self.ethertype: int | None = None if c.pcap else 0x0800
        if c.pcap:
            self.templates = [bytes(p) for p in read_pcap(c.pcap)]
            self.stamp_at: list[int | None] = [None] * len(self.templates)
            return
        srcs, dsts = _hosts(c.src_net, c.flows, rnd), _hosts(c.dst_net, c.flows, rnd)
        fill_rnd = random.Random(c.seed + 1)  # its own stream: the flows stay the same whatever the fill
        ip_len = c.size - ETH_HLEN
        self.templates, self.stamp_at = [], []
        for i in range(c.flows):
            tcp = rnd.random() < c.tcp_share
            l4h = 20 if tcp else 8
            body_len = ip_len - 20 - l4h
            extra = c.payloads[i % len(c.payloads)].encode() if c.payloads else b""
            body = (bytes(STAMP.size) if c.stamp else b"") + extra
            body = (body + _fill(c.fill, max(0, body_len - len(body)), fill_rnd))[:body_len]
            sport, dport = 1024 + rnd.randrange(60000), c.dst_ports[i % len(c.dst_ports)]
            src, dst = to_address(srcs[i]), to_address(dsts[i])
            seg = build.tcp(sport, dport, body, flags="PA", src=src, dst=dst) if tcp else build.udp(sport, dport, body, src=src, dst=dst)
            self.templates.append(build.ipv4(seg, src=src, dst=dst, proto=6 if tcp else 17))
            self.stamp_at.append(20 + l4h if c.stamp else None)

    def reconfigure(self, config: GeneratorConfig) -> None:
        self.cfg = config
        self._build()
        # the new rate counts from now: `sent` stays the total (counters, `count`), pacing restarts
        # from it (with t0 alone reset, `due` stayed negative for sent/rate seconds: a stall)
        self.t0 = None
        self._base = self.sent

    def _frame(self, i: int) -> bytes:
        t = self.templates[i % len(self.templates)]
        at = self.stamp_at[i % len(self.templates)]
        if at is None:
            return t
        seq = self.seq
        self.seq += 1
        rest = t[at + STAMP.size:]
        # the L4 checksum is not updated: functions along the chain do not verify it, and
        # the stamp's own CRC is what the sink checks
        return t[:at] + STAMP.pack(MAGIC, seq, zlib.crc32(struct.pack("!Q", seq) + rest)) + rest

    def produce(self, now: float, max_frames: int) -> Sequence[bytes]:
        c = self.cfg
        if self.t0 is None:
            self.t0 = now
        n = max_frames
        if c.rate:
            due = int((now - self.t0) * c.rate) - (self.sent - self._base)
            n = max(0, min(n, due))
        if c.count:
            n = min(n, c.count - self.sent)
        if n <= 0:
            return ()
        start = self.sent
        self.sent += n
        if self.stamp_at[0] is None and not c.stamp:
            t, k = self.templates, len(self.templates)
            return [t[(start + j) % k] for j in range(n)]
        return [self._frame(start + j) for j in range(n)]

    def next_deadline(self, now: float) -> float | None:
        c = self.cfg
        if c.count and self.sent >= c.count:
            return None
        if not c.rate or self.t0 is None:
            return now
        # wake once per millisecond's worth of frames, not per frame: a paced source then costs
        # little CPU and sends small batches instead of single frames
        burst = max(1, int(c.rate / 1000))
        return self.t0 + (self.sent - self._base + burst) / c.rate

    def counters(self) -> dict[str, int]:
        return {"generated": self.sent, "flows": len(self.templates)}
