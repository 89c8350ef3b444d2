"""The security review of the API's bearer-token authentication (a8a33de), each finding checked so
that it cannot come back:

1. the token goes only to the manager's own listener: a CLI that found the manager through its state
   file sends nothing to a port another user took; the manager marks its state file stopping (no
   API) before it closes its listener; `down --api` polls without the token once the shutdown was
   accepted;
2. the state directory is opened once and read through that fd (a directory swapped in under the
   path after the check is never read); a state file that is not this user's, is writable by
   others or is a symbolic link is not trusted;
3. connections are capped, and a request line and headers have one deadline in all (a body too),
   however slowly they trickle in;
4. a token file is never read through a symbolic link, nor from a directory another user could
   change (the manager's `up` and the CLI);
5. the CLI uses no proxy and follows no redirect (either would hand the token to another);
6. `Expect: 100-continue` and unknown methods get the 401 first; `Bearer TOKEN\\xa0` is not the token.

Races are made deterministic: the moment is simulated (a state file naming a port another user
holds, a hook run when the listener closes, a swap done right after the directory was checked).
"""
from __future__ import annotations

import argparse
import ctypes
import http.client
import http.server
import inspect
import json
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

import shmfabric.cli.manager_cmds as mc
import shmfabric.manager.api as api_mod
from shmfabric.cli.main import CliError
from shmfabric.core.region import region_path
from shmfabric.fabric import Fabric
from shmfabric.manager.api import ApiServer, TokenFileError, ensure_token_file, load_token
from tests.manager.conftest import unique_fabric, wait_until
from tests.manager.test_api import FakeService
from tests.manager.test_api_auth import (TOKEN, _alive, _kill_leftover, _one_line_error, _up, cli, env,  # noqa: F401
                                         request, topo)

pytestmark = pytest.mark.timeout(240)

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: runs programs as uid 65534 (setpriv) "
                                "and gives files to another uid")
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
SYS_PYTHON = shutil.which("python3", path="/usr/bin:/bin") or "/usr/bin/python3"


def _start_time(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return int(f.read().rsplit(b")", 1)[1].split()[19])


@pytest.fixture
def nobody_dir():
    """A scratch directory outside root's 0700 pytest tree (uid 65534 must reach into it), 0755."""
    d = Path(tempfile.mkdtemp(prefix="shmfabric-review-"))
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


# -- a listener of another user that records what it is sent ------------------------------------------
_SNIFFER = textwrap.dedent("""
    import select, socket, sys
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(50)
    print(s.getsockname()[1], flush=True)
    def serve(c):
        c.settimeout(5)
        data = b""
        try:
            while b"\\r\\n\\r\\n" not in data:
                more = c.recv(65536)
                if not more:
                    break
                data += more
            if data:
                c.sendall(b'HTTP/1.1 200 OK\\r\\nContent-Type: application/json\\r\\nContent-Length: 2\\r\\n'
                          b'Connection: close\\r\\n\\r\\n{}')
        except OSError:
            pass
        c.close()
        print("GOT", repr(data), flush=True)
    while True:
        r, _, _ = select.select([s, sys.stdin], [], [])
        if s in r:
            serve(s.accept()[0])
        if sys.stdin in r and not sys.stdin.read():  # stdin closed: take what is left, then exit
            s.setblocking(False)
            while True:
                try:
                    c, _ = s.accept()
                except BlockingIOError:
                    break
                c.setblocking(True)
                serve(c)
            break
""")


class Sniffer:
    """A TCP listener on 127.0.0.1 run as uid 65534 (another local user who took a port): `port`, and
    `stop()` -> the list of what each connection sent it."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([*AS_NOBODY, SYS_PYTHON, "-c", _SNIFFER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd="/")
        self.port = int(self.proc.stdout.readline())

    def stop(self) -> list[bytes]:
        out, _ = self.proc.communicate(timeout=60)  # (closes its stdin: it takes what is left, then exits)
        return [eval(line[4:]) for line in out.splitlines() if line.startswith("GOT ")]  # noqa: S307 (our repr)


# == 1. the token goes to the manager's own listener only ===============================================
@needs_root
def test_a_cli_sends_no_token_to_a_port_another_user_holds(env, topo, tmp_path):  # noqa: F811
    """The state file names the manager (alive, the same process) but the API's port is another user's
    (as after the manager let it go while its state file was still there): no verb sends the token
    there, and each says why in one line; `down` still stops the manager (by its signal)."""
    path, name, token_file = topo
    p, state = _up(env, path, tmp_path / "state", name)
    sniffer = Sniffer()
    got: list[bytes] = []
    try:
        token = load_token(str(token_file))
        state_path = tmp_path / "state" / f"{name}.json"
        state_path.write_text(json.dumps({**state, "api": f"http://127.0.0.1:{sniffer.port}"}))
        for verb in (["status"], ["status", "--fabric", name], ["top", "--once", "--interval", "0.2"], ["reload"]):
            p = cli(env, *verb, check=False)
            _one_line_error(p, f"not sending the API token to http://127.0.0.1:{sniffer.port}",
                            f"port {sniffer.port} is not held by the manager of fabric {name!r} "
                            f"(pid {state['pid']})", "nothing was sent")
        assert _alive(state["pid"])
        p = cli(env, "down", "--fabric", name, timeout=90)
        assert p.stdout.strip() == f"fabric {name} down"
        assert not _alive(state["pid"])
    finally:
        got = sniffer.stop()
        _kill_leftover(env, state)
    assert all(token.encode() not in g for g in got), got
    assert all(g == b"" for g in got), got  # connected (to look), never written to
    assert not region_path(name).exists()


def test_the_state_file_names_no_api_once_the_listener_closes(env, topo, tmp_path):  # noqa: F811
    """When the manager closes its API listener (its port is then anyone's), its state file is already
    marked stopping without the API: a `status` run at that moment says the manager is stopping and
    sends nothing. (The hook runs in the manager, just before ApiServer.close.)"""
    path, name, token_file = topo
    record = tmp_path / "at_close.json"
    state_path = tmp_path / "state" / f"{name}.json"
    hook = textwrap.dedent(f"""
        import json, subprocess, sys
        import shmfabric.manager.api as api
        close = api.ApiServer.close
        def hooked(self):
            try:
                text = open({str(state_path)!r}).read()
            except FileNotFoundError:
                text = None
            p = subprocess.run([sys.executable, "-m", "shmfabric", "status", "--fabric", {name!r}, "--json"],
                               capture_output=True, text=True, timeout=60)
            json.dump({{"state": text, "status_rc": p.returncode, "status_err": p.stderr}}, open({str(record)!r}, "w"))
            close(self)
        api.ApiServer.close = hooked
        from shmfabric.cli.main import main
        sys.exit(main(sys.argv[1:]))
    """)
    p = subprocess.run([sys.executable, "-c", hook, "up", str(path), "--duration", "1", "--quiet"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    at_close = json.loads(record.read_text())
    if at_close["state"] is not None:
        st = json.loads(at_close["state"])
        assert st["api"] is None and st["api_token_file"] is None and st["stopping"] is True, st
    assert at_close["status_rc"] == 2, at_close
    assert "is stopping" in at_close["status_err"] or "no running manager" in at_close["status_err"], at_close
    assert not state_path.exists()  # removed at the end
    assert not region_path(name).exists()


class _FakeManager(http.server.BaseHTTPRequestHandler):
    """A manager elsewhere (its pid is not a process here) that wants the token until it is shut down,
    then answers 401 twice (still up) and then 404 (gone, another program there)."""

    protocol_version = "HTTP/1.0"
    seen: list = []

    def log_message(self, *a) -> None:
        pass

    def _answer(self, code: int, obj: dict) -> None:
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        srv = self.server
        srv.seen.append(("GET", self.path, self.headers.get("Authorization")))
        if not srv.shut:
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                return self._answer(401, {"error": "authentication required"})
            return self._answer(200, {"fabric": "far", "pid": 2 ** 31 - 2, "nodes": []})
        srv.polls += 1
        if srv.polls <= 2:
            return self._answer(401, {"error": "authentication required"})
        return self._answer(404, {"error": "nothing here"})

    def do_POST(self) -> None:
        srv = self.server
        n = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(n)
        srv.seen.append(("POST", self.path, self.headers.get("Authorization")))
        srv.shut = True
        self._answer(200, {"ok": True})


def test_down_api_polls_without_the_token_after_the_shutdown(env, tmp_path):  # noqa: F811
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeManager)
    srv.seen, srv.shut, srv.polls = [], False, 0
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    tf = tmp_path / "t.token"
    tf.write_text(TOKEN + "\n")
    os.chmod(tf, 0o600)
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}"
        p = cli(env, "down", "--api", url, "--api-token-file", tf, "--timeout", "60", timeout=90)
        assert p.stdout.strip() == "fabric far down", p.stderr
    finally:
        srv.shutdown()
        srv.server_close()
    before = srv.seen[:2]
    after = srv.seen[2:]
    assert before == [("GET", "/status", f"Bearer {TOKEN}"), ("POST", "/shutdown", f"Bearer {TOKEN}")], srv.seen
    # a 401 after the shutdown means "still up": it polled on, and never with the token
    assert len(after) == 3 and all(m == "GET" and auth is None for m, _, auth in after), srv.seen


# == 2. the state directory: one fd, files checked ========================================================
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(-100, str(a).encode(), -100, str(b).encode(), _RENAME_EXCHANGE) != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))


@needs_root
def test_a_state_dir_swapped_after_its_check_is_never_read(nobody_dir, monkeypatch):
    """The state dir's parent is another user's (uid 65534): right after the CLI has checked the
    directory (its lstat, or the fstat of the fd it opened), that user swaps in a directory of theirs
    (renameat2 RENAME_EXCHANGE, as in a loop). The CLI must still read the directory it checked."""
    os.chown(nobody_dir, NOBODY, NOBODY)
    name = unique_fabric()
    real, evil = nobody_dir / "state", nobody_dir / "evil"
    real.mkdir(mode=0o700)
    evil.mkdir(mode=0o700)
    os.chown(evil, NOBODY, NOBODY)
    sleeper = subprocess.Popen([*AS_NOBODY, "sleep", "120"])
    try:
        (real / f"{name}.json").write_text(json.dumps({
            "kind": "shmfabric-manager", "fabric": name, "pid": os.getpid(), "start_time": _start_time(os.getpid()),
            "api": "http://127.0.0.1:1", "api_token_file": None}))
        wait_until(lambda: os.path.exists(f"/proc/{sleeper.pid}/stat") and _start_time(sleeper.pid), what="sleeper")
        evil_file = evil / f"{name}.json"
        evil_file.write_text(json.dumps({
            "kind": "shmfabric-manager", "fabric": name, "pid": sleeper.pid, "start_time": _start_time(sleeper.pid),
            "api": "http://127.0.0.1:2", "api_token_file": None}))
        os.chown(evil_file, NOBODY, NOBODY)
        real_ino = os.lstat(real).st_ino
        swapped: list[bool] = []
        orig_lstat, orig_fstat = os.lstat, os.fstat

        def after_check(st):
            import stat as stat_mod

            if not swapped and stat_mod.S_ISDIR(st.st_mode) and st.st_ino == real_ino:
                _exchange(real, evil)  # the attacker's move, right after the check
                swapped.append(True)
            return st

        monkeypatch.setenv("SHMFABRIC_STATE_DIR", str(real))
        monkeypatch.setattr(os, "lstat", lambda p, *a, **k: after_check(orig_lstat(p, *a, **k)))
        monkeypatch.setattr(os, "fstat", lambda fd: after_check(orig_fstat(fd)))
        try:
            st = mc._find_state(argparse.Namespace(fabric=None))
        finally:
            monkeypatch.setattr(os, "lstat", orig_lstat)
            monkeypatch.setattr(os, "fstat", orig_fstat)
            if swapped:
                _exchange(real, evil)
        assert swapped, "the directory was never checked"
        assert st["pid"] == os.getpid() and st["api"] == "http://127.0.0.1:1", st  # root's, not the swapped-in one
    finally:
        sleeper.kill()
        sleeper.wait()


@needs_root
@pytest.mark.parametrize("kind", ["other-owner", "group-writable", "other-writable", "symlink"])
def test_a_state_file_that_is_not_only_yours_is_not_trusted(tmp_path, kind):
    """A state file in your own state dir that another user owns or may write, or a symbolic link:
    skipped with a warning; named by --fabric, refused in one line; never signalled by `down`."""
    name = unique_fabric()
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        wait_until(lambda: os.path.exists(f"/proc/{victim.pid}/stat"), what="victim")
        content = json.dumps({"kind": "shmfabric-manager", "fabric": name, "pid": victim.pid,
                              "start_time": _start_time(victim.pid), "api": None})
        f = state / f"{name}.json"
        if kind == "symlink":
            target = tmp_path / "elsewhere.json"
            target.write_text(content)
            os.chmod(target, 0o600)
            f.symlink_to(target)
            problem = "is a symbolic link"
        else:
            f.write_text(content)
            os.chmod(f, {"other-owner": 0o600, "group-writable": 0o620, "other-writable": 0o602}[kind])
            if kind == "other-owner":
                os.chown(f, NOBODY, NOBODY)
            problem = {"other-owner": f"belongs to uid {NOBODY}, not to you (uid 0)",
                       "group-writable": "is writable by its group (mode 0620)",
                       "other-writable": "is writable by others (mode 0602)"}[kind]
        env = dict(os.environ, SHMFABRIC_STATE_DIR=str(state))
        p = cli(env, "status", check=False)
        assert p.returncode == 2 and "no running manager" in p.stderr, p.stderr
        assert f"warning: state file {f} {problem}: not trusted, skipped" in p.stderr, p.stderr
        for verb in (["status"], ["down", "--timeout", "3"]):
            p = cli(env, *verb, "--fabric", name, check=False)
            _one_line_error(p, f"state file {f} {problem}: not trusted")
        assert victim.poll() is None  # never signalled
        assert os.path.lexists(f)  # and left where it was
    finally:
        victim.kill()
        victim.wait()


# == 3. connections: a cap, and deadlines in all ==========================================================
def _handler_threads() -> int:
    return sum(1 for t in threading.enumerate() if "process_request_thread" in t.name)


def test_connections_are_capped_and_one_over_the_cap_is_not_served():
    """The cap's worth of token-less connections that send nothing: one more (with the token) is
    answered 503 (or closed) at once, not served; once they leave, requests are served again."""
    cap = getattr(api_mod, "MAX_CONNECTIONS", 64)
    # (the idle connections must outlast the test's own pace on a busy machine: a long header deadline)
    kw = {"header_timeout": 300.0} if "header_timeout" in inspect.signature(ApiServer).parameters else {}
    srv = ApiServer(FakeService(), "127.0.0.1:0", token=TOKEN, **kw).start()
    u = urlsplit(srv.url)
    idle: list[socket.socket] = []
    try:
        base = _handler_threads()
        for _ in range(cap):  # token-less clients that send nothing
            idle.append(socket.create_connection((u.hostname, u.port), timeout=30))
        wait_until(lambda: _handler_threads() >= base + cap, timeout=60, what=f"{cap} connections taken")
        try:
            code = request(srv, "GET", "/status", headers={"Authorization": f"Bearer {TOKEN}"})[0]
        except (OSError, http.client.HTTPException):
            code = None  # closed at once
        assert code in (503, None), code
        for s in idle:
            s.close()
        idle.clear()
        wait_until(lambda: _try_status(srv) == 200, timeout=60, what="a slot free again")
    finally:
        for s in idle:
            s.close()
        srv.close()


def _try_status(srv) -> int | None:
    try:
        return request(srv, "GET", "/status", headers={"Authorization": f"Bearer {TOKEN}"})[0]
    except (OSError, http.client.HTTPException):
        return None


def _trickle_until_closed(sock: socket.socket, data: bytes, every: float, limit: float) -> bytes | None:
    """Send `data` a byte every `every` s until the server closes the connection (-> what it answered)
    or `limit` s pass (-> None)."""
    end = time.monotonic() + limit
    i = 0
    while time.monotonic() < end:
        r, _, _ = select.select([sock], [], [], every)
        if r:
            try:
                answer = b""
                while True:
                    more = sock.recv(65536)
                    if not more:
                        return answer
                    answer += more
            except OSError:
                return answer
        try:
            sock.send(data[i % len(data):i % len(data) + 1])
        except OSError:
            return b""
        i += 1
    return None


def test_a_trickled_request_line_and_headers_are_cut_at_one_deadline():
    """One byte every 0.5 s (each read well within the per-read timeout): the server closes the
    connection at its header deadline (10 s) all the same, token or not."""
    svc = FakeService()
    srv = ApiServer(svc, "127.0.0.1:0", token=TOKEN).start()
    u = urlsplit(srv.url)
    try:
        s = socket.create_connection((u.hostname, u.port), timeout=30)
        try:
            answer = _trickle_until_closed(s, b"GET /status HTTP/1.1\r\nX-Slow: " + b"a" * 4000, 0.5, 90)
        finally:
            s.close()
        assert answer is not None, "still open after 90 s of trickling"
        assert svc.calls == []
    finally:
        srv.close()


def test_a_trickled_body_is_cut_at_one_deadline():
    svc = FakeService()
    srv = ApiServer(svc, "127.0.0.1:0", token=TOKEN, request_timeout=2.0).start()
    u = urlsplit(srv.url)
    try:
        s = socket.create_connection((u.hostname, u.port), timeout=30)
        try:
            s.sendall(f"POST /nodes/fw/scale HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                      "Content-Length: 200\r\n\r\n".encode())
            answer = _trickle_until_closed(s, b" ", 0.25, 60)
        finally:
            s.close()
        assert answer is not None and answer.startswith(b"HTTP/1.1 408"), answer
        assert svc.calls == []
    finally:
        srv.close()


# == 4. token files: no symbolic link, no directory another user could change ================================
def _token_in(d: Path, name: str = "api.token") -> Path:
    f = d / name
    f.write_text(TOKEN + "\n")
    os.chmod(f, 0o600)
    return f


def test_a_token_file_is_not_read_through_a_symbolic_link(tmp_path):
    real = _token_in(tmp_path, "real.token")
    link = tmp_path / "api.token"
    link.symlink_to(real)
    with pytest.raises(TokenFileError) as ei:
        load_token(str(link))
    assert str(ei.value).startswith(f"cannot read the API token file {link}: it is a symbolic link")
    assert "\n" not in str(ei.value)
    assert load_token(str(real)) == TOKEN


@pytest.mark.parametrize("mode,who", [(0o777, "its group and others"), (0o757, "others"), (0o775, "its group")])
def test_a_token_file_in_a_directory_others_may_write_is_refused(tmp_path, mode, who):
    d = tmp_path / "keys"
    d.mkdir()
    f = _token_in(d)
    os.chmod(d, mode)
    for call in (lambda: load_token(str(f)), lambda: load_token(str(f), check_owner=False),
                 lambda: ensure_token_file(str(d / "new.token"))):
        with pytest.raises(TokenFileError) as ei:
            call()
        msg = str(ei.value)
        assert f"its directory {d} is writable by {who} (mode {mode:04o})" in msg and f"chmod go-w {d}" in msg
        assert "\n" not in msg
    assert not (d / "new.token").exists()
    # an ancestor counts too; the sticky bit (as /tmp's) makes a directory safe
    inner = d / "inner"
    inner.mkdir(mode=0o700)
    g = _token_in(inner)
    with pytest.raises(TokenFileError, match=re.escape(f"the directory above it {d} is writable")):
        load_token(str(g))
    os.chmod(d, mode | 0o1000)
    assert load_token(str(f)) == TOKEN and load_token(str(g)) == TOKEN


@needs_root
def test_a_token_file_in_another_users_directory_is_refused(tmp_path):
    d = tmp_path / "keys"
    d.mkdir(mode=0o755)
    f = _token_in(d)
    os.chown(d, NOBODY, NOBODY)
    with pytest.raises(TokenFileError, match=re.escape(f"its directory {d} belongs to uid {NOBODY}") + ".*"
                       + re.escape(", not to uid 0 or root")):
        load_token(str(f))
    # a directory reached through a symbolic link is checked where it really is
    link = tmp_path / "link"
    link.symlink_to(d)
    with pytest.raises(TokenFileError, match=re.escape(f"its directory {d} belongs to uid {NOBODY}")):
        load_token(str(link / "api.token"))


@needs_root
def test_up_and_the_cli_refuse_a_token_file_another_user_can_choose(env, tmp_path, nobody_dir):  # noqa: F811
    """The review's case: token_file in a directory uid 65534 may write, where they made the path a
    symbolic link to a root-only file: `up` refuses in one line, nothing starts; the CLI refuses too."""
    shared = nobody_dir / "shared"
    shared.mkdir(mode=0o755)
    os.chown(shared, NOBODY, NOBODY)
    secret = _token_in(tmp_path, "rootsecret")
    subprocess.run([*AS_NOBODY, "ln", "-s", str(secret), str(shared / "edge.token")], check=True)
    name = unique_fabric()
    cfg = tmp_path / "t.yaml"
    from tests.manager.test_api_auth import TOPO

    cfg.write_text(TOPO.replace("FABRIC", name).replace("TOKEN_FILE", str(shared / "edge.token")))
    try:
        p = cli(env, "up", cfg, "--duration", "3", check=False)
        _one_line_error(p, f"API token file {shared / 'edge.token'}: its directory {shared} belongs to uid {NOBODY}")
        assert not region_path(name).exists()
        p = cli(env, "status", "--api", "http://127.0.0.1:1", "--api-token-file", shared / "edge.token", check=False)
        _one_line_error(p, f"its directory {shared} belongs to uid {NOBODY}", "(given by --api-token-file)")
    finally:
        Fabric.destroy(name)


# == 5. no proxy, no redirect =================================================================================
class _Recorder:
    """A TCP listener (thread) that records each request's first line and Authorization header and
    answers `answer` (bytes; format field {port})."""

    def __init__(self, host: str = "127.0.0.1", answer: bytes = b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0"
                 b"\r\nConnection: close\r\n\r\n"):
        self.sock = socket.socket()
        self.sock.bind((host, 0))
        self.sock.listen(10)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.answer, self.got, self._stop = answer, [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                c, _ = self.sock.accept()
            except socket.timeout:
                continue
            c.settimeout(10)
            data = b""
            try:
                while b"\r\n\r\n" not in data:
                    more = c.recv(65536)
                    if not more:
                        break
                    data += more
                lines = data.split(b"\r\n")
                self.got.append((lines[0], [x for x in lines if x.lower().startswith(b"authorization")]))
                c.sendall(self.answer)
            except OSError:
                pass
            c.close()

    def close(self) -> None:
        self._stop.set()
        self.thread.join(5)
        self.sock.close()


@pytest.fixture
def authed_srv():
    srv = ApiServer(FakeService(), "127.0.0.1:0", token=TOKEN).start()
    yield srv
    srv.close()


def _no_cached_opener(monkeypatch) -> None:
    """urllib.request.urlopen keeps the opener it built first (with the proxies of that moment)."""
    import urllib.request

    monkeypatch.setattr(urllib.request, "_opener", None)


def test_the_cli_ignores_http_proxy(authed_srv, monkeypatch):
    _no_cached_opener(monkeypatch)
    proxy = _Recorder()
    try:
        for var in ("no_proxy", "NO_PROXY"):
            monkeypatch.delenv(var, raising=False)
        for var in ("http_proxy", "HTTP_PROXY", "all_proxy"):
            monkeypatch.setenv(var, f"http://127.0.0.1:{proxy.port}")
        st = mc.api_call(authed_srv.url, "/status", token=TOKEN)
        assert st["fabric"] == "f"  # straight to the API
    finally:
        proxy.close()
    assert proxy.got == []


def test_the_cli_follows_no_redirect(monkeypatch):
    other = _Recorder(host="127.0.0.2")
    where = f"http://127.0.0.2:{other.port}/status"
    redirector = _Recorder(answer=(f"HTTP/1.1 302 Found\r\nLocation: {where}\r\nContent-Length: 0\r\n"
                                   "Connection: close\r\n\r\n").encode())
    _no_cached_opener(monkeypatch)
    try:
        for var in ("http_proxy", "HTTP_PROXY", "all_proxy"):
            monkeypatch.delenv(var, raising=False)
        with pytest.raises(CliError) as ei:
            mc.api_call(f"http://127.0.0.1:{redirector.port}", "/status", token=TOKEN)
        msg = str(ei.value)
        assert "redirect" in msg and where in msg and "\n" not in msg, msg
    finally:
        redirector.close()
        other.close()
    assert len(redirector.got) == 1 and other.got == []


# == 6. what comes before the 401 ===============================================================================
def test_a_token_followed_by_latin1_white_space_is_not_the_token(authed_srv):
    for tail in ("\xa0", "\x85", "\x1c"):
        code, _, err = request(authed_srv, "GET", "/status", headers={"Authorization": f"Bearer {TOKEN}{tail}"})
        assert code == 401 and err["error"].startswith("invalid bearer token"), (repr(tail), code)
    # HTTP's own white space (space, tab) around it is still fine
    assert request(authed_srv, "GET", "/status", headers={"Authorization": f"Bearer \t{TOKEN}\t "})[0] == 200


def _raw(srv, data: bytes) -> bytes:
    u = urlsplit(srv.url)
    with socket.create_connection((u.hostname, u.port), timeout=30) as s:
        s.sendall(data)
        return s.recv(65536)


def test_expect_100_continue_gets_the_401_first(authed_srv):
    answer = _raw(authed_srv, b"POST /nodes/fw/scale HTTP/1.1\r\nHost: x\r\nContent-Length: 17\r\n"
                              b"Expect: 100-continue\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 401 "), answer
    assert b"100 Continue" not in answer and b"WWW-Authenticate: Bearer" in answer
    # with the token, "100 Continue", then the answer
    answer = _raw(authed_srv, f"POST /nodes/fw/scale HTTP/1.1\r\nHost: x\r\nContent-Length: 17\r\nAuthorization: "
                              f"Bearer {TOKEN}\r\nExpect: 100-continue\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 100 Continue"), answer


def test_an_unknown_method_gets_the_401_first(authed_srv):
    code, hdrs, err = request(authed_srv, "FROB", "/status")
    assert code == 401 and hdrs["www-authenticate"].startswith("Bearer"), (code, err)
    code, _, err = request(authed_srv, "FROB", "/status", headers={"Authorization": f"Bearer {TOKEN}"})
    assert code == 501, (code, err)
