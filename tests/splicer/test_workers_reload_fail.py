"""A reload that fails cuts no client connection (docs/splicer-http.md, "Master, respawn and
reload": "No connection is refused, reset or cut by a reload").

The new workers of a slot accept on the socket the old worker of the slot accepts on, from the
moment each is ready: when another new worker then fails (dies, or is not ready in time), the
ready ones already serve clients. They get a graceful stop (answer what they have read, close
after `Connection: close`), not the SIGKILL they used to get; only a new worker that is hung
(never ready) is killed.

A real `splice http` runs with one change, made by the wrapper below: the first new worker to
start after the test creates a marker file hangs before it listens, deaf to a polite stop (a
start stuck on something), and says its pid. The ready timeout is shortened so that the test of
the timeout path does not wait 30 s. No test asserts a duration; every wait is bounded.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from .redis_fixtures import free_port, wait_port
from .test_graceful_stop import _HttpBackend
from .test_master import _children, _dead, _finish, _get, _Stderr, _wait

pytestmark = pytest.mark.timeout(150)

_WRAPPER = """
import os, signal, sys, time
from shmfabric.splicer import http_server, workers
from shmfabric.cli.main import main

workers.Master.READY_TIMEOUT = float(os.environ["T_READY_TIMEOUT"])
workers.Master.KILL_AFTER = float(os.environ["T_KILL_AFTER"])
marker = os.environ["T_HANG_MARKER"]
real = http_server._serve

def _serve(*args, **kwargs):
    try:
        os.unlink(marker)  # one worker claims it: the others start as usual
    except FileNotFoundError:
        return real(*args, **kwargs)
    signal.signal(workers.FORWARD_SIGNAL, signal.SIG_IGN)  # hung: a polite stop does nothing
    with open(marker + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(marker + ".tmp", marker + ".pid")
    while True:
        time.sleep(1)

http_server._serve = _serve
sys.exit(main(sys.argv[1:]))
"""


def _start(tmp_path: Path, backend: _HttpBackend, ready_timeout: float) -> tuple[subprocess.Popen, int, _Stderr]:
    port = free_port()
    cfg = tmp_path / "splice.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        http:
          listen: 127.0.0.1:{port}
          workers: 2
          default: [127.0.0.1:{backend.port}]
        """))
    wrapper = tmp_path / "splice_wrapper.py"
    wrapper.write_text(_WRAPPER)
    env = {**os.environ, "T_READY_TIMEOUT": str(ready_timeout), "T_KILL_AFTER": "1",
           "T_HANG_MARKER": str(tmp_path / "hang")}
    proc = subprocess.Popen([sys.executable, str(wrapper), "splice", "http", "--config", str(cfg)],
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    err = _Stderr(proc)
    wait_port(port)
    assert proc.stdout.readline().startswith("splice http: listening on"), err.text()
    return proc, port, err


def _owner(pids: list[int], port: int, client: socket.socket) -> int | None:
    """Which of `pids` holds the splicer's end of the connection `client` (None: none of them)."""
    want_local, want_remote = f"{port:04X}", f"{client.getsockname()[1]:04X}"
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if f[1].endswith(":" + want_local) and f[2].endswith(":" + want_remote) and f[3] == "01":
            inode = f[9]
    if inode is None:
        return None
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    return pid
            except OSError:
                pass
    return None


class _Clients:
    """Traffic through the reload: a connection per request, and keep-alive clients that reopen
    their connection when an answer says `Connection: close` (as HTTP clients do). Anything else
    (a connection closed or reset without that, a status other than 200) is an error."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.errors: list[str] = []
        self.answered = 0
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._fresh)] + [threading.Thread(target=self._keep) for _ in range(4)]
        for t in self.threads:
            t.start()

    def _fresh(self) -> None:
        while not self.stop.is_set():
            try:
                status, _, _ = _get(self.port)
            except OSError as exc:
                self.errors.append(f"fresh: {exc!r}")
                continue
            if status != 200:
                self.errors.append(f"fresh: status {status}")
            self.answered += 1

    def _keep(self) -> None:
        sock = None
        while not self.stop.is_set():
            if sock is None:
                sock = socket.create_connection(("127.0.0.1", self.port), timeout=20)
            try:
                status, _, close = _get(self.port, "/?delay=20", sock=sock)
            except OSError as exc:
                self.errors.append(f"keep-alive: {exc!r}")
                sock.close()
                sock = None
                continue
            if status != 200:
                self.errors.append(f"keep-alive: status {status}")
            self.answered += 1
            if close:
                sock.close()
                sock = None
        if sock is not None:
            sock.close()

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)


class _Probe:
    """A keep-alive connection held by the new worker that became ready, sending requests back to
    back (each answered after 300 ms, so one is in flight when the reload fails) until an answer
    says `Connection: close`; then the connection must end with a clean close."""

    def __init__(self, port: int, sock: socket.socket) -> None:
        self.port, self.sock = port, sock
        self.errors: list[str] = []
        self.answered = 0
        self.closed_cleanly = False
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        try:
            while True:
                status, _, close = _get(self.port, "/?delay=300", sock=self.sock)
                if status != 200:
                    self.errors.append(f"status {status}")
                self.answered += 1
                if close:
                    self.closed_cleanly = self.sock.recv(100) == b""
                    return
        except OSError as exc:
            self.errors.append(repr(exc))
        finally:
            self.sock.close()


def _reload_with_a_hung_worker(tmp_path: Path, proc: subprocess.Popen, port: int) -> tuple[int, int, list[int]]:
    """SIGHUP with the hang marker set; returns (hung pid, ready new pid, old pids) once a
    keep-alive connection held by the ready new worker has been found (the probe's)."""
    old = _children(proc.pid)
    (tmp_path / "hang").write_text("")
    proc.send_signal(signal.SIGHUP)
    pidfile = tmp_path / "hang.pid"
    _wait("the hung worker", pidfile.exists)
    hung = int(pidfile.read_text())
    _wait("both new workers", lambda: len(set(_children(proc.pid)) - set(old)) == 2)
    ready = next(p for p in _children(proc.pid) if p not in old and p != hung)
    return hung, ready, old


def _probe_on(port: int, pid: int) -> _Probe:
    """Open connections until one is served by worker `pid` (the kernel spreads them over the
    workers), and start a probe on it."""
    found: list[socket.socket] = []

    def attempt() -> bool:
        s = socket.create_connection(("127.0.0.1", port), timeout=20)
        assert _get(port, sock=s)[0] == 200
        if _owner([pid], port, s) == pid:
            found.append(s)
            return True
        s.close()
        return False

    _wait("a connection served by the new worker", attempt)
    return _Probe(port, found[0])


@pytest.fixture
def backend():
    b = _HttpBackend("A")
    yield b
    b.close()


def test_a_reload_whose_new_worker_dies_before_ready_cuts_no_connection_of_the_ready_ones(tmp_path: Path,
                                                                                         backend) -> None:
    proc, port, err = _start(tmp_path, backend, ready_timeout=60)
    clients = _Clients(port)
    probe = None
    try:
        _wait("traffic", lambda: clients.answered > 20)
        hung, ready, old = _reload_with_a_hung_worker(tmp_path, proc, port)
        probe = _probe_on(port, ready)
        _wait("the probe's requests on the new worker", lambda: probe.answered >= 2)
        os.kill(hung, signal.SIGKILL)  # the new worker dies before it is ready: the reload fails
        err.wait_for(f"reload failed, the running configuration stays: new worker {hung} was killed by signal 9")
        probe.thread.join(timeout=30)
        # The ready new worker stopped gracefully: it answered its request in flight, said
        # Connection: close, closed, and exited by itself.
        _wait("the ready new worker to stop", lambda: _dead(ready) or ready not in _children(proc.pid))
        assert probe.errors == [] and probe.closed_cleanly, (probe.errors, err.text())
        assert set(_children(proc.pid)) == set(old)  # the old workers carry on
        n = clients.answered
        _wait("requests after the failed reload", lambda: clients.answered > n + 20)
    finally:
        clients.finish()
        if probe is not None:
            probe.thread.join(timeout=30)
        code = _finish(proc)
    assert clients.errors == [], (clients.errors[:5], err.text())
    assert "cutting" not in err.text() and "Traceback" not in err.text(), err.text()
    assert code == 0, err.text()


def test_a_reload_whose_new_worker_never_gets_ready_cuts_no_connection_and_kills_only_the_hung_one(
        tmp_path: Path, backend) -> None:
    proc, port, err = _start(tmp_path, backend, ready_timeout=10)
    clients = _Clients(port)
    probe = None
    try:
        _wait("traffic", lambda: clients.answered > 20)
        hung, ready, old = _reload_with_a_hung_worker(tmp_path, proc, port)
        probe = _probe_on(port, ready)
        assert "reload failed" not in err.text(), "the test found its connection too late: " + err.text()
        err.wait_for("reload failed, the running configuration stays: the new workers did not accept "
                     "connections within 10 s", )
        probe.thread.join(timeout=30)
        assert probe.errors == [] and probe.closed_cleanly, (probe.errors, err.text())
        assert probe.answered >= 1
        # The hung worker ignores the polite stop and is killed; the ready one ends by itself.
        _wait("the failed generation to go", lambda: set(_children(proc.pid)) == set(old))
        n = clients.answered
        _wait("requests after the failed reload", lambda: clients.answered > n + 20)
    finally:
        clients.finish()
        if probe is not None:
            probe.thread.join(timeout=30)
        code = _finish(proc)
    assert clients.errors == [], (clients.errors[:5], err.text())
    text = err.text()
    assert "cutting" not in text and "Traceback" not in text and "killed by signal" not in text, text
    assert code == 0, text
