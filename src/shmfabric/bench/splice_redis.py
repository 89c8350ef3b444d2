"""Benchmark 3 of issue 3: the Redis splicer against twemproxy, and a spread MGET against direct.

    python -m shmfabric.bench.splice_redis [--json] [--requests N] [--mget-runs N] [--rounds N]

Everything runs on loopback, side by side in one run:

1. three `redis-server`s (no persistence): two the proxies spread keys over, and a third,
   "direct", that holds every key the MGET reads;
2. throughput: `redis-benchmark -P 16 -c 50 -t set,get -r 100000` through the splicer and
   through twemproxy (Debian's `nutcracker`, config generated here: same two servers, ketama,
   same hash, and as many connections per server: twemproxy `server_connections` = the
   splicer's `--pool`), one process each;
3. latency: one MGET of 1000 keys spread over the two servers, through the splicer (and
   twemproxy, for reference), against the same MGET sent straight to the third server; p50/p99
   over `--mget-runs` runs by a small raw-socket client (same client code for all). Every value
   must come back, and INFO commandstats (cmdstat_mget) must show that both spread servers got
   MGETs during each proxy's run (a proxy sending every key to one server fails the bench);
4. the floor under that latency, for reference: the same MGET sent to the third server through
   HAProxy in TCP mode (a byte relay in C: no parsing, no split, just the extra hop), through
   twemproxy with only that server (its per-key handling without the spread), and through the
   splicer with only that server (it routes all 1000 keys, then relays the reply as is).

Each measurement is taken in `--rounds` rounds, the order of the peers alternating (two rounds:
twemproxy, splicer, splicer, twemproxy; the MGET rows likewise, reversed in every other round);
the figures are medians over the rounds, each run is kept under `runs`, and the ratios of each
round under `ratios_per_round`.

Targets (issue 3): splicer >= 0.5x twemproxy's ops/s; spread MGET <= 1.5x direct latency.
Figures depend on the machine and on what else runs on it; the table prints the ratios, and the
CPU time each proxy process used per request (from /proc/PID/stat), which a busy machine
disturbs far less than the wall-clock rates.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from shmfabric import programs
from shmfabric.bench.provenance import info_line, run_info  # noqa: F401 (splice.py takes them from here too)
from shmfabric.splicer.redis_resp import ReplyScanner, encode_command

__all__ = ["run", "main"]


class BenchError(Exception):
    """A peer is missing or did not start; the message says which and how to fix it."""


def bench_main(module: str, doc: str, argv: list[str] | None,
               options: Callable[[argparse.ArgumentParser], None],
               run: Callable[[argparse.Namespace], dict[str, Any]],
               table: Callable[[dict[str, Any]], str]) -> int:
    """The `python -m shmfabric.bench.<module>` entry point every splice bench shares: `--json`
    and the bench's own `options`, `run(args)`, then the figures as `table(result)` or JSON; a
    peer missing or failing (BenchError) is one line on stderr and exit 2."""
    parser = argparse.ArgumentParser(prog=f"python -m shmfabric.bench.{module}", description=doc.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    options(parser)
    args = parser.parse_args(argv)
    meta = run_info()  # before the run: the load average is the machine's, not the bench's
    try:
        result = run(args)
    except BenchError as exc:
        print(f"{module} bench: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({**result, "meta": meta}, indent=2, sort_keys=True, default=str))
    else:
        print(table(result) + "\n\n" + info_line(meta))
    return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with status {proc.returncode} before listening on port {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise BenchError(f"{what} does not listen on 127.0.0.1:{port} after {timeout:g} s") from None
            time.sleep(0.05)


def _need(binary: str, package: str) -> str:
    path = programs.find(binary)
    if path is None:
        raise BenchError(programs.not_found(binary, fix=f"fix (as root): apt-get install {package}"))
    return path


def _roundtrip(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    sc = ReplyScanner()
    while True:
        data = sock.recv(1 << 20)
        if not data:
            raise BenchError("connection closed before the reply")
        sc.feed(data)
        reply = sc.next()
        if reply is not None:
            return reply


def start_redis_servers(redis_server: str, n: int, tmp: Path, procs: list[subprocess.Popen]) -> list[int]:
    """Start `n` throw-away redis-servers (no persistence) on free ports; their processes are
    added to `procs` as they start (for `stop_all`); returns the ports."""
    ports = []
    for _ in range(n):
        port = _free_port()
        p = subprocess.Popen([redis_server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no", "--dir", str(tmp), "--protected-mode", "no"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(p)
        _wait_port(port, p, "redis-server")
        ports.append(port)
    return ports


def stop_all(procs: list[subprocess.Popen], tmp: Path) -> None:
    """Stop what a bench started (last started first) and remove its scratch folder."""
    for p in reversed(procs):
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
    shutil.rmtree(tmp, ignore_errors=True)


def start_twemproxy_on(nutcracker: str, tmp: Path, conf: str, backends: list[int], hash_name: str,
                       procs: list[subprocess.Popen], connections: int = 1) -> tuple[int, subprocess.Popen]:
    """A nutcracker (ketama, `hash_name`, `connections` per server) in front of `backends`,
    its config written to tmp/conf; (port, process), the process added to `procs`."""
    port = _free_port()
    (tmp / conf).write_text(
        "bench:\n"
        f"  listen: 127.0.0.1:{port}\n  hash: {hash_name}\n  distribution: ketama\n  redis: true\n"
        f"  auto_eject_hosts: false\n  server_connections: {connections}\n  servers:\n"
        + "".join(f"   - 127.0.0.1:{p}:1\n" for p in backends))
    proc = subprocess.Popen([nutcracker, "-c", str(tmp / conf), "-s", str(_free_port()),
                             "-o", str(tmp / (conf + ".log"))], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs.append(proc)
    _wait_port(port, proc, "nutcracker")
    return port, proc


@contextlib.contextmanager
def servers_and_proxies(tag: str) -> Iterator[tuple[list[int], int, int, Path]]:
    """Two throw-away redis-servers with the splicer (one worker, pool 2) and twemproxy
    (server_connections 2) in front of both, md5 ketama: (server ports, splicer port, twemproxy port, scratch folder). Everything
    is stopped and removed on exit."""
    redis_server = _need("redis-server", "redis-server")
    nutcracker = _need("nutcracker", "nutcracker")
    procs: list[subprocess.Popen] = []
    tmp = Path(tempfile.mkdtemp(prefix=f"shmfabric-bench-{tag}-"))
    try:
        servers = start_redis_servers(redis_server, 2, tmp, procs)
        sp_port, _ = start_splicer_on(servers, 1, 2, "md5", procs)
        nc_port, _ = start_twemproxy_on(nutcracker, tmp, "nutcracker.yml", servers, "md5", procs, connections=2)
        yield servers, sp_port, nc_port, tmp
    finally:
        stop_all(procs, tmp)


def start_splicer_on(backends: list[int], workers: int, pool: int, hash_name: str,
                     procs: list[subprocess.Popen]) -> tuple[int, subprocess.Popen]:
    """`shmfabric splice redis` in front of `backends` (no health checks); (port, process)."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "shmfabric.cli.main", "splice", "redis", "--listen", f"127.0.0.1:{port}",
         *[x for p in backends for x in ("--server", f"127.0.0.1:{p}")], "--pool", str(pool),
         "--hash", hash_name, "--no-health", "--workers", str(workers)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    procs.append(proc)
    _wait_port(port, proc, f"shmfabric splice redis --workers {workers}")
    return port, proc


def _command(port: int, *args: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        return _roundtrip(s, encode_command(list(args)))


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds a process has used (/proc/PID/stat utime, stime)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / _CLK_TCK, int(fields[12]) / _CLK_TCK


def _redis_benchmark(port: int, requests: int) -> dict[str, float]:
    return _redis_benchmarks([port], requests, 50)


def _redis_benchmarks(ports: list[int], requests: int, clients: int) -> dict[str, float]:
    """`redis-benchmark -P 16 -c CLIENTS -t set,get` on each port at once; ops/s summed."""
    cmd = [_need("redis-benchmark", "redis-tools"), "-h", "127.0.0.1", "-P", "16", "-c", str(clients),
           "-t", "set,get", "-n", str(requests), "-r", "100000", "-q"]
    runs = [subprocess.Popen([*cmd, "-p", str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for port in ports]
    total: dict[str, float] = {}
    for port, proc in zip(ports, runs):
        try:
            out, err = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise BenchError(f"redis-benchmark on port {port} did not finish in 600 s") from None
        text = out.replace("\r", "\n")
        found = dict(re.findall(r"^(SET|GET): ([0-9.]+) requests per second", text, re.M))
        if "SET" not in found or "GET" not in found:
            raise BenchError(f"redis-benchmark on port {port} gave no figures: {text[-300:]!r} {err[-300:]!r}")
        for k, v in found.items():
            total[k.lower()] = total.get(k.lower(), 0.0) + float(v)
    return total


def _family_cpu_times(pid: int) -> tuple[float, float]:
    """User and system CPU time of a process and its live children (the splicer's master and
    its forked workers)."""
    try:
        kids = [int(c) for c in open(f"/proc/{pid}/task/{pid}/children").read().split()]
    except OSError:
        kids = []
    times = [_cpu_times(p) for p in [pid, *kids]]
    return sum(t[0] for t in times), sum(t[1] for t in times)


def _family_cpu_seconds(pid: int) -> float:
    """CPU time of a process and its live children."""
    return sum(_family_cpu_times(pid))


def round_trips(port: int, payload: bytes, runs: int, check: Any = None) -> list[float]:
    """Seconds of `runs` round trips of `payload` on one connection (TCP_NODELAY), sorted, after
    a warm-up of up to 50; `check(first_reply)` may raise BenchError on a wrong answer."""
    times = []
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        first = _roundtrip(s, payload)
        if check is not None:
            check(first)
        for _ in range(min(50, runs)):  # warm up
            _roundtrip(s, payload)
        for _ in range(runs):
            t0 = time.perf_counter()
            _roundtrip(s, payload)
            times.append(time.perf_counter() - t0)
    times.sort()
    return times


def _mget_latency(port: int, keys: list[bytes], runs: int) -> dict[str, float]:
    def check(first: bytes) -> None:
        if not first.startswith(b"*%d\r\n" % len(keys)) or b"$-1\r\n" in first:
            raise BenchError(f"MGET on port {port} did not return all {len(keys)} values: {first[:80]!r}")

    times = round_trips(port, encode_command([b"MGET", *keys]), runs, check)
    return {"p50_ms": statistics.median(times) * 1000, "p99_ms": times[min(len(times) - 1, int(len(times) * 0.99))] * 1000}


def _mget_calls(port: int) -> int:
    """How many MGETs the redis-server on `port` has run (INFO commandstats: cmdstat_mget calls)."""
    m = re.search(rb"^cmdstat_mget:calls=(\d+)", _command(port, b"INFO", b"commandstats"), re.M)
    return int(m.group(1)) if m else 0


def _median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median over `runs` of each number they all have; the runs themselves under `runs`."""
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "position"]
    out: dict[str, Any] = {k: statistics.median(r[k] for r in runs) for k in keys}
    out["runs"] = runs
    return out


def _ratios(f: Callable[[str], dict[str, Any]], two_each: bool) -> dict[str, float]:
    """The ratios of the figures `f(name)` gives (medians, or one round's runs)."""
    out = {
        "set_ops_vs_twemproxy": f("splicer")["set"] / f("twemproxy")["set"],
        "get_ops_vs_twemproxy": f("splicer")["get"] / f("twemproxy")["get"],
        "mget_p50_vs_direct": f("mget_splicer")["p50_ms"] / f("mget_direct")["p50_ms"],
        "mget_p99_vs_direct": f("mget_splicer")["p99_ms"] / f("mget_direct")["p99_ms"],
        "mget_p50_vs_twemproxy": f("mget_splicer")["p50_ms"] / f("mget_twemproxy")["p50_ms"],
        "mget_relay_floor_vs_direct": f("mget_relay_one")["p50_ms"] / f("mget_direct")["p50_ms"],
        "cpu_per_request_twemproxy_vs_splicer": f("twemproxy")["cpu_us_per_request"] / f("splicer")["cpu_us_per_request"],
    }
    if two_each:
        out["set_ops_vs_twemproxy_two_each"] = f("splicer_x2")["set"] / f("twemproxy_x2")["set"]
        out["get_ops_vs_twemproxy_two_each"] = f("splicer_x2")["get"] / f("twemproxy_x2")["get"]
    return out


def run(requests: int = 200_000, mget_runs: int = 300, pool: int = 2, hash_name: str = "md5",
        two_each: bool = True, rounds: int = 2) -> dict[str, Any]:
    """Run the whole comparison and return the figures (see the module docstring)."""
    if rounds < 1:
        raise BenchError("rounds must be at least 1")
    redis_server = _need("redis-server", "redis-server")
    nutcracker = _need("nutcracker", "nutcracker")
    haproxy = _need("haproxy", "haproxy")
    procs: list[subprocess.Popen] = []
    tmp = Path(tempfile.mkdtemp(prefix="shmfabric-bench-redis-"))
    try:
        # two servers the proxies spread keys over, and a third that holds every MGET key ("direct")
        servers = start_redis_servers(redis_server, 3, tmp, procs)
        server_pids = [p.pid for p in procs[:3]]
        spread, direct = servers[:2], servers[2]

        def start_twemproxy(conf: str, backends: list[int] = spread) -> tuple[int, subprocess.Popen]:
            # as many connections per server as the splicer's pool: the same lanes for both
            return start_twemproxy_on(nutcracker, tmp, conf, backends, hash_name, procs, connections=pool)

        def start_splicer(workers: int, backends: list[int] = spread) -> tuple[int, subprocess.Popen]:
            return start_splicer_on(backends, workers, pool, hash_name, procs)

        def start_tcp_relay(backend: int) -> tuple[int, subprocess.Popen]:
            port = _free_port()
            (tmp / "haproxy-tcp.cfg").write_text(
                "global\n  maxconn 64\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n"
                f"  timeout server 60s\nlisten relay\n  bind 127.0.0.1:{port}\n  server s0 127.0.0.1:{backend}\n")
            proc = subprocess.Popen([haproxy, "-db", "-f", str(tmp / "haproxy-tcp.cfg")],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(proc)
            _wait_port(port, proc, "haproxy (mode tcp)")
            return port, proc

        nc_port, nc = start_twemproxy("nutcracker.yml")
        sp_port, sp = start_splicer(1)
        # The relay floor (point 4 of the docstring): every proxy here adds at least this hop.
        relay_port, relay = start_tcp_relay(direct)
        nc1_port, nc1 = start_twemproxy("nutcracker-one.yml", [direct])
        sp1_port, sp1 = start_splicer(1, [direct])

        result: dict[str, Any] = {"requests": requests, "mget_runs": mget_runs, "pool": pool,
                                  "twemproxy_server_connections": pool, "hash": hash_name, "rounds": rounds}
        runs: dict[str, list[dict[str, Any]]] = {}
        order: dict[str, list[str]] = {"throughput": [], "mget": []}

        def in_order(rows: list, r: int) -> list:
            return rows if r % 2 == 0 else rows[::-1]  # A B, then B A: each peer first in every other round

        x2_rows: list = []
        if two_each:
            # Two each: a second twemproxy (it is single-threaded) next to the first, against a
            # splicer with two workers on one port; two redis-benchmarks of 25 clients at once,
            # one per twemproxy, both on the splicer's port.
            nc2_port, nc2 = start_twemproxy("nutcracker2.yml")
            sp2_port, sp2 = start_splicer(2)
            time.sleep(0.5)  # both workers listening
            x2_rows = [("twemproxy_x2", [nc_port, nc2_port], [nc.pid, nc2.pid]), ("splicer_x2", [sp2_port, sp2_port], [sp2.pid])]
        one_rows = [("twemproxy", [nc_port], [nc.pid]), ("splicer", [sp_port], [sp.pid])]
        # Besides ops/s, the CPU time each proxy process used per request: on a shared machine
        # the wall-clock rate swings with what else runs, the CPU cost per request does not.
        for r in range(rounds):
            for name, ports, pids in in_order(x2_rows, r) + in_order(one_rows, r):
                cpu0 = sum(_family_cpu_seconds(p) for p in pids)
                if len(ports) == 1:
                    fig = _redis_benchmark(ports[0], requests)
                else:
                    fig = _redis_benchmarks(ports, requests // 2, 25)
                fig["cpu_us_per_request"] = (sum(_family_cpu_seconds(p) for p in pids) - cpu0) / (2 * requests) * 1e6
                order["throughput"].append(name)
                fig["position"] = len(order["throughput"])
                runs.setdefault(name, []).append(fig)

        keys = [b"mget:%d" % i for i in range(1000)]
        _command(sp_port, b"MSET", *[x for k in keys for x in (k, b"v" * 32)])  # spread by ketama
        _command(direct, b"MSET", *[x for k in keys for x in (k, b"v" * 32)])  # all on the third server
        # The third server holds every key, so "direct" reads all 1000 from one server; the two
        # spread servers hold each key only where ketama put it, which is what the proxies read.
        owners = [int(_command(p, b"EXISTS", *keys[:200])[1:-2]) for p in spread]
        result["mget_spread_over"] = {"server0_of_first_200": owners[0], "server1_of_first_200": owners[1]}
        # Where an MGET's time goes: CPU per MGET of the proxy (user and system) and of the
        # servers, next to the latency. Each process's work lies on the MGET's critical path
        # unless it overlaps another's, so this is the budget the 1.5x target leaves a proxy.
        per = mget_runs + min(50, mget_runs) + 1
        mget_rows = [("direct", direct, None), ("splicer", sp_port, sp), ("twemproxy", nc_port, nc),
                     ("relay_one", relay_port, relay), ("twemproxy_one", nc1_port, nc1), ("splicer_one", sp1_port, sp1)]
        for r in range(rounds):
            for name, port, proc in in_order(mget_rows, r):
                pids = ([proc.pid] if proc is not None else []) + server_pids
                calls0 = [_mget_calls(p) for p in servers]
                before = [_family_cpu_times(pid) for pid in pids]
                m = _mget_latency(port, keys, mget_runs)
                used = [(u1 - u0, s1 - s0) for (u0, s0), (u1, s1) in zip(before, (_family_cpu_times(pid) for pid in pids))]
                calls = [c1 - c0 for c0, c1 in zip(calls0, (_mget_calls(p) for p in servers))]
                m["mget_calls"] = {"server0": calls[0], "server1": calls[1], "direct": calls[2]}
                if name in ("splicer", "twemproxy") and min(calls[:2]) == 0:
                    raise BenchError(f"the MGETs through {name} reached only one of the two servers (MGETs run by "
                                     f"each, INFO commandstats: {calls[0]}, {calls[1]}): not spread")
                if proc is not None:
                    (pu, ps), used = used[0], used[1:]
                    m["cpu_us_per_mget"] = (pu + ps) / per * 1e6
                    m["proxy_user_us_per_mget"] = pu / per * 1e6
                    m["proxy_sys_us_per_mget"] = ps / per * 1e6
                m["servers_cpu_us_per_mget"] = sum(u + s for u, s in used) / per * 1e6
                order["mget"].append(name)
                m["position"] = len(order["mget"])
                runs.setdefault(f"mget_{name}", []).append(m)
        for name, rs in runs.items():
            result[name] = _median_of(rs)
            if "proxy_user_us_per_mget" in result[name]:  # so that user + sys = the total shown
                result[name]["cpu_us_per_mget"] = (result[name]["proxy_user_us_per_mget"]
                                                   + result[name]["proxy_sys_us_per_mget"])
        # MGETs each server ran, summed over the rounds: the proxies' on both spread servers
        result["mget_calls"] = {name: {k: sum(m["mget_calls"][k] for m in runs[f"mget_{name}"])
                                       for k in ("server0", "server1", "direct")} for name, _, _ in mget_rows}
        result["order"] = order
        result["ratios"] = _ratios(lambda name: result[name], two_each)
        result["ratios_per_round"] = [_ratios(lambda name: runs[name][r], two_each) for r in range(rounds)]
        result["targets_met"] = {
            "ops_at_least_0.5x_twemproxy": min(v for k, v in result["ratios"].items() if k.startswith(("set_ops", "get_ops"))) >= 0.5,
            "mget_at_most_1.5x_direct": result["ratios"]["mget_p50_vs_direct"] <= 1.5,
        }
        return result
    finally:
        stop_all(procs, tmp)


def format_table(r: dict[str, Any]) -> str:
    """The figures as a fixed-width table with ratios (medians over the rounds; the ratio of
    each round in the last column)."""
    per_round = r.get("ratios_per_round") or [r["ratios"]]

    def rounds(key: str) -> str:
        return " ".join(f"{x[key]:.2f}" for x in per_round)
    rows = [
        ("redis-benchmark -P16 -c50 SET ops/s", r["twemproxy"]["set"], r["splicer"]["set"], "set_ops_vs_twemproxy", ">= 0.5x twemproxy"),
        ("redis-benchmark -P16 -c50 GET ops/s", r["twemproxy"]["get"], r["splicer"]["get"], "get_ops_vs_twemproxy", ">= 0.5x twemproxy"),
    ]
    if "twemproxy_x2" in r:
        rows += [
            ("  two each (2 twemproxies / 2 workers) SET", r["twemproxy_x2"]["set"], r["splicer_x2"]["set"],
             "set_ops_vs_twemproxy_two_each", ">= 0.5x twemproxy"),
            ("  two each (2 twemproxies / 2 workers) GET", r["twemproxy_x2"]["get"], r["splicer_x2"]["get"],
             "get_ops_vs_twemproxy_two_each", ">= 0.5x twemproxy"),
        ]
    tc, sc = r["twemproxy"]["cpu_us_per_request"], r["splicer"]["cpu_us_per_request"]
    lines = [f"{'measure':40} {'twemproxy':>12} {'splicer':>12} {'ratio':>7}  {'target':17}  per round",
             *(f"{name:40} {a:12,.0f} {b:12,.0f} {r['ratios'][key]:6.2f}x  {t:17}  {rounds(key)}"
               for name, a, b, key, t in rows),
             f"{'proxy CPU us per request (SET+GET)':40} {tc:12.2f} {sc:12.2f} {tc / sc:6.2f}x  {'(twemproxy/splicer)':17}  "
             f"{rounds('cpu_per_request_twemproxy_vs_splicer')}",
             "",
             f"{'MGET 1000 keys, latency ms':40} {'direct':>12} {'splicer':>12} {'ratio':>7}  target   (twemproxy)  per round"]
    for q in ("p50", "p99"):
        d, s, t = r["mget_direct"][f"{q}_ms"], r["mget_splicer"][f"{q}_ms"], r["mget_twemproxy"][f"{q}_ms"]
        lines.append(f"{'  ' + q:40} {d:12.3f} {s:12.3f} {s / d:6.2f}x  {'<= 1.5x' if q == 'p50' else '':8} ({t:.3f})"
                     f"{'':5}{rounds(f'mget_{q}_vs_direct')}")
    ms, mt = r["mget_splicer"], r["mget_twemproxy"]
    if "proxy_user_us_per_mget" in ms:
        lines.append(f"{'  proxy CPU us per MGET (user + sys)':40} {'':12} "
                     f"{ms['proxy_user_us_per_mget']:7.0f} +{ms['proxy_sys_us_per_mget']:4.0f} {'':7}  {'':8} "
                     f"({mt['proxy_user_us_per_mget']:.0f} + {mt['proxy_sys_us_per_mget']:.0f})")
        lines.append(f"{'  redis-servers CPU us per MGET':40} {r['mget_direct']['servers_cpu_us_per_mget']:12.0f} "
                     f"{ms['servers_cpu_us_per_mget']:12.0f} {'':7}  {'':8} ({mt['servers_cpu_us_per_mget']:.0f})")
    else:
        lines.append(f"{'  proxy CPU us per MGET':40} {'':12} {ms['cpu_us_per_mget']:12.0f} {'':7}  {'':8} "
                     f"({mt['cpu_us_per_mget']:.0f})")
    if "mget_calls" in r:
        c = r["mget_calls"]
        lines.append(f"  MGETs run by the two spread servers (INFO commandstats): splicer {c['splicer']['server0']:,} + "
                     f"{c['splicer']['server1']:,}, twemproxy {c['twemproxy']['server0']:,} + {c['twemproxy']['server1']:,}; "
                     f"direct: a third server holding all keys")
    if "mget_relay_one" in r:
        d = r["mget_direct"]["p50_ms"]
        lines.append("  the floor: the same MGET to the one server that holds all keys, through")
        for key, label in (("relay_one", "haproxy mode tcp (byte relay, C)"), ("twemproxy_one", "twemproxy, one server"),
                           ("splicer_one", "splicer, one server")):
            m = r[f"mget_{key}"]
            lines.append(f"{'    ' + label:40} {d:12.3f} {m['p50_ms']:12.3f} {m['p50_ms'] / d:6.2f}x  p50, "
                         f"proxy CPU {m['cpu_us_per_mget']:.0f} us")
    lines.append("")
    conns = r.get("twemproxy_server_connections", 1)
    lines.append(f"one process each (and two each where marked); splicer pool {r['pool']} per server, twemproxy "
                 f"server_connections {conns}; hash {r['hash']}; {r['requests']} requests per test, "
                 f"{r['mget_runs']} MGET runs")
    if "order" in r:
        short = {"twemproxy": "T", "splicer": "S", "twemproxy_x2": "T2", "splicer_x2": "S2"}
        lines.append(f"medians of {r['rounds']} round(s), order alternating: throughput "
                     f"{' '.join(short.get(n, n) for n in r['order']['throughput'])}; MGET rows "
                     f"{' '.join(r['order']['mget'][:len(r['order']['mget']) // r['rounds']])}, then reversed")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    def options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--requests", type=int, default=200_000, help="redis-benchmark -n (default 200000)")
        parser.add_argument("--mget-runs", type=int, default=300, help="timed MGET round trips (default 300)")
        parser.add_argument("--pool", type=int, default=2,
                            help="splicer connections per server, and twemproxy's server_connections (default 2)")
        parser.add_argument("--rounds", type=int, default=2,
                            help="rounds of each measurement, the peers' order alternating (default 2)")
        parser.add_argument("--hash", default="md5", help="key hash for both proxies (default md5)")
        parser.add_argument("--one-each", action="store_true", help="skip the two-each comparison")

    return bench_main("splice_redis", __doc__, argv, options,
                      lambda a: run(a.requests, a.mget_runs, a.pool, a.hash, two_each=not a.one_each,
                                     rounds=a.rounds), format_table)


if __name__ == "__main__":
    sys.exit(main())
