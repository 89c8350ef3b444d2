"""Region files: layout computation, creation, validation and mapping.

The C header `fabric_layout.h` is the single source of truth for struct layouts; its field
offsets reach Python through `native.LAYOUT`, so nothing here repeats a C offset by hand. Every
offset in a region is recomputed from the superblock's parameters when the file is opened and
must match exactly: a truncated, foreign or corrupted file is refused with a message that names
the field, before any C code touches it.
"""
from __future__ import annotations

import mmap
import os
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

from shmfabric.core import native
from shmfabric.core.errors import (
    BadMagicError,
    CorruptRegionError,
    RegionCreateError,
    RegionNotFoundError,
    RegionOpenError,
    TruncatedRegionError,
    VersionMismatchError,
)

L = native.LAYOUT
PAGE = mmap.PAGESIZE
SHM_DIR = Path(os.environ.get("SHMFABRIC_DIR", "/dev/shm"))
PREFIX = "shmfabric-"
MTU_MIN, MTU_MAX = 1490, 65536
HEADROOM = 64
MAX_NETWORKS = L["max_networks"]
NAME_LEN = L["name_len"]
FLAG_EPHEMERAL = 0x1

# superblock fields and their struct codes; offsets come from the C layout
_SB_FIELDS = {
    "magic": "Q", "version": "I", "superblock_size": "I", "total_size": "Q", "max_nodes": "I",
    "ring_size": "I", "n_networks": "I", "n_mcast": "I", "tape_entries": "I", "tape_entry_size": "I",
    "flags": "I", "node_size": "I", "off_nodes": "Q", "off_networks": "Q", "off_rings": "Q",
    "ring_stride": "Q", "off_tapes": "Q", "tape_stride": "Q", "created_ns": "Q", "creator_pid": "I",
    "sweep_pending": "I", "swept_slots": "Q", "sweeps": "Q",
}
_NET_FIELDS = {
    "mtu": "I", "slot_size": "I", "headroom": "I", "n_slots": "I", "off_next": "Q",
    "off_chain": "Q", "off_owner": "Q", "off_slots": "Q",
}
_NODE_FIELDS = {
    "state": "I", "gen": "I", "pid": "I", "network": "I", "start_time": "Q", "pidns": "Q",
    "heartbeat_ns": "Q", "tx_frames": "Q", "tx_bytes": "Q", "rx_frames": "Q", "rx_bytes": "Q",
    "tx_ring_full": "Q", "tx_drops": "Q", "rx_lapped": "Q", "rx_bad": "Q", "tape_rx": "Q", "tape_tx": "Q",
    "wakeups": "Q", "tx_nobuf": "Q", "mcast_mask": "Q", "doorbell": "I", "waiting": "I",
    "pool_ops": "I",
}


def _align(x: int, a: int) -> int:
    return (x + a - 1) // a * a


def region_path(name: str) -> Path:
    """The file of fabric `name` (a path is used as given)."""
    if "/" in name:
        return Path(name)
    return SHM_DIR / f"{PREFIX}{name}"


@dataclass(frozen=True)
class NetworkSpec:
    """One network: an MTU and the number of pool slots."""

    mtu: int = 1500
    slots: int = 4096
    headroom: int = HEADROOM

    @property
    def slot_size(self) -> int:
        return _align(self.headroom + L["eth_hlen"] + self.mtu, 64)


@dataclass(frozen=True)
class Layout:
    """Sizes and offsets of every part of a region, derived from its parameters alone."""

    max_nodes: int
    ring_size: int
    networks: tuple[NetworkSpec, ...]
    n_mcast: int
    tape_entries: int
    tape_entry_size: int
    off_nodes: int = 0
    off_networks: int = 0
    off_rings: int = 0
    ring_stride: int = 0
    off_tapes: int = 0
    tape_stride: int = 0
    net_offsets: tuple[tuple[int, int, int, int], ...] = ()  # (next, chain, owner, slots)
    total_size: int = 0
    node_size: int = field(default=L["sizeof.node"])

    @classmethod
    def compute(cls, max_nodes: int, ring_size: int, networks: tuple[NetworkSpec, ...], n_mcast: int,
                tape_entries: int, tape_entry_size: int) -> "Layout":
        off_nodes = _align(L["sizeof.superblock"], PAGE)
        off_networks = _align(off_nodes + max_nodes * L["sizeof.node"], 64)
        off_rings = _align(off_networks + len(networks) * L["sizeof.network"], PAGE)
        ring_stride = _align(L["sf_ring.desc"] + ring_size * L["sizeof.desc"], 64)
        off_tapes = _align(off_rings + max_nodes * max_nodes * ring_stride, PAGE)
        entry_stride = _align(L["sizeof.tape_entry"] + tape_entry_size, 64)
        tape_stride = _align(L["sf_tape.entries"] + tape_entries * entry_stride, 64)
        off = _align(off_tapes + (1 + n_mcast) * tape_stride, PAGE)
        nets = []
        for n in networks:
            arr = _align(4 * n.slots, 64)
            off_next, off_chain, off_owner = off, off + arr, off + 2 * arr
            off_slots = _align(off + 3 * arr, PAGE)
            nets.append((off_next, off_chain, off_owner, off_slots))
            off = _align(off_slots + n.slots * n.slot_size, PAGE)
        return cls(max_nodes, ring_size, tuple(networks), n_mcast, tape_entries, tape_entry_size,
                   off_nodes, off_networks, off_rings, ring_stride, off_tapes, tape_stride, tuple(nets), off)


@dataclass(frozen=True)
class FabricConfig:
    """Parameters of a new fabric, validated before anything is written."""

    max_nodes: int = 32
    ring_size: int = 1024
    networks: tuple[NetworkSpec, ...] = (NetworkSpec(),)
    n_mcast: int = 4
    tape_entries: int = 256
    tape_entry_size: int = 2048

    def validate(self) -> None:
        def bad(what: str, fix: str) -> RegionCreateError:
            return RegionCreateError(f"{what}; {fix}")

        if not 2 <= self.max_nodes <= L["max_nodes"]:
            raise bad(f"max_nodes={self.max_nodes} is out of range", f"use 2..{L['max_nodes']}")
        for nm, v in (("ring_size", self.ring_size), ("tape_entries", self.tape_entries)):
            if v < 2 or v & (v - 1) or v > 1 << 20:
                raise bad(f"{nm}={v} is not a power of two between 2 and 2^20", f"e.g. {nm}=1024")
        if not 1 <= len(self.networks) <= MAX_NETWORKS:
            raise bad(f"{len(self.networks)} networks given", f"give 1..{MAX_NETWORKS}")
        for i, n in enumerate(self.networks):
            if not MTU_MIN <= n.mtu <= MTU_MAX:
                raise bad(f"network {i}: mtu={n.mtu} is out of range", f"use {MTU_MIN}..{MTU_MAX}")
            if not 64 <= n.slots <= 1 << 24:
                raise bad(f"network {i}: slots={n.slots} is out of range", "use 64..16777216")
            if n.headroom % 64 or n.headroom > 4096:
                raise bad(f"network {i}: headroom={n.headroom}", "use a multiple of 64 up to 4096")
        if not 0 <= self.n_mcast <= 64:
            raise bad(f"n_mcast={self.n_mcast} is out of range", "use 0..64")
        if not 64 <= self.tape_entry_size <= 65536 + 14:
            raise bad(f"tape_entry_size={self.tape_entry_size} is out of range", "use 64..65550")

    def layout(self) -> Layout:
        return Layout.compute(self.max_nodes, self.ring_size, tuple(self.networks), self.n_mcast,
                              self.tape_entries, self.tape_entry_size)


def _pack(buf, base: int, struct_name: str, fields: dict, values: dict) -> None:
    for k, v in values.items():
        struct.pack_into("<" + fields[k], buf, base + L[f"{struct_name}.{k}"], v)


def _unpack(buf, base: int, struct_name: str, fields: dict) -> dict:
    return {k: struct.unpack_from("<" + c, buf, base + L[f"{struct_name}.{k}"])[0] for k, c in fields.items()}


def proc_start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks), or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # the command name may contain spaces and parentheses: split after the last ')'
    rest = data[data.rindex(b")") + 2:].split()
    if rest[0] in (b"Z", b"X"):  # a zombie has exited already
        return None
    return int(rest[19])


def pid_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


class MappedRegion:
    """An open, validated region: its file, mapping, layout and the C handle over it."""

    def __init__(self, path: Path, fd: int, mm: mmap.mmap, layout: Layout, flags: int, name: str):
        self.path = path
        self.fd = fd
        self.mm = mm
        self.layout = layout
        self.flags = flags
        self.name = name
        self.core = native.Region(mm)
        # when this process may next retry a pending pool sweep, and the gap after that
        # (shmfabric.core.liveness backs off while nodes keep the sweep from running)
        self.sweep_next = 0.0
        self.sweep_gap = 0.0
        self.sweep_warned = False  # a corrupt free stack was reported (once per process)

    # -- creation ------------------------------------------------------------------------------
    @classmethod
    def create(cls, name: str, config: FabricConfig, *, ephemeral: bool = False, mode: int = 0o600,
               group: int | str | None = None, exist_ok: bool = False) -> "MappedRegion":
        config.validate()
        if len(name.encode()) >= NAME_LEN and "/" not in name:
            raise RegionCreateError(f"fabric name {name!r} is longer than {NAME_LEN - 1} bytes; use a shorter name")
        if not name or any(c in name for c in "\0") or (name.startswith(".")):
            raise RegionCreateError(f"fabric name {name!r} is not valid; use letters, digits, '-' and '_'")
        path = region_path(name)
        lay = config.layout()
        flags = FLAG_EPHEMERAL if ephemeral else 0
        # The file is sparse: a region larger than its file system's free space is created
        # fine and kills its nodes with SIGBUS once the pages run out, so refuse it here.
        try:
            st = os.statvfs(path.parent)
            free = st.f_bavail * st.f_frsize
        except OSError:
            free = None
        if free is not None and lay.total_size > free:
            raise RegionCreateError(f"fabric {name!r} needs {lay.total_size:,} bytes and {path.parent} has {free:,} "
                                    "free; use fewer or smaller slots (networks), a smaller ring_size or max_nodes "
                                    f"(rings take max_nodes² × ring_size descriptors), or make {path.parent} larger")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        except FileExistsError:
            if exist_ok:
                return cls.open(name)
            raise RegionCreateError(f"fabric {name!r} already exists at {path}; open it, or destroy it first "
                                    f"(shmfabric destroy {name})") from None
        except OSError as e:
            raise RegionCreateError(f"cannot create {path}: {e.strerror}") from None
        try:
            os.fchmod(fd, mode)  # the umask must not widen or narrow what was asked
            if group is not None:
                import grp
                try:
                    gid = grp.getgrnam(group).gr_gid if isinstance(group, str) else int(group)
                except KeyError:
                    raise RegionCreateError(f"group {group!r} does not exist; give an existing group name or gid") from None
                os.fchown(fd, -1, gid)
            os.ftruncate(fd, lay.total_size)
            mm = mmap.mmap(fd, lay.total_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except RegionCreateError:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        except OSError as e:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise RegionCreateError(f"cannot size or map {path} ({lay.total_size} bytes): {e}") from None
        sb = {
            "magic": L["magic"], "version": L["version"], "superblock_size": L["sizeof.superblock"],
            "total_size": lay.total_size, "max_nodes": lay.max_nodes, "ring_size": lay.ring_size,
            "n_networks": len(lay.networks), "n_mcast": lay.n_mcast, "tape_entries": lay.tape_entries,
            "tape_entry_size": lay.tape_entry_size, "flags": flags, "node_size": lay.node_size,
            "off_nodes": lay.off_nodes, "off_networks": lay.off_networks, "off_rings": lay.off_rings,
            "ring_stride": lay.ring_stride, "off_tapes": lay.off_tapes, "tape_stride": lay.tape_stride,
            "created_ns": time.time_ns(), "creator_pid": os.getpid(),
        }
        nm = name.encode()[: NAME_LEN - 1]
        mm[L["sf_superblock.name"]: L["sf_superblock.name"] + len(nm)] = nm
        for i, (n, (o_next, o_chain, o_owner, o_slots)) in enumerate(zip(lay.networks, lay.net_offsets)):
            _pack(mm, lay.off_networks + i * L["sizeof.network"], "sf_network", _NET_FIELDS, {
                "mtu": n.mtu, "slot_size": n.slot_size, "headroom": n.headroom, "n_slots": n.slots,
                "off_next": o_next, "off_chain": o_chain, "off_owner": o_owner, "off_slots": o_slots})
        for t in range(1 + lay.n_mcast):
            group_mac = b"\xff" * 6 if t == 0 else mcast_group_mac(t - 1)
            off = lay.off_tapes + t * lay.tape_stride + L["sf_tape.group"]
            mm[off: off + 6] = group_mac
        # the magic goes in last, so a half-made region never validates
        _pack(mm, 0, "sf_superblock", _SB_FIELDS, {k: v for k, v in sb.items() if k != "magic"})
        _pack(mm, 0, "sf_superblock", _SB_FIELDS, {"magic": sb["magic"]})
        self = cls(path, fd, mm, lay, flags, name)
        self.core.format()
        return self

    # -- opening and validation ------------------------------------------------------------------
    @classmethod
    def open(cls, name: str) -> "MappedRegion":
        path = region_path(name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise RegionNotFoundError(f"no fabric {name!r}: {path} does not exist; create it with "
                                      f"`shmfabric create {name}`") from None
        except OSError as e:
            raise RegionOpenError(f"cannot open {path}: {e.strerror}") from None
        try:
            size = os.fstat(fd).st_size
            lay, flags = validate_file(fd, size, path)
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        fname = bytes(mm[L["sf_superblock.name"]: L["sf_superblock.name"] + NAME_LEN]).split(b"\0")[0].decode(errors="replace")
        return cls(path, fd, mm, lay, flags, fname or name)

    # -- reading shared state ---------------------------------------------------------------------
    def superblock(self) -> dict:
        return _unpack(self.mm, 0, "sf_superblock", _SB_FIELDS)

    def node_hwm(self) -> int:
        return struct.unpack_from("<I", self.mm, L["sf_superblock.node_hwm"])[0]

    def node_entry(self, i: int) -> dict:
        base = self.layout.off_nodes + i * self.layout.node_size
        d = _unpack(self.mm, base, "sf_node", _NODE_FIELDS)
        raw = bytes(self.mm[base + L["sf_node.name"]: base + L["sf_node.name"] + NAME_LEN])
        d["name"] = raw.split(b"\0")[0].decode(errors="replace")
        d["cached"] = list(struct.unpack_from(f"<{MAX_NETWORKS}I", self.mm, base + L["sf_node.cached"]))
        d["waiting"] &= L["waiting_count"]  # the count; the bits above it tag the incarnation
        d["index"] = i
        return d

    def network_entry(self, i: int) -> dict:
        base = self.layout.off_networks + i * L["sizeof.network"]
        d = _unpack(self.mm, base, "sf_network", _NET_FIELDS)
        d["free_count"] = struct.unpack_from("<q", self.mm, base + L["sf_network.free_count"])[0]
        return d

    def close(self) -> None:
        core, self.core = self.core, None
        del core
        try:
            self.mm.close()
        except BufferError:
            pass  # frames or ports still reference the mapping; it goes with them
        try:
            os.close(self.fd)
        except OSError:
            pass


def mcast_group_mac(i: int) -> bytes:
    """The address of multicast tape i: 01:00:5e-style group bit set, in the fabric's own space."""
    return bytes([0x03, 0x73, 0x66, 0x00, 0x00, i & 0xFF])


def has_region_magic(path: Path) -> bool:
    """True if the file at `path` starts with the fabric magic number (False if it is shorter).
    Raises OSError (FileNotFoundError, IsADirectoryError, ...) if it cannot be read."""
    with open(path, "rb") as f:
        head = f.read(8)
    return len(head) == 8 and struct.unpack("<Q", head)[0] == L["magic"]


def validate_file(fd: int, size: int, path: Path) -> tuple[Layout, int]:
    """Check a region file completely before it is mapped for use; raise RegionOpenError subclasses."""
    sbsize = L["sizeof.superblock"]
    if size < sbsize:
        raise TruncatedRegionError(f"{path} is {size} bytes, smaller than a superblock ({sbsize} bytes): "
                                   "not a shmfabric region or truncated; destroy and re-create it")
    head = os.pread(fd, sbsize, 0)
    sb = _unpack(head, 0, "sf_superblock", _SB_FIELDS)
    if sb["magic"] != L["magic"]:
        raise BadMagicError(f"{path} is not a shmfabric region (magic {sb['magic']:#018x}, expected "
                            f"{L['magic']:#018x}); check the name"
                            + (" (a half-made fabric: `shmfabric destroy NAME` removes it)"
                               if path.parent == SHM_DIR and path.name.startswith(PREFIX) else ""))
    if sb["version"] != L["version"]:
        raise VersionMismatchError(f"{path} has layout version {sb['version']}, this shmfabric reads version "
                                   f"{L['version']}; use the matching shmfabric or re-create the fabric")
    if sb["superblock_size"] != sbsize or sb["node_size"] != L["sizeof.node"]:
        raise CorruptRegionError(f"{path}: superblock_size/node_size are {sb['superblock_size']}/{sb['node_size']}, "
                                 f"expected {sbsize}/{L['sizeof.node']}; the region is corrupt, re-create it")
    if sb["total_size"] != size:
        raise TruncatedRegionError(f"{path} is {size} bytes but its superblock says {sb['total_size']}: "
                                   "the file was truncated or extended; destroy and re-create the fabric")
    n_net = sb["n_networks"]
    if not 1 <= n_net <= MAX_NETWORKS:
        raise CorruptRegionError(f"{path}: n_networks={n_net} is impossible (1..{MAX_NETWORKS}); re-create the fabric")
    if sb["off_networks"] + n_net * L["sizeof.network"] > size or sb["off_networks"] < sbsize:
        raise CorruptRegionError(f"{path}: off_networks={sb['off_networks']} points outside the file; re-create the fabric")
    raw_nets = os.pread(fd, n_net * L["sizeof.network"], sb["off_networks"])
    specs = []
    for i in range(n_net):
        n = _unpack(raw_nets, i * L["sizeof.network"], "sf_network", _NET_FIELDS)
        if not (MTU_MIN <= n["mtu"] <= MTU_MAX and 64 <= n["n_slots"] <= 1 << 24 and n["headroom"] <= 4096):
            raise CorruptRegionError(f"{path}: network {i} has mtu={n['mtu']} slots={n['n_slots']} "
                                     f"headroom={n['headroom']}, which is impossible; re-create the fabric")
        # The free stack's head is runtime state, but it is one atomic word that always names a
        # slot of the pool (or none), so it can be checked even while nodes run; a head outside
        # the pool would send the first allocation off the mapping. (free_count is not checked:
        # it lags the stack by design and may be briefly out of range on a healthy region.)
        top1 = struct.unpack_from("<Q", raw_nets, i * L["sizeof.network"] + L["sf_network.free_head"])[0] & 0xFFFFFFFF
        if top1 > n["n_slots"]:
            raise CorruptRegionError(f"{path}: network {i} free_head names slot {top1 - 1}, beyond its "
                                     f"{n['n_slots']} slots; the region is corrupt, re-create it")
        specs.append(NetworkSpec(n["mtu"], n["n_slots"], n["headroom"]))
    try:
        cfg = FabricConfig(sb["max_nodes"], sb["ring_size"], tuple(specs), sb["n_mcast"], sb["tape_entries"],
                           sb["tape_entry_size"])
        cfg.validate()
    except RegionCreateError as e:
        raise CorruptRegionError(f"{path}: impossible parameters ({e}); re-create the fabric") from None
    # node_hwm bounds every scan of the node table and the rings in C; beyond max_nodes those
    # scans would read past the ring area
    (hwm,) = struct.unpack_from("<I", head, L["sf_superblock.node_hwm"])
    if hwm > sb["max_nodes"]:
        raise CorruptRegionError(f"{path}: node_hwm={hwm} exceeds max_nodes={sb['max_nodes']}; "
                                 "the region is corrupt, re-create it")
    lay = cfg.layout()
    expect = {"off_nodes": lay.off_nodes, "off_networks": lay.off_networks, "off_rings": lay.off_rings,
              "ring_stride": lay.ring_stride, "off_tapes": lay.off_tapes, "tape_stride": lay.tape_stride,
              "total_size": lay.total_size}
    for k, v in expect.items():
        if sb[k] != v:
            raise CorruptRegionError(f"{path}: {k}={sb[k]} but the parameters give {v}: offsets point to the wrong "
                                     "place; the region is corrupt, re-create it")
    for i in range(n_net):
        n = _unpack(raw_nets, i * L["sizeof.network"], "sf_network", _NET_FIELDS)
        want = dict(zip(("off_next", "off_chain", "off_owner", "off_slots"), lay.net_offsets[i]))
        want["slot_size"] = specs[i].slot_size
        for k, v in want.items():
            if n[k] != v:
                raise CorruptRegionError(f"{path}: network {i} {k}={n[k]} but the parameters give {v}; "
                                         "the region is corrupt, re-create it")
    return lay, sb["flags"]
