"""The management API (HTTP + JSON) and the Prometheus metrics of a running manager.

Endpoints (all answers are JSON objects; errors are `{"error": MESSAGE}` with a 4xx/5xx status):

| method | path                      | body                                            | answer                    |
|--------|---------------------------|-------------------------------------------------|---------------------------|
| GET    | /status                   |                                                 | whole status (see below)  |
| GET    | /nodes/{name}             |                                                 | one node with instances   |
| POST   | /reload                   | `{}` or `{"path": FILE}`                        | changes applied           |
| POST   | /nodes/{name}/config      | `{"config": {...}}`                             | the node                  |
| POST   | /nodes/{name}/scale       | `{"instances": N}`                              | the node                  |
| POST   | /nodes/{name}/replace     | `{"function"?, "config"?, "version"?}`          | the node + processed_by_old |
| POST   | /shutdown                 | `{}`                                            | `{"ok": true}` then stops |
| GET    | /metrics                  |                                                 | Prometheus text format    |

The server is `http.server.ThreadingHTTPServer` in a daemon thread: the manager's traffic is a
few requests a second, and the stdlib server keeps the manager free of an event loop. It binds
what the config says (loopback by default).

Authentication (opt-in: `api: {listen: HOST:PORT, token_file: PATH}`): with a token, every request
(GET /metrics and GET / included) needs `Authorization: Bearer TOKEN`; one without it, or with
another token, is answered 401 `{"error": ...}` with `WWW-Authenticate: Bearer realm="shmfabric"`
once its request line and headers are read, before its method, path or body are looked at (its
body is not read, `Expect: 100-continue` gets the 401 instead of "100 Continue", an unknown method
gets it instead of 501; the connection is closed), so nothing happens. Only what comes before the
headers can be parsed is answered without them: a malformed request line (400), a request line or
headers over the stdlib's limits (414, 431) and an unsupported HTTP version (505). The token is
compared with `hmac.compare_digest`. `load_token` reads a token file (its owner's only, like an ssh
key: one its group or others may read or write is refused, and so is one in a directory that
another user could change, see `check_token_dir`) and `ensure_token_file` creates a missing one
(0600, `secrets.token_urlsafe(32)`). Without a token the API is open to every local user who can
reach its address: do not expose it.

Resources a client holds before it authenticates (or after): at most MAX_CONNECTIONS connections
at once (one more is answered 503 and closed at once), and HEADER_TIMEOUT seconds in all for a
request line and its headers (also the wait for the next request on a kept-alive connection),
however slowly they trickle in; a body has REQUEST_TIMEOUT seconds in all.

Secrets: the service shows each node's `config` with its function's secret fields as "<redacted>"
(see shmfabric.manager.supervisor); error messages pass through the service's `redact_text`, when
it has one, so that a secret value quoted in one never leaves the manager.
"""
from __future__ import annotations

import errno
import hmac
import io
import json
import os
import re
import secrets
import socket
import stat
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterable, Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

__all__ = ["ManagerService", "ApiServer", "ManagerCollector", "make_registry", "MAX_BODY", "TokenFileError",
           "load_token", "ensure_token_file", "check_token_dir", "INSTANCE_LABEL", "MAX_CONNECTIONS",
           "HEADER_TIMEOUT"]

MAX_BODY = 1 << 20  # a config push is a few KiB; 1 MiB leaves room for large rule sets
# seconds in all that a request's body may take to arrive (and the bound of any one read or write): a
# client that sends a short body, or trickles it, does not hold a thread
REQUEST_TIMEOUT = 30.0
# seconds in all for a request line and its headers (from the connection's start, or from the end of the
# previous answer on a kept-alive connection), however slowly they trickle in: a client that sends one
# byte now and then, token or no token, does not hold a thread and an fd for ever
HEADER_TIMEOUT = 10.0
# connections served at once; one more is answered 503 and closed at once, so that clients (token or no
# token) cannot take every fd of the manager, which supervises its nodes with fds too
MAX_CONNECTIONS = 64
# the metrics label naming an instance (fw, fw-2, ...); not `instance`, which is Prometheus's own target
# label: a scraped `instance` label clashes with it and is renamed `exported_instance` (without honor_labels)
INSTANCE_LABEL = "node_instance"
TOKEN_MIN_LENGTH = 16  # characters of a token in a token file (a generated one has 43)
_TOKEN_MAX_BYTES = 4096
_TOKEN_RE = re.compile(r"[\x21-\x7e]+")  # visible ASCII, no spaces: what an Authorization header carries as is
_REALM = 'Bearer realm="shmfabric"'


class TokenFileError(Exception):
    """A token file that cannot be used; the message is one line naming the file and the fix."""


def _user(uid: int) -> str:
    try:
        import pwd

        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except (KeyError, ImportError):
        return f"uid {uid}"


def check_token_dir(path: str) -> None:
    """Refuse (TokenFileError, one line naming the directory and the fix) a token file `path` whose
    directory, or any directory above it, another user could change, as ssh's StrictModes does: one
    writable by its group or others without the sticky bit (/tmp, 1777, is fine), or owned by someone
    other than this user or root. There, another user could replace the file, or a symbolic link to it,
    and so choose the token (e.g. make root's manager take another root-only file for its token). The
    directories are those of the path as written (a symbolic link among them: the directory holding it)
    and those of the path with every link resolved. A directory that does not exist is left to the
    open that follows to report."""
    me = os.geteuid()
    absolute = os.path.abspath(path)
    seen: set[str] = set()
    chains = [(os.path.dirname(absolute), False), (os.path.dirname(os.path.realpath(absolute)), True)]
    for start, resolved in chains:
        d = start
        while True:
            if d not in seen:
                seen.add(d)
                try:
                    st = os.stat(d) if resolved else os.lstat(d)
                except OSError:
                    st = None
                if st is not None and stat.S_ISDIR(st.st_mode):
                    problem = fix = None
                    mode = stat.S_IMODE(st.st_mode)
                    if st.st_uid not in (me, 0):
                        problem = f"belongs to {_user(st.st_uid)}, not to uid {me} or root"
                        fix = (f"keep the token file in a directory only root and uid {me} may change "
                               "(e.g. /etc/shmfabric)")
                    elif mode & 0o022 and not mode & stat.S_ISVTX:
                        who = " and ".join(w for w, bits in (("its group", 0o020), ("others", 0o002)) if mode & bits)
                        problem, fix = f"is writable by {who} (mode {mode:04o})", f"chmod go-w {d}"
                    if problem:
                        where = "its directory" if d in (chains[0][0], chains[1][0]) else "the directory above it"
                        raise TokenFileError(f"API token file {path}: {where} {d} {problem}: another user could "
                                             f"replace the token; fix: {fix}")
            parent = os.path.dirname(d)
            if parent == d:
                break
            d = parent


def ensure_token_file(path: str) -> bool:
    """Create the token file `path` if it does not exist: mode 0600, holding `secrets.token_urlsafe(32)`
    and a newline. True if it was created. Never replaces a file (O_EXCL) nor follows a symbolic link
    planted at `path` (O_NOFOLLOW); its directory is not created, and one that another user could change
    is refused (`check_token_dir`). TokenFileError if it cannot be made."""
    check_token_dir(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return False
    except OSError as exc:
        raise TokenFileError(f"API token file {path}: cannot create it: {exc.strerror}; fix: create its directory, "
                             "or write a token into the file yourself (mode 0600)") from None
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        os.write(fd, (secrets.token_urlsafe(32) + "\n").encode())
    except OSError as exc:
        os.close(fd)
        try:
            os.unlink(path)
        except OSError:
            pass
        raise TokenFileError(f"API token file {path}: cannot write it: {exc.strerror}") from None
    os.close(fd)
    return True


def load_token(path: str, check_owner: bool = True) -> str:
    """The bearer token in the file `path`: one line of at least TOKEN_MIN_LENGTH visible ASCII characters
    (surrounding white space ignored). Refused (TokenFileError, one line naming the file) if it cannot be
    read, is a symbolic link (O_NOFOLLOW), is not a regular file, may be read or written by its group or
    others (like ssh refuses such a key: chmod 600 it), lies in a directory another user could change
    (`check_token_dir`), or, with `check_owner` (the manager), belongs to someone other than this user or
    root (its owner could change the token)."""
    check_token_dir(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW | getattr(os, "O_NOCTTY", 0))
    except OSError as exc:
        if exc.errno == errno.ELOOP and os.path.islink(path):
            raise TokenFileError(f"cannot read the API token file {path}: it is a symbolic link (not followed); "
                                 "fix: give the path of the file itself") from None
        raise TokenFileError(f"cannot read the API token file {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise TokenFileError(f"API token file {path}: not a regular file; fix: give a file holding the token")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            who = " and ".join(w for w, bits in (("its group", 0o070), ("others", 0o007)) if mode & bits)
            raise TokenFileError(f"API token file {path}: permissions {mode:04o} are too open (open to {who}); "
                                 f"it must be its owner's only: chmod 600 {path}")
        if check_owner and st.st_uid not in (os.geteuid(), 0):
            raise TokenFileError(f"API token file {path}: owned by uid {st.st_uid}, not by the manager's user "
                                 f"(uid {os.geteuid()}) or root, who could change the token; fix: chown it")
        raw = os.read(fd, _TOKEN_MAX_BYTES + 1)
    except OSError as exc:
        raise TokenFileError(f"cannot read the API token file {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(raw) > _TOKEN_MAX_BYTES:
        raise TokenFileError(f"API token file {path}: over {_TOKEN_MAX_BYTES} bytes, not a token file")
    try:
        token = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        token = None
    if not token:
        raise TokenFileError(f"API token file {path}: " + ("empty" if token == "" else "not ASCII text")
                             + "; fix: write a token into it (one line, e.g. from `python3 -c 'import secrets; "
                             "print(secrets.token_urlsafe(32))'`), or remove it and the manager makes one")
    if not _TOKEN_RE.fullmatch(token):
        raise TokenFileError(f"API token file {path}: the token must be one line of visible ASCII characters "
                             "without spaces")
    if len(token) < TOKEN_MIN_LENGTH:
        raise TokenFileError(f"API token file {path}: the token is shorter than {TOKEN_MIN_LENGTH} characters; "
                             "fix: use a longer one (a generated one has 43)")
    return token


class ManagerService(Protocol):
    """What the API drives (the Supervisor; tests use a fake)."""

    def status(self) -> dict: ...

    def node_status(self, name: str) -> dict: ...

    def reload_file(self, path: str | None = None) -> dict: ...

    def reconfigure(self, name: str, config: dict) -> dict: ...

    def scale(self, name: str, instances: int) -> dict: ...

    def replace(self, name: str, function: str | None = None, config: dict | None = None,
                version: str | None = None) -> dict: ...


_NODE_RE = re.compile(r"^/nodes/([^/]+)(?:/(config|scale|replace))?/?$")

_INST_COUNTERS = [("rx_frames", "frames received"), ("rx_bytes", "bytes received"), ("tx_frames", "frames sent"),
                  ("tx_bytes", "bytes sent"), ("tx_drops", "frames dropped on send"),
                  ("tx_ring_full", "sends refused by a full ring"), ("tx_nobuf", "sends refused by an empty pool"),
                  ("rx_bad", "ring entries skipped: they named no slot")]


class ManagerCollector:
    """Prometheus collector: every node, ring, pool and function counter, read at scrape time."""

    def __init__(self, service: ManagerService):
        self.service = service

    def collect(self) -> Iterable[Any]:
        st = self.service.status()
        lab = ["node", INSTANCE_LABEL, "function"]
        fams = {k: CounterMetricFamily(f"shmfabric_node_{k}", f"Node {help_}", labels=lab) for k, help_ in _INST_COUNTERS}
        depth = GaugeMetricFamily("shmfabric_node_queue_depth", "Frames waiting in the instance's input rings", labels=lab)
        up = GaugeMetricFamily("shmfabric_node_up", "1 if the instance is running", labels=lab + ["state"])
        restarts = CounterMetricFamily("shmfabric_node_restarts", "Restarts of the instance", labels=lab)
        cpu = CounterMetricFamily("shmfabric_node_cpu_seconds", "CPU time of the instance's process", labels=lab)
        fn = GaugeMetricFamily("shmfabric_function_counter", "Runtime and function counters of an instance (op stats)",
                               labels=lab + ["kind", "counter"])
        count = GaugeMetricFamily("shmfabric_node_instances", "Instances of a logical node", labels=["node"])
        for node in st.get("nodes", []):
            count.add_metric([node["name"]], len(node["instances"]))
            for inst in node["instances"]:
                values = [node["name"], inst["name"], inst["function"]]
                for k, _ in _INST_COUNTERS:
                    fams[k].add_metric(values, inst.get(k) or 0)
                depth.add_metric(values, inst.get("queue_depth") or 0)
                up.add_metric(values + [inst["state"]], 1 if inst["state"] == "running" else 0)
                restarts.add_metric(values, inst.get("restarts") or 0)
                if inst.get("cpu_seconds") is not None:
                    cpu.add_metric(values, inst["cpu_seconds"])
                for group in ("counters", "function_counters"):
                    for cname, v in sorted((inst.get(group) or {}).items()):
                        if isinstance(v, (int, float)) and not isinstance(v, bool):
                            fn.add_metric(values + ["runtime" if group == "counters" else "function", cname], v)
        yield from fams.values()
        yield from (depth, up, restarts, cpu, fn, count)
        rl = ["src", "dst"]
        rdepth = GaugeMetricFamily("shmfabric_ring_depth", "Descriptors waiting in a ring", labels=rl)
        renq = CounterMetricFamily("shmfabric_ring_enqueued", "Descriptors ever written to a ring", labels=rl)
        rdeq = CounterMetricFamily("shmfabric_ring_dequeued", "Descriptors ever read from a ring", labels=rl)
        rfull = CounterMetricFamily("shmfabric_ring_full_events", "Writes refused because the ring was full", labels=rl)
        for r in st.get("rings", []):
            v = [r["src"], r["dst"]]
            rdepth.add_metric(v, r["depth"])
            renq.add_metric(v, r["enqueued"])
            rdeq.add_metric(v, r["dequeued"])
            rfull.add_metric(v, r["full_events"])
        yield from (rdepth, renq, rdeq, rfull)
        pl = ["network"]
        pfree = GaugeMetricFamily("shmfabric_pool_free_slots", "Free slots in a network's pool", labels=pl)
        ptotal = GaugeMetricFamily("shmfabric_pool_slots", "Slots in a network's pool", labels=pl)
        porph = GaugeMetricFamily("shmfabric_pool_orphaned_slots", "Slots held by no live node", labels=pl)
        for p in st.get("pools", []):
            v = [str(p["network"])]
            pfree.add_metric(v, p["free"])
            ptotal.add_metric(v, p["total"])
            porph.add_metric(v, p["orphaned"])
        yield from (pfree, ptotal, porph)
        chain = CounterMetricFamily("shmfabric_chain_delivered_frames", "Frames received by a chain's last step",
                                    labels=["chain"])
        for c in st.get("chains", []):
            chain.add_metric([c["name"]], c["delivered_frames"])
        yield chain


def make_registry(service: ManagerService) -> CollectorRegistry:
    """A registry holding only the manager's collector (no process/platform collectors of the manager)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(ManagerCollector(service))
    return reg


class _DeadlineReader(io.RawIOBase):
    """The reading side of a connection (socket.SocketIO underneath) with a deadline for a whole part of
    a request (`deadline`, time.monotonic(); None: none): each read waits at most what is left of it, and
    one past it raises TimeoutError, however many bytes came before. The socket's own timeout (the bound
    of one read or write) is put back after each read."""

    def __init__(self, sock: socket.socket, raw: io.RawIOBase, timeout: float):
        super().__init__()
        self._sock, self._raw, self._timeout = sock, raw, timeout
        self.deadline: float | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int | None:  # type: ignore[override]
        if self.deadline is None:
            return self._raw.readinto(b)
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request took too long to arrive")
        self._sock.settimeout(min(left, self._timeout))
        try:
            return self._raw.readinto(b)
        finally:
            try:
                self._sock.settimeout(self._timeout)
            except OSError:
                pass

    def close(self) -> None:
        if not self.closed:
            try:
                self._raw.close()
            finally:
                super().close()


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        self.timeout = getattr(self.server, "request_timeout", REQUEST_TIMEOUT)  # applied by setup()
        super().setup()
        # the request line and headers, then the body, each within a deadline (see _DeadlineReader)
        self.rfile.close()
        self._reader = _DeadlineReader(self.connection, self.connection.makefile("rb", buffering=0), self.timeout)
        self.rfile = io.BufferedReader(self._reader)

    def handle_one_request(self) -> None:
        # a request line and its headers (or, kept alive, the wait for the next request) within
        # HEADER_TIMEOUT in all; the body gets its own deadline (_body); writes keep the per-call timeout
        self._reader.deadline = time.monotonic() + getattr(self.server, "header_timeout", HEADER_TIMEOUT)
        try:
            super().handle_one_request()
        finally:
            self._reader.deadline = None

    def handle_expect_100(self) -> bool:
        """`Expect: 100-continue`: with a token, the 401 comes first (a client is not invited to send
        a body it may not send)."""
        if self.server.token is not None:
            try:
                self._authenticate(self.server.token)
            except _HttpError as exc:
                self._json(exc.status, {"error": str(exc)}, dict(exc.headers))
                return False
        return super().handle_expect_100()

    def __getattr__(self, name: str) -> Any:
        # a method that is no endpoint's (`do_` + any other request method): with a token, 401 first;
        # authenticated, 501 as the stdlib server answers it
        if name.startswith("do_") and name[3:] and name not in ("do_GET", "do_POST", "do_PUT", "do_DELETE",
                                                                 "do_PATCH", "do_OPTIONS", "do_HEAD"):
            return lambda: self._unknown_method(name[3:])
        raise AttributeError(name)

    def _unknown_method(self, method: str) -> None:
        if self.server.token is not None:
            try:
                self._authenticate(self.server.token)
            except _HttpError as exc:
                self._json(exc.status, {"error": str(exc)}, dict(exc.headers))
                return
        self.close_connection = True
        self._json(501, {"error": f"method {method!r} is not supported; see GET /"})

    def log_message(self, fmt: str, *args: Any) -> None:  # quiet: the manager logs its own events
        pass

    def _send(self, status: int, body: bytes, ctype: str = "application/json",
              headers: dict[str, str] | None = None) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":  # a HEAD answer has the headers of the body, not the body
                self.wfile.write(body)
        except (ConnectionError, TimeoutError):  # the client went away: nothing to tell it
            self.close_connection = True

    def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, (json.dumps(obj, default=str) + "\n").encode(), headers=headers)

    def _body(self) -> dict:
        raw_len = (self.headers.get("Content-Length") or "0").strip()
        if not raw_len.isdigit():
            self.close_connection = True  # the body's end is unknown: this connection cannot carry another
            raise _HttpError(400, f"Content-Length {raw_len!r} is not a byte count (0 or more)")
        n = int(raw_len)
        if n > MAX_BODY:
            self.close_connection = True  # the unread body would be taken for the next request
            raise _HttpError(413, f"request body over {MAX_BODY} bytes")
        self._reader.deadline = time.monotonic() + self.timeout  # the whole body, however it trickles in
        try:
            raw = self.rfile.read(n) if n else b""
        except (ConnectionError, TimeoutError):
            self.close_connection = True
            raise _HttpError(408, f"the request body ({n} bytes by its Content-Length) did not arrive in time") from None
        finally:
            self._reader.deadline = None
        if len(raw) < n:
            self.close_connection = True
            raise _HttpError(400, f"the request body ended after {len(raw)} of the {n} bytes of its Content-Length")
        if not raw.strip():
            return {}
        try:
            obj = json.loads(raw)
        except ValueError as exc:
            raise _HttpError(400, f"body is not JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise _HttpError(400, "body must be a JSON object")
        return obj

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_OPTIONS(self) -> None:
        self._dispatch("OPTIONS")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def _dispatch(self, method: str) -> None:
        from shmfabric.manager.supervisor import SupervisorError

        path = self.path.split("?", 1)[0]
        svc = self.server.service
        try:
            if self.server.token is not None:
                self._authenticate(self.server.token)
            if self.headers.get("Transfer-Encoding") is not None:
                # a chunked body is not read here: its bytes would be taken for the next request
                self.close_connection = True
                raise _HttpError(411, "send the request body with a Content-Length (Transfer-Encoding is not "
                                      "supported)")
            if method == "GET" and path in ("/status", "/status/"):
                return self._json(200, svc.status())
            if method == "GET" and path == "/metrics":
                return self._send(200, generate_latest(self.server.registry), "text/plain; version=0.0.4")
            if method == "GET" and path == "/":
                return self._json(200, {"endpoints": ["GET /status", "GET /nodes/{name}", "POST /reload",
                                                      "POST /nodes/{name}/config", "POST /nodes/{name}/scale",
                                                      "POST /nodes/{name}/replace", "POST /shutdown", "GET /metrics"]})
            if method == "POST" and path == "/reload":
                body = self._body()
                extra = set(body) - {"path"}
                if extra:
                    raise _HttpError(400, f"unknown field(s) {sorted(extra)}; use path")
                p = body.get("path")
                if p is not None and (not isinstance(p, str) or not p.strip()):
                    raise _HttpError(400, "`path` must be a file path (a non-empty string); leave it out to "
                                          "reload the file last loaded")
                if p is not None:
                    _check_reload_path(p, getattr(svc, "source", None))
                return self._json(200, {"ok": True, "changes": svc.reload_file(p)})
            if method == "POST" and path == "/shutdown":
                self._body()
                # signal first, reply second: the callback only sets an event, and a caller that
                # got its 200 may rely on the shutdown being under way
                if self.server.on_shutdown:
                    self.server.on_shutdown()
                self._json(200, {"ok": True})
                return
            m = _NODE_RE.match(path)
            if m:
                name, verb = m.group(1), m.group(2)
                if method == "GET" and verb is None:
                    return self._json(200, svc.node_status(name))
                if method == "POST" and verb == "config":
                    body = self._body()
                    extra = set(body) - {"config"}
                    if extra:
                        raise _HttpError(400, f"unknown field(s) {sorted(extra)}; use config")
                    if not isinstance(body.get("config"), dict):
                        raise _HttpError(400, 'body must be {"config": {...}}')
                    return self._json(200, svc.reconfigure(name, body["config"]))
                if method == "POST" and verb == "scale":
                    body = self._body()
                    extra = set(body) - {"instances"}
                    if extra:
                        raise _HttpError(400, f"unknown field(s) {sorted(extra)}; use instances")
                    n = body.get("instances")
                    if not isinstance(n, int) or isinstance(n, bool):
                        raise _HttpError(400, 'body must be {"instances": N} with an integer N')
                    return self._json(200, svc.scale(name, n))
                if method == "POST" and verb == "replace":
                    body = self._body()
                    extra = set(body) - {"function", "config", "version"}
                    if extra:
                        raise _HttpError(400, f"unknown field(s) {sorted(extra)}; use function, config, version")
                    if body.get("config") is not None and not isinstance(body["config"], dict):
                        raise _HttpError(400, "`config` must be an object")
                    for key in ("function", "version"):
                        v = body.get(key)
                        if v is not None and (not isinstance(v, str) or not v):
                            raise _HttpError(400, f"`{key}` must be a non-empty string, got {json.dumps(v)}")
                    return self._json(200, svc.replace(name, body.get("function"), body.get("config"),
                                                       body.get("version")))
            m = _NODE_RE.match(path)
            if path in ("/", "/status", "/status/", "/metrics") or (m and m.group(2) is None):
                allowed = "GET"
            elif path in ("/reload", "/shutdown") or m:
                allowed = "POST"
            else:
                allowed = None
            raise _HttpError(405 if allowed else 404, f"{method} {path} is not an endpoint"
                             + (f" (use {allowed})" if allowed else "; see GET /"), allow=allowed)
        except _HttpError as exc:
            headers = dict(exc.headers)
            if exc.allow:
                headers["Allow"] = exc.allow
            self._json(exc.status, {"error": self._redact(str(exc))}, headers or None)
        except SupervisorError as exc:
            self._json(exc.status, {"error": self._redact(str(exc))})
        except Exception as exc:  # a bug must not kill the API thread; say what happened
            self._json(500, {"error": self._redact(f"{type(exc).__name__}: {exc}")})

    def _authenticate(self, token: str) -> None:
        """Raise 401 unless the request carries `Authorization: Bearer TOKEN` (one such header). Checked
        before anything else: the body of a refused request is not read, and its connection is closed."""
        values = self.headers.get_all("Authorization") or []
        # white space is HTTP's (space, tab), not str.strip()'s: "TOKEN\xa0" is not the token
        scheme, _, credentials = (values[0].strip(" \t") if len(values) == 1 else "").partition(" ")
        credentials = credentials.strip(" \t")
        if scheme.lower() != "bearer" or not credentials:
            self.close_connection = True
            raise _HttpError(401, "authentication required: send `Authorization: Bearer TOKEN`, TOKEN being the "
                                  "content of the manager's api.token_file (the shmfabric CLI sends it: see "
                                  "--api-token-file)", headers={"WWW-Authenticate": _REALM})
        if not hmac.compare_digest(credentials.encode("latin-1", "replace"), token.encode("ascii")):
            self.close_connection = True
            raise _HttpError(401, "invalid bearer token: it is not the token of the manager's api.token_file",
                             headers={"WWW-Authenticate": _REALM + ', error="invalid_token"'})

    def _redact(self, text: str) -> str:
        """`text` without the secret values the service knows (its `redact_text`, if it has one)."""
        redact = getattr(self.server.service, "redact_text", None)
        if redact is None:
            return text
        try:
            return redact(text)
        except Exception:
            return text


class _HttpError(Exception):
    def __init__(self, status: int, message: str, allow: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.allow = allow
        self.headers = headers or {}


def _check_reload_path(path: str, current: str | None) -> None:
    """Over the API (which any local user can reach), `POST /reload {"path": FILE}` names the file last
    loaded, or a file owned by the manager's user: the manager does not read a file another user owns
    on anyone's word. (What it reads is bounded and checked by `load_topology`, whose errors quote
    nothing of a file that is not a topology.) A path that cannot be read is left to `load_topology`
    to report."""
    try:
        if current and os.path.samefile(path, current):
            return
        st = os.stat(path)
    except (OSError, ValueError):
        return
    if st.st_uid != os.geteuid():
        raise _HttpError(403, f"{path}: owned by uid {st.st_uid}, not by the manager's user (uid {os.geteuid()}); "
                              "over the API a reload may name the file last loaded or a file of the manager's "
                              "user; fix: give the file to that user, or reload the file last loaded")


_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
         b"Retry-After: 1\r\nConnection: close\r\n\r\n%s")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    service: ManagerService
    registry: CollectorRegistry
    on_shutdown: Callable[[], None] | None
    request_timeout: float = REQUEST_TIMEOUT
    header_timeout: float = HEADER_TIMEOUT
    token: str | None = None  # with a token, every request needs `Authorization: Bearer TOKEN`
    max_connections: int = MAX_CONNECTIONS
    _slots: threading.BoundedSemaphore

    def process_request(self, request: Any, client_address: Any) -> None:
        """One thread per connection, at most `max_connections` at once: one more is answered 503 (a
        write that does not wait) and closed, before anything of it is read."""
        if not self._slots.acquire(blocking=False):
            body = (json.dumps({"error": f"the management API is busy ({self.max_connections} connections); "
                                         "try again"}) + "\n").encode()
            try:
                request.setblocking(False)
                request.send(_BUSY % (len(body), body))
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()  # no thread to release it
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away (reset, broken pipe, timed out) is not an error of the manager's:
        no traceback in its log. Anything else is reported as the standard server does."""
        import sys

        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)


class ApiServer:
    """The management API on HOST:PORT (port 0: any free port) served from a daemon thread. With `token`
    (see `load_token`), every request needs `Authorization: Bearer TOKEN`. At most `max_connections`
    connections at once; a request line and its headers within `header_timeout` seconds in all, a body
    within `request_timeout`."""

    def __init__(self, service: ManagerService, address: str = "127.0.0.1:0",
                 on_shutdown: Callable[[], None] | None = None, registry: CollectorRegistry | None = None,
                 request_timeout: float = REQUEST_TIMEOUT, token: str | None = None,
                 header_timeout: float = HEADER_TIMEOUT, max_connections: int = MAX_CONNECTIONS):
        if token is not None and not (_TOKEN_RE.fullmatch(token) and len(token) >= TOKEN_MIN_LENGTH):
            raise ValueError(f"an API token is at least {TOKEN_MIN_LENGTH} visible ASCII characters without spaces")
        host, _, port = address.rpartition(":")
        host = host.strip("[]")
        self._srv = _Server((host, int(port)), _Handler)
        self._srv.service = service
        self._srv.registry = registry or make_registry(service)
        self._srv.on_shutdown = on_shutdown
        self._srv.request_timeout = request_timeout
        self._srv.header_timeout = header_timeout
        self._srv.max_connections = max_connections
        self._srv._slots = threading.BoundedSemaphore(max_connections)
        self._srv.token = token
        self._thread = threading.Thread(target=self._srv.serve_forever, name="shmfabric-api", daemon=True)

    @property
    def address(self) -> str:
        host, port = self._srv.server_address[:2]
        return f"{host}:{port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def start(self) -> "ApiServer":
        self._thread.start()
        return self

    def close(self) -> None:
        self._srv.shutdown()
        self._srv.server_close()
        self._thread.join(5)
