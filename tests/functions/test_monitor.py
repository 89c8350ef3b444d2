"""`monitor` on crafted packets: per-flow counters, top talkers (Space-Saving bounds), pcap files
that our reader and tshark open (both link types, rotation, filter), report file, malformed frames;
and one chain with real processes whose capture tshark reads after a graceful stop."""
from __future__ import annotations

import json
import random
import struct
import subprocess
from collections import Counter

import pytest

from shmfabric import programs
from shmfabric.functions.api import FunctionConfigError, FunctionContext, NetworkFunction, validate_config
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
