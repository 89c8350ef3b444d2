"""The memif port against DPDK's own memif driver: dpdk-testpmd as the peer, in both roles.

Frames cross intact both ways (chained buffers included), every frame the peer sends is
accounted for, a slow peer loses nothing from the fabric, a peer killed mid-stream leaves the
port serving the next one, and a wrong secret is refused with its reason.
"""
from __future__ import annotations

import json
import os
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import pytest

from shmfabric.adapters.ethernet import format_mac
from shmfabric.adapters.memif import MemifBridge, MemifConfig
from shmfabric.bench.testpmd import Testpmd, testpmd_available
from shmfabric.fabric import Fabric

_why = testpmd_available()
pytestmark = pytest.mark.skipif(_why is not None, reason=f"needs DPDK's testpmd: {_why}")

ETHERTYPE = 0x88B5  # local experimental


def _wait(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture
def workdir():
    d = tempfile.mkdtemp(prefix="mtp", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def fab():
    f = Fabric.create(f"mtp{uuid.uuid4().hex[:8]}", ephemeral=True, networks=[{"mtu": 9000, "slots": 2048}])
    yield f
    f.close()


class Port:
    """A MemifBridge running in a thread of the test, with its log lines."""

    def __init__(self, fab: Fabric, config: MemifConfig, name: str = "mem"):
        self.node = fab.attach(name)
        self.lines: list[str] = []
        self.bridge = MemifBridge(self.node, config, log=self.lines.append)
        self._stop = False
        if config.role == "server":
            self.bridge.listen()
        self.thread = threading.Thread(target=self.bridge.run, args=(lambda: self._stop,), daemon=True)
        self.thread.start()

    @property
    def mac(self) -> str:
        return format_mac(self.node.mac)

    def close(self) -> None:
        self._stop = True
        self.thread.join(10)
        assert not self.thread.is_alive(), "the port did not stop"
        self.node.detach()


@pytest.fixture
def ports():
    made: list[Port] = []
    yield made
    for p in made:
        p.close()


def _peer_role(role: str) -> str:
    return "client" if role == "server" else "server"


def _round_trip(sender, port: Port, payloads: list[bytes], window: int = 24, timeout: float = 10.0) -> dict[int, tuple]:
    """Send payloads (each starting with its 4-byte index) to the port's MAC, `window` at a time
    (under the port's fair share of the pool), and collect what comes back, by index."""
    got: dict[int, tuple] = {}
    for start in range(0, len(payloads), window):
        chunk = payloads[start:start + window]
        assert sender.send_batch(port.node.id, chunk, ethertype=ETHERTYPE) == len(chunk)
        deadline = time.monotonic() + timeout
        while len(got) < start + len(chunk) and time.monotonic() < deadline:
            with sender.recv_batch(64, 0.2) as b:
                for f in b:
                    data = f.tobytes()
                    got[int.from_bytes(data[:4], "big")] = (data, f.dst, f.src_mac, f.ethertype)
    return got


@pytest.mark.parametrize("role", ["server", "client"])
def test_frames_cross_intact_both_ways_chained_buffers_included(role, fab, ports, workdir):
    sock = os.path.join(workdir, "m.sock")
    port = Port(fab, MemifConfig(sock, role=role))
    ports.append(port)
    sender = fab.attach("ping")
    try:
        with Testpmd(sock, role=_peer_role(role), mode="macswap", memif_args={"mac": port.mac}) as tp:
            tp.wait_link()
            tp.start_forwarding()
            _wait(lambda: port.bridge.link_up, 10, "the port's link")
            rnd = random.Random(7)
            sizes = [46, 60, 1000, 1486, 2034, 2035, 2100, 4000, 6000, 8986]  # 2034 B + 14 = one 2048 B buffer
            payloads = [i.to_bytes(4, "big") + rnd.randbytes(sizes[i % len(sizes)] - 4) for i in range(120)]
            got = _round_trip(sender, port, payloads)
            stats = tp.stop_forwarding()
        assert sorted(got) == list(range(len(payloads))), (f"missing {set(range(len(payloads))) - set(got)}", stats, port.bridge.counters, port.lines)
        for i, p in enumerate(payloads):
            data, dst, src, et = got[i]
            assert data == p, f"frame {i} ({len(p)} B) changed"
            assert (dst, src, et) == (sender.mac, port.node.mac, ETHERTYPE)  # macswap swapped them
        assert stats["rx_packets"] == stats["tx_packets"] == len(payloads)
        c = port.bridge.counters
        assert c["to_device"] == c["from_device"] == c["to_fabric"] == len(payloads)
    finally:
        sender.detach()


def test_every_frame_the_peer_sends_is_accounted_for(fab, ports, workdir):
    """testpmd sends as fast as it can: the port takes every frame off the memif ring (the
    ring's backpressure, not a drop, slows testpmd down) and each is delivered or counted."""
    sock = os.path.join(workdir, "m.sock")
    port = Port(fab, MemifConfig(sock))
    ports.append(port)
    sink = fab.attach("sink")
    received = 0
    done = False

    def drain():
        nonlocal received
        while not done:
            with sink.recv_batch(256, 0.1) as b:
                received += len(b)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        with Testpmd(sock, role="client", mode="txonly", txpkts=64, eth_peer=format_mac(sink.mac),
                     memif_args={"mac": port.mac}) as tp:
            tp.wait_link()
            tp.start_forwarding()
            _wait(lambda: port.bridge.counters.get("to_fabric", 0) > 20000, 20, "20,000 frames in the fabric")
            stats = tp.stop_forwarding()
            sent = tp.port_stats()["tx_packets"]
        _wait(lambda: port.bridge.counters.get("from_device", 0) >= sent, 10, "the port to read the ring empty")
        time.sleep(0.3)
    finally:
        done = True
        reader.join(5)
        sink.detach()
    c = port.bridge.counters
    assert stats["tx_packets"] == sent > 0
    assert c["from_device"] == sent, c  # nothing left behind or lost on the memif side
    drops = sum(v for k, v in c.items() if k.startswith("drop_"))
    assert c["to_fabric"] + drops == sent, c
    assert received == c["to_fabric"], (received, c)


def test_a_slow_peer_loses_nothing_from_the_fabric(fab, ports, workdir):
    """The port takes from the fabric only what the peer's ring has room for: 30,000 frames
    sent as fast as the node can reach testpmd, every one."""
    sock = os.path.join(workdir, "m.sock")
    port = Port(fab, MemifConfig(sock))
    ports.append(port)
    src = fab.attach("src")
    n = 30000
    try:
        with Testpmd(sock, role="client", mode="rxonly") as tp:
            tp.wait_link()
            tp.start_forwarding()
            _wait(lambda: port.bridge.link_up, 10, "the port's link")
            frame = bytes(60)
            sent = 0
            deadline = time.monotonic() + 60
            while sent < n and time.monotonic() < deadline:
                k = src.send_batch(port.node.id, [frame] * min(64, n - sent), ethertype=ETHERTYPE)
                sent += k
                if not k:
                    time.sleep(0.0005)  # the port's ring is full: it waits for the peer, so do we
            assert sent == n
            _wait(lambda: tp.port_stats()["rx_packets"] >= n, 30, f"testpmd to count {n} frames")
            rx = tp.port_stats()["rx_packets"]
        assert rx == n
        assert port.bridge.counters["to_device"] == n
        assert not any(k.startswith("drop_") for k in port.bridge.counters), port.bridge.counters
    finally:
        src.detach()


@pytest.mark.parametrize("role", ["server", "client"])
def test_a_peer_killed_mid_stream_leaves_the_port_serving_the_next(role, fab, ports, workdir):
    sock = os.path.join(workdir, "m.sock")
    port = Port(fab, MemifConfig(sock, role=role))
    ports.append(port)
    sink = fab.attach("sink")
    try:
        first = Testpmd(sock, role=_peer_role(role), mode="txonly", txpkts=100, eth_peer=format_mac(sink.mac),
                        memif_args={"mac": port.mac}).start()
        try:
            first.wait_link()
            first.start_forwarding()
            _wait(lambda: port.bridge.counters.get("from_device", 0) > 1000, 20, "frames from the first peer")
            os.kill(first.pid, signal.SIGKILL)  # mid-stream, no DISCONNECT
            _wait(lambda: not port.bridge.link_up, 10, "the link to go down")
        finally:
            first.close()
        assert port.bridge.counters["link_downs"] == 1
        while True:  # what the first peer sent is read and put aside
            with sink.recv_batch(4096, 0.2) as b:
                if not len(b):
                    break
        before = port.bridge.counters["from_device"]
        with Testpmd(sock, role=_peer_role(role), mode="txonly", txpkts=100, eth_peer=format_mac(sink.mac),
                     memif_args={"mac": port.mac}) as second:
            second.wait_link()
            second.start_forwarding()
            _wait(lambda: port.bridge.counters.get("from_device", 0) > before + 1000, 20, "frames from the second peer")
            second.stop_forwarding()
        assert port.bridge.counters["link_ups"] == 2
        with sink.recv_batch(64, 1.0) as b:
            assert len(b) and all(len(f) == 100 - 14 and f.src_mac == port.node.mac for f in b)
    finally:
        sink.detach()


def test_a_wrong_secret_is_refused_with_its_reason(fab, ports, workdir):
    sock = os.path.join(workdir, "m.sock")
    port = Port(fab, MemifConfig(sock, secret=b"right"))
    ports.append(port)
    with Testpmd(sock, role="client", mode="rxonly", memif_args={"secret": "wrong"}) as tp:
        with pytest.raises(Exception, match="(?i)incorrect secret"):
            tp.wait_link(timeout=4)
    assert not port.bridge.link_up
    assert port.bridge.counters["handshakes_refused"] >= 1
    assert any("incorrect secret" in line for line in port.lines), port.lines
    with Testpmd(sock, role="client", mode="rxonly", memif_args={"secret": "right"}) as tp:
        tp.wait_link()
        _wait(lambda: port.bridge.link_up, 10, "the link with the right secret")


def test_dpdk_default_abstract_socket(fab, ports, workdir):
    name = os.path.join(workdir, "abs.sock")
    port = Port(fab, MemifConfig(name, abstract=True))
    ports.append(port)
    with Testpmd(name, role="client", mode="rxonly", memif_args={"socket_abstract": "yes"}) as tp:
        tp.wait_link()
        _wait(lambda: port.bridge.link_up, 10, "the link over the abstract socket")
    assert not os.path.exists(name)  # nothing on disk


def test_the_command_serves_until_sigterm_and_cleans_up(workdir):
    name = f"mcli{uuid.uuid4().hex[:8]}"
    fab = Fabric.create(name, networks=[{"mtu": 9000, "slots": 1024}])
    sock = os.path.join(workdir, "m.sock")
    exe = os.path.join(os.path.dirname(sys.executable), "shmfabric")
    proc = subprocess.Popen([exe, "memif", name, "mp", "--socket", sock, "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    sink = None
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 15)
        assert ready, "no first line from shmfabric memif"
        first = proc.stdout.readline()
        assert "listening on" in first and os.path.exists(sock), first
        mac = re.search(r"mac ([0-9a-f:]{17})", first).group(1)
        again = subprocess.run([exe, "memif", name, "mq", "--socket", sock, "--seconds", "1"], capture_output=True,
                               text=True, timeout=20)
        # EX_TEMPFAIL: it clears when the other server stops (a service manager restarts on it)
        assert again.returncode == 75 and "in use by another memif server" in again.stderr, again.stderr
        assert len(again.stderr.strip().splitlines()) == 1, again.stderr
        sink = fab.attach("sink")
        with Testpmd(sock, role="client", mode="txonly", txpkts=64, eth_peer=format_mac(sink.mac),
                     memif_args={"mac": mac}) as tp:
            tp.wait_link()
            tp.start_forwarding()
            got = 0
            deadline = time.monotonic() + 10
            while got < 1000 and time.monotonic() < deadline:
                with sink.recv_batch(256, 0.1) as b:
                    got += len(b)
            tp.stop_forwarding()
        assert got >= 1000
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
    finally:
        if sink is not None:
            sink.detach()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        fab.close()
        Fabric.destroy(name)
    assert proc.returncode == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    assert report["counters"]["to_fabric"] >= got and report["counters"]["link_ups"] == 1
    assert "link up: DPDK" in err and "Traceback" not in err
    assert not os.path.exists(sock)  # the server's socket file goes with it
