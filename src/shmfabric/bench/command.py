"""What every `shmfabric bench VERB` command does around its run: SIGTERM unwinds like Ctrl-C
(a `timeout`, a cancelled job: the bench's namespaces, processes and fabrics are removed by
their own `finally`), the bench's own error becomes a one-line CLI error, and the result is
printed as a table or as JSON, with what it was measured with (`provenance.run_info`)."""
from __future__ import annotations

import argparse
import json
import signal
from typing import Any, Callable


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def run_bench(args: argparse.Namespace, measure: Callable[[], dict[str, Any]], table: Callable[[dict[str, Any]], str],
              errors: type[Exception]) -> int:
    """Run `measure()` and print its result (`table(result)`, or JSON with --json), with the
    command, commit, machine and peers it ran with (`meta`; a line under the table)."""
    from shmfabric.bench.provenance import info_line, run_info
    from shmfabric.cli.main import CliError

    meta = run_info()  # before the run: the load average is the machine's, not the bench's
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        res = measure()
    except errors as exc:
        raise CliError(str(exc)) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    if getattr(args, "json", False):
        print(json.dumps({"meta": meta, **res}, indent=1))
    else:
        print(table(res) + "\n\n" + info_line(meta))
    return 0
