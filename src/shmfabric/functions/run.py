"""`python -m shmfabric.functions.run`: run one network function as a node of a fabric.

    python -m shmfabric.functions.run --fabric edge --node fw --function firewall \
        --config '{"rules": "policy accept"}' --next ids [--port NAME ...] [--down NAME ...] [--duration S]

The function waits (at most 30 s, or --duration) for the nodes of --next and --port to attach
before it starts, except those named by `--down`: nodes known to be down (restarting, failed for
good; the manager passes them), whose frames are dropped and counted (`next_down`) until they
attach, found by name then.

`--config @FILE` reads the JSON from a file instead. The manager (`shmfabric up`) passes
`--config @/proc/self/fd/N`, N an anonymous in-memory file (memfd) it wrote the config to: a config
may hold secrets (an AES key), and a command line is readable by every local user (`ps`). A config
read from this process's own fd (`/proc/self/fd/N`, `/dev/fd/N`) closes that fd once read.

Exit status: 0 after a graceful stop, 2 for a configuration or usage error (one line on stderr),
75 (EX_TEMPFAIL) when the node name is held by a live node or the fabric's node table is full:
conditions that clear, so a service manager restarts it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

from shmfabric.core.parent import die_with_parent
from shmfabric.core.errors import EXIT_RETRY
from shmfabric.fabric import AttachBusyError, Fabric, FabricError, RegionOpenError
from shmfabric.functions.api import FunctionConfigError
from shmfabric.functions.registry import UnknownFunctionError, load
from shmfabric.functions.runtime import FunctionRunner, install_signal_handlers


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m shmfabric.functions.run", description=__doc__.splitlines()[0])
    p.add_argument("--fabric", required=True)
    p.add_argument("--node", required=True, help="this node's name")
    p.add_argument("--function", required=True, help="function name (entry point in shmfabric.functions)")
    p.add_argument("--config", default="{}", help="JSON object, or @FILE with one (the manager passes "
                   "@/proc/self/fd/N: a memfd, so that no secret of the config shows on the command line)")
    p.add_argument("--next", default="", help="next hop node(s), comma-separated (several = scaled-out group)")
    p.add_argument("--port", action="append", default=[],
                   help="node behind Verdict.port(k), in order: NAME, or NAME=INSTANCE,INSTANCE... for a "
                        "scaled-out node (frames spread by flow hash; the function sees NAME)")
    p.add_argument("--down", action="append", default=[], metavar="NAME",
                   help="a node of --next/--port known to be down (repeatable, or comma-separated): not waited "
                        "for at start; its frames are dropped and counted (next_down) until it attaches")
    p.add_argument("--network", type=int, default=0)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--wait-mode", default="adaptive", choices=["poll", "block", "adaptive"])
    p.add_argument("--duration", type=float, default=None,
                   help="stop after this many seconds (the wait for the next hops to attach counts)")
    p.add_argument("--open-timeout", type=float, default=10.0, help="wait this long for the fabric to exist")
    p.add_argument("--stats-json", help="write the final stats as JSON to this file")
    p.add_argument("--parent-pid", type=int, default=None,
                   help="stop gracefully (as on SIGTERM) when this process, the one that started this one, "
                        "dies, even by SIGKILL (`shmfabric up` passes its own pid; it must start the process "
                        "from a thread that lives as long as it does)")
    return p.parse_args(argv)


_OWN_FD = re.compile(r"^/(?:proc/self/fd|dev/fd)/(\d+)$")


def _close_own_fd(path: str) -> None:
    """A config passed on an inherited fd (the manager's memfd) is read once: the fd is closed, so
    the function (and what it starts) does not hold it. The standard streams are left alone."""
    m = _OWN_FD.match(path)
    if m and int(m.group(1)) > 2:
        try:
            os.close(int(m.group(1)))
        except OSError:
            pass


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    text, what = a.config, "--config"
    if text.startswith("@"):
        path = text[1:]
        what = f"--config {text}: {path}"
        try:
            with open(path) as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            reason = getattr(e, "strerror", None) or str(e)
            print(f"shmfabric.functions.run: --config {a.config}: cannot read {path}: {reason}", file=sys.stderr)
            return 2
        finally:
            _close_own_fd(path)
    try:
        config = json.loads(text)
        if not isinstance(config, dict):
            raise ValueError(f"it holds a JSON {type(config).__name__}")
    except ValueError as e:
        print(f"shmfabric.functions.run: {what} is not a JSON object ({e})", file=sys.stderr)
        return 2
    deadline = time.monotonic() + a.open_timeout
    while True:
        try:
            fab = Fabric.open(a.fabric)
            break
        except RegionOpenError as e:
            if time.monotonic() > deadline:
                print(f"shmfabric.functions.run: {e}", file=sys.stderr)
                return 2
            time.sleep(0.05)
    try:
        cls = load(a.function)
        runner = FunctionRunner(fab, a.node, cls, config, [n for n in a.next.split(",") if n], a.port,
                                batch=a.batch, network=a.network, wait_mode=a.wait_mode,
                                down=[n for d in a.down for n in d.split(",") if n])
    except (UnknownFunctionError, FunctionConfigError, FabricError, ValueError) as e:
        print(f"shmfabric.functions.run: {e}", file=sys.stderr)
        fab.close()
        # a name held by a live node, or a full table, clears when that node goes: not a config error
        return EXIT_RETRY if isinstance(e, AttachBusyError) else 2
    install_signal_handlers(runner)
    if a.parent_pid is not None:
        die_with_parent(a.parent_pid)
    status = 0
    try:
        stats = runner.run(a.duration)
    except TimeoutError as e:
        print(f"shmfabric.functions.run: {e}", file=sys.stderr)
        status = 2
    finally:
        try:
            runner.close()
        except BufferError as e:  # the function still holds a view of a frame: one line, not a traceback
            print(f"shmfabric.functions.run: {e}", file=sys.stderr)
            status = status or 1
        try:
            fab.close()  # detaches what can be; a node left attached is reclaimed when this process exits
        except BufferError:
            status = status or 1
    if status:
        return status
    if a.stats_json:
        with open(a.stats_json, "w") as f:
            json.dump(stats, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
