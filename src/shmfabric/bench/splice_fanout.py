"""Whole-server Redis commands through the splicer, against the same work sent straight to the servers.

    python -m shmfabric.bench.splice_fanout [--json] [--keys N] [--runs N]
    shmfabric bench splice --scenario fanout

Two redis-servers (no persistence), the splicer (one worker) and twemproxy (one process) in front
of both, `--keys` keys written through the splicer, so each server holds its share. Side by side:

1. SCAN of every key (COUNT 1000, redis-py's `scan_iter`): one loop through the splicer, whose
   cursor walks the servers in turn, against one loop per server straight to it (the same client
   code, times added up): what a client gives up by scanning through the proxy. Median of `--runs`
   runs; the keys each found (must be all of them).
2. DBSIZE: p50 latency through the splicer (it asks both servers and adds up) against one server
   answered directly.
3. redis-py `Lock`: acquire + release cycles per second on one connection, through the splicer
   and straight to one server. Release runs a Lua script by EVALSHA, loaded by SCRIPT LOAD the
   first time.
4. twemproxy, for the record: what it answers to SCAN, DBSIZE and a Lock's release (it refuses
   whole-server commands, SCRIPT LOAD among them).

No target: the issue sets none for these. The ratios say what the proxy costs.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

from shmfabric.splicer.redis_resp import encode_command

from .splice_redis import bench_main, BenchError, _command, round_trips, servers_and_proxies

__all__ = ["run", "format_table", "main"]


def _client(port: int):
    import redis

    # RESP2: twemproxy closes a connection that opens with redis-py 8's default HELLO 3.
    return redis.Redis(host="127.0.0.1", port=port, protocol=2, socket_timeout=30)


def _scan_all(ports: list[int], runs: int) -> dict[str, Any]:
    """Median seconds to SCAN every key on `ports` one after the other, and the keys found."""
    times, found = [], 0
    for p in ports:  # warm up: the proxy's first use of a server connection is not the scan's cost
        next(iter(_client(p).scan_iter(count=1000)), None)
    for _ in range(runs):
        t0 = time.perf_counter()
        found = sum(sum(1 for _ in _client(p).scan_iter(count=1000)) for p in ports)
        times.append(time.perf_counter() - t0)
    return {"seconds": statistics.median(times), "keys_found": found}


def _latency(port: int, payload: bytes, runs: int) -> float:
    """p50 round trip of one request, ms."""
    return statistics.median(round_trips(port, payload, runs)) * 1000


def _lock_rate(port: int, cycles: int) -> float:
    """redis-py Lock acquire + release cycles per second, one connection."""
    r = _client(port)
    locks = [r.lock(f"bench:lock:{i}", timeout=10) for i in range(16)]
    for lock in locks:  # first release loads the script (SCRIPT LOAD after NOSCRIPT)
        lock.acquire(blocking=False)
        lock.release()
    t0 = time.perf_counter()
    for i in range(cycles):
        lock = locks[i % 16]
        if not lock.acquire(blocking=False):
            raise BenchError(f"a free lock could not be taken on port {port}")
        lock.release()
    return cycles / (time.perf_counter() - t0)


def _peer_answer(port: int, *args: bytes) -> str:
    """What a peer answers to one command, as text (its error, or that it closed the connection)."""
    try:
        reply = _command(port, *args)
    except (BenchError, OSError) as exc:
        return f"no answer ({exc})"
    return reply[:120].decode(errors="replace").strip()


def _peer_lock(port: int) -> str:
    try:
        lock = _client(port).lock("bench:peer-lock", timeout=10)
        lock.acquire(blocking=False)
        lock.release()
    except Exception as exc:  # redis-py's ConnectionError/ResponseError, whichever the peer causes
        return f"{type(exc).__name__}: {exc}"[:160]
    return "works"


def run(keys: int = 100_000, runs: int = 3, dbsize_runs: int = 300, lock_cycles: int = 3000) -> dict[str, Any]:
    """Run the comparison (module docstring) and return the figures."""
    with servers_and_proxies("fanout") as (servers, sp_port, nc_port, tmp):
        for start in range(0, keys, 1000):
            _command(sp_port, b"MSET", *[x for i in range(start, min(keys, start + 1000)) for x in (b"fan:%d" % i, b"v")])
        held = [int(_command(p, b"DBSIZE")[1:-2]) for p in servers]
        result: dict[str, Any] = {"keys": keys, "runs": runs, "held_per_server": held}
        result["scan"] = {"splicer": _scan_all([sp_port], runs), "direct": _scan_all(servers, runs)}
        dbsize = encode_command([b"DBSIZE"])
        result["dbsize_p50_ms"] = {"splicer": _latency(sp_port, dbsize, dbsize_runs),
                                   "direct": _latency(servers[0], dbsize, dbsize_runs)}
        result["lock_cycles_per_s"] = {"splicer": _lock_rate(sp_port, lock_cycles),
                                       "direct": _lock_rate(servers[0], lock_cycles)}
        result["twemproxy"] = {"SCAN 0": _peer_answer(nc_port, b"SCAN", b"0"),
                               "DBSIZE": _peer_answer(nc_port, b"DBSIZE"),
                               "redis-py Lock acquire + release": _peer_lock(nc_port)}
        result["ratios"] = {
            "scan_time_splicer_vs_direct": result["scan"]["splicer"]["seconds"] / result["scan"]["direct"]["seconds"],
            "dbsize_p50_splicer_vs_direct": result["dbsize_p50_ms"]["splicer"] / result["dbsize_p50_ms"]["direct"],
            "lock_rate_splicer_vs_direct": result["lock_cycles_per_s"]["splicer"] / result["lock_cycles_per_s"]["direct"],
        }
        return result


def format_table(r: dict[str, Any]) -> str:
    """The figures as a fixed-width table with ratios."""
    sc, ra = r["scan"], r["ratios"]
    lines = [f"{'whole-server commands, ' + format(r['keys'], ',') + ' keys on 2 servers':52} {'direct':>12} {'splicer':>12} {'ratio':>7}",
             f"{'SCAN every key (COUNT 1000), s, median of ' + str(r['runs']):52} {sc['direct']['seconds']:12.3f} "
             f"{sc['splicer']['seconds']:12.3f} {ra['scan_time_splicer_vs_direct']:6.2f}x",
             f"{'  keys found':52} {sc['direct']['keys_found']:12,} {sc['splicer']['keys_found']:12,}",
             f"{'DBSIZE p50 ms (direct: one server)':52} {r['dbsize_p50_ms']['direct']:12.3f} "
             f"{r['dbsize_p50_ms']['splicer']:12.3f} {ra['dbsize_p50_splicer_vs_direct']:6.2f}x",
             f"{'redis-py Lock acquire+release per s (one server)':52} {r['lock_cycles_per_s']['direct']:12,.0f} "
             f"{r['lock_cycles_per_s']['splicer']:12,.0f} {ra['lock_rate_splicer_vs_direct']:6.2f}x",
             "", "twemproxy (same servers), for the record:"]
    lines += [f"  {cmd:34} {answer}" for cmd, answer in r["twemproxy"].items()]
    lines.append(f"\nkeys held per server: {', '.join(format(h, ',') for h in r['held_per_server'])}; "
                 "splicer: one worker, pool 2, md5 ketama")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    def options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--keys", type=int, default=100_000, help="keys written (default 100000)")
        parser.add_argument("--runs", type=int, default=3, help="full SCANs per side (default 3)")
        parser.add_argument("--lock-cycles", type=int, default=3000, help="Lock acquire+release cycles per side (default 3000)")

    return bench_main("splice_fanout", __doc__, argv, options,
                      lambda a: run(a.keys, a.runs, lock_cycles=a.lock_cycles), format_table)


if __name__ == "__main__":
    sys.exit(main())
