"""Micro-benchmark of the net layer: ns per frame for 5-tuple classification and full decode.

    python -m shmfabric.bench.net_parse [--frames 256] [--rounds 200] [--json]

Frames are built with `shmfabric.net.build` (64-byte-class IPv4/TCP and IPv4/UDP, then the slower
cases: VLAN, IPv6, IPv6 with extension headers, malformed). Each case runs `classify_batch` over
a batch of `--frames` distinct frames, `--rounds` times; the best of 5 repeats is reported to damp
noise from other processes. Short by default (well under 10 s) so it can run on a busy machine.
"""
from __future__ import annotations

import argparse
import json
import sys
import timeit

from shmfabric.net import build as b
from shmfabric.net import checksum as ck
from shmfabric.net.errors import ReasonCounter
from shmfabric.net.flow import classify_batch, flow_hash, parse_5tuple
from shmfabric.net.packet import decode


def _cases(n: int) -> dict[str, list[bytes]]:
    def many(make):  # distinct frames so nothing is cached per object
        return [make(i) for i in range(n)]

    return {
        "ipv4/tcp": many(lambda i: b.tcp_frame("10.0.0.1", "10.1.0.2", 1024 + i, 80, b"x" * 6)),
        "ipv4/tcp memoryview": [memoryview(x) for x in many(lambda i: b.tcp_frame("10.0.0.1", "10.1.0.2", 1024 + i, 80, b"x" * 6))],
        "ipv4/udp": many(lambda i: b.udp_frame("10.0.0.1", "10.1.0.2", 1024 + i, 53, b"x" * 18)),
        "ipv4/tcp 1500B": many(lambda i: b.tcp_frame("10.0.0.1", "10.1.0.2", 1024 + i, 80, b"x" * 1446)),
        "vlan/ipv4/tcp": many(lambda i: b.tcp_frame("10.0.0.1", "10.1.0.2", 1024 + i, 80, b"x" * 6, vlan=7)),
        "ipv6/udp": many(lambda i: b.udp_frame("fd00::1", "fd00::2", 1024 + i, 53, b"x" * 18)),
        "ipv6/hbh+frag/tcp": many(lambda i: b.ip_frame(
            b.tcp(1024 + i, 80, src="fd00::1", dst="fd00::2"), src="fd00::1", dst="fd00::2", proto=6,
            ext=[b.ipv6_ext(0, b"\x01\x02\x00\x00"), b.ipv6_fragment(0, True, i)])),
        "malformed (truncated tcp)": many(lambda i: b.tcp_frame("10.0.0.1", "10.1.0.2", 1024 + i, 80)[:40]),
    }


def _ns(fn, frames: list[bytes], rounds: int) -> float:
    t = min(timeit.repeat(lambda: fn(frames), number=rounds, repeat=5))
    return t / (rounds * len(frames)) * 1e9


def run(frames: int = 256, rounds: int = 200) -> list[dict[str, object]]:
    """Measure every case; returns rows of {case, op, ns_per_frame}."""
    rows: list[dict[str, object]] = []
    counter = ReasonCounter()
    for name, fr in _cases(frames).items():
        # Full decode is 10-20x slower: fewer rounds keep the run short.
        ops = [
            ("classify_batch", lambda f: classify_batch(f, counter), rounds),
            ("parse_5tuple loop", lambda f: [parse_5tuple(x) for x in f], rounds),
            ("decode", lambda f: [decode(x) for x in f], max(1, rounds // 10)),
        ]
        for op, fn, r in ops:
            rows.append({"case": name, "op": op, "ns_per_frame": round(_ns(fn, fr, r), 1)})
    keys = [k for k in classify_batch(_cases(frames)["ipv4/tcp"]) if type(k) is tuple]
    rows.append({"case": "ipv4 5-tuple", "op": "flow_hash",
                 "ns_per_frame": round(_ns(lambda ks: [flow_hash(k) for k in ks], keys, rounds), 1)})
    hdr = _cases(1)["ipv4/tcp"][0][14:34]
    seg = _cases(1)["ipv4/tcp 1500B"][0][34:]
    rows.append({"case": "20 B IPv4 header", "op": "checksum",
                 "ns_per_frame": round(_ns(lambda x: ck.checksum(x[0]), [hdr], rounds * 50), 1)})
    rows.append({"case": "1,466 B TCP segment", "op": "checksum",
                 "ns_per_frame": round(_ns(lambda x: ck.checksum(x[0]), [seg], rounds * 10), 1)})
    rows.append({"case": "one 16-bit field", "op": "update16 (RFC 1624)",
                 "ns_per_frame": round(_ns(lambda x: ck.update16(0x1234, 80, 8080), [0], rounds * 50), 1)})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=256, help="frames per batch (default 256)")
    ap.add_argument("--rounds", type=int, default=200, help="batches per timing (default 200)")
    ap.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    args = ap.parse_args(argv)
    if args.frames < 1 or args.rounds < 1:
        ap.error("--frames and --rounds must be at least 1")
    rows = run(args.frames, args.rounds)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"Python {sys.version.split()[0]}, batch of {args.frames} frames")
    print(f"{'case':28} {'operation':22} {'ns/frame':>9}")
    for r in rows:
        print(f"{r['case']:28} {r['op']:22} {r['ns_per_frame']:>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
