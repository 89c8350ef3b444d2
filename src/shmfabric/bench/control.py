"""`shmfabric bench control`: how long a manager waits for a running function to answer, on the
fabric's control path, side by side with HAProxy's runtime API.

A firewall node (the chain bench's 120 rules, so its `stats` reply has a counter per rule and
spans several frames) runs in its own process. A `ControlClient` sends it `{"op": "stats"}` again
and again and times each round trip (request sent to whole reply reassembled), in three states:

- idle: no traffic;
- forwarding: a generator sends 64-byte frames to it as fast as it takes them, to a sink;
- blocked: the sink is stopped (SIGSTOP), so the firewall's next hop is full and every send of
  its waits: it answers control messages from inside that wait (`Node.recv_control`).

The peer is HAProxy (one thread), asked `show info` and `show stat` on its stats socket (a UNIX
stream socket, a new connection per command as `socat` or a monitoring agent does): the
control path of a running data-plane process that platform engineers know.

    shmfabric bench control [--requests 2000] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from shmfabric.bench.chain import firewall_rules

DEFAULT_REQUESTS = 2000


def _percentiles(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {"p50_ms": s[len(s) // 2] * 1e3, "p99_ms": s[min(len(s) - 1, int(len(s) * 0.99))] * 1e3,
            "mean_ms": sum(s) / len(s) * 1e3, "requests": len(s)}


def _node_row(fab: Any, name: str) -> dict:
    return next((n for n in fab.nodes() if n["name"] == name), {})


def _wait(cond: Any, what: str, limit: float = 30.0) -> None:
    end = time.monotonic() + limit
    while not cond():
        if time.monotonic() > end:
            raise RuntimeError(f"bench control: {what} did not happen within {limit:.0f} s")
        time.sleep(0.02)


def _time_stats(ctl: Any, n: int) -> dict[str, Any]:
    """n timed `stats` round trips: their percentiles, and the frames the firewall forwarded
    between the first reply and the last (its own `out_frames` counter)."""
    took = []
    first = last = None
    for _ in range(n):
        t0 = time.perf_counter()
        reply = ctl.request("fw", {"op": "stats"}, timeout=10.0)
        took.append(time.perf_counter() - t0)
        if not reply.get("ok"):
            raise RuntimeError(f"bench control: the firewall answered stats with {reply}")
        last = reply["counters"]["out_frames"]
        first = last if first is None else first
    return {**_percentiles(took), "forwarded_during": last - first}


def run_fabric(requests: int, workdir: Path) -> dict[str, dict]:
    """The three states of the firewall node; each a percentiles dict."""
    from shmfabric.fabric import Fabric
    from shmfabric.functions.control import ControlClient

    name = f"bench-control-{uuid.uuid4().hex[:6]}"
    fab = Fabric.create(name, ephemeral=True, networks=[{"mtu": 1500, "slots": 16384}], ring_size=1024)
    cfgs = {"sink": {"verify": False}, "fw": {"rules": firewall_rules()},
            "gen": {"size": 64, "flows": 1024, "stamp": False}}
    functions = {"sink": "sink", "fw": "firewall", "gen": "generator"}
    nexts = {"sink": [], "fw": ["sink"], "gen": ["fw"]}
    procs: dict[str, subprocess.Popen] = {}

    def start(node: str) -> None:
        cfg = workdir / f"{node}.json"
        cfg.write_text(json.dumps(cfgs[node]))
        cmd = [sys.executable, "-m", "shmfabric.functions.run", "--fabric", name, "--node", node,
               "--function", functions[node], "--config", f"@{cfg}", "--wait-mode", "block"]
        if nexts[node]:
            cmd += ["--next", ",".join(nexts[node])]
        procs[node] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(workdir / f"{node}.log", "w"))

    out: dict[str, dict] = {}
    ctl = None
    try:
        start("sink")
        start("fw")
        _wait(lambda: _node_row(fab, "fw").get("state") == "up" and _node_row(fab, "sink").get("state") == "up",
              "the firewall and sink attaching")
        ctl = ControlClient(fab, "bench-ctl")
        _time_stats(ctl, 50)  # warm-up: imports, the first reply's path
        out["idle"] = _time_stats(ctl, requests)
        start("gen")
        _wait(lambda: _node_row(fab, "fw").get("rx_frames", 0) > 100_000, "traffic through the firewall")
        out["forwarding"] = _time_stats(ctl, requests)
        procs["sink"].send_signal(signal.SIGSTOP)
        full0 = _node_row(fab, "fw").get("tx_ring_full", 0)
        _wait(lambda: _node_row(fab, "fw").get("tx_ring_full", 0) > full0 + 1000, "the firewall's next hop filling")
        # forwarded_during: 0, its data path was stuck the whole time
        out["blocked"] = _time_stats(ctl, requests)
    finally:
        if "sink" in procs and procs["sink"].poll() is None:
            procs["sink"].send_signal(signal.SIGCONT)
        if ctl is not None:
            ctl.close()
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
        for p in procs.values():
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        fab.close()
    return out


def _stats_socket_round_trip(path: Path, command: bytes) -> float:
    """One `command` on HAProxy's stats socket, a new connection as a monitoring agent makes:
    seconds from connect to the answer read whole."""
    from shmfabric.bench.splice_http import stats_command

    t0 = time.perf_counter()
    answer = stats_command(path, command)
    took = time.perf_counter() - t0
    if not answer:
        raise RuntimeError(f"bench control: HAProxy answered {command.decode()!r} with nothing")
    return took


def run_haproxy(requests: int, workdir: Path) -> dict[str, dict] | None:
    """HAProxy's `show info` and `show stat` round trips; None when HAProxy is not installed."""
    from shmfabric import programs
    from shmfabric.bench.splice_http import start_haproxy

    if not programs.find("haproxy"):
        return None
    sock = workdir / "haproxy.sock"
    out = {}
    with start_haproxy(workdir, [], ["127.0.0.1:9"], threads=1, stats_socket=sock):
        _wait(sock.exists, "HAProxy's stats socket")
        for cmd in (b"show info", b"show stat"):
            for _ in range(50):
                _stats_socket_round_trip(sock, cmd)
            out[cmd.decode()] = _percentiles([_stats_socket_round_trip(sock, cmd) for _ in range(requests)])
    return out


def run(requests: int = DEFAULT_REQUESTS) -> dict[str, Any]:
    """Both sides, one after the other in one run; the figures and the ratios."""
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="shmfabric-bench-control-")))
        fabric = run_fabric(requests, workdir)
        haproxy = run_haproxy(requests, workdir)
    result: dict[str, Any] = {"shmfabric": fabric, "haproxy": haproxy, "requests": requests,
                              "cpus": os.cpu_count()}
    if haproxy:
        # > 1: HAProxy's round trip takes longer than ours
        result["ratios"] = {f"haproxy {cmd} p50 / shmfabric {state} p50":
                            haproxy[cmd]["p50_ms"] / fabric[state]["p50_ms"]
                            for cmd in haproxy for state in fabric}
    return result


def print_table(result: dict[str, Any]) -> None:
    print(f"control round trip, {result['requests']} requests each (ms)")
    print(f"{'who':<44} {'p50':>8} {'p99':>8} {'mean':>8}")
    for state, r in result["shmfabric"].items():
        print(f"{'shmfabric stats, firewall ' + state:<44} {r['p50_ms']:8.3f} {r['p99_ms']:8.3f} {r['mean_ms']:8.3f}"
              f"   (frames forwarded meanwhile: {r['forwarded_during']:,})")
    if result["haproxy"] is None:
        print("haproxy: not installed, no peer figures")
        return
    for cmd, r in result["haproxy"].items():
        print(f"{'haproxy ' + cmd + ' (stats socket)':<44} {r['p50_ms']:8.3f} {r['p99_ms']:8.3f} {r['mean_ms']:8.3f}")
    print()
    for what, ratio in result["ratios"].items():
        print(f"{what:<60} {ratio:6.2f}x")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="shmfabric bench control", description=__doc__.splitlines()[0])
    _flags(p)
    return _run(p.parse_args(argv))


def _flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--requests", type=int, default=DEFAULT_REQUESTS, help="round trips timed per state (default 2000)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")


def _run(args: argparse.Namespace) -> int:
    if args.requests < 1:
        print("bench control: --requests must be at least 1", file=sys.stderr)
        return 2
    from shmfabric.bench.provenance import info_line, run_info

    meta = run_info()  # before the run: the load average is the machine's, not the bench's
    try:
        result = run(args.requests)
    except RuntimeError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"meta": meta, **result}, indent=2))
    else:
        print_table(result)
        print("\n" + info_line(meta))
    return 0


def register_bench(sub: Any) -> None:
    """Add `shmfabric bench control`."""
    p = sub.add_parser("control", help="control round trip to a running function vs HAProxy's runtime API",
                       description=__doc__.splitlines()[0])
    _flags(p)
    p.set_defaults(func=_run)


if __name__ == "__main__":
    sys.exit(main())
