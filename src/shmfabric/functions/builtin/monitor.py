"""`monitor`: watches the traffic that passes through it; every verdict is NEXT.

- **Per-flow counters**: packets, bytes, first and last seen per 5-tuple (one entry per
  direction), for at most `max_flows` flows; idle flows expire after `flow_timeout` (a lazy
  sweep from the least recently used end: bounded work per call, never a scan of the table).
  Non-first IP fragments carry no ports: they are counted (`fragments`) under their
  (src, dst, proto), a flow of their own listed as "udp A -> B fragments".
- **Top talkers**: the heaviest flows (or sources, or destinations) by bytes with the
  Space-Saving algorithm (Metwally, Agrawal, El Abbadi 2005): `top_k` counters, bounded memory,
  any key whose true share exceeds 1/top_k of the bytes is guaranteed to be listed, and each
  estimate comes with its maximal over-count (`error`).
- **Capture**: classic pcap (not pcapng: every tool reads it), link type Ethernet with a
  synthesized header (the fabric MACs when the frame has them) or LINKTYPE_RAW (101, bare IP);
  optional header filter; rotation at a size limit, keeping the newest `keep` files. A capture
  never truncates or overwrites a file: each file is created anew (O_EXCL, no symlink followed,
  mode 0600), so a restart, a reconfigure or a second instance on the same path writes the next
  numbered file (`Capture`); a write error (disk full) cuts the file back to its last whole record.
- **Report**: optionally a JSON file with the counters, the top talkers and the largest flows,
  rewritten atomically every `report_interval` seconds (a private temporary file, fsync'ed,
  renamed over the report).

The only I/O is the capture and report files (the point of the function); the accounting is
pure. Timestamps: the runtime passes monotonic `now`; pcap wants wall-clock time, so the
offset between the two clocks is read once when the function starts (`epoch_offset`).
"""
from __future__ import annotations

import errno
import fcntl
import heapq
import ipaddress
import json
import os
import stat
import struct
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any, BinaryIO, ClassVar, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shmfabric.functions import lru
from shmfabric.functions.api import FunctionConfigError, FunctionContext
from shmfabric.functions.builtin._match import CompiledMatch, Match
from shmfabric.functions.maglev import fragment_key
from shmfabric.net.errors import Reason
from shmfabric.net.flow import PROTO_NAMES, FlowKey, parse_5tuple_ip

LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101  # bare IPv4/IPv6 packets (LINKTYPE_RAW in the tcpdump.org link-type registry)
_PCAP_HEADER = struct.Struct("<IHHiIII")  # magic, version 2.4, thiszone, sigfigs, snaplen, linktype
_PCAP_RECORD = struct.Struct("<IIII")      # seconds, microseconds, captured length, original length
PCAP_MAGIC = 0xA1B2C3D4  # microsecond timestamps, written little-endian
_FALLBACK_DST = b"\x02\x00\x00\x00\x00\x02"
_FALLBACK_SRC = b"\x02\x00\x00\x00\x00\x01"
_FRAGMENT = Reason.FRAGMENT
#: flow-table entries one on_timer call looks at (~0.3 µs each); more waits for the next call
SWEEP_SLICE = 4096
#: bytes of records a capture holds in memory before it writes them out (flush_interval aside)
CAPTURE_BUFFER = 1 << 18
#: a capture file is created, never opened: O_EXCL (nothing existing is truncated, and a symlink
#: planted under the name counts as existing) and O_NOFOLLOW; 0600 as dumpcap's files: captures
#: hold whole payloads
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
#: how a file to prune is opened to lock it: never through a symlink, never waiting on a FIFO
_PRUNE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
#: names tried past the highest one on disk before giving up (others creating files at once)
_CREATE_TRIES = 1000


# --- configuration ----------------------------------------------------------------------------------

class CaptureConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="pcap file, written only if it does not exist (else STEM_00001.pcap, ...); "
                      "with rotation, files are STEM_00001.pcap, STEM_00002.pcap, ...")
    linktype: Literal["ethernet", "raw"] = Field("ethernet", description="ethernet: synthesized Ethernet header; raw: IP only")
    # tcpdump's default: a 65,535-byte IP packet plus the synthesized 14-byte header is not cut
    snaplen: int = Field(262144, ge=64, le=262144, description="bytes kept of each packet")
    rotate_bytes: int = Field(0, ge=0, description="start a new file at this size; 0 = one file")
    keep: int = Field(0, ge=0, description="keep only the newest N files of this path on disk (across runs "
                      "and instances); 0 = keep all")
    match: Match | None = Field(None, description="capture only packets that match (frames without a 5-tuple are then skipped)")
    flush_interval: float = Field(1.0, gt=0, le=3600, description="seconds between flushes to disk")

    @field_validator("path")
    @classmethod
    def _dir_exists(cls, v: str) -> str:
        parent = Path(v).expanduser().resolve().parent
        if not parent.is_dir():
            raise ValueError(f"directory {str(parent)!r} of the capture file does not exist; create it first")
        return str(Path(v).expanduser())

    @field_validator("rotate_bytes")
    @classmethod
    def _rotate_min(cls, v: int) -> int:
        if 0 < v < 4096:
            raise ValueError(f"rotate_bytes {v} is too small to hold a packet; use 0 (no rotation) or at least 4096")
        return v


class MonitorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    flows: bool = Field(True, description="keep per-flow counters")
    max_flows: int = Field(65536, ge=1, le=10_000_000, description="flows tracked at once; packets of new flows "
                           "beyond are counted as packets_untracked")
    flow_timeout: float = Field(60.0, gt=0, le=86400, description="an idle flow is forgotten after this many seconds")
    top_k: int = Field(32, ge=0, le=100_000, description="Space-Saving counters for the top talkers; 0 = off")
    top_by: Literal["flow", "src", "dst"] = Field("flow", description="what a talker is")
    capture: CaptureConfig | None = None
    report: str | None = Field(None, description="JSON file rewritten every report_interval seconds")
    report_interval: float = Field(5.0, gt=0, le=86400)
    report_flows: int = Field(20, ge=0, le=10_000, description="largest flows listed in the report")

    @field_validator("report")
    @classmethod
    def _report_dir(cls, v: str | None) -> str | None:
        if v is None:
            return None
        p = Path(v).expanduser()
        if p.is_dir():  # os.replace would fail on every report; say so now
            raise ValueError(f"report {v!r} is a directory; name a file in it, e.g. {str(p / 'monitor.json')!r}")
        if not p.resolve().parent.is_dir():
            raise ValueError(f"directory of the report file {v!r} does not exist; create it first")
        return str(p)  # expanded, as the capture path: the report is written where it was checked


# --- top talkers --------------------------------------------------------------------------------------

class SpaceSaving:
    """The k heaviest keys of a weighted stream in O(k) memory (Space-Saving).

    Each tracked key has a count and an error: the true weight lies in [count - error, count].
    A new key replaces the key with the smallest count and inherits that count as its error.
    The minimum is found through a heap whose entries may be stale (counts only grow, so a stale
    entry is a lower bound): a stale top is refreshed and pushed down until the top is exact.
    """

    def __init__(self, k: int) -> None:
        if k < 1:
            raise ValueError("k must be at least 1")
        self.k = k
        self.counts: dict[Any, list[int]] = {}  # key -> [count, error]
        self._heap: list[tuple[int, int, Any]] = []  # (count when pushed, tie-break, key)
        self._seq = 0
        self.total = 0

    def add(self, key: Any, weight: int = 1) -> None:
        self.total += weight
        e = self.counts.get(key)
        if e is not None:
            e[0] += weight
            return
        self._seq += 1
        if len(self.counts) < self.k:
            self.counts[key] = [weight, 0]
            heapq.heappush(self._heap, (weight, self._seq, key))
            return
        heap, counts = self._heap, self.counts
        while True:
            c, _, victim = heap[0]
            actual = counts[victim][0]
            if actual == c:
                break
            heapq.heapreplace(heap, (actual, self._seq, victim))
            self._seq += 1
        del counts[victim]
        counts[key] = [c + weight, c]
        heapq.heapreplace(heap, (c + weight, self._seq, key))

    def top(self, n: int | None = None) -> list[tuple[Any, int, int]]:
        """(key, count, error), heaviest first."""
        items = sorted(((k, c, e) for k, (c, e) in self.counts.items()), key=lambda t: -t[1])
        return items if n is None else items[:n]


# --- pcap ---------------------------------------------------------------------------------------------

class PcapWriter:
    """Writes classic pcap (version 2.4, microsecond timestamps) to a binary file object."""

    def __init__(self, f: BinaryIO, linktype: int, snaplen: int = 65535) -> None:
        self.f, self.linktype, self.snaplen = f, linktype, snaplen
        f.write(_PCAP_HEADER.pack(PCAP_MAGIC, 2, 4, 0, 0, snaplen, linktype))
        self.size = _PCAP_HEADER.size
        self.records = 0

    def write(self, ts: float, data: bytes, orig_len: int | None = None) -> int:
        """One record; `data` is cut to snaplen. Returns the bytes written."""
        return self.write_many(ts, [data]) if orig_len is None else self._write(ts, data, orig_len)

    def _write(self, ts: float, data: bytes, orig_len: int) -> int:
        sec, usec = split_ts(ts)
        cap = data[: self.snaplen]
        rec = _PCAP_RECORD.pack(sec, usec, len(cap), orig_len) + cap
        self.f.write(rec)
        self.size += len(rec)
        self.records += 1
        return len(rec)

    def write_many(self, ts: float, datas: list[bytes]) -> int:
        """Records with one timestamp (a batch shares its `now`), in one write call."""
        sec, usec = split_ts(ts)
        snap, pack = self.snaplen, _PCAP_RECORD.pack
        chunk = b"".join([pack(sec, usec, min(len(d), snap), len(d)) + d[:snap] for d in datas])
        self.f.write(chunk)
        self.size += len(chunk)
        self.records += len(datas)
        return len(chunk)


def split_ts(ts: float) -> tuple[int, int]:
    """Seconds and microseconds of a time stamp."""
    sec = int(ts)
    usec = int(round((ts - sec) * 1e6))
    if usec >= 1_000_000:
        sec, usec = sec + 1, usec - 1_000_000
    return sec, usec


class _CaptureFile:
    """The file under a capture's PcapWriter. PcapWriter hands it whole records (or the file
    header) per write() call; they stay in memory until flush() writes them out, unbuffered, so
    the file on disk grows only by whole records. `synced` is the file's size after the last
    flush that completed: a failed write (disk full) is cut back to it, and the file ends on a
    whole record. (A library buffer would write part of a record on its own and try the rest
    again at close, after the cut.)"""

    def __init__(self, raw: Any, name: str) -> None:
        self.raw = raw  # an unbuffered file (FileIO): a write lands or raises, nothing is held back
        self.name = name
        self._chunks: list[bytes] = []
        self.pending = 0  # bytes held in memory
        self.synced = 0

    def write(self, data: bytes) -> int:
        self._chunks.append(data)
        self.pending += len(data)
        return len(data)

    def flush(self) -> None:
        """Write out what is held; OSError leaves `synced` where it was (the caller cuts back to it)."""
        chunks, total = self._chunks, self.pending
        if not chunks:
            return
        # big chunks (batches of large frames) go out one write each: joining them would copy
        # every captured byte once more; small ones are joined, not a system call each
        parts = list(chunks) if total >= len(chunks) << 16 else [b"".join(chunks)]
        chunks.clear()  # on an error too: the file is cut back and closed, nothing is retried
        self.pending = 0
        for part in parts:
            view, off = memoryview(part), 0
            while off < len(view):
                n = self.raw.write(view[off:])  # a short write (disk nearly full) goes on from where it stopped
                if not n:
                    raise OSError(errno.EIO, f"writing {self.name} made no progress")
                off += n
        self.synced += total  # only now: an error above cuts back to before this whole flush

    def cut_and_close(self) -> None:
        """After an error: drop what is held, cut the file back to `synced`, close it (best effort)."""
        self._chunks.clear()
        self.pending = 0
        try:
            os.ftruncate(self.raw.fileno(), self.synced)
        except (OSError, ValueError):  # ValueError: already closed
            pass
        try:
            self.raw.close()
        except OSError:
            pass


class Capture:
    """A pcap capture with size-based rotation, like tshark's ring buffer.

    File names: without rotation the first file is `path` itself, then STEM_00001.pcap,
    STEM_00002.pcap, ...; with rotation every file is STEM_NNNNN.pcap. Numbering goes on after
    the highest number already on disk (the newest file has the highest number), and a name that
    exists is never reused: each file is created with O_EXCL (the next number on EEXIST), so a
    restart, a reconfigure or a second instance on the same path writes a file of its own.

    `keep` keeps the newest N files of the pattern on disk, not only this run's; pruning never
    removes the file being written, nor one another writer holds: each writer holds a shared
    flock on its open file, and a file is removed only if an exclusive one can be had at once.

    `records` and `bytes` (record bytes, file headers not counted) are what this capture took;
    after `abort` (a write error) what its files really hold.
    """

    def __init__(self, cfg: CaptureConfig) -> None:
        self.cfg = cfg
        self.linktype = LINKTYPE_ETHERNET if cfg.linktype == "ethernet" else LINKTYPE_RAW
        self.match = CompiledMatch(cfg.match) if cfg.match is not None else None
        p = Path(cfg.path)
        if p.is_dir():  # with O_EXCL it would only "exist": say what is wrong instead of writing beside it
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), cfg.path)
        self._dir = os.path.dirname(cfg.path)
        self._prefix = f"{p.stem}_"
        self._suffix = p.suffix or ".pcap"
        self.index = 0  # number of the file being written (0: `path` itself)
        self.files: list[str] = []  # this capture's files still on disk, oldest first
        self.writer: PcapWriter | None = None
        self.file: _CaptureFile | None = None
        self.records = self.bytes = 0
        self._synced_records = self._synced_bytes = 0  # records, bytes as far as the files hold them
        self._open_next()

    # -- names on disk -------------------------------------------------------------------------------
    def _numbered(self, i: int) -> str:
        return os.path.join(self._dir, f"{self._prefix}{i:05d}{self._suffix}")

    def _on_disk(self) -> list[tuple[int, str, bool]]:
        """The pattern's names in the directory, oldest first: (number, name, is a regular file);
        without rotation `path` itself is number 0."""
        out = []
        base = os.path.basename(self.cfg.path)
        pre, suf = self._prefix, self._suffix
        with os.scandir(self._dir or ".") as it:
            for ent in it:
                n = ent.name
                if n.startswith(pre) and n.endswith(suf) and len(n) >= len(pre) + len(suf) + 5:
                    digits = n[len(pre):len(n) - len(suf)]
                    if digits.isascii() and digits.isdigit():
                        out.append((int(digits), os.path.join(self._dir, n), ent.is_file(follow_symlinks=False)))
                elif n == base and not self.cfg.rotate_bytes:
                    out.append((0, self.cfg.path, ent.is_file(follow_symlinks=False)))
        out.sort()
        return out

    def _create(self) -> tuple[int, int, str]:
        """A new file (fd, number, name), created, locked shared (see `prune`)."""
        top = max((i for i, _, _ in self._on_disk()), default=0)
        # `path` itself only while no numbered file exists: numbers then stay in age order
        i = 0 if not self.cfg.rotate_bytes and top == 0 else top + 1
        name = ""
        for _ in range(_CREATE_TRIES):
            name = self.cfg.path if i == 0 else self._numbered(i)
            try:
                fd = os.open(name, _CREATE_FLAGS, 0o600)
            except FileExistsError:
                i += 1
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                st, now_there = os.fstat(fd), os.stat(name, follow_symlinks=False)
                if (st.st_dev, st.st_ino) == (now_there.st_dev, now_there.st_ino):
                    return fd, i, name
            except (BlockingIOError, FileNotFoundError):
                pass  # a pruner took it between create and lock (it unlinks it): the next name
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
            i += 1
        raise OSError(errno.EEXIST, f"no free file name in {_CREATE_TRIES} tries after", name)

    def _unlink_if_free(self, name: str) -> bool:
        """Remove `name` if it is a regular file (no symlink followed) no writer holds."""
        try:
            fd = os.open(name, _PRUNE_FLAGS)
        except OSError:  # a symlink (ELOOP), gone, not ours to read: left alone
            return False
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return False
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: a live writer holds it
            there = os.stat(name, follow_symlinks=False)
            if (there.st_dev, there.st_ino) != (st.st_dev, st.st_ino):
                return False  # replaced meanwhile
            os.unlink(name)
            return True
        except OSError:
            return False
        finally:
            os.close(fd)

    def prune(self) -> None:
        """With `keep`: remove the oldest files of the pattern on disk beyond the newest `keep`
        regular files, except the one being written and those another writer holds (best
        effort: an error leaves a file, it never stops the capture)."""
        keep = self.cfg.keep
        if not keep:
            return
        try:
            disk = [(i, name) for i, name, regular in self._on_disk() if regular]
        except OSError:
            return
        gone = set()
        for i, name in disk[:-keep]:
            if not (i == self.index and self.file is not None) and self._unlink_if_free(name):
                gone.add(name)
        if gone:
            self.files = [n for n in self.files if n not in gone]

    # -- writing -------------------------------------------------------------------------------------
    def _open_next(self) -> None:
        """Close the current file (OSError: it stays current, for `abort`), then create the next."""
        if self.file is not None:
            self.flush()
            self.file.raw.close()
            self.file = self.writer = None
        fd, i, name = self._create()
        try:
            raw = os.fdopen(fd, "wb", buffering=0)
        except BaseException:
            os.close(fd)
            raise
        f = _CaptureFile(raw, name)
        try:
            w = PcapWriter(f, self.linktype, self.cfg.snaplen)
            f.flush()  # the header at once: an idle capture is a valid pcap, a full disk shows at start
        except BaseException:
            raw.close()
            try:
                os.unlink(name)  # ours (O_EXCL), holding not even a header
            except OSError:
                pass
            raise
        self.file, self.writer, self.index = f, w, i
        self._synced_records, self._synced_bytes = self.records, self.bytes
        self.files.append(name)
        self.prune()

    def write(self, ts: float, datas: list[bytes]) -> None:
        """Records with time stamp `ts`, rotating files at the size limit. OSError: call `abort`."""
        w = self.writer
        assert w is not None and self.file is not None
        limit = self.cfg.rotate_bytes
        if not limit:
            self.bytes += w.write_many(ts, datas)
            self.records += len(datas)
        else:
            start, size = 0, w.size
            per = _PCAP_RECORD.size
            snap = w.snaplen
            for i, d in enumerate(datas):
                rec = per + min(len(d), snap)
                if size + rec > limit and (w.records or i > start):
                    if i > start:
                        self.bytes += w.write_many(ts, datas[start:i])
                        self.records += i - start
                        start = i
                    self._open_next()
                    w = self.writer
                    assert w is not None
                    size = w.size
                size += rec
            if start < len(datas):
                self.bytes += w.write_many(ts, datas[start:])
                self.records += len(datas) - start
        if self.file.pending >= CAPTURE_BUFFER:  # type: ignore[union-attr]
            self.flush()

    def flush(self) -> None:
        """Write out what is held; OSError: call `abort`."""
        f = self.file
        if f is not None and f.pending:
            f.flush()
            self._synced_records, self._synced_bytes = self.records, self.bytes

    def close(self) -> None:
        """Flush and close; OSError: call `abort`."""
        if self.file is not None:
            self.flush()
            self.file.raw.close()
            self.file = self.writer = None

    def abort(self) -> None:
        """After a write error: cut the current file back to its last whole record and close it;
        `records` and `bytes` become what the files hold. The capture is over."""
        f = self.file
        self.file = self.writer = None
        self.records, self.bytes = self._synced_records, self._synced_bytes
        if f is not None:
            f.cut_and_close()


def ethernet_header(f: Any) -> bytes:
    """An Ethernet header for frame `f`: its fabric MACs if it has them; the type its own
    `ethertype` if it has one (a fabric frame), else from the IP version."""
    dst = getattr(f, "dst", None) or _FALLBACK_DST
    src = getattr(f, "src_mac", None) or _FALLBACK_SRC
    et = getattr(f, "ethertype", None)
    if not et:
        v = f[0] >> 4 if len(f) else 0
        et = 0x0800 if v == 4 else 0x86DD if v == 6 else 0x88B5  # not IP: the fabric's type
    return bytes(dst) + bytes(src) + et.to_bytes(2, "big")


# --- flows ------------------------------------------------------------------------------------------

def _flow_idle(e: list, limit: float) -> bool:
    return e[3] < limit


def _flow_requeue(e: list) -> bool:
    """Used since it was placed: placed anew, to the new end."""
    if e[3] != e[4]:
        e[4] = e[3]
        return True
    return False


def _hit(m: CompiledMatch, key: tuple) -> bool:
    """`m.matches` for a 5-tuple or a fragment's (src, dst, proto), which no port condition matches."""
    if len(key) == 5:
        return m.matches(key)
    return m.sport is None and m.dport is None and m.matches((key[0], key[1], key[2], 0, 0))


def _flow_name(k: tuple) -> str:
    """'udp 10.0.0.1:1000 -> 10.0.0.2:53'; for non-first fragments 'udp 10.0.0.1 -> 10.0.0.2 fragments'."""
    if len(k) == 5:
        return str(FlowKey(*k))
    s, d = (ipaddress.ip_address(a if isinstance(a, int) else bytes(a)) for a in k[:2])
    return f"{PROTO_NAMES.get(k[2], str(k[2]))} {s} -> {d} fragments"


# --- the function -------------------------------------------------------------------------------------

class Monitor:
    """Observes: per-flow counters, top talkers, pcap capture (see the module docstring)."""

    name: ClassVar[str] = "monitor"
    version: ClassVar[str] = "1"
    Config = MonitorConfig

    def __init__(self, config: MonitorConfig, ctx: FunctionContext | None = None) -> None:
        self.ctx = ctx or FunctionContext()
        # wall clock = monotonic now + offset, read once (the runtime's `now` is monotonic)
        self.epoch_offset = time.time() - time.monotonic()
        self.c = {"packets": 0, "bytes": 0, "unparsed": 0, "fragments": 0, "flows_expired": 0,
                  "packets_untracked": 0, "captured": 0, "capture_bytes": 0, "capture_errors": 0, "reports": 0}
        # key -> [packets, bytes, first, last, placed]: a 5-tuple, or (src, dst, proto) for non-first
        # fragments. A plain dict (its get is ~20 ns cheaper than an OrderedDict's) with its keys
        # in least-recently-used order beside it, lazily (`placed`: `last` when queued; see lru.py)
        self.flow_table: dict[tuple, list] = {}
        self._flow_order: deque[tuple] = deque()
        self.top: SpaceSaving | None = None
        self.capture: Capture | None = None
        self._configure(config)

    def _configure(self, config: MonitorConfig) -> None:
        """Apply `config`: all of it, or (FunctionConfigError: the new capture file cannot be
        opened) nothing. The new capture is opened first; only then is the old one closed. A
        capture that an error stopped starts again (a new file) even if its section is unchanged."""
        old: MonitorConfig | None = getattr(self, "cfg", None)
        capture_changed = (old is None or old.capture != config.capture
                           or (config.capture is not None and self.capture is None))
        capture = self.capture
        if capture_changed:
            capture = None
            if config.capture is not None:
                try:
                    capture = Capture(config.capture)
                except OSError as e:  # one clear line from the runtime, not a traceback; nothing changed
                    raise FunctionConfigError(f"cannot open capture file {config.capture.path!r}: "
                                              f"{e.strerror or e}") from None
        # nothing below fails: swap
        if capture_changed:
            self._end_capture()
            if capture is not None:
                capture.prune()  # the old capture's file is closed now: it counts for `keep` like any other
        self.capture = capture
        self.cfg = config
        if old is None or (old.top_k, old.top_by) != (config.top_k, config.top_by):
            self.top = SpaceSaving(config.top_k) if config.top_k else None
        if not config.flows:
            self.flow_table.clear()
            self._flow_order.clear()
        self._next_sweep = 0.0
        self._next_flush = 0.0
        self._next_report = 0.0

    def reconfigure(self, config: MonitorConfig) -> None:
        """New settings, applied whole or not at all. A changed capture section opens the new file
        first, then closes the old one; a new file that cannot be opened is a FunctionConfigError
        and the old capture goes on. Top talkers start over only when top_k or top_by change."""
        self._configure(config)

    # -- the batch ---------------------------------------------------------------------------------
    def process(self, frames: Sequence[Any], now: float, out: bytearray) -> None:
        cfg = self.cfg
        c = self.c
        table = self.flow_table if cfg.flows else None
        max_flows = cfg.max_flows
        top = self.top
        by = cfg.top_by
        agg: dict[Any, int] = {}  # top-talker weight per key in this batch: one update per key
        cap = self.capture
        capture_all = cap is not None and cap.match is None
        grab: list[Any] | None = [] if cap is not None else None
        nbytes = 0
        # an entry last used before this is idle for longer than flow_timeout: the sweep may not
        # have reached it yet (see `expire`), but it is a flow of the past, not this packet's
        stale = now - cfg.flow_timeout
        for f in frames:
            n = len(f)
            nbytes += n
            key = parse_5tuple_ip(f)
            if key.__class__ is not tuple:
                if key is _FRAGMENT:  # no ports: counted under (src, dst, proto), below
                    key = fragment_key(f)
                if key.__class__ is not tuple:
                    c["unparsed"] += 1
                    if capture_all:
                        grab.append(f)  # type: ignore[union-attr]
                    continue
                c["fragments"] += 1
            if table is not None:
                e = table.get(key)
                if e is not None:
                    if e[3] < stale:  # expired, not swept yet: the flow starts over (as the sweep would have)
                        e[0], e[1], e[2], e[3] = 1, n, now, now  # `placed` stays: its queue place holds
                        c["flows_expired"] += 1
                    else:
                        e[0] += 1
                        e[1] += n
                        e[3] = now
                elif len(table) < max_flows or self._reclaim(now):
                    table[key] = [1, n, now, now, now]
                    self._flow_order.append(key)
                else:
                    c["packets_untracked"] += 1
            if top is not None:
                k = key if by == "flow" else key[0] if by == "src" else key[1]
                agg[k] = agg.get(k, 0) + n
            if grab is not None and (capture_all or _hit(cap.match, key)):  # type: ignore[union-attr]
                grab.append(f)
        if grab:
            self._capture(grab, now)
        c["packets"] += len(frames)
        c["bytes"] += nbytes
        if top is not None:
            for k, w in agg.items():
                top.add(k, w)
        # verdicts stay NEXT: the monitor only observes

    def _capture(self, frames: list[Any], now: float) -> None:
        cap = self.capture
        if cap is None:
            return
        if cap.linktype == LINKTYPE_ETHERNET:
            datas = [ethernet_header(f) + bytes(f) for f in frames]
        else:
            datas = [bytes(f) for f in frames]
        try:
            cap.write(now + self.epoch_offset, datas)
        except OSError as e:  # disk full...: stop capturing (the file ends on a whole record), keep monitoring
            self._end_capture(e)

    def _end_capture(self, error: OSError | None = None) -> None:
        """Close the capture (after `error` or if closing fails: cut its file back to the last whole
        record, count and log the error) and add what its files hold to the counters."""
        cap = self.capture
        if cap is None:
            return
        self.capture = None
        if error is None:
            try:
                cap.close()
            except OSError as e:
                error = e
        if error is not None:
            cap.abort()
            self.c["capture_errors"] += 1
            self.ctx.log("capture_error", {"node": self.ctx.node, "error": str(error),
                                           "files": list(cap.files)})
        self.c["captured"] += cap.records
        self.c["capture_bytes"] += cap.bytes

    # -- timers ------------------------------------------------------------------------------------
    def on_timer(self, now: float) -> float | None:
        """Flush the capture, expire idle flows, write the report; returns the next due time."""
        cfg = self.cfg
        if self.capture is not None and now >= self._next_flush:
            try:
                self.capture.flush()
            except OSError as e:  # cut back to the last whole record and closed, not left open
                self._end_capture(e)
            self._next_flush = now + (cfg.capture.flush_interval if cfg.capture else 1.0)
        if now >= self._next_sweep:
            self.expire(now, SWEEP_SLICE)
            # at once again while more is due (the runtime calls a due timer before each batch)
            self._next_sweep = now if self._expire_pending(now) else now + 1.0
        if cfg.report and now >= self._next_report:
            self.write_report(cfg.report, now)
            self._next_report = now + cfg.report_interval
        due = [self._next_sweep]
        if self.capture is not None:
            due.append(self._next_flush)
        if cfg.report:
            due.append(self._next_report)
        return min(due)

    def expire(self, now: float, limit: int | None = None) -> int:
        """Forget flows idle for longer than flow_timeout, looking at no more than `limit` entries
        if given; returns how many. From the least recently used end (see `lru.sweep_queue`): a flow
        used since it was placed is placed anew, the first that was not stops the sweep, so the
        work is O(1) amortized per packet, not a scan of the table."""
        expired, _ = lru.sweep_queue(self.flow_table, self._flow_order, now - self.cfg.flow_timeout, limit,
                                     _flow_idle, _flow_requeue)
        self.c["flows_expired"] += expired
        return expired

    def _expire_pending(self, now: float) -> bool:
        """True if the least recently placed flow needs a look (idle, or used since placed)."""
        if not self._flow_order:
            return False
        e = self.flow_table.get(self._flow_order[0])
        return e is None or e[3] < now - self.cfg.flow_timeout or e[3] != e[4]

    def _reclaim(self, now: float) -> bool:
        """The table is full: expire up to two idle flows (bounded work); True if there is room."""
        if self.expire(now, 2):
            return len(self.flow_table) < self.cfg.max_flows
        return False

    # -- reading it out ----------------------------------------------------------------------------
    def flows(self, n: int | None = None) -> list[dict]:
        """The tracked flows, largest (bytes) first (the n largest: O(flows log n), no sort of the
        table: a report of 20 flows out of 2,000,000 took 1.5 s with one)."""
        if n is None:
            items = sorted(self.flow_table.items(), key=lambda kv: -kv[1][1])
        else:  # ties keep table order, as the stable sort did
            items = heapq.nlargest(n, self.flow_table.items(), key=lambda kv: kv[1][1])
        off = self.epoch_offset
        return [{"flow": _flow_name(k), "packets": e[0], "bytes": e[1],
                 "first_seen": round(e[2] + off, 6), "last_seen": round(e[3] + off, 6)} for k, e in items]

    def top_talkers(self, n: int | None = None) -> list[dict]:
        """Heaviest talkers by bytes: estimate and its maximal over-count."""
        if self.top is None:
            return []
        out = []
        for k, count, err in self.top.top(n):
            if isinstance(k, tuple):
                name = _flow_name(k)
            else:
                name = str(ipaddress.ip_address(k if isinstance(k, int) else bytes(k)))
            out.append({"talker": name, "bytes": count, "error": err})
        return out

    def snapshot(self) -> dict:
        """Everything the report file holds, as a dict."""
        return {"node": self.ctx.node, "counters": self.counters(), "top_by": self.cfg.top_by,
                "top_talkers": self.top_talkers(), "flows": self.flows(self.cfg.report_flows),
                "capture_files": list(self.capture.files) if self.capture else []}

    def write_report(self, path: str, now: float) -> None:
        """Write the snapshot to `path`, atomically: a new private temporary file beside it
        (mkstemp: O_EXCL, mode 0600, a random name, so nothing planted is followed), fsync'ed and
        renamed over `path` (a symlink at `path` is replaced, not followed). On an error the
        temporary file is removed, the old report stays, and `report_error` is logged."""
        snap = self.snapshot()
        snap["time"] = round(now + self.epoch_offset, 6)
        directory, base = os.path.split(path)
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(dir=directory or ".", prefix=f".{base}.", suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(snap, f, indent=1)
                f.flush()
                os.fsync(f.fileno())  # the rename must not land before the data (a crash would leave it empty)
            os.replace(tmp, path)  # readers never see a half-written report
            tmp = None
            self.c["reports"] += 1
        except OSError as e:
            self.ctx.log("report_error", {"node": self.ctx.node, "error": str(e)})
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass

    def counters(self) -> dict[str, int | float]:
        c: dict[str, int | float] = dict(self.c)
        c["flows"] = len(self.flow_table)
        cap = self.capture
        if cap is not None:  # the open capture's share; a closed one's is in self.c
            c["captured"] += cap.records
            c["capture_bytes"] += cap.bytes
            c["capture_files"] = len(cap.files)
        return c

    def close(self) -> None:
        """Flush and close the capture, then write the final report, even if closing the capture
        failed (the runtime calls this when the node stops)."""
        try:
            self._end_capture()
        finally:
            if self.cfg.report:
                self.write_report(self.cfg.report, time.monotonic())
