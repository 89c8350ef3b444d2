"""A memif port on the fabric: a DPDK or VPP program's memif interface as a fabric node's device.

`MemifBridge` is a fabric node that speaks memif (see `memif_wire`) on a unix socket, as the
server (it listens; the peer's `role=client` creates the shared memory) or the client (it creates
the memory and connects). Frames the peer sends go where their destination MAC says, as a TAP
adapter's do (`FabricPort.deliver`); frames the node receives go to the peer. The peer's
interface should carry the node's fabric MAC (DPDK: `mac=` in the vdev arguments; VPP:
`hw-addr`), so that replies addressed to it reach the node.

The per-frame work is the core's (`native.memif_take`, `native.memif_put`: a batch per call);
this module keeps the protocol. Frames from the peer are copied twice: out of its memory first
(the peer can change its memory after publishing: a frame is routed and sent from what was read),
then into pool slots; frames to the peer once, into its buffers. Pool slots are never lent to the
peer (a slot handed to a foreign process could be written after it was freed). The rings'
indices are read and written with acquire/release ordering (`native.load_u16_acquire`), as the
peer's driver does. Descriptors are checked against their region before any byte is touched: a
peer that points outside its memory has that frame dropped and counted (`drop_bad_descriptor`),
never a crash and never another frame's bytes.

A peer that goes away (DISCONNECT, closed socket, kill -9) takes the link down; frames for it are
dropped and counted (`drop_link_down`) until a peer connects again: the server waits for the next
client, the client reconnects with backoff.
"""
from __future__ import annotations

import errno
import fcntl
import mmap
import os
import re
import select
import socket
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from shmfabric.adapters import memif_wire as w
from shmfabric.adapters.bridge import WAKE_EVERY, FabricPort
from shmfabric.adapters.ethernet import (ETH_HLEN, FABRIC_OUI, META_DEVICE_WORK, complete_checksum, csum_of,
                                         needs_offload)
from shmfabric.core import native
from shmfabric.fabric import Node

HANDSHAKE_TIMEOUT = 2.0  # seconds a peer has to finish connecting (DPDK and VPP take milliseconds)
RECONNECT_MAX = 1.0  # seconds between a client's connection attempts, at most
FULL_PAUSE = 0.0005  # seconds before the first look again at a full ring (the peer is behind) ...
FULL_PAUSE_MAX = 0.02  # ... doubling up to this while it stays full (memif has no "room freed" signal)
load16, store16 = native.load_u16_acquire, native.store_u16_release
# the counters of what `native.memif_take` drops, in the order it returns them
_TAKE_DROPS = ("drop_bad_descriptor", "drop_too_big", "drop_short", "drop_self", "drop_foreign")


class MemifError(Exception):
    """A memif port that cannot be set up (socket path, options); the message says how to fix it."""


class MemifBusyError(MemifError):
    """The socket is held by another memif server: listening can work once that one stops."""


@dataclass(frozen=True)
class MemifConfig:
    """One memif interface: its socket, role, interface id and secret, and (client) its rings."""

    socket_path: str
    role: str = "server"  # "server" (listen) or "client" (connect, create the memory)
    id: int = 0
    secret: bytes = b""
    log2_ring_size: int = 10  # client: 1,024 descriptors a ring
    buffer_size: int = 2048  # client: bytes per buffer (longer frames are chained)
    name: str = "shmfabric"
    abstract: bool = False  # the socket is in the abstract namespace (DPDK's default), not a file

    @property
    def address(self) -> str:
        """The address to bind or connect: the path, or NUL and the name for an abstract socket."""
        return "\0" + self.socket_path if self.abstract else self.socket_path

    def check(self) -> MemifConfig:
        """Self, or MemifError saying which option is wrong."""
        if self.role not in ("server", "client"):
            raise MemifError(f"role {self.role!r} is not server or client")
        if not 0 <= self.id <= 0xFFFFFFFF:
            raise MemifError(f"interface id {self.id} is out of range: give 0..4294967295")
        if len(self.secret) >= w.SECRET_SZ or b"\0" in self.secret:
            raise MemifError(f"secret is {len(self.secret)} bytes: give at most {w.SECRET_SZ - 1}, no NUL")
        if not 1 <= self.log2_ring_size <= w.MAX_LOG2_RING:
            raise MemifError(f"ring size 2^{self.log2_ring_size} is out of range: give 2^1..2^{w.MAX_LOG2_RING}")
        if not 128 <= self.buffer_size <= 65535 or self.buffer_size % 64:
            raise MemifError(f"buffer size {self.buffer_size} is not a multiple of 64 in 128..65472")
        if len(os.fsencode(self.socket_path)) >= 108:
            raise MemifError(f"socket path {self.socket_path!r} is longer than a unix socket address "
                             f"(107 bytes): give a shorter one")
        return self


def _check_region_fd(fd: int, index: int) -> None:
    """A region fd this side can map safely: a memfd sealed against shrinking (as DPDK and libmemif
    make them). One the peer could shrink after the handshake would fault this process (SIGBUS)
    on the next frame; one sealed against writes cannot be mapped read-write."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        raise w.MemifProtocolError(f"region {index} is not a memfd (memif regions are sealed memfds; DPDK's "
                                   f"zero-copy=yes clients hand over hugepage files: not supported)") from None
    if not seals & fcntl.F_SEAL_SHRINK:
        raise w.MemifProtocolError(f"region {index} is not sealed against shrinking (F_SEAL_SHRINK)")
    if seals & (fcntl.F_SEAL_WRITE | getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x10)):
        raise w.MemifProtocolError(f"region {index} is sealed against writes: its buffers cannot be filled")


def _check_eventfd(fd: int, index: int) -> None:
    """The fd that came with ADD_RING is an eventfd (anything else could block or spin this side)."""
    try:
        kind = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        kind = "?"
    if kind != "anon_inode:[eventfd]":
        raise w.MemifProtocolError(f"the fd with ADD_RING {index} is not an eventfd ({kind})")
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            semaphore = re.search(r"^eventfd-semaphore:\s*1$", f.read(), re.M) is not None
    except OSError:  # (kernels before 6.4 do not say: such an eventfd is taken)
        semaphore = False
    if semaphore:  # (each read takes 1: a large count keeps it readable, and this side spinning)
        raise w.MemifProtocolError(f"the eventfd with ADD_RING {index} is in semaphore mode")
    os.set_blocking(fd, False)  # (DPDK's and libmemif's are; reads here also ask RWF_NOWAIT)


def read_eventfd(fd: int) -> None:
    """Take an eventfd's count without ever blocking, even if the peer, which shares the file,
    made it blocking again (RWF_NOWAIT)."""
    try:
        os.preadv(fd, [bytearray(8)], -1, os.RWF_NOWAIT)
    except BlockingIOError:
        pass
    except OSError as exc:
        if exc.errno != errno.EOPNOTSUPP:
            raise w.MemifProtocolError(f"cannot read an eventfd of the peer's ({exc.strerror})") from None
        os.set_blocking(fd, False)
        try:
            os.read(fd, 8)
        except BlockingIOError:
            pass


class _Region:
    """A mapped memif region and a view of it (the view is released before the map closes)."""

    def __init__(self, fd: int, size: int, owner: bool):
        try:
            real = os.fstat(fd).st_size
            if real < size:
                raise w.MemifProtocolError(f"region file holds {real} bytes, not the {size} announced")
            try:
                self.mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            except OSError as exc:
                raise w.MemifProtocolError(f"region cannot be mapped read-write ({exc.strerror})") from None
        finally:
            if not owner:
                os.close(fd)  # (the mapping keeps the memory; the client keeps its own fd for ADD_REGION)
        self.view = memoryview(self.mm)
        self.size = size

    def close(self) -> None:
        try:
            self.view.release()
            self.mm.close()
        except BufferError:  # a view of it still alive (an exception's frame): unmapped when that goes
            pass


class _Ring:
    """One memif ring, from one side: its offsets, and the local copy of the index this side
    moves (the peer's is always read with acquire ordering)."""

    def __init__(self, region: _Region, offset: int, log2: int, eventfd: int):
        self.mm = region.mm
        self.size = 1 << log2
        self.mask = self.size - 1
        self.head = offset + w.RING_HEAD
        self.tail = offset + w.RING_TAIL
        self.flags = offset + w.RING_FLAGS
        self.desc = offset + w.RING_HEADER
        self.eventfd = eventfd
        self.cursor = 0  # the index this side moves (or, consuming, the next descriptor to read)
        self.own = 0  # client consumer: the head it has given buffers up to

    def cookie_ok(self) -> bool:
        return int.from_bytes(self.mm[self.flags - 4:self.flags], "little") == w.COOKIE

    def reset(self) -> None:
        """Both indices to 0, as each side does when the connection comes up."""
        store16(self.mm, self.head, 0)
        store16(self.mm, self.tail, 0)
        self.cursor = self.own = 0

    def peer_polls(self) -> bool:
        """The consumer masked interrupts (it polls): no need to signal its eventfd."""
        return bool(self.mm[self.flags] & w.RING_MASK_INT)

    def kick(self) -> None:
        try:
            os.write(self.eventfd, b"\x01\0\0\0\0\0\0\0")
        except BlockingIOError:  # counter at its maximum: the peer has a wake-up pending anyway
            pass
        except OSError as exc:
            raise w.MemifProtocolError(f"cannot signal the peer's eventfd ({exc.strerror})") from None


class _Connection:
    """One connected peer: its control socket, the regions, the ring each way, and where each
    side's buffers are. `rx` is read by this side, `tx` written."""

    def __init__(self, sock: socket.socket, regions: list[_Region], rx: _Ring, tx: _Ring, server: bool,
                 plan: w.ClientPlan | None, fds: list[int], peer: str):
        self.sock, self.regions, self.rx, self.tx = sock, regions, rx, tx
        self.server, self.plan, self.fds, self.peer = server, plan, fds, peer
        self.views = [r.view for r in regions]
        self.sizes = [r.size for r in regions]
        if plan is not None:
            # every receive descriptor as the client gives it back: its fixed buffer, full length,
            # no flags (copied by slices on refill, not packed one by one)
            self._rx_template = b"".join(w.DESC.pack(0, 0, plan.buffer_size, plan.buffer_offset(False, s), 0)
                                         for s in range(rx.size))
            self._tx_offsets = [plan.buffer_offset(True, s) for s in range(tx.size)]
            self.refill()

    def refill(self) -> None:
        """Client: give the server every free buffer of the receive ring (head up to the ring's
        size past what was read), each with its fixed place, full length and no flags."""
        ring = self.rx
        head = ring.own
        n = ring.size - ((head - ring.cursor) & 0xFFFF)
        if n <= 0:
            return
        mm, base, tmpl = ring.mm, ring.desc, self._rx_template
        first = head & ring.mask
        end = min(first + n, ring.size)
        mm[base + first * 16:base + end * 16] = tmpl[first * 16:end * 16]
        if first + n > ring.size:  # wrapped
            rest = first + n - ring.size
            mm[base:base + rest * 16] = tmpl[:rest * 16]
        ring.own = (head + n) & 0xFFFF
        store16(mm, ring.head, ring.own)

    def close(self) -> None:
        try:
            for r in self.regions:
                r.close()
        finally:
            for fd in self.fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
            self.sock.close()


class MemifBridge(FabricPort):
    """One node's memif port: `run` serves (or connects to) the peer and moves frames both ways
    until told to stop."""

    kind = "memif"

    def __init__(self, node: Node, config: MemifConfig, batch: int = 256, in_flight: int | Callable[[], int] = 64,
                 via: Callable[[], tuple[int, int] | None] | None = None, log: Callable[[str], None] | None = None):
        super().__init__(node, batch, in_flight, via)
        self.config = config.check()
        self.log = log or (lambda text: None)
        self._conn: _Connection | None = None
        self._lock = threading.Lock()  # held while the tx side uses the connection's memory
        self._listener: socket.socket | None = None
        self._listen_ino: tuple[int, int] | None = None
        self._pending: list[bytes] = []  # frames for the peer that did not fit its ring yet (in order)
        self._rx_left = False  # frames left in the receive ring after the passes of one wake-up
        self._fault: str | None = None  # why the sending thread found the peer broken (main loop disconnects)
        self._full_pause = FULL_PAUSE
        self.peer = ""  # who is connected ("" while the link is down)

    @property
    def device_name(self) -> str:
        return f"memif:{self.config.socket_path}"

    @property
    def link_up(self) -> bool:
        return self._conn is not None

    # -- socket ------------------------------------------------------------------------------

    def listen(self) -> None:
        """Server: bind the socket path. A socket file nobody listens on (a dead server's) is
        replaced; a live one, or another kind of file, is MemifError."""
        path = self.config.socket_path
        st = None
        if self.config.abstract:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                sock.bind(self.config.address)
                sock.listen(4)
            except OSError as exc:
                sock.close()
                raise (MemifBusyError if exc.errno == errno.EADDRINUSE else MemifError)(
                    f"cannot listen on abstract socket @{path}: {exc.strerror} (another memif server has it?)") from None
            sock.setblocking(False)
            self._listener = sock
            return
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        if st is not None:
            if not stat.S_ISSOCK(st.st_mode):
                raise MemifError(f"{path} exists and is not a socket: give another --socket path")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            probe.settimeout(1.0)
            try:
                probe.connect(path)
                raise MemifBusyError(f"{path} is in use by another memif server: stop it or give another --socket path")
            except (ConnectionRefusedError, FileNotFoundError):
                os.unlink(path)  # left by a server that died
            except OSError as exc:  # (a server too busy to accept within the second is alive)
                raise MemifBusyError(f"{path} is in use by another memif server ({exc.strerror}): stop it or give "
                                     f"another --socket path") from None
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.bind(path)
            sock.listen(4)
        except OSError as exc:
            sock.close()
            raise MemifError(f"cannot listen on {path}: {exc.strerror} (is its directory there and writable?)") from None
        sock.setblocking(False)
        st = os.stat(path)
        self._listener, self._listen_ino = sock, (st.st_dev, st.st_ino)

    def _unlisten(self) -> None:
        if self._listener is None:
            return
        self._listener.close()
        self._listener = None
        if self.config.abstract:
            return
        try:
            st = os.stat(self.config.socket_path)
            if (st.st_dev, st.st_ino) == self._listen_ino:  # still ours, not a newer server's
                os.unlink(self.config.socket_path)
        except OSError:
            pass

    # -- handshakes --------------------------------------------------------------------------

    @staticmethod
    def _recv(sock: socket.socket, deadline: float) -> tuple[w.Message, int | None]:
        """The next control message and the fd that came with it (others are closed)."""
        left = deadline - time.monotonic()
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        if left <= 0 or not poller.poll(left * 1000):
            raise w.MemifProtocolError(f"handshake not finished within {HANDSHAKE_TIMEOUT:g} s")
        data, fds, flags, _ = socket.recv_fds(sock, w.MSG_SIZE, 4)
        for extra in fds[1:]:
            os.close(extra)
        fd = fds[0] if fds else None
        if not data:
            if fd is not None:
                os.close(fd)
            raise ConnectionResetError("the peer closed the control socket")
        if flags & socket.MSG_TRUNC:
            if fd is not None:
                os.close(fd)
            raise w.MemifProtocolError(f"control message longer than {w.MSG_SIZE} bytes; memif messages are "
                                       f"{w.MSG_SIZE}")
        try:
            return w.decode(data), fd
        except w.MemifProtocolError:
            if fd is not None:
                os.close(fd)
            raise

    @staticmethod
    def _send(sock: socket.socket, msg: w.Message, fd: int | None = None) -> None:
        data = w.encode(msg)
        if fd is None:
            sock.send(data)
        else:
            socket.send_fds(sock, [data], [fd])

    @staticmethod
    def _refuse(sock: socket.socket, reason: str) -> None:
        try:
            MemifBridge._send(sock, w.Disconnect(reason[:w.REASON_SZ - 1]))
        except OSError:
            pass

    def _serve(self, sock: socket.socket) -> _Connection:
        """Server: the handshake on an accepted socket, up to mapped rings. Raises
        MemifProtocolError (sent to the peer as DISCONNECT), PeerDisconnected or OSError."""
        deadline = time.monotonic() + HANDSHAKE_TIMEOUT
        hs = w.ServerHandshake(self.config.id, self.config.secret, self.config.name)
        fds: dict[tuple[str, int], int] = {}
        regions: list[_Region] = []
        try:
            self._send(sock, hs.hello())
            while True:
                msg, fd = self._recv(sock, deadline)
                try:
                    reply = hs.receive(msg, fd)
                    if isinstance(msg, w.AddRegion):
                        _check_region_fd(fd, msg.index)  # type: ignore[arg-type]
                    elif isinstance(msg, w.AddRing):
                        _check_eventfd(fd, msg.index)  # type: ignore[arg-type]
                except BaseException:
                    if fd is not None:
                        os.close(fd)
                    raise
                if isinstance(msg, w.AddRegion):
                    fds[("region", msg.index)] = fd  # type: ignore[assignment]
                elif isinstance(msg, w.AddRing):
                    fds[("s2m" if msg.s2m else "m2s", 0)] = fd  # type: ignore[assignment]
                elif fd is not None:
                    os.close(fd)
                if isinstance(reply, w.Connected):
                    for i in range(len(hs.regions)):
                        regions.append(_Region(fds.pop(("region", i)), hs.regions[i], owner=False))
                    spec = {r.s2m: r for r in hs.rings}
                    rx = _Ring(regions[spec[True].region], spec[True].offset, spec[True].log2_ring_size, fds[("s2m", 0)])
                    tx = _Ring(regions[spec[False].region], spec[False].offset, spec[False].log2_ring_size,
                               fds[("m2s", 0)])
                    for name, ring in (("client-to-server", rx), ("server-to-client", tx)):
                        if not ring.cookie_ok():
                            raise w.MemifProtocolError(f"the {name} ring has no memif cookie (0x{w.COOKIE:X})")
                    rx.reset()
                    tx.reset()
                    w.RING_START.pack_into(rx.mm, rx.flags - 4, w.COOKIE, 0)  # interrupt mode: wake this side
                    self._send(sock, reply)
                    conn = _Connection(sock, regions, rx, tx, True, None, list(fds.values()),
                                       f"{hs.peer_name or '?'} ({hs.peer_if_name or '?'})")
                    return conn
                if reply is not None:
                    self._send(sock, reply)
        except BaseException:
            for r in regions:
                r.close()
            for fd in fds.values():
                os.close(fd)
            raise

    def _dial(self) -> _Connection:
        """Client: connect, create the region and the rings, and run the handshake."""
        cfg = self.config
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        fds: list[int] = []
        region: _Region | None = None
        try:
            sock.settimeout(HANDSHAKE_TIMEOUT)  # (a server that does not accept must not hang this side)
            sock.connect(cfg.address)
            sock.setblocking(True)
            deadline = time.monotonic() + HANDSHAKE_TIMEOUT
            hs = w.ClientHandshake(cfg.id, cfg.secret, cfg.name, cfg.log2_ring_size, cfg.buffer_size)
            msg, fd = self._recv(sock, deadline)
            if fd is not None:
                os.close(fd)
            out = hs.receive(msg)
            plan = hs.plan
            assert plan is not None and out is not None
            memfd = os.memfd_create(f"shmfabric-memif-{self.node.name}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            fds.append(memfd)
            os.ftruncate(memfd, plan.region_size)
            fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)  # (the server may not shrink it under us)
            region = _Region(memfd, plan.region_size, owner=True)
            s2m_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            fds.append(s2m_fd)
            m2s_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            fds.append(m2s_fd)
            tx = _Ring(region, plan.s2m_offset, plan.log2_ring_size, s2m_fd)
            rx = _Ring(region, plan.m2s_offset, plan.log2_ring_size, m2s_fd)
            for ring, s2m in ((tx, True), (rx, False)):
                w.RING_START.pack_into(region.mm, ring.flags - 4, w.COOKIE, 0)
                ring.reset()
                for s in range(ring.size):
                    w.DESC.pack_into(region.mm, ring.desc + s * 16, 0, 0, plan.buffer_size,
                                     plan.buffer_offset(s2m, s), 0)
            keyed = {"region": memfd, "s2m": s2m_fd, "m2s": m2s_fd}
            while True:
                msg_out, key = out
                self._send(sock, msg_out, keyed[key] if key else None)
                if hs.state == "connecting":
                    break
                msg, fd = self._recv(sock, deadline)
                if fd is not None:
                    os.close(fd)
                out = hs.receive(msg)
                assert out is not None
            msg, fd = self._recv(sock, deadline)
            if fd is not None:
                os.close(fd)
            hs.receive(msg)
            rx.reset()
            tx.reset()
            return _Connection(sock, [region], rx, tx, False, plan, fds,
                               f"{hs.peer_name or '?'} ({hs.peer_if_name or '?'})")
        except BaseException:
            if region is not None:
                region.close()
            for fd in fds:
                os.close(fd)
            sock.close()
            raise

    def _up(self, conn: _Connection) -> None:
        with self._lock:
            self._conn = conn
        self.peer = conn.peer
        self.from_device["link_ups"] += 1
        self.log(f"link up: {conn.peer}")

    def _down(self, reason: str, tell_peer: bool = False) -> None:
        conn = self._conn
        if conn is not None:
            # a sending thread blocked signalling the peer's eventfd (its count at the maximum and
            # the file made blocking by the peer) holds the lock: taking the count frees it
            try:
                read_eventfd(conn.tx.eventfd)
            except w.MemifProtocolError:
                pass
        with self._lock:
            conn, self._conn = self._conn, None
            self._fault = None
            if self._pending:  # (counted on this thread's side: each Counter has one writer)
                self.from_device["drop_link_down"] += len(self._pending)
                self._pending.clear()
        if conn is None:
            return
        # counted and logged before the peer hears it: whoever the peer tells finds them so
        self.peer = ""
        self.from_device["link_downs"] += 1
        self.log(f"link down: {reason}")
        if tell_peer:
            self._refuse(conn.sock, reason)
        conn.close()

    # -- data path ---------------------------------------------------------------------------

    def pump_device(self) -> int:
        """Frames the peer sent, sent on to the fabric (or dropped and counted): at most a batch.
        The core takes the batch in one pass (`native.memif_take`): each descriptor checked
        against its region, its frame (chained ones gathered) copied out of the peer's memory
        and sorted by where it goes, from that copy: the peer may change its memory after
        publishing, and a frame classified by one header (ARP: straight to its node) must not be
        sent with another (IPv4: through the --via chain). Then the pool slots take them one
        publication per destination (`deliver_sorted`). Returns how many descriptors were taken."""
        conn = self._conn
        if conn is None:
            return 0
        ring = conn.rx
        mm = ring.mm
        avail = ((load16(mm, ring.head if conn.server else ring.tail)) - ring.cursor) & 0xFFFF
        if avail > ring.size:
            raise w.MemifProtocolError(f"the peer moved its ring index {avail} descriptors ahead, past the ring's "
                                       f"{ring.size}")
        if not avail:
            return 0
        self.refresh_share()
        taken, n, groups, floods, *drops = native.memif_take(
            mm, ring.desc, ring.mask, ring.cursor, avail, min(avail, self.batch), conn.views,
            self.node.mtu + ETH_HLEN, self.node.mac, FABRIC_OUI, self._via is not None)
        c = self.from_device
        for key, k in zip(_TAKE_DROPS, drops):
            if k:
                c[key] += k
        self.deliver_sorted(groups, floods)
        ring.cursor = (ring.cursor + taken) & 0xFFFF
        if taken:
            if conn.server:
                store16(mm, ring.tail, ring.cursor)
            else:
                conn.refill()
        c["from_device"] += n
        return taken

    def pump_fabric(self, timeout: float = 0) -> int:
        """Frames the node received, written into the peer's ring: at most a batch. Only as many
        are taken from the fabric as the ring has room for, so a slow peer backs the fabric up
        (its senders see a full ring) instead of losing frames here; with the link down they are
        dropped and counted, as by a NIC without carrier. A peer that breaks the protocol here (a
        buffer outside its memory, a bad eventfd, indices past the ring) is not this thread's to
        disconnect: it is left in `_fault` for the main loop, and nothing more is written."""
        c = self.from_fabric
        with self._lock:
            conn = self._conn
            room = 0
            if conn is not None and self._fault is None:
                try:
                    room = self._tx_room(conn)
                    if self._pending:
                        room = self._write_pending(conn, room)
                except w.MemifProtocolError as exc:
                    self._fault = str(exc)
        if conn is not None and (not room or self._pending or self._fault is not None):
            # a manager's requests still get their answers while the peer is behind (a paused
            # testpmd, an admin-down VPP interface): they arrive on their own ring, ahead of data
            self.node.recv_control()
            time.sleep(self._full_pause)  # the peer is behind (its ring is full), or it is being dropped
            self._full_pause = min(FULL_PAUSE_MAX, self._full_pause * 2)
            return 0
        self._full_pause = FULL_PAUSE
        n = 0
        with self.node.recv_batch(self.batch if conn is None else min(self.batch, room), timeout) as b:
            if not len(b):
                return 0
            with self._lock:
                conn = self._conn
                if conn is None or self._fault is not None:
                    c["drop_link_down"] += len(b)
                    return len(b)
                handled = 0
                try:
                    room = self._tx_room(conn)  # (the link may have come up during the wait)
                    pending = self._pending
                    ring = conn.tx
                    server = conn.server
                    # where a client writes: its fixed buffer per descriptor (`native.memif_put`)
                    bsize, bufs = (0, 0) if server else (conn.plan.buffer_size, conn.plan.buffer_offset(True, 0))  # type: ignore[union-attr]
                    i, total = 0, len(b)
                    while i < total:
                        if room and not pending:
                            # the common case in the core: frames that fit one buffer, written whole
                            i, wrote, ring.cursor = native.memif_put(b, i, ring.mm, ring.desc, ring.mask, ring.cursor,
                                                                     room, conn.views, server, bsize, bufs,
                                                                     META_DEVICE_WORK)
                            room -= wrote
                            n += wrote
                            if i >= total:
                                break
                        handled = i
                        f = b[i]
                        i += 1
                        if f.ethertype is None:  # shorter than a header: only a corrupted descriptor does that
                            c["drop_short"] += 1
                            continue
                        meta = f.meta
                        if meta and needs_offload(meta):
                            c["drop_offload"] += 1  # (a segment to be cut: the peer's MTU is one frame)
                            continue
                        data: bytes | bytearray | None = None
                        cs = csum_of(meta) if meta else None
                        if cs is not None:  # a checksum left to the device (from a TAP adapter): done here
                            data = bytearray(f.dst + f.src_mac + f.ethertype.to_bytes(2, "big"))
                            data += f
                            complete_checksum(data, *cs)
                        used = None if pending else self._write(conn, data, room, f)
                        if used is None:  # past the ring's room (chained buffers): kept, in order, for the next pass
                            pending.append(bytes(data) if data is not None else
                                           f.dst + f.src_mac + f.ethertype.to_bytes(2, "big") + f.tobytes())
                        elif used < 0:
                            c["drop_too_big"] += 1
                        else:
                            room -= used
                            n += 1
                    handled = len(b)
                    if n:
                        self._flush(conn)
                except w.MemifProtocolError as exc:
                    self._fault = str(exc)
                    # the peer is dropped: what this batch wrote is never published, and the rest
                    # of it (the frame that failed included) is never written
                    c["drop_link_down"] += n + len(b) - handled
                    n = 0
        c["to_device"] += n
        return len(b)

    def _write_pending(self, conn: _Connection, room: int) -> int:
        """Write the frames kept from an earlier pass, in order, while the ring has room; the room
        left. (Called with the lock held.)"""
        pending = self._pending
        n = 0
        while pending and room:
            used = self._write(conn, pending[0], room)
            if used is None:
                break
            pending.pop(0)
            if used < 0:
                self.from_fabric["drop_too_big"] += 1
                continue
            room -= used
            n += 1
        if n:
            self._flush(conn)
            self.from_fabric["to_device"] += n
        return room

    def _tx_room(self, conn: _Connection) -> int:
        """Descriptors this side may fill now (MemifProtocolError if the peer's index is impossible)."""
        ring = conn.tx
        if conn.server:  # the client gives buffers by moving head; this side fills up to it
            room = (load16(ring.mm, ring.head) - ring.cursor) & 0xFFFF
        else:
            room = ring.size - ((ring.cursor - load16(ring.mm, ring.tail)) & 0xFFFF)
        if not 0 <= room <= ring.size:
            raise w.MemifProtocolError(f"the peer moved its index of the ring this side sends on to an impossible "
                                       f"place ({room} free of {ring.size})")
        return room

    def _write(self, conn: _Connection, data: bytes | bytearray | None, room: int,
               f: native.Frame | None = None) -> int | None:
        """Write one frame (`data`, or the received frame `f`: its header and payload) into the
        ring's next descriptors, not yet published; the descriptors used, None if it needs more
        than `room` (it may fit later), -1 if it can never fit (more than the whole ring)."""
        ring = conn.tx
        mm, base, mask = ring.mm, ring.desc, ring.mask
        total = len(data) if data is not None else ETH_HLEN + len(f)  # type: ignore[arg-type]
        if not conn.server and -(-total // conn.plan.buffer_size) > ring.size:  # type: ignore[union-attr]
            return -1
        slot = ring.cursor
        used = 0
        pos = 0
        src = data
        while True:
            if used >= room:
                return -1 if room >= ring.size else None
            s = (slot + used) & mask
            d = base + s * 16
            if conn.server:
                _, region, cap, offset, _ = w.DESC.unpack_from(mm, d)
                if region >= len(conn.views) or offset + cap > conn.sizes[region] or cap == 0:
                    raise w.MemifProtocolError(f"the client's buffer at descriptor {s} lies outside region {region}")
            else:
                region, cap, offset = 0, conn.plan.buffer_size, conn._tx_offsets[s]  # type: ignore[union-attr]
            v = conn.views[region]
            chunk = min(cap, total - pos)
            if src is None and pos == 0 and chunk == total:  # the common case: one buffer, no copy of ours
                v[offset:offset + 6] = f.dst  # type: ignore[union-attr]
                v[offset + 6:offset + 12] = f.src_mac  # type: ignore[union-attr]
                v[offset + 12:offset + 14] = f.ethertype.to_bytes(2, "big")  # type: ignore[union-attr]
                v[offset + 14:offset + total] = f  # type: ignore[index]
            else:
                if src is None:
                    src = f.dst + f.src_mac + f.ethertype.to_bytes(2, "big") + f.tobytes()  # type: ignore[union-attr]
                v[offset:offset + chunk] = src[pos:pos + chunk]
            pos += chunk
            last = pos >= total
            w.DESC.pack_into(mm, d, 0 if last else w.DESC_NEXT, region, chunk, offset, 0)
            used += 1
            if last:
                ring.cursor = (slot + used) & 0xFFFF
                return used

    def _flush(self, conn: _Connection) -> None:
        """Publish what was written (release) and wake the peer unless it polls."""
        ring = conn.tx
        store16(ring.mm, ring.tail if conn.server else ring.head, ring.cursor)
        if not ring.peer_polls():
            ring.kick()

    # -- control loop ------------------------------------------------------------------------

    def _accept(self) -> None:
        """Server: take a waiting connection: run its handshake, or refuse it while a peer is up."""
        assert self._listener is not None
        try:
            sock, _ = self._listener.accept()
        except BlockingIOError:
            return
        sock.setblocking(True)
        if self._conn is not None:
            self._send_hello_refusal(sock)
            return
        try:
            conn = self._serve(sock)
        except w.MemifProtocolError as exc:
            self.from_device["handshakes_refused"] += 1
            self.log(f"refused a peer: {exc}")
            self._refuse(sock, str(exc))
            sock.close()
            return
        except (w.PeerDisconnected, OSError) as exc:
            self.from_device["handshakes_failed"] += 1
            self.log(f"a peer left during the handshake: {exc}")
            sock.close()
            return
        self._up(conn)

    def _send_hello_refusal(self, sock: socket.socket) -> None:
        """A second client while one is connected: as DPDK does, it hears why and is closed."""
        self.from_device["handshakes_refused"] += 1
        try:
            self._send(sock, w.ServerHandshake(self.config.id, name=self.config.name).hello())
            self._refuse(sock, "already connected")
        finally:
            sock.close()

    def _control(self, conn: _Connection) -> None:
        """A message on a connected control socket: DISCONNECT or EOF takes the link down."""
        try:
            msg, fd = self._recv(conn.sock, time.monotonic() + 1)
        except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError):
            self._down("the peer closed the control socket")
            return
        except w.MemifProtocolError as exc:
            self._down(str(exc), tell_peer=True)
            return
        if fd is not None:
            os.close(fd)
        if isinstance(msg, w.Disconnect):
            self._down(f"the peer disconnected: {msg.reason or 'no reason given'}")
        else:
            self._down(f"unexpected {w.name_of(msg)} after the connection was set up", tell_peer=True)

    def run(self, stopping: Callable[[], bool]) -> None:
        """Serve or dial, and move frames, until `stopping()` or a control `stop` (checked at least
        every WAKE_EVERY s). One thread waits on the peer (its control socket and the receive
        ring's eventfd) and moves frames to the fabric; another moves frames from the fabric."""
        failed: list[BaseException] = []
        user_stopping = stopping

        def stopping() -> bool:
            return self.stop_requested or user_stopping()

        def fabric_to_peer() -> None:
            try:
                while not stopping() and not failed:
                    self.pump_fabric(WAKE_EVERY)
            except BaseException as exc:  # handed to the main thread, which stops and raises it
                failed.append(exc)

        if self.config.role == "server" and self._listener is None:
            self.listen()
        self.ready = True
        worker = threading.Thread(target=fabric_to_peer, name="fabric-to-memif", daemon=True)
        worker.start()
        retry = 0.05
        next_dial = 0.0
        waiting_said = False
        try:
            while not stopping() and worker.is_alive():
                conn = self._conn
                if conn is None and self.config.role == "client":
                    if time.monotonic() < next_dial:
                        time.sleep(min(WAKE_EVERY, next_dial - time.monotonic()))
                        continue
                    try:
                        self._up(self._dial())
                        retry = 0.05
                        waiting_said = False
                    except (FileNotFoundError, ConnectionRefusedError) as exc:
                        if not waiting_said:
                            self.log(f"waiting for a memif server at {self.config.socket_path} ({exc.strerror})")
                            waiting_said = True
                        next_dial = time.monotonic() + retry
                        retry = min(RECONNECT_MAX, retry * 2)
                    except w.PeerDisconnected as exc:
                        self.from_device["handshakes_refused"] += 1
                        self.log(f"the server refused the connection: {exc.reason or 'no reason given'}")
                        next_dial = time.monotonic() + retry
                        retry = min(RECONNECT_MAX, retry * 2)
                    except (w.MemifProtocolError, OSError) as exc:
                        self.from_device["handshakes_failed"] += 1
                        self.log(f"could not connect: {exc}")
                        next_dial = time.monotonic() + retry
                        retry = min(RECONNECT_MAX, retry * 2)
                    continue
                if conn is not None and self._fault is not None:  # found by the sending thread
                    self._down(self._fault, tell_peer=True)
                    continue
                poller = select.poll()  # (not select(): fds past 1023 are fine)
                if self._listener is not None:
                    poller.register(self._listener, select.POLLIN)
                if conn is not None:
                    poller.register(conn.sock, select.POLLIN)
                    poller.register(conn.rx.eventfd, select.POLLIN)
                timeout = WAKE_EVERY
                if conn is not None and self._rx_left:
                    timeout = 0
                ready = {fd for fd, _ in poller.poll(timeout * 1000)}
                if self._listener is not None and self._listener.fileno() in ready:
                    self._accept()
                if conn is not None and conn is self._conn:
                    try:
                        if conn.rx.eventfd in ready:
                            read_eventfd(conn.rx.eventfd)
                        self._drain(conn)
                    except w.MemifProtocolError as exc:
                        self._down(str(exc), tell_peer=True)
                        continue
                    if conn.sock.fileno() in ready:
                        self._control(conn)
        except BaseException as exc:
            failed.append(exc)
        finally:
            self._down(f"{self.node.name} stopping", tell_peer=True)  # (frees a sender stuck on the peer)
            worker.join(5.0)
            self._unlisten()
        if failed:
            raise failed[0]

    def _drain(self, conn: _Connection, passes: int = 64) -> None:
        """Move what the peer sent, a batch at a time, for at most `passes` batches (then the
        control socket and a stop get their turn); `_rx_left` says whether frames were left."""
        for _ in range(passes):
            if self._conn is not conn or not self.pump_device():
                self._rx_left = False
                return
        self._rx_left = True
