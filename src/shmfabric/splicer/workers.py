"""Process life of a splicer, shared by `splice http` and `splice redis`: several worker
processes on one port (SO_REUSEPORT), forked and waited for, with SIGINT/SIGTERM passed on; and
the graceful stop each event loop runs on those signals (`GracefulStop`)."""
from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import signal
import socket
import sys
import traceback
from typing import Any, Callable

from .config import split_address

_PR_SET_PDEATHSIG = 1
_in_worker = False  # set in a forked worker (see GracefulStop)
#: How a parent passes a stop request on to its workers: a signal of its own, so that a worker
#: tells the parent's requests from the ones it gets directly.
FORWARD_SIGNAL = signal.SIGUSR1


class GracefulStop:
    """The stop signals of one splicer event loop: the first starts a graceful stop (`requested`),
    a second cuts it short (`cut`), as HAProxy's soft stop and nginx's quit do.

    A worker counts its parent's requests (FORWARD_SIGNAL) apart from the SIGTERMs it gets
    directly: one `kill -TERM -PGID` (systemd's stop, which signals the whole group) reaches it
    both directly and through its parent, and must count once. It ignores SIGINT: a terminal's
    Ctrl-C reaches the whole group too, and comes through the parent.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.requested = asyncio.Event()
        self.cut = asyncio.Event()
        self._seen: dict[int, int] = {}
        sigs = (signal.SIGTERM, FORWARD_SIGNAL) if _in_worker else (signal.SIGINT, signal.SIGTERM)
        for sig in sigs:
            loop.add_signal_handler(sig, self._on_signal, sig if sig == FORWARD_SIGNAL else signal.SIGTERM)

    def _on_signal(self, source: int) -> None:
        n = self._seen[source] = self._seen.get(source, 0) + 1
        (self.cut if n > 1 else self.requested).set()

    async def run(self, drain: Callable[[], None], busy: Callable[[], int], seconds: float) -> str | None:
        """Wait for the first stop signal, `drain()`, then wait until `busy()` is 0, `seconds`
        have passed or a second signal came. Returns what to report when connections are still
        busy (the caller is about to cut them), else None."""
        await self.requested.wait()
        drain()
        deadline = self.loop.time() + seconds
        while busy() and not self.cut.is_set() and self.loop.time() < deadline:
            await asyncio.sleep(0.02)
        left = busy()
        if not left:
            return None
        why = "second signal" if self.cut.is_set() else f"timeouts.drain {seconds:g} s"
        return f"cutting {left} client connection(s) still busy after the graceful stop ({why})"


def _die_with_parent(parent: int) -> None:
    """Have the kernel send this process SIGTERM (its graceful stop) when `parent` dies.

    Without it a parent killed with SIGKILL leaves its workers serving the port, and a new
    splicer started on that port would share it with them (SO_REUSEPORT). prctl through ctypes:
    the standard library has no wrapper, and a package for one call is not worth it.
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def check_listen(address: str, reuse_port: bool) -> None:
    """Raise OSError now if `address` (HOST:PORT) cannot be listened on, before any worker is
    forked or anything is printed, so the user gets one clear line instead of a traceback from
    inside the event loop (or from every worker)."""
    host, port = split_address(address, allow_zero=True)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((host, port))  # no listen(): a client must never reach this probe


def run_workers(n: int, child: Callable[[int], None]) -> int:
    """Fork `n` processes running child(i); return 0 if every one ended cleanly (or by our signal).

    The workers stop (gracefully, by SIGTERM) when this process dies, however it dies.
    """
    global _in_worker
    children: list[int] = []
    parent = os.getpid()
    for i in range(n):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                _in_worker = True
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # see GracefulStop
                _die_with_parent(parent)
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

    stopping = False

    def forward(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            try:
                os.kill(pid, FORWARD_SIGNAL)  # see GracefulStop
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
        if code > 0 or (code < 0 and not stopping):
            # A worker that failed, or was killed by a signal we did not pass on (kill -9, OOM):
            # said on stderr, and the exit status is 1 so a supervisor restarts the splicer.
            how = f"exited with status {code}" if code > 0 else f"was killed by signal {-code}"
            print(f"splice: worker {pid} {how}", file=sys.stderr, flush=True)
            status = 1
    return status
