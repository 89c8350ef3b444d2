"""`shmfabric splice redis ...`: run the Redis splicer (added to `splice` by `shmfabric.cli.splice`).

    shmfabric splice redis --listen 127.0.0.1:6400 \\
        --server 127.0.0.1:6379 --server 127.0.0.1:6380 --pool 4
    shmfabric splice redis --config splice.yaml          (its `redis:` section)
    shmfabric splice redis --twemproxy nutcracker.yml --twemproxy-pool alpha

`--server` takes twemproxy's form too: ``HOST:PORT[:WEIGHT] [NAME]``; `--twemproxy` reads a
whole nutcracker.yml pool (see `twemproxy_conf`). Flags given with `--config` or `--twemproxy`
override the file's values. `--check` validates and prints the effective
configuration as JSON without starting anything.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

__all__ = ["register_redis", "build_redis_config"]


def _cli_error(msg: str) -> Exception:
    from shmfabric.cli.main import CliError

    return CliError(msg)


def build_redis_config(args: argparse.Namespace) -> Any:
    """Merge --config or --twemproxy and the flags into a validated `RedisSpliceConfig` (CliError on problems)."""
    from pydantic import ValidationError

    from shmfabric.splicer.config import ConfigError, RedisSpliceConfig, format_validation_error, load_config

    data: dict[str, Any] = {}
    source = "command line"
    if args.config and args.twemproxy:
        raise _cli_error("--config and --twemproxy both give a whole configuration; fix: use one of them")
    for flag, value in (("--twemproxy-pool", args.twemproxy_pool), ("--twemproxy-db", args.twemproxy_db)):
        if value is not None and not args.twemproxy:
            raise _cli_error(f"{flag} goes with a --twemproxy file; fix: add --twemproxy FILE")
    if args.twemproxy:
        from shmfabric.splicer.twemproxy_conf import load_twemproxy

        try:
            data, notes = load_twemproxy(args.twemproxy, args.twemproxy_pool, db=args.twemproxy_db)
        except ConfigError as exc:
            raise _cli_error(str(exc)) from None
        for note in notes:
            print(f"splice redis: {note}", file=sys.stderr)
        source = args.twemproxy
    elif args.config:
        try:
            file_cfg = load_config(args.config)
        except ConfigError as exc:
            raise _cli_error(str(exc)) from None
        if file_cfg.redis is None:
            raise _cli_error(f"{args.config}: no `redis:` section; fix: add one (see docs/splicer-redis.md)")
        data = file_cfg.redis.model_dump(exclude_unset=True)
        source = args.config
    for name in ("listen", "workers", "metrics", "hash", "distribution"):
        value = getattr(args, name)
        if value is not None:
            data[name] = value
    if args.hash_tag is not None:
        data["hash_tag"] = args.hash_tag
    if args.server:
        data["servers"] = args.server
    moved = [f for f, v in (("--server", args.server), ("--hash", args.hash), ("--hash-tag", args.hash_tag),
                            ("--distribution", args.distribution)) if v is not None]
    if moved and source != "command line":
        # A value the file gave is replaced: errors are the flags' as much as the file's.
        source = f"{source} with {', '.join(moved)}"
        if args.twemproxy:
            print(f"splice redis: warning: {', '.join(moved)} override(s) the twemproxy file's key placement: "
                  "keys twemproxy stored may be looked up on other servers", file=sys.stderr)
    if "servers" not in data:
        raise _cli_error("no servers: give --server HOST:PORT (repeatable) or --config FILE with `redis.servers`")
    pool = dict(data.get("pool") or {})
    if args.pool is not None:
        pool["max"] = args.pool
        pool.setdefault("min", args.pool)  # Redis lanes are cheap: open them all at start
    if args.pool_min is not None:
        pool["min"] = args.pool_min
    if pool:
        data["pool"] = pool
    if args.timeout is not None:
        data["timeouts"] = {**(data.get("timeouts") or {}), "request": args.timeout}
    if args.drain is not None:
        data["timeouts"] = {**(data.get("timeouts") or {}), "drain": args.drain}
    if args.no_health:
        data["health"] = {**(data.get("health") or {}), "enabled": False}
    try:
        cfg = RedisSpliceConfig.model_validate(data)
    except ValidationError as exc:
        text = format_validation_error(exc, source)
        if source == "command line":
            text = text.replace("field `servers", "--server `servers")
        raise _cli_error(text) from None
    return cfg


def _run(args: argparse.Namespace) -> int:
    cfg = build_redis_config(args)
    if args.check:
        from shmfabric.splicer.config import public_dump

        print(json.dumps(public_dump(cfg), indent=2, sort_keys=True))
        return 0
    from shmfabric.cli.splice import open_listeners, reloader
    from shmfabric.splicer.redis_proxy import run_redis_splicer
    from shmfabric.splicer.workers import serve_under_master

    listeners = open_listeners(cfg)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")

    def announce() -> None:
        host = cfg.listen.rsplit(":", 1)[0]
        print(f"splice redis: listening on {host}:{listeners.port} -> {', '.join(s.address for s in cfg.servers)} "
              f"({cfg.distribution}/{cfg.hash}; pool {cfg.pool.min}..{cfg.pool.max} per server; "
              f"{cfg.workers} worker(s){listeners.describe_metrics()})", flush=True)

    try:
        # Several workers share the port with SO_REUSEPORT; the kernel spreads clients over them.
        return serve_under_master(
            "splice redis", cfg, listeners,
            lambda c, sock, msock, ready: run_redis_splicer(c, sock=sock, metrics_sock=msock, ready=ready),
            reloader(build_redis_config, args), announce)
    finally:
        listeners.close()


def register_redis(verbs: Any) -> None:
    """Add the `redis` verb to the `splice` noun's sub-parsers."""
    p = verbs.add_parser("redis", help="Redis (RESP2/RESP3) splicing proxy",
                         description="Spread pipelined Redis commands over servers by key (twemproxy-compatible "
                                     "ketama), split and merge multi-key commands, answer in request order.")
    p.add_argument("--listen", metavar="HOST:PORT", help="address to listen on (default 127.0.0.1:6400)")
    p.add_argument("--server", action="append", metavar="HOST:PORT[:WEIGHT]",
                   help="a Redis server (twemproxy form 'HOST:PORT:WEIGHT NAME' accepted); repeatable")
    p.add_argument("--pool", type=int, metavar="N", help="pooled connections (lanes) per server (default 8)")
    p.add_argument("--pool-min", type=int, metavar="N", help="connections opened at start per server")
    p.add_argument("--hash", help="key hash, as twemproxy's `hash` (default fnv1a_64)")
    p.add_argument("--distribution", choices=["ketama", "modula"],
                   help="key distribution, as twemproxy's `distribution` (default ketama)")
    p.add_argument("--hash-tag", metavar="XY", help="hash only the part of a key between X and Y, e.g. '{}'")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="per-request timeout, then -ERR (default 30)")
    p.add_argument("--drain", type=float, metavar="SECONDS",
                   help="graceful stop on SIGTERM/SIGINT: time to answer the requests already read before the "
                        "connections still busy are cut (default 30; a second signal cuts at once)")
    p.add_argument("--workers", type=int, metavar="N", help="processes sharing the port via SO_REUSEPORT")
    p.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus metrics at http://HOST:PORT/metrics")
    p.add_argument("--no-health", action="store_true", help="no active health checks")
    p.add_argument("--config", metavar="FILE", help="YAML file with a `redis:` section")
    p.add_argument("--twemproxy", metavar="FILE",
                   help="run a pool of a twemproxy (nutcracker) YAML config, keeping its key placement")
    p.add_argument("--twemproxy-pool", metavar="NAME", help="which pool of the --twemproxy file (if it has several)")
    p.add_argument("--twemproxy-db", metavar="N", type=int,
                   help="the database to use instead of the pool's redis_db (a pool with redis_auth and redis_db "
                        "needs it: nutcracker's keys are in db 0 when the servers require the password)")
    p.add_argument("--check", action="store_true", help="validate, print the effective config as JSON, exit")
    p.set_defaults(func=_run)


if __name__ == "__main__":  # pragma: no cover - convenience for `python -m`
    from shmfabric.cli.main import main

    sys.exit(main(["splice", "redis", *sys.argv[1:]]))
