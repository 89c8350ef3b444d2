"""Redis pub/sub through the splicer, against the same messages sent straight to the server.

    python -m shmfabric.bench.splice_pubsub [--json] [--messages N] [--runs N]
    shmfabric bench splice --scenario pubsub

Two redis-servers (no persistence), the splicer (one worker, pool 2) in front of both, and
twemproxy beside it for the record. One channel, placed by the splicer on one of the servers;
"direct" talks to that server. The same raw-socket client code on both sides:

1. delivery latency: a publisher and a subscriber connection; PUBLISH one 32-byte message, and
   time until the subscriber has it (the publisher's reply read too). p50 and p99 over `--runs`.
2. throughput: PUBLISH pipelined in batches of 100 on one connection, each batch's replies and
   its 100 messages read before the next: messages delivered per second over `--messages`.
3. twemproxy, for the record: what it answers to SUBSCRIBE.

No target: the issue sets none for pub/sub. The ratios say what the proxy costs.
"""
from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from shmfabric.splicer.redis_resp import ReplyScanner, encode_command

from .splice_redis import BenchError, _need, start_redis_servers, start_splicer_on, start_twemproxy_on, stop_all

__all__ = ["run", "format_table", "main"]

_CHANNEL = b"bench:pubsub"
_PAYLOAD = b"m" * 32


class _Conn:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.scanner = ReplyScanner()

    def read(self, n: int) -> list[bytes]:
        out: list[bytes] = []
        sc = self.scanner
        while True:
            while len(out) < n and (r := sc.next()) is not None:
                out.append(r)
            if len(out) >= n:
                return out
            data = self.sock.recv(1 << 20)
            if not data:
                raise BenchError(f"connection closed after {len(out)} of {n} replies: {out[-1:]!r}")
            sc.feed(data)

    def close(self) -> None:
        self.sock.close()


def _pair(port: int) -> tuple[_Conn, _Conn]:
    sub, pub = _Conn(port), _Conn(port)
    sub.sock.sendall(encode_command([b"SUBSCRIBE", _CHANNEL]))
    confirm = sub.read(1)[0]
    if b"subscribe" not in confirm:
        raise BenchError(f"SUBSCRIBE on port {port} answered {confirm[:80]!r}")
    return sub, pub


def _latency(port: int, runs: int) -> dict[str, float]:
    sub, pub = _pair(port)
    publish = encode_command([b"PUBLISH", _CHANNEL, _PAYLOAD])
    times = []
    try:
        for i in range(runs + min(50, runs)):
            t0 = time.perf_counter()
            pub.sock.sendall(publish)
            got = sub.read(1)[0]
            t1 = time.perf_counter()
            reply = pub.read(1)[0]
            if reply != b":1\r\n":
                raise BenchError(f"PUBLISH on port {port} answered {reply[:80]!r} (one subscriber expected)")
            if not got.endswith(_PAYLOAD + b"\r\n"):
                raise BenchError(f"the subscriber on port {port} got {got[:80]!r}")
            if i >= min(50, runs):  # after the warm-up
                times.append(t1 - t0)
    finally:
        sub.close()
        pub.close()
    times.sort()
    return {"p50_ms": times[len(times) // 2] * 1e3, "p99_ms": times[min(len(times) - 1, int(len(times) * 0.99))] * 1e3}


def _throughput(port: int, messages: int, batch: int = 100) -> float:
    sub, pub = _pair(port)
    burst = encode_command([b"PUBLISH", _CHANNEL, _PAYLOAD]) * batch
    try:
        pub.sock.sendall(burst)  # warm up
        pub.read(batch)
        sub.read(batch)
        t0 = time.perf_counter()
        for _ in range(messages // batch):
            pub.sock.sendall(burst)
            pub.read(batch)
            sub.read(batch)
        return (messages // batch) * batch / (time.perf_counter() - t0)
    finally:
        sub.close()
        pub.close()


def _peer_answer(port: int) -> str:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(encode_command([b"SUBSCRIBE", _CHANNEL]))
            data = s.recv(4096)
        return "closes the connection" if not data else data[:80].decode(errors="replace").strip()
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"


def run(messages: int = 100_000, runs: int = 2000) -> dict[str, Any]:
    """Run the comparison (module docstring) and return the figures."""
    redis_server = _need("redis-server", "redis-server")
    nutcracker = _need("nutcracker", "nutcracker")
    procs: list = []
    tmp = Path(tempfile.mkdtemp(prefix="shmfabric-bench-pubsub-"))
    try:
        servers = start_redis_servers(redis_server, 2, tmp, procs)
        sp_port, _ = start_splicer_on(servers, 1, 2, "md5", procs)
        nc_port, _ = start_twemproxy_on(nutcracker, tmp, "nutcracker.yml", servers, "md5", procs)
        # "direct" is the server the splicer put the channel on: find it by its subscriber.
        sub, _pub = _pair(sp_port)
        home = next(p for p in servers if _count(p) == 1)
        sub.close()
        _pub.close()
        result: dict[str, Any] = {"messages": messages, "runs": runs, "payload_bytes": len(_PAYLOAD)}
        result["latency"] = {"direct": _latency(home, runs), "splicer": _latency(sp_port, runs)}
        result["messages_per_s"] = {"direct": _throughput(home, messages), "splicer": _throughput(sp_port, messages)}
        result["twemproxy"] = {"SUBSCRIBE": _peer_answer(nc_port)}
        result["ratios"] = {
            "latency_p50_splicer_vs_direct": result["latency"]["splicer"]["p50_ms"] / result["latency"]["direct"]["p50_ms"],
            "rate_splicer_vs_direct": result["messages_per_s"]["splicer"] / result["messages_per_s"]["direct"],
        }
        return result
    finally:
        stop_all(procs, tmp)


def _count(port: int) -> int:
    c = _Conn(port)
    try:
        c.sock.sendall(encode_command([b"PUBSUB", b"NUMSUB", _CHANNEL]))
        reply = c.read(1)[0]
        return int(reply.rsplit(b":", 1)[1][:-2])
    finally:
        c.close()


def format_table(r: dict[str, Any]) -> str:
    """The figures as a fixed-width table with ratios."""
    la, ra = r["latency"], r["ratios"]
    lines = [f"{'pub/sub, one channel, 2 servers':46} {'direct':>10} {'splicer':>10} {'ratio':>7}",
             f"{'delivery latency p50 ms':46} {la['direct']['p50_ms']:10.3f} {la['splicer']['p50_ms']:10.3f} "
             f"{ra['latency_p50_splicer_vs_direct']:6.2f}x",
             f"{'delivery latency p99 ms':46} {la['direct']['p99_ms']:10.3f} {la['splicer']['p99_ms']:10.3f}",
             f"{'messages/s (PUBLISH pipelined by 100)':46} {r['messages_per_s']['direct']:10,.0f} "
             f"{r['messages_per_s']['splicer']:10,.0f} {ra['rate_splicer_vs_direct']:6.2f}x",
             "", f"twemproxy (same servers), SUBSCRIBE: {r['twemproxy']['SUBSCRIBE']}",
             f"\n{r['runs']} latency runs, {r['messages']:,} messages of {r['payload_bytes']} bytes; "
             "splicer: one worker, pool 2, md5 ketama"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shmfabric.bench.splice_pubsub", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--messages", type=int, default=100_000, help="messages for the rate (default 100000)")
    parser.add_argument("--runs", type=int, default=2000, help="timed deliveries for the latency (default 2000)")
    args = parser.parse_args(argv)
    try:
        result = run(args.messages, args.runs)
    except BenchError as exc:
        print(f"splice_pubsub bench: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2, sort_keys=True) if args.json else format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
