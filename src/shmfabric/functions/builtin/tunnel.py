"""`compress` and `encrypt`: tunnel endpoints. An `encap` node wraps each whole inner packet in
an outer IPv4/UDP packet; a `decap` node with the same outer addresses and port unwraps it.

    outer IPv4 (20) | UDP (8) | tunnel header (4) | [nonce (12)] | body
    tunnel header:  version<<4 | kind (1 compress, 2 encrypt) | alg or key id | inner length (16 bits)

- `compress` body: the inner packet compressed with zstd (level configurable) or LZ4 block
  format, each packet on its own (packets may be lost or reordered between the endpoints, so
  no stream state). A packet that does not shrink (or is under `min_size`) is stored as is
  (alg 0), so the tunnel never makes a packet bigger than the headers.
- `encrypt` body: AES-GCM (from `cryptography`) of the inner packet with a 16-byte tag. Nonce =
  4-byte random salt + 8-byte counter, the counter = the salt's start (wall-clock ms of its first
  packet) << 22 | packet number. An encap draws a new salt after a random 50-100 % of
  `resalt_after` seconds (monotonic clock; so scaled-out instances do not stay in step) and after
  2**22 - 1 packets, each starting later than the one before, so an instance never repeats a
  counter. Associated data = the outer header's
  invariant fields: addresses, UDP ports, tunnel header and nonce. TTL, checksums, identification
  and lengths are left out as IPsec's AH leaves out mutable fields (lengths are implied by the
  ciphertext), so a router on the way may decrement TTL. Decap rejects replays with a sliding
  window per sender salt (like IPsec's, `replay_window` packets), created, refreshed and moved
  only by a packet that authenticated, for the 256 salts used last; a salt it has no window for
  is accepted only if floor <= its start <= now + `max_clock_skew`: `floor` is the decap's start
  + skew + 1 ms (as its clock now sees it: a previous run may have accepted salts that start up
  to its end + skew, from a sender whose clock is ahead), raised past every salt whose window it
  forgot (`stale_sender` below it, `future_sender` beyond now + skew, which creates no state),
  so neither a decap restart nor a forgotten window lets a replay through; a sender is accepted
  again from its first salt that starts after the floor. The floor never exceeds now + skew + 1
  (lowered if the decap's clock goes back). A new key in a running decap sets the floor to now -
  `resalt_after` instead (nothing sent under the new key was accepted by it, unless the key was
  used before: keys are not to be reused), so an encap that switched first is accepted at once.
  A change of `replay_window` keeps every packet refused that the old window refused (from 0,
  when nothing was recorded: as at a start).

The outer source port carries a hash of the inner 5-tuple (as VXLAN does), so a scaled-out decap
keeps each inner flow on one instance and in order; an inner fragment (IPv4 MF or an offset, an
IPv6 fragment header) hashes (src, dst, protocol) only, as RSS does, so all the fragments of a
datagram go alike. The UDP checksum is 0 (allowed for IPv4; VXLAN does the same): `encrypt` has
its tag; `compress` can add zstd's own checksum.

Encap and decap produce packets of a new length, so they emit the new packet (`ctx.emit`) and
give the original `Verdict.CONSUMED` (docs/functions.md, "Functions that make frames"). A packet
is this tunnel's if it is IPv4 UDP from the outer source to the outer destination to the tunnel
port (where the port cannot be read, in a non-first fragment, under a bad IHL or cut short, the
addresses decide); decap drops and counts one with IP options, a fragment or one too short
(`malformed`, `fragments`), and passes or drops (`non_tunnel`) what is not this tunnel's.
`max_packet` is at most the node's MTU (a bigger one is lowered to it, with a config warning).
"""
from __future__ import annotations

import os
import stat
import struct
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, ClassVar, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shmfabric.functions.api import FunctionContext, Verdict
from shmfabric.net import checksum as ck
from shmfabric.net.flow import flow_hash, parse_5tuple_ip, to_address
from shmfabric.net.packet import LINK_IP, decode

NEXT, DROP, CONSUMED = int(Verdict.NEXT), int(Verdict.DROP), int(Verdict.CONSUMED)
VERSION = 2  # 2: the encrypt nonce counter carries the salt's start time (replay protection across restarts)
KIND_COMPRESS, KIND_ENCRYPT = 1, 2
ALG_STORED, ALG_ZSTD, ALG_LZ4 = 0, 1, 2
IP_UDP = 28
TUNNEL_HDR = struct.Struct("!BBH")  # version/kind, alg or key id, inner length
NONCE_LEN, TAG_LEN = 12, 16
DEFAULT_CLOCK_SKEW = 1.0  # decap: seconds a sender's clock may lead (max_clock_skew's default)
FIRST_SALT_MS = 2000  # encap: the most its first salt lives (see Encrypt._new_salt)
_IP = struct.Struct("!BBHHHBBH4s4s")
_UDP = struct.Struct("!HHHH")
_OUTER = struct.Struct("!BxHxxHxBxx4s4sHHH")  # ver/ihl, total length, flags/frag, proto, src, dst, sport, dport, udp len
_OUTER_ADDR = struct.Struct("!B5xHxB2x4s4s")  # ver/ihl, flags/frag, proto, src, dst (the first 20 bytes)
_PORT = struct.Struct("!H")
_V4_FRAG = struct.Struct("!BxxxxxHxB2xII")  # inner IPv4: ver/ihl, flags/frag, proto, src, dst
_SPORT_BASE, _SPORT_SPAN = 49152, 16384  # entropy source ports from the dynamic range (RFC 6335)
ZSTD_MAX_WINDOW = 1 << 17  # decap: largest zstd window accepted (encap's frames use <= 64 KiB)


class TunnelConfig(BaseModel):
    """What both endpoints of one tunnel share; they differ only in `mode`."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["encap", "decap"]
    outer_src: str = Field("192.0.2.1", description="outer IPv4 source (the encap side)")
    outer_dst: str = Field("192.0.2.2", description="outer IPv4 destination (the decap side)")
    port: int = Field(57400, ge=1, le=65535, description="UDP destination port of the tunnel")
    ttl: int = Field(64, ge=1, le=255)
    max_packet: int | None = Field(None, ge=64, le=65535, description="largest outer packet; default the node's MTU")
    non_tunnel: Literal["pass", "drop"] | None = Field(
        None, description="decap: packets that are not this tunnel's (default: pass for compress, drop for encrypt)")

    @field_validator("outer_src", "outer_dst")
    @classmethod
    def _v4(cls, v: str, info) -> str:  # type: ignore[no-untyped-def]
        try:
            a = to_address(v)
        except ValueError:
            raise ValueError(f"{info.field_name} {v!r} is not an IPv4 address") from None
        if not isinstance(a, int):
            raise ValueError(f"{info.field_name} {v!r}: the outer header is IPv4; give an IPv4 address "
                             f"(inner packets may be IPv6)")
        return v


class _Tunnel:
    """Framing shared by both tunnel functions; subclasses seal and open the body."""

    KIND: ClassVar[int]
    DEFAULT_NON_TUNNEL: ClassVar[str]
    OVERHEAD: ClassVar[int]  # bytes added besides the body's own growth

    def __init__(self, config: Any, ctx: FunctionContext | None = None) -> None:
        self.ctx = ctx or FunctionContext()
        self.c = {"in_packets": 0, "in_bytes": 0, "out_packets": 0, "out_bytes": 0, "too_big": 0,
                  "non_tunnel_passed": 0, "non_tunnel_dropped": 0, "malformed": 0, "fragments": 0,
                  "bad_header": 0}
        self.ident = 0
        self._setup(config)

    def _setup(self, cfg: Any) -> None:
        self.cfg = cfg
        self.src = to_address(cfg.outer_src).to_bytes(4, "big")  # type: ignore[union-attr]
        self.dst = to_address(cfg.outer_dst).to_bytes(4, "big")  # type: ignore[union-attr]
        mtu = self.ctx.mtu
        # never above the network's MTU: a bigger outer packet is not sent (`emit_too_large` at
        # the runtime) though it was counted as sent; one too big is dropped here as `too_big`
        self.max_packet = min(cfg.max_packet or mtu, mtu, 65535)
        if cfg.max_packet is not None and cfg.max_packet > mtu:
            self.ctx.log("config_warning", {
                "node": self.ctx.node, "field": "max_packet",
                "problem": f"max_packet {cfg.max_packet} is larger than the network's MTU {mtu}: outer packets "
                           f"are limited to {self.max_packet} bytes; larger ones are dropped and counted as too_big",
                "fix": f"set max_packet to {mtu} or less, or leave it out for the default (the MTU)"})
        self.drop_other = (cfg.non_tunnel or self.DEFAULT_NON_TUNNEL) == "drop"

    def reconfigure(self, config: Any) -> None:
        self._setup(config)

    def process(self, frames: Sequence[Any], now: float, out: bytearray) -> None:
        if self.cfg.mode == "encap":
            self._encap(frames, out)
        else:
            self._decap(frames, out)

    # -- encap -------------------------------------------------------------------------------------
    def _encap(self, frames: Sequence[Any], out: bytearray) -> None:
        c = self.c
        emitted = self.ctx.emitted  # ctx.emit(x) is emitted.append((NEXT, x)); one call less per frame
        max_packet, port, ttl, src, dst, seal = self.max_packet, self.cfg.port, self.cfg.ttl, self.src, self.dst, self.seal
        # the outer header's one's-complement sum without the fields that change per packet
        # (total length, identification): those are added per packet (RFC 1071 sums commute)
        base = ck.ones_sum(_IP.pack(0x45, 0, 0, 0, 0x4000, ttl, 17, 0, src, dst))
        ident = self.ident
        n_in = b_in = n_out = b_out = too_big = 0
        for i, f in enumerate(frames):
            inner = bytes(f)
            n = len(inner)
            n_in += 1
            b_in += n
            if n > 0xFFFF or n + IP_UDP + self.OVERHEAD > max_packet:
                too_big += 1  # never sent in the clear, never fragmented: dropped and counted
                out[i] = DROP
                continue
            key = parse_5tuple_ip(inner)
            # IPv4 and not a fragment (a tuple is never a non-first fragment's; a first one has MF
            # set): the common case. A fragment hashes (src, dst, proto) only, in _other_sport
            if key.__class__ is tuple and not inner[6] & 0x20 and key[0].__class__ is int:
                sport = _SPORT_BASE + flow_hash(key) % _SPORT_SPAN
            else:
                sport = _other_sport(inner, key)
            payload = seal(inner, sport)
            total = IP_UDP + len(payload)
            if total > max_packet:
                too_big += 1
                out[i] = DROP
                continue
            ident = (ident + 1) & 0xFFFF
            s = base + total + ident
            s = (s & 0xFFFF) + (s >> 16)
            s = (s & 0xFFFF) + (s >> 16)
            emitted.append((NEXT, _IP.pack(0x45, 0, total, ident, 0x4000, ttl, 17, ~s & 0xFFFF, src, dst)
                            + _UDP.pack(sport, port, total - 20, 0) + payload))
            n_out += 1
            b_out += total
            out[i] = CONSUMED
        self.ident = ident
        c["in_packets"] += n_in
        c["in_bytes"] += b_in
        c["out_packets"] += n_out
        c["out_bytes"] += b_out
        c["too_big"] += too_big

    def header(self, b1: int, inner_len: int) -> bytes:
        return TUNNEL_HDR.pack(VERSION << 4 | self.KIND, b1, inner_len)

    # -- decap -------------------------------------------------------------------------------------
    def _decap(self, frames: Sequence[Any], out: bytearray) -> None:
        c = self.c
        emit = self.ctx.emit
        port, src, dst = self.cfg.port, self.src, self.dst
        other = DROP if self.drop_other else NEXT
        unpack, min_len = _OUTER.unpack_from, IP_UDP + TUNNEL_HDR.size
        for i, f in enumerate(frames):
            n = len(f)
            c["in_packets"] += 1
            c["in_bytes"] += n
            if n >= min_len:
                vihl, tlen, ff, proto, osrc, odst, sport, dport, ulen = unpack(f)
                if vihl != 0x45 or ff & 0x3FFF:  # options or a fragment: the ports are not at 20
                    self._odd(i, f, n, out, other)
                    continue
            else:
                self._odd(i, f, n, out, other)
                continue
            if proto != 17 or dport != port or osrc != src or odst != dst:
                self._other(i, out, other)
                continue
            # from here on the packet claims to be ours: anything wrong is dropped, never passed on
            out[i] = DROP
            data = bytes(f)
            if not (IP_UDP + TUNNEL_HDR.size <= tlen <= n) or ulen != tlen - 20 or not ck.verify(data[:20]):
                c["malformed"] += 1
                continue
            vk, b1, inner_len = TUNNEL_HDR.unpack_from(data, IP_UDP)
            if vk != (VERSION << 4 | self.KIND):
                c["bad_header"] += 1
                continue
            inner = self.open(data, tlen, sport, b1, inner_len)
            if inner is None:
                continue  # open() counted why
            emit(inner)
            c["out_packets"] += 1
            c["out_bytes"] += len(inner)
            out[i] = CONSUMED

    def _odd(self, i: int, f: Any, n: int, out: bytearray, other: int) -> None:
        """The verdict for a packet the fast path cannot read (IP options, a fragment, shorter
        than the outer headers + tunnel header). It is this tunnel's if it is IPv4 UDP between
        the outer addresses and its UDP destination port, where that can be read (at the real
        IHL, in a first fragment or an unfragmented packet), is the tunnel's; then it is dropped
        and counted (`fragments`, `malformed`), never passed on. Else it is `non_tunnel`."""
        if n < 20:
            return self._other(i, out, other)  # no room for the outer addresses: not addressed to us
        vihl, ff, proto, osrc, odst = _OUTER_ADDR.unpack_from(f)
        if vihl >> 4 != 4 or proto != 17 or osrc != self.src or odst != self.dst:
            return self._other(i, out, other)
        ihl = (vihl & 15) * 4
        if not ff & 0x1FFF and ihl >= 20 and n >= ihl + 4 and _PORT.unpack_from(f, ihl + 2)[0] != self.cfg.port:
            return self._other(i, out, other)  # another UDP port between the same hosts
        out[i] = DROP
        if ff & 0x3FFF:
            self.c["fragments"] += 1  # no reassembly: encap never fragments (DF set), so this is foreign
        else:
            self.c["malformed"] += 1  # options (encap never sends any), or too short for the tunnel header

    def _other(self, i: int, out: bytearray, other: int) -> None:
        if other == DROP:
            self.c["non_tunnel_dropped"] += 1
        else:
            self.c["non_tunnel_passed"] += 1
        out[i] = other

    # -- per kind ----------------------------------------------------------------------------------
    def seal(self, inner: bytes, sport: int) -> bytes:
        """Tunnel header + body for `inner` (the UDP payload of the outer packet)."""
        raise NotImplementedError

    def open(self, data: bytes, tlen: int, sport: int, b1: int, inner_len: int) -> bytes | None:
        """The inner packet of outer packet `data` (tunnel header at IP_UDP), or None (counted)."""
        raise NotImplementedError

    def counters(self) -> dict[str, int | float]:
        return dict(self.c)


def _other_sport(inner: bytes, key: Any) -> int:
    """The outer source port of an inner packet off the encap's fast path (IPv6, fragments,
    anything else). A fragment hashes (src, dst, protocol) only, as RSS does: the later fragments
    of a datagram have no ports, and all its fragments must go to the same decap instance."""
    n = len(inner)
    if n >= 20 and inner[0] >> 4 == 4:
        vihl, ff, proto, s, d = _V4_FRAG.unpack_from(inner)
        if ff & 0x3FFF:
            key = (s, d, proto, 0, 0)
    elif n >= 40 and inner[0] >> 4 == 6 and (key.__class__ is not tuple or inner[6] not in (6, 17)):
        ip = decode(inner, 0, LINK_IP).ip  # extension headers: is there a fragment header?
        if ip is not None and ip.frag is not None and (ip.frag[0] or ip.frag[1]):
            key = (ip.src, ip.dst, ip.frag_next_header, 0, 0)  # the same in every fragment
    if key.__class__ is not tuple:
        return _SPORT_BASE  # no flow (not IP, malformed)
    return _SPORT_BASE + flow_hash(key) % _SPORT_SPAN


# --- compress -----------------------------------------------------------------------------------------

class CompressConfig(TunnelConfig):
    algorithm: Literal["zstd", "lz4"] = "zstd"
    level: int | None = Field(None, ge=-7, le=22, description="zstd: -7..22 (default 3); lz4: 1..12 selects LZ4-HC "
                                                                "(default: the fast mode)")
    min_size: int = Field(128, ge=0, le=65535, description="smaller packets are stored, not compressed")
    checksum: bool = Field(False, description="zstd: add a content checksum to each packet")

    @model_validator(mode="after")
    def _lz4_level(self) -> "CompressConfig":
        if self.algorithm == "lz4" and self.level is not None and not 0 <= self.level <= 12:
            raise ValueError(f"level {self.level} is not an lz4 level: use 1..12 for LZ4-HC, or leave it out for the fast mode")
        if self.algorithm == "lz4" and self.checksum:
            raise ValueError("checksum is a zstd option; lz4 blocks carry none (use encrypt for integrity)")
        return self


class Compress(_Tunnel):
    """Compression tunnel endpoint (see the module docstring)."""

    name: ClassVar[str] = "compress"
    version: ClassVar[str] = "1"
    Config = CompressConfig
    KIND = KIND_COMPRESS
    DEFAULT_NON_TUNNEL = "pass"
    OVERHEAD = TUNNEL_HDR.size

    def __init__(self, config: CompressConfig, ctx: FunctionContext | None = None) -> None:
        super().__init__(config, ctx)
        self.c.update({"compressed": 0, "stored": 0, "corrupt": 0, "length_mismatch": 0})

    def _setup(self, cfg: CompressConfig) -> None:  # type: ignore[override]
        super()._setup(cfg)
        import lz4.block
        import zstandard

        self._lz4 = lz4.block
        self._zstd_params = zstandard.get_frame_parameters
        self._zstd_unknown = zstandard.CONTENTSIZE_UNKNOWN
        zlevel = 3 if cfg.level is None else cfg.level
        self._zc = zstandard.ZstdCompressor(level=zlevel, write_checksum=cfg.checksum, write_content_size=False)
        # Frames are not authenticated, so decap trusts nothing in them. Encap compresses each
        # packet (<= 65535 bytes) on its own, so its frames declare a window of at most 64 KiB
        # (zstd fits the window to the input) and no content size: a frame asking for a bigger
        # window is refused by zstd itself (no buffer of the size it claims is allocated).
        self._zd = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)

    def seal(self, inner: bytes, sport: int) -> bytes:
        cfg = self.cfg
        n = len(inner)
        if n >= cfg.min_size:
            if cfg.algorithm == "zstd":
                body, alg = self._zc.compress(inner), ALG_ZSTD
            elif cfg.level is not None and cfg.level > 0:
                body, alg = self._lz4.compress(inner, mode="high_compression", compression=cfg.level,
                                               store_size=False), ALG_LZ4
            else:
                body, alg = self._lz4.compress(inner, store_size=False), ALG_LZ4
            if len(body) < n:
                self.c["compressed"] += 1
                return self.header(alg, n) + body
        self.c["stored"] += 1
        return self.header(ALG_STORED, n) + inner

    def open(self, data: bytes, tlen: int, sport: int, b1: int, inner_len: int) -> bytes | None:
        body = memoryview(data)[IP_UDP + TUNNEL_HDR.size: tlen]
        # Nothing in the body is trusted (compress frames are not authenticated): the output is
        # never bigger than the header's inner length (<= 65535), whatever the frame claims, and
        # any error of the decoder on these bytes is a corrupt packet, never an exception out of
        # process() (which would end the node).
        try:
            if b1 == ALG_STORED:
                inner = bytes(body)
            elif b1 == ALG_ZSTD:
                # zstandard's decompress() sizes its output by the content size a frame declares
                # and ignores max_output_size then (one 1.4 kB frame made 44 MB; one declaring
                # 2**50 bytes raised MemoryError): a declared size must be the inner length, and
                # only then, or when none is declared, is the frame decoded, into inner_len bytes
                declared = self._zstd_params(body).content_size
                if declared != self._zstd_unknown and declared != inner_len:
                    raise ValueError("zstd frame declares another content size")
                inner = self._zd.decompress(body, max_output_size=inner_len, allow_extra_data=False)
            elif b1 == ALG_LZ4:
                # LZ4 block format has no size of its own: the output buffer is inner_len bytes
                inner = self._lz4.decompress(body, uncompressed_size=inner_len)
            else:
                self.c["bad_header"] += 1
                return None
        except Exception:  # ZstdError, LZ4BlockError, ValueError, MemoryError ...: corrupt, dropped
            self.c["corrupt"] += 1
            return None
        finally:
            body.release()
        if len(inner) != inner_len:
            self.c["length_mismatch"] += 1
            return None
        return inner


# --- encrypt ------------------------------------------------------------------------------------------

KEY_FILE_MAX = 4096  # a key file is a key: 64 hex digits and a newline, or 32 bytes; anything bigger is refused


def _read_key_file(path: str) -> tuple[bytes, int]:
    """The bytes of key file `path` and its permission bits. Only a regular file of at most
    KEY_FILE_MAX bytes (so /dev/zero, a FIFO or a big file by mistake is a clear error, not a
    hang or a MemoryError); it is opened non-blocking and checked again on the open file."""
    p = Path(path).expanduser()
    try:
        if not stat.S_ISREG(p.stat().st_mode):  # before opening: opening some devices does something
            raise ValueError(f"key_file {path!r} is not a regular file")
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):  # replaced since the stat above
                raise ValueError(f"key_file {path!r} is not a regular file")
            raw = b""
            while len(raw) <= KEY_FILE_MAX:
                chunk = os.read(fd, KEY_FILE_MAX + 1 - len(raw))
                if not chunk:
                    break
                raw += chunk
        finally:
            os.close(fd)
    except OSError as e:
        raise ValueError(f"key_file {path!r} cannot be read: {e.strerror}") from None
    if len(raw) > KEY_FILE_MAX:
        raise ValueError(f"key_file {path!r} is larger than 4 KiB: not a key file (a key is 32, 48 or 64 hex "
                         f"digits, or the raw 16, 24 or 32 bytes)")
    return raw, stat.S_IMODE(st.st_mode)


def _load_key(text: str | None, path: str | None) -> tuple[bytes, int | None]:
    """The AES key from hex text or a file (hex text, or the raw 16/24/32 bytes), and the key
    file's permission bits (None for a key given as text)."""
    if (text is None) == (path is None):
        raise ValueError("give exactly one of key (hex) and key_file")
    mode = None
    if path is not None:
        raw, mode = _read_key_file(path)
        if len(raw) in (16, 24, 32) and not all(chr(b) in "0123456789abcdefABCDEF" for b in raw):
            return raw, mode
        text = raw.decode("ascii", "replace").strip()
        where = f"key_file {path!r}"
    else:
        where = "key"
    try:
        key = bytes.fromhex(text.strip().removeprefix("0x"))  # type: ignore[union-attr]
    except ValueError:
        raise ValueError(f"{where} is not hex (write 32, 48 or 64 hex digits for AES-128/192/256)") from None
    if len(key) not in (16, 24, 32):
        raise ValueError(f"{where} has {len(key)} bytes; AES-GCM needs 16, 24 or 32 (32, 48 or 64 hex digits)")
    return key, mode


class EncryptConfig(TunnelConfig):
    key: str | None = Field(None, description="AES key as hex (32/48/64 digits); or key_file", repr=False)
    key_file: str | None = Field(None, description="file with the key (hex text or raw bytes)")
    key_id: int = Field(0, ge=0, le=255, description="carried in each packet; decap refuses other ids")
    replay_window: int = Field(1024, ge=0, le=65536, description="decap: packets of reordering tolerated; 0 = no replay check")
    resalt_after: float = Field(10.0, ge=0.01, le=86400, description="encap: most seconds a sender salt is used (each one "
                                "a random 50-100 % of it); after a decap (re)starts, a sender is accepted again from its first salt "
                                "that starts after the decap's start + max_clock_skew")
    max_clock_skew: float | None = Field(None, ge=0.01, le=86400, description="decap: seconds a sender's clock may be ahead "
                                         "of the decap's (salts that start later are dropped as future_sender); "
                                         "also how long after its start a decap refuses salts (a previous run may "
                                         "have seen them); default 1 (nodes on one host share a clock, NTP keeps "
                                         "hosts within milliseconds: raise it for clocks that differ more)")

    @field_validator("key", mode="before")
    @classmethod
    def _key_is_text(cls, v: Any) -> Any:
        # YAML reads `key: 0x0001...` and an all-digit key as an int (its digits then lost, and
        # never shown: the message names no value)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            raise ValueError("quote the key: YAML read it as a number (write it as a string of 32, 48 or 64 hex "
                             "digits in quotes)")
        return v

    @model_validator(mode="after")
    def _key(self) -> "EncryptConfig":
        _load_key(self.key, self.key_file)
        return self


def _now_ms() -> int:
    """Wall-clock milliseconds: sender salts are stamped with it and decap compares the stamps with
    its own start and time, so encap and decap need clocks that agree (one host: one clock)."""
    return time.time_ns() // 1_000_000


def _mono_ms() -> int:
    """Monotonic milliseconds: the encap's re-salt timer, and the decap's time since its start (so
    a step of the wall clock neither stops re-salting nor moves the decap's start)."""
    return time.monotonic_ns() // 1_000_000


SEQ_BITS = 22  # nonce counter = salt start (ms since 1970, 42 bits: until 2109) << 22 | packet number
SEQ_MAX = (1 << SEQ_BITS) - 1  # packets per salt; then a new salt
CLOCK_STEP_MS = 1000  # decap: a wall clock set forward by more than this moves its start (floor)


class Encrypt(_Tunnel):
    """AES-GCM tunnel endpoint (see the module docstring)."""

    name: ClassVar[str] = "encrypt"
    version: ClassVar[str] = "1"
    Config = EncryptConfig
    KIND = KIND_ENCRYPT
    DEFAULT_NON_TUNNEL = "drop"
    OVERHEAD = TUNNEL_HDR.size + NONCE_LEN + TAG_LEN
    MAX_SENDERS = 256  # replay state is kept for this many sender salts, least recently used forgotten

    def __init__(self, config: EncryptConfig, ctx: FunctionContext | None = None) -> None:
        self._key_bytes: bytes | None = None
        self._future_logged = 0.0  # monotonic time before which a future_sender is not logged again
        super().__init__(config, ctx)
        self.c.update({"auth_failed": 0, "replayed": 0, "wrong_key_id": 0, "length_mismatch": 0,
                       "stale_sender": 0, "future_sender": 0, "salts": 0})

    def _setup(self, cfg: EncryptConfig) -> None:  # type: ignore[override]
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        key, key_mode = _load_key(cfg.key, cfg.key_file)  # first: a key that cannot be had changes nothing
        old = getattr(self, "cfg", None)
        super()._setup(cfg)
        if key_mode is not None and key_mode & 0o077:
            # as ssh does for a private key; the message names the file, never its bytes
            self.ctx.log("config_warning", {
                "node": self.ctx.node, "field": "key_file",
                "problem": f"permissions {key_mode:04o} for key_file {cfg.key_file!r} are too open: users of its "
                           f"group or others can read (or change) the tunnel key",
                "fix": f"chmod 600 {cfg.key_file}"})
        self.resalt_ms = max(1, int(cfg.resalt_after * 1000))
        skew = DEFAULT_CLOCK_SKEW if cfg.max_clock_skew is None else cfg.max_clock_skew
        self.skew_ms = max(1, int(skew * 1000))
        self._invalid_tag = InvalidTag
        if key != self._key_bytes:
            # a new key starts a new nonce sequence and a new replay state; the state of the key
            # it replaces is kept, so going back to that key (the manager's own rollback of a
            # failed push: A -> B -> A within milliseconds) finds its windows and floor again
            fresh = self._key_bytes is None
            prev = getattr(self, "_prev_key_state", None)
            self._prev_key_state = None if fresh else (
                self._key_bytes, self.replay, self.floor, self.floor_margin, self.mono_start, self.future_limit)
            self._aead = AESGCM(key)
            self._key_bytes = key
            # encap: the nonce is salt (4 random bytes) + 8-byte counter = start << SEQ_BITS | n,
            # `start` the wall-clock ms of the salt's first packet; a salt lives a random 50-100 %
            # of `resalt_after` (monotonic clock) or SEQ_MAX packets, and each new salt starts
            # later than the one before, so an instance never repeats a counter, whatever its
            # random salts (two instances repeat a nonce only with the same random salt *and* the
            # same start ms; the random lifetime keeps instances that started together from
            # re-salting in step for ever)
            self.salt = os.urandom(4)
            if fresh:
                # drawn at the first packet (see process); kept across key changes, so salt starts
                # keep increasing even under a key used before
                self.start: int | None = None
            self.counter = 0
            self.resalt_due = 0  # monotonic ms at which the salt is replaced
            # decap: replay state per sender salt, [highest counter, window bits], least recently
            # used first; `floor`: a salt not in the state is accepted only if it started at or
            # after the floor (ms), raised past the start of every salt it forgets: a packet of
            # a salt it saw before can never open a fresh window.
            self.replay: OrderedDict[bytes, list[int]] = OrderedDict()
            if prev is not None and prev[0] == key:
                # back to the key before: its replay state, as it was
                _, self.replay, self.floor, self.floor_margin, self.mono_start, self.future_limit = prev
            elif fresh:
                # A (re)start: a previous run accepted salts that start up to its end + skew (a
                # sender whose clock is ahead stamps its salts in the decap's future), so only
                # one that starts after now + skew is surely new to it
                self._set_floor(self.skew_ms + 1)
            else:
                # A new key in a running decap: it accepted nothing under this key (unless the key
                # was used before, which the docs forbid), so the salt an encap that switched
                # first is using (started at most resalt_after ago) is accepted at once
                self._set_floor(-self.resalt_ms)
        elif old is not None and old.replay_window != cfg.replay_window:
            was, new = old.replay_window, cfg.replay_window
            if was == 0:
                # nothing was recorded while the check was off: as at a start
                self.replay.clear()
                self._set_floor(self.skew_ms + 1)
            elif new > was:
                # counters older than the old window were refused: they stay refused (marked seen)
                grow = ((1 << new) - 1) & ~((1 << was) - 1)
                for st in self.replay.values():
                    st[1] |= grow
            elif new:
                for st in self.replay.values():
                    st[1] &= (1 << new) - 1

    def _set_floor(self, margin_ms: int) -> None:
        """The floor is now + `margin_ms` (now as the decap's clock sees it later: see process)."""
        t = _now_ms()
        self.floor_margin = margin_ms
        self.mono_start = _mono_ms()  # so the start is known in the terms of a clock set later
        self.floor = t + margin_ms
        self.future_limit = t + self.skew_ms

    def _new_salt(self) -> None:
        r = os.urandom(8)
        self.salt = r[:4]
        now_ms = _now_ms()
        first = self.start is None
        # wall-clock ms in the nonce, strictly increasing per instance even if the clock goes back
        self.start = now_ms if first else max(now_ms, self.start + 1)
        self.counter = 0
        # lifetime uniform in [life / 2, life], on the monotonic clock: instances that started in
        # the same ms do not re-salt in step for ever, and a wall clock stepping back does not
        # stop re-salting. The first salt lives at most FIRST_SALT_MS: a decap started with this
        # encap refuses salts that start before its start + skew, so a tunnel deployed as a whole
        # carries packets within seconds, not after a whole resalt_after
        life = min(self.resalt_ms, FIRST_SALT_MS) if first else self.resalt_ms
        lo = (life + 1) // 2
        self.resalt_due = _mono_ms() + lo + (int.from_bytes(r[4:], "big") * (life - lo + 1) >> 32)
        self.c["salts"] += 1

    def process(self, frames: Sequence[Any], now: float, out: bytearray) -> None:
        if frames:
            if self.cfg.mode == "encap":
                if self.start is None or _mono_ms() >= self.resalt_due:
                    self._new_salt()  # so no salt is used longer than resalt_after (+ one batch)
            else:
                t = _now_ms()
                # the floor set at the decap's start (or key change) as its clock now sees it, once
                # that differs by more than CLOCK_STEP_MS (ms rounding, slewing): a clock behind
                # at the start, then set right, must not let in the salts a previous run saw...
                floor = self.floor
                started = t - (_mono_ms() - self.mono_start) + self.floor_margin
                if started > floor + CLOCK_STEP_MS:
                    floor = started
                # ... and never above now + skew + 1: a salt is accepted only if it started at or
                # before now + skew, so one above that was never accepted (the clock went back,
                # or the decap started with it ahead: else every new salt would be refused)
                self.floor = min(floor, t + self.skew_ms + 1)
                self.future_limit = t + self.skew_ms
        super().process(frames, now, out)

    def _aad(self, sport: int, hdr: bytes, nonce: bytes) -> bytes:
        return self.src + self.dst + struct.pack("!HH", sport, self.cfg.port) + hdr + nonce

    def seal(self, inner: bytes, sport: int) -> bytes:
        if self.start is None or self.counter >= SEQ_MAX:
            self._new_salt()
        self.counter += 1
        nonce = self.salt + (self.start << SEQ_BITS | self.counter).to_bytes(8, "big")  # type: ignore[operator]
        hdr = self.header(self.cfg.key_id, len(inner))
        return hdr + nonce + self._aead.encrypt(nonce, inner, self._aad(sport, hdr, nonce))

    def open(self, data: bytes, tlen: int, sport: int, b1: int, inner_len: int) -> bytes | None:
        c = self.c
        if b1 != self.cfg.key_id:
            c["wrong_key_id"] += 1
            return None
        at = IP_UDP + TUNNEL_HDR.size
        if tlen - at - NONCE_LEN - TAG_LEN != inner_len:
            c["length_mismatch"] += 1
            return None
        nonce = data[at: at + NONCE_LEN]
        salt, ctr = nonce[:4], int.from_bytes(nonce[4:], "big")
        window = self.cfg.replay_window
        st = self.replay.get(salt) if window else None
        if st is not None:
            hi, bits = st
            if ctr <= hi and (hi - ctr >= window or bits >> (hi - ctr) & 1):
                c["replayed"] += 1  # seen already, or older than the window: cannot tell, refuse
                return None
        elif window:
            start = ctr >> SEQ_BITS
            if start < self.floor:
                # a salt that started before this decap did (its packets may have been delivered
                # by a previous run), or before a salt it forgot: cannot tell a replay, refuse
                c["stale_sender"] += 1
                return None
            if start > self.future_limit:
                # started beyond now + skew: the sender's clock is ahead (or the decap's behind,
                # e.g. restarted so: then this may be a replay). No state, so it cannot raise
                # the floor for everybody once forgotten
                c["future_sender"] += 1
                now = time.monotonic()
                if now >= self._future_logged:
                    # otherwise a sender whose clock leads by more than the skew is refused with
                    # only a counter to show it; once a minute at most (the packet is not
                    # authenticated yet: a forger could spam it)
                    self._future_logged = now + 60.0
                    self.ctx.log("future_sender", {
                        "node": self.ctx.node, "lead_ms": start - _now_ms(),
                        "max_clock_skew_ms": self.skew_ms,
                        "problem": "a sender's salt starts further ahead of this decap's clock than max_clock_skew "
                                   "(not yet authenticated): its packets are dropped",
                        "fix": "synchronise the clocks (NTP), or raise max_clock_skew"})
                return None
        try:
            inner = self._aead.decrypt(nonce, data[at + NONCE_LEN: tlen], self._aad(sport, data[IP_UDP:at], nonce))
        except self._invalid_tag:
            c["auth_failed"] += 1
            return None
        if window:  # only an authentic packet creates, refreshes or moves state (forgeries cannot)
            if st is None:
                if len(self.replay) >= self.MAX_SENDERS:
                    _, (old_hi, _bits) = self.replay.popitem(last=False)  # least recently used
                    self.floor = max(self.floor, (old_hi >> SEQ_BITS) + 1)
                self.replay[salt] = [ctr, 1]
            else:
                self.replay.move_to_end(salt)
                if ctr > hi:
                    shift = ctr - hi  # may be huge after a long loss: then nothing of the old window stays
                    st[0], st[1] = ctr, ((bits << shift) | 1) & ((1 << window) - 1) if shift < window else 1
                else:
                    st[1] = bits | 1 << (hi - ctr)
        return inner
