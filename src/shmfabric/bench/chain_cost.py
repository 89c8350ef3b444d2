"""Micro-benchmark of the chain's functions: `process()` of firewall, ids and l4lb in ns per frame.

    python -m shmfabric.bench.chain_cost [--sizes 64,1500] [--rounds 40] [--json]

Each function is configured as in `bench chain` (120 firewall rules, 1,000 IDS patterns, two
backends) and gets the generator's frames (1,024 flows, all tracked after the first batches) as
a real fabric batch (zero-copy views, `FrameBatch.gather`) and as a list of `bytes` (what the
socket baseline hands the same code). Process CPU time, best of 5; a few seconds in all. The
whole chain's cost adds the runtime and the transport: see `bench chain`'s CPU column.
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m shmfabric.bench.chain_cost", description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="64,1500")
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    rows = run([int(x) for x in a.sizes.split(",")], a.rounds)
    if a.json:
        print(json.dumps(rows, indent=1))
    else:
        for r in rows:
            print(f"{r['function']:4} {r['frames']:13} {r['size']:5} B {r['ns_per_frame']:>9,.1f} ns/frame")
    return 0


if __name__ == "__main__":
    sys.exit(main())
