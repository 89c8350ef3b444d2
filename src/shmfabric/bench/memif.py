"""`shmfabric bench memif`: DPDK's memif between testpmd and the fabric's memif port, side by
side with memif between two testpmds (DPDK's own driver on both ends).

1. peer -> fabric: testpmd (txonly, role=client) sends frames of 64 and 1,500 bytes as fast as
   it can into `shmfabric memif` (a separate process, role=server), which delivers them to a
   sink node (another process) that reads them; frames/s counted at the sink. Peer: the same
   testpmd into a second testpmd (rxonly, role=server), frames/s counted by the receiver.
2. fabric -> peer: a sender node (a process) sends frames to the memif port as fast as the ring
   lets it, which writes them to testpmd (rxonly, role=client); frames/s counted by testpmd.
   Peer: as in 1.

Both sides get the machine's two cores: testpmd busy-polls one (as DPDK does), the port and the
fabric node share the other with each other (the port sleeps on its eventfd; testpmd's polling
side masks its interrupts). Each setting runs right after its peer, `--runs` times; medians.
No target: no issue sets one; the ratios say what the memif port (Python, its per-frame work in
the core) costs against DPDK's driver on both ends.

    shmfabric bench memif [--seconds 5] [--runs 3] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any

from shmfabric.adapters.ethernet import format_mac
from shmfabric.bench.command import run_bench
from shmfabric.bench.lan import wait_until
from shmfabric.bench.testpmd import Testpmd, TestpmdError, testpmd_available

SIZES = (64, 1500)

# what both node processes start with: stop at SIGTERM, after the pass under way
_PRELUDE = """
import signal, sys, time
from shmfabric.fabric import Fabric
stop = False
def on_term(*a):
    global stop
    stop = True
signal.signal(signal.SIGTERM, on_term)
"""

_SINK = _PRELUDE + """
fab = Fabric.open(sys.argv[1]); node = fab.attach(sys.argv[2]); node.set_wait_mode("block")
print("ready", flush=True)
while not stop:
    with node.recv_batch(256, 0.2) as b:
        pass
node.detach(); fab.close()
"""

_SENDER = _PRELUDE + """
fab = Fabric.open(sys.argv[1]); node = fab.attach(sys.argv[2])
dst = node.wait_for_peer(sys.argv[3], 10)
frames = [bytes(int(sys.argv[4]) - 14)] * 64
print("ready", flush=True)
while not stop:
    if not node.send_batch(dst, frames, ethertype=0x88B5):
        time.sleep(0.0001)
node.detach(); fab.close()
"""


class BenchError(Exception):
    """The bench cannot run here (the message says what is missing)."""


def _py(code: str, *args: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline() if proc.stdout else ""
    if line.strip() != "ready":
        proc.kill()
        raise BenchError(f"a fabric node process did not start: {line!r}")
    return proc


def _stop(*procs: subprocess.Popen | None) -> None:
    for p in procs:
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        if p is not None:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _shmfabric() -> str:
    return os.path.join(os.path.dirname(sys.executable), "shmfabric")


def _node_counter(fab: Any, name: str, key: str) -> int:
    for e in fab.nodes():
        if e.get("name") == name:
            return int(e[key])
    raise BenchError(f"node {name} is not on the fabric")


class _FabricSide:
    """A fabric with `shmfabric memif` (server or client) on it, in processes of their own."""

    def __init__(self, sock: str, role: str):
        from shmfabric.fabric import Fabric

        self.name = f"bm{uuid.uuid4().hex[:8]}"
        self.fab = Fabric.create(self.name, ephemeral=False, networks=[{"mtu": 2048, "slots": 4096}])
        self.sock = sock
        self.port = subprocess.Popen([_shmfabric(), "memif", self.name, "mp", "--socket", self.sock, "--role", role,
                                      "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first = self.port.stdout.readline() if self.port.stdout else ""
        if " mac " not in first:
            self.close()
            raise BenchError(f"shmfabric memif did not start: {first!r}")
        self.mac = first.split(" mac ")[1].split()[0]

    def close(self) -> dict[str, Any]:
        from shmfabric.fabric import Fabric

        out = ""
        if self.port.poll() is None:
            self.port.send_signal(signal.SIGTERM)
            try:
                out, _ = self.port.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                self.port.kill()
                self.port.communicate()
        self.fab.close()
        Fabric.destroy(self.name)
        try:
            return json.loads(out.strip().splitlines()[-1])["counters"]
        except (ValueError, IndexError, KeyError):
            return {}


def peer_to_fabric(size: int, seconds: float, workdir: str) -> dict[str, float]:
    """testpmd txonly -> shmfabric memif -> sink node, then testpmd txonly -> testpmd rxonly."""
    out: dict[str, float] = {}
    side = _FabricSide(os.path.join(workdir, f"in{uuid.uuid4().hex[:6]}.sock"), "server")
    sink = None
    try:
        sink = _py(_SINK, side.name, "sink")
        sink_mac = format_mac(_mac_of(side.fab, "sink"))
        with Testpmd(side.sock, role="client", mode="txonly", txpkts=size, eth_peer=sink_mac, main_lcore=1,
                     memif_args={"mac": side.mac}) as tx:
            tx.wait_link()
            tx.start_forwarding()
            time.sleep(1.0)  # warm up
            a = _node_counter(side.fab, "sink", "rx_frames")
            t = time.monotonic()
            time.sleep(seconds)
            b = _node_counter(side.fab, "sink", "rx_frames")
            out["fabric_fps"] = (b - a) / (time.monotonic() - t)
            tx.stop_forwarding()
    finally:
        _stop(sink)
        out["fabric_counters"] = side.close()  # type: ignore[assignment]
    sock = os.path.join(workdir, f"dp{uuid.uuid4().hex[:6]}.sock")
    with Testpmd(sock, role="server", mode="rxonly", main_lcore=0) as rx, \
            Testpmd(sock, role="client", mode="txonly", txpkts=size, main_lcore=1) as tx:
        rx.wait_link()
        tx.wait_link()
        rx.start_forwarding()
        tx.start_forwarding()
        time.sleep(1.0)
        a = rx.port_stats()["rx_packets"]
        t = time.monotonic()
        time.sleep(seconds)
        b = rx.port_stats()["rx_packets"]
        out["dpdk_fps"] = (b - a) / (time.monotonic() - t)
        tx.stop_forwarding()
        rx.stop_forwarding()
    return out


def _mac_of(fab: Any, name: str) -> bytes:
    from shmfabric.fabric.control import node_mac

    if not wait_until(lambda: fab.node_id(name) is not None, 10):
        raise BenchError(f"timed out waiting for node {name}")
    return node_mac(fab.node_id(name))


def fabric_to_peer(size: int, seconds: float, workdir: str) -> dict[str, float]:
    """sender node -> shmfabric memif (role=client) -> testpmd rxonly (role=server)."""
    out: dict[str, float] = {}
    sock = os.path.join(workdir, f"out{uuid.uuid4().hex[:6]}.sock")
    with Testpmd(sock, role="server", mode="rxonly", main_lcore=0) as rx:
        side = _FabricSide(sock, "client")
        sender = None
        try:
            rx.wait_link()
            rx.start_forwarding()
            sender = _py(_SENDER, side.name, "src", "mp", str(size))
            time.sleep(1.0)  # warm up
            a = rx.port_stats()["rx_packets"]
            t = time.monotonic()
            time.sleep(seconds)
            b = rx.port_stats()["rx_packets"]
            out["fabric_fps"] = (b - a) / (time.monotonic() - t)
            rx.stop_forwarding()
        finally:
            _stop(sender)
            out["fabric_counters"] = side.close()  # type: ignore[assignment]
    return out


def run(seconds: float = 5.0, runs: int = 3, sizes: tuple[int, ...] = SIZES) -> dict[str, Any]:
    why = testpmd_available()
    if why is not None:
        raise BenchError(f"needs DPDK's testpmd: {why}")
    workdir = tempfile.mkdtemp(prefix="bmemif", dir="/tmp")
    samples: dict[str, list[dict[str, float]]] = {}
    try:
        for _ in range(runs):
            for size in sizes:
                samples.setdefault(f"in-{size}", []).append(peer_to_fabric(size, seconds, workdir))
                samples.setdefault(f"out-{size}", []).append(fabric_to_peer(size, seconds, workdir))
    except TestpmdError as exc:
        raise BenchError(str(exc)) from None
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    median = {}
    for key, rows in samples.items():
        median[key] = {k: statistics.median(r[k] for r in rows if k in r)
                       for k in ("fabric_fps", "dpdk_fps") if any(k in r for r in rows)}
    # the DPDK-to-DPDK figure is the same setting for both directions: measured once per size per run
    for size in sizes:
        median[f"out-{size}"]["dpdk_fps"] = median[f"in-{size}"]["dpdk_fps"]
    return {"seconds": seconds, "runs": runs, "sizes": list(sizes), "median": median, "samples": samples}


def format_table(res: dict[str, Any]) -> str:
    lines = [f"memif bench: medians of {res['runs']} runs of {res['seconds']} s; frames/s "
             f"(testpmd busy-polls one core in every setting)",
             f"{'':44} {'frame B':>8} {'fabric':>12} {'testpmd':>12} {'ratio':>8}"]
    for size in res["sizes"]:
        for key, label in ((f"in-{size}", "testpmd txonly -> memif port -> sink node"),
                           (f"out-{size}", "sender node -> memif port -> testpmd rxonly")):
            m = res["median"][key]
            ratio = m["fabric_fps"] / m["dpdk_fps"] if m.get("dpdk_fps") else 0.0
            lines.append(f"{label:44} {size:>8} {m['fabric_fps']:>12,.0f} {m['dpdk_fps']:>12,.0f} {ratio:>7.3f}x")
    lines.append("testpmd column: testpmd txonly -> testpmd rxonly over memif (DPDK's driver on both ends)")
    return "\n".join(lines)


def cmd_bench_memif(args: argparse.Namespace) -> int:
    return run_bench(args, lambda: run(args.seconds, args.runs, tuple(args.size or SIZES)), format_table, BenchError)


def register_bench(bench_sub: Any) -> None:
    p = bench_sub.add_parser("memif", help="DPDK testpmd over memif: to the fabric's memif port vs to another testpmd",
                             description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=5.0, help="measurement window per setting (default 5)")
    p.add_argument("--runs", type=int, default=3, help="repetitions; medians are shown (default 3)")
    p.add_argument("--size", type=int, action="append", help="frame sizes in bytes (default 64 and 1500)")
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    p.set_defaults(func=cmd_bench_memif, size=None)
