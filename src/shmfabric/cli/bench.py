"""`shmfabric bench VERB`: benchmarks. `bench` is a noun; each benchmark is a sub-verb.

`transport` is defined here. Other benchmarks add themselves without editing this file: a
module among `BENCH_MODULES` that exists and defines `register_bench(bench_sub)` gets the
`bench` sub-parsers object and adds its own verb (with `set_defaults(func=...)`).
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Any

from .main import CliError

#: Modules that may contribute `shmfabric bench <verb>` sub-commands via `register_bench`.
BENCH_MODULES = [
    "shmfabric.bench.splice",
    "shmfabric.bench.splice_redis",
    "shmfabric.bench.chain",
    "shmfabric.bench.control",
    "shmfabric.bench.adapter",
    "shmfabric.bench.memif",
    "shmfabric.bench.global_net",
]


def register(subparsers: Any) -> None:
    """Add `bench` and its verbs to the top-level sub-parsers."""
    parser = subparsers.add_parser("bench", help="run benchmarks (transport, ...)",
                                   description="Benchmarks. Run `shmfabric bench VERB --help` for one.")
    bench_sub = parser.add_subparsers(dest="bench_command", metavar="VERB")
    register_transport(bench_sub)
    for name in BENCH_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # not written (yet): no such verb
                continue
            raise
        hook = getattr(mod, "register_bench", None)
        if hook is not None:
            hook(bench_sub)

    def no_verb(args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    parser.set_defaults(func=no_verb)


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of byte counts: {text!r}") from None
    if not sizes:
        raise argparse.ArgumentTypeError("no sizes given")
    return sizes


def _names(text: str) -> tuple[str, ...]:
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    if not names:
        raise argparse.ArgumentTypeError("no names given")
    return names


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text}")
    return value


def register_transport(bench_sub: Any) -> None:
    """Add `shmfabric bench transport`."""
    from shmfabric.bench.transport import DEFAULT_SIZES, DURATION_ENV, MODES

    p = bench_sub.add_parser(
        "transport",
        help="shmfabric against multiprocessing, sockets, zmq, faster-fifo and iceoryx2",
        description=(
            "Throughput, one-way latency (half a ping-pong) and forwarding through a middle node, "
            "for shmfabric and the IPC a Python program could use instead, side by side in one run, "
            "with the machine's memcpy rate. Every receiver reads each frame's length and first byte."
        ),
    )
    p.add_argument("--sizes", type=_sizes, default=DEFAULT_SIZES, metavar="N,N,...",
                   help=f"frame sizes in bytes (default {','.join(map(str, DEFAULT_SIZES))})")
    p.add_argument("--duration", type=_seconds, default=None, metavar="S",
                   help=f"seconds measured per case (default ${DURATION_ENV} or 1)")
    p.add_argument("--only", type=_names, default=None, metavar="NAME,...",
                   help="run only these transports (see --list)")
    p.add_argument("--modes", type=_names, default=MODES, metavar="MODE,...",
                   help=f"which measurements: {','.join(MODES)} (default all)")
    p.add_argument("--batch", type=int, default=256, help="frames per batch where a transport has batch calls")
    p.add_argument("--start-method", choices=("fork", "spawn"), default="fork",
                   help="how worker processes start (default fork)")
    p.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin processes to cores")
    p.add_argument("--list", action="store_true", help="list the transports and exit")
    # SUPPRESS: without the flag, keep what the global `shmfabric --json` said.
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                   help="print a JSON list of result objects instead of tables")
    p.set_defaults(func=cmd_transport)


def cmd_transport(args: argparse.Namespace) -> int:
    """Run the transport benchmark and print a table or JSON."""
    from shmfabric.bench.peers import all_transports
    from shmfabric.bench.transport import BenchConfig, default_duration, public_rows, render, run_bench

    transports = all_transports()
    if args.list:
        for t in transports:
            print(f"{t.name:16} {','.join(t.modes):27} {t.description}")
        return 0
    try:
        duration = args.duration if args.duration is not None else default_duration()
        config = BenchConfig(sizes=args.sizes, duration=duration, modes=args.modes, only=args.only,
                             pin=args.pin, batch=args.batch, start_method=args.start_method)
        config.validate(transports)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    as_json = getattr(args, "json", False)
    if as_json:
        rows = run_bench(config, transports)
        json.dump(public_rows(rows), sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    # Progress on one overwritten line of a terminal. Not rich's spinner: it runs a thread, and
    # the benchmark forks its workers from this process.
    tty = sys.stderr.isatty()

    def progress(what: str) -> None:
        if tty:
            sys.stderr.write(f"\r\033[Kmeasuring {what} ...")
            sys.stderr.flush()

    try:
        rows = run_bench(config, transports, progress=progress)
    finally:
        if tty:
            sys.stderr.write("\r\033[K")
    render(rows)
    return 0
