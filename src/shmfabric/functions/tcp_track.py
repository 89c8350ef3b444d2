"""TCP connection tracking as Linux's nf_conntrack does it: states, flags and windows.

A port of net/netfilter/nf_conntrack_proto_tcp.c (Linux 6.1): the state table
(`tcp_conntracks`, NONE -> SYN_SENT -> SYN_RECV -> ESTABLISHED -> FIN_WAIT ... CLOSE), the
flag-combination check (`tcp_error`), the pickup of connections met mid-stream (`tcp_new`,
nf_conntrack_tcp_loose), the window checks of every segment (`tcp_in_window`, after Guido van
Rooij's "Real Stateful TCP Packet Filtering in IP Filter") and the special cases around them:
SYNs and SYN-ACKs that are ignored until the two ends show they are in sync (a reused port
pair), RSTs that close only at the exact expected sequence number (RFC 5961: an inexact one
in window passes without effect, the receiver challenges it), RST trains, simultaneous open,
challenge ACKs in LAST_ACK, the "more bytes than the window" workaround, retransmission
counting. So a blind (off-path) attacker cannot steer the table: a spoofed handshake's final
ACK must acknowledge an initial sequence number it never saw, a spoofed RST must hit one exact
number, invalid flag combinations (SYN+RST, SYN+FIN, FIN without ACK, no flags) are invalid.

Each segment gets one of: ACCEPT (passes, state learned), IGNORE (passes, changes nothing),
INVALID (what `ct state invalid drop` drops), KILL (passes, the entry is deleted: a RST answering
the first packet), REOPEN (the entry is deleted and the packet is a new connection: a SYN after
the connection closed). Not ported: SACK blocks (the cumulative ack is used: it only makes the
lower ack bound stricter, which Linux 6.1 answers with IGNORE, not INVALID), NAT sequence
offsets, SYN proxy. tests/functions/test_tcp_linux.py checks the port against the running
kernel's conntrack, packet by packet.

Pure logic: segments come in as numbers (`Segment`), nothing here reads packets or clocks. Our
own code because no maintained Python library tracks TCP connections (Scapy and dpkt decode only).
"""
from __future__ import annotations

from struct import Struct
from typing import NamedTuple

from shmfabric.net.errors import MalformedError
from shmfabric.net.packet import decode

__all__ = ["Segment", "TcpTrack", "BatchSegments", "segment", "valid_flags", "may_start", "ACCEPT", "IGNORE", "INVALID", "KILL",
           "REOPEN", "STATE_NAMES", "LINUX_TIMEOUTS", "SYN", "FIN", "RST", "ACK"]

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


# A gathered record (FrameBatch.gather(36)): the frame's length, then the IPv4 header fields a
# segment needs (version/IHL, total length, fragment), then seq, ack, data offset, flags, window.
_GATHERED = Struct("!IBxH2xH16xIIBBH").unpack_from


class BatchSegments:
    """`segments[i]`: the `Segment` fields of frame i of a batch (`link` "ip"), read on first use.

    For the firewall: only TCP packets of tracked connections need them, so a batch of UDP pays
    nothing, and a fabric batch is read with one `gather` (one C pass over every frame's first 36
    bytes) the first time a TCP packet asks, then one unpack per TCP packet. A frame the fixed
    offsets do not fit (IP options, a SYN, whose options are needed) is read by `segment`.
    """

    __slots__ = ("frames", "raw")

    def __init__(self, frames) -> None:
        self.frames = frames
        self.raw: bytes | None = None

    def __getitem__(self, i: int):
        raw = self.raw
        if raw is None:
            gather = getattr(self.frames, "gather", None)
            if gather is None:  # a list of buffers
                return segment(self.frames[i])
            raw = self.raw = gather(36)
        n, vihl, tlen, ff, seq, ack, off, fl, win = _GATHERED(raw, i * 40)
        hl = (off >> 4) * 4
        if vihl == 0x45 and not fl & SYN and 40 <= tlen <= n and 20 <= hl <= tlen - 20:
            return (seq, ack, win, tlen - 20 - hl + (fl & FIN), fl | (off & 1) << 8, -1)
        return segment(self.frames[i])


def _before(a: int, b: int) -> bool:
    """a comes before b in sequence space (RFC 1982 serial arithmetic)."""
    return (a - b) & _M >= _HALF


# --- Linux's names -----------------------------------------------------------------------------------

# connection states (enum tcp_conntrack), then the table's two non-states
NONE, SYN_SENT, SYN_RECV, ESTABLISHED, FIN_WAIT, CLOSE_WAIT, LAST_ACK, TIME_WAIT, CLOSE, SYN_SENT2 = range(10)
_IV, _IG = 10, 11
STATE_NAMES = ("NONE", "SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT", "CLOSE_WAIT", "LAST_ACK",
               "TIME_WAIT", "CLOSE", "SYN_SENT2")
#: States in which a connection is closing (FIN or RST seen).
CLOSING_STATES = frozenset((FIN_WAIT, CLOSE_WAIT, LAST_ACK, TIME_WAIT, CLOSE))

# which flags a segment has, for the table (enum tcp_bit_set)
_I_SYN, _I_SYNACK, _I_FIN, _I_ACK, _I_RST, _I_NONE = range(6)

(NO, SS, SR, ES, FW, CW, LA, TW, CL, S2, IV, IG) = range(12)
# tcp_conntracks[direction][index][state] (ORIGINAL, then REPLY), as in Linux 6.1
_TABLE = (
    (  # ORIGINAL  sNO sSS sSR sES sFW sCW sLA sTW sCL sS2
        (SS, SS, IG, IG, IG, IG, IG, SS, SS, S2),  # syn
        (IV, IV, SR, IV, IV, IV, IV, IV, IV, SR),  # synack
        (IV, IV, FW, FW, LA, LA, LA, TW, CL, IV),  # fin
        (ES, IV, ES, ES, CW, CW, TW, TW, CL, IV),  # ack
        (IV, CL, CL, CL, CL, CL, CL, CL, CL, CL),  # rst
        (IV,) * 10,                                 # none
    ),
    (  # REPLY
        (IV, S2, IV, IV, IV, IV, IV, SS, IV, S2),
        (IV, SR, IG, IG, IG, IG, IG, IG, IG, SR),
        (IV, IV, FW, FW, LA, LA, LA, TW, CL, IV),
        (IV, IG, SR, ES, CW, CW, TW, TW, CL, IG),
        (IV, CL, CL, CL, CL, CL, CL, CL, CL, CL),
        (IV,) * 10,
    ),
)

# tcp_valid_flags: the combinations of FIN, SYN, RST, ACK, URG a segment may have (PSH, ECE and
# CWR are always valid)
_VALID_FLAGS = frozenset((0x02, 0x22, 0x12, 0x04, 0x14, 0x11, 0x31, 0x10, 0x30))

# per-side flags (IP_CT_TCP_FLAG_*) and the connection's last_flags bits
_F_WSCALE, _F_SACK_PERM, _F_CLOSE_INIT, _F_LIBERAL, _F_UNACKED, _F_MAXACK = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_F_CHALLENGE, _F_SIMULTANEOUS = 0x40, 0x80  # (last_flags: IP_CT_EXP_CHALLENGE_ACK, IP_CT_TCP_SIMULTANEOUS_OPEN)

_MAXACKWINCONST = 66000
_MAX_RETRANS = 3  # nf_conntrack_tcp_max_retrans

# what a segment does (see the module docstring)
ACCEPT, IGNORE, INVALID, KILL, REOPEN = range(5)

# `TcpTrack(timeouts=)`: seconds per state (indexed by state), then after 3 retransmissions and
# while data is unacknowledged (Linux's TCP_CONNTRACK_RETRANS and _UNACK)
_RETRANS, _UNACK = 10, 11
LINUX_TIMEOUTS = (120.0, 120.0, 60.0, 5 * 86400.0, 120.0, 60.0, 30.0, 120.0, 10.0, 120.0, 300.0, 300.0)


def _index(flags: int) -> int:
    if flags & 0x04:
        return _I_RST
    if flags & 0x02:
        return _I_SYNACK if flags & 0x10 else _I_SYN
    if flags & 0x01:
        return _I_FIN
    return _I_ACK if flags & 0x10 else _I_NONE


def valid_flags(flags: int) -> bool:
    """Whether a segment's flag combination is one a TCP may send (Linux's tcp_error)."""
    return (flags & 0x37) in _VALID_FLAGS


def may_start(flags: int) -> bool:
    """Whether a segment may create a connection entry: a SYN, or (a connection picked up
    mid-stream, nf_conntrack_tcp_loose) an ACK; both with valid flags (Linux's tcp_new)."""
    return (flags & 0x37) in _VALID_FLAGS and _TABLE[0][_index(flags)][NONE] < IV


class _Side:
    """A read-only view of one side of a `TcpTrack` (tests, status)."""

    __slots__ = ("_s",)

    def __init__(self, s: list[int]) -> None:
        self._s = s

    end = property(lambda self: self._s[0])
    maxend = property(lambda self: self._s[1])
    maxwin = property(lambda self: self._s[2])
    scale = property(lambda self: self._s[3])
    maxack = property(lambda self: self._s[4] if self._s[5] & _F_MAXACK else -1)
    liberal = property(lambda self: bool(self._s[5] & _F_LIBERAL))


class TcpTrack:
    """The tracking state of one TCP connection, as Linux's `struct ip_ct_tcp` plus the
    connection's SEEN_REPLY and ASSURED bits.

    Create it with the first segment (`TcpTrack(seg, liberal, timeouts)`, after `may_start`),
    then call `packet(direction, seg)` for every segment (0: the side that opened, 1: the other),
    the first one included; it returns ACCEPT, IGNORE, INVALID, KILL or REOPEN, and `timeout` is
    the idle timeout (s) the connection's state asks for after an ACCEPT (None: keep the current
    expiry); `shrink` asks for at most the unacknowledged-data timeout after an INVALID. The
    caller marks `seen_reply` after a packet from side 1 that was not INVALID, as Linux's core
    does. `timeouts`: seconds per state, then retransmissions and unacknowledged data
    (`LINUX_TIMEOUTS` is Linux's).
    """

    __slots__ = ("a", "b", "state", "liberal", "seen_reply", "assured", "last_index", "last_dir", "last_seq",
                 "last_ack", "last_end", "last_win", "last_wscale", "last_flags", "retrans", "timeout", "shrink", "tmo")

    def __init__(self, seg: Segment | tuple, liberal: bool = False, timeouts: tuple = LINUX_TIMEOUTS) -> None:
        seq, ack, win, length, flags, wscale = seg
        end = (seq + length) & _M
        # Each side, as `struct ip_ct_tcp_state`: [td_end, td_maxend, td_maxwin, td_scale, td_maxack, flags].
        # Lists indexed by constants: `packet` runs for every segment of a tracked connection.
        self.a = a = [end, end, win or 1, 0, 0, 0]
        self.b = [0, 0, 0, 0, 0, 0]
        if _index(flags) == _I_SYN:  # tcp_new: a SYN
            if wscale >= 0:
                a[3] = wscale
                a[5] = _F_WSCALE
        else:  # picked up mid-stream: "we assume SACK and liberal window checking"
            a[1] = (end + a[2]) & _M
            a[5] = self.b[5] = _F_SACK_PERM | _F_LIBERAL
        self.state = NONE
        self.liberal = liberal  # nf_conntrack_tcp_be_liberal, for every connection
        self.seen_reply = self.assured = False
        self.last_index = _I_NONE
        self.last_dir = self.last_seq = self.last_ack = self.last_end = self.last_win = 0
        self.last_wscale = self.last_flags = self.retrans = 0
        self.timeout: float | None = None
        self.shrink = False  # set by an INVALID FIN/RST that asks for the shorter timeout
        self.tmo = timeouts

    @property
    def sides(self) -> tuple[_Side, _Side]:
        return _Side(self.a), _Side(self.b)

    @property
    def state_name(self) -> str:
        return STATE_NAMES[self.state]

    def established(self) -> bool:
        return self.state == ESTABLISHED and self.assured

    def packet(self, d: int, seg: Segment | tuple) -> int:
        """What segment `seg` from side `d` does (nf_conntrack_tcp_packet)."""
        seq, ack, win, length, flags, wscale = seg
        if flags & 0x17 == 0x10 and self.state == 3:
            # The bulk of traffic: an ACK (with or without data) on an ESTABLISHED connection,
            # in window. The general path below, specialised and inlined for it (ESTABLISHED ->
            # ESTABLISHED, no SYN/FIN/RST): a call costs ~0.1 us, and this runs for every segment.
            if d:
                snd = self.b
                rcv = self.a
            else:
                snd = self.a
                rcv = self.b
            if snd[2]:
                end = (seq + length) & 0xFFFFFFFF
                snd_end = snd[0]
                rcv_end = rcv[0]
                maxackwin = snd[2] if snd[2] > 66000 else 66000
                # seq <= maxend; ack <= rcv.end; end in the receive window; ack not overly delayed
                # (x before y: bit 31 of x - y, at any width: Python ints are two's complement)
                if ((seq - snd[1] - 1) & (ack - rcv_end - 1) & 0x80000000
                        and (not rcv[2] or (snd_end - rcv[2] - 1 - end) & 0x80000000)
                        and (rcv_end - maxackwin - 1 - ack) & 0x80000000):
                    win_raw = win
                    win <<= snd[3]
                    if snd[2] < win:
                        snd[2] = win
                    if (snd_end - end) & 0x80000000:
                        snd[0] = end
                        snd[5] |= 0x10  # data unacknowledged
                    if not snd[5] & 0x20:
                        snd[4] = ack
                        snd[5] |= 0x20
                    elif (snd[4] - ack) & 0x80000000:
                        snd[4] = ack
                    if rcv[2] and (snd[1] - end) & 0x80000000:
                        rcv[2] += (end - snd[1]) & 0xFFFFFFFF
                    top = (ack + win) & 0xFFFFFFFF
                    if (rcv[1] - 1 - top) & 0x80000000:
                        rcv[1] = (top + (win == 0)) & 0xFFFFFFFF
                    if ack == rcv_end:
                        rcv[5] &= ~0x10
                    if (self.last_dir == d and self.last_seq == seq and self.last_ack == ack and self.last_end == end
                            and self.last_win == win_raw):
                        self.retrans += 1
                    else:
                        self.last_dir = d
                        self.last_seq = seq
                        self.last_ack = ack
                        self.last_end = end
                        self.last_win = win_raw
                        self.retrans = 0
                    self.last_index = _I_ACK
                    tmo = self.tmo
                    t_new = tmo[3]
                    if self.retrans >= _MAX_RETRANS and t_new > tmo[_RETRANS]:
                        t_new = tmo[_RETRANS]
                    elif (snd[5] | rcv[5]) & 0x10 and t_new > tmo[_UNACK]:
                        t_new = tmo[_UNACK]
                    elif win_raw == 0 and t_new > tmo[_RETRANS]:
                        t_new = tmo[_RETRANS]
                    if not self.seen_reply:
                        if t_new > tmo[_UNACK]:
                            t_new = tmo[_UNACK]
                    elif not self.assured:
                        self.assured = True
                    self.timeout = t_new
                    self.shrink = False
                    return ACCEPT
        self.timeout = None
        self.shrink = False
        if (flags & 0x37) not in _VALID_FLAGS:  # tcp_error
            return INVALID
        index = _index(flags)
        old = self.state
        new = _TABLE[d][index][old]
        end = (seq + length) & _M
        if new == SS or new == IG:
            go_on = False
            if new == SS:
                if old < TW:
                    go_on = True
                elif (self.a[5] | self.b[5]) & _F_CLOSE_INIT or (self.last_dir == d and self.last_index == _I_RST):
                    return REOPEN  # a closed or aborted connection opened again: a new one
            if not go_on:
                if (index == _I_SYNACK and self.last_index == _I_SYN and self.last_dir != d
                        and ack == self.last_end):
                    # This SYN-ACK answers a SYN we ignored: both ends are in sync, we are not.
                    old, new = SYN_SENT, SYN_RECV
                    s = self.b if self.last_dir else self.a
                    s[0] = s[1] = self.last_end
                    s[2] = self.last_win or 1
                    s[3] = self.last_wscale
                    self.last_flags &= ~_F_CHALLENGE
                    s[5] = self.last_flags & (_F_WSCALE | _F_SACK_PERM)
                    r = self.b if d else self.a
                    r[0] = r[1] = r[2] = r[3] = r[4] = 0
                    r[5] &= _F_LIBERAL
                else:
                    self.last_index = index
                    self.last_dir = d
                    self.last_seq = seq
                    self.last_end = end
                    self.last_win = win
                    if index == _I_SYN and d == 0:
                        self.last_flags = self.last_wscale = 0
                        if wscale >= 0:
                            self.last_flags |= _F_WSCALE
                            self.last_wscale = wscale
                        if old == LAST_ACK:
                            self.last_flags |= _F_CHALLENGE
                    if old == SYN_SENT and index == _I_ACK and d == 1:
                        self.last_ack = ack  # possible challenge ACK answering the SYN
                    return IGNORE
        elif new == IV:
            return INVALID
        elif new == TW:
            if (old == LAST_ACK and index == _I_ACK and self.last_dir != d and self.last_index == _I_SYN
                    and self.last_flags & _F_CHALLENGE):
                self.last_flags &= ~_F_CHALLENGE  # an RFC 5961 challenge ACK, not the last ACK
                return IGNORE
        elif new == S2:
            self.last_flags |= _F_SIMULTANEOUS
        elif new == SR:
            if d == 1 and index == _I_ACK and self.last_flags & _F_SIMULTANEOUS:
                new = ESTABLISHED
        elif new == CL and index == _I_RST:
            r, keep = self._rst(d, seq, ack, old)
            if r == INVALID:
                return INVALID
            if keep:  # in window but not exact: the receiver answers it with a challenge ACK
                new = old
            if r == IN_WINDOW:
                return self._in_window_done(d, index, old, new, flags)
        res = self._in_window(d, index, seq, ack, win, end, flags, wscale)
        if res != ACCEPT:
            if res == INVALID and self.assured and (index == _I_RST or index == _I_FIN):
                # nf_tcp_handle_invalid: an out-of-window FIN/RST answering one from the other
                # side shortens the timeout; otherwise remember it
                if self.last_dir != d and (self.last_index == _I_FIN or self.last_index == _I_RST):
                    self.shrink = True
                else:
                    self.last_index = index
                    self.last_dir = d
            return res
        return self._in_window_done(d, index, old, new, flags)

    def _rst(self, d: int, seq: int, ack: int, old: int) -> tuple[int | None, bool]:
        # The RST cases of the CLOSE transition: (INVALID, IN_WINDOW (skip the window check) or
        # None (check it), and whether the state stays as it is).
        if old in CLOSING_STATES:  # tcp_can_early_drop: the tuple may be reused already
            return IN_WINDOW, False
        other = self.a if d else self.b
        keep = False
        if other[5] & _F_MAXACK and self.last_index != _I_SYN:
            maxack = other[4]
            established = self.established()
            if seq == 0 and not established:
                return None, False
            if _before(seq, maxack):
                return INVALID, False
            if not established or seq == maxack:
                return None, False
            if self.last_index == _I_ACK and self.last_dir == d and seq == self.last_end:
                return None, False  # a RST train: data, then a RST at its end
            keep = True
        if ((self.seen_reply and self.last_index == _I_SYN) or (not self.assured and self.last_index == _I_ACK)) \
                and ack == self.last_end:
            return IN_WINDOW, keep  # a RST to a SYN or ACK we let through (ignored)
        if old == SYN_SENT and self.last_index == _I_ACK and self.last_dir == 1 and seq == self.last_ack:
            return IN_WINDOW, keep  # a RST answering a challenge ACK we let through
        return None, keep

    def _in_window(self, d: int, index: int, seq: int, ack: int, win: int, end: int, flags: int, wscale: int) -> int:
        # tcp_in_window
        if d:
            snd = self.b
            rcv = self.a
        else:
            snd = self.a
            rcv = self.b
        sack = ack
        if snd[2] == 0:
            if flags & 0x02:
                self._init_sender(snd, rcv, end, win, wscale, d)
                if not flags & 0x10:
                    return ACCEPT  # simultaneous open
            else:  # mid-stream: its history is lost to us
                snd[0] = end
                swin = win << snd[3]
                snd[2] = swin or 1
                snd[1] = (end + snd[2]) & _M
                if rcv[2] == 0:
                    rcv[0] = rcv[1] = sack
                elif sack == (rcv[0] + 1) & _M:
                    rcv[0] = sack  # a reply to a keepalive
        elif flags & 0x02 and _before(snd[0], end) and self.state in (SYN_SENT, SYN_RECV):
            self._init_sender(snd, rcv, end, win, wscale, d)  # a new SYN: re-initialise
            if d == 1 and not flags & 0x10:
                return ACCEPT
        if not flags & 0x10:
            ack = sack = rcv[0]  # no ACK: pretend it was set and right
        elif flags & 0x04 and ack == 0:
            ack = sack = rcv[0]  # broken stacks' RST+ACK with ack 0
        if flags & 0x04 and seq == 0 and self.state == SYN_SENT:
            seq = end = snd[0]  # a RST answering a SYN
        liberal = self.liberal or snd[5] & _F_LIBERAL
        maxackwin = snd[2] if snd[2] > _MAXACKWINCONST else _MAXACKWINCONST
        if (seq - snd[1] - 1) & _HALF == 0:  # not before(seq, maxend + 1): over the upper bound
            overshot = (end - snd[1] + 1) & _M
            ack_ok = _before((rcv[0] - maxackwin - 1) & _M, sack)
            in_recv_win = rcv[2] and _before((snd[0] - rcv[2] - 1) & _M, end)
            if in_recv_win and ack_ok and overshot <= rcv[2] and _before(sack, (rcv[0] + 1) & _M):
                # a TCP that sends more than the window allows: learn the end, pass, no update
                snd[0] = end
                snd[5] |= _F_UNACKED
                return ACCEPT if liberal else IGNORE
            return ACCEPT if liberal else INVALID
        if not _before(sack, (rcv[0] + 1) & _M):  # ACK over the upper bound (acked data not seen)
            return ACCEPT if liberal else INVALID
        if rcv[2] and not _before((snd[0] - rcv[2] - 1) & _M, end):  # already acked data retransmitted
            return ACCEPT if liberal else IGNORE
        if not _before((rcv[0] - maxackwin - 1) & _M, sack):  # an overly delayed ACK
            return ACCEPT if liberal else IGNORE
        win_raw = win
        if not flags & 0x02:
            win <<= snd[3]
        swin = win  # + (sack - ack): no SACK blocks are read
        if snd[2] < swin:
            snd[2] = swin
        if _before(snd[0], end):
            snd[0] = end
            snd[5] |= _F_UNACKED
        if flags & 0x10:
            if not snd[5] & _F_MAXACK:
                snd[4] = ack
                snd[5] |= _F_MAXACK
            elif _before(snd[4], ack):
                snd[4] = ack
        if rcv[2] and _before(snd[1], end):
            rcv[2] += (end - snd[1]) & _M
        if _before((rcv[1] - 1) & _M, (sack + win) & _M):
            rcv[1] = (sack + win + (win == 0)) & _M
        if ack == rcv[0]:
            rcv[5] &= ~_F_UNACKED
        if index == _I_ACK:  # retransmissions
            if (self.last_dir == d and self.last_seq == seq and self.last_ack == ack and self.last_end == end
                    and self.last_win == win_raw):
                self.retrans += 1
            else:
                self.last_dir = d
                self.last_seq = seq
                self.last_ack = ack
                self.last_end = end
                self.last_win = win_raw
                self.retrans = 0
        return ACCEPT

    @staticmethod
    def _init_sender(snd: list[int], rcv: list[int], end: int, win: int, wscale: int, d: int) -> None:
        snd[0] = snd[1] = end
        snd[2] = win or 1
        snd[3] = 0  # tcp_options
        snd[5] &= _F_LIBERAL
        if wscale >= 0:
            snd[3] = wscale
            snd[5] |= _F_WSCALE
        if d == 1 and not (snd[5] & _F_WSCALE and rcv[5] & _F_WSCALE):
            snd[3] = rcv[3] = 0  # scaling only if both SYNs offered it (RFC 7323)

    def _in_window_done(self, d: int, index: int, old: int, new: int, flags: int) -> int:
        self.last_index = index
        self.last_dir = d
        self.state = new
        if old != new and new == FIN_WAIT:
            (self.b if d else self.a)[5] |= _F_CLOSE_INIT
        tmo = self.tmo
        t_new = tmo[new]
        if self.retrans >= _MAX_RETRANS and t_new > tmo[_RETRANS]:
            timeout = tmo[_RETRANS]
        elif index == _I_RST:
            timeout = tmo[CLOSE]
        elif (self.a[5] | self.b[5]) & _F_UNACKED and t_new > tmo[_UNACK]:
            timeout = tmo[_UNACK]
        elif self.last_win == 0 and t_new > tmo[_RETRANS]:
            timeout = tmo[_RETRANS]
        else:
            timeout = t_new
        if not self.seen_reply:
            if flags & 0x04:
                return KILL  # the only answer is a RST: no connection
            if index == _I_SYN and old == SYN_SENT:
                return ACCEPT  # a retransmitted SYN does not renew the timeout
            if new == ESTABLISHED and timeout > tmo[_UNACK]:
                timeout = tmo[_UNACK]  # picked up mid-stream, no reply yet
        elif not self.assured and (old == SYN_RECV or old == ESTABLISHED) and new == ESTABLISHED:
            self.assured = True
        self.timeout = timeout
        return ACCEPT


# TcpTrack._rst's "skip the window check" (the value only needs to differ from the others)
IN_WINDOW = 20
