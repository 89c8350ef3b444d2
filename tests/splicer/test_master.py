"""The splicer's master process (`workers.Master`), driven by real signals to a real
`shmfabric splice` process: a worker that dies is replaced and the clients that arrived in the
meantime are served; SIGHUP reloads the configuration with no connection refused, reset or cut;
a reload that cannot apply is refused and the running configuration stays. No test asserts a
duration; every wait is bounded.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from .redis_fixtures import free_port, needs_redis, redis_servers, wait_port
from .test_graceful_stop import _HttpBackend, _splice

pytestmark = pytest.mark.timeout(120)


def _children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _dead(pid: int) -> bool:
    """Gone, or a zombie: a SIGKILL has taken effect (it is not synchronous)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def kill_workers(pids: list[int]) -> None:
    """kill -9 each worker and wait until they are dead: a worker still alive for a moment after
    the signal could accept a connection and take it down with it."""
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    _wait("the killed workers to die", lambda: all(_dead(p) for p in pids))


def _wait(what: str, cond, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


class _Stderr:
    """Collects a process's stderr lines in a thread, so a test can wait for one."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self._t = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._t.start()

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def text(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, fragment: str, count: int = 1) -> None:
        _wait(f"{fragment!r} on stderr (have: {self.text()!r})", lambda: self.text().count(fragment) >= count)


def _get(port: int, path: str = "/", sock: socket.socket | None = None) -> tuple[int, str, bool]:
    """One GET; returns (status, X-Backend, whether the response said Connection: close)."""
    own = sock is None
    s = sock or socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            data = s.recv(65536)
            if not data:
                raise ConnectionError(f"closed before a response head: {buf!r}")
            buf += data
        head, _, body = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            data = s.recv(65536)
            if not data:
                raise ConnectionError("closed inside a response body")
            body += data
        return int(lines[0].split()[1]), headers.get("x-backend", ""), headers.get("connection", "").lower() == "close"
    finally:
        if own:
            s.close()


@pytest.fixture
def backends():
    made = [_HttpBackend("A"), _HttpBackend("B")]
    yield made
    for b in made:
        b.close()


def _write_http_config(path: Path, port: int, backend: int, workers: int = 2, extra: str = "") -> None:
    path.write_text(textwrap.dedent(f"""\
        http:
          listen: 127.0.0.1:{port}
          workers: {workers}
          default: [127.0.0.1:{backend}]
        """) + extra)


def _start_http(tmp_path: Path, backend: _HttpBackend, workers: int = 2) -> tuple[subprocess.Popen, int, Path, _Stderr]:
    port = free_port()
    cfg = tmp_path / "splice.yaml"
    _write_http_config(cfg, port, backend.port, workers)
    proc = _splice("http", "--config", str(cfg))
    err = _Stderr(proc)
    wait_port(port)
    assert proc.stdout.readline().startswith("splice http: listening on"), err.text()
    return proc, port, cfg, err


def _finish(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=40)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_workers_killed_are_replaced_and_the_clients_that_came_meanwhile_are_served(tmp_path: Path, backends) -> None:
    proc, port, _, err = _start_http(tmp_path, backends[0])
    try:
        old = _children(proc.pid)
        assert len(old) == 2
        kill_workers(old)
        # No worker runs now: these connections wait in the master's listening sockets, to be
        # answered by the replacements (a socket closed with its worker would reset them).
        conns = [socket.create_connection(("127.0.0.1", port), timeout=20) for _ in range(16)]
        try:
            answers = [_get(port, sock=c) for c in conns]
        finally:
            for c in conns:
                c.close()
        assert [a[0] for a in answers] == [200] * 16
        new = _children(proc.pid)
        assert len(new) == 2 and not set(new) & set(old)
        err.wait_for("was killed by signal 9; starting a new one", 2)
        assert _get(port)[0] == 200
    finally:
        code = _finish(proc)
    assert code == 0, err.text()
    assert "Traceback" not in err.text()


def test_sighup_reloads_the_routes_with_no_connection_refused_reset_or_cut(tmp_path: Path, backends) -> None:
    a, b = backends
    proc, port, cfg, err = _start_http(tmp_path, a)
    seen: list[str] = []
    errors: list[str] = []
    stop = threading.Event()

    def hammer() -> None:  # a fresh connection per request, through the whole reload
        while not stop.is_set():
            try:
                status, who, _ = _get(port)
                seen.append(who if status == 200 else f"status {status}")
            except OSError as exc:
                errors.append(repr(exc))

    try:
        assert _get(port)[1] == "A"
        keep = socket.create_connection(("127.0.0.1", port), timeout=20)
        assert _get(port, sock=keep)[0] == 200  # a keep-alive connection on an old worker
        # A request in flight across the reload (the old worker holds it 1.5 s).
        slow = socket.create_connection(("127.0.0.1", port), timeout=20)
        slow.sendall(b"GET /?delay=1500 HTTP/1.1\r\nHost: t\r\n\r\n")
        t = threading.Thread(target=hammer)
        t.start()
        _wait("requests before the reload", lambda: len(seen) > 5)
        _write_http_config(cfg, port, b.port)
        old = _children(proc.pid)
        at_hup = len(seen)
        proc.send_signal(signal.SIGHUP)
        err.wait_for("reloaded: 2 worker(s) on the new configuration")
        _wait("the old workers to finish", lambda: not set(_children(proc.pid)) & set(old))
        n = len(seen)
        _wait("requests after the reload", lambda: len(seen) > n + 20)
        stop.set()
        t.join(timeout=20)
        # The request in flight was answered whole, with Connection: close from its old worker.
        buf = b""
        while True:
            data = slow.recv(65536)
            if not data:
                break
            buf += data
        assert buf.startswith(b"HTTP/1.1 200") and b"connection: close" in buf.lower(), buf[:200]
        assert b"x-backend: a" in buf.lower(), buf[:200]
        # The idle keep-alive connection was closed by its old worker (not reset).
        keep.settimeout(20)
        assert keep.recv(100) == b""
        keep.close()
        slow.close()
    finally:
        stop.set()
        code = _finish(proc)
    assert errors == [], errors[:5]
    assert set(seen) <= {"A", "B"}, sorted(set(seen))
    # Old and new workers both answer for a moment (the new ones accept before the old ones
    # stop); before the SIGHUP only the old configuration answers, once the old workers are
    # gone only the new one.
    assert set(seen[:at_hup]) == {"A"} and set(seen[n:]) == {"B"}, (at_hup, n, seen)
    assert code == 0, err.text()


def test_a_reload_that_cannot_apply_is_refused_and_the_running_configuration_stays(tmp_path: Path, backends) -> None:
    a, _ = backends
    proc, port, cfg, err = _start_http(tmp_path, a)
    try:
        before = _children(proc.pid)
        cfg.write_text("http:\n  listen: [oops\n")
        proc.send_signal(signal.SIGHUP)
        err.wait_for("reload refused, the running configuration stays:")
        assert str(cfg) in err.lines[-1], err.lines[-1]
        _write_http_config(cfg, port, a.port, workers=3)
        proc.send_signal(signal.SIGHUP)
        err.wait_for("reload refused, the running configuration stays:", 2)
        assert "`workers` changed from 2 to 3" in err.lines[-1] and "restart" in err.lines[-1], err.lines[-1]
        _write_http_config(cfg, free_port(), a.port)
        proc.send_signal(signal.SIGHUP)
        err.wait_for("reload refused, the running configuration stays:", 3)
        assert "`listen` changed" in err.lines[-1], err.lines[-1]
        _write_http_config(cfg, port, a.port, extra=f"  access_log: {tmp_path}/no/such/dir/a.log\n")
        proc.send_signal(signal.SIGHUP)
        err.wait_for("reload refused, the running configuration stays:", 4)
        assert "access_log: cannot create" in err.lines[-1] and "fix:" in err.lines[-1], err.lines[-1]
        assert _children(proc.pid) == before  # nothing was started or stopped
        assert _get(port)[0] == 200
    finally:
        code = _finish(proc)
    assert code == 0, err.text()
    assert "Traceback" not in err.text()


@needs_redis
def test_redis_sighup_rereads_a_twemproxy_file_and_places_keys_on_its_new_servers(tmp_path: Path) -> None:
    import redis

    with redis_servers(tmp_path, 2) as servers:
        port = free_port()
        conf = tmp_path / "nutcracker.yml"

        def write(server) -> None:
            conf.write_text(f"alpha:\n  listen: 127.0.0.1:{port}\n  redis: true\n  servers:\n"
                            f"   - {server.address}:1\n")

        write(servers[0])
        proc = _splice("redis", "--twemproxy", str(conf), "--workers", "2")
        err = _Stderr(proc)
        try:
            wait_port(port)
            client = redis.Redis(port=port, protocol=2)
            client.set("k1", "one")
            assert redis.Redis(port=servers[0].port).get("k1") == b"one"
            write(servers[1])
            proc.send_signal(signal.SIGHUP)
            err.wait_for("reloaded: 2 worker(s)")
            _wait("a new worker's answer", lambda: redis.Redis(port=port, protocol=2).get("k1") is None)
            redis.Redis(port=port, protocol=2).set("k2", "two")
            assert redis.Redis(port=servers[1].port).get("k2") == b"two"
            assert redis.Redis(port=servers[0].port).get("k2") is None
        finally:
            code = _finish(proc)
        assert code == 0, err.text()


_MASTER_SCRIPT = """
import os, signal, sys, time
from shmfabric.splicer.workers import FORWARD_SIGNAL, Master, ReloadRefused

mode = sys.argv[1]

def good(slot, ready, slow=False):
    signal.signal(FORWARD_SIGNAL, signal.SIG_IGN if mode == "stubborn" else (lambda *a: os._exit(0)))
    if slow or mode == "slow":
        time.sleep(1.5)
    ready()
    while True:
        time.sleep(1)

def bad(slot, ready):
    raise RuntimeError("cannot start (test)")

reloads = iter(sys.argv[2:])

def reload():
    what = next(reloads)
    if what == "refuse":
        raise ReloadRefused("test refusal")
    if what == "slow":
        return lambda slot, ready: good(slot, ready, slow=True)
    return good if what == "good" else bad

def announce():
    print("ready", flush=True)

sys.exit(Master("test", 2, bad if mode == "bad" else good, reload, announce).run())
"""


def _master(tmp_path: Path, *argv: str) -> subprocess.Popen:
    script = tmp_path / "master.py"
    script.write_text(_MASTER_SCRIPT)
    return subprocess.Popen([sys.executable, str(script), *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def test_a_worker_that_fails_at_start_ends_the_splicer_with_status_1(tmp_path: Path) -> None:
    proc = _master(tmp_path, "bad")
    try:
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1, err
    assert "before it was ready; stopping" in err and "ready" not in out


def test_a_reload_whose_workers_fail_keeps_the_old_ones(tmp_path: Path) -> None:
    proc = _master(tmp_path, "good", "refuse", "bad", "good")
    err = _Stderr(proc)
    try:
        assert proc.stdout.readline() == "ready\n"
        first = _children(proc.pid)
        proc.send_signal(signal.SIGHUP)
        err.wait_for("reload refused, the running configuration stays: test refusal")
        proc.send_signal(signal.SIGHUP)
        err.wait_for("reload failed, the running configuration stays: new worker")
        _wait("the failed workers to go", lambda: _children(proc.pid) == first)
        proc.send_signal(signal.SIGHUP)
        err.wait_for("reloaded: 2 worker(s) on the new configuration; 2 old worker(s)")
        _wait("the old workers to go", lambda: len(_children(proc.pid)) == 2 and not set(_children(proc.pid)) & set(first))
    finally:
        code = _finish(proc)
    assert code == 0, err.text()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_stopping_splicer_refuses_new_connections_while_it_answers_the_old_ones(tmp_path: Path, backends,
                                                                                   workers: int) -> None:
    proc, port, _, err = _start_http(tmp_path, backends[0], workers)
    try:
        slow = socket.create_connection(("127.0.0.1", port), timeout=20)
        slow.sendall(b"GET /?delay=2000 HTTP/1.1\r\nHost: t\r\n\r\n")
        time.sleep(0.3)  # the request has reached a worker (not a timing assertion)
        proc.send_signal(signal.SIGTERM)

        def refused() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
            except ConnectionRefusedError:
                return True
            return False

        # Nothing listens once the stop began (no one would accept: a client must not wait),
        _wait("the port to refuse connections", refused)
        assert proc.poll() is None  # while the request in flight is still being answered
        buf = b""
        while (data := slow.recv(65536)):
            buf += data
        assert buf.startswith(b"HTTP/1.1 200") and b"connection: close" in buf.lower(), buf[:200]
        slow.close()
    finally:
        code = _finish(proc)
    assert code == 0, err.text()


def test_a_sighup_while_the_workers_start_is_applied_once_they_are_ready(tmp_path: Path) -> None:
    proc = _master(tmp_path, "slow", "good")
    err = _Stderr(proc)
    try:
        _wait("the workers", lambda: len(_children(proc.pid)) == 2)
        first = _children(proc.pid)
        proc.send_signal(signal.SIGHUP)
        err.wait_for("SIGHUP: reloading again once the start is done")
        assert proc.stdout.readline() == "ready\n"  # started all the same
        err.wait_for("reloaded: 2 worker(s) on the new configuration; 2 old worker(s)")
        _wait("the first workers to go", lambda: len(_children(proc.pid)) == 2 and not set(_children(proc.pid)) & set(first))
    finally:
        code = _finish(proc)
    assert code == 0, err.text()


def test_a_stop_soon_after_a_reload_drains_the_old_workers_instead_of_cutting_them(tmp_path: Path, backends) -> None:
    # systemd's `reload` then `stop` within the drain: the old workers were told to stop by the
    # reload; the stop must not count as their second signal (which cuts).
    proc, port, cfg, err = _start_http(tmp_path, backends[0], workers=1)
    try:
        slow = socket.create_connection(("127.0.0.1", port), timeout=20)
        slow.sendall(b"GET /?delay=2500 HTTP/1.1\r\nHost: t\r\n\r\n")
        time.sleep(0.3)  # the request has reached the worker (not a timing assertion)
        proc.send_signal(signal.SIGHUP)
        err.wait_for("reloaded: 1 worker(s)")
        os.killpg(proc.pid, signal.SIGTERM)  # the whole group, as systemd's stop
        buf = b""
        while (data := slow.recv(65536)):
            buf += data
        assert buf.startswith(b"HTTP/1.1 200"), (buf[:200], err.text())
        slow.close()
        code = proc.wait(timeout=30)
    finally:
        code = _finish(proc)
    assert code == 0 and "cutting" not in err.text(), err.text()


def test_keep_alive_clients_sending_through_reloads_see_no_error(tmp_path: Path, backends) -> None:
    # An idle keep-alive connection of an old worker stays open for one more request, answered
    # with Connection: close: a client sending on it as the reload lands is answered, not cut.
    a, b = backends
    proc, port, cfg, err = _start_http(tmp_path, a)
    errors: list[str] = []
    answered = [0]
    closes = [0]
    stop = threading.Event()

    def client() -> None:
        sock = None
        while not stop.is_set():
            if sock is None:
                sock = socket.create_connection(("127.0.0.1", port), timeout=20)
            try:
                status, _, close = _get(port, sock=sock)
            except OSError as exc:
                errors.append(repr(exc))
                sock.close()
                sock = None
                continue
            if status != 200:  # collected: an assert in this thread would not fail the test
                errors.append(f"status {status}")
            answered[0] += 1
            if close:
                closes[0] += 1
                sock.close()
                sock = None
        if sock is not None:
            sock.close()

    threads = [threading.Thread(target=client) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        for i, backend in enumerate([b, a, b]):
            _wait("requests", lambda n=answered[0]: answered[0] > n + 50)
            _write_http_config(cfg, port, backend.port)
            proc.send_signal(signal.SIGHUP)
            err.wait_for("reloaded: 2 worker(s)", i + 1)
        _wait("requests after the last reload", lambda n=answered[0]: answered[0] > n + 50)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
        code = _finish(proc)
    assert errors == [], (errors[:5], err.text())
    assert closes[0] >= 1  # the old workers' connections ended with Connection: close
    assert code == 0, err.text()


@pytest.mark.parametrize("unbuffered", [False, True], ids=["buffered-stderr", "PYTHONUNBUFFERED"])
def test_a_stderr_nobody_reads_any_more_does_not_stop_the_splicer(tmp_path: Path, backends, unbuffered: bool) -> None:
    """Nor makes its graceful stop fail: with a buffered stderr (no PYTHONUNBUFFERED, as for most
    users) the line that met EPIPE stayed in the buffer, Python's exit flushed it again and the
    master exited with status 120."""
    port = free_port()
    cfg = tmp_path / "splice.yaml"
    _write_http_config(cfg, port, backends[0].port)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    r, w = os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "shmfabric", "splice", "http", "--config", str(cfg)],
                            start_new_session=True, stdout=subprocess.PIPE, stderr=w, text=True, env=env)
    os.close(w)
    try:
        assert proc.stdout.readline().startswith("splice http: listening on")
        os.close(r)  # the reader goes away (a log shipper restarted, a `| tee` killed)
        proc.send_signal(signal.SIGHUP)  # the master has something to say now: EPIPE
        _wait("the reload", lambda: len(_children(proc.pid)) == 2 and proc.poll() is None)
        time.sleep(1.0)  # give it the chance to fail (not a timing assertion)
        assert proc.poll() is None
        assert _get(port)[0] == 200
    finally:
        code = _finish(proc)
    assert code == 0


def test_workers_that_ignore_even_a_second_stop_signal_are_killed(tmp_path: Path) -> None:
    proc = _master(tmp_path, "stubborn")
    err = _Stderr(proc)
    try:
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)  # two signals sent at once would merge into one (signals do not queue)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    err.wait_for("after the second signal: killed", 2)
    assert code == 1, err.text()


def test_a_sighup_during_a_reload_is_applied_after_it(tmp_path: Path) -> None:
    proc = _master(tmp_path, "good", "slow", "good")
    err = _Stderr(proc)
    try:
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signal.SIGHUP)
        _wait("the slow reload's workers", lambda: len(_children(proc.pid)) == 4)
        proc.send_signal(signal.SIGHUP)
        err.wait_for("SIGHUP: reloading again once the reload under way is done")
        err.wait_for("reloaded: 2 worker(s) on the new configuration", 2)
        _wait("two workers", lambda: len(_children(proc.pid)) == 2)
    finally:
        code = _finish(proc)
    assert code == 0, err.text()


def test_a_second_splicer_on_a_port_in_use_is_refused_even_with_several_workers(tmp_path: Path, backends) -> None:
    # SO_REUSEPORT would let it join the first one's port and take half its clients quietly.
    proc, port, _, err = _start_http(tmp_path, backends[0])
    try:
        r = subprocess.run([sys.executable, "-m", "shmfabric", "splice", "http", "--listen", f"127.0.0.1:{port}",
                            "--default", f"127.0.0.1:{backends[1].port}", "--workers", "2"],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 2 and f"cannot listen on 127.0.0.1:{port}: Address already in use" in r.stderr, r.stderr
        assert {_get(port)[1] for _ in range(8)} == {"A"}  # the first one still has every client
    finally:
        code = _finish(proc)
    assert code == 0, err.text()


def test_metrics_ports_past_65535_are_one_line() -> None:
    r = subprocess.run([sys.executable, "-m", "shmfabric", "splice", "http", "--default", "127.0.0.1:1",
                        "--listen", f"127.0.0.1:{free_port()}", "--workers", "2", "--metrics", "127.0.0.1:65535",
                        "--no-health"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "cannot serve metrics on 127.0.0.1:65535" in r.stderr and "past 65535" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
