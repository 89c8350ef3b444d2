"""Redis pub/sub and blocking queues through the splicer, against the same sent straight to the server.

    python -m shmfabric.bench.splice_pubsub [--json] [--messages N] [--runs N]
    shmfabric bench splice --scenario pubsub

Two redis-servers (no persistence), the splicer (one worker, pool 2) in front of both, and
twemproxy beside it for the record. One channel, placed by the splicer on one of the servers;
"direct" talks to that server. The same raw-socket client code on both sides:

1. delivery latency: a publisher and a subscriber connection; PUBLISH one 32-byte message, and
   time until the subscriber has it (the publisher's reply read too). p50 and p99 over `--runs`.
2. throughput: PUBLISH pipelined in batches of 100 on one connection, each batch's replies and
   its 100 messages read before the next: messages delivered per second over `--messages`.
3. queue hand-off: a consumer blocked in BLPOP, a producer RPUSHes one item; time from the
   RPUSH sent until the consumer has the item. p50 over `--runs` (each after a 1 ms pause, so
   the BLPOP is waiting when the item comes).
4. twemproxy, for the record: what it answers to SUBSCRIBE and to BLPOP.

No target: the issue sets none for pub/sub or blocking commands. The ratios say what the proxy
costs.
"""
from __future__ import annotations

import argparse
import socket
import sys
import time
from typing import Any

from shmfabric.splicer.redis_resp import ReplyScanner, encode_command

from .splice_redis import bench_main, BenchError, servers_and_proxies

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
    return _percentiles(times)


def _percentiles(times: list[float]) -> dict[str, float]:
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


def _handoff(port: int, runs: int) -> dict[str, float]:
    consumer, producer = _Conn(port), _Conn(port)
    key = b"bench:queue"
    blpop = encode_command([b"BLPOP", key, b"0"])
    rpush = encode_command([b"RPUSH", key, _PAYLOAD])
    want = b"*2\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(key), key, len(_PAYLOAD), _PAYLOAD)
    times = []
    try:
        for i in range(runs + min(50, runs)):
            consumer.sock.sendall(blpop)
            time.sleep(0.001)
            t0 = time.perf_counter()
            producer.sock.sendall(rpush)
            got = consumer.read(1)[0]
            t1 = time.perf_counter()
            producer.read(1)
            if got != want:
                raise BenchError(f"BLPOP on port {port} answered {got[:80]!r}")
            if i >= min(50, runs):
                times.append(t1 - t0)
    finally:
        consumer.close()
        producer.close()
    return _percentiles(times)


def _peer_answer(port: int, command: list[bytes]) -> str:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(encode_command(command))
            data = s.recv(4096)
        return "closes the connection" if not data else data[:80].decode(errors="replace").strip()
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"


def run(messages: int = 100_000, runs: int = 2000) -> dict[str, Any]:
    """Run the comparison (module docstring) and return the figures."""
    with servers_and_proxies("pubsub") as (servers, sp_port, nc_port, tmp):
        # "direct" is the server the splicer puts the channel (placed as a key) on.
        home = next(p for p in servers if _placed_here(sp_port, p, _CHANNEL))
        result: dict[str, Any] = {"messages": messages, "runs": runs, "payload_bytes": len(_PAYLOAD)}
        result["latency"] = {"direct": _latency(home, runs), "splicer": _latency(sp_port, runs)}
        result["messages_per_s"] = {"direct": _throughput(home, messages), "splicer": _throughput(sp_port, messages)}
        queue_home = next(p for p in servers if _placed_here(sp_port, p, b"bench:queue"))
        result["handoff"] = {"direct": _handoff(queue_home, min(runs, 1000)), "splicer": _handoff(sp_port, min(runs, 1000))}
        result["twemproxy"] = {"SUBSCRIBE": _peer_answer(nc_port, [b"SUBSCRIBE", _CHANNEL]),
                               "BLPOP": _peer_answer(nc_port, [b"BLPOP", b"bench:queue", b"1"])}
        result["ratios"] = {
            "latency_p50_splicer_vs_direct": result["latency"]["splicer"]["p50_ms"] / result["latency"]["direct"]["p50_ms"],
            "rate_splicer_vs_direct": result["messages_per_s"]["splicer"] / result["messages_per_s"]["direct"],
            "handoff_p50_splicer_vs_direct": result["handoff"]["splicer"]["p50_ms"] / result["handoff"]["direct"]["p50_ms"],
        }
        return result


def _placed_here(sp_port: int, server: int, key: bytes) -> bool:
    """Does the splicer on `sp_port` put `key` on `server`? (A marker written through it.)"""
    marker = _Conn(sp_port)
    direct = _Conn(server)
    try:
        marker.sock.sendall(encode_command([b"SET", key + b":where", b"1"]))
        marker.read(1)
        direct.sock.sendall(encode_command([b"EXISTS", key + b":where"]))
        return direct.read(1)[0] == b":1\r\n"
    finally:
        marker.close()
        direct.close()


def format_table(r: dict[str, Any]) -> str:
    """The figures as a fixed-width table with ratios."""
    la, ra = r["latency"], r["ratios"]
    lines = [f"{'pub/sub and a blocking queue, 2 servers':46} {'direct':>10} {'splicer':>10} {'ratio':>7}",
             f"{'delivery latency p50 ms':46} {la['direct']['p50_ms']:10.3f} {la['splicer']['p50_ms']:10.3f} "
             f"{ra['latency_p50_splicer_vs_direct']:6.2f}x",
             f"{'delivery latency p99 ms':46} {la['direct']['p99_ms']:10.3f} {la['splicer']['p99_ms']:10.3f}",
             f"{'messages/s (PUBLISH pipelined by 100)':46} {r['messages_per_s']['direct']:10,.0f} "
             f"{r['messages_per_s']['splicer']:10,.0f} {ra['rate_splicer_vs_direct']:6.2f}x",
             f"{'BLPOP hand-off p50 ms (RPUSH sent to item got)':46} {r['handoff']['direct']['p50_ms']:10.3f} "
             f"{r['handoff']['splicer']['p50_ms']:10.3f} {ra['handoff_p50_splicer_vs_direct']:6.2f}x",
             "", f"twemproxy (same servers), SUBSCRIBE: {r['twemproxy']['SUBSCRIBE']}; "
             f"BLPOP: {r['twemproxy']['BLPOP']}",
             f"\n{r['runs']} latency runs, {r['messages']:,} messages of {r['payload_bytes']} bytes; "
             "splicer: one worker, pool 2, md5 ketama"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    def options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--messages", type=int, default=100_000, help="messages for the rate (default 100000)")
        parser.add_argument("--runs", type=int, default=2000, help="timed deliveries for the latency (default 2000)")

    return bench_main("splice_pubsub", __doc__, argv, options, lambda a: run(a.messages, a.runs), format_table)


if __name__ == "__main__":
    sys.exit(main())
