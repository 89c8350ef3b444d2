"""Ethernet II header view, with up to two 802.1Q / 802.1ad VLAN tags.

    0      6      12        14 (untagged)
    | dst  | src  | type    | payload ...
    | dst  | src  | 0x8100 TCI | type | payload ...      (802.1Q, +4 bytes per tag)

The view reads the header once, with `struct.unpack_from` on the caller's buffer; nothing is
copied except the two 6-byte MAC addresses when asked for. `ethertype` is the type after the
tags, which is what decides how to parse the payload.
"""
from __future__ import annotations

from struct import Struct
from typing import NamedTuple, Union

from .errors import MalformedError, Reason

Buffer = Union[bytes, bytearray, memoryview]

ETH_HLEN = 14
ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD
ETH_P_8021Q = 0x8100
ETH_P_8021AD = 0x88A8
ETH_P_QINQ_OLD = 0x9100  # pre-standard QinQ, still emitted by some switches
VLAN_TPIDS = frozenset((ETH_P_8021Q, ETH_P_8021AD, ETH_P_QINQ_OLD))
MAX_VLAN_TAGS = 2  # QinQ; deeper stacks are almost always an attack or a loop
BROADCAST = b"\xff" * 6

_HDR = Struct("!6s6sH")
_TAG = Struct("!HH")  # TCI, then the next type


class VlanTag(NamedTuple):
    """One VLAN tag: its TPID (0x8100 or 0x88a8), priority, drop-eligible bit and VLAN id."""

    tpid: int
    pcp: int
    dei: bool
    vid: int

    @property
    def tci(self) -> int:
        """The 16-bit tag control information as on the wire."""
        return (self.pcp << 13) | (int(self.dei) << 12) | self.vid


class Ethernet:
    """Read (and, on writable buffers, write) an Ethernet header at `offset` in `buf`.

    Raises `MalformedError` if the header or a VLAN tag runs past the end of the buffer.
    """

    __slots__ = ("buf", "offset", "dst", "src", "ethertype", "tags", "header_len")

    def __init__(self, buf: Buffer, offset: int = 0) -> None:
        if len(buf) - offset < ETH_HLEN:
            raise MalformedError(Reason.TRUNCATED_ETHERNET, offset)
        dst, src, etype = _HDR.unpack_from(buf, offset)
        pos = offset + ETH_HLEN
        tags: tuple[VlanTag, ...] = ()
        while etype in VLAN_TPIDS:
            if len(tags) == MAX_VLAN_TAGS:
                raise MalformedError(Reason.TOO_MANY_VLAN_TAGS, pos - 2)
            if len(buf) - pos < 4:
                raise MalformedError(Reason.TRUNCATED_VLAN, pos)
            tci, nxt = _TAG.unpack_from(buf, pos)
            tags += (VlanTag(etype, tci >> 13, bool(tci & 0x1000), tci & 0x0FFF),)
            etype = nxt
            pos += 4
        self.buf = buf
        self.offset = offset
        self.dst: bytes = dst
        self.src: bytes = src
        self.ethertype: int = etype
        self.tags = tags
        self.header_len = pos - offset

    @property
    def vlan(self) -> int | None:
        """The outer VLAN id, or None when untagged."""
        return self.tags[0].vid if self.tags else None

    @property
    def payload_offset(self) -> int:
        """Where the payload (e.g. the IP header) starts in `buf`."""
        return self.offset + self.header_len

    @property
    def payload(self) -> memoryview:
        """The bytes after the header (to the end of the buffer), without copying."""
        return memoryview(self.buf)[self.offset + self.header_len :]

    @property
    def is_broadcast(self) -> bool:
        return self.dst == BROADCAST

    @property
    def is_multicast(self) -> bool:
        """True for group addresses (broadcast included): the I/G bit of the first octet."""
        return bool(self.dst[0] & 1)

    def set_dst(self, mac: bytes) -> None:
        """Rewrite the destination address in place (the buffer must be writable)."""
        _set_mac(self, 0, mac)
        self.dst = bytes(mac)

    def set_src(self, mac: bytes) -> None:
        """Rewrite the source address in place (the buffer must be writable)."""
        _set_mac(self, 6, mac)
        self.src = bytes(mac)

    def __repr__(self) -> str:
        vl = f" vlan={[t.vid for t in self.tags]}" if self.tags else ""
        return f"<Ethernet {mac_str(self.src)} > {mac_str(self.dst)} type=0x{self.ethertype:04x}{vl}>"


def _set_mac(view: Ethernet, at: int, mac: bytes) -> None:
    if len(mac) != 6:
        raise ValueError(f"a MAC address is 6 bytes, got {len(mac)}")
    memoryview(view.buf)[view.offset + at : view.offset + at + 6] = mac


def mac_str(mac: bytes) -> str:
    """`b'\\x02\\x00\\x00\\x00\\x00\\x01'` -> `'02:00:00:00:00:01'`."""
    return ":".join(f"{b:02x}" for b in mac)


def parse_mac(text: str | bytes) -> bytes:
    """`'02:00:00:00:00:01'` (or `-` separated, or 6 raw bytes) -> 6 bytes; ValueError otherwise."""
    if isinstance(text, (bytes, bytearray)):
        if len(text) != 6:
            raise ValueError(f"a MAC address is 6 bytes, got {len(text)}")
        return bytes(text)
    parts = text.replace("-", ":").split(":")
    if len(parts) != 6 or not all(1 <= len(p) <= 2 for p in parts):
        raise ValueError(f"not a MAC address: {text!r} (expected six hex octets like 02:00:00:00:00:01)")
    try:
        return bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"not a MAC address: {text!r} (expected six hex octets like 02:00:00:00:00:01)") from None
