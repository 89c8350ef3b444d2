"""`shmfabric capture`: a tap on a running node, written as pcap that tshark reads."""
from __future__ import annotations

import json
import shutil
import signal
import struct
import subprocess
import sys
import time
import uuid

import pytest

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
def chain(tmp_path):
    name = f"cap-{uuid.uuid4().hex[:8]}"
    fab = Fabric.create(name)
    run = [sys.executable, "-m", "shmfabric.functions.run", "--fabric", name]
    procs = [subprocess.Popen(run + ["--node", "sink", "--function", "sink"], stderr=subprocess.DEVNULL)]
    procs.append(subprocess.Popen(run + ["--node", "gen", "--function", "generator", "--next", "sink", "--config",
                                         json.dumps({"rate": 2000, "size": 128, "flows": 4})],
                                  stderr=subprocess.DEVNULL))
    end = time.monotonic() + 20
    while fab.node_id("gen") is None or fab.node_id("sink") is None:
        assert time.monotonic() < end, "chain did not start"
        time.sleep(0.05)
    yield fab
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
    fab.close()
    Fabric.destroy(name)


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
    if shutil.which("tshark"):
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
