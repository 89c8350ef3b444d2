"""Packet builders: craft frames for tests, examples and the traffic generator.

Layer builders return the bytes of one header plus its payload (`ethernet`, `vlan`, `arp`,
`ipv4`, `ipv6`, `ipv6_ext`, `ipv6_fragment`, `tcp`, `udp`, `icmp`, `icmpv6`); checksums are
filled in unless given explicitly (a test that wants a wrong one passes it). The `*_frame`
helpers stack them into a complete Ethernet frame from readable arguments:

    tcp_frame("10.0.0.1", "10.0.0.2", 1234, 80, flags="S", payload=b"hi")
    udp_frame("fd00::1", "fd00::2", 53, 53, vlan=10)

Addresses may be text, `ipaddress` objects, ints (IPv4) or packed bytes.
The TCP/UDP/ICMPv6 checksum covers the *final* destination when an IPv6 Routing header has
segments left (RFC 8200 section 8.1): the frame helpers take it from their `ext` headers, and
`final_dst(dst, ext)` gives it for the layer builders' `dst`.
`FrameTemplate` is for generators: build once, then stamp ports/addresses into a copy with
incremental checksum updates instead of rebuilding.
"""
from __future__ import annotations

import ipaddress
from struct import Struct
from typing import Iterable, Sequence, Union

from . import checksum as ck
from .errors import MalformedError
from .ethernet import ETH_P_8021Q, ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, parse_mac
from .flow import to_address
from .ip import IPPROTO_FRAGMENT, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_NONE, IPPROTO_TCP, IPPROTO_UDP, IPv6
from .l4 import parse_flags

AddressLike = Union[str, int, bytes, ipaddress.IPv4Address, ipaddress.IPv6Address]
MacLike = Union[str, bytes]

DEFAULT_SRC_MAC = b"\x02\x00\x00\x00\x00\x01"
DEFAULT_DST_MAC = b"\x02\x00\x00\x00\x00\x02"

_V4 = Struct("!BBHHHBBH4s4s")
_V6 = Struct("!IHBB16s16s")
_TCP = Struct("!HHIIHHHH")
_UDP = Struct("!HHHH")
_ICMP = Struct("!BBHHH")
_ARP = Struct("!HHBBH6s4s6s4s")
_H = Struct("!H")


def _packed(addr: AddressLike) -> bytes:
    a = to_address(addr)
    return a.to_bytes(4, "big") if isinstance(a, int) else a


# --- layers ---------------------------------------------------------------------------------------

def ethernet(payload: bytes, *, dst: MacLike = DEFAULT_DST_MAC, src: MacLike = DEFAULT_SRC_MAC,
             ethertype: int = ETH_P_IP, vlans: Sequence[int | tuple[int, int]] = (), pad: bool = False) -> bytes:
    """Ethernet II header + payload. `vlans`: VLAN ids outermost first (or (tpid, tci) pairs for
    full control, e.g. (0x88a8, 100) for an 802.1ad outer tag). `pad` pads to the 60-byte minimum."""
    head = parse_mac(dst) + parse_mac(src)
    for v in vlans:
        tpid, tci = (ETH_P_8021Q, v) if isinstance(v, int) else v
        if not 0 <= tci <= 0xFFFF:
            raise ValueError(f"VLAN TCI out of range: {tci}")
        head += _H.pack(tpid) + _H.pack(tci)
    frame = head + _H.pack(ethertype) + bytes(payload)
    if pad and len(frame) < 60:
        frame += bytes(60 - len(frame))
    return frame


def arp(op: int, sha: MacLike, spa: AddressLike, tha: MacLike = b"\x00" * 6, tpa: AddressLike = 0) -> bytes:
    """ARP for Ethernet/IPv4 (28 bytes): op 1 = request, 2 = reply."""
    return _ARP.pack(1, ETH_P_IP, 6, 4, op, parse_mac(sha), _packed(spa), parse_mac(tha), _packed(tpa))


def ipv4(payload: bytes, *, src: AddressLike, dst: AddressLike, proto: int, ttl: int = 64, ident: int = 0,
         tos: int = 0, df: bool = False, mf: bool = False, frag_offset: int = 0, options: bytes = b"",
         total_length: int | None = None, checksum: int | None = None) -> bytes:
    """IPv4 header + payload. `frag_offset` in bytes (a multiple of 8); `options` padded to 4 bytes
    with EOL. `total_length`/`checksum` override the computed values (for malformed packets)."""
    if frag_offset % 8:
        raise ValueError(f"fragment offset must be a multiple of 8 bytes, got {frag_offset}")
    options = bytes(options) + b"\x00" * (-len(options) % 4)
    hlen = 20 + len(options)
    if hlen > 60:
        raise ValueError(f"IPv4 options too long: header would be {hlen} bytes (max 60)")
    tlen = hlen + len(payload) if total_length is None else total_length
    ff = (0x4000 if df else 0) | (0x2000 if mf else 0) | (frag_offset // 8)
    hdr = bytearray(_V4.pack(0x40 | hlen // 4, tos, tlen, ident, ff, ttl, proto, 0, _packed(src), _packed(dst)) + options)
    _H.pack_into(hdr, 10, ck.checksum(hdr) if checksum is None else checksum)
    return bytes(hdr) + bytes(payload)


def ipv6(payload: bytes, *, src: AddressLike, dst: AddressLike, next_header: int, hop_limit: int = 64,
         traffic_class: int = 0, flow_label: int = 0, ext: Iterable[tuple[int, bytes]] = (),
         payload_length: int | None = None) -> bytes:
    """IPv6 header + extension headers + payload. `ext` is a list of (type, header bytes) as made
    by `ipv6_ext`/`ipv6_fragment` *without* their next-header byte filled: this function chains
    them (each one's first byte becomes the next one's type; the last points at `next_header`)."""
    exts = list(ext)
    chain = b""
    types = [t for t, _ in exts] + [next_header]
    for i, (_, body) in enumerate(exts):
        chain += bytes([types[i + 1]]) + bytes(body[1:])
    first = types[0]
    plen = len(chain) + len(payload) if payload_length is None else payload_length
    vtf = (6 << 28) | (traffic_class << 20) | flow_label
    return _V6.pack(vtf, plen, first, hop_limit, _packed(src), _packed(dst)) + chain + bytes(payload)


def ipv6_ext(ext_type: int, data: bytes = b"") -> tuple[int, bytes]:
    """A generic extension header (hop-by-hop 0, routing 43, destination options 60, ...) with
    `data` after the two fixed bytes, padded with zero bytes to a multiple of 8 (in option
    headers a zero byte is the Pad1 option, so the padding is valid)."""
    body = bytes(data) + b"\x00" * (-(len(data) + 2) % 8)
    total = 2 + len(body)
    if total > 2048:
        raise ValueError(f"IPv6 extension header too long: {len(data)} bytes of data make {total} bytes, "
                         f"the most its length byte can say is 2048 (2 fixed bytes + 2046 of data)")
    return ext_type, bytes([0, total // 8 - 1]) + body


def ipv6_fragment(offset: int = 0, more: bool = False, ident: int = 0) -> tuple[int, bytes]:
    """An IPv6 fragment header (type 44); `offset` in bytes, a multiple of 8."""
    if offset % 8:
        raise ValueError(f"fragment offset must be a multiple of 8 bytes, got {offset}")
    return IPPROTO_FRAGMENT, bytes([0, 0]) + _H.pack((offset // 8) << 3 | int(more)) + ident.to_bytes(4, "big")


def tcp(sport: int, dport: int, payload: bytes = b"", *, seq: int = 0, ack: int = 0, flags: int | str = "S",
        window: int = 65535, urgent: int = 0, options: bytes = b"", src: AddressLike | None = None,
        dst: AddressLike | None = None, checksum: int | None = None, data_offset: int | None = None) -> bytes:
    """TCP header + payload. The checksum is computed when `src` and `dst` are given (needed for
    the pseudo-header; `dst` is the final destination with an IPv6 Routing header, see
    `final_dst`), else left 0 unless `checksum` is passed. `options` (padded to 4 bytes) may be
    40 bytes at most, unless `data_offset` (0..15) is given to build a malformed segment."""
    fl = parse_flags(flags) if isinstance(flags, str) else flags
    options = bytes(options) + b"\x00" * (-len(options) % 4)
    if data_offset is None:
        if len(options) > 40:
            raise ValueError(f"TCP options too long: {len(options)} bytes (padded to 4); at most 40 fit "
                             f"(a data offset of 15 words is a 60-byte header)")
        doff = (20 + len(options)) // 4
    elif not 0 <= data_offset <= 15:
        raise ValueError(f"TCP data offset is 4 bits (0..15 words), got {data_offset}")
    else:
        doff = data_offset
    seg = bytearray(_TCP.pack(sport, dport, seq, ack, (doff << 12) | fl, window, 0, urgent) + options + bytes(payload))
    if checksum is None and src is not None and dst is not None:
        checksum = ck.l4_checksum(_packed(src), _packed(dst), IPPROTO_TCP, seg)
    _H.pack_into(seg, 16, checksum or 0)
    return bytes(seg)


def udp(sport: int, dport: int, payload: bytes = b"", *, src: AddressLike | None = None, dst: AddressLike | None = None,
        checksum: int | None = None, length: int | None = None) -> bytes:
    """UDP header + payload; checksum as for `tcp` (a computed 0 is sent as 0xFFFF, RFC 768;
    `dst` is the final destination with an IPv6 Routing header, see `final_dst`)."""
    ulen = 8 + len(payload) if length is None else length
    seg = bytearray(_UDP.pack(sport, dport, ulen, 0) + bytes(payload))
    if checksum is None and src is not None and dst is not None:
        checksum = ck.l4_checksum(_packed(src), _packed(dst), IPPROTO_UDP, seg) or 0xFFFF
    _H.pack_into(seg, 6, checksum or 0)
    return bytes(seg)


def icmp(icmp_type: int, code: int = 0, payload: bytes = b"", *, identifier: int = 0, sequence: int = 0) -> bytes:
    """ICMP (IPv4) message with its checksum."""
    msg = bytearray(_ICMP.pack(icmp_type, code, 0, identifier, sequence) + bytes(payload))
    _H.pack_into(msg, 2, ck.checksum(msg))
    return bytes(msg)


def icmpv6(icmp_type: int, code: int = 0, payload: bytes = b"", *, src: AddressLike, dst: AddressLike,
           identifier: int = 0, sequence: int = 0) -> bytes:
    """ICMPv6 message with its checksum (which covers the IPv6 pseudo-header: `dst` is the final
    destination with a Routing header, see `final_dst`)."""
    msg = bytearray(_ICMP.pack(icmp_type, code, 0, identifier, sequence) + bytes(payload))
    _H.pack_into(msg, 2, ck.l4_checksum(_packed(src), _packed(dst), IPPROTO_ICMPV6, msg))
    return bytes(msg)


def final_dst(dst: AddressLike, ext: Iterable[tuple[int, bytes]] = ()) -> AddressLike:
    """The destination an L4 pseudo-header uses for an IPv6 packet to `dst` with extension headers
    `ext` (as `ipv6` takes them): the final destination of a Routing header with segments left
    (RFC 8200 section 8.1, as `IPv6.final_dst` reads it), else `dst` itself. Pass it as `dst`
    to `tcp`, `udp` or `icmpv6`:

        rh = ipv6_ext(43, bytes([0, 1, 0, 0, 0, 0]) + last_hop)       # type 0, 1 segment left
        seg = udp(1, 2, b"x", src=s, dst=final_dst(d, [rh]))
        frame = ip_frame(seg, src=s, dst=d, proto=17, ext=[rh])

    Returns `dst` as given when it is final (also for an IPv4 `dst`, or headers that do not
    parse), else the final destination as 16 bytes."""
    exts = list(ext)
    if not exts or not _is_v6(dst):
        return dst
    try:
        final = IPv6(ipv6(b"", src=bytes(16), dst=dst, next_header=IPPROTO_NONE, ext=exts)).final_dst
    except MalformedError:
        return dst  # a deliberately malformed chain: the Destination Address, as before
    return dst if final == _packed(dst) else final


# --- whole frames ---------------------------------------------------------------------------------

def _is_v6(addr: AddressLike) -> bool:
    return not isinstance(to_address(addr), int)


def _l4_dst(src: AddressLike, dst: AddressLike, ip_args: dict) -> AddressLike:
    """The pseudo-header destination for a frame helper's `ip_args` (its `ext`, made a list so it
    can be read twice)."""
    ext = ip_args.get("ext")
    if ext is None or not _is_v6(src):
        return dst
    ip_args["ext"] = ext = list(ext)  # type: ignore[arg-type]
    return final_dst(dst, ext)  # type: ignore[arg-type]


def ip_frame(l4: bytes, *, src: AddressLike, dst: AddressLike, proto: int, vlan: int | None = None,
             eth_dst: MacLike = DEFAULT_DST_MAC, eth_src: MacLike = DEFAULT_SRC_MAC, **ip_args: object) -> bytes:
    """Ethernet frame around an IPv4 or IPv6 packet (family from `src`) carrying `l4`."""
    if _is_v6(src):
        pkt = ipv6(l4, src=src, dst=dst, next_header=proto, **ip_args)  # type: ignore[arg-type]
        et = ETH_P_IPV6
    else:
        pkt = ipv4(l4, src=src, dst=dst, proto=proto, **ip_args)  # type: ignore[arg-type]
        et = ETH_P_IP
    return ethernet(pkt, dst=eth_dst, src=eth_src, ethertype=et, vlans=() if vlan is None else (vlan,))


def tcp_frame(src: AddressLike, dst: AddressLike, sport: int, dport: int, payload: bytes = b"", *,
              flags: int | str = "S", seq: int = 0, ack: int = 0, vlan: int | None = None, **ip_args: object) -> bytes:
    """A complete Ethernet/IP/TCP frame with correct checksums (over the final destination when
    `ext` holds an IPv6 Routing header with segments left)."""
    seg = tcp(sport, dport, payload, seq=seq, ack=ack, flags=flags, src=src, dst=_l4_dst(src, dst, ip_args))
    return ip_frame(seg, src=src, dst=dst, proto=IPPROTO_TCP, vlan=vlan, **ip_args)


def udp_frame(src: AddressLike, dst: AddressLike, sport: int, dport: int, payload: bytes = b"", *,
              vlan: int | None = None, **ip_args: object) -> bytes:
    """A complete Ethernet/IP/UDP frame with correct checksums (as `tcp_frame`)."""
    seg = udp(sport, dport, payload, src=src, dst=_l4_dst(src, dst, ip_args))
    return ip_frame(seg, src=src, dst=dst, proto=IPPROTO_UDP, vlan=vlan, **ip_args)


def icmp_echo_frame(src: AddressLike, dst: AddressLike, identifier: int = 1, sequence: int = 1,
                    payload: bytes = b"", *, reply: bool = False, vlan: int | None = None) -> bytes:
    """An ICMP or ICMPv6 echo request (or reply) frame."""
    if _is_v6(src):
        msg = icmpv6(129 if reply else 128, 0, payload, src=src, dst=dst, identifier=identifier, sequence=sequence)
        return ip_frame(msg, src=src, dst=dst, proto=IPPROTO_ICMPV6, vlan=vlan)
    msg = icmp(0 if reply else 8, 0, payload, identifier=identifier, sequence=sequence)
    return ip_frame(msg, src=src, dst=dst, proto=IPPROTO_ICMP, vlan=vlan)


def arp_frame(op: int, sha: MacLike, spa: AddressLike, tha: MacLike = b"\x00" * 6, tpa: AddressLike = 0,
              *, dst: MacLike = b"\xff" * 6) -> bytes:
    """An ARP frame (broadcast by default), padded to the 60-byte Ethernet minimum."""
    return ethernet(arp(op, sha, spa, tha, tpa), dst=dst, src=sha, ethertype=ETH_P_ARP, pad=True)


class FrameTemplate:
    """A prebuilt untagged Ethernet/IPv4/(TCP|UDP) frame whose addresses and ports can be stamped
    into a fresh copy cheaply, for traffic generators:

        t = FrameTemplate(udp_frame("10.0.0.1", "10.0.0.2", 1000, 2000, b"x" * 18))
        frame = t.make(sport=1001)          # bytearray with correct IP and UDP checksums

    Checksums are updated incrementally (RFC 1624), not recomputed, so the cost does not grow
    with the payload.
    """

    def __init__(self, frame: bytes) -> None:
        from .packet import decode

        pkt = decode(frame)
        if pkt.reason is not None or pkt.ip is None or pkt.ip.version != 4 or pkt.eth is None or pkt.eth.tags:
            raise ValueError("FrameTemplate needs a well-formed untagged Ethernet/IPv4 frame")
        if pkt.ip.proto not in (IPPROTO_TCP, IPPROTO_UDP) or pkt.ip.header_len != 20:  # type: ignore[union-attr]
            raise ValueError("FrameTemplate needs TCP or UDP over IPv4 without options")
        self.frame = bytes(frame)
        self.src: int = pkt.ip.src  # type: ignore[assignment]
        self.dst: int = pkt.ip.dst  # type: ignore[assignment]
        self.sport: int = pkt.l4.sport  # type: ignore[union-attr]
        self.dport: int = pkt.l4.dport  # type: ignore[union-attr]
        self.ip_csum: int = pkt.ip.checksum  # type: ignore[union-attr]
        self.l4_csum_at = 34 + (16 if pkt.ip.proto == IPPROTO_TCP else 6)
        self.l4_csum: int = _H.unpack_from(frame, self.l4_csum_at)[0]
        self.udp_no_csum = pkt.ip.proto == IPPROTO_UDP and self.l4_csum == 0

    def make(self, *, src: int | None = None, dst: int | None = None, sport: int | None = None,
             dport: int | None = None) -> bytearray:
        """A new frame with the given fields changed (IPv4 addresses as ints)."""
        f = bytearray(self.frame)
        ipc, l4c = self.ip_csum, self.l4_csum
        if src is not None and src != self.src:
            ipc = ck.update32(ipc, self.src, src)
            l4c = ck.update32(l4c, self.src, src)
            f[26:30] = src.to_bytes(4, "big")
        if dst is not None and dst != self.dst:
            ipc = ck.update32(ipc, self.dst, dst)
            l4c = ck.update32(l4c, self.dst, dst)
            f[30:34] = dst.to_bytes(4, "big")
        if sport is not None and sport != self.sport:
            l4c = ck.update16(l4c, self.sport, sport)
            _H.pack_into(f, 34, sport)
        if dport is not None and dport != self.dport:
            l4c = ck.update16(l4c, self.dport, dport)
            _H.pack_into(f, 36, dport)
        _H.pack_into(f, 24, ipc)
        if not self.udp_no_csum:
            if l4c == 0 and self.l4_csum_at == 40:
                l4c = 0xFFFF  # UDP: a computed zero is sent as all ones (RFC 768)
            _H.pack_into(f, self.l4_csum_at, l4c)
        return f
