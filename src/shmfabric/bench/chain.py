"""`shmfabric bench chain`: the default chain (generator -> firewall -> ids -> l4lb -> 2 sinks) on
the fabric, side by side with the same function code connected by UNIX datagram sockets.

Both runs use the same function classes, rule sets (100+ firewall rules, 1,000+ IDS patterns),
frame sizes and process count; only the transport differs. Reported: end-to-end frames/s
(frames the sinks received / time from the generator's first frame to the sinks' last), the
ratio fabric/sockets, each function's own cost in ns per frame (wall time inside process()), and
the CPU time of all six processes per frame delivered ("CPU ns/f"; per stage in --json).

    python -m shmfabric.bench.chain [--sizes 64,1500] [--seconds 3] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

STAGES = ["fw", "ids", "lb", "sink1", "sink2"]


# -- rule sets ----------------------------------------------------------------------------------

def firewall_rules(n: int = 120) -> str:
    """n rules an edge firewall might have; the generator's traffic is accepted by the last ones."""
    rnd = random.Random(7)
    lines = ["policy drop"]
    for i in range(n - 3):
        kind = i % 4
        if kind == 0:
            lines.append(f"ip saddr 192.168.{i % 256}.0/24 tcp dport {1000 + i} drop")
        elif kind == 1:
            lines.append(f"ip daddr 172.{16 + i % 16}.{i % 256}.0/24 udp dport {{ {2000 + i}, {3000 + i} }} accept")
        elif kind == 2:
            lines.append(f"ip saddr 100.{64 + i % 64}.0.0/16 meta l4proto icmp drop")
        else:
            lo = 10000 + rnd.randrange(50000)
            lines.append(f"ip saddr != 10.0.0.0/8 th dport {lo}-{lo + 10} drop")
    lines.append("ip saddr 10.1.0.0/16 udp dport { 53, 80, 443, 8080 } accept")
    lines.append("ip saddr 10.1.0.0/16 tcp dport { 53, 80, 443, 8080 } accept")
    lines.append("ip saddr 10.2.0.0/16 ip daddr 10.1.0.0/16 accept")
    return "\n".join(lines) + "\n"


def ids_rules(n: int = 1000) -> tuple[str, list[str]]:
    """n content rules (random 10-byte patterns, a third nocase) and a few payloads that match."""
    rnd = random.Random(11)
    lines, pats = [], []
    for i in range(n):
        pat = "".join(rnd.choice(string.ascii_letters + string.digits) for _ in range(10))
        pats.append(pat)
        proto = ("udp", "tcp", "ip")[i % 3]
        nocase = " nocase;" if i % 3 == 0 else ""
        lines.append(f'alert {proto} any any -> any any (msg:"sig {i}"; content:"{pat}";{nocase} sid:{100000 + i};)')
    return "\n".join(lines) + "\n", pats[:4]


FILL = os.environ.get("SHMFABRIC_CHAIN_FILL", "text")  # payload filler: zeros | random | text


def chain_configs(size: int, seconds: float, fill: str | None = None) -> dict[str, dict]:
    rules, hits = ids_rules()
    # 1 flow in 64 carries a matching pattern: alerts happen, as in real traffic, without flooding
    payloads = [""] * 63 + [hits[0]]
    return {
        "gen": {"size": size, "flows": 1024, "stamp": False, "payloads": payloads if size >= 90 else [],
                "fill": fill or FILL},  # the IDS scans real-looking bytes, not zeros it can skip
        "fw": {"rules": firewall_rules()},
        "ids": {"rules": rules, "mode": "alert", "log_alerts": False},
        "lb": {"backends": [{"node": "sink1"}, {"node": "sink2"}]},
        "sink1": {"verify": False},
        "sink2": {"verify": False},
    }


FUNCTIONS = {"gen": "generator", "fw": "firewall", "ids": "ids", "lb": "l4lb", "sink1": "sink", "sink2": "sink"}
NEXT = {"gen": ["fw"], "fw": ["ids"], "ids": ["lb"], "lb": [], "sink1": [], "sink2": []}
PORTS = {"lb": ["sink1", "sink2"]}


# -- the fabric run ------------------------------------------------------------------------------

WAIT_MODE = os.environ.get("SHMFABRIC_CHAIN_WAIT", "block")  # more processes than cores: never spin
# Frames per batch (both transports) and ring slots. Six processes share two cores, so every
# batch costs context switches whose price (caches refilled) is paid per batch: at 1,024 frames a
# batch the chain spends ~2.4 us of CPU a frame, at 256 ~3.4 us (docs/functions.md has the table).
# A node takes what is there up to the batch size, so at low load batches stay small.
BATCH = 1024
RING = 2048


def run_fabric(size: int, seconds: float, workdir: Path, batch: int = BATCH, ring: int = RING) -> dict[str, dict]:
    from shmfabric.fabric import Fabric

    name = f"bench-chain-{uuid.uuid4().hex[:6]}"
    fab = Fabric.create(name, ephemeral=True, networks=[{"mtu": max(1500, size), "slots": 16384}], ring_size=ring)
    cfgs = chain_configs(size, seconds)
    procs = {}
    try:
        for node in ["sink1", "sink2", "lb", "ids", "fw", "gen"]:  # downstream first
            cfg_file = workdir / f"{node}.json"
            cfg_file.write_text(json.dumps(cfgs[node]))
            cmd = [sys.executable, "-m", "shmfabric.functions.run", "--fabric", name, "--node", node,
                   "--function", FUNCTIONS[node], "--config", f"@{cfg_file}", "--stats-json", str(workdir / f"{node}.stats"),
                   "--duration", str(seconds if node == "gen" else seconds + 30), "--wait-mode", WAIT_MODE, "--batch", str(batch)]
            if NEXT[node]:
                cmd += ["--next", ",".join(NEXT[node])]
            for p in PORTS.get(node, []):
                cmd += ["--port", p]
            procs[node] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(workdir / f"{node}.log", "w"))
        procs["gen"].wait(timeout=seconds + 60)
        # the rest drain, then stop gracefully on SIGTERM
        for node in ["fw", "ids", "lb", "sink1", "sink2"]:
            _wait_idle(fab, node)
            procs[node].send_signal(signal.SIGTERM)
            procs[node].wait(timeout=30)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
        fab.close()
    return {n: json.loads((workdir / f"{n}.stats").read_text()) for n in procs}


def _wait_idle(fab: Any, node: str, quiet: float = 0.3, limit: float = 60) -> None:
    """Until the node's receive counter stops moving (its input drained)."""
    end = time.monotonic() + limit
    last, since = -1, time.monotonic()
    while time.monotonic() < end:
        rx = next((n["rx_frames"] for n in fab.nodes() if n["name"] == node), None)
        if rx != last:
            last, since = rx, time.monotonic()
        elif time.monotonic() - since > quiet:
            return
        time.sleep(0.05)


# -- the socket run ------------------------------------------------------------------------------

def socket_stage(node: str, workdir: str, seconds: float, cfg: dict, batch: int = BATCH) -> None:
    """One stage with UNIX datagram sockets: recv a batch, same function, sendto per frame."""
    from shmfabric.functions.api import FunctionContext, Verdict, validate_config
    from shmfabric.functions.registry import load

    cls = load(FUNCTIONS[node])
    fn = cls(validate_config(cls, cfg), FunctionContext(node=node, ports=PORTS.get(node, [])))
    path = os.path.join(workdir, node + ".sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if node != "gen":
        sock.bind(path)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    out_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    nxt = [os.path.join(workdir, n + ".sock") for n in NEXT[node]]
    ports = [os.path.join(workdir, n + ".sock") for n in PORTS.get(node, [])]
    for p in nxt + ports:
        while not os.path.exists(p):
            time.sleep(0.01)
    c = {"in_frames": 0, "out_frames": 0, "busy_ns": 0, "first_ns": 0, "last_ns": 0, "cpu_ns": 0}
    perf = time.perf_counter_ns
    cpu0 = time.process_time_ns()  # as the fabric runtime: from the first frame to the last
    sendto = out_sock.sendto
    open(path + ".ready", "w").close()
    if node == "gen":
        end = time.monotonic() + seconds
        dst = nxt[0]
        while time.monotonic() < end:
            frames = fn.produce(time.monotonic(), batch)
            if not c["first_ns"]:
                c["first_ns"] = time.monotonic_ns()
                cpu0 = time.process_time_ns()
            t0 = perf()
            for f in frames:
                sendto(f, dst)  # blocks while the receiver's queue is full: backpressure, no loss
            c["busy_ns"] += perf() - t0
            c["in_frames"] += len(frames)
            c["out_frames"] += len(frames)
        c["last_ns"] = time.monotonic_ns()
        c["cpu_ns"] = time.process_time_ns() - cpu0
        sendto(b"", dst)  # end marker
    else:
        sock.settimeout(None)
        recv = sock.recv
        done = False
        while not done:
            first = recv(65536)
            frames = [first] if first else []
            done = not first
            sock.setblocking(False)
            try:
                while len(frames) < batch and not done:
                    f = recv(65536)
                    if not f:
                        done = True
                    else:
                        frames.append(f)
            except BlockingIOError:
                pass
            sock.setblocking(True)
            if frames:
                if not c["first_ns"]:
                    c["first_ns"] = time.monotonic_ns()
                    cpu0 = time.process_time_ns()
                out = bytearray(len(frames))
                t0 = perf()
                fn.process(frames, time.monotonic(), out)
                c["busy_ns"] += perf() - t0
                c["in_frames"] += len(frames)
                for i, f in enumerate(frames):
                    v = out[i]
                    if v == Verdict.NEXT and nxt:
                        sendto(f, nxt[0])
                        c["out_frames"] += 1
                    elif v >= 3 and v - 3 < len(ports):
                        sendto(f, ports[v - 3])
                        c["out_frames"] += 1
                c["last_ns"] = time.monotonic_ns()
                c["cpu_ns"] = time.process_time_ns() - cpu0
            if done:
                for p in nxt + ports:
                    sendto(b"", p)  # pass the end marker on
                if node == "lb":
                    pass
    if hasattr(fn, "counters"):
        c["function_counters"] = fn.counters()
    c["ns_per_frame"] = round(c["busy_ns"] / c["in_frames"], 1) if c["in_frames"] else 0.0
    with open(os.path.join(workdir, node + ".stats"), "w") as f:
        json.dump({"counters": c}, f)


def run_sockets(size: int, seconds: float, workdir: Path, batch: int = BATCH) -> dict[str, dict]:
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    cfgs = chain_configs(size, seconds)
    procs = {}
    try:
        for node in ["sink1", "sink2", "lb", "ids", "fw", "gen"]:
            procs[node] = ctx.Process(target=socket_stage, args=(node, str(workdir), seconds, cfgs[node], batch), daemon=True)
            procs[node].start()
            while not os.path.exists(workdir / f"{node}.sock.ready"):
                time.sleep(0.01)
        for node in ["gen", "fw", "ids", "lb", "sink1", "sink2"]:
            procs[node].join(timeout=seconds + 120)
    finally:
        for p in procs.values():
            if p.is_alive():
                p.kill()
    return {n: json.loads((workdir / f"{n}.stats").read_text()) for n in procs}


# -- report ----------------------------------------------------------------------------------------

def summarize(stats: dict[str, dict]) -> dict:
    gen = stats["gen"]["counters"]
    sinks = [stats[s]["counters"] for s in ("sink1", "sink2")]
    received = sum(s["in_frames"] for s in sinks)
    end = max(s["last_ns"] for s in sinks)
    dt = (end - gen["first_ns"]) / 1e9 if end > gen["first_ns"] else float("nan")
    names = ("gen", "fw", "ids", "lb", "sink1", "sink2")
    per_fn = {n: stats[n]["counters"].get("ns_per_frame", 0.0) for n in names}
    # CPU time (user + system) of each whole process per frame it handled: the function, the
    # runtime and the transport. Unlike ns_per_frame (wall time in process()), it does not grow
    # when a busy host preempts a stage; the total per frame delivered bounds the rate at
    # cores / total.
    cpu = {n: round(stats[n]["counters"].get("cpu_ns", 0) / max(stats[n]["counters"]["in_frames"], 1), 1) for n in names}
    cpu_total = sum(stats[n]["counters"].get("cpu_ns", 0) for n in names) / max(received, 1)
    return {"sent": gen["out_frames"], "received": received, "seconds": round(dt, 3),
            "frames_per_s": round(received / dt) if dt == dt and dt > 0 else 0, "ns_per_frame": per_fn,
            "cpu_ns_per_frame": cpu, "cpu_ns_per_frame_total": round(cpu_total, 1)}


def run(sizes: list[int], seconds: float) -> list[dict]:
    rows = []
    for size in sizes:
        res = {}
        for mode, fn in (("fabric", run_fabric), ("unix-dgram", run_sockets)):
            with tempfile.TemporaryDirectory(prefix="sf-chain-") as d:
                try:
                    res[mode] = summarize(fn(size, seconds, Path(d)))
                except Exception as e:  # one transport failing must not hide the other's figure
                    res[mode] = {"error": f"{type(e).__name__}: {e}"}
        for mode, r in res.items():
            rows.append({"transport": mode, "size": size, **r})
        f, s = res.get("fabric", {}), res.get("unix-dgram", {})
        if f.get("frames_per_s") and s.get("frames_per_s"):
            rows.append({"transport": "ratio fabric/unix-dgram", "size": size,
                         "ratio": round(f["frames_per_s"] / s["frames_per_s"], 2)})
    return rows


def print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="chain generator -> firewall(120 rules) -> ids(1000 patterns) -> l4lb -> 2 sinks")
    for col in ("transport", "size", "frames/s e2e", "sent", "received", "fw ns/f", "ids ns/f", "lb ns/f", "sink ns/f",
                "CPU ns/f", "ratio"):
        t.add_column(col, justify="left" if col == "transport" else "right")
    for r in rows:
        if "ratio" in r:
            t.add_row(r["transport"], str(r["size"]), "", "", "", "", "", "", "", "", f"{r['ratio']:.2f}x")
        elif "error" in r:
            t.add_row(r["transport"], str(r["size"]), r["error"], "", "", "", "", "", "", "", "")
        else:
            ns = r["ns_per_frame"]
            t.add_row(r["transport"], str(r["size"]), f"{r['frames_per_s']:,}", f"{r['sent']:,}", f"{r['received']:,}",
                      f"{ns['fw']:,.0f}", f"{ns['ids']:,.0f}", f"{ns['lb']:,.0f}", f"{ns['sink1']:,.0f}",
                      f"{r['cpu_ns_per_frame_total']:,.0f}", "")
    Console().print(t)


def _chain_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", default="64,1500", help="comma-separated frame sizes in bytes (default 64,1500)")
    p.add_argument("--seconds", type=float, default=3.0, help="seconds per size and transport (default 3)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="shmfabric bench chain", description=__doc__.splitlines()[0])
    _chain_flags(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    a = p.parse_args(argv)
    from shmfabric.functions.builtin.generator import MIN_SIZE

    try:
        sizes = [int(x) for x in a.sizes.split(",")]
    except ValueError:
        p.error(f"--sizes {a.sizes!r}: give frame sizes in bytes, comma-separated (e.g. 64,1500)")
    bad = [x for x in sizes if not MIN_SIZE <= x <= 9000]
    if bad:
        p.error(f"--sizes: {bad[0]} is out of range; the chain's frames are {MIN_SIZE}..9000 bytes")
    if not 0 < a.seconds < float("inf"):
        p.error(f"--seconds {a.seconds:g}: give the seconds per size and transport, a number above 0")
    rows = run(sizes, a.seconds)
    if a.json:
        print(json.dumps(rows, indent=1))
    else:
        print_table(rows)
    return 0


def register_bench(sub: Any) -> None:
    """Add `bench chain` to the `bench` noun."""
    p = sub.add_parser("chain", help="the default function chain on the fabric vs UNIX datagram sockets")
    _chain_flags(p)
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    p.set_defaults(func=lambda a: main(["--sizes", a.sizes, "--seconds", str(a.seconds)] + (["--json"] if getattr(a, "json", False) else [])))


if __name__ == "__main__":
    sys.exit(main())
