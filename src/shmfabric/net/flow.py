"""5-tuples: the batch fast path, `FlowKey`, and stable (cross-process) flow hashes.

A 5-tuple is a plain tuple `(src, dst, proto, sport, dport)`: IPv4 addresses as `int`, IPv6 as
16-byte `bytes` (see `shmfabric.net.ip`). Plain tuples because they are the cheapest thing
CPython can build, hash and use as a dict key; `FlowKey` is a NamedTuple over the same five
fields, so a `FlowKey` and the plain tuple from the fast path are equal and hash alike.

Fast path. `parse_5tuple()` reads Ethernet, IPv4 and the L4 ports in one `struct.unpack_from` at
fixed offsets; only when the frame is exactly "untagged IPv4 without options,
unfragmented or first fragment, TCP or UDP with sane lengths" does it return from there (a UDP
length covers the whole datagram, so in a first fragment, MF set, it may exceed the bytes
present). Everything else (VLAN,
IPv6, options, non-first fragments, ICMP, anything malformed) goes to `decode()`, so the fast path can
never disagree with the full parser: it only skips work when it can prove the answer.
A second tier does the same for one VLAN tag and for IPv6 with TCP/UDP right after the fixed
header. Measured numbers are in docs/net.md and `python -m shmfabric.bench.net_parse`.

Why not a library: dpkt 1.9.8 takes 9.0 us per IPv4/TCP frame here to build its objects and read
the 5-tuple, against 0.38 us for `classify_batch` and 2.3 us for our full `decode()` (measured on
this machine, CPython 3.11, batch of 256 64-byte frames); scapy is slower still. A per-packet
view that allocates a Python object per layer cannot meet the budget, hence struct offsets.
"""
from __future__ import annotations

import ipaddress
from struct import Struct
from typing import Iterable, NamedTuple, Union
from zlib import crc32

from .errors import Reason, ReasonCounter
from .l4 import ICMP_IDENTIFIED, ICMPV6_IDENTIFIED
from .packet import LINK_ETHERNET, LINK_IP, PORT_PROTOCOLS, decode

Buffer = Union[bytes, bytearray, memoryview]
Address = Union[int, bytes]
FiveTuple = tuple  # (src, dst, proto, sport, dport)

# One unpack reads everything the common case needs, at fixed offsets (IHL = 5):
#   Ethernet type | IPv4 version/IHL, (tos), total length, (ident), flags/fragment, (ttl), proto,
#   (csum), src, dst | ports, UDP length (= TCP seq high half), TCP data-offset byte.
# 47 bytes from the Ethernet header, 33 from the IP header. A shorter buffer (UDP with under 5
# payload bytes) takes the slow path. One unpack_from with 11 fields
# costs ~130 ns here; two calls cost ~60 ns more than one.
_ETH_FAST = Struct("!12xHBxH2xHxB2xIIHHH6xB").unpack_from
_IP_FAST = Struct("!BxH2xHxB2xIIHHH6xB").unpack_from
_IP_FAST_FLAGS = Struct("!BxH2xHxB2xIIHHH6xBB").unpack_from  # + the TCP flags byte


# Second tier, for what the one-unpack path does not take: one VLAN tag, IPv6 with TCP/UDP right
# after the fixed header, IPv4 behind a tag. Same rule: return only what the views would accept.
_H2 = Struct("!H2xH").unpack_from       # ethertype (or TPID), then the type after one tag
_V6_FAST = Struct("!IHB17x16sHHH6xB").unpack_from  # ver/tc/fl, plen, nh, (hlim, src), dst, ports...
_V6_SRC = Struct("!8x16s").unpack_from


def _fast_v4(buf: Buffer, base: int) -> FiveTuple | None:
    if len(buf) - base < 33:  # checked, not caught: an exception costs ~1 us
        return None
    vihl, tlen, ff, proto, src, dst, sport, dport, ulen, off = _IP_FAST(buf, base)
    if vihl == 0x45 and not ff & 0x1FFF and 20 <= tlen <= len(buf) - base:
        if proto == 6:
            if tlen >= 40 and off >= 0x50 and (off >> 4) * 4 <= tlen - 20:
                return (src, dst, 6, sport, dport)
        elif proto == 17:
            if 8 <= ulen <= tlen - 20 or (ff & 0x2000 and ulen >= 8 and tlen >= 28):
                return (src, dst, 17, sport, dport)
    return None


def _fast_v6(buf: Buffer, base: int) -> FiveTuple | None:
    if len(buf) - base < 53:
        return None
    vtf, plen, nh, dst, sport, dport, ulen, off = _V6_FAST(buf, base)
    if vtf >> 28 == 6 and plen <= len(buf) - base - 40:
        if nh == 6:
            if plen >= 20 and off >= 0x50 and (off >> 4) * 4 <= plen:
                return (_V6_SRC(buf, base)[0], dst, 6, sport, dport)
        elif nh == 17:
            if 8 <= ulen <= plen:
                return (_V6_SRC(buf, base)[0], dst, 17, sport, dport)
    return None


def _slow(buf: Buffer, offset: int = 0, link: str = LINK_ETHERNET) -> FiveTuple | Reason:
    if offset == 0 and len(buf) >= 18:
        if link == LINK_ETHERNET:
            et, inner = _H2(buf, 12)
            base = 14
            if et == 0x8100:
                et, base = inner, 18
            if et == 0x0800:
                r = _fast_v4(buf, base)
            elif et == 0x86DD:
                r = _fast_v6(buf, base)
            else:
                r = None
            if r is not None:
                return r
        elif link == LINK_IP and buf[0] >> 4 == 6:
            r = _fast_v6(buf, 0)
            if r is not None:
                return r
    return decode(buf, offset, link).five_tuple()


def parse_5tuple(buf: Buffer) -> FiveTuple | Reason:
    """The 5-tuple of an Ethernet frame, or the `Reason` it has none (never raises for bad input).

    Test with `type(r) is tuple`; a `Reason` is an int (IntEnum)."""
    n = len(buf)
    if n < 47:  # a length test, not `except struct.error`: that exception costs ~2 us to build
        return _slow(buf)
    et, vihl, tlen, ff, proto, src, dst, sport, dport, ulen, off = _ETH_FAST(buf, 0)
    # The conditions mirror the checks of the IPv4, TCP and UDP views exactly.
    if et == 0x0800 and vihl == 0x45 and not ff & 0x1FFF and 20 <= tlen <= n - 14:
        if proto == 6:
            if tlen >= 40 and off >= 0x50 and (off >> 4) * 4 <= tlen - 20:
                return (src, dst, 6, sport, dport)
        elif proto == 17:
            if 8 <= ulen <= tlen - 20 or (ff & 0x2000 and ulen >= 8 and tlen >= 28):
                return (src, dst, 17, sport, dport)
    return _slow(buf)


def parse_5tuple_ip(buf: Buffer) -> FiveTuple | Reason:
    """Like `parse_5tuple` for a buffer that starts with the IP header (no Ethernet header)."""
    n = len(buf)
    if n < 33:
        return _slow(buf, 0, LINK_IP)
    vihl, tlen, ff, proto, src, dst, sport, dport, ulen, off = _IP_FAST(buf, 0)
    if vihl == 0x45 and not ff & 0x1FFF and 20 <= tlen <= n:
        if proto == 6:
            if tlen >= 40 and off >= 0x50 and (off >> 4) * 4 <= tlen - 20:
                return (src, dst, 6, sport, dport)
        elif proto == 17:
            if 8 <= ulen <= tlen - 20 or (ff & 0x2000 and ulen >= 8 and tlen >= 28):
                return (src, dst, 17, sport, dport)
    return _slow(buf, 0, LINK_IP)


def classify_batch(
    bufs: Iterable[Buffer], counter: ReasonCounter | None = None, link: str = LINK_ETHERNET,
    flags: list[int] | None = None,
) -> list[FiveTuple | Reason]:
    """5-tuples for a batch: one entry per buffer, a tuple or the `Reason` there is none.

    With `counter`, every non-tuple result is counted there. With `flags` (a list), the TCP flags
    of each frame (0 if not TCP) are appended to it, for connection tracking. The loop inlines
    the fast path of `parse_5tuple`, because a Python call costs ~50 ns, a sizeable share.
    """
    if link == LINK_IP and getattr(bufs, "gather", None) is not None:
        out = _classify_ip_gathered(bufs, flags)  # a fabric FrameBatch
    elif flags is not None:
        out = _classify_with_flags(bufs, link, flags)
    elif link == LINK_IP:
        out = [parse_5tuple_ip(b) for b in bufs]
    elif link != LINK_ETHERNET:
        raise ValueError(f"link must be {LINK_ETHERNET!r} or {LINK_IP!r}, got {link!r}")
    else:
        out = []
        append = out.append
        unpack = _ETH_FAST
        for buf in bufs:
            n = len(buf)
            if n < 47:
                append(_slow(buf))
                continue
            et, vihl, tlen, ff, proto, src, dst, sport, dport, ulen, off = unpack(buf, 0)
            if et == 0x0800 and vihl == 0x45 and not ff & 0x1FFF and 20 <= tlen <= n - 14:
                if proto == 6:
                    if tlen >= 40 and off >= 0x50 and (off >> 4) * 4 <= tlen - 20:
                        append((src, dst, 6, sport, dport))
                        continue
                elif proto == 17:
                    if 8 <= ulen <= tlen - 20 or (ff & 0x2000 and ulen >= 8 and tlen >= 28):
                        append((src, dst, 17, sport, dport))
                        continue
            append(_slow(buf))
    if counter is not None:
        for r in out:
            if r.__class__ is not tuple:
                counter.add(r)
    return out


def tcp_flags(buf: Buffer, link: str = LINK_ETHERNET) -> int:
    """The TCP flags (9 bits, NS included) of a frame, or 0 if it is not a well-formed TCP segment.

    For connection tracking, which needs SYN/FIN/RST beside the 5-tuple. Untagged IPv4 without
    options is read at a fixed offset; anything else goes through `decode()`."""
    if link == LINK_ETHERNET:
        if len(buf) >= 48 and buf[12] == 0x08 and buf[13] == 0x00 and buf[14] == 0x45 and buf[23] == 6:
            if parse_5tuple(buf).__class__ is tuple:  # validates lengths as the views do
                return ((buf[46] & 1) << 8) | buf[47]
            return 0
    elif link == LINK_IP:
        if len(buf) >= 34 and buf[0] == 0x45 and buf[9] == 6:
            if parse_5tuple_ip(buf).__class__ is tuple:
                return ((buf[32] & 1) << 8) | buf[33]
            return 0
    p = decode(buf, 0, link)
    l4 = p.l4
    if p.reason is None and l4 is not None and l4.__class__.__name__ == "TCP":
        return l4.flags  # type: ignore[union-attr]
    return 0


def _classify_with_flags(bufs: Iterable[Buffer], link: str, flags: list[int]) -> list[FiveTuple | Reason]:
    # The loop of classify_batch again, plus the flags byte (offset 47; NS is bit 0 of byte 46).
    # Kept separate so the plain loop pays nothing for it.
    if link != LINK_ETHERNET:
        if link != LINK_IP:
            raise ValueError(f"link must be {LINK_ETHERNET!r} or {LINK_IP!r}, got {link!r}")
        # the fast path of parse_5tuple_ip inlined, reading the flags byte (33) in the same unpack
        out = []
        append, fappend = out.append, flags.append
        unpack = _IP_FAST_FLAGS
        for b in bufs:
            n = len(b)
            if n >= 34:
                vihl, tlen, ff, proto, src, dst, sport, dport, ulen, off, fl = unpack(b, 0)
                if vihl == 0x45 and not ff & 0x1FFF and 20 <= tlen <= n:
                    if proto == 17:
                        if 8 <= ulen <= tlen - 20 or (ff & 0x2000 and ulen >= 8 and tlen >= 28):
                            append((src, dst, 17, sport, dport))
                            fappend(0)
                            continue
                    elif proto == 6:
                        if tlen >= 40 and off >= 0x50 and (off >> 4) * 4 <= tlen - 20:
                            append((src, dst, 6, sport, dport))
                            fappend(((off & 1) << 8) | fl)
                            continue
            r = parse_5tuple_ip(b)
            append(r)
            fappend(tcp_flags(b, LINK_IP) if r.__class__ is tuple and r[2] == 6 else 0)
        return out
    out = []
    append, fappend = out.append, flags.append
    unpack = _ETH_FAST
    for buf in bufs:
        n = len(buf)
        if n >= 48:
            et, vihl, tlen, ff, proto, src, dst, sport, dport, ulen, off = unpack(buf, 0)
            if et == 0x0800 and vihl == 0x45 and not ff & 0x1FFF and 20 <= tlen <= n - 14:
                if proto == 6:
                    if tlen >= 40 and off >= 0x50 and (off >> 4) * 4 <= tlen - 20:
                        append((src, dst, 6, sport, dport))
                        fappend(((off & 1) << 8) | buf[47])
                        continue
                elif proto == 17:
                    if 8 <= ulen <= tlen - 20 or (ff & 0x2000 and ulen >= 8 and tlen >= 28):
                        append((src, dst, 17, sport, dport))
                        fappend(0)
                        continue
        r = _slow(buf)
        append(r)
        fappend(tcp_flags(buf) if r.__class__ is tuple and r[2] == 6 else 0)
    return out


# A gathered record (FrameBatch.gather(34)): the payload length, then what _IP_FAST_FLAGS reads.
_GATHERED_IP = Struct("!IBxH2xHxB2xIIHHH6xBB")


def _classify_ip_gathered(batch, flags: list[int] | None) -> list[FiveTuple | Reason]:
    # The fast path of parse_5tuple_ip over one gathered copy of the batch's headers: no per-frame
    # buffer acquisition or unpack call. Bytes past a short frame's end are zero padding, but the
    # fast path's own conditions (tlen <= n, then the UDP/TCP lengths) only accept a record whose
    # bytes read are all real; anything else is left as None and parsed from the frame itself.
    out: list = []
    if flags is None:  # the same loop without the flags
        append = out.append
        for n, vihl, tlen, ff, proto, src, dst, sport, dport, ulen, off, _ in _GATHERED_IP.iter_unpack(batch.gather(34)):
            if vihl == 0x45 and not ff & 0x1FFF and 20 <= tlen <= n:
                if proto == 17:
                    if 8 <= ulen <= tlen - 20 or (ff & 0x2000 and ulen >= 8 and tlen >= 28):
                        append((src, dst, 17, sport, dport))
                        continue
                elif proto == 6:
                    if tlen >= 40 and off >= 0x50 and (off >> 4) * 4 <= tlen - 20:
                        append((src, dst, 6, sport, dport))
                        continue
            append(None)
        if None in out:
            for i, r in enumerate(out):
                if r is None:
                    out[i] = parse_5tuple_ip(batch[i])
        return out
    fl: list[int] = []
    append, fappend = out.append, fl.append
    for n, vihl, tlen, ff, proto, src, dst, sport, dport, ulen, off, tf in _GATHERED_IP.iter_unpack(batch.gather(34)):
        if vihl == 0x45 and not ff & 0x1FFF and 20 <= tlen <= n:
            if proto == 17:
                if 8 <= ulen <= tlen - 20 or (ff & 0x2000 and ulen >= 8 and tlen >= 28):
                    append((src, dst, 17, sport, dport))
                    fappend(0)
                    continue
            elif proto == 6:
                if tlen >= 40 and off >= 0x50 and (off >> 4) * 4 <= tlen - 20:
                    append((src, dst, 6, sport, dport))
                    fappend(((off & 1) << 8) | tf)
                    continue
        append(None)
        fappend(0)
    if None in out:
        for i, r in enumerate(out):
            if r is None:
                buf = batch[i]
                r = out[i] = parse_5tuple_ip(buf)
                if r.__class__ is tuple and r[2] == 6:
                    fl[i] = tcp_flags(buf, LINK_IP)
    flags.extend(fl)
    return out


def l4_payload_span(buf: Buffer, link: str = LINK_ETHERNET) -> tuple[int, int] | None:
    """(start, end) of the L4 payload (after the TCP/UDP/ICMP header), or None when the frame has
    no well-formed L4 header. `end` honours the IP length (padding excluded) and the UDP length;
    IPv6 extension headers are walked. Slice it without copying: `memoryview(buf)[start:end]`.

    For an IDS, which needs the payload beside the 5-tuple. Untagged IPv4 without options is
    read at fixed offsets; everything else goes through `decode()`."""
    base = 14 if link == LINK_ETHERNET else 0
    n = len(buf)
    if n >= base + 34 and buf[base] == 0x45 and (link != LINK_ETHERNET or (buf[12] == 8 and buf[13] == 0)):
        tlen = (buf[base + 2] << 8) | buf[base + 3]
        ff = ((buf[base + 6] & 0x1F) << 8) | buf[base + 7]
        proto = buf[base + 9]
        if 20 <= tlen <= n - base and not ff:  # unfragmented or first fragment: has the L4 header
            l4 = base + 20
            end = base + tlen
            if proto == 6 and tlen >= 40:
                hl = (buf[l4 + 12] >> 4) * 4
                if hl >= 20 and l4 + hl <= end:
                    return (l4 + hl, end)
            elif proto == 17 and tlen >= 28:
                ulen = (buf[l4 + 4] << 8) | buf[l4 + 5]
                if 8 <= ulen <= tlen - 20:
                    return (l4 + 8, l4 + ulen)
                if ulen >= 8 and buf[base + 6] & 0x20:  # a first fragment: its own part of the data
                    return (l4 + 8, end)
    p = decode(buf, 0, link)
    if p.reason is not None or p.l4 is None:
        return None
    mv = p.l4.payload
    start = p.l4.offset + (p.l4.header_len if hasattr(p.l4, "header_len") else 8)
    return (start, start + len(mv))


def ip_payload_span(buf: Buffer, link: str = LINK_ETHERNET) -> tuple[int, int] | None:
    """(start, end) of what an IDS matches for any IP protocol: the L4 payload for TCP, UDP,
    ICMP and ICMPv6 (as `l4_payload_span`), the IP payload after IPv6 extension headers for any
    other protocol (GRE, ESP, IP in IP, SCTP, IPv6 no-next-header, ...). None for a malformed
    packet or a non-first fragment. `end` honours the IP length (padding excluded)."""
    span = l4_payload_span(buf, link)
    if span is not None:
        return span
    p = decode(buf, 0, link)
    ip = p.ip
    if p.reason is not None or ip is None or p.l4 is not None or (ip.is_fragment and not ip.has_l4):
        return None
    return (ip.l4_offset, ip.end)


# --- FlowKey and hashes --------------------------------------------------------------------------

_PACK_V4 = Struct("!IIBHH").pack
_PACK_PORTS = Struct("!BHH").pack


class FlowKey(NamedTuple):
    """A 5-tuple with names and helpers; equal to (and hashing like) the plain tuple."""

    src: Address
    dst: Address
    proto: int
    sport: int
    dport: int

    @classmethod
    def of(cls, src: str | int | bytes, dst: str | int | bytes, proto: int | str, sport: int = 0, dport: int = 0) -> "FlowKey":
        """Build from text: `FlowKey.of("10.0.0.1", "10.0.0.2", "tcp", 1234, 80)`."""
        return cls(to_address(src), to_address(dst), to_proto(proto), sport, dport)

    def reversed(self) -> "FlowKey":
        """The key of the reply direction."""
        return FlowKey(self.dst, self.src, self.proto, self.dport, self.sport)

    def canonical(self) -> "FlowKey":
        """The same key for both directions (smaller endpoint first)."""
        return FlowKey(*canonical(self))

    @property
    def version(self) -> int:
        return 4 if isinstance(self.src, int) else 6

    def __str__(self) -> str:
        s, d = ipaddress.ip_address(self.src), ipaddress.ip_address(self.dst)
        name = PROTO_NAMES.get(self.proto, str(self.proto))
        if self.version == 6:
            return f"{name} [{s}]:{self.sport} -> [{d}]:{self.dport}"
        return f"{name} {s}:{self.sport} -> {d}:{self.dport}"


PROTO_NAMES = {
    1: "icmp", 2: "igmp", 4: "ipip", 6: "tcp", 17: "udp", 33: "dccp", 41: "ipv6", 47: "gre", 50: "esp", 51: "ah",
    58: "icmpv6", 89: "ospf", 112: "vrrp", 132: "sctp", 136: "udplite",
}
PROTO_NUMBERS = {v: k for k, v in PROTO_NAMES.items()}


def to_proto(proto: int | str) -> int:
    """'tcp' -> 6; an int 0..255 passes through."""
    if isinstance(proto, int):
        if not 0 <= proto <= 255:
            raise ValueError(f"protocol number out of range 0..255: {proto}")
        return proto
    p = PROTO_NUMBERS.get(proto.lower())
    if p is None:
        if proto.isdigit():
            return to_proto(int(proto))
        raise ValueError(f"unknown protocol {proto!r} (use one of {sorted(PROTO_NUMBERS)} or a number)")
    return p


def to_address(addr: str | int | bytes | ipaddress.IPv4Address | ipaddress.IPv6Address) -> Address:
    """Any address form -> the net layer's form: int for IPv4, 16 bytes for IPv6."""
    if isinstance(addr, int):
        if not 0 <= addr < 1 << 32:
            raise ValueError(f"an int address must be IPv4 (0..2**32-1); pass IPv6 as text or 16 bytes: {addr}")
        return addr
    if isinstance(addr, (bytes, bytearray)):
        if len(addr) == 4:
            return int.from_bytes(addr, "big")
        if len(addr) == 16:
            return bytes(addr)
        raise ValueError(f"a packed address is 4 or 16 bytes, got {len(addr)}")
    a = ipaddress.ip_address(addr) if isinstance(addr, str) else addr
    return int(a) if a.version == 4 else a.packed


def canonical(key: FiveTuple) -> FiveTuple:
    """Order the endpoints so both directions of a flow give the same tuple."""
    src, dst, proto, sport, dport = key
    if src > dst or (src == dst and sport > dport):
        return (dst, src, proto, dport, sport)
    return key


def flow_hash(key: FiveTuple, seed: int = 0) -> int:
    """A 32-bit hash of a 5-tuple that is the same in every process and run.

    Python's `hash()` is salted per process for bytes (PYTHONHASHSEED), so it cannot spread flows
    over instances in different processes; CRC32 (as in NIC RSS offloads) is stable, in C, and
    about 0.2 us. It is not keyed against adversaries choosing flows; vary `seed` per deployment.
    """
    src, dst, proto, sport, dport = key
    if src.__class__ is int:
        return crc32(_PACK_V4(src, dst, proto, sport, dport), seed)
    return crc32(src + dst + _PACK_PORTS(proto, sport, dport), seed)


def symmetric_hash(key: FiveTuple, seed: int = 0) -> int:
    """`flow_hash` that gives the same value for both directions of a flow."""
    src, dst, proto, sport, dport = key
    if src > dst or (src == dst and sport > dport):
        src, dst, sport, dport = dst, src, dport, sport
    if src.__class__ is int:
        return crc32(_PACK_V4(src, dst, proto, sport, dport), seed)
    return crc32(src + dst + _PACK_PORTS(proto, sport, dport), seed)


# ICMP error messages quote the packet that caused them (its IP header and at least 8 bytes
# after it: the ports). Linux's conntrack (`icmp_is_err`, every ICMPv6 type below 128) calls such
# an error *related* to the connection of the quoted packet.
ICMP_ERROR_TYPES = frozenset((3, 4, 5, 11, 12))  # unreachable, source quench, redirect, time exceeded, parameter


def is_icmp_error(version: int, icmp_type: int) -> bool:
    """Whether an ICMP (`version` 4) or ICMPv6 (6) message of `icmp_type` is an error message."""
    return icmp_type < 128 if version == 6 else icmp_type in ICMP_ERROR_TYPES


_QUOTE_V4 = Struct("!BxH2xHxB2xII").unpack_from  # version/IHL, total length, fragment field, proto, src, dst
_QUOTE_PORTS = Struct("!HH").unpack_from
_QUOTE_ICMP = Struct("!BxxxH").unpack_from  # type, (code, checksum), identifier
_V6_GENERIC = frozenset((0, 43, 60, 135, 139, 140))  # as the IPv6 view walks them (ip.IPV6_EXT_GENERIC)


def icmp_type(buf: Buffer, link: str = LINK_ETHERNET) -> int | None:
    """The ICMP or ICMPv6 type of a packet carrying one (a whole one or a first fragment), else
    None. IPv4 without options and IPv6 with ICMPv6 right after its header are read at fixed
    offsets; the rest goes through `decode()`."""
    base = 14 if link == LINK_ETHERNET else 0
    n = len(buf)
    if n > base + 40:
        v = buf[base] >> 4
        if link == LINK_ETHERNET:
            et = (buf[12] << 8) | buf[13]
            if (et == 0x0800) != (v == 4) or (et == 0x86DD) != (v == 6):
                v = 0  # (a tag, or a mismatch: the full parser decides)
        if v == 4 and buf[base] == 0x45 and buf[base + 9] == 1 and not ((buf[base + 6] & 0x1F) << 8 | buf[base + 7]):
            return buf[base + 20]
        if v == 6 and buf[base + 6] == 58:
            return buf[base + 40]
    p = decode(buf, 0, link)
    ip, l4 = p.ip, p.l4
    if p.reason is not None or ip is None or l4 is None or not hasattr(l4, "is_echo"):
        return None
    return l4.type


def icmp_error_quote(buf: Buffer, link: str = LINK_ETHERNET) -> tuple[FiveTuple, Address, int] | None:
    """For an ICMP or ICMPv6 error message (`is_icmp_error`) with a correct checksum: the
    5-tuple of the packet it quotes, as `parse_5tuple` gives it for that packet (a query or its
    reply: the identifier as both ports), the error's own destination address (the quoted
    packet's sender, when the error is genuine), and the quoted packet's ICMP type (-1 when it is
    not ICMP). None for anything else, and for a quote too short to hold the quoted packet's
    ports, a quote of another IP version, a quoted non-first fragment (it has no ports), or a
    quoted ICMP message without an identifier (an error about an error is nobody's, as Linux
    has it)."""
    p = decode(buf, 0, link)
    ip, l4 = p.ip, p.l4
    if p.reason is not None or ip is None or l4 is None or not hasattr(l4, "is_echo"):
        return None
    if ip.proto != (1 if ip.version == 4 else 58) or not is_icmp_error(ip.version, l4.type):
        return None
    if not l4.checksum_ok(ip):  # (Linux's conntrack checks it too: a forged error must at least add up)
        return None
    with l4.payload as q:
        inner = _quoted_5tuple(q, ip.version)
    return None if inner is None else (inner[0], ip.dst, inner[1])


_IDENTIFIED = (ICMP_IDENTIFIED, ICMPV6_IDENTIFIED)  # by IP version: the queries and replies keyed by identifier


def _quoted_5tuple(q: memoryview, version: int) -> tuple[FiveTuple, int] | None:
    n = len(q)
    if version == 4:
        if n < 20:
            return None
        vihl, _tlen, ff, proto, src, dst = _QUOTE_V4(q, 0)
        at = (vihl & 0xF) * 4
        if vihl >> 4 != 4 or at < 20 or ff & 0x1FFF:
            return None
        identified = _IDENTIFIED[0]
    else:
        if n < 40 or q[0] >> 4 != 6:
            return None
        proto, at = q[6], 40
        src, dst = bytes(q[8:24]), bytes(q[24:40])
        for _ in range(8):
            if n < at + 8:
                break
            if proto in _V6_GENERIC:
                proto, at = q[at], at + (q[at + 1] + 1) * 8
            elif proto == 51:  # AH: its length in 4-byte words, less 2
                proto, at = q[at], at + (q[at + 1] + 2) * 4
            elif proto == 44:  # fragment: only a first one quotes the ports
                if (q[at + 2] << 8 | q[at + 3]) & 0xFFF8:
                    return None
                proto, at = q[at], at + 8
            else:
                break
        identified = _IDENTIFIED[1]
    if proto in (1, 58):
        if n < at + 8 or proto != (1 if version == 4 else 58):
            return None
        kind, ident = _QUOTE_ICMP(q, at)
        return ((src, dst, proto, ident, ident), kind) if kind in identified else None
    if proto == 6 or proto == 17 or proto in PORT_PROTOCOLS:
        if n < at + 4:
            return None
        sport, dport = _QUOTE_PORTS(q, at)
        return (src, dst, proto, sport, dport), -1
    return (src, dst, proto, 0, 0), -1
