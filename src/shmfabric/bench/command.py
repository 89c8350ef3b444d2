"""What every `shmfabric bench VERB` command does around its run: SIGTERM unwinds like Ctrl-C
(a `timeout`, a cancelled job: the bench's namespaces, processes and fabrics are removed by
their own `finally`), the bench's own error becomes a one-line CLI error, and the result is
printed as a table or as JSON."""
from __future__ import annotations

import argparse
import json
import signal
from typing import Any, Callable


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def run_bench(args: argparse.Namespace, measure: Callable[[], dict[str, Any]], table: Callable[[dict[str, Any]], str],
              errors: type[Exception]) -> int:
    """Run `measure()` and print its result (`table(result)`, or JSON with --json)."""
    from shmfabric.cli.main import CliError

    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        res = measure()
    except errors as exc:
        raise CliError(str(exc)) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(json.dumps(res, indent=1) if getattr(args, "json", False) else table(res))
    return 0
