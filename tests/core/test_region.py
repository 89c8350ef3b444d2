"""Region files: creation parameters, and every way a file can be wrong when it is opened.

A bad file must give the right RegionOpenError subclass with a message that names the problem,
and never crash the process: each case is also opened in a fresh subprocess, whose exit status
proves there was no segfault. Region files live in a temporary directory (a name with a '/' is
used as a path), so nothing here touches /dev/shm."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shmfabric.core.errors import CoreError
from shmfabric.core.native import LAYOUT as L
from shmfabric.core.region import FabricConfig, MappedRegion, NetworkSpec
from shmfabric.fabric import (
    BadMagicError,
    CorruptRegionError,
    Fabric,
    RegionCreateError,
    RegionNotFoundError,
    RegionOpenError,
    TruncatedRegionError,
    VersionMismatchError,
)

pytestmark = pytest.mark.timeout(60)

WORKERS = Path(__file__).parents[1] / "fabric" / "_workers.py"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> bytes:
    """The bytes of a small valid region with two networks."""
    d = tmp_path_factory.mktemp("region")
    path = d / "pristine"
    cfg = FabricConfig(max_nodes=4, ring_size=16, networks=(NetworkSpec(1500, 64), NetworkSpec(9000, 64)),
                       n_mcast=2, tape_entries=16, tape_entry_size=256)
    r = MappedRegion.create(str(path), cfg)
    data = bytes(r.mm)
    r.close()
    return data


def sb_put(data: bytearray, field: str, code: str, value: int) -> None:
    struct.pack_into("<" + code, data, L[f"sf_superblock.{field}"], value)


def net_put(data: bytearray, i: int, field: str, code: str, value: int) -> None:
    off_networks = struct.unpack_from("<Q", data, L["sf_superblock.off_networks"])[0]
    struct.pack_into("<" + code, data, off_networks + i * L["sizeof.network"] + L[f"sf_network.{field}"], value)


def _bad_magic(d):
    sb_put(d, "magic", "Q", 0x1122334455667788)


def _other_version(d):
    sb_put(d, "version", "I", 7)


def _truncated_half(d):
    del d[len(d) // 2:]


def _truncated_tiny(d):
    del d[100:]


def _empty(d):
    del d[:]


def _extended(d):
    d.extend(b"\0" * 4096)


def _total_size_lies(d):
    sb_put(d, "total_size", "Q", len(d) * 4)


def _off_rings_moved(d):
    sb_put(d, "off_rings", "Q", struct.unpack_from("<Q", d, L["sf_superblock.off_rings"])[0] + 4096)


def _off_tapes_outside(d):
    sb_put(d, "off_tapes", "Q", 1 << 60)


def _off_networks_outside(d):
    sb_put(d, "off_networks", "Q", len(d) + 64)


def _n_networks_zero(d):
    sb_put(d, "n_networks", "I", 0)


def _ring_size_not_pow2(d):
    sb_put(d, "ring_size", "I", 24)


def _max_nodes_huge(d):
    sb_put(d, "max_nodes", "I", 0xFFFFFFFF)


def _node_size_wrong(d):
    sb_put(d, "node_size", "I", 64)


def _net_off_slots_moved(d):
    net_put(d, 1, "off_slots", "Q", 64)


def _net_mtu_impossible(d):
    net_put(d, 0, "mtu", "I", 10)


def _net_slots_changed(d):
    # a consistent-looking pool with more slots than the file can hold
    net_put(d, 0, "n_slots", "I", 1 << 20)


def _node_hwm_garbage(d):
    sb_put(d, "node_hwm", "I", 0xFFFFFF)


def _free_head_outside(d):
    # the free stack's head names slot 2^31: a pop would walk off the pool
    net_put(d, 0, "free_head", "Q", (5 << 32) | 0x7FFFFFFF)


def _garbage(d):
    d[:] = os.urandom(len(d))


CASES = [
    ("bad magic", _bad_magic, BadMagicError, "not a shmfabric region"),
    ("other version", _other_version, VersionMismatchError, "layout version 7"),
    ("truncated to half", _truncated_half, TruncatedRegionError, "truncated"),
    ("truncated to 100 bytes", _truncated_tiny, TruncatedRegionError, "smaller than a superblock"),
    ("empty file", _empty, TruncatedRegionError, "0 bytes"),
    ("extended", _extended, TruncatedRegionError, "truncated or extended"),
    ("total_size lies", _total_size_lies, TruncatedRegionError, "superblock says"),
    ("off_rings moved", _off_rings_moved, CorruptRegionError, "off_rings="),
    ("off_tapes outside", _off_tapes_outside, CorruptRegionError, "off_tapes="),
    ("off_networks outside", _off_networks_outside, CorruptRegionError, "off_networks="),
    ("no networks", _n_networks_zero, CorruptRegionError, "n_networks=0"),
    ("ring_size not a power of two", _ring_size_not_pow2, CorruptRegionError, "ring_size=24"),
    ("max_nodes huge", _max_nodes_huge, CorruptRegionError, "max_nodes"),
    ("node_size wrong", _node_size_wrong, CorruptRegionError, "node_size"),
    ("network offset moved", _net_off_slots_moved, CorruptRegionError, "network 1 off_slots=64"),
    ("network mtu impossible", _net_mtu_impossible, CorruptRegionError, "mtu=10"),
    ("network slots changed", _net_slots_changed, CorruptRegionError, "total_size"),
    ("node_hwm garbage", _node_hwm_garbage, CorruptRegionError, "node_hwm"),
    ("free stack head outside the pool", _free_head_outside, CorruptRegionError, "free_head"),
    ("random garbage", _garbage, BadMagicError, "not a shmfabric region"),
]


def _write(tmp_path: Path, pristine: bytes, mutate) -> Path:
    d = bytearray(pristine)
    mutate(d)
    p = tmp_path / "region"
    p.write_bytes(bytes(d))
    os.chmod(p, 0o600)
    return p


@pytest.mark.parametrize("label,mutate,exc,words", CASES, ids=[c[0] for c in CASES])
def test_bad_region_file_gives_clear_error(tmp_path, pristine, label, mutate, exc, words):
    p = _write(tmp_path, pristine, mutate)
    with pytest.raises(exc) as ei:
        Fabric.open(str(p))
    msg = str(ei.value)
    assert words in msg, msg
    assert str(p) in msg  # the message names the file
    assert isinstance(ei.value, RegionOpenError)


@pytest.mark.parametrize("label,mutate,exc,words", CASES[::3] + [CASES[-2]], ids=[c[0] for c in CASES[::3] + [CASES[-2]]])
def test_bad_region_file_in_subprocess_never_crashes(tmp_path, pristine, label, mutate, exc, words):
    p = _write(tmp_path, pristine, mutate)
    r = subprocess.run([sys.executable, str(WORKERS), "open", str(p)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])  # a segfault would be -11
    out = json.loads(r.stdout)
    assert out["error"] == exc.__name__, out


def test_pristine_region_opens_and_works(tmp_path, pristine):
    p = tmp_path / "ok"
    p.write_bytes(pristine)
    fab = Fabric.open(str(p))
    try:
        a, b = fab.attach("a"), fab.attach("b", network=1)
        assert a.mtu == 1500 and b.mtu == 9000
        assert a.send(b.id, b"x" * 1500)
        with b.recv_batch(timeout=1) as bt:
            assert bt[0].tobytes() == b"x" * 1500
        assert fab.pool_audit(0)["total"] == 64 and fab.pool_audit(1)["total"] == 64
    finally:
        fab.close()


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(RegionNotFoundError, match="does not exist"):
        Fabric.open(str(tmp_path / "nope"))
    (tmp_path / "dir").mkdir()
    with pytest.raises(RegionOpenError, match="cannot open"):
        Fabric.open(str(tmp_path / "dir"))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_random_superblock_corruption_never_crashes(tmp_path, pristine, data):
    """Flip bytes anywhere in the superblock or network table: opening either works (a field that
    does not matter) or raises a RegionOpenError; it never raises anything else, never crashes."""
    d = bytearray(pristine)
    off_networks = struct.unpack_from("<Q", d, L["sf_superblock.off_networks"])[0]
    # the parts a validator must look at: superblock and the static part of every network entry
    spans = [(0, L["sizeof.superblock"])] + [
        (off_networks + i * L["sizeof.network"], off_networks + i * L["sizeof.network"] + L["sf_network.free_head"])
        for i in range(2)]
    for _ in range(data.draw(st.integers(1, 4))):
        lo, hi = data.draw(st.sampled_from(spans))
        pos = data.draw(st.integers(lo, hi - 1))
        d[pos] = data.draw(st.integers(0, 255))
    p = tmp_path / "fuzz"
    p.write_bytes(bytes(d))
    try:
        fab = Fabric.open(str(p))
    except RegionOpenError:
        return
    try:
        # if it opened, using it must be safe
        try:
            a = fab.attach("a")
        except CoreError as e:
            # bytes of the pool lock's robust mutex flipped: it looks held by someone, and attach
            # says so after its 5 s wait (a pthread mutex's inner state cannot be validated)
            assert "pool lock was held" in str(e)
            return
        b = fab.attach("b")
        a.send(b.id, b"still works")
        with b.recv_batch(timeout=0) as bt:
            assert [f.tobytes() for f in bt] == [b"still works"]
        fab.inspect()
    finally:
        fab.close()


# -- creation parameters --------------------------------------------------------------------------

@pytest.mark.parametrize("kw,words", [
    ({"max_nodes": 1}, "max_nodes=1"),
    ({"max_nodes": 5000}, "max_nodes=5000"),
    ({"ring_size": 1000}, "ring_size=1000 is not a power of two"),
    ({"ring_size": 1}, "ring_size=1"),
    ({"tape_entries": 3}, "tape_entries=3"),
    ({"networks": [1000]}, "mtu=1000 is out of range"),
    ({"networks": [70000]}, "mtu=70000"),
    ({"networks": [{"mtu": 1500, "slots": 10}]}, "slots=10"),
    ({"networks": [{"mtu": 1500, "bogus": 1}]}, "unknown network setting"),
    ({"networks": [1500] * 9}, "9 networks"),
    ({"networks": []}, "0 networks"),
    ({"n_mcast": 65}, "n_mcast=65"),
    ({"tape_entry_size": 10}, "tape_entry_size=10"),
])
def test_create_rejects_bad_parameters(tmp_path, kw, words):
    with pytest.raises(RegionCreateError, match=words.replace("(", "\\(")):
        Fabric.create(str(tmp_path / "r"), **kw)
    assert not (tmp_path / "r").exists()  # nothing is written before validation


def test_create_names_and_existing(tmp_path):
    p = str(tmp_path / "r")
    fab = Fabric.create(p, networks=[{"mtu": 1500, "slots": 64}], max_nodes=2, mode=0o640)
    try:
        assert (os.stat(p).st_mode & 0o777) == 0o640
        with pytest.raises(RegionCreateError, match="already exists"):
            Fabric.create(p)
        with pytest.raises(RegionCreateError, match="longer than 31 bytes"):
            Fabric.create("x" * 40)
        with pytest.raises(RegionCreateError, match="not valid"):
            Fabric.create(".hidden")
        info = fab.inspect()
        assert info["max_nodes"] == 2 and info["networks"][0]["slots"] == 64 and info["version"] == L["version"]
    finally:
        fab.close()
        Fabric.destroy(p)
    assert not os.path.exists(p)


def _links(d: bytearray, which: str) -> tuple[int, int]:
    off_networks = struct.unpack_from("<Q", d, L["sf_superblock.off_networks"])[0]
    off = struct.unpack_from("<Q", d, off_networks + L[f"sf_network.off_{which}"])[0]
    n = struct.unpack_from("<I", d, off_networks + L["sf_network.n_slots"])[0]
    return off, n


@pytest.mark.parametrize("which", ["next", "chain"])
def test_corrupt_free_stack_links_never_crash(tmp_path, pristine, which):
    """The links inside the free stack are runtime state, too large to check on open; a corrupt
    link must still never make the core touch memory outside the pool. Run in a subprocess:
    a segfault shows as a negative return code."""
    d = bytearray(pristine)
    off, n = _links(d, which)
    for i in range(n):
        struct.pack_into("<I", d, off + 4 * i, 0x40000000 + i)  # every link far outside the pool
    p = tmp_path / "links"
    p.write_bytes(bytes(d))
    r = subprocess.run([sys.executable, str(WORKERS), "open_and_use", str(p)], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    res = json.loads(r.stdout)
    assert res["opened"] and "error" not in res, res


def test_garbage_ring_indices_do_not_hang_or_crash(tmp_path, pristine):
    """Ring head/tail are runtime state; garbage there (head - tail far above ring_size) must not
    make attach walk billions of entries or touch memory outside the ring."""
    d = bytearray(pristine)
    sb = {k: struct.unpack_from("<" + c, d, L[f"sf_superblock.{k}"])[0]
          for k, c in (("off_rings", "Q"), ("ring_stride", "Q"), ("max_nodes", "I"))}
    struct.pack_into("<I", d, L["sf_superblock.node_hwm"], sb["max_nodes"])  # every ring is scanned
    for i in range(sb["max_nodes"] ** 2):
        base = sb["off_rings"] + i * sb["ring_stride"]
        struct.pack_into("<I", d, base + L["sf_ring.head"], 0xFFFFFF00 - i)
        struct.pack_into("<I", d, base + L["sf_ring.tail"], i)
    p = tmp_path / "rings"
    p.write_bytes(bytes(d))
    r = subprocess.run([sys.executable, str(WORKERS), "open_and_use", str(p)], capture_output=True, text=True,
                       timeout=15)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    res = json.loads(r.stdout)
    assert res["opened"] and "error" not in res, res
    assert res["sent"] > 0 and res["received"] == res["sent"], res
