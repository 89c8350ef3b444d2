"""ARP view (RFC 826) for Ethernet/IPv4, the only kind that occurs on a fabric network.

    htype(2)=1 ptype(2)=0x0800 hlen(1)=6 plen(1)=4 op(2) sha(6) spa(4) tha(6) tpa(4)  = 28 bytes
"""
from __future__ import annotations

from struct import Struct
from typing import Union

from .errors import MalformedError, Reason

Buffer = Union[bytes, bytearray, memoryview]

ARP_LEN = 28
ARP_REQUEST = 1
ARP_REPLY = 2
_ARP = Struct("!HHBBH6sI6sI")


class ARP:
    """ARP header at `offset` in `buf`. Addresses: `sha`/`tha` 6 bytes, `spa`/`tpa` IPv4 ints.

    Raises `MalformedError` (TRUNCATED_ARP, or ARP_UNSUPPORTED for a non Ethernet/IPv4 ARP).
    """

    __slots__ = ("buf", "offset", "op", "sha", "spa", "tha", "tpa")

    def __init__(self, buf: Buffer, offset: int = 0) -> None:
        if len(buf) - offset < ARP_LEN:
            raise MalformedError(Reason.TRUNCATED_ARP, offset)
        htype, ptype, hlen, plen, op, sha, spa, tha, tpa = _ARP.unpack_from(buf, offset)
        if (htype, ptype, hlen, plen) != (1, 0x0800, 6, 4):
            raise MalformedError(
                Reason.ARP_UNSUPPORTED, offset, f"htype={htype} ptype=0x{ptype:04x} hlen={hlen} plen={plen}"
            )
        self.buf = buf
        self.offset = offset
        self.op: int = op
        self.sha: bytes = sha
        self.spa: int = spa
        self.tha: bytes = tha
        self.tpa: int = tpa

    @property
    def is_request(self) -> bool:
        return self.op == ARP_REQUEST

    @property
    def is_reply(self) -> bool:
        return self.op == ARP_REPLY

    @property
    def is_gratuitous(self) -> bool:
        """A host announcing its own address (sender and target protocol address equal)."""
        return self.spa == self.tpa

    def __repr__(self) -> str:
        from ipaddress import IPv4Address

        kind = {1: "request", 2: "reply"}.get(self.op, f"op={self.op}")
        return f"<ARP {kind} {IPv4Address(self.spa)} -> {IPv4Address(self.tpa)}>"
