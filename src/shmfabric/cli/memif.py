"""`shmfabric memif FABRIC NODE --socket PATH`: a DPDK or VPP memif interface as a fabric node.

Attaches node NODE to fabric FABRIC and serves memif on a unix socket (--role server, the
default: the peer is `role=client`) or connects to a memif server (--role client). Frames the
peer sends go to the node their destination MAC names (or through --via's chain); frames sent to
the node go to the peer. Give the peer's interface the node's MAC (printed at start; DPDK
`mac=`, VPP `hw-addr`) so replies reach it. Runs until SIGTERM or Ctrl-C; a peer that goes away
takes the link down until one connects again.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from shmfabric.cli.adapter import add_port_arguments, attach_port_node, check_batch, open_fabric, port_options, \
    report_counters, stop_on_signals
from shmfabric.cli.main import CliError, CliRetry


def cmd_memif(args: argparse.Namespace) -> int:
    from shmfabric.adapters.ethernet import format_mac
    from shmfabric.adapters.memif import MemifBridge, MemifBusyError, MemifConfig, MemifError
    from shmfabric.adapters.memif_wire import MemifProtocolError

    check_batch(args)
    ring = args.ring_size
    if ring < 2 or ring & (ring - 1):
        raise CliError(f"--ring-size {ring} is not a power of two in 2..16384")
    secret = (args.secret or "").encode()
    if args.secret_file:
        if args.secret:
            raise CliError("give --secret or --secret-file, not both")
        try:
            with open(args.secret_file, "rb") as f:
                secret = f.read(64)  # (a secret is at most 23 bytes: a device file is not read on)
        except OSError as exc:
            raise CliError(f"cannot read --secret-file {args.secret_file}: {exc.strerror}") from None
        if secret.endswith(b"\n"):  # (one line ending, as an editor leaves it)
            secret = secret[:-2] if secret.endswith(b"\r\n") else secret[:-1]
        if not secret:  # (an empty secret would mean none: any peer taken)
            raise CliError(f"--secret-file {args.secret_file} is empty; write the secret in it, or give no secret")
        fd = args.secret_file.removeprefix("/proc/self/fd/")
        if fd.isdigit() and int(fd) > 2:  # an inherited descriptor (a service manager's): not kept open
            try:
                os.close(int(fd))
            except OSError:
                pass
    try:
        config = MemifConfig(args.socket, role=args.role, id=args.id, secret=secret,
                             log2_ring_size=ring.bit_length() - 1, buffer_size=args.buffer_size,
                             abstract=args.abstract).check()
    except MemifError as exc:
        raise CliError(str(exc)) from None
    fab = open_fabric(args.fabric, args.open_timeout)
    stop = stop_on_signals(args.parent_pid)
    node = None
    try:
        node = attach_port_node(fab, args)

        def log(text: str) -> None:
            print(f"memif {args.node}: {text}", file=sys.stderr, flush=True)

        port = MemifBridge(node, config, batch=args.batch, log=log, **port_options(fab, args))
        if config.role == "server":
            try:
                port.listen()
            except MemifBusyError as exc:
                raise CliRetry(str(exc)) from None
            except MemifError as exc:
                raise CliError(str(exc)) from None
        where = ("listening on" if config.role == "server" else "connecting to") + \
            (f" abstract socket @{args.socket}" if args.abstract else f" {args.socket}")
        via_text = f", via {args.via}" if args.via else ""
        print(f"memif {args.node}: {config.role}, {where}, interface id {config.id}, node id {node.id}, "
              f"mac {format_mac(node.mac)} (give it to the peer's interface), mtu {node.mtu}{via_text}", flush=True)
        deadline = None if args.seconds is None else time.monotonic() + args.seconds
        try:
            port.run(lambda: stop[0] or (deadline is not None and time.monotonic() >= deadline))
        except (MemifError, MemifProtocolError) as exc:
            raise CliError(f"{exc}; memif {args.node} left the fabric") from None
        except Exception as exc:  # (a bug of ours: one line for the user, the type for the report)
            raise CliError(f"memif {args.node} stopped on {type(exc).__name__}: {exc}") from None
        report_counters(args, port.counters, log, socket=args.socket, role=config.role)
        return 0
    finally:
        if node is not None:
            node.detach()
        fab.close()


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("memif", help="a memif interface (DPDK, VPP) on the fabric",
                       description=__doc__.splitlines()[0])
    p.add_argument("fabric", help="the fabric's name")
    p.add_argument("node", help="the port's node name on the fabric")
    p.add_argument("--socket", required=True, metavar="PATH", help="the memif control socket's path")
    p.add_argument("--abstract", action="store_true",
                   help="the socket is in the abstract namespace (DPDK's default, socket-abstract=yes)")
    p.add_argument("--role", choices=("server", "client"), default="server",
                   help="server: listen, the peer is role=client (default); client: connect to a memif server")
    p.add_argument("--id", type=int, default=0, help="the memif interface id (default 0)")
    p.add_argument("--secret", help="a shared secret the peer must give (at most 23 bytes; visible to `ps`: "
                                    "prefer --secret-file)")
    p.add_argument("--secret-file", metavar="PATH", help="read the secret from this file (a trailing newline is dropped)")
    p.add_argument("--ring-size", type=int, default=1024,
                   help="client: descriptors per ring, a power of two (default 1024; the server's limit applies)")
    p.add_argument("--buffer-size", type=int, default=2048,
                   help="client: bytes per buffer; longer frames take several (default 2048)")
    add_port_arguments(p)
    p.set_defaults(func=cmd_memif)
