"""`shmfabric global FABRIC NODE --address VIP --member NODE=NETNS ...`: one IP for several nodes.

Attaches node NODE to fabric FABRIC as the dispatcher of global address VIP: it answers ARP (or
IPv6 neighbour discovery) for VIP on the fabric, so clients send it every packet for VIP, and
forwards each one, without copying, to the member holding or waiting for its connection (a
connection table fed by walks of the members' sockets; new connections round robin among the
members listening on their port, weighted by `--weight NODE=N`). Members are TAP adapters started
with `--global VIP`; they answer the clients straight. Runs until SIGTERM or Ctrl-C.
"""
from __future__ import annotations

import argparse
import sys
import time

from shmfabric.cli.adapter import (add_open_timeout, attach_port_node, check_batch, open_fabric, report_counters,
                                   stop_on_signals)
from shmfabric.cli.main import CliError, add_json_flag


def cmd_global(args: argparse.Namespace) -> int:
    from shmfabric.adapters.ethernet import format_mac
    from shmfabric.adapters.global_net import GlobalDispatcher, GlobalError, check_weights, parse_member, \
        parse_weight

    check_batch(args)
    if not args.walk_every > 0 or not args.confirm_timeout > 0:
        raise CliError("--walk-every and --confirm-timeout must be positive numbers of seconds")
    try:
        members = [parse_member(m) for m in args.member]
        weights: dict[str, int] = {}
        for text in args.weight:
            name, weight = parse_weight(text)
            if name in weights:
                raise GlobalError(f"member {name!r} is given a weight twice; give one --weight {name}=N")
            weights[name] = weight
        # (checked here too, before the fabric is opened: a refusal leaves nothing behind)
        check_weights(weights, [n for n, _ in members])
    except GlobalError as exc:
        raise CliError(str(exc)) from None
    fab = open_fabric(args.fabric, args.open_timeout)
    stop = stop_on_signals(args.parent_pid)
    node = None
    try:
        node = attach_port_node(fab, args)

        def log(text: str) -> None:
            print(f"global {args.node}: {text}", file=sys.stderr, flush=True)

        try:
            port = GlobalDispatcher(fab, node, args.address, members, walk_every=args.walk_every,
                                    confirm_timeout=args.confirm_timeout, batch=args.batch, log=log,
                                    weights=weights)
        except GlobalError as exc:
            raise CliError(str(exc)) from None
        deadline = None if args.seconds is None else time.monotonic() + args.seconds

        def stopping() -> bool:
            return stop[0] or (deadline is not None and time.monotonic() >= deadline)

        port.start()
        where = ", ".join(f"{m.name} (" + (f"netns {m.netns}, " if m.netns else "") + f"weight {m.weight})"
                          for m in port.members)
        print(f"global {args.node}: address {port.ip}, node id {node.id}, mac {format_mac(node.mac)}, "
              f"members {where}", flush=True)
        try:
            port.run(stopping, started=True)
        except Exception as exc:  # (a bug of ours: one line for the user, the type for the report)
            raise CliError(f"global {args.node} stopped on {type(exc).__name__}: {exc}") from None
        report_counters(args, port.counters, log, address=str(port.ip))
        return 0
    finally:
        if node is not None:
            node.detach()
        fab.close()


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("global", help="one IP address shared by several adapters (root)",
                       description=__doc__.splitlines()[0])
    p.add_argument("fabric", help="the fabric's name")
    p.add_argument("node", help="the dispatcher's node name on the fabric")
    p.add_argument("--address", required=True, metavar="IP", help="the global address, e.g. 10.77.0.100 or fd00::100")
    p.add_argument("--member", action="append", default=[], metavar="NODE=NETNS",
                   help="a member: its adapter's node name and the network namespace it is in (repeatable)")
    p.add_argument("--weight", action="append", default=[], metavar="NODE=N",
                   help="a member's weight, an integer from 1 to 256 (default 1): its share of new connections "
                        "and flows against the others' (repeatable)")
    p.add_argument("--walk-every", type=float, default=1.0, metavar="S",
                   help="seconds between walks of the members' sockets (default 1)")
    p.add_argument("--confirm-timeout", type=float, default=5.0, metavar="S",
                   help="a new TCP connection no walk shows its member holding within this long is forgotten "
                        "(refused by the member, or a SYN flood); at least two walks (default 5)")
    p.add_argument("--network", type=int, default=0, help="the fabric network (MTU) to attach to (default 0)")
    p.add_argument("--batch", type=int, default=256, help="frames handled per pass (default 256)")
    p.add_argument("--seconds", type=float, help="stop after this long (default: until SIGTERM or Ctrl-C)")
    add_open_timeout(p)
    p.add_argument("--parent-pid", type=int, default=None, metavar="PID",
                   help="stop (as on SIGTERM) when this process dies, even by SIGKILL (a service manager's)")
    add_json_flag(p)
    p.set_defaults(func=cmd_global)
