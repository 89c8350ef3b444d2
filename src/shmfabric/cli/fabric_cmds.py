"""`shmfabric create | destroy | inspect`: manage fabric regions from the shell."""
from __future__ import annotations

import argparse
import json
import re
import time

from shmfabric.cli.main import CliError, add_json_flag
from shmfabric.cli.main import console as make_console


def _parse_networks(text: str) -> list[dict]:
    """'1500:4096,9000:1024' -> [{'mtu': 1500, 'slots': 4096}, {'mtu': 9000, 'slots': 1024}]"""
    out = []
    for part in text.split(","):
        mtu, _, slots = part.strip().partition(":")
        try:
            out.append({"mtu": int(mtu), "slots": int(slots or 4096)})
        except ValueError:
            raise CliError(f"--networks entry {part!r} is not MTU[:SLOTS] (e.g. 1500:4096,9000:1024)") from None
    return out


def _parse_mode(text: str) -> int:
    """'600' or '0o640' -> the permission bits; CliError for anything that is not octal 0..777."""
    try:
        mode = int(text, 8)
    except ValueError:
        raise CliError(f"--mode {text!r} is not an octal file mode (e.g. 600 or 660)") from None
    if not 0 <= mode <= 0o777:
        raise CliError(f"--mode {text!r} is out of range: give permission bits in octal, 000 to 777 (e.g. 600)")
    return mode


# a fabric name, as the manager's config allows it (the region file is /dev/shm/shmfabric-NAME)
_NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")


def _check_name(name: str) -> None:
    """CliError for a name `create` cannot use, saying the rule (a '/' is not a directory to create)."""
    from shmfabric.core.region import NAME_LEN

    if not _NAME_RE.fullmatch(name):
        raise CliError(f"fabric name {name!r} is not valid: a name may only hold letters, digits, '_', '.', '-' "
                       f"(not starting with '.'; no '/'), at most {NAME_LEN - 1} bytes; the region is "
                       "/dev/shm/shmfabric-NAME")
    if len(name.encode()) >= NAME_LEN:
        raise CliError(f"fabric name {name!r} is longer than {NAME_LEN - 1} bytes; use a shorter name")


# The region's parameter names as `create` spells them on the command line.
_FLAGS = {"max_nodes": "--max-nodes", "ring_size": "--ring-size", "n_mcast": "--mcast",
          "tape_entries": "--tape-entries", "tape_entry_size": "--tape-entry-size"}
_PARAM = re.compile(r"\b(" + "|".join(_FLAGS) + r")=")


def _flag_names(message: str) -> str:
    """A region error in the flags' words: "max_nodes=1 is out of range" -> "--max-nodes 1 ..."."""
    return _PARAM.sub(lambda m: _FLAGS[m.group(1)] + " ", message)


def cmd_create(args: argparse.Namespace) -> int:
    from shmfabric.fabric import Fabric, FabricError

    _check_name(args.name)
    mode = _parse_mode(args.mode)
    try:
        fab = Fabric.create(args.name, max_nodes=args.max_nodes, ring_size=args.ring_size,
                            networks=_parse_networks(args.networks), n_mcast=args.mcast,
                            tape_entries=args.tape_entries, tape_entry_size=args.tape_entry_size,
                            mode=mode, group=args.group)
    except FabricError as e:
        raise CliError(_flag_names(str(e))) from None
    info = {"name": fab.name, "path": str(fab.path), "size": fab.region.layout.total_size}
    fab.close()
    if getattr(args, "json", False):
        print(json.dumps(info))
    else:
        print(f"created fabric {info['name']} at {info['path']} ({info['size']:,} bytes)")
    return 0


def cmd_destroy(args: argparse.Namespace) -> int:
    from shmfabric.core.region import region_path
    from shmfabric.fabric import Fabric, FabricError

    try:
        gone = Fabric.destroy(args.name)
    except FabricError as e:  # a path that is not a region: nothing removed
        raise CliError(str(e)) from None
    if not gone:
        raise CliError(f"no fabric named {args.name!r} (no file {region_path(args.name)})")
    if getattr(args, "json", False):
        print(json.dumps({"destroyed": args.name, "path": str(region_path(args.name))}))
    else:
        print(f"destroyed fabric {args.name}")
    return 0


def _render(info: dict):
    from rich.console import Group
    from rich.table import Table

    head = Table.grid(padding=(0, 2))
    head.add_row("fabric", info["name"], "path", info["path"])
    head.add_row("size", f"{info['size']:,} B", "layout version", str(info["version"]))
    head.add_row("max nodes", str(info["max_nodes"]), "ring size", str(info["ring_size"]))
    head.add_row("multicast groups", str(info["multicast_groups"]), "ephemeral", str(info["ephemeral"]))
    nets = Table(title="networks", title_justify="left")
    for c in ("net", "mtu", "slots", "slot size", "free", "held", "orphaned"):
        nets.add_column(c, justify="right")
    for n in info["networks"]:
        nets.add_row(str(n["index"]), str(n["mtu"]), str(n["slots"]), str(n["slot_size"]), str(n["free"]),
                     str(n["held"]), str(n["orphaned"]))
    nodes = Table(title="nodes", title_justify="left")
    for c in ("id", "name", "state", "pid", "net", "tx frames", "tx bytes", "rx frames", "rx bytes",
              "ring full", "drops", "lapped", "bcast rx"):
        nodes.add_column(c, justify="right" if c not in ("name", "state") else "left")
    for n in info["nodes"]:
        state = n["state"] if n["alive"] or n["state"] != "up" else "dead"
        nodes.add_row(str(n["id"]), n["name"], state, str(n["pid"]), str(n["network"]), f"{n['tx_frames']:,}",
                      f"{n['tx_bytes']:,}", f"{n['rx_frames']:,}", f"{n['rx_bytes']:,}", f"{n['tx_ring_full']:,}",
                      f"{n['tx_drops']:,}", f"{n['rx_lapped']:,}", f"{n['tape_rx']:,}")
    rings = Table(title="rings (with traffic)", title_justify="left")
    for c in ("src", "dst", "depth", "enqueued", "dequeued", "full events", "down"):
        rings.add_column(c, justify="right")
    for r in info["rings"]:
        rings.add_row(str(r["src"]), str(r["dst"]), str(r["depth"]), f"{r['enqueued']:,}", f"{r['dequeued']:,}",
                      f"{r['full_events']:,}", "yes" if r["down"] else "")
    return Group(head, nets, nodes, rings)


_NODE_KEYS = ("id", "name", "state", "alive", "pid", "network", "gen", "tx_frames", "tx_bytes", "rx_frames",
              "rx_bytes", "tx_ring_full", "tx_drops", "tx_nobuf", "rx_lapped", "rx_bad", "tape_rx", "tape_tx", "wakeups")


def _stable(info: dict) -> dict:
    """The --json form: fixed keys, nodes and rings sorted."""
    out = {k: v for k, v in info.items() if k not in ("nodes", "rings")}
    out["nodes"] = [{k: n[k] for k in _NODE_KEYS} for n in sorted(info["nodes"], key=lambda n: n["id"])]
    out["rings"] = sorted(info["rings"], key=lambda r: (r["src"], r["dst"]))
    return out


def cmd_inspect(args: argparse.Namespace) -> int:
    from rich.live import Live

    from shmfabric.fabric import Fabric, FabricError

    if not (args.watch == 0 or 0.05 <= args.watch <= 3600):  # nan fails both
        raise CliError(f"--watch {args.watch:g}: give the seconds between refreshes, 0.05 to 3600 (0: no refresh)")
    if args.count < 0 or (args.count and not args.watch):
        raise CliError(f"--count {args.count}: give a number of refreshes (0 or more), with --watch")
    try:
        fab = Fabric.open(args.name)
    except FabricError as e:
        raise CliError(str(e)) from None
    try:
        if getattr(args, "json", False):
            print(json.dumps(_stable(fab.inspect()), indent=2, sort_keys=False))
            return 0
        console = make_console()
        if not args.watch:
            console.print(_render(fab.inspect()))
            return 0
        with Live(_render(fab.inspect()), console=console, refresh_per_second=4) as live:
            end = time.monotonic() + args.count * args.watch if args.count else float("inf")
            while time.monotonic() < end:
                time.sleep(args.watch)
                live.update(_render(fab.inspect()))
        return 0
    finally:
        fab.close()


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("create", help="create a fabric region")
    p.add_argument("name", help="letters, digits, '_', '.', '-' (the region is /dev/shm/shmfabric-NAME)")
    p.add_argument("--max-nodes", type=int, default=32, help="node table size, 2..1024 (default 32)")
    p.add_argument("--ring-size", type=int, default=1024,
                   help="descriptors per ring, a power of two (default 1024)")
    p.add_argument("--networks", default="1500:4096", help="MTU[:SLOTS],... one per network (default 1500:4096)")
    p.add_argument("--mcast", type=int, default=4, help="multicast groups, 0..64 (default 4)")
    p.add_argument("--tape-entries", type=int, default=256,
                   help="entries of each broadcast/multicast tape ring, a power of two (default 256)")
    p.add_argument("--tape-entry-size", type=int, default=2048,
                   help="bytes of one tape entry, the largest broadcast/multicast message, 64..65550 "
                        "(default 2048)")
    p.add_argument("--mode", default="600", help="file mode, octal (default 600)")
    p.add_argument("--group", help="group owning the region file")
    add_json_flag(p)
    p.set_defaults(func=cmd_create)

    p = sub.add_parser("destroy", help="remove a fabric region file")
    p.add_argument("name", help="the fabric's name")
    add_json_flag(p)
    p.set_defaults(func=cmd_destroy)

    p = sub.add_parser("inspect", help="show a fabric's layout, nodes and live ring counters")
    p.add_argument("name", help="the fabric's name, or the path of a region file")
    p.add_argument("--watch", type=float, default=0, metavar="SECONDS", help="refresh every SECONDS")
    p.add_argument("--count", type=int, default=0,
                   help="with --watch: stop after COUNT refreshes (default 0: until Ctrl-C)")
    add_json_flag(p)
    p.set_defaults(func=cmd_inspect)
