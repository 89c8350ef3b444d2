"""Misbehaving memif peers, written in Python, against a server `MemifBridge`: each one gets a
clear reason (DISCONNECT), nothing else is lost, the bridge never crashes and serves the next
peer. No DPDK, no root.

A raw peer speaks the control messages itself (`memif_wire.encode`/`decode`, fds beside them); a
well-behaved peer is a client bridge's `_dial()`, whose connection's rings are written directly.
"""
from __future__ import annotations

import fcntl
import mmap
import os
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from shmfabric.adapters import memif_wire as w
from shmfabric.adapters.memif import MemifBridge, MemifConfig, MemifError
from shmfabric.core import native
from shmfabric.fabric import Fabric

pytestmark = pytest.mark.timeout(20)  # each test takes well under 10 s; this only bounds a hang

load16, store16 = native.load_u16_acquire, native.store_u16_release
WAIT = 5.0  # seconds any one wait may take before the test fails (never reached when all is well)
IPV4 = b"\x08\x00"


def wait_for(cond: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def recv_msg(sock: socket.socket) -> w.Message | None:
    """The next control message (fds that came with it closed), or None at EOF."""
    data, fds, _, _ = socket.recv_fds(sock, w.MSG_SIZE + 1, 4)
    for fd in fds:
        os.close(fd)
    return w.decode(data) if data else None


class RawPeer:
    """A memif client that sends whatever it is told, over a blocking control socket."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.settimeout(WAIT)
        self.sock.connect(path)

    def recv(self) -> w.Message | None:
        return recv_msg(self.sock)

    def send(self, msg: w.Message | bytes, fd: int | None = None) -> None:
        data = msg if isinstance(msg, bytes) else w.encode(msg)
        if fd is None:
            self.sock.send(data)
        else:
            socket.send_fds(self.sock, [data], [fd])

    def ask(self, msg: w.Message | bytes, fd: int | None = None) -> w.Message | None:
        self.send(msg, fd)
        return self.recv()

    def closed(self) -> bool:
        """The server closed the socket (EOF next)."""
        return self.recv() is None

    def close(self) -> None:
        self.sock.close()


class Memory:
    """A raw client's region (a memfd named uniquely, to look for leaks) and ring eventfds, laid
    out as `ClientPlan` says. `file_size` truncates the file (and the peer's own map) shorter."""

    def __init__(self, log2: int = 4, buffer_size: int = 2048, file_size: int | None = None, cookie: bool = True,
                 seals: int = 0, shrinkable: bool = False):
        self.plan = w.ClientPlan(log2, buffer_size)
        self.log2 = log2
        self.size = self.plan.region_size
        self.name = f"mbp-peer-{uuid.uuid4().hex[:8]}"
        self.fd = os.memfd_create(self.name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        mapped = self.size if file_size is None else file_size
        os.ftruncate(self.fd, mapped)
        self.mm = mmap.mmap(self.fd, mapped)
        self.s2m_efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.m2s_efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        if cookie:
            for off in (self.plan.s2m_offset, self.plan.m2s_offset):
                w.RING_START.pack_into(self.mm, off, w.COOKIE, 0)
        if not seals and not shrinkable:  # as DPDK and libmemif seal their regions
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        if seals:  # (a writable shared map of its own would refuse F_SEAL_WRITE: read-only from here)
            self.mm.close()
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, seals)
            self.mm = mmap.mmap(self.fd, mapped, prot=mmap.PROT_READ)

    def ring(self, s2m: bool) -> int:
        return self.plan.s2m_offset if s2m else self.plan.m2s_offset

    def give_buffers(self, n: int, offset: Callable[[int], int] | None = None) -> None:
        """Give the server `n` empty buffers on the server->client ring (head to n)."""
        base = self.ring(False)
        for s in range(n):
            off = offset(s) if offset else self.plan.buffer_offset(False, s)
            w.DESC.pack_into(self.mm, base + w.RING_HEADER + s * 16, 0, 0, self.plan.buffer_size, off, 0)
        store16(self.mm, base + w.RING_HEAD, n)

    def received(self, count: int) -> list[bytes]:
        """The frames in the first `count` descriptors the server filled (chains joined)."""
        base = self.ring(False)
        out, part = [], b""
        for s in range(count):
            flags, region, length, offset, _ = w.DESC.unpack_from(self.mm, base + w.RING_HEADER + s * 16)
            assert region == 0
            part += self.mm[offset:offset + length]
            if not flags & w.DESC_NEXT:
                out.append(part)
                part = b""
        assert part == b"", "the last descriptor filled is flagged NEXT"
        return out

    def fds_left(self) -> int:
        """This process's fds and mappings of the region (after the peer closed its own: the server's)."""
        n = 0
        for fd in os.listdir("/proc/self/fd"):
            try:
                n += self.name in os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                pass
        with open("/proc/self/maps") as maps:
            n += sum(self.name in line for line in maps)
        return n

    def close(self) -> None:
        self.mm.close()
        for fd in (self.fd, self.s2m_efd, self.m2s_efd):
            os.close(fd)


def raw_setup(peer: RawPeer, mem: Memory, init: w.Init | None = None, ring_fds: tuple[int, int] | None = None
              ) -> w.Message | None:
    """The whole client handshake; the reply to CONNECT, or the first reply that is not an ACK
    (a refusal)."""
    assert isinstance(peer.recv(), w.Hello)
    s2m_fd, m2s_fd = ring_fds or (mem.s2m_efd, mem.m2s_efd)
    for msg, fd in ((init or w.Init(0), None), (w.AddRegion(0, mem.size), mem.fd),
                    (w.AddRing(True, 0, 0, mem.ring(True), mem.log2), s2m_fd),
                    (w.AddRing(False, 0, 0, mem.ring(False), mem.log2), m2s_fd)):
        reply = peer.ask(msg, fd) if fd is not None else peer.ask(msg)
        if reply != w.Ack():
            return reply
    return peer.ask(w.Connect("rawpeer"))


# ------------------------------------------------------------------------------------------------
# the rig: a fabric, a server bridge on node "mem", a receiving node "sink", a client node "cli"


@dataclass
class Rig:
    fab: Fabric
    mem: object
    sink: object
    cli: object
    path: str
    secret: bytes
    br: MemifBridge | None = None
    lines: list[str] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    thread: threading.Thread | None = None
    stop_flag: bool = False
    serial: int = 0

    def start(self, config: MemifConfig | None = None, **bridge_args) -> MemifBridge:
        """Run a bridge on node "mem" (by default a server on the rig's path) in a thread."""
        config = config or MemifConfig(self.path, secret=self.secret)
        self.br = br = MemifBridge(self.mem, config, log=self.lines.append, **bridge_args)

        def run() -> None:
            try:
                br.run(lambda: self.stop_flag)
            except BaseException as exc:  # noqa: BLE001 (kept for the test to assert on, not lost in a thread)
                self.errors.append(exc)

        self.thread = threading.Thread(target=run, name="memif-bridge", daemon=True)
        self.thread.start()
        if config.role == "server":
            wait_for(lambda: br._listener is not None, "the bridge to listen")
        return br

    def stop(self) -> None:
        self.stop_flag = True
        if self.thread is not None:
            self.thread.join(WAIT)
            assert not self.thread.is_alive(), "the bridge did not stop"

    @property
    def c(self) -> dict[str, int]:
        assert self.br is not None
        return self.br.counters

    def frame(self, payload: bytes, src: bytes | None = None) -> bytes:
        return self.sink.mac + (src or self.mem.mac) + IPV4 + payload

    def dial(self) -> object:
        """A well-behaved client connected (and the server's link up)."""
        conn = MemifBridge(self.cli, MemifConfig(self.path, role="client", secret=self.secret,
                                                 log2_ring_size=6))._dial()
        wait_for(lambda: self.br.link_up, "link up")
        return conn

    def sink_frames(self, n: int) -> list[bytes]:
        out: list[bytes] = []
        deadline = time.monotonic() + WAIT
        while len(out) < n and (left := deadline - time.monotonic()) > 0:
            with self.sink.recv_batch(64, left) as b:
                for f in b:
                    out.append(f.dst + f.src_mac + f.ethertype.to_bytes(2, "big") + f.tobytes())
        return out

    def assert_serves(self) -> None:
        """A good client connects, its frame reaches the sink exactly, and it leaves again."""
        self.serial += 1
        downs = self.c.get("link_downs", 0)
        conn = self.dial()
        frame = self.frame(f"good frame {self.serial}".encode().ljust(60, b"."))
        put(conn, frame)
        publish(conn)
        assert self.sink_frames(1) == [frame]
        conn.close()
        wait_for(lambda: self.c.get("link_downs", 0) == downs + 1, "the good client's link down")
        assert not self.errors


def put(conn, data: bytes, flags: int = 0, region: int = 0, offset: int | None = None,
        length: int | None = None) -> None:
    """Write one descriptor (and, at the slot's own buffer, its bytes) on the client->server ring."""
    ring = conn.tx
    slot = ring.cursor & ring.mask
    if offset is None:
        offset = conn.plan.buffer_offset(True, slot)
        conn.views[0][offset:offset + len(data)] = data
    w.DESC.pack_into(ring.mm, ring.desc + slot * 16, flags, region, len(data) if length is None else length,
                     offset, 0)
    ring.cursor = (ring.cursor + 1) & 0xFFFF


def publish(conn) -> None:
    store16(conn.tx.mm, conn.tx.head, conn.tx.cursor)
    conn.tx.kick()


@pytest.fixture
def make_rig() -> Iterator[Callable[..., Rig]]:
    made: list[Rig] = []
    tmp = tempfile.mkdtemp(prefix="mbp", dir="/tmp")  # (unix socket paths: < 108 bytes)
    fab = Fabric.create(f"mbp{uuid.uuid4().hex[:8]}", ephemeral=True, networks=[{"mtu": 9000, "slots": 1024}])
    nodes = [fab.attach(n) for n in ("mem", "sink", "cli")]

    def make(secret: bytes = b"", start: bool = True) -> Rig:
        rig = Rig(fab, *nodes, os.path.join(tmp, "m.sock"), secret)
        made.append(rig)
        if start:
            rig.start()
        return rig

    try:
        yield make
    finally:
        for rig in made:
            rig.stop_flag = True
            if rig.thread is not None:
                rig.thread.join(WAIT)
        for n in nodes:
            n.detach()
        fab.close()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def rig(make_rig) -> Rig:
    return make_rig()


def assert_refused(rig: Rig, peer: RawPeer, reason: str, reply: w.Message | None) -> None:
    """The peer heard DISCONNECT `reason`, its socket was closed, the bridge counted and logged it."""
    assert reply == w.Disconnect(reason)
    assert peer.closed()
    assert rig.c["handshakes_refused"] == 1
    assert f"refused a peer: {reason}" in rig.lines
    assert not rig.br.link_up and "link_ups" not in rig.c


# ------------------------------------------------------------------------------------------------
# 1-4: handshakes refused


def _wrong_id(peer, mem):
    assert isinstance(peer.recv(), w.Hello)
    return peer.ask(w.Init(7)), "ID not found: interface id 7 asked, this socket serves 0"


def _ring_past_region(peer, mem):
    assert isinstance(peer.recv(), w.Hello)
    assert peer.ask(w.Init(0)) == w.Ack()
    assert peer.ask(w.AddRegion(0, 4096), mem.fd) == w.Ack()
    return (peer.ask(w.AddRing(True, 0, 0, 0, 10), mem.s2m_efd),
            "ring 0 (client-to-server) ends at byte 16512, past region 0's 4096 bytes")


def _region_fd_missing(peer, mem):
    assert isinstance(peer.recv(), w.Hello)
    assert peer.ask(w.Init(0)) == w.Ack()
    return peer.ask(w.AddRegion(0, mem.size)), "missing region fd with ADD_REGION 0"


def _ring_fd_missing(peer, mem):
    assert isinstance(peer.recv(), w.Hello)
    assert peer.ask(w.Init(0)) == w.Ack()
    assert peer.ask(w.AddRegion(0, mem.size), mem.fd) == w.Ack()
    return peer.ask(w.AddRing(True, 0, 0, 0, mem.log2)), "missing interrupt fd with ADD_RING 0"


def _garbage(peer, mem):
    assert isinstance(peer.recv(), w.Hello)
    return peer.ask(b"\xff" * 128, mem.fd), "unknown control message type 65535 (memif 2.0 has types 1-8)"


def _garbage_after_init(peer, mem):
    assert isinstance(peer.recv(), w.Hello)
    assert peer.ask(w.Init(0)) == w.Ack()
    return peer.ask(b"\x63\x00" + os.urandom(126)), "unknown control message type 99 (memif 2.0 has types 1-8)"


def _short_message(peer, mem):
    assert isinstance(peer.recv(), w.Hello)
    return peer.ask(w.encode(w.Init(0))[:64]), "control message of 64 bytes; memif messages are 128"


def _connect_before_rings(peer, mem):
    assert isinstance(peer.recv(), w.Hello)
    assert peer.ask(w.Init(0)) == w.Ack()
    assert peer.ask(w.AddRegion(0, mem.size), mem.fd) == w.Ack()
    assert peer.ask(w.AddRing(True, 0, 0, mem.ring(True), mem.log2), mem.s2m_efd) == w.Ack()
    return peer.ask(w.Connect("early")), "CONNECT before a ring each way was added"


def _connect_first(peer, mem):
    assert isinstance(peer.recv(), w.Hello)
    return peer.ask(w.Connect("early")), "expected INIT first, got CONNECT"


def _init_twice(peer, mem):
    assert isinstance(peer.recv(), w.Hello)
    assert peer.ask(w.Init(0)) == w.Ack()
    return peer.ask(w.Init(0)), "unexpected INIT while setup"


def _second_region_index(peer, mem):
    assert isinstance(peer.recv(), w.Hello)
    assert peer.ask(w.Init(0)) == w.Ack()
    assert peer.ask(w.AddRegion(0, mem.size), mem.fd) == w.Ack()
    return (peer.ask(w.AddRegion(0, mem.size), mem.fd),
            "invalid region index 0: expected 1 (at most 16 regions)")


def _small_region(peer, mem):  # the file is 4096 bytes, ADD_REGION says more: mapped, it would SIGBUS
    return raw_setup(peer, mem), f"region file holds 4096 bytes, not the {mem.size} announced"


def _no_cookie(peer, mem):
    return raw_setup(peer, mem), "the client-to-server ring has no memif cookie (0x3E31F20)"


def _no_cookie_m2s(peer, mem):
    w.RING_START.pack_into(mem.mm, mem.ring(False), 0, 0)
    return raw_setup(peer, mem), "the server-to-client ring has no memif cookie (0x3E31F20)"


@pytest.mark.parametrize("case, mem_args", [
    (_wrong_id, {}), (_ring_past_region, {}), (_region_fd_missing, {}), (_ring_fd_missing, {}), (_garbage, {}),
    (_garbage_after_init, {}), (_short_message, {}), (_connect_before_rings, {}), (_connect_first, {}),
    (_init_twice, {}), (_second_region_index, {}), (_small_region, {"file_size": 4096}),
    (_no_cookie, {"cookie": False}), (_no_cookie_m2s, {}),
], ids=lambda v: v.__name__.strip("_") if callable(v) else "")
def test_a_bad_handshake_is_refused_with_its_reason_and_the_next_client_is_served(rig, case, mem_args):
    mem = Memory(**mem_args)
    peer = RawPeer(rig.path)
    try:
        reply, reason = case(peer, mem)
        assert_refused(rig, peer, reason, reply)
    finally:
        peer.close()
        mem.close()
    assert mem.fds_left() == 0  # every fd it sent closed, nothing of its region mapped
    rig.assert_serves()
    assert rig.c["handshakes_refused"] == 1 and rig.c["link_ups"] == 1


@pytest.mark.parametrize("secret, reason", [(b"", "secret required"), (b"guess", "incorrect secret")])
def test_a_wrong_or_missing_secret_is_refused(make_rig, secret, reason):
    rig = make_rig(secret=b"sekrit")
    peer = RawPeer(rig.path)
    try:
        assert isinstance(peer.recv(), w.Hello)
        assert_refused(rig, peer, reason, peer.ask(w.Init(0, secret)))
    finally:
        peer.close()
    rig.assert_serves()  # (with the secret)


def test_a_message_too_long_is_named_by_its_length(rig):
    peer = RawPeer(rig.path)
    try:
        assert isinstance(peer.recv(), w.Hello)
        reply = peer.ask(w.encode(w.Init(0)) + b"\0" * 72)
        assert isinstance(reply, w.Disconnect) and "memif messages are 128" in reply.reason
        assert peer.closed()
    finally:
        peer.close()
    rig.assert_serves()


def test_a_message_too_long_is_refused_as_too_long(rig):
    peer = RawPeer(rig.path)
    try:
        assert isinstance(peer.recv(), w.Hello)
        reply = peer.ask(w.encode(w.Init(0)) + b"\0" * 72)
        assert reply == w.Disconnect("control message longer than 128 bytes; memif messages are 128")
    finally:
        peer.close()


@pytest.mark.parametrize("after_init", [False, True], ids=["silent", "stalls-after-init"])
def test_a_peer_that_does_not_finish_is_dropped_after_the_handshake_timeout(rig, monkeypatch, after_init):
    monkeypatch.setattr("shmfabric.adapters.memif.HANDSHAKE_TIMEOUT", 0.3)
    peer = RawPeer(rig.path)
    try:
        assert isinstance(peer.recv(), w.Hello)
        if after_init:
            assert peer.ask(w.Init(0)) == w.Ack()
        assert_refused(rig, peer, "handshake not finished within 0.3 s", peer.recv())
    finally:
        peer.close()
    rig.assert_serves()


# ------------------------------------------------------------------------------------------------
# 5-6: bad descriptors and indices once connected


def test_bad_descriptors_drop_their_frame_only(rig):
    conn = rig.dial()
    try:
        good = [rig.frame(b"first".ljust(50, b"1")), rig.frame(b"second".ljust(50, b"2"), src=b"\x02" * 6)]
        size = conn.sizes[0]
        put(conn, b"", offset=size - 10, length=64)  # runs past the region's end
        put(conn, good[0])
        put(conn, b"", region=1, offset=0, length=64)  # a region never added
        put(conn, b"", offset=1 << 31, length=1 << 31)  # far past
        put(conn, good[1])  # (copy path: another source MAC)
        publish(conn)
        assert rig.sink_frames(2) == good
        c = rig.c
        assert c["drop_bad_descriptor"] == 3 and c["to_fabric"] == 2 and c["from_device"] == 5
        assert rig.br.link_up
    finally:
        conn.close()


def test_a_chain_with_a_bad_middle_descriptor_is_dropped_whole(rig):
    conn = rig.dial()
    try:
        first = rig.frame(b"a" * 2000)
        put(conn, first[:2048], flags=w.DESC_NEXT)
        put(conn, b"", flags=w.DESC_NEXT, offset=conn.sizes[0], length=100)  # past the region
        put(conn, b"c" * 100)
        after = rig.frame(b"after the bad chain".ljust(80, b"."))
        put(conn, after)
        publish(conn)
        assert rig.sink_frames(1) == [after]
        c = rig.c
        assert c["drop_bad_descriptor"] == 1 and c["to_fabric"] == 1 and c["from_device"] == 2
    finally:
        conn.close()


def test_a_valid_chained_frame_arrives_whole(rig):
    conn = rig.dial()
    try:
        big = rig.frame(bytes(range(256)) * 20)[:5000]
        assert len(big) == 5000
        put(conn, big[:2048], flags=w.DESC_NEXT)
        put(conn, big[2048:4096], flags=w.DESC_NEXT)
        put(conn, big[4096:])
        small = rig.frame(b"small".ljust(46, b"."))
        put(conn, small)
        publish(conn)
        assert rig.sink_frames(2) == [big, small]
        assert rig.c["to_fabric"] == 2 and "drop_bad_descriptor" not in rig.c
    finally:
        conn.close()


def test_a_head_moved_past_the_ring_disconnects_the_peer(rig):
    conn = rig.dial()
    try:
        ring = conn.tx
        store16(ring.mm, ring.head, ring.size + 5)
        ring.kick()
        conn.sock.settimeout(WAIT)
        reason = "the peer moved its ring index 69 descriptors ahead, past the ring's 64"
        assert recv_msg(conn.sock) == w.Disconnect(reason)
        assert recv_msg(conn.sock) is None
        wait_for(lambda: rig.c.get("link_downs") == 1, "link down")
        assert not rig.br.link_up
        assert f"link down: {reason}" in rig.lines
    finally:
        conn.close()
    rig.assert_serves()
    assert rig.c["link_ups"] == 2 and not rig.errors


# ------------------------------------------------------------------------------------------------
# 7-8: a second client, a peer that goes away


def test_a_second_client_is_told_already_connected_and_the_first_goes_on(rig):
    first = rig.dial()
    try:
        peer = RawPeer(rig.path)
        try:
            assert isinstance(peer.recv(), w.Hello)
            assert peer.recv() == w.Disconnect("already connected")
            assert peer.closed()
        finally:
            peer.close()
        assert rig.c["handshakes_refused"] == 1
        frame = rig.frame(b"still here".ljust(50, b"."))
        put(first, frame)
        publish(first)
        assert rig.sink_frames(1) == [frame]
        assert rig.br.link_up and rig.c["link_ups"] == 1 and "link_downs" not in rig.c
    finally:
        first.close()


@pytest.mark.parametrize("how, said", [
    ("close", "the peer closed the control socket"),
    ("disconnect", "the peer disconnected: going away"),
    ("garbage", "unexpected CONNECT after the connection was set up"),
])
def test_a_peer_that_leaves_takes_the_link_down(rig, how, said):
    conn = rig.dial()
    if how == "disconnect":
        conn.sock.send(w.encode(w.Disconnect("going away", 1)))
    elif how == "garbage":
        conn.sock.send(w.encode(w.Connect("again")))
        conn.sock.settimeout(WAIT)
        assert recv_msg(conn.sock) == w.Disconnect(said)
    conn.close()
    wait_for(lambda: rig.c.get("link_downs") == 1, "link down")
    assert not rig.br.link_up and rig.br.peer == ""
    assert f"link down: {said}" in rig.lines
    rig.assert_serves()
    assert rig.c["link_ups"] == 2


def child_peer(path: str) -> None:
    """Run in a child process: a raw client that connects, says so, and waits to be killed."""
    mem = Memory()
    peer = RawPeer(path)
    assert raw_setup(peer, mem) == w.Connected("shmfabric")
    print("up", flush=True)
    time.sleep(60)


CHILD = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("bad_peer", sys.argv[1])
mod = sys.modules["bad_peer"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
mod.child_peer(sys.argv[2])
"""


def test_a_peer_killed_9_takes_the_link_down(rig):
    proc = subprocess.Popen([sys.executable, "-c", CHILD, __file__, rig.path], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        assert select.select([proc.stdout], [], [], 10)[0], "the child peer did not connect"
        assert proc.stdout.readline() == b"up\n", proc.stderr.read()
        wait_for(lambda: rig.br.link_up, "link up")
        assert rig.br.peer == "? (rawpeer)"  # (its INIT names no one)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(WAIT) == -signal.SIGKILL
        wait_for(lambda: rig.c.get("link_downs") == 1, "link down")
        assert not rig.br.link_up
        assert "link down: the peer closed the control socket" in rig.lines
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(WAIT)
        proc.stdout.close()
        proc.stderr.close()
    rig.assert_serves()
    assert rig.c["link_ups"] == 2


# ------------------------------------------------------------------------------------------------
# 9: the socket path


def test_a_stale_socket_file_is_replaced(make_rig):
    rig = make_rig(start=False)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stale.bind(rig.path)
    stale.close()  # (the file stays: a server that died)
    assert os.path.exists(rig.path)
    rig.start()
    rig.assert_serves()
    rig.stop()
    assert not os.path.exists(rig.path)  # stopping removes its socket file
    assert not rig.errors


def test_a_live_server_on_the_path_is_not_taken_over(rig):
    other = MemifBridge(rig.cli, MemifConfig(rig.path))
    with pytest.raises(MemifError, match=f"^{rig.path} is in use by another memif server: stop it or give "
                                         "another --socket path$"):
        other.listen()
    assert other._listener is None
    rig.assert_serves()  # (the probe's connection cost the live one nothing)


def test_a_regular_file_at_the_path_is_refused(make_rig):
    rig = make_rig(start=False)
    with open(rig.path, "w") as f:
        f.write("not a socket")
    br = MemifBridge(rig.mem, MemifConfig(rig.path))
    with pytest.raises(MemifError, match=f"^{rig.path} exists and is not a socket: give another --socket path$"):
        br.listen()
    with open(rig.path) as f:
        assert f.read() == "not a socket"  # untouched


def test_stopping_leaves_a_newer_servers_socket_file_alone(rig):
    os.unlink(rig.path)
    newer = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        newer.bind(rig.path)
        rig.stop()
        assert os.path.exists(rig.path)
    finally:
        newer.close()
        os.unlink(rig.path)


# ------------------------------------------------------------------------------------------------
# 10: frames to the peer


def test_frames_for_the_peer_are_dropped_while_the_link_is_down_and_delivered_once_up(rig):
    for i in range(5):
        assert rig.sink.send(rig.mem.id, b"lost %d" % i, 0x0800)
    wait_for(lambda: rig.c.get("drop_link_down") == 5, "5 frames dropped with the link down")

    mem = Memory()
    peer = RawPeer(rig.path)
    try:
        assert raw_setup(peer, mem) == w.Connected("shmfabric")
        wait_for(lambda: rig.br.link_up, "link up")
        payloads = [b"one".ljust(46, b"."), b"two".ljust(100, b"."), bytes(range(256)) * 19]  # last: 3 buffers
        for p in payloads[:2]:  # no buffer given yet: they wait in the fabric, none dropped
            assert rig.sink.send(rig.mem.id, p, 0x0800)
        mem.give_buffers(16)
        assert rig.sink.send(rig.mem.id, payloads[2], 0x0800)
        tail = mem.ring(False) + w.RING_TAIL
        wait_for(lambda: load16(mem.mm, tail) == 5, "5 descriptors filled")
        assert mem.received(5) == [rig.mem.mac + rig.sink.mac + IPV4 + p for p in payloads]
        assert os.read(mem.m2s_efd, 8) != b"\0" * 8  # woken: its ring does not mask interrupts
        c = rig.c
        assert c["to_device"] == 3 and c["drop_link_down"] == 5
    finally:
        peer.close()
        mem.close()
    wait_for(lambda: rig.c.get("link_downs") == 1, "link down")
    rig.assert_serves()


# ------------------------------------------------------------------------------------------------
# bugs found: a peer that breaks the bridge itself (each should be a disconnect, not a dead bridge)


def test_a_receive_buffer_outside_the_region_disconnects_the_peer(rig):
    mem = Memory()
    peer = RawPeer(rig.path)
    try:
        assert raw_setup(peer, mem) == w.Connected("shmfabric")
        wait_for(lambda: rig.br.link_up, "link up")
        mem.give_buffers(16, offset=lambda s: mem.size)  # every buffer starts at the region's end
        assert rig.sink.send(rig.mem.id, b"x" * 60, 0x0800)
        assert peer.recv() == w.Disconnect("the client's buffer at descriptor 0 lies outside region 0")
        assert rig.c["link_downs"] == 1  # counted before the peer was told (a test reading it then saw 0)
    finally:
        peer.close()
        mem.close()
    rig.assert_serves()


def test_a_ring_fd_that_is_not_an_eventfd_is_refused(rig):
    mem = Memory()
    r, wr = os.pipe()
    peer = RawPeer(rig.path)
    try:
        reply = raw_setup(peer, mem, ring_fds=(mem.s2m_efd, r))
        assert isinstance(reply, w.Disconnect) and reply.reason.startswith(
            "the fd with ADD_RING 0 is not an eventfd (pipe:"), reply
        assert peer.closed()
        assert rig.c["handshakes_refused"] == 1
    finally:
        peer.close()
        mem.close()
        os.close(r)
        os.close(wr)
    rig.assert_serves()


def test_a_region_that_cannot_be_mapped_writable_is_refused_with_a_reason(rig):
    mem = Memory(seals=fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    peer = RawPeer(rig.path)
    try:
        reply = raw_setup(peer, mem)
        assert reply == w.Disconnect("region 0 is sealed against writes: its buffers cannot be filled"), reply
        assert peer.closed()
        assert rig.c["handshakes_refused"] == 1
    finally:
        peer.close()
        mem.close()
    rig.assert_serves()


SERVER_CHILD = """
import select, sys, uuid
from shmfabric.adapters.memif import MemifBridge, MemifConfig
from shmfabric.fabric import Fabric
fab = Fabric.create(f"mbpc{uuid.uuid4().hex[:8]}", ephemeral=True, networks=[{"mtu": 9000, "slots": 256}])
node = fab.attach("mem")
br = MemifBridge(node, MemifConfig(sys.argv[1]))
br.listen()
print("ready", flush=True)
try:
    br.run(lambda: bool(select.select([sys.stdin], [], [], 0)[0]))  # until stdin closes
finally:
    node.detach()
    fab.close()
"""


def test_a_region_that_could_shrink_is_refused_before_it_can_fault_the_bridge():
    """A region the peer could shrink after the handshake would fault this side (SIGBUS) on the
    next frame in it: memif regions are memfds sealed against shrinking, and others are refused.
    The bridge runs in a child process, so a fault would show as its death, not the test's."""
    tmp = tempfile.mkdtemp(prefix="mbp", dir="/tmp")
    path = os.path.join(tmp, "m.sock")
    proc = subprocess.Popen([sys.executable, "-c", SERVER_CHILD, path], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    mem = Memory(shrinkable=True)
    peer = None
    try:
        assert select.select([proc.stdout], [], [], 10)[0] and proc.stdout.readline() == b"ready\n"
        peer = RawPeer(path)
        reply = raw_setup(peer, mem)
        assert reply == w.Disconnect("region 0 is not sealed against shrinking (F_SEAL_SHRINK)"), reply
        assert proc.poll() is None
    finally:
        if peer is not None:
            peer.close()
        mem.close()
        proc.stdin.close()
        try:
            proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(WAIT)
        proc.stdout.close()
        proc.stderr.close()
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# 11: chains the bridge must not join: longer than the MTU, or never ending


def test_a_chain_longer_than_the_mtu_is_dropped_unjoined_and_the_next_frame_arrives(rig):
    conn = rig.dial()
    try:
        head = rig.frame(b"h" * 100)
        for _ in range(19):  # 20 buffers of 2048 bytes: 40,960 bytes on a 9,000-byte MTU
            put(conn, head.ljust(2048, b"x"), flags=w.DESC_NEXT)
        put(conn, b"y" * 2048)
        after = rig.frame(b"after the long chain".ljust(80, b"."))
        put(conn, after)
        publish(conn)
        assert rig.sink_frames(1) == [after]
        c = rig.c
        assert c["drop_too_big"] == 1 and c["to_fabric"] == 1 and c["from_device"] == 2
        assert "drop_bad_descriptor" not in c and rig.br.link_up and not rig.errors
    finally:
        conn.close()


def test_a_chain_of_descriptors_overlapping_the_whole_region_is_never_joined(rig):
    """Descriptors may overlap: 64 of them each naming the whole region would join into ~17 MB
    (with a 2^14 ring of them, gigabytes: MemoryError). Past the MTU the parts are only counted."""
    conn = rig.dial()
    try:
        size = conn.sizes[0]
        tracemalloc.start()
        try:
            for _ in range(conn.tx.size - 1):
                put(conn, b"", flags=w.DESC_NEXT, offset=0, length=size)
            put(conn, b"", offset=0, length=size)
            publish(conn)
            wait_for(lambda: rig.c.get("drop_too_big") == 1, "the chain dropped")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < size * 4, f"{peak} bytes allocated while dropping a chain of {conn.tx.size} x {size} bytes"
        after = rig.frame(b"after".ljust(60, b"."))
        put(conn, after)
        publish(conn)
        assert rig.sink_frames(1) == [after]
        c = rig.c
        assert c["drop_too_big"] == 1 and c["to_fabric"] == 1 and c["from_device"] == 2 and not rig.errors
    finally:
        conn.close()


@pytest.mark.parametrize("length", [60, 2048])
def test_a_chain_that_never_ends_is_dropped_and_the_port_keeps_serving(rig, length):
    conn = rig.dial()
    try:
        for i in range(conn.tx.size):  # every descriptor flagged NEXT, head moved by the whole ring
            put(conn, bytes([i]) * length, flags=w.DESC_NEXT)
        publish(conn)
        wait_for(lambda: rig.c.get("from_device") == 1, "the endless chain taken")
        c = rig.c
        assert c["drop_bad_descriptor"] == 1 and "to_fabric" not in c and "drop_too_big" not in c
        assert load16(conn.tx.mm, conn.tx.tail) == conn.tx.size  # its buffers given back
        after = rig.frame(b"after the endless chain".ljust(80, b"."))
        put(conn, after)
        publish(conn)
        assert rig.sink_frames(1) == [after]
        assert rig.c["to_fabric"] == 1 and rig.c["from_device"] == 2
        assert rig.br.link_up and "link_downs" not in rig.c and not rig.errors
    finally:
        conn.close()
    wait_for(lambda: rig.c.get("link_downs") == 1, "link down")
    rig.assert_serves()


# ------------------------------------------------------------------------------------------------
# 12: server role: the client's receive ring misused


def _ring_desc(mem: Memory, s2m: bool, slot: int) -> int:
    return mem.ring(s2m) + w.RING_HEADER + slot * 16


@pytest.mark.parametrize("move", [17, -1], ids=["ahead-past-the-ring", "behind-what-was-filled"])
def test_a_receive_head_moved_to_an_impossible_place_disconnects_the_client(rig, move):
    mem = Memory()  # a ring of 16
    peer = RawPeer(rig.path)
    try:
        assert raw_setup(peer, mem) == w.Connected("shmfabric")
        wait_for(lambda: rig.br.link_up, "link up")
        mem.give_buffers(4)
        for i in range(3):
            assert rig.sink.send(rig.mem.id, b"frame %d" % i, 0x0800)
        tail = mem.ring(False) + w.RING_TAIL
        wait_for(lambda: load16(mem.mm, tail) == 3, "3 descriptors filled")
        store16(mem.mm, mem.ring(False) + w.RING_HEAD, (3 + move) & 0xFFFF)
        free = move & 0xFFFF
        reason = f"the peer moved its index of the ring this side sends on to an impossible place ({free} free of 16)"
        reply = peer.recv()  # (a DISCONNECT reason holds 95 bytes: the log has it whole)
        assert reply == w.Disconnect(reason[:w.REASON_SZ - 1]) and "impossible place" in reply.reason
        assert peer.closed()
        wait_for(lambda: rig.c.get("link_downs") == 1, "link down")
        assert f"link down: {reason}" in rig.lines
        c = rig.c
        assert c["to_device"] == 3 and c["link_ups"] == 1 and not rig.errors
    finally:
        peer.close()
        mem.close()
    rig.assert_serves()
    assert rig.c["link_ups"] == 2 and not rig.errors


@pytest.mark.parametrize("region, offset, length, named", [
    (1, None, 2048, 1),  # a region never added
    (0, None, 1 << 20, 0),  # starts inside, runs far past the end
    (0, None, 0, 0),  # no room at all
], ids=["other-region", "length-past-the-end", "zero-length"])
def test_a_receive_buffer_whose_region_or_length_is_outside_disconnects_the_client(rig, region, offset, length,
                                                                                     named):
    # (the offset past the region is test_a_receive_buffer_outside_the_region_disconnects_the_peer)
    mem = Memory()
    peer = RawPeer(rig.path)
    try:
        assert raw_setup(peer, mem) == w.Connected("shmfabric")
        wait_for(lambda: rig.br.link_up, "link up")
        for s in range(16):
            w.DESC.pack_into(mem.mm, _ring_desc(mem, False, s), 0, region, length,
                             mem.plan.buffer_offset(False, s) if offset is None else offset, 0)
        store16(mem.mm, mem.ring(False) + w.RING_HEAD, 16)
        assert rig.sink.send(rig.mem.id, b"x" * 60, 0x0800)
        reason = f"the client's buffer at descriptor 0 lies outside region {named}"
        assert peer.recv() == w.Disconnect(reason)
        assert peer.closed()
        wait_for(lambda: rig.c.get("link_downs") == 1, "link down")
        assert f"link down: {reason}" in rig.lines and not rig.errors
        assert rig.c.get("to_device", 0) == 0
    finally:
        peer.close()
        mem.close()
    rig.assert_serves()


def test_frames_taken_when_the_clients_buffer_proves_bad_are_counted(rig):
    mem = Memory()
    peer = RawPeer(rig.path)
    try:
        assert raw_setup(peer, mem) == w.Connected("shmfabric")
        wait_for(lambda: rig.br.link_up, "link up")
        mem.give_buffers(16, offset=lambda s: mem.size)
        assert rig.sink.send(rig.mem.id, b"x" * 60, 0x0800)
        assert isinstance(peer.recv(), w.Disconnect)
        wait_for(lambda: rig.c.get("link_downs") == 1, "link down")
        c = rig.c
        assert c.get("to_device", 0) + sum(v for k, v in c.items() if k.startswith("drop_")) == 1, c
    finally:
        peer.close()
        mem.close()


# ------------------------------------------------------------------------------------------------
# 13: client role, against a raw server


class RawServer:
    """A memif server that sends whatever it is told, driven step by step from the test's thread:
    it listens on the path, accepts one client at a time, and once connected reads the
    client->server ring and fills the server->client one as a server would."""

    def __init__(self, path: str):
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.listener.bind(path)
        self.listener.listen(4)
        self.listener.settimeout(WAIT)
        self.socks: list[socket.socket] = []
        self.fds: dict[str, int] = {}
        self.rings: dict[bool, w.AddRing] = {}
        self.region_size = 0
        self.mm: mmap.mmap | None = None
        self.read = 0  # client->server ring: the next descriptor to read (its tail)
        self.filled = 0  # server->client ring: the descriptors filled (its tail)

    @property
    def sock(self) -> socket.socket:
        return self.socks[-1]

    def accept(self) -> socket.socket:
        sock, _ = self.listener.accept()
        sock.settimeout(WAIT)
        self.socks.append(sock)
        return sock

    def send(self, msg: w.Message) -> None:
        self.sock.send(w.encode(msg))

    def recv(self) -> tuple[w.Message | None, list[int]]:
        data, fds, _, _ = socket.recv_fds(self.sock, w.MSG_SIZE + 1, 4)
        return (w.decode(data) if data else None), fds

    def handshake(self) -> None:
        """HELLO, an ACK to each setup message (keeping its fd), CONNECTED; the region mapped."""
        self.send(w.ServerHandshake(0, name="rawserver").hello())
        msg, fds = self.recv()
        assert isinstance(msg, w.Init) and not fds, msg
        self.send(w.Ack())
        msg, fds = self.recv()
        assert isinstance(msg, w.AddRegion) and msg.index == 0 and len(fds) == 1, msg
        self.fds["region"], self.region_size = fds[0], msg.size
        self.send(w.Ack())
        for _ in range(2):
            msg, fds = self.recv()
            assert isinstance(msg, w.AddRing) and msg.region == 0 and len(fds) == 1, msg
            self.rings[msg.s2m] = msg
            self.fds["s2m" if msg.s2m else "m2s"] = fds[0]
            self.send(w.Ack())
        assert set(self.rings) == {True, False}
        msg, fds = self.recv()
        assert isinstance(msg, w.Connect) and not fds, msg
        self.mm = mmap.mmap(self.fds["region"], self.region_size)
        self.send(w.Connected("rawserver"))

    def size(self, s2m: bool) -> int:
        return 1 << self.rings[s2m].log2_ring_size

    def head(self, s2m: bool) -> int:
        return load16(self.mm, self.rings[s2m].offset + w.RING_HEAD)

    def take(self, count: int) -> list[bytes]:
        """The next `count` frames on the client->server ring (chains joined), its tail moved past
        each batch read, as a server gives the buffers back."""
        ring = self.rings[True].offset
        mask = self.size(True) - 1
        out: list[bytes] = []
        part = b""
        deadline = time.monotonic() + WAIT
        while len(out) < count:
            head = self.head(True)
            if head == self.read:
                assert time.monotonic() < deadline, f"timed out with {len(out)} of {count} frames read"
                time.sleep(0.002)
                continue
            while self.read != head:
                flags, region, length, offset, _ = w.DESC.unpack_from(
                    self.mm, ring + w.RING_HEADER + (self.read & mask) * 16)
                assert region == 0 and offset + length <= self.region_size
                part += self.mm[offset:offset + length]
                self.read = (self.read + 1) & 0xFFFF
                if not flags & w.DESC_NEXT:
                    out.append(part)
                    part = b""
            store16(self.mm, ring + w.RING_TAIL, self.read)
        assert part == b"", "a chain published without its end"
        return out

    def publish(self, frame: bytes) -> int:
        """Fill the client's next buffers with `frame` (chained as their lengths need), move the
        tail and kick the client's eventfd; the descriptors used."""
        ring = self.rings[False].offset
        mask = self.size(False) - 1
        pos = used = 0
        while pos < len(frame):
            assert (self.head(False) - self.filled - used) & 0xFFFF, "no buffer given to fill"
            d = ring + w.RING_HEADER + ((self.filled + used) & mask) * 16
            _, region, cap, offset, _ = w.DESC.unpack_from(self.mm, d)
            assert region == 0 and cap and offset + cap <= self.region_size
            chunk = frame[pos:pos + cap]
            self.mm[offset:offset + len(chunk)] = chunk
            pos += len(chunk)
            w.DESC.pack_into(self.mm, d, 0 if pos >= len(frame) else w.DESC_NEXT, 0, len(chunk), offset, 0)
            used += 1
        self.filled = (self.filled + used) & 0xFFFF
        store16(self.mm, ring + w.RING_TAIL, self.filled)
        os.write(self.fds["m2s"], (1).to_bytes(8, "little"))
        return used

    def close(self) -> None:
        if self.mm is not None:
            self.mm.close()
        for fd in self.fds.values():
            os.close(fd)
        for sock in self.socks:
            sock.close()
        self.listener.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


@pytest.fixture
def server(make_rig) -> Iterator[tuple[Rig, RawServer]]:
    """A rig whose node "mem" will run a client bridge, and a raw server on the rig's path."""
    rig = make_rig(start=False)
    srv = RawServer(rig.path)
    try:
        yield rig, srv
    finally:
        rig.stop_flag = True
        if rig.thread is not None:
            rig.thread.join(WAIT)
        srv.close()


def client_up(rig: Rig, srv: RawServer, **config) -> MemifBridge:
    """A client bridge on "mem" connected to the raw server, its receive buffers given."""
    br = rig.start(MemifConfig(rig.path, role="client", **config))
    srv.accept()
    srv.handshake()
    wait_for(lambda: br.link_up, "the client's link up")
    assert srv.head(False) == srv.size(False)  # (refilled before the link came up)
    return br


def region_fds(name: str) -> int:
    """This process's fds and mappings of memfds called `name`."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += f"/memfd:{name} " in os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    with open("/proc/self/maps") as maps:
        n += sum(f"/memfd:{name} " in line for line in maps)
    return n


def test_the_client_region_is_sealed_so_the_server_cannot_shrink_it(server):
    rig, srv = server
    client_up(rig, srv)
    fd = srv.fds["region"]
    assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK
    with pytest.raises(PermissionError):  # EPERM: the seal holds
        os.ftruncate(fd, 4096)
    assert os.fstat(fd).st_size == srv.region_size == w.ClientPlan(10, 2048).region_size
    assert rig.br.link_up and not rig.errors


def test_a_frame_longer_than_the_clients_whole_ring_is_dropped_and_the_next_ones_arrive(server):
    rig, srv = server
    br = client_up(rig, srv, log2_ring_size=2, buffer_size=128)  # 4 buffers of 128 bytes: 512 at most
    assert srv.size(True) == 4
    assert rig.sink.send(rig.mem.id, b"B" * 986, 0x0800)  # 1,000 bytes: 8 buffers
    payloads = [b"small %d" % i + b"." * 40 for i in range(6)]
    payloads.insert(3, bytes(range(256)) + b"c" * 30)  # 300 bytes: a chain of 3
    for p in payloads:
        assert rig.sink.send(rig.mem.id, p, 0x0800)
    got = srv.take(len(payloads))
    assert got == [rig.mem.mac + rig.sink.mac + IPV4 + p for p in payloads]
    wait_for(lambda: br.counters.get("to_device") == len(payloads), "every small frame counted")
    c = br.counters
    assert c["drop_too_big"] == 1 and c["to_device"] == 7 and "drop_link_down" not in c and not rig.errors


def test_a_server_that_never_says_hello_is_left_after_the_handshake_timeout(server, monkeypatch):
    rig, srv = server
    monkeypatch.setattr("shmfabric.adapters.memif.HANDSHAKE_TIMEOUT", 0.3)
    rig.start(MemifConfig(rig.path, role="client"))
    srv.accept()  # and says nothing
    wait_for(lambda: "could not connect: handshake not finished within 0.3 s" in rig.lines, "the client to give up")
    srv.accept()  # it tries again
    rig.stop_flag = True  # (the attempt under way is its last)
    srv.sock.close()
    rig.stop()
    assert rig.lines == ["could not connect: handshake not finished within 0.3 s",
                         "could not connect: the peer closed the control socket"]
    assert rig.br.counters == {"handshakes_failed": 2} and not rig.errors


def test_a_server_that_refuses_the_client_is_logged_with_its_reason(server):
    rig, srv = server
    rig.start(MemifConfig(rig.path, role="client", id=5))
    srv.accept()
    srv.send(w.ServerHandshake(0).hello())
    msg, fds = srv.recv()
    assert msg == w.Init(5, b"", "shmfabric") and not fds
    rig.stop_flag = True  # (no attempt after this one)
    srv.send(w.Disconnect("ID not found", 1))
    rig.stop()
    assert rig.lines == ["the server refused the connection: ID not found"]
    assert rig.br.counters == {"handshakes_refused": 1} and not rig.errors
    assert region_fds("shmfabric-memif-mem") == 0  # the region made for it closed and unmapped


def test_frames_the_server_sends_reach_the_node_their_mac_names_and_the_client_refills(server):
    rig, srv = server
    br = client_up(rig, srv, log2_ring_size=2, buffer_size=128)
    ring = srv.size(False)
    one = rig.frame(b"one buffer".ljust(86, b"."))
    assert srv.publish(one) == 1
    assert rig.sink_frames(1) == [one]
    wait_for(lambda: srv.head(False) == 1 + ring, "the client to give the buffer back")
    chained = rig.frame(bytes(range(256)) + b"tail".ljust(30, b"."))  # 300 bytes
    assert srv.publish(chained) == 3
    assert rig.sink_frames(1) == [chained]
    wait_for(lambda: srv.head(False) == 4 + ring, "the client to give the chain's buffers back")
    c = br.counters
    assert c["from_device"] == 2 and c["to_fabric"] == 2 and not any(k.startswith("drop_") for k in c)
    assert not rig.errors


# ------------------------------------------------------------------------------------------------
# 14: second review: a header changed after the batch was taken, the peer's eventfds made
# blocking or semaphores, fds past 1023


EFD_MAX = 0xFFFFFFFFFFFFFFFE  # an eventfd's largest count: one more and a write blocks (or EAGAIN)
ARP = b"\x08\x06"


def raw_publish(mem: Memory, frame: bytes, slot: int = 0) -> int:
    """A raw client's frame written at `slot` of its client->server ring, published (head to
    slot + 1) and the server woken; the offset of its buffer in the client's region."""
    ring = mem.ring(True)
    off = mem.plan.buffer_offset(True, slot)
    mem.mm[off:off + len(frame)] = frame
    w.DESC.pack_into(mem.mm, ring + w.RING_HEADER + slot * 16, 0, 0, len(frame), off, 0)
    store16(mem.mm, ring + w.RING_HEAD, slot + 1)
    os.write(mem.s2m_efd, (1).to_bytes(8, "little"))
    return off


def waiting(node) -> list[bytes]:
    """The frames already in `node`'s ring (no wait), whole."""
    with node.recv_batch(64, 0) as b:
        return [f.dst + f.src_mac + f.ethertype.to_bytes(2, "big") + f.tobytes() for f in b]


def test_a_header_the_peer_changes_after_the_batch_was_taken_does_not_change_where_it_goes(make_rig, monkeypatch):
    """The batch is copied out of the peer's memory, and classified from the copy: a frame taken
    as ARP (straight to the node its MAC names) is not turned into IPv4 (through --via) by the
    peer rewriting its ethertype while it is routed, and is sent as it was taken. The rewrite is
    made deterministic by running it at the start of `deliver_sorted`, after the core took and
    sorted the batch (`native.memif_take`) and before the frames are sent."""
    rig = make_rig(start=False)
    fw = rig.fab.attach("fw")
    mem = Memory()
    peer = None
    try:
        br = rig.start(via=lambda: rig.fab.node_ref("fw"))
        original = br.deliver_sorted
        rewrites: list[int] = []

        def rewrite_then_deliver(groups: dict, floods: list) -> None:
            mem.mm[off + 12:off + 14] = IPV4  # the peer's own buffer, as the peer would write it
            rewrites.append(sum(map(len, groups.values())) + len(floods))
            original(groups, floods)

        monkeypatch.setattr(br, "deliver_sorted", rewrite_then_deliver)
        peer = RawPeer(rig.path)
        assert raw_setup(peer, mem) == w.Connected("shmfabric")
        wait_for(lambda: br.link_up, "link up")
        arp = rig.sink.mac + b"\x02\x00\x00\x00\x00\x07" + ARP + b"who-has".ljust(46, b".")
        off = mem.plan.buffer_offset(True, 0)
        assert raw_publish(mem, arp) == off
        wait_for(lambda: rig.c.get("from_device") == 1, "the frame taken")
        assert rewrites == [1] and mem.mm[off + 12:off + 14] == IPV4  # the rewrite happened, once
        assert waiting(rig.sink) == [arp]  # as it was taken: ARP, its bytes unchanged
        assert waiting(fw) == [], "the frame was routed by the header the peer wrote after it was taken"
        c = rig.c
        assert c["to_fabric"] == 1 and not any(k.startswith("drop_") for k in c) and not rig.errors
    finally:
        if peer is not None:
            peer.close()
        rig.stop()
        mem.close()
        fw.detach()


def fabric_to_memif_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "fabric-to-memif" and t.is_alive()}


def blocked_writing(thread: threading.Thread, fd: int) -> bool:
    """`thread` is in a write(2) to `fd` that has not returned (/proc/<tid>/syscall: "1 0x<fd> ...")."""
    try:
        with open(f"/proc/self/task/{thread.native_id}/syscall") as f:
            words = f.read().split()
    except OSError:
        return False
    return len(words) > 1 and words[0] == "1" and int(words[1], 16) == fd


@pytest.mark.parametrize("peer_unblocks", [False, True], ids=["left-non-blocking", "made-blocking-again"])
def test_a_blocking_eventfd_at_its_maximum_count_never_hangs_the_port(make_rig, peer_unblocks):
    """The client's server->client eventfd is blocking and at its largest count: one more signal
    would block. The port makes the (shared) file non-blocking at the handshake, so frames are
    written and the signal is skipped. If the peer makes it blocking again, the sending thread
    blocks in that signal; stopping takes the count first, which frees it, and the port stops."""
    rig = make_rig(start=False)
    before = fabric_to_memif_threads()
    rig.start()
    wait_for(lambda: len(fabric_to_memif_threads() - before) == 1, "the bridge's sending thread")
    (worker,) = fabric_to_memif_threads() - before
    mem = Memory()
    efd = os.eventfd(0, os.EFD_CLOEXEC)  # (blocking)
    os.write(efd, EFD_MAX.to_bytes(8, "little"))
    peer = RawPeer(rig.path)
    try:
        assert raw_setup(peer, mem, ring_fds=(mem.s2m_efd, efd)) == w.Connected("shmfabric")
        wait_for(lambda: rig.br.link_up, "link up")
        assert not os.get_blocking(efd)  # (one open file: the port's setting is the peer's too)
        if peer_unblocks:
            os.set_blocking(efd, True)
            assert int.from_bytes(os.read(efd, 8), "little") == EFD_MAX
            os.write(efd, EFD_MAX.to_bytes(8, "little"))  # full again, and blocking
        payloads = [b"frame %d" % i + b"." * 50 for i in range(3)]
        for p in payloads:  # no buffer given yet: they wait in the fabric, and go as one batch
            assert rig.sink.send(rig.mem.id, p, 0x0800)
        mem.give_buffers(16)
        tail = mem.ring(False) + w.RING_TAIL
        wait_for(lambda: load16(mem.mm, tail) == 3, "3 descriptors filled")
        assert mem.received(3) == [rig.mem.mac + rig.sink.mac + IPV4 + p for p in payloads]
        if peer_unblocks:
            wait_for(lambda: blocked_writing(worker, rig.br._conn.tx.eventfd), "the sender blocked signalling")
        else:
            wait_for(lambda: rig.c.get("to_device") == 3, "3 frames counted")
            assert rig.br.link_up and "link_downs" not in rig.c
        rig.stop()  # (fails if the bridge's thread is still running WAIT s later)
        worker.join(WAIT)
        assert not worker.is_alive(), "the sending thread was left blocked signalling the peer"
        assert not rig.errors
        c = rig.c
        assert c["to_device"] == 3 and c["link_downs"] == 1 and "drop_link_down" not in c
        assert rig.lines[-1] == "link down: mem stopping"
    finally:
        os.set_blocking(efd, False)  # (a sender still blocked on it is freed before the test ends)
        try:
            os.read(efd, 8)
        except BlockingIOError:
            pass
        peer.close()
        mem.close()
        os.close(efd)


def _fdinfo_says_semaphore() -> bool:
    fd = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            return "eventfd-semaphore:" in f.read()
    finally:
        os.close(fd)


@pytest.mark.skipif(not _fdinfo_says_semaphore(), reason="this kernel (before 6.4) does not show an eventfd's "
                                                          "semaphore mode in /proc/<pid>/fdinfo: it cannot be refused")
@pytest.mark.parametrize("s2m", [True, False], ids=["client-to-server", "server-to-client"])
def test_a_semaphore_mode_eventfd_is_refused_at_add_ring(rig, s2m):
    mem = Memory()
    sem = os.eventfd(0, os.EFD_SEMAPHORE | os.EFD_CLOEXEC)  # (os.eventfd's initval is 32 bits: written)
    os.write(sem, (2 ** 40).to_bytes(8, "little"))  # each read would take 1: readable ~forever
    peer = RawPeer(rig.path)
    try:
        assert isinstance(peer.recv(), w.Hello)
        assert peer.ask(w.Init(0)) == w.Ack()
        assert peer.ask(w.AddRegion(0, mem.size), mem.fd) == w.Ack()
        if not s2m:
            assert peer.ask(w.AddRing(True, 0, 0, mem.ring(True), mem.log2), mem.s2m_efd) == w.Ack()
        reply = peer.ask(w.AddRing(s2m, 0, 0, mem.ring(s2m), mem.log2), sem)
        reason = "the eventfd with ADD_RING 0 is in semaphore mode"
        assert_refused(rig, peer, reason, reply)
        assert "semaphore mode" in reply.reason
        with open(f"/proc/self/fdinfo/{sem}") as f:
            assert "eventfd-count:      10000000000" in f.read()  # never read by the port
    finally:
        peer.close()
        mem.close()
        os.close(sem)
    assert mem.fds_left() == 0
    rig.assert_serves()
    assert rig.c["handshakes_refused"] == 1 and rig.c["link_ups"] == 1


def test_a_peer_whose_fds_land_past_1023_is_served(rig):
    """select() cannot wait on an fd past 1023 (ValueError): the handshake waits with poll. The
    bridge runs in a thread of this process, so filling this process's fds up to 1100 puts its
    accepted socket and the fds the client sends past 1023."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 1200
    if soft < need:
        if hard < need:
            pytest.skip(f"RLIMIT_NOFILE's hard limit is {hard}: fds past 1023 need {need}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    extra: list[int] = []
    try:
        base = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        extra.append(base)
        while extra[-1] < 1100:  # (dup takes the lowest free fd: every gap below is filled first)
            extra.append(os.dup(base))
        conn = rig.dial()
        try:
            server_conn = rig.br._conn
            assert server_conn is not None and server_conn.sock.fileno() > 1100
            assert min(server_conn.fds) > 1100  # (the region and eventfds it received)
            frame = rig.frame(b"from past fd 1023".ljust(60, b"."))
            put(conn, frame)
            publish(conn)
            assert rig.sink_frames(1) == [frame]
        finally:
            conn.close()
        wait_for(lambda: rig.c.get("link_downs") == 1, "link down")
        assert rig.c["link_ups"] == 1 and "handshakes_refused" not in rig.c and not rig.errors
    finally:
        for fd in extra:
            os.close(fd)
        if soft < need:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    rig.assert_serves()
