"""The reaper of an ephemeral fabric: a small detached process that removes the region file
once no node is left, however the nodes ended (kill -9 included), and meanwhile returns the
buffers of dead nodes like any survivor would.

Run as `python -m shmfabric.core.reaper PATH CREATOR_PID CREATOR_START_TIME`; the creator starts it.
"""
from __future__ import annotations

import os
import signal
import sys
import time

from shmfabric.core.errors import RegionOpenError
from shmfabric.core.liveness import BEAT, any_alive, sweep
from shmfabric.core.region import MappedRegion, proc_start_time


def run(path: str, creator_pid: int, creator_start: int | None) -> int:
    try:
        region = MappedRegion.open(path)
    except RegionOpenError:
        return 0
    ino = os.fstat(region.fd).st_ino
    try:
        while True:
            time.sleep(BEAT)
            try:
                if os.stat(path).st_ino != ino:
                    return 0  # destroyed (and maybe re-created by someone else): not ours any more
            except FileNotFoundError:
                return 0
            sweep(region)
            creator_up = creator_start is not None and proc_start_time(creator_pid) == creator_start
            if not creator_up and not any_alive(region):
                try:
                    if os.stat(path).st_ino == ino:
                        os.unlink(path)
                except FileNotFoundError:
                    pass
                return 0
    finally:
        region.close()


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for the creator's terminal
    path, creator, start = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    return run(path, creator, start)


if __name__ == "__main__":
    sys.exit(main())
