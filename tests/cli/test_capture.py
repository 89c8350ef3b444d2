"""`shmfabric capture`: a tap on a running node, written as pcap that tshark reads."""
from __future__ import annotations

import json
import signal
import struct
import subprocess
import sys
import time
import uuid

import pytest

from shmfabric import programs
from shmfabric.fabric import Fabric


def sf(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shmfabric", *args], capture_output=True, text=True, timeout=timeout)


def pcap_records(path) -> list[bytes]:
    data = path.read_bytes()
    magic, _, _, _, _, _, linktype = struct.unpack_from("<IHHiIII", data)
    assert magic == 0xA1B2C3D4
    out, off = [], 24
    while off < len(data):
        _, _, incl, orig = struct.unpack_from("<IIII", data, off)
        out.append(data[off + 16: off + 16 + incl])
        off += 16 + incl
    return out


@pytest.fixture
def chain_procs(tmp_path):
    """A fabric with gen -> sink (2000 frames/s); yields (fabric, {node name: process})."""
    name = f"cap-{uuid.uuid4().hex[:8]}"
    fab = Fabric.create(name)
    run = [sys.executable, "-m", "shmfabric.functions.run", "--fabric", name]
    procs = {"sink": subprocess.Popen(run + ["--node", "sink", "--function", "sink"], stderr=subprocess.DEVNULL)}
    procs["gen"] = subprocess.Popen(run + ["--node", "gen", "--function", "generator", "--next", "sink", "--config",
                                           json.dumps({"rate": 2000, "size": 128, "flows": 4})],
                                    stderr=subprocess.DEVNULL)
    end = time.monotonic() + 20
    while fab.node_id("gen") is None or fab.node_id("sink") is None:
        assert time.monotonic() < end, "chain did not start"
        time.sleep(0.05)
    yield fab, procs
    for p in procs.values():
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs.values():
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    fab.close()
    Fabric.destroy(name)


@pytest.fixture
def chain(chain_procs):
    return chain_procs[0]


def test_capture_writes_what_the_node_receives(chain, tmp_path):
    out = tmp_path / "sink.pcap"
    r = sf("capture", "sink", "-w", str(out), "--fabric", chain.name, "--count", "100", "--seconds", "30", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["captured"] == 100
    recs = pcap_records(out)
    assert len(recs) == 100
    for rec in recs:
        assert rec[12:14] == b"\x08\x00"  # Ethernet header, IPv4
        assert rec[14] == 0x45 and len(rec) == 14 + 114  # the generator's 128-byte frames
    # the tap is off again: the node's mirror counter stops moving
    before = [n for n in chain.nodes() if n["name"] == "sink"][0]["rx_frames"]
    assert before > 100
    if programs.find("tshark"):
        t = subprocess.run(["tshark", "-r", str(out), "-T", "fields", "-e", "ip.proto"], capture_output=True,
                           text=True, timeout=60)
        assert t.returncode == 0, t.stderr
        assert t.stdout.split() == ["17"] * 100


def test_capture_raw_linktype_of_a_source(chain, tmp_path):
    out = tmp_path / "gen.pcap"
    r = sf("capture", "gen", "-w", str(out), "--fabric", chain.name, "--count", "20", "--linktype", "raw",
           "--seconds", "30")
    assert r.returncode == 0, r.stderr
    assert "captured 20 frames of node gen" in r.stdout
    recs = pcap_records(out)
    assert len(recs) == 20 and all(rec[0] == 0x45 for rec in recs)


def test_capture_errors_are_one_line(chain, tmp_path):
    r = sf("capture", "nosuch", "-w", str(tmp_path / "x.pcap"), "--fabric", chain.name, "--count", "1")
    assert r.returncode == 2 and "no node named 'nosuch'" in r.stderr and "Traceback" not in r.stderr
    # the nodes that are attached, to choose from (not the capture's own node)
    assert f"attached to fabric {chain.name!r}; attached: gen, sink" in r.stderr, r.stderr
    assert "capture-" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = sf("capture", "sink", "-w", str(tmp_path / "x.pcap"), "--fabric", chain.name)
    assert r.returncode == 2 and "--count" in r.stderr
    r = sf("capture", "sink", "-w", str(tmp_path / "x.pcap"), "--fabric", "no-such-fabric", "--count", "1")
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_capture_refuses_counts_and_times_that_are_not_positive(tmp_path):
    out = tmp_path / "x.pcap"
    for args, needles in ((["-c", "-3"], ("--count -3", "1 or more")),
                          (["-c", "0"], ("--count 0", "1 or more")),
                          (["--seconds", "-1"], ("--seconds -1", "above 0")),
                          (["--seconds", "0"], ("--seconds 0", "above 0")),
                          (["-c", "1", "--snaplen", "0"], ("--snaplen 0", "64 to 262144"))):
        # refused before the fabric is even opened: the fabric named here does not exist
        r = sf("capture", "sink", "-w", str(out), "--fabric", "no-such-fabric", *args)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and all(n in r.stderr for n in needles), r.stderr
    assert not out.exists()


def test_capture_with_no_fabric_named_says_the_default_and_how_to_name_one(tmp_path, monkeypatch, capsys):
    from shmfabric.cli import capture
    from shmfabric.cli.main import main

    missing = f"cap-{uuid.uuid4().hex[:8]}"  # stands in for the default, so an `edge` running here cannot interfere
    monkeypatch.setattr(capture, "DEFAULT_FABRIC", missing)
    assert main(["capture", "fw", "-w", str(tmp_path / "x.pcap"), "-c", "1"]) == 2
    err = capsys.readouterr().err
    assert f"no fabric {missing!r} (the default); give --fabric NAME, or start one: shmfabric up / " \
           f"shmfabric create {missing}" in err, err
    assert not (tmp_path / "x.pcap").exists()


def test_capture_of_a_fabric_with_no_node_says_none_is_attached(tmp_path):
    name = f"cap-{uuid.uuid4().hex[:8]}"
    Fabric.create(name).close()
    try:
        r = sf("capture", "fw", "-w", str(tmp_path / "x.pcap"), "--fabric", name, "-c", "1")
    finally:
        Fabric.destroy(name)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"no node named 'fw' is attached to fabric {name!r}, and no other node is" in r.stderr, r.stderr
    assert "shmfabric up" in r.stderr


# --- several taps, a node that goes away, frames as they were, per-capture figures, stdout ------------

def start_capture(*args: str, stdout=subprocess.PIPE) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "shmfabric", "capture", *args], stdout=stdout,
                            stderr=subprocess.PIPE)


def wait_recording(path, timeout: float = 20) -> None:
    """Until the capture writing `path` has written frames (its tap is on)."""
    end = time.monotonic() + timeout
    while not (path.exists() and path.stat().st_size > 24):
        assert time.monotonic() < end, f"{path} got no frames"
        time.sleep(0.05)


def finish(p: subprocess.Popen, timeout: float = 15) -> tuple[int, str, str]:
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        raise AssertionError(f"the capture did not end within {timeout} s") from None
    return p.returncode, out.decode(errors="replace"), err.decode(errors="replace")


def pcap_times(path) -> list[float]:
    data = path.read_bytes()
    out, off = [], 24
    while off < len(data):
        sec, usec, incl, _ = struct.unpack_from("<IIII", data, off)
        out.append(sec + usec / 1e6)
        off += 16 + incl
    return out


def test_two_captures_of_one_node_each_get_every_frame(chain, tmp_path):
    # the node served one tap: a second capture replaced the first, and its end switched tapping
    # off, so the first got nothing more (and with only --count never ended)
    a_path, b_path = tmp_path / "a.pcap", tmp_path / "b.pcap"
    a = start_capture("sink", "-w", str(a_path), "--fabric", chain.name, "--seconds", "5", "--json")
    try:
        wait_recording(a_path)
        r = sf("capture", "sink", "-w", str(b_path), "--fabric", chain.name, "--count", "200", "--seconds", "20",
               "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["captured"] == 200
        b_done = time.time()
        rc, out, err = finish(a, 20)
    finally:
        if a.poll() is None:
            a.kill()
            a.wait()
    assert rc == 0, err
    res = json.loads(out)
    times = pcap_times(a_path)
    assert res["captured"] == len(times) > 0
    assert max(times) > b_done + 1.0, "the first capture got nothing after the second ended"
    assert res["mirror_dropped"] == 0 and res["mirrored"] >= res["captured"]


def test_a_capture_whose_tap_is_switched_off_ends_with_an_error(chain, tmp_path):
    from shmfabric.functions.control import ControlClient

    path = tmp_path / "x.pcap"
    p = start_capture("sink", "-w", str(path), "--fabric", chain.name, "--count", "100000000")
    ctl = ControlClient(chain, f"t-{uuid.uuid4().hex[:6]}")
    try:
        wait_recording(path)
        assert ctl.request("sink", {"op": "mirror", "to": None})["ok"]  # every tap off
        rc, out, err = finish(p, 15)
    finally:
        ctl.close()
        if p.poll() is None:
            p.kill()
            p.wait()
    assert rc == 1 and "Traceback" not in err, err
    assert "the tap on node 'sink' was switched off" in err, err
    assert len(pcap_records(path)) > 0


def test_a_capture_ends_with_an_error_when_the_tapped_node_dies(chain_procs, tmp_path):
    # kill -9: with --count the capture hung for ever; with --seconds it ended 0 with the
    # counters of whichever process had the name by then, saying nothing
    fab, procs = chain_procs
    by_count, by_time = tmp_path / "c.pcap", tmp_path / "s.pcap"
    pc = start_capture("sink", "-w", str(by_count), "--fabric", fab.name, "--count", "100000000")
    ps = start_capture("sink", "-w", str(by_time), "--fabric", fab.name, "--seconds", "60", "--json")
    try:
        wait_recording(by_count)
        wait_recording(by_time)
        procs["sink"].kill()
        procs["sink"].wait()
        results = [finish(pc, 15), finish(ps, 15)]  # the 15 s bounds only a broken build
    finally:
        for p in (pc, ps):
            if p.poll() is None:
                p.kill()
                p.wait()
    for rc, out, err in results:
        assert rc == 1 and "Traceback" not in err, err
        assert "node 'sink' went away" in err and "run the capture again" in err, err
    assert json.loads(results[1][1])["ended"] == "node_gone"
    for path in (by_count, by_time):
        recs = pcap_records(path)  # complete records: a valid pcap
        assert recs and sum(16 + len(r) for r in recs) + 24 == path.stat().st_size


def test_a_restarted_node_is_told_apart_from_the_one_tapped(tmp_path):
    from shmfabric.cli.capture import _node_gone

    name = f"cap-{uuid.uuid4().hex[:8]}"
    fab = Fabric.create(name)
    try:
        n = fab.attach("fw")
        ref = fab.node_ref("fw")
        assert _node_gone(fab, "fw", ref) is None
        n.detach()
        assert "went away" in _node_gone(fab, "fw", ref)
        fab.attach("fw")  # the same name again: a new incarnation
        assert "was restarted" in _node_gone(fab, "fw", ref)
    finally:
        fab.close()
        Fabric.destroy(name)


def test_each_capture_reports_its_own_figures(chain, tmp_path):
    # they were the node's totals since it started, earlier captures' included
    r = sf("capture", "sink", "-w", str(tmp_path / "1.pcap"), "--fabric", chain.name, "--count", "600", "--json")
    assert r.returncode == 0, r.stderr
    r = sf("capture", "sink", "-w", str(tmp_path / "2.pcap"), "--fabric", chain.name, "--count", "300", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["captured"] == 300 and 300 <= res["mirrored"] < 600 and res["mirror_dropped"] == 0, res


@pytest.fixture
def lone_sink():
    """A fabric with one sink node and a node `sender` of the test's; yields (fabric, sender, sink id)."""
    name = f"cap-{uuid.uuid4().hex[:8]}"
    fab = Fabric.create(name)
    p = subprocess.Popen([sys.executable, "-m", "shmfabric.functions.run", "--fabric", name, "--node", "snk",
                          "--function", "sink"], stderr=subprocess.DEVNULL)
    me = fab.attach("sender")
    try:
        yield fab, me, me.wait_for_peer("snk", timeout=20)
    finally:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        me.detach()
        fab.close()
        Fabric.destroy(name)


def wait_tap_node(fab, p: subprocess.Popen, timeout: float = 20) -> None:
    end = time.monotonic() + timeout
    while fab.node_id(f"capture-{p.pid}") is None:
        assert time.monotonic() < end and p.poll() is None, "the capture did not attach"
        time.sleep(0.05)
    time.sleep(1.0)  # its `mirror` request


@pytest.mark.skipif(not programs.find("tshark"), reason=programs.not_found("tshark"))
def test_each_frame_keeps_its_own_ethernet_header(lone_sink, tmp_path):
    # the tap sent every copy as IPv4 (0x0800) from the tapped node to the capture's, and the
    # writer guessed the type from the first nibble: ARP and a 0x88B5 frame starting 0x45 were bogus IPv4
    from shmfabric.net import build as B

    fab, me, snk = lone_sink
    path = tmp_path / "t.pcap"
    p = start_capture("snk", "-w", str(path), "--fabric", fab.name, "--count", "8", "--seconds", "30")
    arp = B.arp(1, "02:00:00:00:00:01", "10.0.0.1", tpa="10.0.0.2")
    v6 = B.ipv6(B.udp(1, 2, b"x", src="fd00::1", dst="fd00::2"), src="fd00::1", dst="fd00::2", next_header=17)
    v4 = B.ipv4(B.udp(1, 2, b"y", src="10.0.0.1", dst="10.0.0.2"), src="10.0.0.1", dst="10.0.0.2", proto=17)
    notip = b"\x45" + b"fabric-app-message-not-ip"
    try:
        wait_tap_node(fab, p)
        end = time.monotonic() + 20
        while p.poll() is None and time.monotonic() < end:
            for data, et in ((arp, 0x0806), (v6, 0x86DD), (v4, 0x0800), (notip, 0x88B5)):
                assert me.send(snk, data, ethertype=et)
            time.sleep(0.1)
        rc, out, err = finish(p, 15)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert rc == 0, err
    t = subprocess.run(["tshark", "-r", str(path), "-T", "fields", "-E", "separator=,", "-e", "eth.type",
                        "-e", "frame.protocols", "-e", "eth.src", "-e", "eth.dst"],
                       capture_output=True, text=True, timeout=60)
    assert t.returncode == 0, t.stderr
    rows = {tuple(line.split(",")) for line in t.stdout.split()}
    me_mac, snk_mac = ":".join(f"{b:02x}" for b in me.mac), "02:73:66:00:00:%02x" % snk
    assert rows == {("0x0806", "eth:ethertype:arp", me_mac, snk_mac),
                    ("0x86dd", "eth:ethertype:ipv6:udp:data", me_mac, snk_mac),
                    ("0x0800", "eth:ethertype:ip:udp:data", me_mac, snk_mac),
                    ("0x88b5", "eth:ethertype:data", me_mac, snk_mac)}, t.stdout


def test_frames_are_stamped_when_the_tap_copied_them(lone_sink, tmp_path):
    # they were stamped when the capture received them, a batch at a time: a capture that fell
    # behind (here: stopped for a while) gave a backlog one time
    fab, me, snk = lone_sink
    path = tmp_path / "ts.pcap"
    p = start_capture("snk", "-w", str(path), "--fabric", fab.name, "--count", "10", "--seconds", "30")
    try:
        wait_tap_node(fab, p)
        p.send_signal(signal.SIGSTOP)
        sent = []
        for i in range(10):
            sent.append(time.time())
            assert me.send(snk, bytes([0x45]) + bytes(40), ethertype=0x0800)
            time.sleep(0.1)
        resumed = time.time()
        p.send_signal(signal.SIGCONT)
        rc, out, err = finish(p, 15)
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGCONT)
            p.kill()
            p.wait()
    assert rc == 0, err
    times = pcap_times(path)
    assert len(times) == 10
    # Stamped as the sink copied them, while the capture was stopped: spread over the ~0.9 s
    # they were sent in, in order, the first before the capture resumed (stamped on receipt,
    # all ten came later and alike). No bound on the sink's own delay is asserted.
    assert times == sorted(times) and times[0] >= sent[0] - 0.01, [round(t - s, 3) for t, s in zip(times, sent)]
    assert times[0] < resumed and times[-1] - times[0] > 0.45, (resumed, times)


def test_capture_to_stdout_and_a_summary_on_sigint(chain, tmp_path):
    r = subprocess.run([sys.executable, "-m", "shmfabric", "capture", "sink", "-w", "-", "--fabric", chain.name,
                        "--count", "30"], capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "stdout.pcap"
    out.write_bytes(r.stdout)
    assert len(pcap_records(out)) == 30
    assert b"captured 30 frames of node sink to stdout" in r.stderr
    # Ctrl-C: the summary, exit 0, and a pcap of whole records (as tcpdump)
    path = tmp_path / "int.pcap"
    p = start_capture("sink", "-w", str(path), "--fabric", chain.name, "--count", "100000000")
    try:
        wait_recording(path)
        time.sleep(0.5)
        p.send_signal(signal.SIGINT)
        rc, out_text, err = finish(p, 15)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert rc == 0 and "Traceback" not in err, err
    n = len(pcap_records(path))
    assert n > 0 and sum(16 + len(x) for x in pcap_records(path)) + 24 == path.stat().st_size
    assert f"captured {n:,} frames of node sink to {path} (0 dropped by the tap while it was on)" in out_text, out_text


def test_a_write_error_is_one_line(chain):
    r = sf("capture", "sink", "-w", "/dev/full", "--fabric", chain.name, "--count", "5000", "--seconds", "10")
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "cannot write /dev/full: No space left on device" in r.stderr
