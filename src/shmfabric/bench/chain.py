"""`shmfabric bench chain`: the default chain (generator -> firewall -> ids -> l4lb -> 2 sinks) on
the fabric, side by side with the same function code connected by UNIX sockets.

All runs use the same function classes, rule sets (100+ firewall rules, 1,000+ IDS patterns),
frame sizes, process count and batch limit (1,024 frames); only the transport differs:

- fabric: the function runtime on a fabric (descriptor rings, shared packet pool);
- unix-seqpacket: connected SOCK_SEQPACKET sockets between stages (the fair baseline, and the
  one the ratio is taken against): a blocking recv() then non-blocking recv()s drain up to 1,024
  frames a batch, one send() per frame; the sender is bounded by its SO_SNDBUF (set to 4 MiB,
  thousands of frames), so a stage can find a full batch queued;
- unix-dgram: the earlier baseline, unconnected SOCK_DGRAM sockets and sendto() per frame. Kept
  for comparison only: the kernel blocks such a sender once /proc/sys/net/unix/max_dgram_qlen
  (10 by default) datagrams are queued, whatever SO_RCVBUF says, so its stages see batches of
  ~10 frames and pay per-batch costs 100 times as often.

Reported: end-to-end frames/s (frames the sinks received / time from the generator's first frame
to the sinks' last), the ratio fabric/unix-seqpacket, each function's own cost in ns per frame
(wall time inside process()), the CPU time of all six processes per frame delivered ("CPU ns/f";
per stage in --json) and the average frames per process() call of each stage ("avg batch").

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
# Frames per batch (the limit for every transport; the average each stage reached is reported)
# and ring slots. Six processes share two cores, so every batch costs context switches whose price
# (caches refilled) is paid per batch: at 1,024 frames a batch the chain spends ~2.4 us of CPU a
# frame, at 256 ~3.4 us (docs/functions.md has the table). A node takes what is there up to the
# batch size, so at low load batches stay small. The unix-dgram baseline cannot reach it: the
# kernel caps its queues at max_dgram_qlen datagrams.
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


# -- the socket runs -----------------------------------------------------------------------------

SOCKET_KINDS = ("seqpacket", "dgram")
SOCK_BUF = 4 << 20  # SO_SNDBUF / SO_RCVBUF asked for (the kernel doubles it, up to net.core.*mem_max)


def max_dgram_qlen() -> int | None:
    """The kernel's cap on datagrams queued to an unconnected UNIX datagram socket."""
    try:
        return int(Path("/proc/sys/net/unix/max_dgram_qlen").read_text())
    except (OSError, ValueError):
        return None


def seqpacket_listener(path: str) -> socket.socket:
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    lsock.bind(path)
    lsock.listen(1)
    return lsock


def seqpacket_connect(path: str) -> socket.socket:
    """A sender's end: connected, so only its send buffer (bytes, not a queue length) bounds
    what it may have queued at the receiver."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCK_BUF)
    s.connect(path)
    return s


def seqpacket_accept(lsock: socket.socket) -> socket.socket:
    conn, _ = lsock.accept()
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCK_BUF)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCK_BUF)
    lsock.close()
    return conn


def socket_stage(node: str, workdir: str, seconds: float, cfg: dict, batch: int = BATCH,
                 kind: str = "seqpacket", mtu: int = 9216) -> None:
    """One stage over UNIX sockets: a blocking recv, then non-blocking recvs up to `batch` frames;
    the same function; one send per frame. `kind` is "seqpacket" (connected SOCK_SEQPACKET,
    end of input = the upstream closing) or "dgram" (sendto() to a bound SOCK_DGRAM path, end of
    input = an empty datagram)."""
    from shmfabric.functions.api import FunctionContext, Verdict, validate_config
    from shmfabric.functions.registry import load

    if kind not in SOCKET_KINDS:
        raise ValueError(f"socket kind {kind!r}: one of {SOCKET_KINDS}")
    cls = load(FUNCTIONS[node])
    fn = cls(validate_config(cls, cfg), FunctionContext(node=node, ports=PORTS.get(node, [])))
    path = os.path.join(workdir, node + ".sock")
    nxt_paths = [os.path.join(workdir, n + ".sock") for n in NEXT[node]]
    port_paths = [os.path.join(workdir, n + ".sock") for n in PORTS.get(node, [])]
    for p in nxt_paths + port_paths:  # downstream stages start first
        while not os.path.exists(p):
            time.sleep(0.01)
    sock = lsock = None
    outs: list[socket.socket] = []
    if kind == "seqpacket":
        if node != "gen":
            lsock = seqpacket_listener(path)
        outs = [seqpacket_connect(p) for p in nxt_paths + port_paths]
        senders = [o.send for o in outs]
    else:
        if node != "gen":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.bind(path)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCK_BUF)  # does not lift max_dgram_qlen
        out_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        outs = [out_sock]
        sendto = out_sock.sendto
        senders = [(lambda f, p=p: sendto(f, p)) for p in nxt_paths + port_paths]
    nxt_send = senders[:len(nxt_paths)]
    port_send = senders[len(nxt_paths):]
    open(path + ".ready", "w").close()
    if lsock is not None:
        sock = seqpacket_accept(lsock)  # the upstream stage connects once it starts
    c = {"in_frames": 0, "out_frames": 0, "batches": 0, "busy_ns": 0, "first_ns": 0, "last_ns": 0, "cpu_ns": 0}
    if outs:  # what the kernel granted (2x the request, capped by 2x net.core.wmem_max)
        c["so_sndbuf"] = outs[0].getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    perf = time.perf_counter_ns
    cpu0 = time.process_time_ns()  # as the fabric runtime: from the first frame to the last
    if node == "gen":
        end = time.monotonic() + seconds
        send = nxt_send[0]
        while time.monotonic() < end:
            frames = fn.produce(time.monotonic(), batch)
            if not c["first_ns"]:
                c["first_ns"] = time.monotonic_ns()
                cpu0 = time.process_time_ns()
            t0 = perf()
            for f in frames:
                send(f)  # blocks while the receiver's queue is full: backpressure, no loss
            c["busy_ns"] += perf() - t0
            c["in_frames"] += len(frames)
            c["out_frames"] += len(frames)
            c["batches"] += 1
        c["last_ns"] = time.monotonic_ns()
        c["cpu_ns"] = time.process_time_ns() - cpu0
    else:
        assert sock is not None
        recv = sock.recv
        dontwait = socket.MSG_DONTWAIT
        done = False
        while not done:
            first = recv(mtu)  # blocking: wait for input
            frames = [first] if first else []
            done = not first
            try:
                while len(frames) < batch and not done:  # then drain what is queued, up to a batch
                    f = recv(mtu, dontwait)
                    if f:
                        frames.append(f)
                    else:
                        done = True
            except BlockingIOError:
                pass
            if frames:
                if not c["first_ns"]:
                    c["first_ns"] = time.monotonic_ns()
                    cpu0 = time.process_time_ns()
                out = bytearray(len(frames))
                t0 = perf()
                fn.process(frames, time.monotonic(), out)
                c["busy_ns"] += perf() - t0
                c["in_frames"] += len(frames)
                c["batches"] += 1
                for i, f in enumerate(frames):
                    v = out[i]
                    if v == Verdict.NEXT and nxt_send:
                        nxt_send[0](f)
                        c["out_frames"] += 1
                    elif v >= 3 and v - 3 < len(port_send):
                        port_send[v - 3](f)
                        c["out_frames"] += 1
                c["last_ns"] = time.monotonic_ns()
                c["cpu_ns"] = time.process_time_ns() - cpu0
    # end of input: pass it on (seqpacket: close, the peer's recv returns b""; dgram: an empty datagram)
    if kind == "dgram":
        for send in senders:
            send(b"")
    for o in outs:
        o.close()
    if sock is not None:
        sock.close()
    if hasattr(fn, "counters"):
        c["function_counters"] = fn.counters()
    c["ns_per_frame"] = round(c["busy_ns"] / c["in_frames"], 1) if c["in_frames"] else 0.0
    with open(os.path.join(workdir, node + ".stats"), "w") as f:
        json.dump({"counters": c}, f)


def run_sockets(size: int, seconds: float, workdir: Path, batch: int = BATCH, kind: str = "seqpacket") -> dict[str, dict]:
    import multiprocessing as mp
    from multiprocessing.connection import wait as mp_wait

    ctx = mp.get_context("fork")
    cfgs = chain_configs(size, seconds)
    mtu = max(1500, size) + 64  # a receive buffer as for a known MTU (a seqpacket record never truncated)
    procs = {}
    try:
        for node in ["sink1", "sink2", "lb", "ids", "fw", "gen"]:
            procs[node] = ctx.Process(target=socket_stage, args=(node, str(workdir), seconds, cfgs[node], batch, kind, mtu),
                                      daemon=True)
            procs[node].start()
            while not os.path.exists(workdir / f"{node}.sock.ready"):
                if not procs[node].is_alive():
                    raise RuntimeError(f"socket stage {node} exited with code {procs[node].exitcode} before it was ready")
                time.sleep(0.01)
        deadline = time.monotonic() + seconds + 120
        while (alive := [p for p in procs.values() if p.is_alive()]) and time.monotonic() < deadline:
            if any(p.exitcode for p in procs.values()):  # a stage failed: the others would wait forever
                break
            mp_wait([p.sentinel for p in alive], timeout=max(0.0, deadline - time.monotonic()))
    finally:
        for p in procs.values():
            if p.is_alive():
                p.kill()
            p.join(timeout=10)
    missing = [n for n in procs if not (workdir / f"{n}.stats").exists()]
    if missing:
        raise RuntimeError(f"socket stage(s) {', '.join(missing)} wrote no stats (exit codes "
                           f"{', '.join(f'{n}={procs[n].exitcode}' for n in missing)})")
    return {n: json.loads((workdir / f"{n}.stats").read_text()) for n in procs}


def run_seqpacket(size: int, seconds: float, workdir: Path, batch: int = BATCH) -> dict[str, dict]:
    return run_sockets(size, seconds, workdir, batch, kind="seqpacket")


def run_dgram(size: int, seconds: float, workdir: Path, batch: int = BATCH) -> dict[str, dict]:
    return run_sockets(size, seconds, workdir, batch, kind="dgram")


# -- report ----------------------------------------------------------------------------------------

NAMES = ("gen", "fw", "ids", "lb", "sink1", "sink2")


def summarize(stats: dict[str, dict]) -> dict:
    gen = stats["gen"]["counters"]
    sinks = [stats[s]["counters"] for s in ("sink1", "sink2")]
    received = sum(s["in_frames"] for s in sinks)
    end = max(s["last_ns"] for s in sinks)
    dt = (end - gen["first_ns"]) / 1e9 if end > gen["first_ns"] else float("nan")
    per_fn = {n: stats[n]["counters"].get("ns_per_frame", 0.0) for n in NAMES}
    # CPU time (user + system) of each whole process per frame it handled: the function, the
    # runtime and the transport. Unlike ns_per_frame (wall time in process()), it does not grow
    # when a busy host preempts a stage; the total per frame delivered bounds the rate at
    # cores / total.
    cpu = {n: round(stats[n]["counters"].get("cpu_ns", 0) / max(stats[n]["counters"]["in_frames"], 1), 1) for n in NAMES}
    cpu_total = sum(stats[n]["counters"].get("cpu_ns", 0) for n in NAMES) / max(received, 1)
    # frames per process() call (per produce() call for gen): the per-batch costs are shared by this many
    batch = {n: round(stats[n]["counters"]["in_frames"] / max(stats[n]["counters"].get("batches", 0), 1), 1) for n in NAMES}
    sink_batches = sum(s.get("batches", 0) for s in sinks)
    batch["sinks"] = round(received / max(sink_batches, 1), 1)
    row = {"sent": gen["out_frames"], "received": received, "seconds": round(dt, 3),
           "frames_per_s": round(received / dt) if dt == dt and dt > 0 else 0, "ns_per_frame": per_fn,
           "cpu_ns_per_frame": cpu, "cpu_ns_per_frame_total": round(cpu_total, 1), "avg_batch": batch}
    if "so_sndbuf" in gen:  # socket runs: bytes a sender may have queued (seqpacket's only bound)
        row["so_sndbuf"] = gen["so_sndbuf"]
    return row


#: transport name -> run function; the ratio rows divide the fabric's frames/s by each baseline's
TRANSPORTS = {"fabric": run_fabric, "unix-seqpacket": run_seqpacket, "unix-dgram": run_dgram}
BASELINE = "unix-seqpacket"  # the fair one (see the module docstring)


def run(sizes: list[int], seconds: float, transports: list[str] | None = None) -> list[dict]:
    transports = list(transports or TRANSPORTS)
    qlen = max_dgram_qlen()
    rows = []
    for size in sizes:
        res = {}
        for mode in transports:
            with tempfile.TemporaryDirectory(prefix="sf-chain-") as d:
                try:
                    res[mode] = summarize(TRANSPORTS[mode](size, seconds, Path(d)))
                except Exception as e:  # one transport failing must not hide the others' figures
                    res[mode] = {"error": f"{type(e).__name__}: {e}"}
            if mode == "unix-dgram":
                res[mode]["max_dgram_qlen"] = qlen
        for mode, r in res.items():
            rows.append({"transport": mode, "size": size, "batch_limit": BATCH, **r})
        f = res.get("fabric", {})
        for base in [BASELINE] + [m for m in res if m not in ("fabric", BASELINE)]:
            b = res.get(base, {})
            if f.get("frames_per_s") and b.get("frames_per_s"):
                rows.append({"transport": f"ratio fabric/{base}", "size": size,
                             "ratio": round(f["frames_per_s"] / b["frames_per_s"], 2)})
    return rows


def _label(r: dict) -> str:
    if r["transport"] == "unix-dgram":
        return f"unix-dgram, max_dgram_qlen {r.get('max_dgram_qlen', '?')}"
    return r["transport"]


def print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="chain generator -> firewall(120 rules) -> ids(1000 patterns) -> l4lb -> 2 sinks",
              caption=f"avg batch: frames per process() call of fw/ids/lb/sinks (limit {BATCH}); "
                      f"ratio against {BASELINE}, the fair socket baseline")
    cols = ("transport", "size", "frames/s e2e", "sent", "received", "fw ns/f", "ids ns/f", "lb ns/f", "sink ns/f",
            "CPU ns/f", "avg batch fw/ids/lb/sinks", "ratio")
    for col in cols:
        t.add_column(col, justify="left" if col == "transport" else "right")
    blank = [""] * (len(cols) - 3)
    for r in rows:
        if "ratio" in r:
            t.add_row(r["transport"], str(r["size"]), *blank, f"{r['ratio']:.2f}x")
        elif "error" in r:
            t.add_row(_label(r), str(r["size"]), r["error"], *blank)
        else:
            ns, b = r["ns_per_frame"], r["avg_batch"]
            t.add_row(_label(r), str(r["size"]), f"{r['frames_per_s']:,}", f"{r['sent']:,}", f"{r['received']:,}",
                      f"{ns['fw']:,.0f}", f"{ns['ids']:,.0f}", f"{ns['lb']:,.0f}", f"{ns['sink1']:,.0f}",
                      f"{r['cpu_ns_per_frame_total']:,.0f}",
                      "/".join(f"{b[n]:,.0f}" if b[n] >= 10 else f"{b[n]:.1f}" for n in ("fw", "ids", "lb", "sinks")), "")
    Console().print(t)


def _chain_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", default="64,1500", help="comma-separated frame sizes in bytes (default 64,1500)")
    p.add_argument("--seconds", type=float, default=3.0, help="seconds per size and transport (default 3)")
    p.add_argument("--transports", default=",".join(TRANSPORTS),
                   help=f"comma-separated, of {', '.join(TRANSPORTS)} (default all; unix-dgram is the earlier "
                        f"baseline, its queues capped at max_dgram_qlen datagrams)")


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
    transports = [x.strip() for x in a.transports.split(",") if x.strip()]
    unknown = [x for x in transports if x not in TRANSPORTS]
    if unknown or not transports:
        p.error(f"--transports {a.transports!r}: give some of {', '.join(TRANSPORTS)}, comma-separated")
    from shmfabric.bench.provenance import info_line, run_info

    meta = run_info()  # before the run: the load average is the machine's, not the bench's
    rows = run(sizes, a.seconds, transports)
    if a.json:
        print(json.dumps([{**r, **meta} for r in rows], indent=1))  # each row with its run, as transport's
    else:
        print_table(rows)
        print("\n" + info_line(meta))
    return 0


def register_bench(sub: Any) -> None:
    """Add `bench chain` to the `bench` noun."""
    p = sub.add_parser("chain", help="the default function chain on the fabric vs UNIX sockets (seqpacket; dgram)")
    _chain_flags(p)
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    p.set_defaults(func=lambda a: main(["--sizes", a.sizes, "--seconds", str(a.seconds), "--transports", a.transports]
                                       + (["--json"] if getattr(a, "json", False) else [])))


if __name__ == "__main__":
    sys.exit(main())
