"""Process life of a splicer, shared by `splice http` and `splice redis`: a master process
(`Master`) that holds the listening sockets (`Listeners`), forks the workers, respawns one that
dies, reloads the configuration on SIGHUP and passes SIGINT/SIGTERM on; and the graceful stop
each worker's event loop runs on those signals (`GracefulStop`)."""
from __future__ import annotations

import asyncio
import os
import select
import signal
import socket
import struct
import sys
import time
import traceback
import weakref
from collections import OrderedDict
from typing import Any, Callable

from ..core.parent import die_with_parent
from .config import split_address

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
        # Python's own handlers, not loop.add_signal_handler: uvloop (0.23) runs an
        # add_signal_handler callback twice for one signal that lands between its read of the
        # signal pipe and its check of Python's pending signals (once from its handler's record,
        # again from the pipe byte on the next pass). `kill -TERM -PGID` does exactly that: the
        # direct SIGTERM wakes the loop and the parent's FORWARD_SIGNAL follows microseconds
        # later, so one stop counted as two and cut every connection. CPython runs a Python
        # handler once per delivery, in the main thread between bytecodes (both loops wake for it:
        # uvloop through its wakeup fd, asyncio's select returns on EINTR), and
        # call_soon_threadsafe is safe there.
        self._previous = {sig: signal.signal(sig, self._deliver) for sig in sigs}

    def _deliver(self, signum: int, _frame: object) -> None:
        source = signum if signum == FORWARD_SIGNAL else signal.SIGTERM
        try:
            self.loop.call_soon_threadsafe(self._on_signal, source)
        except RuntimeError:  # the loop is closed: the stop is over (a late forward)
            pass

    def close(self) -> None:
        """Put back the signal handlers found at construction, for a GracefulStop made in a
        process that goes on after its loop (a test). A worker keeps them until it exits."""
        for sig, handler in self._previous.items():
            if handler is not None:
                signal.signal(sig, handler)

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


class Accepting:
    """Connections a listener accepted whose protocol has not seen `connection_made` yet.

    asyncio creates the protocol when it accepts and calls `connection_made` a loop turn or more
    later (after the handshake, with TLS). A graceful stop that counted only connected clients
    could find none in between, close the pools, and then serve such a connection's request with
    nothing behind it: a 503 (or a reset) in the middle of a reload, with every backend up. So a
    stop counts these too.

    A handshake that fails or times out reaches neither `connection_made` nor `connection_lost`:
    asyncio drops the protocol. So the protocol is held by a weak reference, and its entry goes
    when it is dropped (`on_lost(age)` is then called, if given: a failed handshake); an entry
    older than `limit` seconds is forgotten anyway. Entries are in insertion (time) order, so
    forgetting old ones looks only at the oldest: each add costs O(1), amortized, however many
    handshakes fail (a churn of clients that never complete one must not slow every accept).
    """

    def __init__(self, limit: float, on_lost: Callable[[float], None] | None = None) -> None:
        self.limit = limit
        self.on_lost = on_lost
        self._since: OrderedDict[weakref.ref, float] = OrderedDict()
        # (reference, when) of protocols dropped before connection_made: appended by the weakref
        # callback (which may run in the middle of any allocation, so it touches nothing else)
        self._dead: list[tuple[weakref.ref, float]] = []

    def add(self, conn: object) -> None:
        """Called from the protocol's constructor (the listener's protocol factory)."""
        now = time.monotonic()
        if self._dead:
            self._purge()
        self._forget_old(now)
        self._since[weakref.ref(conn, self._gone)] = now

    def made(self, conn: object) -> None:
        """Called from the protocol's `connection_made`."""
        # Dropping the entry drops its reference, and with it the callback: no "lost" later.
        self._since.pop(weakref.ref(conn), None)

    def count(self) -> int:
        """Accepted connections still on their way to `connection_made`."""
        if self._dead:
            self._purge()
        if self._since:
            self._forget_old(time.monotonic())
        return len(self._since)

    def _gone(self, ref: weakref.ref) -> None:
        self._dead.append((ref, time.monotonic()))

    def _purge(self) -> None:
        dead, self._dead = self._dead, []
        for ref, when in dead:
            t = self._since.pop(ref, None)
            if t is not None and self.on_lost is not None:
                self.on_lost(when - t)

    def _forget_old(self, now: float) -> None:
        since = self._since
        cutoff = now - self.limit
        while since:
            ref = next(iter(since))
            if since[ref] >= cutoff:
                return
            del since[ref]


def say(line: str) -> None:
    """One line on stderr, in one write (workers share stderr, and print() writes the line and
    its newline apart). A stderr that is gone (the reader of a pipe died: a restarted log
    shipper, a killed `| tee`) loses the line and nothing else: a splicer must not stop serving
    because nobody reads its messages."""
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):  # BrokenPipeError; ValueError: stderr closed
        # The unwritten line stays in the stream's buffer, and Python's exit would flush it
        # again, fail and exit with status 120 (a graceful stop reported as a failure): later
        # lines go nowhere instead.
        _drop_stderr()


def _drop_stderr() -> None:
    try:
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    except OSError:
        pass


def install_uvloop() -> bool:
    """Use uvloop's event loop when it is installed; returns whether it is."""
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


#: A worker's body: child(slot, ready) serves on listening socket `slot` and calls ready() once
#: it accepts; it returns when its graceful stop is over.
Child = Callable[[int, Callable[[], None]], None]


class ReloadRefused(Exception):
    """A reload that cannot be applied; the message says why. The running workers keep serving."""


def listen_sockets(address: str, n: int, *, shared_port: bool = True) -> list[socket.socket]:
    """`n` listening sockets on `address` (HOST:PORT; port 0 picks a free one).

    With `shared_port` they share one port through SO_REUSEPORT (one per worker: the kernel
    spreads connections over them); a port something already listens on is refused first (one
    socket alone gets no SO_REUSEPORT at all), so a second splicer started on a busy port fails
    instead of quietly joining it. Without `shared_port` socket i
    is on port + i (the workers' metrics ports). The master holds them for its whole life: a
    worker that dies or is replaced by a reload leaves its queue of connections waiting for the
    next one instead of reset. OSError (with the address) when one cannot be made.
    """
    host, port = split_address(address, allow_zero=True)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if not shared_port and port and port + n - 1 > 65535:
        raise OSError(0, f"the ports {port}..{port + n - 1} (one per worker) go past 65535", f"{host}:{port}")
    if shared_port and port and n > 1:
        # SO_REUSEPORT lets any socket of the same user join the port, so a second splicer
        # started on it would share it quietly (the kernel splitting clients between the two).
        # A plain bind fails while anything listens there: the port is busy, say so.
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as exc:
                exc.filename = f"{host}:{port}"
                raise
    socks: list[socket.socket] = []
    try:
        for i in range(n):
            s = socket.socket(family, socket.SOCK_STREAM)
            socks.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if shared_port and n > 1:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            want = port if shared_port or not port else port + i
            try:
                s.bind((host, want))
            except OSError as exc:
                exc.filename = f"{host}:{want}"
                raise
            if shared_port and not port:
                port = s.getsockname()[1]  # port 0: the others join the port the first one got
            s.listen(1024)
    except OSError:
        for s in socks:
            s.close()
        raise
    return socks


class ListenError(Exception):
    """A listening socket that cannot be made; the message names the address and the reason."""


class Listeners:
    """The listening sockets a splicer's master holds for its workers: `data[i]` for worker i
    (all on the one `listen` port), and `metrics[i]` on the metrics port + i when metrics are on.

    The addresses and the number of workers stay for the master's life, so a reload that changes
    them is refused (`check_reload`): a restart changes them.
    """

    def __init__(self, listen: str, workers: int, metrics: str | None = None) -> None:
        self.listen, self.workers, self.metrics_address = listen, workers, metrics
        self.data: list[socket.socket] = []
        self.metrics: list[socket.socket] = []
        try:
            self.data = listen_sockets(listen, workers)
        except OSError as exc:
            raise ListenError(f"cannot listen on {listen}: {exc.strerror or exc}") from None
        if metrics:
            try:
                self.metrics = listen_sockets(metrics, workers, shared_port=False)
            except OSError as exc:
                self.close()
                raise ListenError(f"cannot serve metrics on {exc.filename or metrics}: {exc.strerror or exc}") from None

    @property
    def port(self) -> int:
        """The port listened on (what port 0 became)."""
        return self.data[0].getsockname()[1]

    def describe_metrics(self) -> str:
        """Where the metrics are served, for the start-up line ("" without metrics)."""
        if not self.metrics:
            return ""
        host, ports = self.metrics[0].getsockname()[0], [s.getsockname()[1] for s in self.metrics]
        return f"; metrics on {host}:{','.join(map(str, ports))}"

    def metrics_socket(self, slot: int) -> socket.socket | None:
        """Worker `slot`'s metrics socket, or None without metrics."""
        return self.metrics[slot] if self.metrics else None

    def check_reload(self, cfg: Any) -> Any:
        """`cfg` (a re-read configuration) if it keeps the addresses and number of workers, else
        ReloadRefused saying what changed."""
        for field, now in (("listen", self.listen), ("workers", self.workers), ("metrics", self.metrics_address)):
            new = getattr(cfg, field)
            if new != now:
                raise ReloadRefused(f"`{field}` changed from {now} to {new}; a reload keeps the listening "
                                    f"sockets and the number of workers; restart the splicer to change them")
        return cfg

    def keep_only(self, slot: int) -> None:
        """In worker `slot`: close the other workers' sockets, so that the port stops listening
        as soon as the workers still draining after their master died have closed their own."""
        for i, s in enumerate(self.data):
            if i != slot:
                s.close()
        for i, s in enumerate(self.metrics):
            if i != slot:
                s.close()

    def close(self) -> None:
        """Close every socket (this process's copies; again is harmless)."""
        for s in self.data + self.metrics:
            s.close()


class _Worker:
    __slots__ = ("pid", "slot", "gen", "started", "ready", "retired")

    def __init__(self, pid: int, slot: int, gen: int, started: float) -> None:
        self.pid, self.slot, self.gen, self.started = pid, slot, gen, started
        self.ready = False
        self.retired = False  # replaced by a reload (or told to stop): not respawned


def _describe(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    return f"exited with status {code}" if code >= 0 else f"was killed by signal {-code}"


class Master:
    """The parent of a splicer's workers, as nginx's and HAProxy's master processes are.

    * holds the listening sockets (`listen_sockets`), so a worker's connection queue outlives it;
    * respawns a worker that dies (kill -9, OOM, a crash) on the same socket, after a backoff
      that grows while a slot keeps dying young;
    * on SIGHUP, `reload()` builds the new workers' body from the re-read configuration
      (ReloadRefused: the old workers carry on); a new generation of workers starts next to the
      old one, and once all of them accept, the old ones get a graceful stop: they answer the
      requests they have read and close, while new connections go to the new workers. No
      connection is refused, reset or cut by a reload. A reload that fails (a new worker dies
      or is not ready within READY_TIMEOUT) stops its new workers the same graceful way, since
      the ready ones serve clients already; a new worker still not ready KILL_AFTER seconds
      later is hung, serves nobody, and is killed;
    * on SIGTERM/SIGINT, passes a graceful stop to every worker (FORWARD_SIGNAL; a second signal
      cuts it short) and waits for them.

    A worker that fails before the first generation is ready ends the whole splicer (status 1):
    that is a start-up problem, not a crash to retry.
    """

    READY_TIMEOUT = 30.0  # a reload's new workers must accept within this, or the reload fails
    # While a slot waits for its respawn, the connections the kernel hands its socket wait too:
    # the cap bounds that wait (and costs at most a start-up every 2 s in a crash loop).
    BACKOFF_FIRST, BACKOFF_CAP, YOUNG = 0.1, 2.0, 10.0
    KILL_AFTER = 5.0  # after a second stop signal, workers still running are killed

    def __init__(self, label: str, n: int, child: Child, reload: Callable[[], Child] | None = None,
                 announce: Callable[[], None] | None = None, listeners: Listeners | None = None) -> None:
        self.label = label
        self.listeners = listeners
        self.n = n
        self.child = child
        self.reload = reload
        self.announce = announce
        self.gen = 1
        self.workers: dict[int, _Worker] = {}
        self.respawn_at: dict[int, float] = {}  # slot -> when
        self.quick_deaths: dict[int, int] = {}  # slot -> deaths in a row of workers younger than YOUNG
        self._last_gen = 1
        self.pending: tuple[int, Child, float] | None = None  # a reload's generation, body, ready deadline
        self.started = False  # the first generation has been ready
        self.stops = 0
        self.status = 0
        self._signals: list[int] = []
        self._reload_again = False  # a SIGHUP came during a reload or the start: reload once it is done
        self._failed_gens: set[int] = set()  # generations of failed reloads (their workers may be killed)
        self._kill_at: float | None = None
        self._kill_unready: dict[int, float] = {}  # pid -> when: a failed reload's workers not ready

    def _say(self, text: str) -> None:
        say(f"{self.label}: {text}")

    # -- processes ---------------------------------------------------------------------------
    def _fork(self, slot: int, gen: int, child: Child) -> None:
        parent = os.getpid()
        pid = os.fork()
        if pid:
            self.workers[pid] = _Worker(pid, slot, gen, time.monotonic())
            return
        global _in_worker
        code = 0
        try:
            _in_worker = True
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # see GracefulStop
            signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the master's: a terminal hangup reaches the group
            for sig in (signal.SIGTERM, signal.SIGCHLD, FORWARD_SIGNAL):
                signal.signal(sig, signal.SIG_DFL)
            os.close(self._wake_r)
            os.close(self._wake_w)
            os.close(self._ready_r)
            ready_w = self._ready_w
            if self.listeners is not None:
                self.listeners.keep_only(slot)
            die_with_parent(parent)

            def ready() -> None:
                os.write(ready_w, struct.pack("=i", os.getpid()))

            child(slot, ready)
        except KeyboardInterrupt:
            pass
        except SystemExit as exc:  # the worker said why already (a file it could not load)
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # noqa: BLE001 - a child must never return into the parent's code
            traceback.print_exc()
            code = 1
        finally:
            # A flush that fails (nobody reads the pipe any more) must not skip os._exit: the
            # child would return into the parent's code.
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass
            os._exit(code)

    def _signal_workers(self, workers: list[_Worker]) -> None:
        for w in workers:
            try:
                os.kill(w.pid, FORWARD_SIGNAL)  # see GracefulStop
            except ProcessLookupError:
                pass

    # -- events ------------------------------------------------------------------------------
    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._signals.append(signum)

    def _stop(self) -> None:
        self.stops += 1
        if self.stops == 1:
            self.respawn_at.clear()
            self.pending = None
            self._reload_again = False
            if self.listeners is not None:
                # Nothing will accept again: new connections are refused at once (once the
                # workers have closed their copies) rather than left waiting in a queue.
                self.listeners.close()
            # Workers a reload retired are draining already: one more signal would count as
            # the second and cut them (a reload then a stop within the drain: systemd's
            # reload, stop).
            told = [w for w in self.workers.values() if not w.retired]
            for w in told:
                w.retired = True
            self._signal_workers(told)
            return
        self._signal_workers(list(self.workers.values()))  # a second signal: cut
        if self._kill_at is None:
            # A worker that does not end even then (hung, stopped) is killed: a stop must end.
            self._kill_at = time.monotonic() + self.KILL_AFTER

    def _start_reload(self) -> None:
        if self.reload is None:
            self._say("SIGHUP ignored: nothing to reload")
            return
        if self.pending is not None or not self.started:
            # The file may have changed again since: it is read again once this one is done.
            self._reload_again = True
            self._say("SIGHUP: reloading again once the " + ("reload under way" if self.started else "start") +
                      " is done")
            return
        try:
            child = self.reload()
        except ReloadRefused as exc:
            self._say(f"reload refused, the running configuration stays: {exc}")
            return
        except Exception as exc:  # noqa: BLE001 - a reload must never take the running splicer down
            self._say(f"reload refused, the running configuration stays: {type(exc).__name__}: {exc}")
            return
        self._last_gen += 1
        self.pending = (self._last_gen, child, time.monotonic() + self.READY_TIMEOUT)
        for slot in range(self.n):
            self._fork(slot, self._last_gen, child)

    def _fail_reload(self, why: str) -> None:
        assert self.pending is not None
        gen = self.pending[0]
        self._failed_gens.add(gen)
        self.pending = None
        # The new workers of a slot accept on the socket its old worker accepts on, from the
        # moment they are ready: a ready one holds clients (keep-alive connections, requests in
        # flight) while another new one has not started. So the failed generation gets the
        # graceful stop the old one gets on a successful reload: a ready worker stops
        # accepting, answers what it has read, closes its connections after `Connection: close`
        # (or once idle), and its queue of connections stays with the old worker of the slot.
        # A SIGKILL would cut all that, although a reload promises to cut nothing. (Holding the
        # new workers back from accepting until the whole generation is ready would need each
        # worker to start listening on a word from the master; the graceful stop is the path a
        # reload already takes, tested to cut nothing.)
        failed = [w for w in self.workers.values() if w.gen == gen]
        for w in failed:
            w.retired = True
        self._signal_workers(failed)
        # A worker not ready yet stops too: one that has not set up its graceful stop dies of
        # the signal (the splicers set it up right after they start listening, without waiting
        # in between: it holds nothing, or what one event-loop pass took in), one that has
        # drains. One that is still not ready a while later is hung or stopped (SIGSTOP): it
        # never reads a polite signal and serves nobody (it had not reached the point where it
        # accepts, or has not run since), so it is killed then.
        at = time.monotonic() + self.KILL_AFTER
        for w in failed:
            if not w.ready:
                self._kill_unready[w.pid] = at
        self._say(f"reload failed, the running configuration stays: {why}")

    def _kill_hung(self, now: float) -> None:
        """SIGKILL the failed reload's workers still not ready at their deadline (`_fail_reload`)."""
        for pid, at in list(self._kill_unready.items()):
            w = self.workers.get(pid)
            if w is None or w.ready:
                del self._kill_unready[pid]  # gone, or draining like the ready ones
            elif now >= at:
                del self._kill_unready[pid]
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def _check_pending(self, now: float) -> None:
        if self.pending is None:
            return
        gen, child, deadline = self.pending
        new = [w for w in self.workers.values() if w.gen == gen]
        if len(new) == self.n and all(w.ready for w in new):
            self.pending = None
            self.gen, self.child = gen, child
            self.respawn_at.clear()  # the new generation covers every slot
            old = [w for w in self.workers.values() if w.gen != gen and not w.retired]
            for w in old:
                w.retired = True
            self._signal_workers(old)
            self._say(f"reloaded: {self.n} worker(s) on the new configuration; "
                      f"{len(old)} old worker(s) finish the requests they have read and stop")
        elif now > deadline:
            self._fail_reload(f"the new workers did not accept connections within {self.READY_TIMEOUT:g} s")

    def _reap(self, now: float) -> None:
        while self.workers:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            w = self.workers.pop(pid, None)
            if w is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            if w.retired:
                # A worker told to stop that had not yet set up its graceful stop dies of the
                # signal itself: that is a clean stop too (and a failed reload's hung ones are
                # killed).
                if code not in (0, -FORWARD_SIGNAL) and not (w.gen in self._failed_gens and code == -signal.SIGKILL):
                    self._say(f"worker {pid} {_describe(status)}")
                    if self.stops:
                        self.status = 1
                continue
            if not self.started:
                self._say(f"worker {pid} {_describe(status)} before it was ready; stopping")
                self.status = 1
                self._stop()
                continue
            if self.pending is not None and w.gen == self.pending[0]:
                self._fail_reload(f"new worker {pid} {_describe(status)}")
                continue
            young = now - w.started < self.YOUNG
            deaths = self.quick_deaths[w.slot] = (self.quick_deaths.get(w.slot, 0) + 1) if young else 0
            delay = min(self.BACKOFF_CAP, self.BACKOFF_FIRST * (2 ** deaths))
            self.respawn_at[w.slot] = now + delay
            self._say(f"worker {pid} {_describe(status)}; starting a new one in {delay:g} s")

    def _mark_ready(self, data: bytes) -> None:
        for (pid,) in struct.iter_unpack("=i", data[: len(data) - len(data) % 4]):
            w = self.workers.get(pid)
            if w is not None:
                w.ready = True
        first = [w for w in self.workers.values() if w.gen == 1]
        if not self.started and len(first) == self.n and all(w.ready for w in first):
            self.started = True
            if self.announce is not None:
                self.announce()

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> int:
        """Fork the workers and look after them until they have all stopped; the exit status:
        0, or 1 when a worker failed at start or in the final stop."""
        self._wake_r, self._wake_w = os.pipe()
        self._ready_r, self._ready_w = os.pipe()
        for fd in (self._wake_r, self._wake_w, self._ready_r):
            os.set_blocking(fd, False)
        handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in handled}
        old_wakeup = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        try:
            for slot in range(self.n):
                self._fork(slot, self.gen, self.child)
            while self.workers or (self.respawn_at and not self.stops):
                now = time.monotonic()
                waits = [t - now for t in self.respawn_at.values()]
                if self.pending is not None:
                    waits.append(self.pending[2] - now)
                if self._kill_at is not None:
                    waits.append(self._kill_at - now)
                waits.extend(at - now for at in self._kill_unready.values())
                timeout = max(0.0, min(waits, default=1.0))
                try:
                    readable, _, _ = select.select([self._wake_r, self._ready_r], [], [], min(timeout, 1.0))
                except InterruptedError:
                    readable = []
                if self._wake_r in readable:
                    _drain_fd(self._wake_r)
                if self._ready_r in readable:
                    self._mark_ready(_drain_fd(self._ready_r))
                signals, self._signals = self._signals, []
                for sig in signals:
                    if sig in (signal.SIGINT, signal.SIGTERM):
                        self._stop()
                    elif sig == signal.SIGHUP and not self.stops:
                        self._start_reload()
                now = time.monotonic()
                self._reap(now)
                self._check_pending(now)
                self._kill_hung(now)
                if self._reload_again and self.started and self.pending is None and not self.stops:
                    self._reload_again = False
                    self._start_reload()
                if self._kill_at is not None and now >= self._kill_at:
                    self._kill_at = None
                    for w in self.workers.values():
                        self._say(f"worker {w.pid} still runs {self.KILL_AFTER:g} s after the second signal: killed")
                        try:
                            os.kill(w.pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                if not self.stops:
                    for slot, when in list(self.respawn_at.items()):
                        if when <= now:
                            del self.respawn_at[slot]
                            self._fork(slot, self.gen, self.child)
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for fd in (self._wake_r, self._wake_w, self._ready_r, self._ready_w):
                os.close(fd)
        return self.status


def serve_under_master(label: str, cfg: Any, listeners: Listeners,
                       serve: Callable[[Any, socket.socket, socket.socket | None, Callable[[], None]], None],
                       reload: Callable[[], Any] | None = None, announce: Callable[[], None] | None = None,
                       prepare: Callable[[Any], Any] | None = None) -> int:
    """Run `cfg.workers` workers under a `Master`, worker i being `serve(cfg, its socket, its
    metrics socket or None, ready)`; on SIGHUP, `reload()` gives the configuration the new
    workers get (it must keep the listening sockets: `Listeners.check_reload`). The exit status.

    `prepare(cfg)`, when given, runs in the master once per configuration that passed those
    checks, and what it returns is what `serve` gets instead of the configuration: state built
    there (a TLS context) is inherited by every worker of that generation, respawned ones too,
    and lives as long as the generation. It raises ReloadRefused to refuse a configuration."""
    prep = prepare if prepare is not None else (lambda c: c)

    def body(c: Any) -> Child:
        def child(slot: int, ready: Callable[[], None]) -> None:
            serve(c, listeners.data[slot], listeners.metrics_socket(slot), ready)
        return child

    rebuild = None if reload is None else (lambda: body(prep(listeners.check_reload(reload()))))
    return Master(label, cfg.workers, body(prep(cfg)), rebuild, announce, listeners).run()


def _drain_fd(fd: int) -> bytes:
    chunks = []
    while True:
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)
