"""IPv4 (RFC 791) and IPv6 (RFC 8200) header views.

Addresses: IPv4 addresses are `int`s (cheap to hash, mask and compare), IPv6 addresses are 16-byte
`bytes` (no big-int conversion on the hot path). `ipaddress.ip_address()` accepts both forms, and
the two types can never compare equal, so one flow table can hold both families without a
collision between e.g. 0.0.0.1 and ::1.

Both views agree on these names, so code above them need not care which family it has:
`src`, `dst`, `proto` (the L4 protocol after any IPv6 extension headers), `l4_offset`, `end`
(one past the last byte of the IP packet: Ethernet padding is excluded), `ttl`,
`is_fragment`, `first_fragment`, `has_l4` (False for a non-first fragment), `payload`,
`pseudo_sum(length)`.
"""
from __future__ import annotations

from struct import Struct
from typing import Iterator, Union

from . import checksum as ck
from .errors import MalformedError, Reason

Buffer = Union[bytes, bytearray, memoryview]

IPPROTO_HOPOPTS = 0
IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_DCCP = 33
IPPROTO_ROUTING = 43
IPPROTO_FRAGMENT = 44
IPPROTO_ESP = 50
IPPROTO_AH = 51
IPPROTO_ICMPV6 = 58
IPPROTO_NONE = 59
IPPROTO_DSTOPTS = 60
IPPROTO_SCTP = 132
IPPROTO_MH = 135
IPPROTO_UDPLITE = 136

#: IPv6 extension headers with the generic (next, length in 8-octet units - 1) layout:
#: hop-by-hop, routing, destination options, mobility, HIP, shim6 (RFC 7045 list).
IPV6_EXT_GENERIC = frozenset((0, 43, 60, 135, 139, 140))
#: The longest extension-header chain we walk. Real traffic has 0-3; long chains are a known way
#: to push the L4 header out of a firewall's view (RFC 7112), so we stop and report.
MAX_EXT_HEADERS = 8

IPV4_HLEN = 20
IPV6_HLEN = 40

_V4 = Struct("!BBHHHBBHII")
_V6 = Struct("!IHBB16s16s")
_H = Struct("!H")
_I = Struct("!I")
_FRAG6 = Struct("!BxHI")

# Where the checksum sits inside the L4 headers whose checksum covers the pseudo-header (so an
# address rewrite must update it): TCP, UDP, UDP-Lite (RFC 3828), DCCP (RFC 4340). ICMPv6 (2) is
# added for IPv6 only; ICMPv4 and SCTP (CRC32c) do not cover the addresses.
_L4_CSUM_AT = {IPPROTO_TCP: 16, IPPROTO_UDP: 6, IPPROTO_UDPLITE: 6, IPPROTO_DCCP: 6}


class IPv4:
    """IPv4 header at `offset` in `buf`, validated against the buffer's length.

    Raises `MalformedError` with TRUNCATED_IPV4, BAD_IP_VERSION, BAD_IPV4_IHL, BAD_IPV4_LENGTH,
    TRUNCATED_IPV4_PAYLOAD or BAD_IPV4_OPTIONS. Fragments are not an error: see `is_fragment`.

    `proto` is the header's protocol field: an Authentication Header (51) is not walked, so IPv4
    + AH + TCP has `proto` 51 and its 5-tuple has ports 0, where `IPv6` walks AH to the TCP header.
    Code beside the views (function fast paths that read TCP at `header_len` when the 5-tuple says
    6) relies on `proto` being this field; see docs/net.md, "Limits".
    """

    __slots__ = (
        "buf", "offset", "header_len", "tos", "total_length", "ident", "flags_frag",
        "ttl", "proto", "checksum", "src", "dst",
    )
    version = 4

    def __init__(self, buf: Buffer, offset: int = 0) -> None:
        avail = len(buf) - offset
        if avail < IPV4_HLEN:
            raise MalformedError(Reason.TRUNCATED_IPV4, offset)
        vihl, tos, tlen, ident, ff, ttl, proto, csum, src, dst = _V4.unpack_from(buf, offset)
        if vihl >> 4 != 4:
            raise MalformedError(Reason.BAD_IP_VERSION, offset, f"version {vihl >> 4}")
        hlen = (vihl & 0x0F) * 4
        if hlen < IPV4_HLEN:
            raise MalformedError(Reason.BAD_IPV4_IHL, offset, f"IHL {vihl & 0x0F}")
        if avail < hlen:
            raise MalformedError(Reason.TRUNCATED_IPV4, offset, f"header is {hlen} bytes, {avail} present")
        if tlen < hlen:
            raise MalformedError(Reason.BAD_IPV4_LENGTH, offset, f"total length {tlen} < header {hlen}")
        if tlen > avail:
            raise MalformedError(Reason.TRUNCATED_IPV4_PAYLOAD, offset, f"total length {tlen}, {avail} present")
        if hlen > IPV4_HLEN:
            _check_options(buf, offset + IPV4_HLEN, offset + hlen)
        self.buf = buf
        self.offset = offset
        self.header_len = hlen
        self.tos: int = tos
        self.total_length: int = tlen
        self.ident: int = ident
        self.flags_frag: int = ff
        self.ttl: int = ttl
        self.proto: int = proto
        self.checksum: int = csum
        self.src: int = src
        self.dst: int = dst

    # --- derived fields ----------------------------------------------------------------------
    @property
    def dscp(self) -> int:
        return self.tos >> 2

    @property
    def ecn(self) -> int:
        return self.tos & 3

    @property
    def df(self) -> bool:
        """Don't Fragment."""
        return bool(self.flags_frag & 0x4000)

    @property
    def mf(self) -> bool:
        """More Fragments."""
        return bool(self.flags_frag & 0x2000)

    @property
    def frag_offset(self) -> int:
        """Fragment offset in bytes."""
        return (self.flags_frag & 0x1FFF) * 8

    @property
    def is_fragment(self) -> bool:
        """Part of a fragmented datagram (first, middle or last)."""
        return bool(self.flags_frag & 0x3FFF)

    @property
    def has_l4(self) -> bool:
        """False for non-first fragments, which carry no L4 header."""
        return not self.flags_frag & 0x1FFF

    @property
    def first_fragment(self) -> bool:
        """The first fragment of a longer datagram (offset 0, MF set): it has the L4 header, but
        not all the data a UDP length or an L4 checksum covers."""
        return self.flags_frag & 0x3FFF == 0x2000

    @property
    def l4_offset(self) -> int:
        return self.offset + self.header_len

    @property
    def end(self) -> int:
        """One past the last byte of the packet."""
        return self.offset + self.total_length

    @property
    def payload(self) -> memoryview:
        """The IP payload, bounded by the total length (link-layer padding excluded)."""
        return memoryview(self.buf)[self.offset + self.header_len : self.offset + self.total_length]

    @property
    def options(self) -> memoryview:
        return memoryview(self.buf)[self.offset + IPV4_HLEN : self.offset + self.header_len]

    def iter_options(self) -> Iterator[tuple[int, memoryview]]:
        """Yield (option type, option data without type/length) for each option except NOP/EOL."""
        return _iter_options(self.buf, self.offset + IPV4_HLEN, self.offset + self.header_len)

    def checksum_ok(self) -> bool:
        """True when the header checksum is right."""
        return ck.verify(memoryview(self.buf)[self.offset : self.offset + self.header_len])

    def pseudo_sum(self, length: int, proto: int | None = None) -> int:
        """Sum of the TCP/UDP pseudo-header for an L4 segment of `length` bytes."""
        return ck.pseudo_header_sum(self.src, self.dst, self.proto if proto is None else proto, length)

    # --- in-place rewrites (writable buffers only) -------------------------------------------
    def set_ttl(self, ttl: int) -> None:
        """Set the TTL and update the header checksum incrementally."""
        o = self.offset
        mv = memoryview(self.buf)
        old = (mv[o + 8] << 8) | self.proto
        new = (ttl << 8) | self.proto
        # From the buffer, not the cached fields: another view may have rewritten the header.
        self.checksum = ck.update16(_H.unpack_from(mv, o + 10)[0], old, new)
        mv[o + 8] = ttl
        _H.pack_into(mv, o + 10, self.checksum)
        self.ttl = ttl

    def set_src(self, addr: int) -> None:
        """Rewrite the source address; update the header checksum and the L4 one that covers the
        address (TCP, UDP, UDP-Lite, DCCP), incrementally (RFC 1624)."""
        self._set_addr(12, addr)
        self.src = addr

    def set_dst(self, addr: int) -> None:
        """Rewrite the destination address; update the header and L4 checksums (as `set_src`)."""
        self._set_addr(16, addr)
        self.dst = addr

    def _set_addr(self, at: int, new: int) -> None:
        mv = memoryview(self.buf)
        o = self.offset
        old = _I.unpack_from(mv, o + at)[0]  # the bytes as they are now, not as first parsed
        self.checksum = ck.update32(_H.unpack_from(mv, o + 10)[0], old, new)
        _I.pack_into(mv, o + at, new)
        _H.pack_into(mv, o + 10, self.checksum)
        _update_l4_csum(self, mv, _I.pack(old), _I.pack(new))

    def __repr__(self) -> str:
        from ipaddress import IPv4Address

        frag = " frag" if self.is_fragment else ""
        return f"<IPv4 {IPv4Address(self.src)} > {IPv4Address(self.dst)} proto={self.proto} len={self.total_length}{frag}>"


def _check_options(buf: Buffer, start: int, end: int) -> None:
    for _ in _iter_options(buf, start, end):
        pass


def _iter_options(buf: Buffer, pos: int, end: int) -> Iterator[tuple[int, memoryview]]:
    mv = memoryview(buf)
    while pos < end:
        kind = mv[pos]
        if kind == 0:  # end of option list
            return
        if kind == 1:  # no-operation (padding)
            pos += 1
            continue
        if pos + 1 >= end or mv[pos + 1] < 2 or pos + mv[pos + 1] > end:
            raise MalformedError(Reason.BAD_IPV4_OPTIONS, pos, f"option type {kind}")
        length = mv[pos + 1]
        yield kind, mv[pos + 2 : pos + length]
        pos += length


class IPv6:
    """IPv6 header at `offset` in `buf`, with its extension-header chain walked to the L4 header.

    `next_header` is the fixed header's field; `proto` is the protocol found after the extension
    headers (e.g. 6 for TCP); `ext_headers` lists (type, offset, length) of each one walked.
    A non-first fragment stops the walk: `has_l4` is False and `proto` is the fragment's next
    header. ESP (50) and "no next header" (59) also end the walk.

    The options of Hop-by-Hop and Destination Options headers are checked as IPv4's are: an
    option whose length runs past its header, or a Hop-by-Hop header anywhere but directly after
    the IPv6 header (RFC 8200 section 4.1), is BAD_IPV6_OPTIONS. A packet without extension
    headers pays nothing for this.

    Raises `MalformedError` with TRUNCATED_IPV6, BAD_IP_VERSION, TRUNCATED_IPV6_PAYLOAD,
    TRUNCATED_IPV6_EXT, TOO_MANY_IPV6_EXT or BAD_IPV6_OPTIONS.
    """

    __slots__ = (
        "buf", "offset", "traffic_class", "flow_label", "payload_length", "next_header",
        "hop_limit", "src", "dst", "proto", "l4_offset", "ext_headers", "frag",
    )
    version = 6

    def __init__(self, buf: Buffer, offset: int = 0) -> None:
        avail = len(buf) - offset
        if avail < IPV6_HLEN:
            raise MalformedError(Reason.TRUNCATED_IPV6, offset)
        vtf, plen, nh, hlim, src, dst = _V6.unpack_from(buf, offset)
        if vtf >> 28 != 6:
            raise MalformedError(Reason.BAD_IP_VERSION, offset, f"version {vtf >> 28}")
        if plen > avail - IPV6_HLEN:
            raise MalformedError(Reason.TRUNCATED_IPV6_PAYLOAD, offset, f"payload length {plen}, {avail - 40} present")
        self.buf = buf
        self.offset = offset
        self.traffic_class: int = (vtf >> 20) & 0xFF
        self.flow_label: int = vtf & 0xFFFFF
        self.payload_length: int = plen
        self.next_header: int = nh
        self.hop_limit: int = hlim
        self.src: bytes = src
        self.dst: bytes = dst
        #: (fragment offset in bytes, more-fragments flag, identification) if a fragment header was seen
        self.frag: tuple[int, bool, int] | None = None
        end = offset + IPV6_HLEN + plen
        pos = offset + IPV6_HLEN
        exts: list[tuple[int, int, int]] = []
        while True:
            if nh in IPV6_EXT_GENERIC or nh == IPPROTO_AH:
                if end - pos < 8:  # every extension header is at least 8 bytes
                    raise MalformedError(Reason.TRUNCATED_IPV6_EXT, pos, f"header {nh}")
                nxt = buf[pos]
                length = (buf[pos + 1] + 2) * 4 if nh == IPPROTO_AH else (buf[pos + 1] + 1) * 8
            elif nh == IPPROTO_FRAGMENT:
                if end - pos < 8:
                    raise MalformedError(Reason.TRUNCATED_IPV6_EXT, pos, "fragment header")
                nxt, off_m, ident = _FRAG6.unpack_from(buf, pos)
                length = 8
                self.frag = ((off_m >> 3) * 8, bool(off_m & 1), ident)
            else:
                break
            if pos + length > end:
                raise MalformedError(Reason.TRUNCATED_IPV6_EXT, pos, f"header {nh} is {length} bytes")
            if len(exts) == MAX_EXT_HEADERS:
                raise MalformedError(Reason.TOO_MANY_IPV6_EXT, pos)
            if nh == IPPROTO_HOPOPTS or nh == IPPROTO_DSTOPTS:
                if nh == IPPROTO_HOPOPTS and exts:
                    raise MalformedError(Reason.BAD_IPV6_OPTIONS, pos, "Hop-by-Hop header not directly after the IPv6 header")
                _check_v6_options(buf, pos + 2, pos + length)
            exts.append((nh, pos, length))
            nh = nxt
            pos += length
            if self.frag is not None and self.frag[0]:
                break  # non-first fragment: what follows is data, not a header
        self.proto: int = nh
        self.l4_offset: int = pos
        self.ext_headers: tuple[tuple[int, int, int], ...] = tuple(exts)

    @property
    def ttl(self) -> int:
        """The hop limit, under the name IPv4 uses, so callers need not care about the family."""
        return self.hop_limit

    @property
    def end(self) -> int:
        """One past the last byte of the packet."""
        return self.offset + IPV6_HLEN + self.payload_length

    @property
    def is_fragment(self) -> bool:
        return self.frag is not None

    @property
    def frag_next_header(self) -> int | None:
        """The Fragment header's next header, the same in every fragment of a datagram (unlike
        `proto`, which a first fragment's walk takes past the headers after it); None without one."""
        for kind, pos, _ in self.ext_headers:
            if kind == IPPROTO_FRAGMENT:
                return self.buf[pos]
        return None

    @property
    def first_fragment(self) -> bool:
        """The first fragment of a longer datagram (offset 0, M set); an atomic fragment (offset 0,
        M clear, RFC 6946) holds the whole datagram and is not one."""
        return self.frag is not None and self.frag[1] and not self.frag[0]

    @property
    def has_l4(self) -> bool:
        return (self.frag is None or self.frag[0] == 0) and self.proto not in (IPPROTO_NONE, IPPROTO_ESP)

    @property
    def payload(self) -> memoryview:
        """Bytes after the extension headers (the L4 header and data), bounded by payload length."""
        return memoryview(self.buf)[self.l4_offset : self.end]

    @property
    def final_dst(self) -> bytes:
        """The destination the TCP/UDP/ICMPv6 pseudo-header uses (RFC 8200 section 8.1): with a
        Routing header whose Segments Left is above 0, the final destination it lists (type 0/2:
        its last address; type 3, RPL: its last address completed from `dst`; type 4, SRH:
        Segment List[0]); else `dst`. An unknown routing type, or one too short for its addresses,
        gives `dst` (a node would discard such a packet, RFC 8200 section 4.4).

        With several Routing headers, the last one that names a final destination (Segments Left
        above 0, type and layout understood) wins: the packet visits the earlier ones' segments
        first. Routing headers with Segments Left 0 (already used up) are skipped. tshark does the
        same."""
        return self._final_dst(self.dst)

    def _final_dst(self, dst: bytes) -> bytes:
        final = dst
        for t, pos, length in self.ext_headers:
            if t == IPPROTO_ROUTING:
                f = _routing_final(self.buf, pos, length, dst)
                if f is not None:
                    final = f
        return final

    def pseudo_sum(self, length: int, proto: int | None = None) -> int:
        dst = self._final_dst(self.dst) if self.ext_headers else self.dst
        return ck.pseudo_header_sum(self.src, dst, self.proto if proto is None else proto, length)

    def set_hop_limit(self, hop_limit: int) -> None:
        memoryview(self.buf)[self.offset + 7] = hop_limit
        self.hop_limit = hop_limit

    set_ttl = set_hop_limit

    def set_src(self, addr: bytes) -> None:
        """Rewrite the source address (16 bytes) and update the TCP/UDP/UDP-Lite/DCCP/ICMPv6
        checksum."""
        self._set_addr(8, addr)
        self.src = bytes(addr)

    def set_dst(self, addr: bytes) -> None:
        """Rewrite the destination address (16 bytes) and update the L4 checksum (as `set_src`),
        unless a Routing header names the final destination (see `final_dst`): then the
        pseudo-header does not use this field and the checksum stays as it is."""
        self._set_addr(24, addr)
        self.dst = bytes(addr)

    def _set_addr(self, at: int, new: bytes) -> None:
        if len(new) != 16:
            raise ValueError(f"an IPv6 address is 16 bytes, got {len(new)}")
        new = bytes(new)
        mv = memoryview(self.buf)
        old = bytes(mv[self.offset + at : self.offset + at + 16])  # as it is now
        mv[self.offset + at : self.offset + at + 16] = new
        if at == 24 and self.ext_headers:  # the pseudo-header holds the final destination
            old, new = self._final_dst(old), self._final_dst(new)
            if old == new:
                return
        _update_l4_csum(self, mv, old, new)

    def __repr__(self) -> str:
        from ipaddress import IPv6Address

        return (f"<IPv6 {IPv6Address(self.src)} > {IPv6Address(self.dst)} proto={self.proto} "
                f"plen={self.payload_length} ext={[e[0] for e in self.ext_headers]}>")


def _check_v6_options(buf: Buffer, pos: int, end: int) -> None:
    """Walk the option TLVs of a Hop-by-Hop or Destination Options header (RFC 8200 section 4.2)
    from `pos` to `end`; raise BAD_IPV6_OPTIONS if one runs past `end`."""
    while pos < end:
        if not buf[pos]:  # Pad1: a single byte
            pos += 1
        elif pos + 1 < end and pos + 2 + buf[pos + 1] <= end:  # type, length, data
            pos += 2 + buf[pos + 1]
        else:
            raise MalformedError(Reason.BAD_IPV6_OPTIONS, pos, f"option type {buf[pos]}")


def _routing_final(buf: Buffer, pos: int, length: int, dst: bytes) -> bytes | None:
    """The final destination listed by the Routing header at `pos` (`length` bytes), or None when
    Segments Left is 0 (`dst` is final) or the header's type or layout is not understood."""
    rtype, left = buf[pos + 2], buf[pos + 3]
    if not left:
        return None
    if rtype in (0, 2):  # RFC 5095 (deprecated) / RFC 6275: 4 reserved bytes, then the addresses
        n = (length - 8) // 16
        if n < 1:
            return None
        at = pos + 8 + (n - 1) * 16
        return bytes(buf[at : at + 16])
    if rtype == 4:  # SRH, RFC 8754: last entry, flags, tag, then Segment List[0] = the final one
        if length < 24:
            return None
        return bytes(buf[pos + 8 : pos + 24])
    if rtype == 3:  # RPL, RFC 6554: addresses with their first CmprI/CmprE bytes elided
        cmpr_i, cmpr_e, pad = buf[pos + 4] >> 4, buf[pos + 4] & 0x0F, buf[pos + 5] >> 4
        size_i, size_e = 16 - cmpr_i, 16 - cmpr_e
        room = length - 8 - pad - size_e  # bytes of addresses 1..n-1
        if room < 0 or room % size_i:
            return None
        at = pos + 8 + room
        return bytes(dst[:cmpr_e]) + bytes(buf[at : at + size_e])
    return None


def _update_l4_csum(ip: IPv4 | IPv6, mv: memoryview, old: bytes, new: bytes) -> None:
    """After an address rewrite, fix the L4 checksum that covers it through the pseudo-header:
    TCP, UDP, UDP-Lite, DCCP, and ICMPv6 over IPv6."""
    if not ip.has_l4:
        return
    at = _L4_CSUM_AT.get(ip.proto)
    if at is None:
        if ip.proto == IPPROTO_ICMPV6 and ip.version == 6:
            at = 2
        else:
            return  # ICMPv4 and others have no pseudo-header
    pos = ip.l4_offset + at
    if pos + 2 > ip.end:
        return  # truncated L4 header: nothing trustworthy to update
    old_csum = _H.unpack_from(mv, pos)[0]
    proto = ip.proto
    if proto == IPPROTO_UDP and old_csum == 0:
        return  # UDP without a checksum stays without one (UDP-Lite's is mandatory: not so there)
    new_csum = ck.update_bytes(old_csum, old, new)
    if new_csum == 0 and (proto == IPPROTO_UDP or proto == IPPROTO_UDPLITE):
        new_csum = 0xFFFF  # RFC 768, RFC 3828: a computed zero is sent as all ones
    _H.pack_into(mv, pos, new_csum)


def ip_view(buf: Buffer, offset: int = 0) -> IPv4 | IPv6:
    """The IPv4 or IPv6 view for the packet at `offset`, chosen by the version nibble."""
    if len(buf) - offset < 1:
        raise MalformedError(Reason.TRUNCATED_IPV4, offset)
    v = buf[offset] >> 4
    if v == 4:
        return IPv4(buf, offset)
    if v == 6:
        return IPv6(buf, offset)
    raise MalformedError(Reason.BAD_IP_VERSION, offset, f"version {v}")
