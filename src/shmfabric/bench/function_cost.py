"""Micro-benchmark of the ratelimit, monitor, compress and encrypt functions: ns per frame.

    python -m shmfabric.bench.function_cost [--rounds 10] [--json]

Each function's `process()` on batches of 256 IPv4/UDP packets of 64 and 1,500 bytes (Ethernet
sizes: the IP packets are 50 and 1,486 bytes; the payload is half text, half random, so it
compresses somewhat), best of 3, no fabric. Capture writes to a temporary file. A few seconds; the
numbers in docs/functions.md come from here.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import timeit

from shmfabric.functions.api import FunctionContext, validate_config
from shmfabric.functions.builtin.monitor import Monitor
from shmfabric.functions.builtin.ratelimit import RateLimiter
from shmfabric.functions.builtin.tunnel import Compress, Encrypt
from shmfabric.net import build

KEY = "00" * 32


def packets(size: int, n: int = 256, flows: int = 64) -> list[bytes]:
    rng = random.Random(size)
    body = size - 14 - 28
    out = []
    for i in range(n):
        text = (b"GET /index.html HTTP/1.1\r\nHost: example\r\n" * 40)[: body // 2]
        payload = text + rng.randbytes(body - len(text))
        src = f"10.0.{i % flows}.1"
        out.append(build.ipv4(build.udp(1000 + i % flows, 80, payload, src=src, dst="10.9.0.1"),
                              src=src, dst="10.9.0.1", proto=17))
    return out


def make(cls: type, cfg: dict) -> object:
    return cls(validate_config(cls, cfg), FunctionContext(node="bench", mtu=9000))


def run(rounds: int = 10) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    tmp = tempfile.mkdtemp(prefix="sf-bench-")
    try:
        for size in (64, 1500):
            batch = packets(size)
            out = bytearray(len(batch))

            def ns(fn: object, ctx_fns: tuple = ()) -> float:
                def once() -> None:
                    fn.process(batch, 1.0, out)  # type: ignore[attr-defined]
                    for f in ctx_fns:
                        f.ctx.emitted.clear()
                return round(min(timeit.repeat(once, number=rounds, repeat=3)) / rounds / len(batch) * 1e9)

            def tunnel(cls: type, cfg: dict) -> tuple[float, float]:
                enc, dec = make(cls, {"mode": "encap", **cfg}), make(cls, {"mode": "decap", **cfg})
                enc.process(batch, 1.0, out)  # type: ignore[attr-defined]
                outer = [d for _, d in enc.ctx.emitted]  # type: ignore[attr-defined]
                enc.ctx.emitted.clear()  # type: ignore[attr-defined]
                t_enc = ns(enc, (enc,))
                window = dict(cfg, replay_window=0) if cls is Encrypt else cfg  # the same packets again and again
                dec = make(cls, {"mode": "decap", **window})
                o = bytearray(len(outer))

                def once() -> None:
                    dec.process(outer, 1.0, o)  # type: ignore[attr-defined]
                    dec.ctx.emitted.clear()  # type: ignore[attr-defined]
                t_dec = round(min(timeit.repeat(once, number=rounds, repeat=3)) / rounds / len(outer) * 1e9)
                return t_enc, t_dec

            def row(op: str, value: float) -> None:
                rows.append({"op": op, "frame_bytes": size, "ns_per_frame": value})

            row("ratelimit police, 1 class, conforming", ns(make(RateLimiter, {"classes": [{"name": "a", "rate": "100gbit", "burst": "1MB"}]})))
            row("ratelimit police, per-flow buckets (64 flows)", ns(make(RateLimiter, {"classes": [{"name": "a", "rate": "100mpps", "per": "flow"}]})))
            row("monitor: flows + top talkers", ns(make(Monitor, {})))
            cap = make(Monitor, {"capture": {"path": os.path.join(tmp, f"b{size}.pcap"), "rotate_bytes": 50_000_000, "keep": 1}})
            row("monitor: + pcap capture", ns(cap))
            cap.close()  # type: ignore[attr-defined]
            for name, cls, cfg in [("compress zstd-3", Compress, {"algorithm": "zstd"}),
                                   ("compress lz4", Compress, {"algorithm": "lz4"}),
                                   ("encrypt AES-256-GCM", Encrypt, {"key": KEY})]:
                e, d = tunnel(cls, cfg)
                row(f"{name} encap", e)
                row(f"{name} decap", d)
    finally:
        for f in os.listdir(tmp):
            os.unlink(os.path.join(tmp, f))
        os.rmdir(tmp)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10, help="batches per timing (default 10)")
    ap.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        print("--rounds must be at least 1", file=sys.stderr)
        return 2
    rows = run(args.rounds)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    ops = list(dict.fromkeys(r["op"] for r in rows))
    print(f"{'operation':48} {'64 B':>9} {'1500 B':>9}   (ns per frame)")
    for op in ops:
        vals = {r["frame_bytes"]: r["ns_per_frame"] for r in rows if r["op"] == op}
        print(f"{op:48} {vals.get(64, ''):>9} {vals.get(1500, ''):>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
