"""Mass insertion with `redis-cli --pipe` through the splicer, against twemproxy and one server.

    python -m shmfabric.bench.splice_pipe [--json] [--commands N]
    shmfabric bench splice --scenario pipe

Two redis-servers (no persistence); the splicer (one worker, pool 2) and twemproxy (two
connections per server, as the splicer's pool) in front of both, md5 ketama; "direct" is one of the servers alone.
Each stream of `--commands` commands is sent by a raw-socket client that writes the whole
stream while it reads (as `redis-cli --pipe` does) and counts the replies with hiredis, timed from the first byte sent to the last reply; every command must be
answered, none with an error. Each stream also goes through `redis-cli --pipe` itself (Redis's
documented way to load data), timed, with its summary line checked; twemproxy fails that one,
as it closes the connection on the ECHO that redis-cli sends last.

1. multibulk SETs, as redis-cli's documentation generates them;
2. inline SETs (`SET k v` lines), as quick scripts generate them;
3. the two alternating, command by command (the mix redis-server reads in one stream);
4. MGETs of 3 keys that the proxies spread over both servers;
5. multibulk SETs of 48-byte base64 values (each ends in '=', a third hold '+': the bytes that
   make the splicer's reader check a read's requests element by element).

twemproxy closes the connection on an inline request, so it has no figure for 2 and 3. No
target: the issue sets none for mass insertion.
"""
from __future__ import annotations

import argparse
import base64
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import hiredis

from shmfabric.splicer.redis_resp import encode_command

from .splice_redis import bench_main, _need, servers_and_proxies

__all__ = ["run", "format_table", "main", "STREAMS"]

_SUMMARY = re.compile(rb"errors: (\d+), replies: (\d+)")


def _multibulk(i: int) -> bytes:
    return encode_command([b"SET", b"pipe:%d" % i, b"v%d" % i])


def _inline(i: int) -> bytes:
    return b"SET pipe:%d v%d\r\n" % (i, i)


def _base64_set(i: int) -> bytes:
    return encode_command([b"SET", b"pipe:%d" % i, base64.b64encode((i * 2654435761 % 2**32).to_bytes(4, "big") * 8 + b"xyz")])


STREAMS: dict[str, Any] = {
    "multibulk SET": _multibulk,
    "inline SET": _inline,
    "inline and multibulk SET, alternating": lambda i: _inline(i) if i % 2 else _multibulk(i),
    "MGET of 3 keys over both servers": lambda i: encode_command([b"MGET", b"pipe:%d" % i, b"pipe:%d" % (i + 1),
                                                                  b"pipe:%d" % (i + 7)]),
    "multibulk SET, base64 values": _base64_set,
}


def _pipe(redis_cli: str, port: int, path: Path, commands: int) -> float | str:
    """Seconds `redis-cli --pipe` took to send `path` and read every reply, or why it failed."""
    with open(path, "rb") as f:
        t0 = time.perf_counter()
        proc = subprocess.run([redis_cli, "-p", str(port), "--pipe"], stdin=f, capture_output=True, timeout=300)
        took = time.perf_counter() - t0
    m = _SUMMARY.search(proc.stdout)
    if m is None or int(m.group(1)) or int(m.group(2)) != commands:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [b"no output"]
        return f"failed: {tail[0].decode(errors='replace')[:80]}"
    return took


def _raw(port: int, data: bytes, commands: int) -> float | str:
    """Seconds to send `data` and read `commands` replies (none an error), or why it failed."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    reader = hiredis.Reader()  # C: the client must not be what the streams wait on
    error = hiredis.ReplyError
    got = errors = 0
    sent: list[BaseException] = []

    def send() -> None:
        try:
            sock.sendall(data)
        except OSError as exc:
            sent.append(exc)

    try:
        t0 = time.perf_counter()
        writer = threading.Thread(target=send, daemon=True)
        writer.start()
        while got < commands:
            chunk = sock.recv(1 << 20)
            if not chunk:
                return f"closes the connection after {got:,} replies"
            reader.feed(chunk)
            while (reply := reader.gets()) is not False:
                got += 1
                errors += isinstance(reply, error)
        took = time.perf_counter() - t0
        writer.join(10)
    except OSError as exc:
        return f"failed after {got:,} replies: {exc}"
    finally:
        sock.close()
    return took if not errors else f"{errors:,} error replies"


def run(commands: int = 200_000) -> dict[str, Any]:
    """Run the comparison (module docstring) and return the figures."""
    redis_cli = _need("redis-cli", "redis-tools")
    with servers_and_proxies("pipe") as (servers, sp_port, nc_port, tmp):
        result: dict[str, Any] = {"commands": commands, "streams": {}, "redis_cli": {}}
        for name, make in STREAMS.items():
            path = tmp / "stream.txt"
            path.write_bytes(b"".join(make(i) for i in range(commands)))
            data = path.read_bytes()
            targets = {"direct": servers[0], "splicer": sp_port, "twemproxy": nc_port}
            result["streams"][name] = {who: _raw(port, data, commands) for who, port in targets.items()}
            result["redis_cli"][name] = {who: _pipe(redis_cli, port, path, commands) for who, port in targets.items()}
        return result


def _cell(v: float | str, commands: int) -> str:
    return f"{v:7.2f} s {commands / v / 1000:6.0f}k/s" if isinstance(v, float) else "-"


def format_table(r: dict[str, Any]) -> str:
    """The figures as a fixed-width table: seconds, commands/s, and the splicer's ratios."""
    n = r["commands"]
    lines: list[str] = []
    notes: list[str] = []
    for title, rows in ((f"pipelined stream, {n:,} commands", r["streams"]),
                        (f"redis-cli --pipe, {n:,} commands", r["redis_cli"])):
        lines.append(f"{title:40} {'direct':>17} {'splicer':>17} {'twemproxy':>17} {'spl/direct':>10} {'spl/twem':>9}")
        for name, row in sorted(rows.items(), key=lambda kv: list(STREAMS).index(kv[0]) if kv[0] in STREAMS else 99):
            d, s, t = row["direct"], row["splicer"], row["twemproxy"]
            vs_d = f"{s / d:9.2f}x" if isinstance(s, float) and isinstance(d, float) else f"{'-':>10}"
            vs_t = f"{s / t:8.2f}x" if isinstance(s, float) and isinstance(t, float) else f"{'-':>9}"
            lines.append(f"{name:40} {_cell(d, n):>17} {_cell(s, n):>17} {_cell(t, n):>17} {vs_d} {vs_t}")
            notes += [f"{title.split(',')[0]}, {name}, {who}: {v}" for who, v in row.items() if isinstance(v, str)]
        lines.append("")
    lines.append("ratios are of times (lower is faster); splicer: one worker, pool 2; md5 ketama over 2 servers")
    return "\n".join(lines + notes)


def main(argv: list[str] | None = None) -> int:
    def options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--commands", type=int, default=200_000, help="commands per stream (default 200000)")

    return bench_main("splice_pipe", __doc__, argv, options, lambda a: run(a.commands), format_table)


if __name__ == "__main__":
    sys.exit(main())
