"""The memif wire format (version 2.0, as DPDK's net_memif and VPP speak it), pure.

memif is the shared-memory packet interface of VPP and DPDK: two processes agree over a unix
SEQPACKET socket (the *control channel*) on shared-memory regions and rings, then move packets
through those rings with no system call. The *client* (the protocol's "slave") creates every
region and ring and hands their file descriptors over; the *server* ("master") maps them.

Control channel: fixed 128-byte messages, a 16-bit type then a packed body, file descriptors
passed beside them (SCM_RIGHTS). The exchange, one message per step, each answered:
    server -> HELLO;  client -> INIT (ACK);  ADD_REGION x N (ACK each, fd: the region);
    ADD_RING x N (ACK each, fd: the ring's eventfd);  CONNECT -> CONNECTED.
Either side may send DISCONNECT (a code and a reason) and close.

Rings: a 128-byte header (cookie, flags, head; tail on the next cache line), then 2^k 16-byte
descriptors (flags, region, length, offset, metadata). The client->server ring's producer is the
client, which moves `head`; the server moves `tail` after reading. On the server->client ring the
client gives empty buffers by moving `head` and the server fills them and moves `tail`. A frame
longer than one buffer takes several descriptors, each but the last flagged NEXT.

This module holds the layouts, message encoding and decoding with precise errors, the handshake
of each side as a state machine (no sockets: the shell feeds it messages and sends what it
returns), and the client's region plan. The shell is `memif.py`.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum

COOKIE = 0x3E31F20
VERSION = (2 << 8) | 0
MSG_SIZE = 128
NAME_SZ = 32
SECRET_SZ = 24
REASON_SZ = 96
MODE_ETHERNET = 0
RING_FLAG_S2M = 1  # ADD_RING flag: the ring carries client -> server frames
RING_MASK_INT = 1  # ring flag: the consumer polls; the producer need not signal its eventfd
DESC_NEXT = 1  # descriptor flag: the frame goes on in the next descriptor

# ring layout
RING_HEADER = 128
RING_COOKIE, RING_FLAGS, RING_HEAD, RING_TAIL = 0, 4, 6, 64
DESC = struct.Struct("<HHIII")  # flags, region, length, offset, metadata
RING_START = struct.Struct("<IH")  # cookie, flags (at the ring's first byte)
MAX_LOG2_RING = 14  # rings of up to 16,384 descriptors (DPDK's limit too)


class MsgType(IntEnum):
    """Control message types."""

    NONE = 0
    ACK = 1
    HELLO = 2
    INIT = 3
    ADD_REGION = 4
    ADD_RING = 5
    CONNECT = 6
    CONNECTED = 7
    DISCONNECT = 8


_TYPE = struct.Struct("<H")
_HELLO = struct.Struct("<32sHHHHHB")  # name, min/max version, max region index, max m2s/s2m ring index, max log2
_INIT = struct.Struct("<HIB24s32s")  # version, interface id, mode, secret, name
_ADD_REGION = struct.Struct("<HQ")  # index, size
_ADD_RING = struct.Struct("<HHHIBH")  # flags, index, region, offset, log2 size, private header size
_NAME = struct.Struct("<32s")
_DISCONNECT = struct.Struct("<I96s")


class MemifProtocolError(Exception):
    """A control message or region the peer sent that breaks the protocol. The message says what
    was wrong; it is also the reason sent to the peer in DISCONNECT."""


class PeerDisconnected(Exception):
    """The peer sent DISCONNECT: `reason` is what it said."""

    def __init__(self, reason: str, code: int = 0):
        super().__init__(reason)
        self.reason, self.code = reason, code


@dataclass(frozen=True)
class Hello:
    """Server -> client, first: what the server accepts."""

    name: str
    min_version: int = VERSION
    max_version: int = VERSION
    max_region: int = 0  # the largest region index accepted
    max_m2s_ring: int = 0  # the largest ring index accepted each way (0: one ring)
    max_s2m_ring: int = 0
    max_log2_ring_size: int = MAX_LOG2_RING


@dataclass(frozen=True)
class Init:
    """Client -> server: which interface (id), in which mode, with which secret."""

    id: int
    secret: bytes = b""
    name: str = ""
    version: int = VERSION
    mode: int = MODE_ETHERNET


@dataclass(frozen=True)
class AddRegion:
    """Client -> server, with the region's fd."""

    index: int
    size: int


@dataclass(frozen=True)
class AddRing:
    """Client -> server, with the ring's eventfd: where the ring lies and which way it goes."""

    s2m: bool  # client -> server
    index: int
    region: int
    offset: int
    log2_ring_size: int
    private_hdr_size: int = 0


@dataclass(frozen=True)
class Connect:
    """Client -> server: all set up; the client's interface name."""

    if_name: str = ""


@dataclass(frozen=True)
class Connected:
    """Server -> client: mapped; the server's interface name."""

    if_name: str = ""


@dataclass(frozen=True)
class Disconnect:
    """Either way: the connection ends, and why."""

    reason: str
    code: int = 0


@dataclass(frozen=True)
class Ack:
    """Server -> client: the last message was taken."""


Message = Hello | Init | AddRegion | AddRing | Connect | Connected | Disconnect | Ack


def name_of(msg: Message) -> str:
    """The protocol's name for a message's type (ADD_REGION, ...)."""
    return {Hello: "HELLO", Init: "INIT", AddRegion: "ADD_REGION", AddRing: "ADD_RING", Connect: "CONNECT",
            Connected: "CONNECTED", Disconnect: "DISCONNECT", Ack: "ACK"}.get(type(msg), type(msg).__name__)


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def _fixed(text: str | bytes, size: int) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return raw[: size - 1]  # always NUL-terminated, as strlcpy leaves it


def encode(msg: Message) -> bytes:
    """The 128 bytes of a control message."""
    if isinstance(msg, Hello):
        body = _TYPE.pack(MsgType.HELLO) + _HELLO.pack(_fixed(msg.name, NAME_SZ), msg.min_version, msg.max_version,
                                                       msg.max_region, msg.max_m2s_ring, msg.max_s2m_ring,
                                                       msg.max_log2_ring_size)
    elif isinstance(msg, Init):
        body = _TYPE.pack(MsgType.INIT) + _INIT.pack(msg.version, msg.id, msg.mode, _fixed(msg.secret, SECRET_SZ),
                                                     _fixed(msg.name, NAME_SZ))
    elif isinstance(msg, AddRegion):
        body = _TYPE.pack(MsgType.ADD_REGION) + _ADD_REGION.pack(msg.index, msg.size)
    elif isinstance(msg, AddRing):
        body = _TYPE.pack(MsgType.ADD_RING) + _ADD_RING.pack(RING_FLAG_S2M if msg.s2m else 0, msg.index, msg.region,
                                                             msg.offset, msg.log2_ring_size, msg.private_hdr_size)
    elif isinstance(msg, Connect):
        body = _TYPE.pack(MsgType.CONNECT) + _NAME.pack(_fixed(msg.if_name, NAME_SZ))
    elif isinstance(msg, Connected):
        body = _TYPE.pack(MsgType.CONNECTED) + _NAME.pack(_fixed(msg.if_name, NAME_SZ))
    elif isinstance(msg, Disconnect):
        body = _TYPE.pack(MsgType.DISCONNECT) + _DISCONNECT.pack(msg.code, _fixed(msg.reason, REASON_SZ))
    elif isinstance(msg, Ack):
        body = _TYPE.pack(MsgType.ACK)
    else:
        raise TypeError(f"not a memif message: {msg!r}")
    return body.ljust(MSG_SIZE, b"\0")


def decode(data: bytes) -> Message:
    """A control message from its 128 bytes; MemifProtocolError if it is not one."""
    if len(data) != MSG_SIZE:
        raise MemifProtocolError(f"control message of {len(data)} bytes; memif messages are {MSG_SIZE}")
    kind = _TYPE.unpack_from(data)[0]
    if kind == MsgType.HELLO:
        name, lo, hi, reg, m2s, s2m, log2 = _HELLO.unpack_from(data, 2)
        return Hello(_cstr(name), lo, hi, reg, m2s, s2m, log2)
    if kind == MsgType.INIT:
        ver, ident, mode, secret, name = _INIT.unpack_from(data, 2)
        return Init(ident, secret.split(b"\0", 1)[0], _cstr(name), ver, mode)
    if kind == MsgType.ADD_REGION:
        return AddRegion(*_ADD_REGION.unpack_from(data, 2))
    if kind == MsgType.ADD_RING:
        flags, index, region, offset, log2, priv = _ADD_RING.unpack_from(data, 2)
        return AddRing(bool(flags & RING_FLAG_S2M), index, region, offset, log2, priv)
    if kind == MsgType.CONNECT:
        return Connect(_cstr(_NAME.unpack_from(data, 2)[0]))
    if kind == MsgType.CONNECTED:
        return Connected(_cstr(_NAME.unpack_from(data, 2)[0]))
    if kind == MsgType.DISCONNECT:
        code, reason = _DISCONNECT.unpack_from(data, 2)
        return Disconnect(_cstr(reason), code)
    if kind == MsgType.ACK:
        return Ack()
    raise MemifProtocolError(f"unknown control message type {kind} (memif 2.0 has types 1-8)")


def version_text(v: int) -> str:
    return f"{v >> 8}.{v & 0xFF}"


def ring_bytes(log2_ring_size: int) -> int:
    """The bytes one ring takes: its header and its descriptors."""
    return RING_HEADER + DESC.size * (1 << log2_ring_size)


@dataclass(frozen=True)
class RingSpec:
    """Where a ring lies, as agreed: region, offset, size, and its eventfd's key."""

    s2m: bool
    index: int
    region: int
    offset: int
    log2_ring_size: int


# ------------------------------------------------------------------------------------------------
# server side


@dataclass
class ServerHandshake:
    """The server's side of the handshake for one interface `id`. `hello()` is sent first; every
    message received goes to `receive`, which returns the reply (or None) and raises
    MemifProtocolError (send DISCONNECT with its text, close) or PeerDisconnected."""

    id: int
    secret: bytes = b""
    name: str = "shmfabric"
    max_regions: int = 16
    max_region_size: int = 1 << 32
    state: str = "init"  # init -> setup -> connected
    regions: dict[int, int] = field(default_factory=dict)  # index -> size (the fds stay with the shell)
    rings: list[RingSpec] = field(default_factory=list)
    peer_name: str = ""
    peer_if_name: str = ""

    def hello(self) -> Hello:
        """The first message: one ring each way, up to MAX_LOG2_RING, `max_regions` regions."""
        return Hello(self.name, VERSION, VERSION, self.max_regions - 1, 0, 0, MAX_LOG2_RING)

    def receive(self, msg: Message, fd: int | None) -> Message | None:
        """Take one message (`fd`: the descriptor that came with it) and give the reply."""
        if isinstance(msg, Disconnect):
            raise PeerDisconnected(msg.reason, msg.code)
        if self.state == "init":
            if not isinstance(msg, Init):
                raise MemifProtocolError(f"expected INIT first, got {name_of(msg)}")
            if msg.version != VERSION:
                raise MemifProtocolError(f"incompatible memif version {version_text(msg.version)}: this side "
                                         f"speaks {version_text(VERSION)}")
            if msg.id != self.id:
                raise MemifProtocolError(f"ID not found: interface id {msg.id} asked, this socket serves {self.id}")
            if msg.mode != MODE_ETHERNET:
                raise MemifProtocolError(f"only ethernet mode is supported (mode {msg.mode} asked)")
            if self.secret and msg.secret != self.secret[:SECRET_SZ - 1]:
                raise MemifProtocolError("secret required" if not msg.secret else "incorrect secret")
            self.peer_name = msg.name
            self.state = "setup"
            return Ack()
        if self.state == "setup":
            if isinstance(msg, AddRegion):
                if fd is None:
                    raise MemifProtocolError(f"missing region fd with ADD_REGION {msg.index}")
                if msg.index != len(self.regions) or msg.index >= self.max_regions:
                    raise MemifProtocolError(f"invalid region index {msg.index}: expected {len(self.regions)} "
                                             f"(at most {self.max_regions} regions)")
                if not 0 < msg.size <= self.max_region_size:
                    raise MemifProtocolError(f"region {msg.index} size {msg.size} is not within 1..{self.max_region_size}")
                self.regions[msg.index] = msg.size
                return Ack()
            if isinstance(msg, AddRing):
                if fd is None:
                    raise MemifProtocolError(f"missing interrupt fd with ADD_RING {msg.index}")
                way = "client-to-server" if msg.s2m else "server-to-client"
                if msg.index != 0 or any(r.s2m == msg.s2m for r in self.rings):
                    raise MemifProtocolError(f"invalid ring index {msg.index} ({way}): this side takes one ring "
                                             f"each way (index 0)")
                if msg.region not in self.regions:
                    raise MemifProtocolError(f"ring {msg.index} ({way}) is on region {msg.region}, which was not added")
                if not 0 <= msg.log2_ring_size <= MAX_LOG2_RING:
                    raise MemifProtocolError(f"ring size 2^{msg.log2_ring_size} is past 2^{MAX_LOG2_RING}")
                if msg.private_hdr_size:
                    raise MemifProtocolError(f"private headers are not supported ({msg.private_hdr_size} bytes asked)")
                end = msg.offset + ring_bytes(msg.log2_ring_size)
                if end > self.regions[msg.region]:
                    raise MemifProtocolError(f"ring {msg.index} ({way}) ends at byte {end}, past region "
                                             f"{msg.region}'s {self.regions[msg.region]} bytes")
                if msg.offset % 64:
                    raise MemifProtocolError(f"ring {msg.index} ({way}) at offset {msg.offset} is not 64-byte aligned")
                self.rings.append(RingSpec(msg.s2m, msg.index, msg.region, msg.offset, msg.log2_ring_size))
                return Ack()
            if isinstance(msg, Connect):
                if len(self.rings) != 2:
                    raise MemifProtocolError("CONNECT before a ring each way was added")
                self.peer_if_name = msg.if_name
                self.state = "connected"
                return Connected(self.name)
        raise MemifProtocolError(f"unexpected {name_of(msg)} while {self.state}")


# ------------------------------------------------------------------------------------------------
# client side


@dataclass(frozen=True)
class ClientPlan:
    """The client's one region: a ring each way at its start, then one buffer per descriptor."""

    log2_ring_size: int
    buffer_size: int

    @property
    def ring_size(self) -> int:
        return 1 << self.log2_ring_size

    @property
    def s2m_offset(self) -> int:  # client -> server ring
        return 0

    @property
    def m2s_offset(self) -> int:  # server -> client ring, on a cache line of its own
        return -(-ring_bytes(self.log2_ring_size) // 64) * 64

    @property
    def buffers_offset(self) -> int:
        return self.m2s_offset + -(-ring_bytes(self.log2_ring_size) // 64) * 64

    def buffer_offset(self, s2m: bool, slot: int) -> int:
        """Where descriptor `slot` of a ring keeps its buffer (fixed for the connection's life)."""
        return self.buffers_offset + ((0 if s2m else self.ring_size) + slot) * self.buffer_size

    @property
    def region_size(self) -> int:
        size = self.buffers_offset + 2 * self.ring_size * self.buffer_size
        return -(-size // 4096) * 4096


@dataclass
class ClientHandshake:
    """The client's side: after the server's HELLO, INIT, the region, the two rings and CONNECT go
    one at a time, each after the ACK of the one before. `receive` returns the next message to
    send with the key of the fd to pass with it ("region", "s2m", "m2s" or None)."""

    id: int
    secret: bytes = b""
    name: str = "shmfabric"
    log2_ring_size: int = 10
    buffer_size: int = 2048
    state: str = "hello"  # hello -> setup -> connecting -> connected
    plan: ClientPlan | None = None
    peer_name: str = ""
    peer_if_name: str = ""
    _queue: list[tuple[Message, str | None]] = field(default_factory=list)

    def receive(self, msg: Message) -> tuple[Message, str | None] | None:
        """Take one message from the server; the message to send next (and its fd's key)."""
        if isinstance(msg, Disconnect):
            raise PeerDisconnected(msg.reason, msg.code)
        if self.state == "hello":
            if not isinstance(msg, Hello):
                raise MemifProtocolError(f"expected HELLO first, got {name_of(msg)}")
            if not msg.min_version <= VERSION <= msg.max_version:
                raise MemifProtocolError(f"incompatible memif version: the server speaks "
                                         f"{version_text(msg.min_version)}-{version_text(msg.max_version)}, "
                                         f"this side {version_text(VERSION)}")
            self.peer_name = msg.name
            log2 = min(self.log2_ring_size, msg.max_log2_ring_size)
            self.plan = plan = ClientPlan(log2, self.buffer_size)
            self._queue = [
                (AddRegion(0, plan.region_size), "region"),
                (AddRing(True, 0, 0, plan.s2m_offset, log2), "s2m"),
                (AddRing(False, 0, 0, plan.m2s_offset, log2), "m2s"),
                (Connect(self.name), None),
            ]
            self.state = "setup"
            return Init(self.id, self.secret, self.name), None
        if self.state == "setup" and isinstance(msg, Ack):
            nxt = self._queue.pop(0)
            if not self._queue:
                self.state = "connecting"
            return nxt
        if self.state == "connecting" and isinstance(msg, Connected):
            self.peer_if_name = msg.if_name
            self.state = "connected"
            return None
        raise MemifProtocolError(f"unexpected {name_of(msg)} while {self.state}")
