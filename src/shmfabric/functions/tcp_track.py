"""TCP window tracking for connection tracking: which segments of a connection are plausible.

A port of the checks Linux's nf_conntrack applies to every TCP segment (`tcp_in_window` in
net/netfilter/nf_conntrack_proto_tcp.c; Guido van Rooij's "Real Stateful TCP Packet Filtering
in IP Filter"), so that a firewall's connection table cannot be steered by segments nobody in
the connection could have sent:

* each direction keeps the highest sequence number it sent (`end`), the highest the other side
  allowed it to send (`maxend`), the largest window it advertised (`maxwin`), its window scale
  and the highest ack it sent (`maxack`);
* a segment is in window when its sequence range overlaps what the receiver could accept and its
  ack falls in what the receiver could have sent: (I) seq <= sender.maxend, (II) end >= sender.end
  - receiver.maxwin, (III) ack <= receiver.end, (IV) ack >= receiver.end - sender.maxwin.

So a blind (off-path) attacker must guess within a window: a spoofed handshake's final ACK must
acknowledge the server's initial sequence number, which it never saw, and a spoofed RST must fall
in the receiver's window. As Linux does since 5.15, a RST in window closes the connection only if
its sequence number is exactly the one the other side acknowledged last (`maxack`); another
in-window RST is let through but changes nothing (the receiver answers it with a challenge ACK,
RFC 5961 section 3). A RST below that ack is invalid.

A connection first seen mid-stream (no SYN: the table was restarted, or the path changed) is
tracked *liberally*, as Linux does: its windows are learned from what passes and nothing of it is
judged invalid, except RSTs as above.

Pure logic: segments come in as numbers (`Segment`), nothing here reads packets or clocks. Our
own code because no maintained Python library tracks TCP windows (Scapy and dpkt decode only).
"""
from __future__ import annotations

from struct import Struct
from typing import NamedTuple

from shmfabric.net.errors import MalformedError
from shmfabric.net.packet import decode

__all__ = ["Segment", "TcpTrack", "segment", "SYN", "FIN", "RST", "ACK"]

FIN, SYN, RST, ACK = 0x01, 0x02, 0x04, 0x10

_M = 0xFFFFFFFF
_HALF = 0x80000000
# Largest window scale (RFC 7323 section 2.3).
_MAX_SCALE = 14


class Segment(NamedTuple):
    """What window tracking needs of a TCP segment (all from its headers)."""

    seq: int
    ack: int
    window: int
    length: int       # payload bytes, plus one each for SYN and FIN (the sequence space it takes)
    flags: int        # TCP flags (FIN 0x01, SYN 0x02, RST 0x04, ACK 0x10)
    wscale: int = -1  # the window-scale option of a SYN, -1 if absent (only read on SYNs)


# IPv4 without options, TCP right after it: total length, then seq, ack, data offset, flags, window.
_FAST_IP = Struct("!2xH20xIIBBH").unpack_from
_FAST_ETH = Struct("!12xH2xH20xIIBBH").unpack_from


def segment(buf, link: str = "ip") -> Segment | tuple | None:
    """The `Segment` of a frame holding a TCP segment (`link` "ip" or "ethernet"), or its fields
    as a plain tuple (the fast path: building a named tuple costs more than the rest); None if
    the frame is not a well-formed TCP segment."""
    try:
        if link == "ip":
            if len(buf) >= 40 and buf[0] == 0x45:
                tlen, seq, ack, off, fl, win = _FAST_IP(buf, 0)
                hl = (off >> 4) * 4
                if not fl & SYN and 40 <= tlen <= len(buf) and 20 <= hl <= tlen - 20:
                    return (seq, ack, win, tlen - 20 - hl + (fl & FIN), fl | (off & 1) << 8, -1)  # a Segment's fields
        elif len(buf) >= 54 and buf[14] == 0x45:
            et, tlen, seq, ack, off, fl, win = _FAST_ETH(buf, 0)
            hl = (off >> 4) * 4
            if et == 0x0800 and not fl & SYN and 40 <= tlen <= len(buf) - 14 and 20 <= hl <= tlen - 20:
                return (seq, ack, win, tlen - 20 - hl + (fl & FIN), fl | (off & 1) << 8, -1)
        p = decode(buf, 0, link)
    except (MalformedError, IndexError, ValueError):
        return None
    tcp = p.l4
    if p.reason is not None or tcp is None or tcp.__class__.__name__ != "TCP":
        return None
    fl = tcp.flags
    wscale = -1
    if fl & SYN:
        for kind, data in tcp.iter_options():
            if kind == 3 and len(data) == 1:
                wscale = min(data[0], _MAX_SCALE)
    length = tcp.end - tcp.offset - tcp.header_len + (fl & FIN) + ((fl & SYN) >> 1)
    return Segment(tcp.seq, tcp.ack, tcp.window, length, fl, wscale)


def _before(a: int, b: int) -> bool:
    """a comes before b in sequence space (RFC 1982 serial arithmetic)."""
    return (a - b) & _M >= _HALF


# Each side's state, as Linux's `struct ip_ct_tcp_state`, is a list: [end of what the side sent,
# the most the other side let it send, the largest window it advertised, its window scale (-1:
# none offered), the highest ack it sent (-1: none yet)]. Lists indexed by constants, not objects
# with attributes, and literal constants in `accept`, not module globals: it runs for every TCP
# packet of a tracked connection, and each of those choices saves about a tenth of its time.
_END, _MAXEND, _MAXWIN, _SCALE, _MAXACK = range(5)


class _Side:
    """A read-only view of one side of a `TcpTrack` (tests, status)."""

    __slots__ = ("_s",)

    def __init__(self, s: list[int]) -> None:
        self._s = s

    end = property(lambda self: self._s[_END])
    maxend = property(lambda self: self._s[_MAXEND])
    maxwin = property(lambda self: self._s[_MAXWIN])
    scale = property(lambda self: self._s[_SCALE])
    maxack = property(lambda self: self._s[_MAXACK])


class TcpTrack:
    """The window state of one TCP connection (both directions).

    `accept(direction, seg)` (0: the side that opened, 1: the other) says whether the segment is
    in window and learns from it if so. `liberal` connections learn from every segment and are
    never out of window.
    """

    __slots__ = ("a", "b", "liberal")

    def __init__(self, liberal: bool = False) -> None:
        self.a = [0, 0, 0, -1, -1]  # the side that opened
        self.b = [0, 0, 0, -1, -1]
        self.liberal = liberal

    @property
    def sides(self) -> tuple[_Side, _Side]:
        return _Side(self.a), _Side(self.b)

    def accept(self, direction: int, seg: Segment | tuple) -> bool:
        """True if `seg`, sent by side `direction`, is in window (and its state is learned)."""
        if direction:
            snd = self.b
            rcv = self.a
        else:
            snd = self.a
            rcv = self.b
        seq, ack, win, length, flags, wscale = seg
        end = (seq + length) & 0xFFFFFFFF
        if flags & 0x02:  # SYN
            if not flags & 0x10 or snd[2] == 0:
                # A SYN (or the first SYN-ACK) starts this side afresh: a retransmitted or new
                # SYN may carry another initial sequence number (Linux re-initialises too).
                snd[0] = snd[1] = end
                snd[2] = win or 1
                snd[3] = wscale
                snd[4] = -1
                if flags & 0x10 and (wscale < 0 or rcv[3] < 0):
                    snd[3] = rcv[3] = -1  # scaling only if both SYNs offered it (RFC 7323)
        elif snd[2] == 0:
            # First segment of this side without a SYN: a mid-stream pickup, or the answer to a
            # SYN that was lost to us. Learn where it is (Linux's "we haven't seen traffic in
            # this direction yet").
            snd[0] = end
            snd[2] = w = win or 1
            snd[1] = (end + w) & 0xFFFFFFFF
            if rcv[2] == 0 and flags & 0x10:
                rcv[0] = rcv[1] = ack
        snd_end = snd[0]
        rcv_end = rcv[0]
        if not flags & 0x10 or (flags & 0x04 and ack == 0):
            ack = rcv_end  # no ack to judge (Linux: broken stacks send RST+ACK with ack 0)
        # The four checks, in serial arithmetic (x before y: bit 31 of x - y is set; Python's ints
        # are two's complement at any width, so the bit can be tested without reducing mod 2^32,
        # and the four tests are one OR):
        # (I) seq <= snd.maxend, (II) end >= snd.end - rcv.maxwin, (III) ack <= rcv.end,
        # (IV) ack >= rcv.end - (snd.maxwin or MAXACKWINDOW, 66000).
        if self.liberal or not ((snd[1] - seq) | (end - snd_end + rcv[2]) | (rcv_end - ack)
                                | (ack - rcv_end + (snd[2] or 66000))) & 0x80000000:
            if not flags & 0x02 and snd[3] > 0:
                win <<= snd[3]
            if snd[2] < win:
                snd[2] = win
            if (snd_end - end) & 0x80000000:
                snd[0] = end
            if flags & 0x10:
                m = snd[4]
                if m < 0 or (m - ack) & 0x80000000:
                    snd[4] = ack
            maxend = snd[1]
            if (maxend - end) & 0x80000000 and rcv[2]:
                rcv[2] += (end - maxend) & 0xFFFFFFFF
            top = (ack + win) & 0xFFFFFFFF
            if (rcv[1] - 1 - top) & 0x80000000:
                rcv[1] = (top + (win == 0)) & 0xFFFFFFFF
            return True
        return False

    def rst_closes(self, direction: int, seq: int) -> bool | None:
        """For an in-window RST from `direction`: True if it closes the connection (its sequence
        number is the one the other side acknowledged last, or no ack is known), False if it
        is let through without effect (in window, not exact: a challenge ACK answers it), None
        if it is invalid (below that ack: already acknowledged data)."""
        maxack = (self.a if direction else self.b)[_MAXACK]
        if maxack < 0 or seq == maxack:
            return True
        return None if _before(seq, maxack) else False
