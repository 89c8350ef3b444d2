"""`shmfabric adapter FABRIC NODE --address CIDR`: the fabric as a network interface.

Attaches node NODE to fabric FABRIC and gives it a TAP device (in a network namespace with
--netns) carrying the node's fabric MAC and the given addresses. Unmodified programs on that
interface reach the programs on other adapters of the fabric: ARP and neighbour discovery run
over the broadcast tape, unicast frames go straight into the destination node's ring. Runs until
SIGTERM or Ctrl-C; the device disappears with the process, even on SIGKILL.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from typing import TYPE_CHECKING

from shmfabric.cli.main import CliError, CliRetry, add_json_flag

if TYPE_CHECKING:
    import ipaddress

SEGMENTS_MIN_MTU = 16384  # the smallest network MTU on which an adapter takes uncut TCP segments


def check_batch(args: argparse.Namespace) -> None:
    """--batch in range, else CliError."""
    if not 1 <= args.batch <= 65536:
        raise CliError(f"--batch {args.batch} is out of range: give 1..65536 frames (default 256)")


def open_fabric(name: str, wait: float = 0.0):
    """The fabric `name`, opened (waiting up to `wait` seconds for it to be created: a unit
    started before its fabric), or CliError saying how to get it."""
    from shmfabric.fabric import Fabric, FabricError, RegionNotFoundError

    if not 0 <= wait <= 86400:  # (also NaN)
        raise CliError(f"--open-timeout {wait:g} is out of range: give 0..86400 seconds")
    deadline = time.monotonic() + wait
    try:
        while True:
            try:
                return Fabric.open(name)
            except RegionNotFoundError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)
    except RegionNotFoundError as exc:
        waited = f" (waited {wait:g} s for it)" if wait > 0 else ""
        raise CliError(f"{exc}, or run a topology on it with `shmfabric up`{waited}") from None
    except FabricError as exc:
        hint = (" (run as root, or as a user the fabric's --mode/--group lets in)"
                if "ermission denied" in str(exc) else "")
        raise CliError(f"{exc}{hint}") from None


def stop_on_signals(parent_pid: int | None = None) -> list[bool]:
    """A flag SIGTERM and SIGINT set (`flag[0]`): the port stops at its next look. With
    `parent_pid` (a service manager's), the kernel sends SIGTERM when that process dies."""
    flag = [False]

    def on_signal(signum, frame):
        flag[0] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if parent_pid is not None:
        from shmfabric.core.parent import die_with_parent

        die_with_parent(parent_pid)
    return flag


def check_network(fab, args: argparse.Namespace) -> None:
    """--network names one of the fabric's networks, else CliError."""
    if not 0 <= args.network < len(fab.networks):
        raise CliError(f"fabric {args.fabric!r} has networks 0..{len(fab.networks) - 1}, not {args.network}")


def attach_port_node(fab, args: argparse.Namespace):
    """Node `args.node` attached to network `args.network` (checked), waiting by blocking (a port
    sleeps while idle), or CliError saying why it cannot be (CliRetry if the name is held by a live
    node or the table is full: that clears when the other node goes)."""
    from shmfabric.fabric import AttachBusyError, FabricError

    check_network(fab, args)
    try:
        node = fab.attach(args.node, network=args.network)
    except AttachBusyError as exc:
        raise CliRetry(str(exc)) from None
    except FabricError as exc:
        raise CliError(str(exc)) from None
    node.set_wait_mode("block")
    return node


def report_counters(args: argparse.Namespace, counters: dict, log, **fields) -> None:
    """A port's counters when it ends: with --json one JSON object on stdout (`node`, `fields`,
    `counters`), else one line through `log` (stderr)."""
    if args.json:
        print(json.dumps({"node": args.node, **fields, "counters": counters}), flush=True)
    else:
        log(", ".join(f"{k} {v}" for k, v in counters.items()) or "no frames")


def port_options(fab, args: argparse.Namespace) -> dict:
    """A port's `in_flight` (its fair share of the network's pool per destination, as nodes come
    and go) and `via` (the chain's first node, looked up by name when needed)."""
    from shmfabric.adapters.bridge import fair_share

    lay = fab.region.layout
    via = None
    if args.via:
        # (not required to be attached yet: a chain's router waits for its ports, the adapters)
        via = lambda: fab.node_ref(args.via)  # noqa: E731  (id, incarnation)
    return {"in_flight": lambda: fair_share(lay.networks[args.network].slots, len(fab.nodes()), lay.ring_size),
            "via": via}


def add_open_timeout(p: argparse.ArgumentParser) -> None:
    """--open-timeout S: how long open_fabric waits for the fabric to be created."""
    p.add_argument("--open-timeout", type=float, default=0.0, metavar="S",
                   help="wait this long for the fabric to be created, as a unit started before it would "
                        "(default 0: a missing fabric is an error at once)")


def add_port_arguments(p: argparse.ArgumentParser) -> None:
    """The options every fabric port takes: --via, --network, --batch, --seconds, --open-timeout,
    --parent-pid, --json."""
    p.add_argument("--via", metavar="NODE",
                   help="send unicast frames to this node (a chain's first function) instead of to the "
                        "destination adapter; the chain ends in a `router` that delivers them")
    p.add_argument("--network", type=int, default=0, help="the fabric network (MTU) to attach to (default 0)")
    p.add_argument("--batch", type=int, default=256, help="frames moved per pass each way (default 256)")
    p.add_argument("--seconds", type=float, help="stop after this long (default: until SIGTERM or Ctrl-C)")
    add_open_timeout(p)
    p.add_argument("--parent-pid", type=int, default=None, metavar="PID",
                   help="stop (as on SIGTERM) when this process dies, even by SIGKILL (a service manager's)")
    add_json_flag(p)


def check_member_addresses(shared: list[ipaddress.IPv4Address | ipaddress.IPv6Address],
                           addresses: list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]) -> None:
    """A member of a global address (`--global`) has an address of its own on the interface
    (an IPv4 one for an IPv4 global address), else CliError: with none, the kernel may take the
    global address (on lo) as the source of the member's ARP requests (arp_announce=2 falls back
    to any address), and clients' caches would move the global address to this member."""
    if not shared:
        return
    example = "10.77.0.2/24" if shared[0].version == 4 else "fd00::2/64"
    if not addresses:
        raise CliError(f"--global {shared[0]} needs an address of this member's own on the interface: add "
                       f"--address CIDR (e.g. --address {example}); without one the kernel could announce the "
                       "global address from this member and clients would send to it instead of the dispatcher")
    for g in shared:  # (the same rule as a topology's `global:`: an address of each family it shares)
        if not any(a.version == g.version for a in addresses):
            ex = "10.77.0.2/24" if g.version == 4 else "fd00::2/64"
            raise CliError(f"--global {g} needs an IPv{g.version} address of this member's own on the interface: "
                           f"add --address CIDR (e.g. --address {ex}); without one the kernel could announce the "
                           "global address from this member and clients would send to it instead of the dispatcher")


def cmd_adapter(args: argparse.Namespace) -> int:
    from shmfabric.adapters.bridge import DeviceGone, TapBridge
    from shmfabric.adapters.ethernet import fabric_mac_node, format_mac
    from shmfabric.adapters.source_guard import SourceGuard, allowed_prefix
    from shmfabric.adapters.tap import (TapBusyError, TapError, check_ifname, configure, enter_netns,
                                        hold_global_address, open_tap, parse_address, parse_global,
                                        release_global_address)

    try:
        check_ifname(args.ifname)
        addresses = [parse_address(a) for a in args.address]
        shared = [parse_global(a) for a in args.global_address]
    except TapError as exc:
        raise CliError(str(exc)) from None
    try:
        allowed = [allowed_prefix(a) for a in args.allow_source]
    except ValueError as exc:
        raise CliError(f"--allow-source: {exc}") from None
    source_check = args.source_check or bool(allowed) or args.dhcp_server
    check_member_addresses(shared, addresses)
    check_batch(args)
    fab = open_fabric(args.fabric, args.open_timeout)
    stop = stop_on_signals(args.parent_pid)
    tap = node = None
    held = []  # the global addresses this adapter put on lo: taken off again when it stops
    try:
        check_network(fab, args)
        # Uncut TCP segments only where a slot holds several full frames: on a 1,500-byte network
        # a segment bound as small as one frame makes TCP send less than an MSS at a time.
        segments = fab.networks[args.network].mtu >= SEGMENTS_MIN_MTU
        try:
            if args.netns:
                enter_netns(args.netns)
            tap = open_tap(args.ifname, segments=segments)
        except TapBusyError as exc:
            raise CliRetry(str(exc)) from None
        except TapError as exc:
            raise CliError(str(exc)) from None
        node = attach_port_node(fab, args)
        lay = fab.region.layout
        guard = (SourceGuard(node.mac, [a.ip for a in addresses], allowed, shared, dhcp_server=args.dhcp_server)
                 if source_check else None)
        bridge = TapBridge(node, tap, batch=args.batch, guard=guard, **port_options(fab, args))
        for a in addresses:
            if a.version == 4:
                # before the kernel has it (and announces it): a duplicate would move its peers' caches
                owner = bridge.address_in_use(a.ip.packed)
                if owner is not None:
                    raise CliRetry(f"address {a.ip} is in use on fabric {args.fabric!r} by {format_mac(owner)} "
                                   f"(node id {fabric_mac_node(owner)}); give this adapter another one")
        try:
            # Segments the kernel hands the device uncut must fit a slot: at most the network's MTU.
            mtu = configure(tap.ifname, node.mac, args.mtu, addresses, min(node.mtu, 65536) if segments else None,
                            node.mtu, checked=source_check)
            for g in shared:
                if hold_global_address(tap.ifname, g):
                    held.append(g)
        except TapError as exc:
            raise CliError(str(exc)) from None
        where = f" in netns {args.netns}" if args.netns else ""
        offload = (f"checksum and segmentation offloads (segments up to {min(node.mtu, 65536)} B)" if segments
                   else "checksum offload")
        via_text = f", via {args.via}" if args.via else ""
        via_text += "".join(f", member of global address {g}" for g in shared)
        if source_check:
            via_text += ", sources checked" + "".join(f" (and {n})" for n in allowed)
            via_text += " (DHCP server replies allowed)" if args.dhcp_server else ""
        print(f"adapter {args.node}: {tap.ifname}{where}, node id {node.id}, mac {format_mac(node.mac)}, "
              f"mtu {mtu}, {offload}, {' '.join(map(str, addresses)) or 'no address'}{via_text}", flush=True)
        tape = lay.tape_entry_size - 14
        if mtu > tape:
            print(f"adapter {args.node}: note: broadcast and multicast frames larger than the fabric's tape "
                  f"entries ({tape} B of payload) are dropped (drop_too_big_to_flood); unicast frames up to the "
                  f"MTU {mtu} are not", file=sys.stderr, flush=True)
        deadline = None if args.seconds is None else time.monotonic() + args.seconds
        try:
            bridge.run(lambda: stop[0] or (deadline is not None and time.monotonic() >= deadline))
        except DeviceGone as exc:
            raise CliRetry(f"{exc}; adapter {args.node} left the fabric") from None
        report_counters(args, bridge.counters, lambda text: print(f"adapter {args.node}: {text}", file=sys.stderr,
                                                                   flush=True), ifname=tap.ifname)
        return 0
    finally:
        # Off the fabric first (the dispatcher stops sending here), then the address off lo (still
        # inside the namespace: lo there is the one it went on).
        if node is not None:
            node.detach()
        for g in held:
            release_global_address(g)
        if tap is not None:
            tap.close()
        fab.close()


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("adapter", help="a TAP network interface on the fabric for unmodified programs (root)",
                       description=__doc__.splitlines()[0])
    p.add_argument("fabric", help="the fabric's name")
    p.add_argument("node", help="the adapter's node name on the fabric")
    p.add_argument("--address", action="append", default=[], metavar="CIDR",
                   help="an address for the interface, e.g. 10.77.0.1/24 (repeatable)")
    p.add_argument("--netns", help="the network namespace to put the interface in (`ip netns add NAME`)")
    p.add_argument("--ifname", default="sf0", help="the interface's name (default sf0)")
    p.add_argument("--mtu", type=int, help="the interface's MTU (default: the fabric network's, or the device's largest)")
    p.add_argument("--global", dest="global_address", action="append", default=[], metavar="IP",
                   help="be a member of this global address (`shmfabric global`; needs an --address of its own): "
                        "it goes on the namespace's lo while the adapter runs, and this interface never answers "
                        "ARP for it (repeatable)")
    p.add_argument("--source-check", action="store_true",
                   help="drop the frames from the interface that name another sender: a source MAC not the "
                        "node's, a source IP not one of its --address/--global addresses (or its IPv6 "
                        "link-local one), ARP or neighbour discovery claiming an address not its own, "
                        "router advertisements and redirects, DHCP server messages, offload requests outside "
                        "the L4 checksum, other EtherTypes (counted as drop_*; see docs/adapters.md)")
    p.add_argument("--allow-source", action="append", default=[], metavar="CIDR",
                   help="also allow sources in this prefix, e.g. a network routed behind the namespace "
                        "(repeatable; implies --source-check)")
    p.add_argument("--dhcp-server", action="store_true",
                   help="the namespace runs a DHCP or DHCPv6 server: its replies to clients pass the source "
                        "check (implies --source-check)")
    add_port_arguments(p)
    p.set_defaults(func=cmd_adapter)
