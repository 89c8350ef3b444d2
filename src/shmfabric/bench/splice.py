"""`shmfabric bench splice` (and `python -m shmfabric.bench.splice`): splicer vs HAProxy.

    shmfabric bench splice [--scenario unequal,uniform,redis,reload,logged,tls,tls-handshake,fanout,pubsub,pipe] [--workers 1,2] [--duration 3] [--pipeline N] [--rounds 2] [--redis-requests N] [--mget-runs N] [--json]

Prints one row per HTTP scenario and worker count: requests/s of the splicer and of HAProxy, their
ratio against the issue's target, and the responses wrk's script found out of request order
(must be 0 for the splicer). Each row is measured in `--rounds` rounds with the peers' order
alternating (splicer, HAProxy, HAProxy, splicer for two; the next row starts with HAProxy): the
figures are medians, the ratio of each round is printed next to them, and the JSON holds every
run. The `unequal` scenario adds a row with the same 128 requests in flight as 128 connections
without pipelining (`unequal-depth1`), so the share of the ratio pipelining brings shows.
The `redis` scenario (`shmfabric.bench.splice_redis`) runs redis-benchmark through the splicer
and through twemproxy (as many connections per server: twemproxy server_connections = the
splicer's pool), and a 1000-key MGET spread over two servers against the same MGET sent straight
to a third that holds every key (`--redis-requests`, `--mget-runs` and `--rounds` shorten or
lengthen it). The `reload` scenario (`shmfabric.bench.splice_reload`) adds a server under load:
the splicer by SIGHUP, twemproxy by a restart (it has no reload).
The `fanout` scenario (`shmfabric.bench.splice_fanout`, opt-in) times whole-server Redis commands
through the splicer (a SCAN of every key, DBSIZE, redis-py's Lock) against the same work sent
straight to the servers, and records what twemproxy answers to them. The `pubsub` scenario
(`shmfabric.bench.splice_pubsub`, opt-in) times Redis pub/sub (delivery latency, messages/s)
and a BLPOP queue's hand-off through the splicer against the server used directly. The `pipe`
scenario (`shmfabric.bench.splice_pipe`, opt-in) times `redis-cli --pipe` mass insertion
(multibulk, inline, the two mixed, small MGETs) through the splicer, twemproxy and one server.
The `logged` scenario (opt-in, not in the default list) is scenario 2 with both proxies adding
X-Forwarded-For and writing an access-log line per request to their standard output, a pipe read
by a `cat >> FILE` of their own (the same sink for both); under the table it prints each log's
line count next to the requests wrk completed, the lines HAProxy dropped, and the
X-Forwarded-For value nginx received through each proxy. The JSON output also records the
command, the git commit of the tree and the machine (`meta`).
The `tls` scenario (opt-in) is scenario 2 with both proxies terminating TLS with the same
self-signed EC P-256 certificate, wrk over https; `tls-handshake` (opt-in) sends every request on a
new TLS connection (`Connection: close`), so its rows are connections/s, with no target. Under
the table: what a probe negotiated through each proxy (protocol, cipher, ALPN; certificate
verified) and how many of its reconnects resumed their session, and for `tls-handshake` the
responses that closed their connection against wrk's requests, with HAProxy's own counts of the
connections and of full and resumed TLS handshakes.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from dataclasses import asdict
from typing import Any, Sequence

from .splice_http import LOG_SINK, UNPIPELINED, ScenarioResult, run_scenarios
from .splice_redis import BenchError, info_line, run_info

__all__ = ["register_bench", "main", "render_table"]

_TITLES = {"unequal": "1. unequal latency (0 ms / 50 ms echo backends)", "uniform": "2. uniform fast nginx backends",
           "logged": "2L. uniform nginx + X-Fwd-For + access log", "tls": "2T. uniform nginx, TLS on both proxies",
           "tls-handshake": "2H. new TLS connection per request (=conn/s)"}
# Rows a scenario adds (not scenarios of their own: not accepted by --scenario).
_ROW_TITLES = {**_TITLES, UNPIPELINED: "1b. same 128 in flight, 128 conns, no pipelining"}
# Scenarios with a module of their own (shmfabric.bench.splice_<name>: run() and format_table()).
_OTHER = ("redis", "reload", "fanout", "pubsub", "pipe")


def _module(name: str) -> Any:
    return importlib.import_module(f"{__package__}.splice_{name}")


def render_table(results: Sequence[ScenarioResult]) -> str:
    """A plain-text table of the results, one row per scenario and worker count."""
    head = f"{'scenario':<48} {'workers':>7} {'wrk c x d':>9} {'splicer req/s':>14} {'haproxy req/s':>14} {'ratio':>7} " \
           f"{'target':>7} {'ratio per round':>16} {'order':>6} {'order errs (s/h)':>17} {'non-2xx (s/h)':>14}"
    lines = [head, "-" * len(head)]

    def errs(x: Any) -> str:
        return "n/a" if x is None else str(x)

    def pair(a: Any, b: Any) -> str:  # "s/h", or "n/a" for a figure neither has
        return "n/a" if a is None and b is None else f"{errs(a)}/{errs(b)}"
    for r in results:
        s, h = r.splicer, r.haproxy
        lines.append(
            f"{_ROW_TITLES.get(r.scenario, r.scenario) + (f' [pipeline {r.pipeline}]' if r.pipeline > 1 else ''):<48} "
            f"{r.workers:>7} {f'{r.connections}x{r.depth}':>9} {s['requests_per_s']:>14,.0f} "
            f"{h['requests_per_s']:>14,.0f} {r.ratio:>6.2f}x "
            f"{'—' if r.target is None else '>=' + format(r.target, 'g') + 'x':>7} "
            f"{' '.join(format(x, '.2f') for x in r.run_ratios):>16} "
            f"{''.join(p[0].upper() for p in r.order):>6} "
            f"{pair(s['out_of_order'], h['out_of_order']):>17} "
            f"{str(s['non2xx'] + s['socket_errors']) + '/' + str(h['non2xx'] + h['socket_errors']):>14}")
    if results:
        n = len(results[0].order) // 2
        lines.append(f"req/s: median of each peer's {n} run(s), one per round; order: S splicer, H HAProxy, as they ran "
                     "(each started afresh, warmed up 1 s); wrk c x d: connections x requests pipelined on each")
    plain = [r for r in results if r.scenario == UNPIPELINED]
    if plain:
        n = plain[0].pool
        cap = "" if n is None else (f": the 50 ms backend, one request per connection at a time, takes at most {n} x 20 "
                                    f"= {n * 20:,} requests/s from each splicer worker")
        lines.append("1b: the same proxies in the same run, 128 keep-alive connections of one request each (16 per wrk "
                     "thread; order not checked: one request in flight per connection); the splicer keeps at most "
                     f"{'--pool' if n is None else f'{n} (--pool)'} connections per backend server and worker, HAProxy one "
                     f"per request in flight (no server maxconn){cap}")
    logged = [r for r in results if "log_lines" in r.splicer]
    if logged:
        lines += ["", "access logs of the measured runs (lines written vs responses wrk completed, summed over the "
                  f"runs; up to {logged[0].splicer['in_flight_max']} more requests can be in flight when wrk stops), "
                  "lines HAProxy dropped (pipe full), and the X-Forwarded-For nginx received:"]
        sub = f"{'':<48} {'workers':>7} {'splicer log/wrk':>22} {'haproxy log/wrk':>22} {'haproxy dropped':>16} " \
              f"{'X-Forwarded-For (s/h)':>24}"
        lines += [sub, "-" * len(sub)]
        for r in logged:
            s, h = r.splicer, r.haproxy
            lines.append(f"{_TITLES['logged']:<48} {r.workers:>7} {format(s['log_lines'], ',') + '/' + format(s['requests'], ','):>22} "
                         f"{format(h['log_lines'], ',') + '/' + format(h['requests'], ','):>22} "
                         f"{errs(h['dropped_logs']):>16} "
                         f"{str(s['xff_echo']) + ' / ' + str(h['xff_echo']):>24}")
        lines.append(f"log sink of both: {LOG_SINK} (splicer access_log \"-\", HAProxy log stdout format raw)")
    tls = [r for r in results if isinstance(r.splicer.get("tls"), dict)]
    if tls:
        n = tls[0].splicer["tls"]["reconnects"]
        lines += ["", "TLS through each proxy (a probe verifying the certificate: protocol, cipher, ALPN; 'resumed': "
                  f"how many of {n} sequential reconnects offering the last session, as wrk does, resumed it):"]
        sub = f"{'':<48} {'workers':>7} {'splicer':>40} {'haproxy':>40} {'resumed of ' + str(n) + ' (s / h)':>23}"
        lines += [sub, "-" * len(sub)]

        def neg(t: dict) -> str:
            return f"{t['version']} {t['cipher']} {t['alpn']}"
        for r in tls:
            s, h = r.splicer["tls"], r.haproxy["tls"]
            lines.append(f"{_TITLES[r.scenario]:<48} {r.workers:>7} {neg(s):>40} {neg(h):>40} "
                         f"{str(s['resumed']) + ' / ' + str(h['resumed']):>23}")
        hs = [r for r in tls if r.scenario == "tls-handshake"]
        if hs:
            lines += ["", "new connections of the measured runs (summed): responses with 'Connection: close' / requests wrk "
                      "completed (wrk reconnects after each), and HAProxy's own counts: connections accepted, "
                      "TLS handshakes full + resumed:"]
            sub = f"{'':<48} {'workers':>7} {'splicer closed/wrk':>20} {'haproxy closed/wrk':>20} {'haproxy conns':>14} " \
                  f"{'full + resumed':>18}"
            lines += [sub, "-" * len(sub)]
            for r in hs:
                s, h = r.splicer, r.haproxy
                lines.append(f"{_TITLES[r.scenario]:<48} {r.workers:>7} "
                             f"{format(s['closed'], ',') + '/' + format(s['requests'], ','):>20} "
                             f"{format(h['closed'], ',') + '/' + format(h['requests'], ','):>20} "
                             f"{h['connections']:>14,} {format(h['tls_full'], ',') + ' + ' + format(h['tls_resumed'], ','):>18}")
    return "\n".join(lines)


def _csv(kind: type) -> Any:
    def parse(text: str) -> list:
        try:
            return [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a comma-separated list: {text!r}") from None
    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scenario", type=_csv(str), default=["unequal", "uniform", "redis", "reload"],
                   help="comma-separated: unequal (scenario 1), uniform (scenario 2), redis (scenario 3), "
                        "reload (a server added under load: splicer reload vs twemproxy restart), logged "
                        "(scenario 2 with X-Forwarded-For and an access log in both proxies; opt-in), tls "
                        "(scenario 2 with both proxies terminating TLS; opt-in), tls-handshake (TLS with a new "
                        "connection per request: connections/s; opt-in), fanout (whole-server Redis commands: "
                        "SCAN, DBSIZE, redis-py Lock, against the servers directly; opt-in), pubsub (Redis pub/sub "
                        "delivery latency and messages/s, BLPOP hand-off, against the server directly; opt-in), pipe "
                        "(redis-cli --pipe mass insertion against twemproxy and one server; opt-in); default: the first four")
    p.add_argument("--workers", type=_csv(int), default=[1, 2], help="worker counts to compare (default 1,2)")
    p.add_argument("--duration", type=float, default=3.0, help="seconds per wrk run (default 3)")
    p.add_argument("--pool", type=int, default=64, help="splicer pool max per backend server (default 64)")
    p.add_argument("--pipeline", type=int, default=1,
                   help="scenarios 2, logged, tls and tls-handshake only: requests pipelined per pooled nginx "
                        "connection (default 1)")
    p.add_argument("--rounds", type=int, default=2,
                   help="HTTP scenarios and redis: rounds per row, the peers' order alternating (2: A B B A; "
                        "default 2); figures are medians, each run is in the JSON")
    p.add_argument("--redis-requests", type=int, default=200_000,
                   help="redis scenario: redis-benchmark -n per test (default 200000)")
    p.add_argument("--mget-runs", type=int, default=300, help="redis scenario: timed MGET round trips (default 300)")
    p.add_argument("--json", action="store_true", dest="bench_json", help="print JSON instead of a table")


def _run(args: argparse.Namespace) -> int:
    bad = [s for s in args.scenario if s not in _TITLES and s not in _OTHER]
    if bad:
        from shmfabric.cli.main import CliError

        raise CliError(f"unknown scenario {', '.join(bad)}; use unequal, uniform, redis, reload, logged, tls, "
                       "tls-handshake, fanout, pubsub and/or pipe")
    if args.rounds < 1:
        from shmfabric.cli.main import CliError

        raise CliError("--rounds must be at least 1")
    http = [s for s in args.scenario if s in _TITLES]
    as_json = args.bench_json or getattr(args, "json", False)
    meta = run_info()  # before the runs: the load average is the machine's, not the bench's
    others: dict[str, Any] = {}  # scenario -> its module's run() result, in _OTHER's order
    try:
        results = run_scenarios(http, args.workers, args.duration, args.pool, args.pipeline, args.rounds) if http else []
        for name in _OTHER:
            if name in args.scenario:
                kw = dict(requests=args.redis_requests, mget_runs=args.mget_runs, rounds=args.rounds) \
                    if name == "redis" else {}
                others[name] = _module(name).run(**kw)
    except (RuntimeError, BenchError) as exc:  # a peer missing or not starting: one line
        from shmfabric.cli.main import CliError

        raise CliError(str(exc)) from None
    if as_json:
        out: dict[str, Any] = {"meta": meta, "http": [{**asdict(r), "met": r.met} for r in results], **others}
        print(json.dumps(out, indent=2, default=str))
    else:
        tables = [render_table(results)] if results else []
        tables += [_module(name).format_table(r) for name, r in others.items()]
        tables.append(info_line(meta))
        print("\n\n".join(tables))
    return 0


def register_bench(bench_sub: Any) -> None:
    """Add `splice` to `shmfabric bench` (called by shmfabric.cli.bench)."""
    p = bench_sub.add_parser("splice", help="the splicer vs HAProxy (HTTP) and twemproxy (Redis)",
                             description=__doc__.splitlines()[0])
    add_arguments(p)
    p.set_defaults(func=_run)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m shmfabric.bench.splice", description=__doc__.splitlines()[0])
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return _run(args)
    except Exception as exc:  # CliError and friends: one line, no traceback
        if type(exc).__name__ == "CliError":
            print(f"bench splice: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
