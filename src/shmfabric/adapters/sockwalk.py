"""The socket walk: which TCP and UDP sockets a network namespace's kernel holds.

A global address is shared by several nodes, each a TAP adapter in its own network namespace;
the dispatcher picks a node for a new connection from the listeners and connections those
namespaces' kernels really have. `SocketWalker(netns).walk()` lists them, through the kernel's
sock_diag netlink interface (what `ss` uses): one dump per (family, protocol), four in all.

    with SocketWalker("node1") as w:
        for r in w.walk():
            ...  # SocketRecord(family=4, proto=6, laddr=None, lport=80, raddr=None, rport=0, state="listen")

Normalised records (the dispatcher relies on this):

- addresses as in `shmfabric.net.flow`: IPv4 an `int`, IPv6 16 `bytes`; a wildcard local address
  (0.0.0.0, ::) is None; no peer is raddr None and rport 0;
- an IPv4-mapped IPv6 address (::ffff:a.b.c.d) is reported as IPv4 (family 4, an int);
- an AF_INET6 socket bound to :: without IPV6_V6ONLY, and with no peer, accepts IPv4 too: it is
  reported twice, once as family 4 and once as family 6, both with laddr None;
- TCP states by their kernel names in lower case ("listen", "established", "time_wait", ...;
  request sockets are "syn_recv"; a socket only bound is "close"); UDP is "bound" (no peer) or
  "connected".

Why not pyroute2's `DiagSocket` (0.9.7 is installed): it ignores NLMSG_ERROR replies (its marshal
keys messages on the family byte, and the error type 2 is AF_INET, so it sets `error_type = -1`),
so a refused dump would go unreported; it turns every message into a dict with text addresses
that we would parse back; and its network-namespace sockets come from a forked child process
(and `ip netns add`-like creation by default, O_CREAT). The request and reply are two fixed C
structs, so they are written here with `struct` on a plain AF_NETLINK socket.

Linux only. Walking the current namespace needs no privilege; another namespace needs root
(CAP_SYS_ADMIN for setns).
"""
from __future__ import annotations

import ctypes
import errno
import os
import socket
import threading
from dataclasses import dataclass, field, replace
from struct import Struct
from types import TracebackType
from typing import Union

__all__ = ["NETNS_DIR", "SocketRecord", "SocketWalker", "WalkError"]

#: Where `ip netns add NAME` mounts a namespace.
NETNS_DIR = "/var/run/netns"

Address = Union[int, bytes]

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH
CLONE_NEWNET = 0x40000000
INET_DIAG_SKV6ONLY = 11
# Every state bit, including TCP_NEW_SYN_RECV (12, request sockets) and, on Linux >= 6.8,
# TCP_BOUND_INACTIVE (13: bound, neither listening nor connected), which the kernel dumps only
# when asked for by its bit.
ALL_STATES = 0xFFFFFFFF

_HDR = Struct("=IHHII")  # struct nlmsghdr: len, type, flags, seq, pid
# struct inet_diag_req_v2: family, protocol, ext, pad, states, then inet_diag_sockid
# (sport, dport, src[16], dst[16], if, cookie[2]) left zero: no filter.
_REQ = Struct("=BBBxI48x")
# struct inet_diag_msg up to the addresses: family, state, (timer, retrans), sport+dport (network
# order, unpacked by _PORTS), src, dst. The full struct is 72 bytes; attributes follow it.
_MSG = Struct("=BB2x4s16s16s")
_QUEUES = Struct("=II")  # idiag_rqueue, idiag_wqueue: for a listener, its accept queue and backlog
_QUEUES_AT = 56
_PORTS = Struct("!HH").unpack
_MSG_SIZE = 72
_NLA = Struct("=HH")
_ERRNO = Struct("=i")

_TCP_STATES = {
    1: "established", 2: "syn_sent", 3: "syn_recv", 4: "fin_wait1", 5: "fin_wait2",
    6: "time_wait", 7: "close", 8: "close_wait", 9: "last_ack", 10: "listen", 11: "closing",
    12: "syn_recv",  # TCP_NEW_SYN_RECV: a request socket (the kernel reports it as SYN_RECV anyway)
    13: "close",     # TCP_BOUND_INACTIVE: the socket's own state is TCP_CLOSE
}
_TCP_LISTEN = 10
_UDP_CONNECTED = 1  # a connected UDP socket is TCP_ESTABLISHED, an unconnected one TCP_CLOSE

_ZERO16 = bytes(16)
_V4MAPPED = bytes(10) + b"\xff\xff"
_RECV_SIZE = 1 << 18      # the kernel fills one skb (<= 32 KiB) per read of a dump; room to spare
_RCVBUF = 1 << 20
_TIMEOUT = 10.0           # a dump takes milliseconds; this only bounds a kernel that never answers


class WalkError(Exception):
    """The walk cannot be done: namespace missing or gone, not root, netlink refused or failed.
    The message says what, where, and how to fix it."""


class NamespaceGone(WalkError):
    """The namespace is not there (deleted, never made) or is another one now (deleted and made
    again): whatever it held is unreachable, as opposed to a walk that failed on the way."""


@dataclass(frozen=True, slots=True)
class SocketRecord:
    """One socket as the dispatcher sees it (see the module docstring for the normalisation)."""

    family: int                   # 4 or 6
    proto: int                    # 6 (TCP) or 17 (UDP)
    laddr: Address | None         # IPv4 int, IPv6 16 bytes; None = wildcard (0.0.0.0 / ::)
    lport: int
    raddr: Address | None         # None when the socket has no peer
    rport: int                    # 0 when no peer
    state: str                    # TCP state name, or "bound" / "connected" for UDP
    # A listener's accept queue: connections waiting for accept() and the most it holds (the
    # listen() backlog); 0 for other sockets. Not part of a record's identity.
    queued: int = field(default=0, compare=False)
    backlog: int = field(default=0, compare=False)


class SocketWalker:
    """A sock_diag netlink socket bound for its life to one network namespace; `walk()` lists
    that namespace's TCP and UDP sockets, from any thread."""

    def __init__(self, netns: str | None = None) -> None:
        """Open a NETLINK_SOCK_DIAG socket inside network namespace `netns` (a name under
        /var/run/netns, as `ip netns add` makes) or in the caller's current one (None).

        The socket is made in a short-lived helper thread that enters the namespace (a thread's
        network namespace is its own), so neither the caller's thread nor the process moves;
        the socket keeps the namespace it was created in. Raises WalkError."""
        if netns is not None and (not netns or "/" in netns or netns in (".", "..")):
            raise WalkError(f"bad network namespace name {netns!r}: give a name under {NETNS_DIR}, "
                            "as `ip netns add NAME` makes (no '/')")
        self.netns = netns
        self._lock = threading.Lock()
        self._seq = 0
        self._buf = bytearray(_RECV_SIZE)
        self._ns_id: tuple[int, int] | None = None  # (st_dev, st_ino) of the namespace opened
        self._closed = False
        self._sock: socket.socket | None = self._open()

    # -- opening ----------------------------------------------------------------------------

    def _where(self) -> str:
        return "the current network namespace" if self.netns is None else f"network namespace {self.netns!r}"

    def _open(self) -> socket.socket:
        if self.netns is None:
            try:
                st = os.stat("/proc/thread-self/ns/net")
                here = (st.st_dev, st.st_ino)
                if self._ns_id is not None and here != self._ns_id:
                    # reopening after a failed dump, from a thread in another namespace
                    raise WalkError("this SocketWalker lost its socket after a failed walk and the calling "
                                    "thread is in another network namespace than the one it was made in: "
                                    "make a new SocketWalker")
                self._ns_id = here
                sock = _diag_socket()
            except OSError as e:
                raise WalkError(f"cannot open a NETLINK_SOCK_DIAG socket in {self._where()}: "
                                f"{e.strerror or e}") from None
        else:
            sock, ns_id = _diag_socket_in(self.netns)
            if self._ns_id is not None and ns_id != self._ns_id:
                sock.close()
                raise NamespaceGone(self._recreated())
            self._ns_id = ns_id
        return sock

    def _recreated(self) -> str:
        return (f"network namespace {self.netns!r} was deleted and created again since this "
                "SocketWalker opened it: make a new SocketWalker for the new one")

    def _check_namespace(self) -> None:
        """The socket pins its namespace even after `ip netns del`, so a walk would go on
        reporting a namespace nobody can reach: look at its name instead."""
        if self.netns is None:
            return
        path = os.path.join(NETNS_DIR, self.netns)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise NamespaceGone(f"network namespace {self.netns!r} is gone: {path} no longer exists "
                            f"(deleted with `ip netns del {self.netns}`?)") from None
        except OSError as e:
            raise WalkError(f"cannot look at network namespace {self.netns!r} ({path}): {e.strerror or e}") from None
        if (st.st_dev, st.st_ino) != self._ns_id:
            raise NamespaceGone(self._recreated())

    # -- walking ----------------------------------------------------------------------------

    def walk(self) -> list[SocketRecord]:
        """Every TCP socket (all states, including request sockets in SYN_RECV and TIME_WAIT
        ones) and every UDP socket, IPv4 and IPv6, in the namespace, normalised as the module
        docstring says. Raises WalkError if the walker is closed, the namespace is gone or
        netlink fails."""
        with self._lock:
            if self._closed:
                raise WalkError(f"this SocketWalker for {self._where()} is closed")
            self._check_namespace()
            if self._sock is None:  # dropped after a failed dump: a fresh socket, same namespace
                self._sock = self._open()
            out: list[SocketRecord] = []
            try:
                for family in (socket.AF_INET, socket.AF_INET6):
                    for proto in (socket.IPPROTO_TCP, socket.IPPROTO_UDP):
                        self._dump(self._sock, family, proto, out)
            except BaseException:
                # A dump left half-read keeps the kernel's dump state busy (EBUSY on the next
                # request): start again from a new socket next time.
                self._sock.close()
                self._sock = None
                raise
            return out

    def _dump(self, sock: socket.socket, family: int, proto: int, out: list[SocketRecord]) -> None:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        seq = self._seq
        what = f"{'IPv4' if family == socket.AF_INET else 'IPv6'} {'TCP' if proto == 6 else 'UDP'}"
        body = _REQ.pack(family, proto, 0, ALL_STATES)
        req = _HDR.pack(_HDR.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body
        buf = self._buf
        try:
            sock.send(req)
            while True:
                n, _, flags, _ = sock.recvmsg_into([buf])
                if flags & socket.MSG_TRUNC:
                    raise WalkError(f"the {what} socket dump in {self._where()} sent a message larger than "
                                    f"{len(buf)} bytes; this is a bug in shmfabric.adapters.sockwalk")
                if _parse(buf, n, seq, proto, out, what, self._where()):
                    return
        except socket.timeout:
            raise WalkError(f"the kernel did not finish the {what} socket dump in {self._where()} "
                            f"within {_TIMEOUT:.0f} s") from None
        except OSError as e:
            raise WalkError(f"netlink failed during the {what} socket dump in {self._where()}: "
                            f"{e.strerror or e}") from None

    # -- closing ----------------------------------------------------------------------------

    def close(self) -> None:
        """Close the netlink socket (idempotent); walk() raises WalkError afterwards."""
        with self._lock:
            self._closed = True
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def __enter__(self) -> SocketWalker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SocketWalker({self.netns!r}{', closed' if self._closed else ''})"


# -- the netlink socket, here or in another namespace --------------------------------------------

def _diag_socket() -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RCVBUF)  # capped by rmem_max: fine
        sock.settimeout(_TIMEOUT)
    except OSError:
        sock.close()
        raise
    return sock


_libc: ctypes.CDLL | None = None


def _setns(fd: int, nstype: int) -> int:
    """libc setns (os.setns only exists from Python 3.12); returns 0 or the errno."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, nstype) != 0:
        return ctypes.get_errno()
    return 0


def _diag_socket_in(name: str) -> tuple[socket.socket, tuple[int, int]]:
    """A sock_diag socket created inside namespace `name`, and that namespace's (dev, inode)."""
    path = os.path.join(NETNS_DIR, name)
    how = f"create it with `ip netns add {name}`"
    try:
        nsfd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NamespaceGone(f"network namespace {name!r} not found: {path} does not exist; {how}") from None
    except OSError as e:
        root = "; entering another namespace needs root" if e.errno in (errno.EACCES, errno.EPERM) else ""
        raise WalkError(f"cannot open network namespace {name!r} ({path}): {e.strerror or e}{root}") from None
    try:
        st = os.fstat(nsfd)
        result: dict[str, object] = {}

        def enter_and_create() -> None:
            # This thread alone enters the namespace, and ends with it; the socket stays there.
            err = _setns(nsfd, CLONE_NEWNET)
            if err:
                result["errno"] = err
                return
            try:
                result["sock"] = _diag_socket()
            except OSError as e:
                result["error"] = e

        t = threading.Thread(target=enter_and_create, name=f"sockwalk-setns-{name}", daemon=True)
        t.start()
        t.join()
    finally:
        os.close(nsfd)
    if "sock" in result:
        return result["sock"], (st.st_dev, st.st_ino)  # type: ignore[return-value]
    if "errno" in result:
        err = int(result["errno"])  # type: ignore[call-overload]
        if err == errno.EPERM:
            raise WalkError(f"cannot enter network namespace {name!r}: setns needs root (CAP_SYS_ADMIN); "
                            "run as root")
        if err == errno.EINVAL:
            raise WalkError(f"{path} is not a network namespace (a stale file?); "
                            f"`ip netns del {name}` and `ip netns add {name}` make it afresh")
        raise WalkError(f"cannot enter network namespace {name!r}: setns: {os.strerror(err)}")
    e = result.get("error")
    raise WalkError(f"cannot open a NETLINK_SOCK_DIAG socket in network namespace {name!r}: "
                    f"{getattr(e, 'strerror', None) or e}")


# -- replies ---------------------------------------------------------------------------------------

def _parse(buf: bytearray, n: int, seq: int, proto: int, out: list[SocketRecord],
           what: str, where: str) -> bool:
    """Append the records in one read of a dump; True once NLMSG_DONE is seen."""
    off = 0
    hdr, msg = _HDR.unpack_from, _MSG.unpack_from
    while off + 16 <= n:
        length, mtype, _flags, mseq, _pid = hdr(buf, off)
        if length < 16 or off + length > n:
            raise WalkError(f"malformed netlink reply in the {what} socket dump in {where}")
        if mseq == seq:  # anything else is a leftover of an earlier request
            if mtype == SOCK_DIAG_BY_FAMILY and length >= 16 + _MSG_SIZE:
                fam, state, ports, src, dst = msg(buf, off + 16)
                lport, rport = _PORTS(ports)
                first = len(out)
                _records(fam, proto, state, src, dst, lport, rport, buf, off, length, out)
                if state == _TCP_LISTEN and proto == socket.IPPROTO_TCP:
                    queued, backlog = _QUEUES.unpack_from(buf, off + 16 + _QUEUES_AT)
                    for i in range(first, len(out)):  # (one record, or two for a dual-stack listener)
                        out[i] = replace(out[i], queued=queued, backlog=backlog)
            elif mtype == NLMSG_DONE:
                err = _ERRNO.unpack_from(buf, off + 16)[0] if length >= 20 else 0
                if err < 0:
                    raise WalkError(_refused(what, where, -err))
                return True
            elif mtype == NLMSG_ERROR:
                err = _ERRNO.unpack_from(buf, off + 16)[0] if length >= 20 else -errno.EIO
                if err < 0:
                    raise WalkError(_refused(what, where, -err))
        off += (length + 3) & ~3
    return False


def _refused(what: str, where: str, err: int) -> str:
    hint = ""
    if err in (errno.ENOENT, errno.EINVAL, errno.EOPNOTSUPP):
        mod = "udp_diag" if "UDP" in what else "tcp_diag"
        hint = f"; the kernel may lack inet_diag for it: `modprobe {mod}` as root"
    return f"netlink refused the {what} socket dump in {where}: {os.strerror(err)} (errno {err}){hint}"


def _v6only(buf: bytearray, off: int, length: int) -> bool:
    """INET_DIAG_SKV6ONLY of one AF_INET6 message. Absent (not a full socket, or a very old
    kernel) counts as False: the kernel's default (net.ipv6.bindv6only = 0) is dual stack."""
    a, end = off + 16 + _MSG_SIZE, off + length
    while a + 4 <= end:
        nla_len, nla_type = _NLA.unpack_from(buf, a)
        if nla_len < 4:
            break
        if nla_type & 0x3FFF == INET_DIAG_SKV6ONLY and nla_len >= 5:
            return buf[a + 4] != 0
        a += (nla_len + 3) & ~3
    return False


def _records(fam: int, proto: int, state: int, src: bytes, dst: bytes, lport: int, rport: int,
             buf: bytearray, off: int, length: int, out: list[SocketRecord]) -> None:
    if proto == socket.IPPROTO_TCP:
        name = _TCP_STATES.get(state, f"state_{state}")
    else:
        name = "connected" if state == _UDP_CONNECTED else "bound"
    if fam == socket.AF_INET:
        la = int.from_bytes(src[:4], "big") or None
        ra = int.from_bytes(dst[:4], "big") or None
        out.append(SocketRecord(4, proto, la, lport, ra, rport, name))
        return
    lmapped, rmapped = src[:12] == _V4MAPPED, dst[:12] == _V4MAPPED
    if lmapped or rmapped:
        # An IPv4 connection (or bind) seen through an AF_INET6 socket: it is IPv4.
        la = (int.from_bytes(src[12:], "big") or None) if lmapped else None
        ra = (int.from_bytes(dst[12:], "big") or None) if rmapped else None
        out.append(SocketRecord(4, proto, la, lport, ra, rport, name))
        return
    la6 = None if src == _ZERO16 else src
    ra6 = None if dst == _ZERO16 else dst
    out.append(SocketRecord(6, proto, la6, lport, ra6, rport, name))
    if la6 is None and ra6 is None and rport == 0 and not _v6only(buf, off, length):
        out.append(SocketRecord(4, proto, None, lport, None, 0, name))
