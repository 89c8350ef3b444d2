"""Changing the server list under load: the Redis splicer's reload against twemproxy's restart.

    python -m shmfabric.bench.splice_reload [--json] [--clients 8] [--seconds 4]
    shmfabric bench splice --scenario reload

twemproxy has no reload (twitter/twemproxy issue #6, open since 2012; the patch for it was never
merged): a changed server list takes a restart. The splicer re-reads the same file on SIGHUP.

Both proxies run one nutcracker.yml, one worker process each, in front of the same redis-servers.
Client threads (one connection each, one command at a time, SETs of their own keys) run for
`--seconds`; at the middle the file gains a second server and each proxy applies it: the splicer
by `kill -HUP`, twemproxy by a stop and a start (what `systemctl restart` does). A client whose
connection ends or is refused reconnects at once and sends the command again, as client libraries
do. A command the splicer closed a connection on was not read, so it did not run: sending it again
is safe.

Printed per proxy: commands answered, commands sent and not answered (EOF or reset before the
reply), connection attempts refused, and the longest a client waited for a reply (the stall).
"""
from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from shmfabric.splicer.redis_resp import ReplyScanner, encode_command

from .splice_redis import BenchError, bench_main, _command, _free_port, _need, _wait_port, start_redis_servers, stop_all

__all__ = ["run", "format_table", "main"]


class _Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.answered = 0
        self.unanswered = 0
        self.refused = 0
        self.stall = 0.0


def _key(index: int) -> bytes:
    return b"reload:counter:%d" % index


def _client(index: int, port: int, depth: int, stop: threading.Event, tally: _Tally) -> None:
    import socket

    sock: socket.socket | None = None
    answered = unanswered = refused = 0
    stall = 0.0
    last = time.monotonic()
    batch = encode_command([b"INCR", _key(index)]) * depth
    scanner = ReplyScanner()
    while not stop.is_set():
        if sock is None:
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            except OSError:
                refused += 1
                time.sleep(0.001)
                continue
            scanner = ReplyScanner()
        got = 0
        try:
            sock.sendall(batch)
            while got < depth:
                data = sock.recv(65536)
                if not data:
                    raise ConnectionResetError("EOF before the replies")
                scanner.feed(data)
                while got < depth and (reply := scanner.next()) is not None:
                    if reply[:1] != b":":
                        raise BenchError(f"INCR answered {reply[:80]!r}")
                    got += 1
        except OSError:
            # Not sent again here: whether these ran is what the bench measures (a client
            # library would send them again, which is only safe if they did not run).
            answered += got
            unanswered += depth - got
            sock.close()
            sock = None
            continue
        answered += depth
        now = time.monotonic()
        stall = max(stall, now - last)
        last = now
    if sock is not None:
        sock.close()
    with tally.lock:
        tally.answered += answered
        tally.unanswered += unanswered
        tally.refused += refused
        tally.stall = max(tally.stall, stall)


def _under_load(port: int, clients: int, depth: int, seconds: float, change: Any, servers: list[int]) -> dict[str, Any]:
    for srv in servers:
        _command(srv, b"FLUSHALL")
    tally = _Tally()
    stop = threading.Event()
    threads = [threading.Thread(target=_client, args=(i, port, depth, stop, tally)) for i in range(clients)]
    for t in threads:
        t.start()
    time.sleep(seconds / 2)
    t0 = time.monotonic()
    change()
    applied = time.monotonic() - t0
    time.sleep(seconds / 2)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    # What ran: the counters on both servers (a key may have moved to the new one).
    ran = 0
    for i in range(clients):
        for srv in servers:
            value = _command(srv, b"GET", _key(i))
            if value.startswith(b"$") and not value.startswith(b"$-1"):
                ran += int(value.split(b"\r\n")[1])
    return {"answered": tally.answered, "unanswered": tally.unanswered,
            "ran_unanswered": ran - tally.answered, "refused": tally.refused,
            "longest_stall_ms": tally.stall * 1000, "commands_per_s": tally.answered / seconds,
            "change_s": applied}


def run(clients: int = 8, seconds: float = 4.0, depth: int = 16) -> dict[str, Any]:
    """Run both proxies through the change and return the figures (see the module docstring)."""
    redis_server = _need("redis-server", "redis-server")
    nutcracker = _need("nutcracker", "nutcracker")
    procs: list[subprocess.Popen] = []
    tmp = Path(tempfile.mkdtemp(prefix="shmfabric-bench-reload-"))
    try:
        servers = start_redis_servers(redis_server, 2, tmp, procs)

        def write(path: Path, listen: int, backends: list[int]) -> None:
            path.write_text(f"bench:\n  listen: 127.0.0.1:{listen}\n  hash: fnv1a_64\n  distribution: ketama\n"
                            "  redis: true\n  auto_eject_hosts: false\n  server_connections: 1\n  servers:\n"
                            + "".join(f"   - 127.0.0.1:{p}:1\n" for p in backends))

        result: dict[str, Any] = {"clients": clients, "seconds": seconds, "depth": depth}

        # The splicer: SIGHUP.
        sp_port, sp_conf = _free_port(), tmp / "splicer.yml"
        write(sp_conf, sp_port, servers[:1])
        sp = subprocess.Popen([sys.executable, "-m", "shmfabric.cli.main", "splice", "redis", "--twemproxy",
                               str(sp_conf), "--no-health"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(sp)
        if not (sp.stdout.readline() if sp.stdout else "").startswith("splice redis: listening"):
            raise BenchError(f"the splicer did not start: {sp.stderr.read() if sp.stderr else ''}")
        lines: list[str] = []
        threading.Thread(target=lambda: lines.extend(sp.stderr or []), daemon=True).start()

        def reload_splicer() -> None:
            write(sp_conf, sp_port, servers)
            sp.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 30
            while not any("reloaded" in ln for ln in lines):
                if time.monotonic() > deadline:
                    raise BenchError(f"the splicer did not reload: {''.join(lines)[-500:]}")
                time.sleep(0.005)

        result["splicer"] = _under_load(sp_port, clients, depth, seconds, reload_splicer, servers)

        # twemproxy: a restart, its only way.
        nc_port, nc_conf = _free_port(), tmp / "nutcracker.yml"
        write(nc_conf, nc_port, servers[:1])

        def start_nutcracker() -> subprocess.Popen:
            proc = subprocess.Popen([nutcracker, "-c", str(nc_conf), "-s", str(_free_port()),
                                     "-o", str(tmp / "nutcracker.log")], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            procs.append(proc)
            _wait_port(nc_port, proc, "nutcracker", timeout=30)
            return proc

        nc = [start_nutcracker()]

        def restart_nutcracker() -> None:
            write(nc_conf, nc_port, servers)
            nc[0].terminate()
            nc[0].wait(timeout=30)
            nc[0] = start_nutcracker()

        result["twemproxy"] = _under_load(nc_port, clients, depth, seconds, restart_nutcracker, servers)
        return result
    finally:
        stop_all(procs, tmp)


def format_table(result: dict[str, Any]) -> str:
    """The figures as a plain-text table."""
    head = (f"{'proxy':<10} {'applied by':<22} {'answered':>9} {'unanswered':>11} {'of them ran':>12} "
            f"{'refused':>8} {'longest stall':>14} {'cmds/s':>8}")
    rows = [f"reload under load: {result['clients']} clients pipelining {result['depth']} INCRs, "
            f"{result['seconds']:g} s; a second server added half way", head, "-" * len(head)]
    for name, how in (("splicer", "kill -HUP"), ("twemproxy", "restart (stop, start)")):
        r = result[name]
        rows.append(f"{name:<10} {how:<22} {r['answered']:>9,} {r['unanswered']:>11,} {r['ran_unanswered']:>12,} "
                    f"{r['refused']:>8,} {r['longest_stall_ms']:>11.1f} ms {r['commands_per_s']:>8,.0f}")
    s, t = result["splicer"], result["twemproxy"]
    rows.append(f"commands that ran without an answer (a retry runs them twice): splicer {s['ran_unanswered']}, "
                f"twemproxy {t['ran_unanswered']}; refused connections {s['refused']} vs {t['refused']}; "
                f"longest stall {s['longest_stall_ms']:.1f} vs {t['longest_stall_ms']:.1f} ms")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    def options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--clients", type=int, default=8)
        parser.add_argument("--seconds", type=float, default=4.0)
        parser.add_argument("--depth", type=int, default=16, help="INCRs each client pipelines (default 16)")

    return bench_main("splice_reload", __doc__, argv, options, lambda a: run(a.clients, a.seconds, a.depth), format_table)


if __name__ == "__main__":
    sys.exit(main())
