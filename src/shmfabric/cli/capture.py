"""`shmfabric capture NODE -w FILE`: a tap on any running function node, written as pcap.

The capture attaches its own node to the fabric, asks NODE (through a control message) to
mirror every frame it receives (a source: every frame it makes) to it, and writes them as a
classic pcap file that tshark and Wireshark open. The tap copies frames and never slows the
node: what does not fit is dropped and counted. The mirror is switched off when the capture ends
(and by the node itself if the capture dies).
"""
from __future__ import annotations

import argparse
import os
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
    fab = _open_fabric(args.fabric)
    ctl = None
    captured = 0
    try:
        try:
            ctl = ControlClient(fab, f"capture-{os.getpid()}")
        except FabricError as e:
            raise CliError(f"cannot attach the capture node: {e}") from None
        if fab.node_id(args.node) is None:
            raise CliError(_not_attached(fab, args.node, ctl.node.name))
        try:
            reply = ctl.request(args.node, {"op": "mirror", "to": ctl.node.name}, timeout=10)
        except ControlError as e:
            if fab.node_id(args.node) is None:  # it left meanwhile
                raise CliError(_not_attached(fab, args.node, ctl.node.name)) from None
            raise CliError(str(e)) from None
        if not reply.get("ok"):
            raise CliError(f"node {args.node!r} refused the tap: {reply.get('error')}")
        raw = args.linktype == "raw"
        try:
            f = open(args.write, "wb")
        except OSError as e:
            raise CliError(f"cannot write {args.write}: {e.strerror}") from None
        with f:
            w = PcapWriter(f, LINKTYPE_RAW if raw else LINKTYPE_ETHERNET, args.snaplen)
            end = time.monotonic() + args.seconds if args.seconds is not None else None
            while (args.count is None or captured < args.count) and (end is None or time.monotonic() < end):
                left = 0.2 if end is None else max(0.0, min(0.2, end - time.monotonic()))
                with ctl.node.recv_batch(256, left) as batch:
                    take = len(batch) if args.count is None else min(len(batch), args.count - captured)
                    datas = [bytes(fr) if raw else ethernet_header(fr) + bytes(fr) for fr in list(batch)[:take]]
                if datas:
                    w.write_many(time.time(), datas)
                    captured += len(datas)
        try:
            stats = ctl.request(args.node, {"op": "mirror", "to": None}, timeout=10) and \
                ctl.request(args.node, {"op": "stats"}, timeout=10)
        except ControlError:
            stats = {}
    finally:
        if ctl is not None:
            ctl.close()
        fab.close()
    c = stats.get("counters", {})
    out = {"node": args.node, "file": args.write, "captured": captured,
           "mirror_dropped": c.get("mirror_dropped", 0), "mirrored": c.get("mirrored", 0)}
    if getattr(args, "json", False):
        print(json.dumps(out))
    else:
        print(f"captured {captured:,} frames of node {args.node} to {args.write} "
              f"({out['mirror_dropped']:,} dropped by the tap while it was on)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("capture", help="write a running node's traffic to a pcap file (a tap)",
                       description=__doc__.splitlines()[0])
    p.add_argument("node", help="the function node (instance) to tap, e.g. fw or fw-2")
    p.add_argument("-w", "--write", required=True, metavar="FILE", help="pcap file to write")
    p.add_argument("--fabric", help=f"the fabric the node is on (default: {DEFAULT_FABRIC}, the built-in topology's)")
    p.add_argument("-c", "--count", type=int, help="stop after this many frames")
    p.add_argument("--seconds", type=float, help="stop after this many seconds")
    p.add_argument("--linktype", choices=["ethernet", "raw"], default="ethernet",
                   help="ethernet (a header with the fabric MACs) or raw IP (LINKTYPE_RAW)")
    p.add_argument("--snaplen", type=int, default=65535,
                   help=f"bytes kept of each frame, {SNAPLEN_MIN}..{SNAPLEN_MAX} (default 65535)")
    add_json_flag(p)
    p.set_defaults(func=cmd_capture)
