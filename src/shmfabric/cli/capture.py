"""`shmfabric capture NODE -w FILE`: a tap on any running function node, written as pcap.

The capture attaches its own node to the fabric, asks NODE (through a control message) to
mirror every frame it receives (a source: every frame it makes) to it, and writes them as a
classic pcap file (or stdout) that tshark and Wireshark open: each frame with its own Ethernet
header, stamped with the time the tap copied it. The tap copies frames and never slows the node:
what does not fit is dropped and counted. Several captures may tap one node at once; each one's
tap is switched off when it ends (and by the node itself if the capture dies). If the tapped node
goes away (stops, is killed, is restarted) the capture ends with an error, as tcpdump does when
its interface goes away: it does not follow a new process.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from shmfabric.cli.main import CliError, add_json_flag


# the bounds of the monitor function's `snaplen` (the same pcap writer)
SNAPLEN_MIN, SNAPLEN_MAX = 64, 262144
DEFAULT_FABRIC = "edge"  # the fabric of the built-in topology (`shmfabric up` with no CONFIG)


def _open_fabric(name: str | None):
    """The fabric to capture on; a missing one is a one-line error saying how to name or start it."""
    from shmfabric.fabric import Fabric, FabricError, RegionNotFoundError

    try:
        return Fabric.open(name or DEFAULT_FABRIC)
    except RegionNotFoundError as e:
        if name is None:
            raise CliError(f"no fabric {DEFAULT_FABRIC!r} (the default); give --fabric NAME, or start one: "
                           f"shmfabric up / shmfabric create {DEFAULT_FABRIC}") from None
        raise CliError(f"{e}, or run a topology on it with `shmfabric up`") from None
    except FabricError as e:
        raise CliError(str(e)) from None


def _not_attached(fab, node: str, own: str) -> str:
    """The error for a node that is not attached: which nodes are, and what to do."""
    from shmfabric.manager.config import RESERVED_NODE_NAMES

    names = sorted(n["name"] for n in fab.nodes() if n["state"] == "up" and n["alive"] and n["name"] != own
                   and n["name"] not in RESERVED_NODE_NAMES and not n["name"].startswith("capture-"))
    if not names:
        return (f"no node named {node!r} is attached to fabric {fab.name!r}, and no other node is; "
                "start its topology first (shmfabric up), or give --fabric NAME")
    return (f"no node named {node!r} is attached to fabric {fab.name!r}; attached: {', '.join(names)} "
            "(tap one of them, or give --fabric NAME)")


class _Ended(Exception):
    """The capture ended early: `why` is the one-line reason (exit status 1)."""

    def __init__(self, kind: str, why: str):
        super().__init__(why)
        self.kind, self.why = kind, why


def _node_gone(fab, name: str, ref: tuple[int, int]) -> str | None:
    """None while the tapped incarnation `ref` of node `name` is up and its process alive;
    else why it is gone, in words."""
    from shmfabric.core import native
    from shmfabric.core.liveness import node_alive

    idx, gen = ref
    region = fab.region
    e = region.node_entry(idx)
    if region.core.node_state(idx) == native.NODE_UP and e["gen"] == gen and node_alive(e):
        return None
    now = fab.node_ref(name)
    if now is not None and now != ref:
        return (f"node {name!r} was restarted (a new process has its name now); the tap was on the old one. "
                "Run the capture again to tap the new process")
    return (f"node {name!r} went away (it stopped, exited or was killed); if it is restarted, run the "
            "capture again to tap the new process")


def _post(ctl, dst: int, op: dict) -> int | None:
    """Send a control request without waiting for its reply (which `_answer` finds later): the
    capture's own receive loop keeps reading the tapped frames meanwhile."""
    import json

    rid = next(ctl._ids)
    return rid if ctl.node.send_control(dst, json.dumps({**op, "id": rid}).encode()) else None


def _answer(ctl, dst: int, rid: int) -> dict | None:
    for i, (src, reply) in enumerate(ctl._replies):
        if src == dst and reply.get("id") == rid:
            del ctl._replies[i]
            return reply
    return None


def _pcap_ts(now_us: int, stamp: int) -> float:
    """The wall-clock time (seconds) of a copy the tap stamped `stamp` (microseconds modulo 2**32),
    taken at most ~35 minutes before `now_us` (the time of its receive)."""
    d = (now_us - stamp) & 0xFFFFFFFF
    if d >= 1 << 31:  # stamped "after" it was received: clocks moved; as close as can be told
        d -= 1 << 32
    return (now_us - d) / 1e6


def cmd_capture(args: argparse.Namespace) -> int:
    import json

    from shmfabric.fabric import FabricError
    from shmfabric.functions.builtin.monitor import LINKTYPE_ETHERNET, LINKTYPE_RAW, PcapWriter, ethernet_header
    from shmfabric.functions.control import ControlClient, ControlError

    if args.count is None and args.seconds is None:
        raise CliError("give --count N and/or --seconds S (how long to capture)")
    if args.count is not None and args.count < 1:
        raise CliError(f"--count {args.count}: give the number of frames to capture, 1 or more")
    if args.seconds is not None and not args.seconds > 0:
        raise CliError(f"--seconds {args.seconds:g}: give how long to capture, a number of seconds above 0")
    if not SNAPLEN_MIN <= args.snaplen <= SNAPLEN_MAX:
        raise CliError(f"--snaplen {args.snaplen}: give the bytes kept of each frame, "
                       f"{SNAPLEN_MIN} to {SNAPLEN_MAX}")
    to_stdout = args.write == "-"
    if to_stdout and sys.stdout.isatty():
        raise CliError("-w -: stdout is a terminal; pipe the pcap into a reader (| tshark -r -) or give a file")
    where = "stdout" if to_stdout else args.write
    say = sys.stderr if to_stdout else sys.stdout  # with the pcap on stdout, messages go to stderr
    raw = args.linktype == "raw"
    fab = _open_fabric(args.fabric)
    ctl = None
    f = None
    ref = None  # (id, incarnation) of the tapped node
    tapped = new_tap = False
    captured = not_ip = 0
    ended: _Ended | None = None
    interrupted = []
    counts: dict = {}
    base: dict = {}
    old_handlers = {}
    try:
        try:
            ctl = ControlClient(fab, f"capture-{os.getpid()}")
        except FabricError as e:
            raise CliError(f"cannot attach the capture node: {e}") from None
        ref = fab.node_ref(args.node)
        if ref is None:
            raise CliError(_not_attached(fab, args.node, ctl.node.name))
        dst = ref[0]
        # the output first: a file that cannot be written taps nothing
        try:
            f = sys.stdout.buffer if to_stdout else open(args.write, "wb")
            w = PcapWriter(f, LINKTYPE_RAW if raw else LINKTYPE_ETHERNET, args.snaplen)
            f.flush()
        except OSError as e:
            raise CliError(f"cannot write {where}: {e.strerror or e}") from None
        for sig in (signal.SIGINT, signal.SIGTERM):  # as tcpdump: stop, write the summary, exit 0
            old_handlers[sig] = signal.signal(sig, lambda *_: interrupted.append(True))
        try:
            base = ctl.request(dst, {"op": "stats"}, timeout=10).get("counters", {})
            reply = ctl.request(dst, {"op": "mirror", "to": ctl.node.name}, timeout=10)
        except ControlError as e:
            if fab.node_ref(args.node) != ref:  # it left meanwhile
                raise CliError(_not_attached(fab, args.node, ctl.node.name)) from None
            raise CliError(str(e)) from None
        if not reply.get("ok"):
            raise CliError(f"node {args.node!r} refused the tap: {reply.get('error')}")
        tapped = True
        # a runtime that stamps copies and keeps their headers also serves several taps at once
        new_tap = reply.get("stamp") == "us32"
        own_header = reply.get("header") == "own"
        end = time.monotonic() + args.seconds if args.seconds is not None else None
        next_check = 0.0
        last_seen = time.monotonic()
        poll: tuple[int, float] | None = None  # (request id, sent at) of a question to the node
        gone: str | None = None  # why the tapped node is gone
        try:
            while (args.count is None or captured < args.count) and (end is None or time.monotonic() < end):
                if interrupted:
                    break
                left = 0.1 if end is None else max(0.0, min(0.1, end - time.monotonic()))
                if gone is not None:
                    left = 0.0  # the node is gone: what it copied before is still in the ring
                recs: list[tuple[int, bytes]] = []
                got = False
                with ctl.node.recv_batch(256, left) as batch:
                    if len(batch):
                        now_us = time.time_ns() // 1000
                        got = True
                        for fr in batch:
                            if args.count is not None and captured + len(recs) >= args.count:
                                break
                            if raw:
                                if fr.ethertype not in (0x0800, 0x86DD) or not len(fr) or fr[0] >> 4 not in (4, 6):
                                    not_ip += 1
                                    continue
                                data = bytes(fr)
                            else:
                                data = fr.raw if own_header else ethernet_header(fr) + bytes(fr)
                            recs.append((fr.meta if new_tap else now_us, data))
                if got:
                    last_seen = time.monotonic()
                if recs:
                    i = 0
                    while i < len(recs):  # one write per run of copies the tap stamped alike
                        j = i + 1
                        while j < len(recs) and recs[j][0] == recs[i][0]:
                            j += 1
                        ts = _pcap_ts(now_us, recs[i][0]) if new_tap else recs[i][0] / 1e6
                        w.write_many(ts, [d for _, d in recs[i:j]])
                        i = j
                    f.flush()
                    captured += len(recs)
                if gone is not None and not got:
                    raise _Ended("node_gone", gone)
                now = time.monotonic()
                if gone is None and now >= next_check:  # the tapped node still the one tapped, alive?
                    next_check = now + 0.1
                    gone = _node_gone(fab, args.node, ref)
                if new_tap:  # no frames for a while: is the tap still on? (asked while idle only)
                    if poll is not None:
                        ans = _answer(ctl, dst, poll[0])
                        if ans is not None:
                            poll = None
                            if ctl.node.name not in (ans.get("taps") or {}):
                                raise _Ended("tap_gone", f"the tap on node {args.node!r} was switched off "
                                                         "(a `mirror` op with \"to\": null ended every tap)")
                        elif now - poll[1] > 5:
                            poll = None
                    elif now - last_seen >= 1.0:
                        rid = _post(ctl, dst, {"op": "mirror", "list": True})
                        poll = None if rid is None else (rid, now)
                        last_seen = now
        except _Ended as e:
            ended = e
        except OSError as e:  # disk full, a reader of stdout that went away, ...
            ended = _Ended("write_error", f"cannot write {where}: {e.strerror or e}")
            if to_stdout and isinstance(e, BrokenPipeError):
                _quiet_stdout()
    finally:
        # A node seen gone (dead, its entry maybe not reclaimed yet) is not asked: the request
        # would wait out its timeout. A live node answers within milliseconds.
        if tapped and ctl is not None and gone is None and fab.node_ref(args.node) == ref \
                and _node_gone(fab, args.node, ref) is None:
            try:
                off = {"op": "mirror", "to": ctl.node.name, "off": True} if new_tap else {"op": "mirror", "to": None}
                counts = ctl.request(ref[0], off, timeout=2)
                if not new_tap:  # an older runtime: node-wide counters, since the start
                    now_c = ctl.request(ref[0], {"op": "stats"}, timeout=2).get("counters", {})
                    counts = {k: now_c.get(k, 0) - base.get(k, 0) for k in ("mirrored", "mirror_dropped")}
            except ControlError:
                counts = {}
        for sig, h in old_handlers.items():
            signal.signal(sig, h)
        if f is not None:
            try:
                f.flush()
            except OSError as e:
                if ended is None:
                    ended = _Ended("write_error", f"cannot write {where}: {e.strerror or e}")
                if to_stdout:
                    _quiet_stdout()
            if not to_stdout:
                try:
                    f.close()
                except OSError:
                    pass
        if ctl is not None:
            ctl.close()
        fab.close()
    out = {"node": args.node, "file": where, "captured": captured,
           "mirrored": counts.get("mirrored"), "mirror_dropped": counts.get("mirror_dropped"),
           "ended": ended.kind if ended else ("interrupted" if interrupted else "done")}
    if raw:
        out["not_ip"] = not_ip
    if ended is not None:
        out["error"] = ended.why
    if getattr(args, "json", False):
        print(json.dumps(out), file=say)
    else:
        dropped = ("an unknown number" if out["mirror_dropped"] is None else f"{out['mirror_dropped']:,}")
        extra = f"; {not_ip:,} frames not IP left out (--linktype raw)" if not_ip else ""
        print(f"captured {captured:,} frames of node {args.node} to {where} "
              f"({dropped} dropped by the tap while it was on{extra})", file=say)
    if ended is not None:
        print(f"shmfabric: error: {ended.why}", file=sys.stderr)
        return 1
    return 0


def _quiet_stdout() -> None:
    """stdout's reader went away: point stdout at /dev/null, so the exit does not fail flushing it."""
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, sys.stdout.fileno())
        os.close(fd)
    except (OSError, ValueError):
        pass


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("capture", help="write a running node's traffic to a pcap file (a tap)",
                       description=__doc__.splitlines()[0])
    p.add_argument("node", help="the function node (instance) to tap, e.g. fw or fw-2")
    p.add_argument("-w", "--write", required=True, metavar="FILE",
                   help="pcap file to write; - writes it to stdout (messages go to stderr)")
    p.add_argument("--fabric", help=f"the fabric the node is on (default: {DEFAULT_FABRIC}, the built-in topology's)")
    p.add_argument("-c", "--count", type=int, help="stop after this many frames")
    p.add_argument("--seconds", type=float, help="stop after this many seconds")
    p.add_argument("--linktype", choices=["ethernet", "raw"], default="ethernet",
                   help="ethernet (each frame's own Ethernet header) or raw IP (LINKTYPE_RAW; frames "
                        "that are not IP are left out and counted)")
    p.add_argument("--snaplen", type=int, default=65535,
                   help=f"bytes kept of each frame, {SNAPLEN_MIN}..{SNAPLEN_MAX} (default 65535)")
    add_json_flag(p)
    p.set_defaults(func=cmd_capture)
