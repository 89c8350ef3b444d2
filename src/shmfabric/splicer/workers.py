"""Several splicer worker processes on one port (SO_REUSEPORT): fork them, pass SIGINT/SIGTERM on,
and wait for all of them. Shared by `splice http` and `splice redis`."""
from __future__ import annotations

import os
import signal
import sys
import traceback
from typing import Any, Callable


def run_workers(n: int, child: Callable[[int], None]) -> int:
    """Fork `n` processes running child(i); return 0 if every one ended cleanly (or by our signal)."""
    children: list[int] = []
    for i in range(n):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                child(i)
            except KeyboardInterrupt:
                pass
            except BaseException:  # noqa: BLE001 - a child must never return into the parent's code
                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        children.append(pid)

    def forward(signum: int, _frame: Any) -> None:
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    status = 0
    for pid in children:
        while True:
            try:
                _, st = os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue
        code = os.waitstatus_to_exitcode(st)
        if code > 0:  # killed by our own SIGTERM/SIGINT (negative codes) is a clean stop
            status = status or 1
    return status
