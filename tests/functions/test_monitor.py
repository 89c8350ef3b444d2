"""`monitor` on crafted packets: per-flow counters, top talkers (Space-Saving bounds), pcap files
that our reader and tshark open (both link types, rotation, filter), report file, malformed frames;
and one chain with real processes whose capture tshark reads after a graceful stop. Capture files
are never truncated or overwritten (restart, reconfigure, two instances, rotation across runs,
`keep` on disk, planted symlinks); a full disk (RLIMIT_FSIZE in a child process) leaves whole
records and true counters; the report is private and atomic; idle flows are never revived."""
from __future__ import annotations

import errno
import json
import random
import stat
import struct
import subprocess
import sys
import textwrap
from collections import Counter

import pytest

from shmfabric import programs
from shmfabric.functions.api import FunctionConfigError, FunctionContext, NetworkFunction, validate_config
from shmfabric.functions.builtin import monitor as monitor_mod
from shmfabric.functions.builtin.generator import read_pcap
from shmfabric.functions.builtin.monitor import Monitor, SpaceSaving
from shmfabric.functions.registry import load
from shmfabric.net import build

from ._chain import Chain

MALFORMED = [b"", b"\x45", b"\x45\x00\x00\x14" + b"\x00" * 8, b"\x60" + b"\x00" * 10, bytes(range(64))]
TSHARK = programs.find("tshark")
needs_tshark = pytest.mark.skipif(TSHARK is None, reason=programs.not_found("tshark"))


def udp(src="10.0.0.1", dst="10.0.0.2", sport=1000, dport=53, payload=b"hello") -> bytes:
    return build.ipv4(build.udp(sport, dport, payload, src=src, dst=dst), src=src, dst=dst, proto=17)


def tcp(src="10.0.0.1", dst="10.0.0.2", sport=1000, dport=80, payload=b"") -> bytes:
    return build.ipv4(build.tcp(sport, dport, payload, flags="PA", src=src, dst=dst), src=src, dst=dst, proto=6)


def udp6(sport=5353, dport=5353) -> bytes:
    seg = build.udp(sport, dport, b"v6", src="fd00::1", dst="fd00::2")
    return build.ipv6(seg, src="fd00::1", dst="fd00::2", next_header=17)


def make(cfg: dict) -> Monitor:
    m = Monitor(validate_config(Monitor, cfg), FunctionContext(node="mon"))
    m.epoch_offset = 1_700_000_000.0  # deterministic wall-clock timestamps in the pcap
    return m


def run(fn, frames, now) -> list[int]:
    out = bytearray(len(frames))
    fn.process(frames, now, out)
    return list(out)


def tshark(path, *fields: str) -> list[list[str]]:
    args = [TSHARK, "-n", "-r", str(path)]
    if fields:
        args += ["-T", "fields", *[a for f in fields for a in ("-e", f)]]
    r = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return [line.split("\t") for line in r.stdout.splitlines()]


# --- counters -------------------------------------------------------------------------------------------

def test_registered_and_satisfies_the_protocol():
    assert load("monitor") is Monitor
    assert isinstance(make({}), NetworkFunction)


def test_per_flow_counters_and_every_verdict_is_next():
    m = make({})
    frames = [udp(), udp(), tcp(), udp(sport=2), udp6()] + MALFORMED
    assert run(m, frames, now=10.0) == [0] * len(frames)
    assert run(m, [udp(payload=b"x" * 100)], now=12.5) == [0]
    flows = {f["flow"]: f for f in m.flows()}
    a = flows["udp 10.0.0.1:1000 -> 10.0.0.2:53"]
    assert a["packets"] == 3 and a["bytes"] == 2 * 33 + 128
    assert a["first_seen"] == 1_700_000_010.0 and a["last_seen"] == 1_700_000_012.5
    assert flows["udp [fd00::1]:5353 -> [fd00::2]:5353"]["packets"] == 1
    c = m.counters()
    assert c["packets"] == len(frames) + 1 and c["flows"] == 4 and c["unparsed"] == len(MALFORMED)


def test_flow_table_is_bounded_and_idle_flows_expire():
    m = make({"max_flows": 3, "flow_timeout": 10})
    run(m, [udp(sport=p) for p in range(5)], now=0.0)
    assert m.counters()["flows"] == 3 and m.counters()["packets_untracked"] == 2
    run(m, [udp(sport=0)], now=8.0)
    assert m.expire(15.0) == 2  # sport 1 and 2 idle since 0; sport 0 seen at 8
    assert [f["flow"] for f in m.flows()] == ["udp 10.0.0.1:0 -> 10.0.0.2:53"]


def test_space_saving_finds_heavy_hitters_within_its_error_bounds():
    rnd = random.Random(7)
    heavy = {f"h{i}": w for i, w in enumerate([5000, 3000, 2000])}
    stream = [k for k, w in heavy.items() for _ in range(w)] + [f"n{rnd.randrange(5000)}" for _ in range(20000)]
    rnd.shuffle(stream)
    ss = SpaceSaving(50)
    truth = Counter()
    for k in stream:
        w = rnd.randrange(1, 3)
        ss.add(k, w)
        truth[k] += w
    top = ss.top()
    assert len(top) == 50 and ss.total == sum(truth.values())
    for key, count, err in top:
        assert count - err <= truth[key] <= count  # the algorithm's guarantee for every listed key
    # any key above total/k is listed; the three heavy ones are far above it, and ranked first
    assert [k for k, _, _ in top[:3]] == ["h0", "h1", "h2"]


def test_top_talkers_by_flow_and_by_source():
    m = make({"top_k": 4, "top_by": "src"})
    run(m, [udp(src="10.0.0.9", payload=b"x" * 1000)] * 3 + [udp(src=f"10.1.0.{i}") for i in range(20)], now=1.0)
    top = m.top_talkers(1)
    assert top[0]["talker"] == "10.0.0.9" and top[0]["bytes"] - top[0]["error"] <= 3 * 1028 <= top[0]["bytes"]
    m = make({"top_k": 4})
    run(m, [tcp(payload=b"y" * 500)] * 2 + [udp()], now=1.0)
    assert m.top_talkers()[0] == {"talker": "tcp 10.0.0.1:1000 -> 10.0.0.2:80", "bytes": 1080, "error": 0}


@pytest.mark.parametrize("cfg, msg", [
    ({"capture": {"path": "/nonexistent-dir/x.pcap"}}, r"config.capture.path: .*does not exist"),
    ({"capture": {"path": "/tmp/x.pcap", "rotate_bytes": 100}}, r"rotate_bytes 100 is too small"),
    ({"capture": {"path": "/tmp/x.pcap", "linktype": "wifi"}}, r"config.capture.linktype: Input should be"),
    ({"top_by": "port"}, r"config.top_by: Input should be 'flow', 'src' or 'dst'"),
    ({"max_flows": 0}, r"config.max_flows: Input should be greater than or equal to 1"),
])
def test_config_errors_name_the_field(cfg, msg):
    with pytest.raises(FunctionConfigError, match=msg):
        validate_config(Monitor, cfg)


# --- capture --------------------------------------------------------------------------------------------

def pcap_records(path) -> tuple[int, list[tuple[float, bytes, int]]]:
    data = open(path, "rb").read()
    magic, vmaj, vmin, _, _, snaplen, linktype = struct.unpack_from("<IHHiIII", data)
    assert (magic, vmaj, vmin) == (0xA1B2C3D4, 2, 4)
    recs, off = [], 24
    while off < len(data):
        sec, usec, incl, orig = struct.unpack_from("<IIII", data, off)
        recs.append((sec + usec / 1e6, data[off + 16: off + 16 + incl], orig))
        off += 16 + incl
    assert off == len(data)
    return linktype, recs


@pytest.mark.parametrize("linktype, code", [("ethernet", 1), ("raw", 101)])
def test_capture_writes_classic_pcap_that_reads_back(tmp_path, linktype, code):
    path = tmp_path / "cap.pcap"
    m = make({"capture": {"path": str(path), "linktype": linktype}})
    frames = [udp(), tcp(payload=b"GET / HTTP/1.1\r\n\r\n"), udp6()] + MALFORMED[1:]
    run(m, frames, now=3.25)
    m.close()
    lt, recs = pcap_records(path)
    assert lt == code and len(recs) == len(frames)
    assert recs[0][0] == pytest.approx(1_700_000_003.25)
    if linktype == "ethernet":
        assert [r[1][12:14] for r in recs[:3]] == [b"\x08\x00", b"\x08\x00", b"\x86\xdd"]
        assert [r[1][14:] for r in recs] == frames
    else:
        assert [r[1] for r in recs] == frames
    # the generator's pcap reader takes what the Ethernet type marks as IP (by version nibble here)
    want = [f for f in frames if f and f[0] >> 4 in (4, 6)] if linktype == "ethernet" else frames
    assert read_pcap(str(path)) == want


@needs_tshark
@pytest.mark.parametrize("linktype", ["ethernet", "raw"])
def test_tshark_reads_the_capture(tmp_path, linktype):
    path = tmp_path / "cap.pcap"
    m = make({"capture": {"path": str(path), "linktype": linktype}})
    run(m, [udp(), tcp(dport=8080), udp6()], now=1.0)
    m.close()
    rows = tshark(path, "ip.src", "ipv6.dst", "udp.dstport", "tcp.dstport", "frame.time_epoch")
    assert [r[:4] for r in rows] == [["10.0.0.1", "", "53", ""], ["10.0.0.1", "", "", "8080"], ["", "fd00::2", "5353", ""]]
    assert float(rows[0][4]) == pytest.approx(1_700_000_001.0)


def test_capture_filter_snaplen_and_rotation(tmp_path):
    path = tmp_path / "ring.pcap"
    m = make({"capture": {"path": str(path), "rotate_bytes": 4096, "keep": 3, "snaplen": 200,
                          "match": {"proto": "udp"}}})
    for t in range(200):
        run(m, [udp(payload=bytes(500)), tcp()], now=float(t))
    m.close()
    # a record is 16 + 200 bytes: 18 fit after the 24-byte file header, so 200 records fill 12 files
    files = sorted(tmp_path.glob("ring_*.pcap"))
    assert [f.name for f in files] == [f"ring_{i:05d}.pcap" for i in range(10, 13)]  # newest three kept
    total = 0
    for f in files:
        assert f.stat().st_size <= 4096
        _, recs = pcap_records(f)
        assert all(len(r[1]) == 200 and r[2] == 14 + 528 for r in recs)  # cut to snaplen, original length kept
        total += len(recs)
        if TSHARK:
            assert len(tshark(f)) == len(recs)
    assert total == 200 - 9 * 18
    c = m.counters()
    assert c["captured"] == 200 and c["packets"] == 400


def test_report_file_and_flush_on_timer(tmp_path):
    cap, rep = tmp_path / "c.pcap", tmp_path / "report.json"
    m = make({"capture": {"path": str(cap), "flush_interval": 0.5}, "report": str(rep), "report_interval": 2})
    run(m, [udp()] * 3, now=100.0)
    nxt = m.on_timer(100.0)
    assert nxt == 100.5  # the flush is the earliest next duty
    assert len(pcap_records(cap)[1]) == 3  # flushed: readable while the monitor runs
    report = json.loads(rep.read_text())
    assert report["counters"]["packets"] == 3 and report["top_talkers"][0]["bytes"] == 99
    assert report["flows"][0]["flow"] == "udp 10.0.0.1:1000 -> 10.0.0.2:53"
    assert report["capture_files"] == [str(cap)]


def test_capture_error_stops_capture_but_not_the_monitor(tmp_path):
    m = make({"capture": {"path": str(tmp_path / "c.pcap")}})
    class Full:
        def write(self, data):
            raise OSError(28, "No space left on device")

        def close(self):
            pass

    m.capture.writer.f = Full()
    assert run(m, [udp(), udp()], now=1.0) == [0, 0]
    c = m.counters()
    assert c["capture_errors"] == 1 and c["packets"] == 2 and m.capture is None


def test_reconfigure_switches_capture_file(tmp_path):
    a, b = tmp_path / "a.pcap", tmp_path / "b.pcap"
    m = make({"capture": {"path": str(a)}})
    run(m, [udp()], now=1.0)
    m.reconfigure(validate_config(Monitor, {"capture": {"path": str(b)}}))
    run(m, [udp(), udp()], now=2.0)
    m.close()
    assert len(pcap_records(a)[1]) == 1 and len(pcap_records(b)[1]) == 2


# --- with processes -------------------------------------------------------------------------------------

def test_monitor_in_a_chain_captures_everything_and_passes_it_on(tmp_path):
    """generator -> monitor(capture) -> sink; after SIGTERM the pcap is complete (close() hook)."""
    path = tmp_path / "chain.pcap"
    ch = Chain(tmp_path)
    try:
        ch.start("sink", "sink", {"verify": True})
        ch.start("mon", "monitor", {"capture": {"path": str(path), "flush_interval": 60}}, "sink")
        ch.wait_attached("sink", "mon")
        ch.start("gen", "generator", {"count": 500, "size": 100, "flows": 8}, "mon")
        ch.wait_exit("gen")
        assert ch.wait_rx("sink", 500) >= 500
        mon = ch.stop("mon")
        sink = ch.stop("sink")
        assert mon["function_counters"]["captured"] == 500 and mon["function_counters"]["flows"] == 8
        assert sink["function_counters"]["unique"] == 500 and sink["function_counters"]["corrupt"] == 0
        _, recs = pcap_records(path)
        assert len(recs) == 500
        # the synthesized Ethernet header carries the fabric MACs: source = the generator's node
        src_macs = {r[1][6:12] for r in recs}
        assert len(src_macs) == 1 and src_macs != {b"\x02\x00\x00\x00\x00\x01"}  # the generator's, not a filler
        if TSHARK:
            assert len(tshark(path, "udp.srcport")) == 500
    finally:
        ch.close()


def test_rotation_inside_one_batch_splits_it_over_files(tmp_path):
    path = tmp_path / "one.pcap"
    m = make({"capture": {"path": str(path), "rotate_bytes": 4096, "linktype": "raw"}})
    frames = [udp(sport=i, payload=bytes(300)) for i in range(100)]
    run(m, frames, now=1.0)
    m.close()
    files = sorted(tmp_path.glob("one_*.pcap"))
    recs = [r for f in files for r in pcap_records(f)[1]]
    assert all(f.stat().st_size <= 4096 for f in files) and len(files) == 10  # 11 records of 344 B per file
    assert [r[1] for r in recs] == frames


def test_a_capture_file_that_cannot_be_opened_is_a_config_error():
    with pytest.raises(FunctionConfigError, match=r"cannot open capture file '/proc/no.pcap'"):
        Monitor(validate_config(Monitor, {"capture": {"path": "/proc/no.pcap"}}))


# --- review fixes: capture files are never overwritten, disk full, report file, flow expiry ----------------


def names(d) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_a_restart_writes_a_new_numbered_file_and_never_truncates_the_old_one(tmp_path):
    path = tmp_path / "edge.pcap"
    cfg = {"capture": {"path": str(path), "linktype": "raw"}}
    m = make(cfg)
    run(m, [udp()] * 3, now=1.0)
    m.close()
    m = make(cfg)  # the manager restarted the node: same config
    run(m, [tcp()] * 2, now=2.0)
    assert m.snapshot()["capture_files"] == [str(tmp_path / "edge_00001.pcap")]
    m.close()
    make(cfg).close()  # restarted again, no traffic: an empty capture of its own
    assert names(tmp_path) == ["edge.pcap", "edge_00001.pcap", "edge_00002.pcap"]
    assert [r[1] for r in pcap_records(path)[1]] == [udp()] * 3  # the first run wrote exactly the path given
    assert [r[1] for r in pcap_records(tmp_path / "edge_00001.pcap")[1]] == [tcp()] * 2
    assert pcap_records(tmp_path / "edge_00002.pcap")[1] == []


def test_reconfigure_of_the_same_path_keeps_what_was_captured(tmp_path):
    path = tmp_path / "edge.pcap"
    m = make({"capture": {"path": str(path), "linktype": "raw"}})
    run(m, [udp()] * 3, now=1.0)
    m.reconfigure(validate_config(Monitor, {"capture": {"path": str(path), "linktype": "raw", "flush_interval": 2}}))
    run(m, [tcp()], now=2.0)
    m.close()
    assert len(pcap_records(path)[1]) == 3 and len(pcap_records(tmp_path / "edge_00001.pcap")[1]) == 1
    assert m.counters()["captured"] == 4


def test_two_instances_on_one_path_each_write_their_own_file(tmp_path):
    cfg = {"capture": {"path": str(tmp_path / "edge.pcap"), "linktype": "raw", "flush_interval": 0.1}}
    a, b = make(cfg), make(cfg)  # a `replace` runs the old and the new instance at once
    for t in range(20):
        run(a, [udp(src="10.0.0.1", payload=bytes(100))] * 4, now=float(t))
        run(b, [udp(src="10.0.0.99", payload=bytes(7))] * 4, now=float(t))
        a.on_timer(float(t))
        b.on_timer(float(t))
    a.close()
    b.close()
    assert names(tmp_path) == ["edge.pcap", "edge_00001.pcap"]
    a_frame, b_frame = udp(src="10.0.0.1", payload=bytes(100)), udp(src="10.0.0.99", payload=bytes(7))
    assert [r[1] for r in pcap_records(tmp_path / "edge.pcap")[1]] == [a_frame] * 80
    assert [r[1] for r in pcap_records(tmp_path / "edge_00001.pcap")[1]] == [b_frame] * 80


def test_rotation_continues_numbering_after_a_restart_and_keep_counts_the_files_on_disk(tmp_path):
    cfg = {"capture": {"path": str(tmp_path / "ring.pcap"), "rotate_bytes": 4096, "keep": 3, "linktype": "raw"}}
    m = make(cfg)
    for t in range(200):  # 344-byte records, 11 per file: 19 files, the newest three kept
        run(m, [udp(payload=bytes(300))], now=float(t))
    m.close()
    assert names(tmp_path) == ["ring_00017.pcap", "ring_00018.pcap", "ring_00019.pcap"]
    m = make(cfg)  # restarted: on from the highest number on disk, and keep still means three files
    for t in range(30):
        run(m, [udp(sport=7, payload=bytes(300))], now=1000.0 + t)
    m.close()
    assert names(tmp_path) == ["ring_00020.pcap", "ring_00021.pcap", "ring_00022.pcap"]
    newest = pcap_records(tmp_path / "ring_00022.pcap")[1]
    assert newest and newest[-1][0] == pytest.approx(1_700_001_029.0)  # the newest traffic in the highest number


def test_keep_without_rotation_prunes_old_runs_but_never_a_file_a_live_writer_holds(tmp_path):
    cfg = {"capture": {"path": str(tmp_path / "edge.pcap"), "keep": 1, "linktype": "raw"}}
    a = make(cfg)
    run(a, [udp()], now=1.0)
    b = make(cfg)  # edge.pcap is older, beyond keep, but `a` still writes it: left alone
    assert names(tmp_path) == ["edge.pcap", "edge_00001.pcap"]
    a.close()
    b.close()
    assert len(pcap_records(tmp_path / "edge.pcap")[1]) == 1
    c = make(cfg)  # now nobody holds the two older files: only c's own stays
    assert names(tmp_path) == ["edge_00002.pcap"]
    c.close()


def test_capture_files_are_private_and_a_planted_symlink_is_never_followed(tmp_path):
    victim = tmp_path / "victim.conf"
    victim.write_text("IMPORTANT\n")
    d = tmp_path / "caps"
    d.mkdir()
    (d / "edge.pcap").symlink_to(victim)
    (d / "ring_00001.pcap").symlink_to(victim)
    m = make({"capture": {"path": str(d / "edge.pcap"), "linktype": "raw"}})
    r = make({"capture": {"path": str(d / "ring.pcap"), "linktype": "raw", "rotate_bytes": 4096, "keep": 1}})
    for t in range(40):
        run(m, [udp(payload=bytes(300))], now=float(t))
        run(r, [udp(payload=bytes(300))], now=float(t))
    m.close()
    r.close()
    assert victim.read_text() == "IMPORTANT\n"
    assert (d / "edge.pcap").is_symlink() and (d / "ring_00001.pcap").is_symlink()  # not pruned either
    written = [p for p in d.iterdir() if not p.is_symlink()]
    assert {p.name for p in written} == {"edge_00001.pcap", "ring_00005.pcap"}
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in written)  # full payloads: like dumpcap's


def test_a_capture_path_that_is_a_directory_is_refused(tmp_path):
    with pytest.raises(FunctionConfigError, match=r"cannot open capture file .*Is a directory"):
        make({"capture": {"path": str(tmp_path)}})
    assert names(tmp_path) == []


def _run_with_file_size_limit(tmp_path, limit: int, body: str) -> dict:
    """Run `body` in a child whose files cannot grow beyond `limit` bytes (RLIMIT_FSIZE: a write
    past it fails with EFBIG after a short write, as on a full disk); it prints one JSON line."""
    code = textwrap.dedent("""
        import json, resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of the signal
        sys.path[:0] = {paths!r}
        from shmfabric.functions.api import FunctionContext, validate_config
        from shmfabric.functions.builtin.monitor import Monitor
        from shmfabric.net import build
        def udp(sport=1000, payload=b"hello"):
            return build.ipv4(build.udp(sport, 53, payload, src="10.0.0.1", dst="10.0.0.2"),
                              src="10.0.0.1", dst="10.0.0.2", proto=17)
        log = []
        def make(cfg):
            m = Monitor(validate_config(Monitor, cfg), FunctionContext(node="mon", log=lambda e, f: log.append(e)))
            m.epoch_offset = 1_700_000_000.0
            return m
        def run(m, frames, now):
            m.process(frames, now, bytearray(len(frames)))
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
    """).format(paths=[p for p in sys.path if p], limit=limit) + textwrap.dedent(body)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(60)
def test_disk_full_leaves_whole_records_and_true_counters(tmp_path):
    out = _run_with_file_size_limit(tmp_path, 10_000, f"""
        m = make({{"capture": {{"path": {str(tmp_path / "full.pcap")!r}, "linktype": "raw"}}}})
        for t in range(40):  # 3 records of 1,021 bytes per batch, each batch flushed: the 4th is cut short
            run(m, [udp(payload=bytes(977))] * 3, now=float(t))
            m.on_timer(float(t))
        c = m.counters()
        m.close()
        print(json.dumps({{"captured": c["captured"], "bytes": c["capture_bytes"], "errors": c["capture_errors"],
                          "stopped": m.capture is None, "log": log}}))
    """)
    lt, recs = pcap_records(tmp_path / "full.pcap")  # asserts the file ends on a whole record
    assert out["errors"] == 1 and out["stopped"] and "capture_error" in out["log"]
    assert out["captured"] == len(recs) == 9
    assert out["bytes"] == (tmp_path / "full.pcap").stat().st_size - 24
    if TSHARK:
        assert len(tshark(tmp_path / "full.pcap")) == len(recs)


@pytest.mark.timeout(60)
def test_a_failed_flush_closes_the_file_and_a_failed_close_still_writes_the_report(tmp_path):
    out = _run_with_file_size_limit(tmp_path, 2_000, f"""
        import os
        def open_fds(name):
            n = 0
            for fd in os.listdir("/proc/self/fd"):
                try:
                    n += os.readlink("/proc/self/fd/" + fd).endswith(name)
                except OSError:  # the directory listing's own descriptor, closed by now
                    pass
            return n
        m = make({{"capture": {{"path": "a.pcap", "linktype": "raw"}}}})
        run(m, [udp()] * 20, now=1.0)  # 20 records of 49 bytes: flushed
        m.on_timer(1.0)
        run(m, [udp()] * 100, now=2.0)  # 100 more: past the limit at the flush
        m.on_timer(2.0)
        after_flush = open_fds("a.pcap")
        b = make({{"capture": {{"path": "b.pcap", "linktype": "raw"}}, "report": "mon.json"}})
        run(b, [udp()] * 20, now=1.0)
        b.on_timer(1.0)
        run(b, [udp()] * 100, now=2.0)
        b.close()  # the capture cannot be flushed: the final report is written anyway
        print(json.dumps({{"open_after_failed_flush": after_flush, "a_captured": m.counters()["captured"],
                          "b_captured": b.counters()["captured"]}}))
    """)
    assert out["open_after_failed_flush"] == 0
    assert out["a_captured"] == len(pcap_records(tmp_path / "a.pcap")[1]) == 20  # what the last flush wrote
    report = json.loads((tmp_path / "mon.json").read_text())
    assert report["counters"]["capture_errors"] == 1 and report["counters"]["packets"] == 120
    assert report["counters"]["captured"] == out["b_captured"] == len(pcap_records(tmp_path / "b.pcap")[1]) == 20


@pytest.mark.timeout(60)
def test_a_report_that_cannot_be_written_leaves_no_temporary_file(tmp_path):
    out = _run_with_file_size_limit(tmp_path, 4_096, """
        m = make({"report": "mon.json", "report_flows": 1000})
        run(m, [udp(sport=1)], now=1.0)
        m.on_timer(1.0)  # small: written
        run(m, [udp(sport=i) for i in range(500)], now=2.0)
        m.write_report("mon.json", 2.0)  # too big for the limit
        print(json.dumps({"reports": m.counters()["reports"], "log": log}))
    """)
    assert out["reports"] == 1 and out["log"] == ["report_error"]
    assert names(tmp_path) == ["mon.json"]  # the old report stays, whole; no temporary file is left
    assert json.loads((tmp_path / "mon.json").read_text())["counters"]["packets"] == 1


def test_the_report_is_private_and_replaces_a_planted_symlink_without_following_it(tmp_path):
    victim = tmp_path / "victim.conf"
    victim.write_text("IMPORTANT\n")
    rep = tmp_path / "mon.json"
    rep.symlink_to(victim)
    m = make({"report": str(rep)})
    run(m, [udp()], now=1.0)
    m.on_timer(1.0)
    assert victim.read_text() == "IMPORTANT\n" and not rep.is_symlink()
    assert json.loads(rep.read_text())["counters"]["packets"] == 1
    assert stat.S_IMODE(rep.stat().st_mode) == 0o600
    assert names(tmp_path) == ["mon.json", "victim.conf"]


def test_reconfigure_with_the_same_capture_restarts_a_capture_stopped_by_an_error(tmp_path):
    cfg = {"capture": {"path": str(tmp_path / "c.pcap"), "linktype": "raw"}}
    m = make(cfg)

    class Full:  # the disk filled up: every write fails
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            pass

    m.capture.writer.f = Full()
    run(m, [udp()], now=1.0)
    assert m.capture is None and m.counters()["capture_errors"] == 1
    m.reconfigure(validate_config(Monitor, cfg))  # space was freed; the operator pushes the same config
    run(m, [udp()] * 2, now=2.0)
    m.close()
    assert len(pcap_records(tmp_path / "c_00001.pcap")[1]) == 2 and m.counters()["captured"] == 2


def test_an_idle_flow_is_never_revived_with_its_old_counters():
    m = make({"flow_timeout": 10})
    run(m, [udp()] * 3, now=0.0)
    run(m, [udp()], now=10.0)  # idle exactly flow_timeout: still the same flow
    run(m, [udp(payload=b"x" * 100)], now=25.0)  # idle 15 s, not swept yet: a new flow
    (f,) = m.flows()
    assert (f["packets"], f["bytes"], f["first_seen"]) == (1, 128, 1_700_000_025.0)
    assert m.counters()["flows_expired"] == 1
    m.on_timer(25.0)  # the sweep does not count it again
    assert m.counters()["flows_expired"] == 1 and m.counters()["flows"] == 1


def test_flows_n_does_not_sort_the_whole_table(monkeypatch):
    m = make({"max_flows": 5000})
    run(m, [udp(sport=i, payload=bytes(i % 97)) for i in range(3000)], now=1.0)
    want = sorted(m.flows(), key=lambda f: -f["bytes"])[:5]
    sizes = []
    real_sorted = sorted

    def counting_sorted(it, **kw):
        items = list(it)
        sizes.append(len(items))
        return real_sorted(items, **kw)

    monkeypatch.setattr(monitor_mod, "sorted", counting_sorted, raising=False)  # the module's, not builtins'
    assert m.flows(5) == want
    assert max(sizes, default=0) <= 5


def test_report_path_with_a_tilde_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = validate_config(Monitor, {"report": "~/mon.json"})
    assert cfg.report == str(tmp_path / "mon.json")


@pytest.mark.parametrize("cfg, msg", [
    ({"report": "/tmp"}, r"config.report: report '/tmp' is a directory; name a file in it, e.g. '/tmp/monitor.json'"),
    ({"capture": {"path": "/tmp/x.pcap", "match": {"src": "10.0.0.1/8"}}},
     r"config.capture.match.src: src '10.0.0.1/8' has host bits set; use 10.0.0.0/8, or 10.0.0.1/32 for one host"),
    ({"capture": {"path": "/tmp/x.pcap", "match": {"dst": ["fd00::/64", "fd00::1/64"]}}},
     r"config.capture.match.dst: dst 'fd00::1/64' has host bits set; use fd00::/64, or fd00::1/128 for one host"),
])
def test_more_config_errors_name_the_field(cfg, msg):
    with pytest.raises(FunctionConfigError, match=msg):
        validate_config(Monitor, cfg)


def test_default_snaplen_keeps_the_largest_ip_packet_whole(tmp_path):
    big = udp(payload=bytes(65535 - 28))  # a 65,535-byte IPv4 packet, + 14 bytes of Ethernet header
    m = make({"capture": {"path": str(tmp_path / "big.pcap")}})
    run(m, [big], now=1.0)
    m.close()
    _, recs = pcap_records(tmp_path / "big.pcap")
    assert len(recs[0][1]) == recs[0][2] == 65535 + 14 and recs[0][1][14:] == big


def test_ethernet_header_takes_the_frames_own_ethertype():
    class Frame(bytes):
        ethertype = 0x0806  # what the fabric says it is, though it starts like IPv4

    assert monitor_mod.ethernet_header(Frame(udp()))[12:14] == b"\x08\x06"
    assert monitor_mod.ethernet_header(udp())[12:14] == b"\x08\x00"  # no attribute: by the IP version
    assert monitor_mod.ethernet_header(udp6())[12:14] == b"\x86\xdd"
