"""Micro-benchmark of the built-in functions' pure logic: ns per packet.

    python -m shmfabric.bench.function_logic [--rounds 20] [--json]

Firewall with 100 port rules (new connections missing every rule, and packets of tracked
connections), IDS with 1,000 random 6-byte patterns (a third `nocase`) on 10- and 1,446-byte
payloads, Maglev balancer over 10 backends for known flows. Batches of 256, best of 3. A few
seconds; the numbers in docs/functions.md come from here.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import timeit

from shmfabric.functions.maglev import MaglevBalancer
from shmfabric.functions.rules import Firewall
from shmfabric.functions.snort import Ids, SignatureSet


def run(rounds: int = 20) -> list[dict[str, object]]:
    rng = random.Random(1)
    keys = [(0x0A630000 + i, 0x0A000001, 6, 40000 + i, 80) for i in range(256)]

    def ns(fn, r: int = rounds) -> float:
        return round(min(timeit.repeat(fn, number=r, repeat=3)) / r / len(keys) * 1e9, 1)

    rules = "\n".join(f"ip saddr 10.{i}.0.0/16 tcp dport {{ {1000 + i}, {2000 + i} }} accept" for i in range(100))
    fw = Firewall.from_text(rules + "\npolicy accept")

    def new_flows() -> None:
        fw.conntrack = type(fw.conntrack)()  # forget them, so every packet is a new connection
        fw.check_batch(keys, 0.0)

    rows = [{"op": "firewall: new connection, 100 rules, none matching", "ns_per_packet": ns(new_flows)}]
    fw.check_batch(keys, 0.0)
    rows.append({"op": "firewall: packet of a tracked connection", "ns_per_packet": ns(lambda: fw.check_batch(keys, 1.0))})
    sig = SignatureSet.parse("\n".join(
        f'alert tcp any any -> any any (msg:"s{i}"; content:"{rng.randbytes(6).hex()}"; '
        f'{"nocase; " if i % 3 == 0 else ""}sid:{1000000 + i};)' for i in range(1000)))
    ids = Ids(sig)
    small, large = rng.randbytes(10), rng.randbytes(1446)
    rows.append({"op": "ids: 1,000 patterns, 10-byte payload", "ns_per_packet":
                 ns(lambda: [ids.inspect(small, k, 0.0) for k in keys])})
    rows.append({"op": "ids: 1,000 patterns, 1,446-byte payload", "ns_per_packet":
                 ns(lambda: [ids.inspect(large, k, 0.0) for k in keys], max(1, rounds // 4))})
    lb = MaglevBalancer([f"sink{i}" for i in range(10)])
    lb.pick_batch(keys, 0.0)
    rows.append({"op": "maglev: known flow", "ns_per_packet": ns(lambda: lb.pick_batch(keys, 1.0))})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20, help="batches per timing (default 20)")
    ap.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    rows = run(args.rounds)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        for r in rows:
            print(f"{r['op']:55} {r['ns_per_packet']:>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
