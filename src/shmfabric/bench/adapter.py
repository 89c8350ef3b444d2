"""`shmfabric bench adapter`: unmodified programs over TAP adapters on the fabric, side by side
with the same programs over a veth pair (how namespaces are joined without the fabric).

Two network namespaces each time, a server in one and its client in the other:

1. redis-benchmark, one connection, GET: requests/s and p50 latency (a round trip per request);
2. redis-benchmark -P 16 -c 50 -t set,get: requests/s (many frames in flight);
3. iperf3, one TCP stream for `--seconds`: Gbit/s, at MTU 1500 and 9000.

At the first MTU the same runs twice more through a firewall: the adapters' IP frames crossing a
chain of two function processes (`--via fw`: a firewall accepting the bench's ports, then a
router), against two veth pairs joined by a router namespace whose nftables forward chain
accepts the same ports (the kernel's way); and once more with the adapters checking their frames'
sources (`--source-check`), against the fabric without the check: the price of the check.

Each peer runs right after the fabric at the same setting, and the whole set `--runs` times
(the median is shown). Root only (namespaces, TAP devices). No target: the issue that asks for
adapters sets none; the ratios say what crossing the fabric through user space costs.

    shmfabric bench adapter [--seconds 5] [--runs 3] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from typing import Any, Callable

from shmfabric import programs
from shmfabric.bench.command import run_bench
from shmfabric.bench.lan import FabricLan, LanError, RoutedVethLan, VethLan, _Lan, wait_until

REDIS_PORT = 6390
# the chain variant's firewall: what the bench's programs use, and its connection tracking for
# the replies (iperf3's control and data connections go to 5201)
CHAIN_RULES = f"policy drop\ntcp dport {{ {REDIS_PORT}, 5201 }} accept\nmeta l4proto icmp accept"


class BenchError(Exception):
    """The bench cannot run here (the message says what is missing)."""


def _redis_up(lan: _Lan) -> subprocess.Popen:
    server = lan.redis(1, REDIS_PORT)
    ping = ["redis-cli", "-h", lan.ip(1), "-p", str(REDIS_PORT), "PING"]
    if not wait_until(lambda: lan.run(0, ping, capture_output=True, text=True).stdout.strip() == "PONG", timeout=20):
        raise BenchError(f"redis-server did not answer over the {lan.kind} LAN")
    return server


def _redis_benchmark(lan: _Lan, *args: str) -> dict[str, dict[str, float]]:
    """{test: {"rps": ..., "p50_ms": ...}} from redis-benchmark -q run in host 0."""
    out = lan.run(0, ["redis-benchmark", "-h", lan.ip(1), "-p", str(REDIS_PORT), "-q", *args],
                  capture_output=True, text=True, timeout=300).stdout
    res = {}
    for m in re.finditer(r"([A-Z]+): ([\d.]+) requests per second, p50=([\d.]+) msec", out.replace("\r", "\n")):
        res[m.group(1)] = {"rps": float(m.group(2)), "p50_ms": float(m.group(3))}
    if not res:
        raise BenchError(f"redis-benchmark printed no result over the {lan.kind} LAN: {out[-300:]!r}")
    return res


def _iperf3(lan: _Lan, seconds: float) -> float:
    """Gbit/s of one TCP stream, host 0 to host 1 (the receiver's figure)."""
    server = lan.popen(1, ["iperf3", "-s", "-1", "-B", lan.ip(1)], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    last = ""
    try:
        for _ in range(50):  # the server may not listen yet, or ARP not be resolved yet: again
            r = lan.run(0, ["iperf3", "-c", lan.ip(1), "-t", str(seconds), "-J"], capture_output=True, text=True,
                        timeout=seconds + 60)
            try:
                report = json.loads(r.stdout)
            except ValueError:
                report = {}
            received = report.get("end", {}).get("sum_received")
            if r.returncode == 0 and received:
                return received["bits_per_second"] / 1e9
            last = report.get("error") or (r.stdout + r.stderr)[-300:]
            if server.poll() is not None:  # a one-off server that ended with the failed test: another
                server = lan.popen(1, ["iperf3", "-s", "-1", "-B", lan.ip(1)], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
            wait_until(lambda: False, timeout=0.2)
        raise BenchError(f"iperf3 failed over the {lan.kind} LAN: {last}")
    finally:
        if server.poll() is None:
            server.kill()
        server.wait()


def _adapter_cpu(lan: _Lan) -> float:
    """CPU seconds the LAN's adapters used so far (0 for veth)."""
    total = 0.0
    for p in getattr(lan, "adapters", []):
        if p is None:
            continue
        with open(f"/proc/{p.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def measure(make: Callable[[], _Lan], seconds: float) -> dict[str, Any]:
    """One LAN's figures (see the module docstring)."""
    with make() as lan:
        _redis_up(lan)
        one = _redis_benchmark(lan, "-c", "1", "-n", "20000", "-t", "get")["GET"]
        piped = _redis_benchmark(lan, "-c", "50", "-P", "16", "-n", "400000", "-t", "set,get")
        cpu0 = _adapter_cpu(lan)
        gbps = _iperf3(lan, seconds)
        cpu = _adapter_cpu(lan) - cpu0
    return {"get_c1_rps": one["rps"], "get_c1_p50_ms": one["p50_ms"], "set_p16_rps": piped["SET"]["rps"],
            "get_p16_rps": piped["GET"]["rps"], "iperf3_gbps": gbps, "iperf3_adapter_cpu_s": round(cpu, 2)}


def run(seconds: float = 5.0, runs: int = 3, mtus: tuple[int, ...] = (1500, 9000)) -> dict[str, Any]:
    """Every figure for the fabric and for veth at each MTU, `runs` times: medians and all runs."""
    missing = programs.missing("ip", "redis-server", "redis-cli", "redis-benchmark", "iperf3")
    if missing:
        raise BenchError(programs.not_found(*missing))
    if os.geteuid() != 0:
        raise BenchError("the adapter bench needs root (network namespaces and TAP devices)")
    samples: dict[str, list[dict[str, Any]]] = {}
    for _ in range(runs):
        for mtu in mtus:
            kinds = [("fabric", lambda m=mtu: FabricLan(2, mtu=m)), ("veth", lambda m=mtu: VethLan(mtu=m))]
            if mtu == mtus[0]:
                kinds.append(("chain", lambda m=mtu: FabricLan(2, mtu=m, firewall=CHAIN_RULES)))
                kinds.append(("nft", lambda m=mtu: RoutedVethLan(mtu=m, accept_tcp=(REDIS_PORT, 5201))))
                kinds.append(("checked", lambda m=mtu: FabricLan(2, mtu=m, adapter_args=["--source-check"])))
            for kind, make in kinds:
                try:
                    samples.setdefault(f"{kind}-{mtu}", []).append(measure(make, seconds))
                except LanError as exc:
                    raise BenchError(str(exc)) from None
    medians = {k: {f: statistics.median(s[f] for s in v) for f in v[0]} for k, v in samples.items()}
    return {"seconds": seconds, "runs": runs, "mtus": list(mtus), "median": medians, "samples": samples}


ROWS = [
    ("get_c1_rps", "redis GET, 1 connection, req/s", "{:,.0f}"),
    ("get_c1_p50_ms", "  its p50 latency, ms", "{:.3f}"),
    ("set_p16_rps", "redis SET -P 16 -c 50, req/s", "{:,.0f}"),
    ("get_p16_rps", "redis GET -P 16 -c 50, req/s", "{:,.0f}"),
    ("iperf3_gbps", "iperf3 one TCP stream, Gbit/s", "{:.2f}"),
    ("iperf3_adapter_cpu_s", "  adapters' CPU during it, s", "{:.2f}"),
]


def format_table(res: dict[str, Any]) -> str:
    lines = [f"adapter bench: medians of {res['runs']} runs; iperf3 for {res['seconds']} s",
             f"{'':34} {'MTU':>5} {'fabric':>12} {'veth':>12} {'fabric/veth':>12}"]
    med = res["median"]
    for mtu in res["mtus"]:
        fab, veth = med[f"fabric-{mtu}"], med[f"veth-{mtu}"]
        for key, label, fmt in ROWS:
            ratio = "" if not veth[key] else f"{fab[key] / veth[key]:.2f}x"
            lines.append(f"{label:34} {mtu:>5} {fmt.format(fab[key]):>12} {fmt.format(veth[key]):>12} {ratio:>12}")
    chain = next((k for k in med if k.startswith("chain-")), None)
    if chain is not None:
        mtu = int(chain.split("-")[1])
        ch, nft = med[chain], med[f"nft-{mtu}"]
        lines.append("through a firewall: adapters --via fw (firewall and router functions) vs a router namespace "
                     "with nftables")
        lines.append(f"{'':34} {'MTU':>5} {'fabric+fw':>12} {'veth+nft':>12} {'ratio':>12}")
        for key, label, fmt in ROWS:
            if key == "iperf3_adapter_cpu_s":
                continue
            ratio = f"{ch[key] / nft[key]:.2f}x" if nft[key] else ""
            lines.append(f"{label:34} {mtu:>5} {fmt.format(ch[key]):>12} {fmt.format(nft[key]):>12} {ratio:>12}")
    checked = next((k for k in med if k.startswith("checked-")), None)
    if checked is not None:
        mtu = int(checked.split("-")[1])
        ck, fab = med[checked], med[f"fabric-{mtu}"]
        lines.append("adapters checking their frames' sources (--source-check) vs the same without")
        lines.append(f"{'':34} {'MTU':>5} {'checked':>12} {'unchecked':>12} {'ratio':>12}")
        for key, label, fmt in ROWS:
            ratio = f"{ck[key] / fab[key]:.2f}x" if fab[key] else ""
            lines.append(f"{label:34} {mtu:>5} {fmt.format(ck[key]):>12} {fmt.format(fab[key]):>12} {ratio:>12}")
    return "\n".join(lines)


def cmd_bench_adapter(args: argparse.Namespace) -> int:
    return run_bench(args, lambda: run(args.seconds, args.runs, tuple(args.mtu or (1500, 9000))), format_table, BenchError)


def register_bench(bench_sub: Any) -> None:
    p = bench_sub.add_parser("adapter", help="programs over TAP adapters on the fabric vs over a veth pair (root)",
                             description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=5.0, help="iperf3 duration (default 5)")
    p.add_argument("--runs", type=int, default=3, help="repetitions; medians are shown (default 3)")
    p.add_argument("--mtu", type=int, action="append", help="MTUs to run at (default 1500 and 9000)")
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    p.set_defaults(func=cmd_bench_adapter, mtu=None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    try:
        res = run(a.seconds, a.runs)
    except BenchError as exc:
        print(f"bench adapter: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(res, indent=1) if a.json else format_table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
