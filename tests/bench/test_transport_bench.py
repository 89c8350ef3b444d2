"""`shmfabric bench transport`: the harness, every peer, the CLI.

Runs are tiny (50 ms per case): these tests check that each transport delivered real frames
(right lengths, right payload byte), the shape of the JSON, error and clean-up paths. They
never assert timings.
"""
from __future__ import annotations

import glob
import json
import multiprocessing
import os
import sys
import time
import types
from typing import Any

import pytest

from shmfabric.bench import transport as bt
from shmfabric.bench.peers import all_transports
from shmfabric.bench.peers import iceoryx as iox_peer
from shmfabric.bench.peers.base import MARKER, Ctl, Spec, Transport, TransportUnavailable, frame_sender, latency_result
from shmfabric.bench.peers.sockets import SeqpacketTransport, UdpTransport
from shmfabric.cli import main as cli_main

TINY = 0.05
REQUIRED = {"transport", "size", "mode", "frames_per_s", "bytes_per_s", "p50_us", "p99_us"}


def _leftovers() -> set[str]:
    """Files and directories the transports create for cases run by this process (case tags
    start with the harness's pid, so a benchmark someone else runs meanwhile does not count)."""
    pid = os.getpid()
    return (set(glob.glob(f"/dev/shm/shmfabric-bench-{pid}-*")) | set(glob.glob(f"/tmp/shmfabric-bench-zmq-{pid}-*"))
            | set(glob.glob(f"/dev/shm/{iox_peer.NAME_PREFIX}{pid}-*"))
            | set(glob.glob(f"/tmp/{iox_peer.NAME_PREFIX}{pid}-*")))


def _iceoryx2_available() -> bool:
    try:
        import iceoryx2  # noqa: F401
    except ImportError:
        return False
    return True


def _fabric_available() -> bool:
    try:
        from shmfabric import Fabric  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture
def no_leftovers():
    before = _leftovers()
    yield
    assert multiprocessing.active_children() == []
    assert _leftovers() - before == set()


def _check_row(r: dict[str, Any]) -> None:
    assert REQUIRED <= set(r)
    assert r["status"] == "ok", f"{r['transport']} {r['mode']} {r['size']} B: {r.get('error')}"
    size = r["size"]
    if r["mode"] in ("throughput", "forward"):
        assert r["frames"] > 0
        assert r["frames_per_s"] > 0
        # Every touched frame had exactly `size` bytes (the harness checks bytes == frames*size).
        assert r["bytes_per_s"] == pytest.approx(r["frames_per_s"] * size)
        assert r["p50_us"] is None and r["p99_us"] is None
    elif r["mode"] == "latency":
        assert r["samples"] > 0
        assert 0 < r["p50_us"] <= r["p99_us"]
        assert r["frames_per_s"] is None
    else:
        raise AssertionError(f"unexpected mode {r['mode']}")


@pytest.mark.timeout(240)
def test_every_peer_delivers_frames(no_leftovers):
    rows = bt.run_bench(bt.BenchConfig(sizes=(64, 1500), duration=TINY))
    transports = all_transports()
    by_key = {(r["transport"], r["mode"], r["size"]): r for r in rows}
    for t in transports:
        for mode in t.modes:
            for size in (64, 1500):
                r = by_key[(t.name, mode, size)]
                if t.name.startswith("shmfabric") and not _fabric_available():
                    assert r["status"] == "skipped" and "not importable" in r["error"]
                    continue
                _check_row(r)
    # the memcpy reference of the same run, and ratios against it and against seqpacket
    memcpy = [r for r in rows if r["mode"] == "memcpy"]
    assert {r["transport"] for r in memcpy} >= {"memcpy", "memcpy-cached"}
    assert all(r["bytes_per_s"] > 0 for r in memcpy)
    seq = by_key[("seqpacket", "throughput", 64)]
    assert seq["vs_seqpacket"] == pytest.approx(1.0)
    assert by_key[("mp.Pipe", "throughput", 1500)]["vs_memcpy"] > 0
    assert by_key[("seqpacket", "forward", 64)]["mode"] == "forward"
    # like for like: busy-polling latency against seqpacket-spin, blocking against seqpacket
    assert by_key[("seqpacket-spin", "latency", 64)]["details"]["busy_poll"] is True
    assert by_key[("mp.Pipe", "latency", 64)]["details"]["vs"] == "seqpacket"
    if _fabric_available():
        assert by_key[("shmfabric", "latency", 64)]["details"]["vs"] == "seqpacket-spin"
        assert by_key[("shmfabric-block", "latency", 64)]["details"]["vs"] == "seqpacket"
        # the batched row and the per-frame one, side by side, labelled
        assert by_key[("shmfabric", "throughput", 64)]["details"]["batch"] == 256
        assert "batch API vs per-frame socket calls" in by_key[("shmfabric", "throughput", 64)]["details"]["calls"]
        assert by_key[("shmfabric-1", "throughput", 64)]["details"]["batch"] == 1
        assert by_key[("shmfabric-1", "throughput", 64)]["vs_seqpacket"] > 0
    assert by_key[("iceoryx2", "throughput", 64)]["label"] == "iceoryx2 (Python binding, one call per frame)"
    # the rows survive JSON as they are, with what ran where
    out = json.loads(json.dumps(bt.public_rows(rows)))
    assert out[0].keys() >= REQUIRED | {"command", "commit", "machine", "label", "vs_memcpy_ring"}
    assert {"cpu_model", "cpus", "kernel", "python", "loadavg"} <= out[0]["machine"].keys()
    assert all(r["command"] == out[0]["command"] for r in out)


class _Scripted(Transport):
    """A transport whose receiver misbehaves on purpose; the sender is a real socketpair sender."""

    name = "scripted"
    modes = ("throughput",)

    def __init__(self, behaviour: str) -> None:
        self.behaviour = behaviour
        self.cleaned = False

    def setup(self, spec: Spec) -> Any:
        return SeqpacketTransport().setup(spec)

    def cleanup(self, chan: Any) -> None:
        SeqpacketTransport().cleanup(chan)
        self.cleaned = True

    def throughput_sender(self, chan: Any, spec: Spec, ctl: Ctl) -> dict[str, Any]:
        return frame_sender(chan[0][0].send, b"\x5a" * spec.size, ctl, end=b"")

    def throughput_receiver(self, chan: Any, spec: Spec, ctl: Ctl) -> dict[str, Any]:
        if self.behaviour == "raise":
            raise RuntimeError("boom in the receiver")
        if self.behaviour == "die":
            os._exit(3)
        if self.behaviour == "hang":
            ctl.ready()
            time.sleep(3600)
        if self.behaviour == "corrupt":
            ctl.ready()
            chan[0][1].recv(spec.size)
            ctl.stop.value = 1
            while len(chan[0][1].recv(spec.size)):
                pass
            return {"frames": 1, "bytes": spec.size, "elapsed": 0.1, "last_byte": 0x00}
        raise AssertionError(self.behaviour)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "behaviour, message",
    [
        ("raise", "receiver: RuntimeError: boom in the receiver"),
        ("die", "receiver: process ended without a result (exit code 3)"),
        ("hang", "timed out waiting for receiver"),
        ("corrupt", "payload corrupted"),
    ],
)
def test_a_failing_transport_is_an_error_row_and_the_run_goes_on(behaviour, message, monkeypatch, no_leftovers):
    monkeypatch.setattr(bt, "DRAIN", 0.5)
    monkeypatch.setattr(bt, "GRACE", 0.5)
    bad = _Scripted(behaviour)
    cfg = bt.BenchConfig(sizes=(64,), duration=TINY, modes=("throughput",), memcpy=False, setup_timeout=2.0)
    rows = bt.run_bench(cfg, transports=[bad, SeqpacketTransport()])
    assert [r["transport"] for r in rows] == ["scripted", "seqpacket"]
    assert rows[0]["status"] == "error"
    assert message in rows[0]["error"]
    assert rows[0]["frames_per_s"] is None
    assert bad.cleaned
    _check_row(rows[1])


def test_sizes_a_transport_cannot_carry_are_na():
    spec = Spec(size=65536, mode="throughput", duration=TINY)
    row = bt.run_case(UdpTransport(), spec, multiprocessing.get_context("fork"))
    assert row["status"] == "n/a"
    assert "65,507" in row["error"]
    assert UdpTransport().unsupported(Spec(size=65000, mode="throughput", duration=TINY)) is None


def test_an_unavailable_transport_is_skipped_with_its_reason():
    class Missing(Transport):
        name = "missing"

        def check_available(self) -> None:
            raise TransportUnavailable("libfoo is not installed")

    rows = bt.run_bench(bt.BenchConfig(sizes=(64,), duration=TINY, memcpy=False), transports=[Missing()])
    assert [(r["status"], r["error"]) for r in rows] == [("skipped", "libfoo is not installed")] * 2


def test_shmfabric_is_skipped_while_the_core_is_not_importable(monkeypatch):
    import shmfabric

    monkeypatch.delattr(shmfabric, "fabric", raising=False)
    monkeypatch.setitem(sys.modules, "shmfabric.fabric", None)
    rows = bt.run_bench(bt.BenchConfig(sizes=(64,), duration=TINY, memcpy=False, modes=("throughput",),
                                       only=("shmfabric",)))
    assert len(rows) == 1 and rows[0]["status"] == "skipped"
    assert "from shmfabric import Fabric" in rows[0]["error"]


def test_bad_configurations_are_refused_with_the_reason():
    ts = all_transports()
    for cfg, text in [
        (bt.BenchConfig(sizes=(0,)), "outside 1..65536"),
        (bt.BenchConfig(sizes=(70000,)), "outside 1..65536"),
        (bt.BenchConfig(duration=0), "positive"),
        (bt.BenchConfig(modes=("speed",)), "unknown mode 'speed'"),
        (bt.BenchConfig(only=("carrier-pigeon",)), "unknown transport(s) carrier-pigeon"),
    ]:
        with pytest.raises(ValueError, match=text.replace("(", r"\(").replace(")", r"\)")):
            cfg.validate(ts)


def test_latency_percentiles_are_half_round_trips_without_warm_up():
    rtts = [1_000_000] * 10 + [2000] * 980 + [10_000] * 10  # 10 slow warm-up samples first
    res = latency_result(rtts, MARKER)
    assert res["samples"] == 990
    assert res["p50_us"] == pytest.approx(1.0)
    assert res["p99_us"] == pytest.approx(5.0)
    assert res["max_us"] == pytest.approx(5.0)


def _fake(transport: str, mode: str, size: int, details: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    return bt._row(transport, size, mode, "ok", details=dict(details or {}), **kw)


def test_ratios_and_targets_from_rows():
    rows = [
        _fake("memcpy", "memcpy", 64 << 20, bytes_per_s=10e9, frames_per_s=150.0),
        _fake("memcpy-cached", "memcpy", 256 << 10, bytes_per_s=40e9, frames_per_s=150e3),
        _fake("memcpy-ring", "memcpy", 1536 * 1500, {"frame_size": 1500, "slots": 1536}, bytes_per_s=5e9),
        _fake("seqpacket", "throughput", 64, frames_per_s=0.5e6, bytes_per_s=32e6),
        _fake("shmfabric", "throughput", 64, {"batch": 256, "busy_poll": True}, frames_per_s=12e6, bytes_per_s=768e6),
        _fake("shmfabric-1", "throughput", 64, {"batch": 1, "busy_poll": True}, frames_per_s=0.6e6, bytes_per_s=38.4e6),
        _fake("seqpacket", "throughput", 1500, frames_per_s=0.4e6, bytes_per_s=0.6e9),
        _fake("shmfabric", "throughput", 1500, {"batch": 256, "busy_poll": True}, frames_per_s=2e6, bytes_per_s=3e9),
        _fake("seqpacket", "latency", 64, p50_us=8.0, p99_us=20.0),
        _fake("seqpacket-spin", "latency", 64, {"busy_poll": True}, p50_us=3.0, p99_us=5.0),
        _fake("shmfabric", "latency", 64, {"busy_poll": True}, p50_us=1.5, p99_us=4.0),
        _fake("shmfabric-block", "latency", 64, {"busy_poll": False}, p50_us=4.0, p99_us=60.0),
    ]
    by = {(r["transport"], r["mode"], r["size"]): r for r in rows}
    bt.add_ratios(rows)
    assert by[("shmfabric", "throughput", 64)]["vs_seqpacket"] == pytest.approx(24.0)
    assert by[("shmfabric-1", "throughput", 64)]["vs_seqpacket"] == pytest.approx(1.2)
    assert by[("shmfabric", "throughput", 1500)]["vs_memcpy"] == pytest.approx(0.3)
    assert by[("shmfabric", "throughput", 1500)]["vs_memcpy_ring"] == pytest.approx(0.6)
    assert by[("shmfabric", "throughput", 64)]["vs_memcpy_ring"] is None  # no ring copy at 64 B
    # busy-poll against busy-poll (3.0 / 1.5), blocking against blocking (8.0 / 4.0)
    assert by[("shmfabric", "latency", 64)]["vs_seqpacket"] == pytest.approx(2.0)
    assert by[("shmfabric", "latency", 64)]["details"]["vs"] == "seqpacket-spin"
    assert by[("shmfabric-block", "latency", 64)]["vs_seqpacket"] == pytest.approx(2.0)
    assert by[("shmfabric-block", "latency", 64)]["details"]["vs"] == "seqpacket"
    got = {t["target"]: t["ok"] for t in bt.evaluate_targets(rows)}
    assert got["64 B batched >= 10 M frames/s"] is True
    assert got["64 B batched >= 10x seqpacket (batch API vs per-frame socket calls)"] is True
    assert got["1500 B batched >= 3x seqpacket (batch API vs per-frame socket calls)"] is True  # 5x
    # 3 GB/s: 30% of the DRAM copy, 60% of the ring working set's, 7.5% of the in-cache one
    assert got["1500 B bytes/s >= 50% of memcpy: large buffer (DRAM)"] is False
    assert got["1500 B bytes/s >= 50% of memcpy: ring working set"] is True
    assert got["1500 B bytes/s >= 50% of memcpy: small buffer (in cache)"] is False
    measured = {t["target"]: t["measured"] for t in bt.evaluate_targets(rows)}
    assert measured["1500 B bytes/s >= 50% of memcpy: ring working set"] == "60% of 2.2 MiB"
    assert got["latency 64 B p50 <= 3 us (busy-poll)"] is True
    assert got["latency 64 B p99 <= 50 us (blocking)"] is False
    assert got["forward 64 B >= 5 M frames/s"] is None  # not measured
    cmp = {c["comparison"]: c["ratio"] for c in bt.comparisons(rows)}
    assert cmp["throughput 64 B, shmfabric batch 256 / seqpacket (batch API vs per-frame socket calls)"] == \
        pytest.approx(24.0)
    assert cmp["throughput 64 B, shmfabric-1 / seqpacket (per-frame vs per-frame calls)"] == pytest.approx(1.2)
    assert cmp["latency 64 B p50, seqpacket-spin / shmfabric (busy-poll vs busy-poll)"] == pytest.approx(2.0)
    assert cmp["latency 64 B p50, seqpacket / shmfabric-block (blocking vs blocking)"] == pytest.approx(2.0)
    assert cmp["throughput 1500 B, shmfabric bytes/s / memcpy, ring working set"] == pytest.approx(0.6)


def test_busy_polling_latency_has_no_ratio_without_the_busy_polling_baseline():
    rows = [
        _fake("seqpacket", "latency", 64, p50_us=8.0, p99_us=20.0),
        _fake("shmfabric", "latency", 64, {"busy_poll": True}, p50_us=1.0, p99_us=4.0),
    ]
    bt.add_ratios(rows)
    assert rows[1]["vs_seqpacket"] is None  # not 8x: that would be busy-poll against blocking


@pytest.mark.timeout(120)
def test_ring_working_set_memcpy(monkeypatch, no_leftovers):
    if not _fabric_available():
        pytest.skip("the fabric core is not importable")
    monkeypatch.setattr(bt, "MIN_SLOT_SAMPLES", 1)
    rows = bt.run_bench(bt.BenchConfig(sizes=(1500,), duration=0.2, modes=("throughput",),
                                       only=("seqpacket", "shmfabric")))
    ring = [r for r in rows if r["transport"] == "memcpy-ring"]
    assert len(ring) == 1 and ring[0]["status"] == "ok"
    fab = next(r for r in rows if r["transport"] == "shmfabric")
    slots = fab["details"]["slots_cycled"]
    assert 0 < slots <= 4096 and fab["details"]["slot_samples"] >= slots
    assert ring[0]["size"] == slots * 1500 and ring[0]["details"] == {
        "how": ring[0]["details"]["how"], "frame_size": 1500, "slots": slots}
    assert fab["vs_memcpy_ring"] == pytest.approx(fab["bytes_per_s"] / ring[0]["bytes_per_s"])


def test_memcpy_ring_needs_enough_slot_samples(monkeypatch):
    if not _fabric_available():
        pytest.skip("the fabric core is not importable")
    monkeypatch.setattr(bt, "MIN_SLOT_SAMPLES", 10**9)
    rows = bt.run_bench(bt.BenchConfig(sizes=(64,), duration=TINY, modes=("throughput",), only=("shmfabric",)))
    assert not [r for r in rows if r["transport"] == "memcpy-ring"]


@pytest.mark.timeout(60)
def test_iceoryx2_files_are_its_own_and_removed(monkeypatch, no_leftovers):
    if not _iceoryx2_available():
        pytest.skip("iceoryx2 is not installed")
    seen: list[list[str]] = []
    cleanup = iox_peer.Iceoryx2Transport.cleanup

    def spy(self: Any, chan: Any) -> None:
        seen.append(glob.glob(f"/dev/shm/{chan['prefix']}*") + glob.glob(f"{chan['root']}*"))
        cleanup(self, chan)

    monkeypatch.setattr(iox_peer.Iceoryx2Transport, "cleanup", spy)
    rows = bt.run_bench(bt.BenchConfig(sizes=(64,), duration=TINY, memcpy=False, only=("iceoryx2",)))
    for r in rows:
        _check_row(r)
    # the workers' files carried the case's prefix and root (not iox2_* and /tmp/iceoryx2)
    assert len(seen) == 2 and all(seen)


def test_iceoryx2_cleanup_leaves_other_files_alone():
    pid = os.getpid()
    t = iox_peer.Iceoryx2Transport()
    chan = t.setup(Spec(size=64, mode="throughput", duration=TINY, tag=f"{pid}-1"))
    other = t.setup(Spec(size=64, mode="throughput", duration=TINY, tag=f"{pid}-10"))
    mine = [f"/dev/shm/{chan['prefix']}x.data"]
    theirs = [f"/dev/shm/{other['prefix']}x.data", f"/dev/shm/iox2_shmfabric-test-{pid}.data"]
    try:
        for path in mine + theirs:
            with open(path, "w"):
                pass
        os.makedirs(os.path.join(chan["root"], "nodes"))
        t.cleanup(chan)
        assert not any(os.path.exists(p) for p in mine) and not os.path.exists(chan["root"])
        assert all(os.path.exists(p) for p in theirs)
    finally:
        for path in mine + theirs:
            if os.path.exists(path):
                os.unlink(path)


def test_run_info():
    info = bt.run_info()
    assert info["command"] and info["time_utc"].endswith("Z")
    assert info["machine"]["cpus"] == os.cpu_count() and len(info["machine"]["loadavg"].split()) == 3
    assert info["machine"]["python"].endswith(".".join(map(str, sys.version_info[:3])))
    assert info["commit"] is None or len(info["commit"]) == 40
    assert info["uncommitted_changes"] is None or isinstance(info["uncommitted_changes"], list)
    # (the version each installed peer reports, e.g. iperf3's first line)
    assert all(isinstance(v, str) and v for v in info["peers"].values())


# --- CLI -------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("argv_head", [["bench", "transport", "--json"], ["--json", "bench", "transport"]])
def test_cli_json(argv_head, capsys, no_leftovers):
    rc = cli_main.main(argv_head + ["--duration", "0.05", "--sizes", "64,1500", "--only", "seqpacket,mp.Pipe",
                                    "--modes", "throughput,latency"])
    assert rc == 0
    rows = json.loads(capsys.readouterr().out)
    assert isinstance(rows, list)
    measured = [r for r in rows if r["mode"] != "memcpy"]
    assert sorted((r["transport"], r["mode"], r["size"]) for r in measured) == sorted(
        (t, m, s) for t in ("seqpacket", "mp.Pipe") for m in ("throughput", "latency") for s in (64, 1500))
    for r in measured:
        _check_row(r)


@pytest.mark.timeout(60)
def test_cli_table(capsys, no_leftovers):
    rc = cli_main.main(["bench", "transport", "--duration", "0.05", "--sizes", "64", "--only", "seqpacket",
                        "--modes", "throughput"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "seqpacket" in out and "memcpy" in out and "issue 2 targets" in out


@pytest.mark.parametrize("args, text", [
    (["--sizes", "0"], "outside 1..65536"),
    (["--only", "nope"], "unknown transport(s) nope"),
    (["--modes", "speed"], "unknown mode 'speed'"),
])
def test_cli_user_errors(args, text, capsys):
    assert cli_main.main(["bench", "transport", *args]) == 2
    err = capsys.readouterr().err
    assert text in err and "Traceback" not in err


def test_cli_malformed_numbers_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main.main(["bench", "transport", "--sizes", "big"])
    assert exc.value.code == 2
    assert "not a comma-separated list" in capsys.readouterr().err


def test_cli_duration_from_environment(monkeypatch, capsys):
    monkeypatch.setenv(bt.DURATION_ENV, "soon")
    assert cli_main.main(["bench", "transport", "--only", "seqpacket"]) == 2
    assert "SHMFABRIC_BENCH_DURATION='soon'" in capsys.readouterr().err
    monkeypatch.setenv(bt.DURATION_ENV, "0.25")
    assert bt.default_duration() == 0.25


def test_cli_list_and_bare_noun(capsys):
    assert cli_main.main(["bench", "transport", "--list"]) == 0
    listed = capsys.readouterr().out
    for t in all_transports():
        assert t.name in listed
    assert cli_main.main(["bench"]) == 2
    assert "transport" in capsys.readouterr().out


def test_other_modules_add_bench_verbs(monkeypatch, capsys):
    from shmfabric.cli import bench as cli_bench

    mod = types.ModuleType("shmfabric_test_fake_bench")

    def register_bench(bench_sub: Any) -> None:
        p = bench_sub.add_parser("fake", help="a fake benchmark")
        p.set_defaults(func=lambda args: print("fake ran") or 0)

    mod.register_bench = register_bench  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setattr(cli_bench, "BENCH_MODULES", [mod.__name__, "shmfabric.bench.not_written_yet"])
    assert cli_main.main(["bench", "fake"]) == 0
    assert "fake ran" in capsys.readouterr().out


@pytest.mark.timeout(120)
def test_workers_can_be_spawned_instead_of_forked(no_leftovers):
    cfg = bt.BenchConfig(sizes=(64,), duration=TINY, memcpy=False, start_method="spawn",
                         only=("seqpacket", "mp.Queue", "faster-fifo"))
    rows = bt.run_bench(cfg)
    assert len(rows) == 2 * 3 + 1  # throughput and latency each, plus seqpacket's forward
    for r in rows:
        _check_row(r)
