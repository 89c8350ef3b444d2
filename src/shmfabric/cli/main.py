"""The `shmfabric` command line: `shmfabric NOUN VERB ...`.

Each verb lives in its own module under `shmfabric.cli` named in `COMMANDS` and exposes
`register(subparsers)`, which adds its parser and sets `func` (called with the parsed args and
returning an exit code). User errors are raised as `CliError` and printed without a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from shmfabric.core.errors import EXIT_RETRY

# Modules that add sub-commands, in the order they appear in --help.
COMMANDS = [
    "shmfabric.cli.fabric_cmds",
    "shmfabric.cli.demo",
    "shmfabric.cli.bench",
    "shmfabric.cli.splice",
    "shmfabric.cli.manager_cmds",
    "shmfabric.cli.capture",
    "shmfabric.cli.adapter",
    "shmfabric.cli.memif",
    "shmfabric.cli.global_cmd",
]


class CliError(Exception):
    """An error the user can fix; printed as one line, exit status 2."""


class CliRetry(CliError):
    """An error that may clear by itself (a node name, TAP device or address held by another
    process); printed as one line, exit status EXIT_RETRY (75), which a service manager restarts."""


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    """Let `--json` also follow the verb (`shmfabric inspect X --json`), without overriding a leading one."""
    parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="machine-readable output (stable field names)")


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line (what is wrong, and where the help is) instead of
    the usage block first; nested sub-command parsers are of this class too."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="shmfabric", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="machine-readable output where a command supports it")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # a command module not written yet
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except CliError as exc:
        print(f"shmfabric: error: {exc}", file=sys.stderr)
        return EXIT_RETRY if isinstance(exc, CliRetry) else 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        return 0


if __name__ == "__main__":
    # run through the package so that CliError has one identity (not __main__.CliError)
    from shmfabric.cli.main import main as _main

    sys.exit(_main())


def console():
    """A rich console; piped output gets a wide fixed width so tables are not cut for `grep`."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=200)
