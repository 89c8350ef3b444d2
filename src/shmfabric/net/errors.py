"""Why a frame could not be parsed: one `Reason` per failure, and the one exception that carries it.

A function runs over batches of frames it did not write, so a bad frame must never stop the batch.
The net layer therefore reports a failure in two ways:

* the views (`Ethernet(buf)`, `IPv4(buf)`, ...) raise `MalformedError` carrying a `Reason`; that is
  what a caller asked for when it built one view on a frame it chose;
* the batch and decode entry points (`decode()`, `parse_5tuple()`, `classify_batch()`) never raise
  for bad input: they return the `Reason`, which the caller counts (`ReasonCounter`).

`Reason` is an `IntEnum` so a reason is cheap to return from a hot loop and to use as a counter
index; `Reason.X.describe()` gives the text for logs and `shmfabric status`.
"""
from __future__ import annotations

from enum import IntEnum


class Reason(IntEnum):
    """Why parsing stopped. Members below 100 are not malformed: the frame is fine, just not
    something the fast path classifies (e.g. ARP for a 5-tuple). 100 and above are malformed."""

    # --- well-formed but not classified ------------------------------------------------------
    NOT_IP = 1                #: EtherType is neither IPv4 nor IPv6 (ARP, LLDP, ...)
    FRAGMENT = 2              #: a non-first IP fragment: it has no L4 header, so no ports
    NO_L4 = 3                 #: IPv6 with "no next header" or ESP: nothing to classify past L3

    # --- malformed ---------------------------------------------------------------------------
    TRUNCATED_ETHERNET = 100  #: fewer than 14 bytes
    TRUNCATED_VLAN = 101      #: an 802.1Q/802.1ad tag runs past the end
    TOO_MANY_VLAN_TAGS = 102  #: more than two stacked tags (QinQ is the most we accept)
    TRUNCATED_ARP = 110       #: fewer than 28 bytes of ARP
    ARP_UNSUPPORTED = 111     #: ARP for something other than Ethernet/IPv4
    TRUNCATED_IPV4 = 120      #: fewer than 20 bytes, or fewer than IHL*4
    BAD_IP_VERSION = 121      #: version nibble does not match the EtherType (or is not 4/6)
    BAD_IPV4_IHL = 122        #: IHL below 5
    BAD_IPV4_LENGTH = 123     #: total length below the header length
    TRUNCATED_IPV4_PAYLOAD = 124  #: total length says more bytes than the frame holds
    BAD_IPV4_OPTIONS = 125    #: an option's length runs past the option area or is below 2
    TRUNCATED_IPV6 = 130      #: fewer than 40 bytes
    TRUNCATED_IPV6_PAYLOAD = 131  #: payload length says more bytes than the frame holds
    TRUNCATED_IPV6_EXT = 132  #: an extension header runs past the payload
    TOO_MANY_IPV6_EXT = 133   #: longer extension-header chain than we walk (see ip.MAX_EXT_HEADERS)
    BAD_IPV6_OPTIONS = 134    #: a Hop-by-Hop/Destination Options option runs past its header, or Hop-by-Hop is not first
    TRUNCATED_TCP = 140       #: fewer than 20 bytes, or fewer than data offset * 4
    BAD_TCP_OFFSET = 141      #: data offset below 5
    TRUNCATED_UDP = 150       #: fewer than 8 bytes, or fewer than the UDP length field says
    BAD_UDP_LENGTH = 151      #: UDP length below 8
    TRUNCATED_ICMP = 160      #: fewer than 8 bytes of ICMP/ICMPv6
    TRUNCATED_L4 = 170        #: fewer than 4 bytes where a port-carrying protocol needs its ports

    @property
    def malformed(self) -> bool:
        """True when the frame is broken (as opposed to merely not classifiable)."""
        return self >= 100

    def describe(self) -> str:
        """One line of text for logs and status output."""
        return _DESCRIPTIONS.get(self, self.name.lower().replace("_", " "))


_DESCRIPTIONS = {
    Reason.NOT_IP: "not an IP packet",
    Reason.FRAGMENT: "non-first IP fragment (no L4 header)",
    Reason.NO_L4: "no L4 header (IPv6 no-next-header or ESP)",
    Reason.TRUNCATED_ETHERNET: "frame shorter than an Ethernet header (14 bytes)",
    Reason.TRUNCATED_VLAN: "802.1Q tag runs past the end of the frame",
    Reason.TOO_MANY_VLAN_TAGS: "more than two stacked VLAN tags",
    Reason.TRUNCATED_ARP: "ARP shorter than 28 bytes",
    Reason.ARP_UNSUPPORTED: "ARP that is not Ethernet/IPv4",
    Reason.TRUNCATED_IPV4: "IPv4 header runs past the end of the frame",
    Reason.BAD_IP_VERSION: "IP version field does not match",
    Reason.BAD_IPV4_IHL: "IPv4 header length (IHL) below 5",
    Reason.BAD_IPV4_LENGTH: "IPv4 total length below its header length",
    Reason.TRUNCATED_IPV4_PAYLOAD: "IPv4 total length exceeds the frame",
    Reason.BAD_IPV4_OPTIONS: "IPv4 option length is invalid",
    Reason.TRUNCATED_IPV6: "IPv6 header runs past the end of the frame",
    Reason.TRUNCATED_IPV6_PAYLOAD: "IPv6 payload length exceeds the frame",
    Reason.TRUNCATED_IPV6_EXT: "IPv6 extension header runs past the payload",
    Reason.TOO_MANY_IPV6_EXT: "too many IPv6 extension headers",
    Reason.BAD_IPV6_OPTIONS: "IPv6 option runs past its header, or Hop-by-Hop header not first",
    Reason.TRUNCATED_TCP: "TCP header runs past the end of the packet",
    Reason.BAD_TCP_OFFSET: "TCP data offset below 5",
    Reason.TRUNCATED_UDP: "UDP header or length runs past the end of the packet",
    Reason.BAD_UDP_LENGTH: "UDP length below 8",
    Reason.TRUNCATED_ICMP: "ICMP header shorter than 8 bytes",
    Reason.TRUNCATED_L4: "L4 header too short to hold ports",
}


class MalformedError(ValueError):
    """A header view could not be built. `reason` says why, `offset` where (bytes into the buffer)."""

    def __init__(self, reason: Reason, offset: int = 0, detail: str = "") -> None:
        # The text is built in __str__, not here: decode() raises and catches one of these per
        # malformed frame, and a flood of them should not pay for formatting nobody reads.
        super().__init__(reason, offset, detail)
        self.reason = reason
        self.offset = offset
        self.detail = detail

    def __str__(self) -> str:
        text = f"{self.reason.describe()} (at byte {self.offset})"
        return f"{text}: {self.detail}" if self.detail else text


class ReasonCounter:
    """Counts reasons cheaply in a hot loop: `counter.add(r)`; `counter.as_dict()` for reporting.

    A list indexed by the reason's int value is faster than a dict or `collections.Counter` for
    the few hundred possible values, and this is what a function's counters are fed from.
    """

    __slots__ = ("_counts",)

    def __init__(self) -> None:
        self._counts = [0] * 256

    def add(self, reason: int, n: int = 1) -> None:
        self._counts[reason] += n

    def __getitem__(self, reason: int) -> int:
        return self._counts[reason]

    @property
    def malformed(self) -> int:
        """How many malformed frames were counted."""
        return sum(self._counts[100:])

    def as_dict(self) -> dict[str, int]:
        """Non-zero counts keyed by lower-case reason name, sorted by name (stable output)."""
        out = {Reason(i).name.lower(): c for i, c in enumerate(self._counts) if c and i in _VALID}
        return dict(sorted(out.items()))


_VALID = frozenset(int(r) for r in Reason)
