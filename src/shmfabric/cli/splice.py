"""`shmfabric splice http|redis ...`: run a splicing load balancer.

    shmfabric splice http --listen 127.0.0.1:8080 \\
        --route /api=127.0.0.1:9001,127.0.0.1:9002 --default 127.0.0.1:9003 --pool 8
    shmfabric splice http --config splice.yaml
    shmfabric splice redis ...          (added by shmfabric.splicer.redis_cli, when present)

`--route` takes `[HOST]/PREFIX=ADDR[,ADDR...]` or `[HOST]~REGEX=ADDR[,ADDR...]`; routes are
tried in the order given, `--default` takes what no route matches. `--check` validates and
prints the effective configuration as JSON without starting anything.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Any

__all__ = ["register", "parse_route"]


def _cli_error(msg: str) -> Exception:
    from shmfabric.cli.main import CliError

    return CliError(msg)


def parse_route(text: str) -> dict[str, Any]:
    """`[HOST]/PREFIX=ADDRS` or `[HOST]~REGEX=ADDRS` -> a route mapping for HttpRoute."""
    from shmfabric.splicer.config import split_address  # the CLI imports the splicer only when used

    # The key may hold "=" (in a regex) and so may the backends ("weight=3"): the split is at the
    # last "=" followed by an address.
    key, sep, addrs = text.rpartition("=")
    for at in reversed([i for i, c in enumerate(text) if c == "="]):
        first = text[at + 1:].split(",", 1)[0].split()
        try:
            split_address(first[0] if first else "")
        except ValueError:
            continue
        key, sep, addrs = text[:at], "=", text[at + 1:]
        break
    if not sep or not key or not addrs:
        raise _cli_error(f"--route {text!r}: expected [HOST]/PREFIX=ADDR[,ADDR...], e.g. /api=127.0.0.1:9001")
    route: dict[str, Any] = {"backends": [a.strip() for a in addrs.split(",") if a.strip()]}
    tilde, slash = key.find("~"), key.find("/")
    if tilde >= 0 and (slash < 0 or tilde < slash):
        host, route["regex"] = key[:tilde], key[tilde + 1:]
    elif slash >= 0:
        host, route["prefix"] = key[:slash], key[slash:]
    else:
        host = key  # host only
        if "." not in host and ":" not in host and host != "localhost" and not host.startswith("*"):
            # `api=ADDR` is most likely `/api=ADDR` with the slash forgotten: still a valid Host
            # route (a single-label name), so it runs, but it is said.
            print(f"splice http: warning: --route {text!r} routes the requests whose Host is {host!r}, "
                  f"whatever their path; for the path prefix /{host} write --route /{host}={addrs}",
                  file=sys.stderr)
    if host:
        route["host"] = host
    return route


def _build_config(args: argparse.Namespace) -> Any:
    from pydantic import ValidationError

    from shmfabric.splicer.config import ConfigError, HttpSpliceConfig, format_validation_error, load_config

    overrides: dict[str, Any] = {}
    for name in ("listen", "workers", "metrics"):
        value = getattr(args, name)
        if value is not None:
            overrides[name] = value
    if args.config:
        if args.route or args.default:
            raise _cli_error("give routes either in --config or as --route/--default, not both")
        try:
            file_cfg = load_config(args.config)
        except ConfigError as exc:
            raise _cli_error(str(exc)) from None
        if file_cfg.http is None:
            raise _cli_error(f"{args.config}: no `http:` section; fix: add one (see docs/splicer-http.md)")
        data = file_cfg.http.model_dump()
        data.update(overrides)
        source = args.config
    else:
        data = {"routes": [parse_route(r) for r in args.route or []], **overrides}
        if args.default:
            data["default"] = [a.strip() for a in args.default.split(",") if a.strip()]
        source = "command line"
    if args.pool is not None:
        data.setdefault("pool", {})
        data["pool"] = {**(data["pool"] if isinstance(data["pool"], dict) else {}), "max": args.pool}
        data["pool"].setdefault("min", min(args.pool, 1 if args.pool_min is None else args.pool_min))
    if args.pool_min is not None:
        data.setdefault("pool", {})
        data["pool"]["min"] = args.pool_min
    if args.pipeline is not None:
        data["pool"] = {**data.get("pool", {}), "pipeline": args.pipeline}
    if args.timeout is not None:
        data["timeouts"] = {**data.get("timeouts", {}), "request": args.timeout}
    if args.drain is not None:
        data["timeouts"] = {**data.get("timeouts", {}), "drain": args.drain}
    if args.no_health:
        data["health"] = {**data.get("health", {}), "enabled": False}
    for name in ("forwarded_for", "forwarded"):
        if getattr(args, name):
            data[name] = True
    if args.access_log is not None:
        data["access_log"] = args.access_log
    if args.access_log_format is not None:
        data["access_log_format"] = args.access_log_format
    if args.tls_cert is not None or args.tls_key is not None:
        if args.tls_cert is None:
            raise _cli_error("--tls-key needs --tls-cert (the certificate file)")
        data["tls"] = {**(data.get("tls") or {}), "cert": args.tls_cert, "key": args.tls_key}
    try:
        cfg = HttpSpliceConfig.model_validate(data)
    except ValidationError as exc:
        text = format_validation_error(exc, source)
        if source == "command line":
            text = text.replace("field `routes", "--route `routes").replace("field `default", "--default `default")
        raise _cli_error(text) from None
    if cfg.tls is not None:
        # Loaded here, so a bad certificate or key is refused at start (and by a reload, which keeps
        # the running configuration) with the reason, not by each worker as it starts.
        from datetime import datetime, timezone

        from shmfabric.splicer.tls import TlsError, certificate_expiry, server_context

        try:
            server_context(cfg.tls)
        except TlsError as exc:
            raise _cli_error(f"{source}: {exc}") from None
        expires = certificate_expiry(cfg.tls.cert)
        if expires is not None and expires <= datetime.now(timezone.utc):
            # Served all the same (as HAProxy and nginx do): refusing to start would turn an
            # expired certificate into an outage; clients that check dates refuse it themselves.
            print(f"splice http: warning: the certificate in {cfg.tls.cert} expired on {expires:%Y-%m-%d %H:%M} UTC; "
                  "clients will refuse it: renew it and reload (kill -HUP)", file=sys.stderr)
    if cfg.access_log is not None:
        # Opened here too, so a path that cannot be written is refused at start (and by a reload,
        # which then keeps the running configuration) rather than by every worker as it starts.
        from shmfabric.splicer.access_log import AccessLogError, check_log

        try:
            check_log(cfg.access_log)
        except AccessLogError as exc:
            raise _cli_error(f"{source}: {exc}") from None
    return cfg


def open_listeners(cfg: Any) -> Any:
    """The master's listening sockets for `cfg` (listen, workers, metrics), or a one-line CliError."""
    from shmfabric.splicer.workers import ListenError, Listeners

    try:
        return Listeners(cfg.listen, cfg.workers, cfg.metrics)
    except ListenError as exc:
        raise _cli_error(str(exc)) from None


def reloader(build: Any, args: argparse.Namespace) -> Any:
    """What SIGHUP calls in the master: the configuration built again from the same command line
    and files; a CliError (bad file, bad value) becomes ReloadRefused with its message."""
    from shmfabric.cli.main import CliError
    from shmfabric.splicer.workers import ReloadRefused

    def reload() -> Any:
        try:
            return build(args)
        except CliError as exc:
            raise ReloadRefused(str(exc)) from None
    return reload


def _run_http(args: argparse.Namespace) -> int:
    cfg = _build_config(args)
    if args.check:
        from shmfabric.splicer.config import public_dump

        print(json.dumps(public_dump(cfg), indent=2, sort_keys=True))
        return 0
    from shmfabric.splicer.http_server import run

    listeners = open_listeners(cfg)

    def announce() -> None:
        routes = len(cfg.routes)
        print(f"splice http: listening on {cfg.listen.rsplit(':', 1)[0]}:{listeners.port} "
              f"({routes} route{'s' if routes != 1 else ''}{', default' if cfg.default else ''}; "
              f"pool {cfg.pool.min}..{cfg.pool.max} per server; {cfg.workers} worker(s)"
              f"{listeners.describe_metrics()})", flush=True,
              file=sys.stderr if cfg.access_log == "-" else sys.stdout)  # stdout is then the log's alone

    try:
        return run(cfg, listeners, reloader(_build_config, args), announce)
    finally:
        listeners.close()


def _add_http(verbs: Any) -> None:
    p = verbs.add_parser("http", help="HTTP/1.1 splicing load balancer",
                         description="Read pipelined HTTP/1.1 requests ahead, send them to backends at once, "
                                     "answer in request order.")
    p.add_argument("--listen", metavar="HOST:PORT", help="address to listen on (default 127.0.0.1:8080)")
    p.add_argument("--route", action="append", metavar="[HOST]/PREFIX=ADDRS",
                   help="route a path prefix (or [HOST]~REGEX, or a Host alone: HOST=ADDRS) to comma-separated "
                        "backends, each 'HOST:PORT [weight=N] [backup]' (quote the spaces); first matching route "
                        "wins; repeatable")
    p.add_argument("--default", metavar="ADDRS", help="backends for requests no route matches (as in --route)")
    p.add_argument("--pool", type=int, metavar="N", help="max pooled connections per backend server (default 8)")
    p.add_argument("--pool-min", type=int, metavar="N", help="connections opened at start per server (default 1)")
    p.add_argument("--pipeline", type=int, metavar="N",
                   help="requests outstanding per pooled connection (default 1); above 1, idempotent "
                        "requests are pipelined to backends - for uniformly fast backends such as nginx")
    p.add_argument("--workers", type=int, metavar="N", help="processes sharing the port via SO_REUSEPORT")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="per-request timeout, then 504 (default 30)")
    p.add_argument("--drain", type=float, metavar="SECONDS",
                   help="graceful stop on SIGTERM/SIGINT: time to answer the requests already read before the "
                        "connections still busy are cut (default 30; a second signal cuts at once)")
    p.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus metrics at http://HOST:PORT/metrics")
    p.add_argument("--no-health", action="store_true", help="no active health checks")
    p.add_argument("--forwarded-for", action="store_true",
                   help="add X-Forwarded-For: <client address> to each request (after any the client sent)")
    p.add_argument("--forwarded", action="store_true", help="add RFC 7239 Forwarded: for=<client address>")
    p.add_argument("--access-log", metavar="PATH", help="append a line per answered request to PATH ('-': stdout)")
    p.add_argument("--access-log-format", choices=("text", "json"), help="access log lines (default text)")
    p.add_argument("--tls-cert", metavar="PEM", help="terminate TLS (HTTPS) with this certificate (chain) file")
    p.add_argument("--tls-key", metavar="PEM", help="the certificate's private key (default: in --tls-cert)")
    p.add_argument("--config", metavar="FILE", help="YAML file with an `http:` section")
    p.add_argument("--check", action="store_true", help="validate, print the effective config as JSON, exit")
    p.set_defaults(func=_run_http)


def register(subparsers: Any) -> None:
    """Add `splice` with its `http` verb, and `redis` when shmfabric.splicer.redis_cli exists."""
    splice = subparsers.add_parser("splice", help="splicing load balancer (HTTP/1.1, Redis)",
                                   description=__doc__.splitlines()[0])
    verbs = splice.add_subparsers(dest="splice_verb", metavar="PROTOCOL")
    _add_http(verbs)
    # Hook for the Redis splicer: it owns shmfabric.splicer.redis_cli and its `register_redis(verbs)`
    # adds the `redis` verb to this same parser.
    try:
        redis_cli = importlib.import_module("shmfabric.splicer.redis_cli")
    except ModuleNotFoundError as exc:
        if exc.name != "shmfabric.splicer.redis_cli":
            raise
    else:
        redis_cli.register_redis(verbs)

    def _usage(_args: argparse.Namespace) -> int:
        splice.print_help(sys.stderr)
        return 2

    splice.set_defaults(func=_usage)
