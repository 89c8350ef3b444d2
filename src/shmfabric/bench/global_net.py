"""`shmfabric bench global`: one address for two HTTP servers through the fabric's dispatcher,
side by side with the kernel's ways of putting two servers behind one IP.

nginx (one worker, `return 200 "ok"`) runs in each of two member namespaces; wrk (one thread,
`--connections` connections, `--seconds` each) runs in a client namespace against the shared
address, twice:

- keep-alive: requests/s over connections that stay open (the dispatcher forwards every
  client->server packet of a connection to the member it chose: its per-packet cost);
- new connection per request (`Connection: close`): connections/s, each one a new entry in the
  dispatcher's connection table (its per-connection cost).

Cases, each round one after another, `--runs` rounds, medians:

- fabric: `shmfabric global` answers ARP for the VIP on a fabric and hands each new connection
  to a member adapter (round robin), which answers the client straight (direct return);
- direct: the same fabric LAN, wrk straight to member 1's own address, no dispatcher running
  (the floor: what the adapters cost without it);
- nft: a router namespace joined by veth pairs to the client and the two members, the VIP on
  it, `dnat to numgen inc mod 2 map {...}` in nftables (this kernel has no IPVS; nftables NAT
  is the kernel's way without it); the members answer through the router;
- haproxy: the same router topology with HAProxy (`mode tcp`, `balance roundrobin`, one thread)
  listening on the VIP instead of the NAT rule.

Each member's nginx counts what it answered (stub_status): the split is printed, and a case in
which a member that should have served answered nothing is an error for that case, not a
figure (as is an answer other than 2xx). Root only (namespaces, TAP devices). No target: no
issue sets one; the ratios say what the user-space dispatcher costs against the kernel and
against HAProxy. Exit status 1 when a case has no figure (the table says why).

    shmfabric bench global [--seconds 5] [--runs 3] [--connections 8] [--json]
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from typing import Any, Sequence

from shmfabric import programs
from shmfabric.bench.command import run_bench
from shmfabric.bench.lan import GlobalFabricLan, LanError, RoutedLan, _die_with_parent, _ip, _Lan, wait_until

CASES = ("fabric", "direct", "nft", "haproxy")
WORKLOADS = ("keepalive", "close")
MEMBERS = (1, 2)  # the member hosts of every LAN here; host 0 is the client
PORT = 80
STATUS_PORT = 8081  # nginx's stub_status, on the member's loopback only
PROGRAMS = ("ip", "nginx", "wrk", "nft", "haproxy")

CASE_TEXT = {
    "fabric": "fabric: `shmfabric global` to 2 member adapters, direct return",
    "direct": "fabric direct: wrk to member 1's own address, no dispatcher",
    "nft": "nft: router namespace, dnat numgen inc mod 2, veth pairs",
    "haproxy": "haproxy: router namespace, mode tcp, roundrobin, 1 thread",
}
WORKLOAD_TEXT = {"keepalive": ("keep-alive", "req/s"), "close": ("new connection", "conn/s")}


class BenchError(Exception):
    """The bench cannot run here, or a case failed (the message says what and why)."""


class RouterLan(RoutedLan):
    """A client (host 0) and two members (hosts 1, 2), each on a subnet of its own, joined by veth
    pairs to a router namespace (namespace 3) that forwards between them; the VIP is the router's
    (on its client side). `nat()` or `haproxy()` then puts the members behind the VIP."""

    kind = "router"

    def __init__(self, lan: int = 6) -> None:
        super().__init__(1 + len(MEMBERS), 1500, lan)

    @property
    def vip(self) -> str:
        return f"10.77.{self.lan}.100"

    def connect(self) -> None:
        super().connect()
        # the VIP on the router's client side: the router answers ARP for it like any own address
        _ip("-n", self.namespaces[self.router], "addr", "add", f"{self.vip}/32", "dev", f"v{self.tag}0r")

    def nat(self) -> None:
        """New connections to VIP:80 DNATed to the members in turn (replies un-NATed by conntrack)."""
        m1, m2 = (self.ip(h) for h in MEMBERS)
        rules = ("table ip gbench {\n chain pre {\n  type nat hook prerouting priority dstnat; policy accept;\n"
                 f"  ip daddr {self.vip} tcp dport {PORT} dnat to numgen inc mod 2 map {{ 0 : {m1}, 1 : {m2} }}\n"
                 " }\n chain post {\n  type nat hook postrouting priority srcnat; policy accept;\n }\n}\n")
        r = self.run(3, [programs.find("nft") or "nft", "-f", "-"], input=rules, capture_output=True, text=True)
        if r.returncode:
            raise LanError(f"nft refused the router's NAT rule: {r.stderr.strip()}")

    def haproxy(self, workdir: str) -> subprocess.Popen:
        """HAProxy in the router namespace on VIP:80, to the members; returns once it answers."""
        conf = os.path.join(workdir, "haproxy.cfg")
        with open(conf, "w") as f:
            f.write(f"global\n nbthread 1\n maxconn 4096\n"
                    "defaults\n mode tcp\n timeout connect 5s\n timeout client 30s\n timeout server 30s\n"
                    f"frontend vip\n bind {self.vip}:{PORT}\n default_backend members\n"
                    "backend members\n balance roundrobin\n"
                    + "".join(f" server m{h} {self.ip(h)}:{PORT}\n" for h in MEMBERS))
        log = open(os.path.join(workdir, "haproxy.stderr"), "w+")
        proc = self.popen(3, [programs.find("haproxy") or "haproxy", "-db", "-f", conf], stdout=log, stderr=log,
                          preexec_fn=_die_with_parent)
        log.close()  # the child has its own copy
        if not _answers(self, f"http://{self.vip}/", proc):
            why = _tail(os.path.join(workdir, "haproxy.stderr")) or "no output"
            raise LanError(f"haproxy did not answer on {self.vip}:{PORT}: {why}")
        return proc


def _tail(path: str, chars: int = 500) -> str:
    """The end of a log file ('' if there is none)."""
    try:
        with open(path, errors="replace") as f:
            return f.read().strip()[-chars:]
    except OSError:
        return ""


def _get(lan: _Lan, host: int, url: str, timeout: float = 1.0) -> str:
    """The body of GET `url` from host `host`'s namespace, '' when it fails."""
    code = ("import sys, urllib.request\n"
            "try:\n"
            f"    print(urllib.request.urlopen(sys.argv[1], timeout={timeout}).read().decode(), end='')\n"
            "except Exception:\n    pass\n")
    try:
        return lan.run(host, [sys.executable, "-c", code, url], capture_output=True, text=True,
                       timeout=timeout + 30).stdout
    except subprocess.TimeoutExpired:
        return ""


def _answers(lan: _Lan, url: str, server: subprocess.Popen | None = None, timeout: float = 20.0) -> bool:
    """Whether `url` answers "ok" to the client (host 0) within `timeout` (False at once if
    `server` ended)."""
    return wait_until(lambda: (server is not None and server.poll() is not None) or _get(lan, 0, url) == "ok\n",
                      timeout=timeout, every=0.2) and (server is None or server.poll() is None)


def _nginx(lan: _Lan, host: int, workdir: str) -> subprocess.Popen:
    """nginx in host `host`'s namespace on port 80 (every address, the VIP on lo included) and its
    stub_status on 127.0.0.1; returns once the status answers."""
    d = os.path.join(workdir, f"nginx{host}")
    os.makedirs(d, exist_ok=True)
    conf = os.path.join(d, "nginx.conf")
    temps = "".join(f" {k}_temp_path {d}/{k};\n" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    with open(conf, "w") as f:
        f.write(f"worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n"
                "events { worker_connections 4096; }\n"
                f"http {{\n access_log {d}/access.log combined buffer=64k flush=1s;\n{temps}"
                " keepalive_requests 1000000;\n"
                f" server {{\n  listen {PORT};\n  location / {{ return 200 \"ok\\n\"; }}\n }}\n"
                f" server {{\n  listen 127.0.0.1:{STATUS_PORT};\n  location / {{ stub_status; }}\n }}\n}}\n")
    proc = lan.popen(host, [programs.find("nginx") or "nginx", "-p", d, "-e", f"{d}/error.log", "-c", conf],
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent)
    if not wait_until(lambda: proc.poll() is not None or _status(lan, host) is not None, timeout=20, every=0.2) \
            or proc.poll() is not None:
        raise LanError(f"nginx did not start in {lan.namespaces[host]}: {_tail(f'{d}/error.log') or 'no log'}")
    return proc


def _status(lan: _Lan, host: int) -> tuple[int, int] | None:
    """nginx's (accepted connections, requests) so far in host `host`, this look included."""
    m = re.search(r"accepts handled requests\s+(\d+)\s+\d+\s+(\d+)",
                  _get(lan, host, f"http://127.0.0.1:{STATUS_PORT}/"))
    return (int(m.group(1)), int(m.group(2))) if m else None


def parse_wrk(out: str) -> dict[str, Any]:
    """wrk's text output: requests, rate (requests/s), socket_errors, non_2xx."""
    requests = re.search(r"(\d+) requests in [\d.]+\w+", out)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not requests or not rate:
        raise BenchError(f"wrk printed no result: {out.strip()[-300:]!r}")
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"requests": int(requests.group(1)), "rate": float(rate.group(1)),
            "socket_errors": sum(int(x) for x in sock.groups()) if sock else 0,
            "non_2xx": int(non2xx.group(1)) if non2xx else 0}


def _wrk(lan: _Lan, url: str, connections: int, seconds: int, close: bool) -> dict[str, Any]:
    argv = [programs.find("wrk") or "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "2s"]
    if close:
        argv += ["-H", "Connection: close"]
    try:
        r = lan.run(0, [*argv, url], capture_output=True, text=True, timeout=seconds + 60)
    except subprocess.TimeoutExpired:
        raise BenchError(f"wrk against {url} did not end within {seconds + 60} s") from None
    if r.returncode != 0:
        raise BenchError(f"wrk against {url} failed: {(r.stdout + r.stderr).strip()[-300:]}")
    return parse_wrk(r.stdout)


def measure_one(lan: _Lan, url: str, workload: str, connections: int, seconds: int,
                expect: Sequence[int] = MEMBERS) -> dict[str, Any]:
    """One wrk run against `url` and what each member answered meanwhile; `error` (else None)
    says why it is not a figure: a member among `expect` answered nothing, or an answer was not
    2xx, or wrk completed nothing."""
    before = [_status(lan, h) for h in MEMBERS]
    res = _wrk(lan, url, connections, seconds, close=workload == "close")
    after = [_status(lan, h) for h in MEMBERS]
    if None in before or None in after:
        raise BenchError("a member's nginx stopped answering its status page")
    # the later look at the status page is one connection and one request of its own
    res["members"] = [a[1] - b[1] - 1 for a, b in zip(after, before)]  # type: ignore[index]
    res["member_connections"] = [a[0] - b[0] - 1 for a, b in zip(after, before)]  # type: ignore[index]
    split = " / ".join(f"{n:,}" for n in res["members"])
    if res["requests"] == 0:
        res["error"] = f"wrk completed no request (members answered {split})"
    elif res["non_2xx"]:
        res["error"] = f"{res['non_2xx']:,} answers were not 2xx"
    else:
        idle = [h for h in expect if res["members"][MEMBERS.index(h)] <= 0]
        res["error"] = (f"member {', '.join(map(str, idle))} answered no request (split {split})" if idle else None)
    return res


def _tune_client(lan: _Lan, host: int) -> None:
    # new connections at a high rate: the whole ephemeral range, so ports are not reused early
    lan.sysctl(host, "net.ipv4.ip_local_port_range=1024 65535")


def _failed(samples: dict, cases: Sequence[str], why: str) -> None:
    """Record `why` for every workload of `cases` not measured yet this round."""
    for case in cases:
        for wl in WORKLOADS:
            runs = samples[case][wl]
            if len(runs) < samples["_round"]:
                runs.append({"error": why})


def _fabric_round(samples: dict, connections: int, seconds: int, workdir: str) -> dict[str, Any]:
    """direct then fabric on one GlobalFabricLan; the dispatcher's counters ({"error": why} if it
    did not stop cleanly)."""
    counters: dict[str, Any] = {}
    try:
        with GlobalFabricLan(members=len(MEMBERS)) as lan:
            _tune_client(lan, 0)
            for h in MEMBERS:
                _nginx(lan, h, workdir)
            # direct first, before the dispatcher runs: nothing but the adapters on the fabric
            url = f"http://{lan.ip(1)}/"
            if not _answers(lan, url):
                raise BenchError(f"member 1's nginx did not answer the client at {url} over the fabric")
            for wl in WORKLOADS:
                samples["direct"][wl].append(measure_one(lan, url, wl, connections, seconds, expect=(1,)))
            lan.start_dispatcher()
            url = f"http://{lan.vip}/"
            if not _answers(lan, url, lan.dispatcher):
                raise BenchError(f"nothing answered the client at the VIP {url} through the dispatcher")
            for wl in WORKLOADS:
                samples["fabric"][wl].append(measure_one(lan, url, wl, connections, seconds))
            try:
                counters = lan.stop_dispatcher()
            except LanError as exc:  # the figures stand; the failure is reported beside them
                counters = {"error": str(exc)}
    except (LanError, BenchError) as exc:
        _failed(samples, ("direct", "fabric"), str(exc))
    return counters


def _router_round(case: str, samples: dict, connections: int, seconds: int, workdir: str) -> None:
    try:
        with RouterLan() as lan:
            _tune_client(lan, 0)
            for h in MEMBERS:
                _nginx(lan, h, workdir)
            if case == "nft":
                lan.nat()
                if not _answers(lan, f"http://{lan.vip}/"):
                    raise BenchError("nothing answered the client at the VIP through the router's NAT")
            else:
                lan.haproxy(workdir)
            for wl in WORKLOADS:
                samples[case][wl].append(measure_one(lan, f"http://{lan.vip}/", wl, connections, seconds))
    except (LanError, BenchError) as exc:
        _failed(samples, (case,), str(exc))


def check_prerequisites() -> None:
    """BenchError when the bench cannot run here (not root, a program missing, no TUN)."""
    if os.geteuid() != 0:
        raise BenchError("the global bench needs root (network namespaces and TAP devices): run it as root")
    missing = programs.missing(*PROGRAMS)
    if missing:
        raise BenchError(programs.not_found(*missing))
    if not os.path.exists("/dev/net/tun"):
        raise BenchError("no /dev/net/tun (the tun module) on this machine: the fabric's adapters need it")


def summarize(samples: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    """Medians (None for a workload with an error in any round), errors, per-member sums."""
    median: dict[str, dict[str, float | None]] = {}
    errors: dict[str, dict[str, list[str]]] = {}
    members: dict[str, dict[str, list[int]]] = {}
    for case in CASES:
        for wl in WORKLOADS:
            runs = samples[case][wl]
            errs = [r["error"] for r in runs if r.get("error")]
            median.setdefault(case, {})[wl] = (statistics.median(r["rate"] for r in runs)
                                               if runs and not errs else None)
            if errs:
                errors.setdefault(case, {})[wl] = errs
            counted = [r["members"] for r in runs if "members" in r]
            members.setdefault(case, {})[wl] = [sum(c[i] for c in counted) for i in range(len(MEMBERS))]
    return {"median": median, "errors": errors, "members": members}


def run(seconds: int = 5, runs: int = 3, connections: int = 8) -> dict[str, Any]:
    """Every case `runs` times (see the module docstring): medians, per-member split, all runs."""
    check_prerequisites()
    if seconds < 1 or runs < 1 or connections < 1:
        raise BenchError("--seconds, --runs and --connections must be 1 or more")
    samples: dict[str, Any] = {case: {wl: [] for wl in WORKLOADS} for case in CASES}
    dispatcher: list[dict[str, Any]] = []
    workdir = tempfile.mkdtemp(prefix="shmfabric-global-")
    try:
        for n in range(1, runs + 1):
            samples["_round"] = n
            dispatcher.append(_fabric_round(samples, connections, seconds, os.path.join(workdir, f"r{n}f")))
            for case in ("nft", "haproxy"):
                _router_round(case, samples, connections, seconds, os.path.join(workdir, f"r{n}{case}"))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    del samples["_round"]
    return {"seconds": seconds, "runs": runs, "connections": connections, "cases": list(CASES),
            "workloads": list(WORKLOADS), **summarize(samples), "samples": samples, "dispatcher": dispatcher}


def _cell(value: float | None) -> str:
    return "error" if value is None else f"{value:,.0f}"


def format_table(res: dict[str, Any]) -> str:
    med = res["median"]
    lines = [f"global bench: wrk, 1 thread, {res['connections']} connections, {res['seconds']} s per case, "
             f"nginx in 2 members; medians of {res['runs']} runs",
             f"{'':38} {'fabric':>10} {'peer':>10} {'fabric/peer':>12}"]
    for wl in WORKLOADS:
        name, unit = WORKLOAD_TEXT[wl]
        fab = med["fabric"][wl]
        for i, peer in enumerate(("direct", "nft", "haproxy")):
            other = med[peer][wl]
            ratio = f"{fab / other:.2f}x" if fab is not None and other else ""
            label = f"{name + ', ' + unit if i == 0 else '':22} vs {peer:12}"
            lines.append(f"{label:38} {_cell(fab):>10} {_cell(other):>10} {ratio:>12}")
    lines.append("requests answered by member 1 / member 2 (all runs):")
    for case in CASES:
        split = "   ".join(f"{WORKLOAD_TEXT[wl][0]} " + " / ".join(f"{n:,}" for n in res["members"][case][wl])
                           for wl in WORKLOADS)
        lines.append(f"  {case:8} {split}")
    lines.append("cases:")
    lines += [f"  {CASE_TEXT[c]}" for c in CASES]
    stops = [c["error"] for c in res.get("dispatcher", []) if "error" in c]
    if res["errors"] or stops:
        lines.append("errors (no figure for these):" if res["errors"] else "errors:")
        for case, by_wl in res["errors"].items():
            for wl, errs in by_wl.items():
                for e in dict.fromkeys(errs):  # each distinct message once
                    lines.append(f"  {case} {WORKLOAD_TEXT[wl][0]}: {e}")
        lines += [f"  the dispatcher at its stop: {e}" for e in dict.fromkeys(stops)]
    return "\n".join(lines)


def has_errors(res: dict[str, Any]) -> bool:
    """Whether a case has no figure or the dispatcher did not stop cleanly."""
    return (any(v is None for by_wl in res["median"].values() for v in by_wl.values())
            or any("error" in c for c in res.get("dispatcher", [])))


def cmd_bench_global(args: argparse.Namespace) -> int:
    box: dict[str, Any] = {}

    def measure() -> dict[str, Any]:
        box["res"] = run(args.seconds, args.runs, args.connections)
        return box["res"]

    rc = run_bench(args, measure, format_table, BenchError)
    return 1 if has_errors(box["res"]) else rc


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more: {text}")
    return value


def register_bench(bench_sub: Any) -> None:
    p = bench_sub.add_parser("global", help="a global address (shmfabric global) vs nftables NAT and HAProxy (root)",
                             description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=_positive, default=5, help="wrk's duration per case, whole seconds (default 5)")
    p.add_argument("--runs", type=_positive, default=3, help="rounds; medians are shown (default 3)")
    p.add_argument("--connections", type=_positive, default=8, help="wrk's connections (default 8)")
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    p.set_defaults(func=cmd_bench_global)
