"""TCP (RFC 9293), UDP (RFC 768), ICMP (RFC 792) and ICMPv6 (RFC 4443) header views.

Each view takes the buffer, the offset of its header and `end`, one past the last byte of the IP
packet (so Ethernet padding is never read as payload); `end` defaults to the buffer's length.
Checksums are verified against an IP view, which supplies the pseudo-header:
`tcp.checksum_ok(ip)`.
"""
from __future__ import annotations

from struct import Struct
from typing import TYPE_CHECKING, Iterator, Union

from . import checksum as ck
from .errors import MalformedError, Reason

if TYPE_CHECKING:
    from .ip import IPv4, IPv6

Buffer = Union[bytes, bytearray, memoryview]

TCP_HLEN = 20
UDP_HLEN = 8
ICMP_HLEN = 8

FIN, SYN, RST, PSH, ACK, URG, ECE, CWR, NS = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80, 0x100
_FLAG_LETTERS = "FSRPAUEC"

ICMP_ECHO_REPLY = 0
ICMP_DEST_UNREACH = 3
ICMP_ECHO_REQUEST = 8
ICMP_TIME_EXCEEDED = 11
ICMPV6_ECHO_REQUEST = 128
ICMPV6_ECHO_REPLY = 129
# the query/reply pairs whose header carries an identifier: echo, timestamp, information, address
# mask (RFC 792, 950); a 5-tuple keys them by it, as Linux's conntrack does
ICMP_IDENTIFIED = frozenset((0, 8, 13, 14, 15, 16, 17, 18))
ICMPV6_IDENTIFIED = frozenset((ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY))

_TCP = Struct("!HHIIHHHH")
_UDP = Struct("!HHHH")
_ICMP = Struct("!BBHHH")
_H = Struct("!H")


def flags_str(flags: int) -> str:
    """TCP flags as tcpdump-like letters: 0x12 -> 'SA'."""
    return "".join(c for i, c in enumerate(_FLAG_LETTERS) if flags >> i & 1) + ("N" if flags & NS else "")


def parse_flags(text: str) -> int:
    """'SA' -> 0x12. Letters: F S R P A U E C N (case-insensitive)."""
    out = 0
    for c in text.upper():
        if c == "N":
            out |= NS
            continue
        i = _FLAG_LETTERS.find(c)
        if i < 0:
            raise ValueError(f"unknown TCP flag letter {c!r} (use letters from {_FLAG_LETTERS}N)")
        out |= 1 << i
    return out


class _L4:
    __slots__ = ("buf", "offset", "end")

    @property
    def payload(self) -> memoryview:
        raise NotImplementedError

    def _verify(self, ip: IPv4 | IPv6 | None, proto: int, length: int) -> bool:
        seg = memoryview(self.buf)[self.offset : self.offset + length]
        initial = ip.pseudo_sum(length, proto) if ip is not None else 0
        return ck.verify(seg, initial)


class _PortL4(_L4):
    """TCP and UDP: source and destination ports at offsets 0 and 2; each subclass's `_set_port`
    knows where its checksum is."""

    __slots__ = ()

    def set_sport(self, port: int) -> None:
        """Rewrite the source port and update the checksum (RFC 1624)."""
        # The old value from the buffer, not self.sport: another view of the same buffer may have
        # rewritten the port since this view was built (as the IP setters do).
        self._set_port(0, _H.unpack_from(self.buf, self.offset)[0], port)  # type: ignore[attr-defined]
        self.sport = port

    def set_dport(self, port: int) -> None:
        """Rewrite the destination port and update the checksum (RFC 1624)."""
        self._set_port(2, _H.unpack_from(self.buf, self.offset + 2)[0], port)  # type: ignore[attr-defined]
        self.dport = port


class TCP(_PortL4):
    """TCP header. Raises `MalformedError` (TRUNCATED_TCP, BAD_TCP_OFFSET)."""

    __slots__ = ("sport", "dport", "seq", "ack", "header_len", "flags", "window", "checksum", "urgent")

    def __init__(self, buf: Buffer, offset: int = 0, end: int | None = None) -> None:
        if end is None:
            end = len(buf)
        if end - offset < TCP_HLEN:
            raise MalformedError(Reason.TRUNCATED_TCP, offset)
        sport, dport, seq, ack, off_flags, win, csum, urg = _TCP.unpack_from(buf, offset)
        hlen = (off_flags >> 12) * 4
        if hlen < TCP_HLEN:
            raise MalformedError(Reason.BAD_TCP_OFFSET, offset, f"data offset {off_flags >> 12}")
        if end - offset < hlen:
            raise MalformedError(Reason.TRUNCATED_TCP, offset, f"header is {hlen} bytes, {end - offset} present")
        self.buf = buf
        self.offset = offset
        self.end = end
        self.sport: int = sport
        self.dport: int = dport
        self.seq: int = seq
        self.ack: int = ack
        self.header_len = hlen
        self.flags: int = off_flags & 0x1FF
        self.window: int = win
        self.checksum: int = csum
        self.urgent: int = urg

    syn = property(lambda self: bool(self.flags & SYN), doc="SYN flag")
    fin = property(lambda self: bool(self.flags & FIN), doc="FIN flag")
    rst = property(lambda self: bool(self.flags & RST), doc="RST flag")
    is_ack = property(lambda self: bool(self.flags & ACK), doc="ACK flag")

    @property
    def payload(self) -> memoryview:
        return memoryview(self.buf)[self.offset + self.header_len : self.end]

    @property
    def options(self) -> memoryview:
        return memoryview(self.buf)[self.offset + TCP_HLEN : self.offset + self.header_len]

    def iter_options(self) -> Iterator[tuple[int, memoryview]]:
        """Yield (kind, data) per TCP option, skipping NOP; stops at EOL or a bad length."""
        mv = self.options
        pos, end = 0, len(mv)
        while pos < end:
            kind = mv[pos]
            if kind == 0:
                return
            if kind == 1:
                pos += 1
                continue
            if pos + 1 >= end or mv[pos + 1] < 2 or pos + mv[pos + 1] > end:
                return  # a bad option does not make the segment unparseable; stop listing
            yield kind, mv[pos + 2 : pos + mv[pos + 1]]
            pos += mv[pos + 1]

    def checksum_ok(self, ip: IPv4 | IPv6) -> bool:
        """True when the checksum (over pseudo-header, header and data) is right."""
        return self._verify(ip, 6, self.end - self.offset)

    def _set_port(self, at: int, old: int, new: int) -> None:
        mv = memoryview(self.buf)
        _H.pack_into(mv, self.offset + at, new)
        # Read the checksum from the buffer, not self.checksum: an address rewrite through the IP
        # view may have updated it since this view was built.
        csum = _H.unpack_from(mv, self.offset + 16)[0]
        self.checksum = ck.update16(csum, old, new)
        _H.pack_into(mv, self.offset + 16, self.checksum)

    def __repr__(self) -> str:
        return f"<TCP {self.sport} > {self.dport} [{flags_str(self.flags)}] seq={self.seq} len={len(self.payload)}>"


class UDP(_PortL4):
    """UDP header; `length` is checked against the bytes present.

    `first_fragment=True` says the IP packet is the first fragment of a longer datagram (offset 0,
    more fragments follow): `length` covers the whole datagram, so it may exceed the bytes present,
    and `payload` is then this fragment's own part of the data (`decode()` passes
    `ip.first_fragment`).

    Raises `MalformedError` (TRUNCATED_UDP, BAD_UDP_LENGTH)."""

    __slots__ = ("sport", "dport", "length", "checksum", "first_fragment")

    def __init__(self, buf: Buffer, offset: int = 0, end: int | None = None, first_fragment: bool = False) -> None:
        if end is None:
            end = len(buf)
        if end - offset < UDP_HLEN:
            raise MalformedError(Reason.TRUNCATED_UDP, offset)
        sport, dport, length, csum = _UDP.unpack_from(buf, offset)
        if length < UDP_HLEN:
            raise MalformedError(Reason.BAD_UDP_LENGTH, offset, f"length {length}")
        if length > end - offset and not first_fragment:
            raise MalformedError(Reason.TRUNCATED_UDP, offset, f"length {length}, {end - offset} present")
        self.buf = buf
        self.offset = offset
        self.end = end
        self.sport: int = sport
        self.dport: int = dport
        self.length: int = length
        self.checksum: int = csum
        self.first_fragment = first_fragment

    @property
    def payload(self) -> memoryview:
        """The data, bounded by `length` and (in a first fragment) by the end of the IP packet."""
        return memoryview(self.buf)[self.offset + UDP_HLEN : min(self.offset + self.length, self.end)]

    def checksum_ok(self, ip: IPv4 | IPv6) -> bool:
        """True when the checksum is right, or absent (0) over IPv4, where it is optional.

        In a first fragment whose datagram continues past it (`length` beyond the bytes present),
        the checksum covers data this packet does not hold: False unless absent over IPv4."""
        if self.checksum == 0:
            return ip.version == 4
        if self.length > self.end - self.offset:
            return False
        return self._verify(ip, 17, self.length)

    def _set_port(self, at: int, old: int, new: int) -> None:
        mv = memoryview(self.buf)
        _H.pack_into(mv, self.offset + at, new)
        csum = _H.unpack_from(mv, self.offset + 6)[0]  # current value (see TCP._set_port)
        if csum:  # 0 = no checksum (IPv4): leave it so
            c = ck.update16(csum, old, new)
            self.checksum = c or 0xFFFF
            _H.pack_into(mv, self.offset + 6, self.checksum)

    def __repr__(self) -> str:
        return f"<UDP {self.sport} > {self.dport} len={self.length}>"


class ICMP(_L4):
    """ICMP (IPv4) header: type, code, checksum and the 4-byte rest-of-header.

    Raises `MalformedError` (TRUNCATED_ICMP). `identifier`/`sequence` are meaningful for echo."""

    __slots__ = ("type", "code", "checksum", "identifier", "sequence")
    pseudo_proto: int | None = None  # ICMPv4's checksum does not cover a pseudo-header

    def __init__(self, buf: Buffer, offset: int = 0, end: int | None = None) -> None:
        if end is None:
            end = len(buf)
        if end - offset < ICMP_HLEN:
            raise MalformedError(Reason.TRUNCATED_ICMP, offset)
        self.type, self.code, self.checksum, self.identifier, self.sequence = _ICMP.unpack_from(buf, offset)
        self.buf = buf
        self.offset = offset
        self.end = end

    @property
    def is_echo(self) -> bool:
        return self.type in (ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY)

    @property
    def has_identifier(self) -> bool:
        """A query or its reply (echo, timestamp, information, address mask): `identifier` names it."""
        return self.type in ICMP_IDENTIFIED

    @property
    def payload(self) -> memoryview:
        return memoryview(self.buf)[self.offset + ICMP_HLEN : self.end]

    def checksum_ok(self, ip: IPv4 | IPv6 | None = None) -> bool:
        return self._verify(ip if self.pseudo_proto else None, self.pseudo_proto or 0, self.end - self.offset)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} type={self.type} code={self.code}>"


class ICMPv6(ICMP):
    """ICMPv6 header (same layout as ICMP; its checksum covers the IPv6 pseudo-header)."""

    __slots__ = ()
    pseudo_proto = 58

    @property
    def is_echo(self) -> bool:
        return self.type in (ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY)

    @property
    def has_identifier(self) -> bool:
        return self.type in ICMPV6_IDENTIFIED
