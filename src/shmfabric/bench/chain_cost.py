"""Micro-benchmark of the chain's functions: `process()` of firewall, ids and l4lb in ns per frame.

    python -m shmfabric.bench.chain_cost [--sizes 64,1500] [--rounds 40] [--json]

Each function is configured as in `bench chain` (120 firewall rules, 1,000 IDS patterns, two
backends) and gets the generator's frames (1,024 flows, all tracked after the first batches) as
a real fabric batch (zero-copy views, `FrameBatch.gather`) and as a list of `bytes` (what the
socket baseline hands the same code). Process CPU time, best of 5; a few seconds in all. The
whole chain's cost adds the runtime and the transport: see `bench chain`'s CPU column.
Then the firewall on TCP connections seen from their handshake, with `tcp_window` strict, liberal
and off (`tcp_window_rows`): what window tracking costs per segment.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import uuid

from shmfabric.bench.chain import FUNCTIONS, PORTS, chain_configs
from shmfabric.fabric import Fabric
from shmfabric.functions.api import FunctionContext, validate_config
from shmfabric.functions.registry import load

BATCH = 256


def run(sizes: list[int], rounds: int = 40) -> list[dict]:
    rows = []
    for size in sizes:
        cfgs = chain_configs(size, 1.0)
        gcls = load("generator")
        frames = list(gcls(validate_config(gcls, cfgs["gen"])).produce(0.0, BATCH))
        fab = Fabric.create(f"chcost-{uuid.uuid4().hex[:6]}", ephemeral=True,
                            networks=[{"mtu": max(1500, size), "slots": 4 * BATCH}], ring_size=BATCH)
        try:
            a, b = fab.attach("a"), fab.attach("b")
            a.send_batch(b.id, frames, ethertype=0x0800)
            batch = b.recv_batch(BATCH, 1.0)
            try:
                for node in ("fw", "ids", "lb"):
                    for kind, src in (("fabric batch", batch), ("bytes list", frames)):
                        cls = load(FUNCTIONS[node])
                        fn = cls(validate_config(cls, cfgs[node]), FunctionContext(ports=PORTS.get(node, [])))
                        out = bytearray(len(src))
                        for r in range(3):  # warm up: connections and flows get tracked
                            fn.process(src, 1.0 + r, out)
                        best = float("inf")
                        for _ in range(5):
                            t0 = time.process_time_ns()
                            for r in range(rounds):
                                fn.process(src, 4.0 + r * 0.001, out)
                            best = min(best, (time.process_time_ns() - t0) / rounds / len(src))
                        rows.append({"function": node, "frames": kind, "size": size, "ns_per_frame": round(best, 1)})
            finally:
                batch.release()
        finally:
            fab.close()
    return rows


def tcp_window_rows(rounds: int = 40) -> list[dict]:
    """The firewall on TCP: 256 connections seen from their handshake, then a 100-byte data
    segment of each per batch (a retransmission each round: in window, so every check runs),
    with `tcp_window` strict (the default), liberal and off. A fabric batch, as in `run`."""
    from shmfabric.net import build

    conns = [(f"10.1.{i // 200}.{i % 200 + 1}", "10.9.0.1", 40000 + i) for i in range(BATCH)]

    def seg(src: str, dst: str, sport: int, dport: int, flags: str, seq: int, ack: int = 0, data: bytes = b"") -> bytes:
        return build.ipv4(build.tcp(sport, dport, data, flags=flags, seq=seq, ack=ack, window=502, src=src, dst=dst,
                                    options=b"\x01\x03\x03\x07" if "S" in flags else b""), src=src, dst=dst, proto=6)

    shake = [f for c, s_, p in conns for f in (seg(c, s_, p, 80, "S", 1000), seg(s_, c, 80, p, "SA", 5000, 1001),
                                               seg(c, s_, p, 80, "A", 1001, 5001))]
    data = [seg(c, s_, p, 80, "PA", 1001, 5001, b"x" * 100) for c, s_, p in conns]
    rules = "policy drop\n" + "\n".join(f"ip saddr 10.{i}.0.0/16 tcp dport 80 accept" for i in range(1, 4))
    fab = Fabric.create(f"chcost-{uuid.uuid4().hex[:6]}", ephemeral=True,
                        networks=[{"mtu": 1500, "slots": 8 * BATCH}], ring_size=4 * BATCH)
    rows = []
    try:
        a, b = fab.attach("a"), fab.attach("b")
        cls = load("firewall")
        for mode in ("strict", "liberal", "off"):
            fn = cls(validate_config(cls, {"rules": rules, "tcp_window": mode}), FunctionContext())
            a.send_batch(b.id, shake, ethertype=0x0800)
            hs = b.recv_batch(len(shake), 1.0)
            try:
                out = bytearray(len(hs))
                fn.process(hs, 1.0, out)
                assert not any(out), "the handshakes must pass"
            finally:
                hs.release()
            a.send_batch(b.id, data, ethertype=0x0800)
            batch = b.recv_batch(BATCH, 1.0)
            try:
                out = bytearray(len(batch))
                best = float("inf")
                for _ in range(5):
                    t0 = time.process_time_ns()
                    for r in range(rounds):
                        fn.process(batch, 2.0 + r * 0.001, out)
                    best = min(best, (time.process_time_ns() - t0) / rounds / len(batch))
                assert not any(out), "the data segments must pass"
                rows.append({"function": "fw", "frames": f"tcp {mode}", "size": len(data[0]), "ns_per_frame": round(best, 1)})
            finally:
                batch.release()
    finally:
        fab.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m shmfabric.bench.chain_cost", description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="64,1500")
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    rows = run([int(x) for x in a.sizes.split(",")], a.rounds) + tcp_window_rows(a.rounds)
    if a.json:
        print(json.dumps(rows, indent=1))
    else:
        for r in rows:
            print(f"{r['function']:4} {r['frames']:13} {r['size']:5} B {r['ns_per_frame']:>9,.1f} ns/frame")
    return 0


if __name__ == "__main__":
    sys.exit(main())
