"""HTTP scenarios of `shmfabric bench splice`: the splicer against HAProxy, side by side.

Scenario 1 (`unequal`): two echo backends (separate processes), one answers at once, the other
after 50 ms, each serving one request at a time per connection. `wrk` with 8 connections (one
per wrk thread, so the Lua script can check order per connection) sends pipelines of 16
requests alternating `/fast` and `/slow`. Every response carries the request's `X-Seq` back;
the script counts responses out of request order. In the same run, with the same proxy
processes, a second row (`unequal-depth1`) puts the same 128 requests in flight without
pipelining: 128 keep-alive connections (16 per wrk thread), one request at a time each, so the
share of the first row's ratio that comes from HTTP pipelining shows. Its order is not checked
(one request in flight per connection cannot be answered out of order).

Scenario 2 (`uniform`): two nginx backends (worker_processes 1 each) answering a small static
body; the same wrk pipelines alternate `/a` and `/b`, both routed to both servers.

Scenario 2 logged (`logged`, opt-in): scenario 2 with both proxies doing what a production
deployment does: each adds `X-Forwarded-For` to every request and appends one access-log line per
request (splicer `forwarded_for` / `access_log: "-"` through a YAML `--config`; HAProxy
`option forwardfor`, `option httplog`, `log stdout format raw`). Both get the same sink: their
standard output is a pipe read by a `cat >> FILE` process of their own (a pipe is what
HAProxy's manual has `log stdout` written to: to a file its writes block, which its manual
reserves for debugging). After each run the log lines are counted against the requests wrk
completed (HAProxy's DroppedLogs counter is read too: it drops a line when the pipe is full),
and one request to an nginx location echoing `$http_x_forwarded_for` shows what the backends
received.

Scenario 2 over TLS (`tls`, opt-in): scenario 2 with both proxies terminating TLS on their
listening port with the same self-signed EC P-256 certificate (made in the temporary directory
at the start; splicer `--tls-cert/--tls-key`, HAProxy `bind ... ssl crt <cert+key PEM> alpn
http/1.1`); wrk speaks https. A probe connection through each proxy records the negotiated
protocol, cipher and ALPN (verifying the certificate), and how many of a few sequential
reconnects resumed their session.

TLS handshakes (`tls-handshake`, opt-in): the same setup, but every request on a new connection:
the wrk script sends each request alone with `Connection: close`, so requests/s are connections/s.
The script counts the responses carrying `Connection: close` (wrk reconnects after each); HAProxy's
stats socket gives the connections it accepted and how many TLS sessions were new or resumed
(wrk resumes: OpenSSL's client keeps the last session of each connection and offers it again).

Both peers get the same number of worker processes (splicer `--workers N` with SO_REUSEPORT,
HAProxy `nbthread N`) and the same routing. Each row is measured in `rounds` rounds whose peer
order alternates (two rounds: splicer, HAProxy, HAProxy, splicer; the next row starts with the
other peer); each peer is started afresh for each round and warmed up for a second. A row
reports the median requests/s of each peer, its ratio, and every run's figures (`runs`) and the
ratio of each round. The helpers here (nginx config, wrk script, process start/stop) are also
used by the tests.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from shmfabric import programs

__all__ = [
    "WRK_PIPELINE_LUA", "free_port", "wait_port", "nginx_config", "haproxy_config", "start_nginx", "start_haproxy",
    "start_echo_backend", "start_splicer", "run_wrk", "WrkResult", "ScenarioResult", "run_scenarios",
    "missing_tools", "count_lines", "http_get_body", "WRK_CONNECTIONS", "WRK_DEPTH", "NGINX_SCENARIOS",
    "TLS_SCENARIOS", "make_self_signed_cert", "tls_probe", "haproxy_stats", "haproxy_info", "log_sink", "LOG_SINK",
    "UNPIPELINED",
]

# wrk Lua: pipelines of DEPTH requests cycling over PATHS, each with X-Seq; with one connection
# per wrk thread the per-thread counters are per-connection, so order is checked exactly
# (wrk sends the next pipeline of a connection only after every response of the last one).
WRK_PIPELINE_LUA = r"""
local threads = {}
function setup(thread) table.insert(threads, thread) end

local paths, depth, close, check = {}, 16, false, true
sent, expected, checked, bad, non2xx, closed = 0, 0, 0, 0, 0, 0  -- globals: done() reads them with thread:get()
function init(args)
  for p in string.gmatch(args[1] or "/", "[^,]+") do table.insert(paths, p) end
  depth = tonumber(args[2] or "16")
  for i = 3, #args do
    -- "close": each request asks for its connection to be closed after it; "nocheck": several
    -- connections per thread, whose responses interleave, so order cannot be checked here
    if args[i] == "close" then close = true elseif args[i] == "nocheck" then check = false end
  end
end
function request()
  local reqs = {}
  for i = 1, depth do
    local p = paths[(sent % #paths) + 1]
    local h = {["X-Seq"] = tostring(sent)}
    if close then h["Connection"] = "close" end
    reqs[i] = wrk.format("GET", p, h)
    sent = sent + 1
  end
  return table.concat(reqs)
end
-- wrk may call request() and drop its result (it does so once per thread at start), so a
-- pipeline may begin at any multiple of depth above the last one; inside a pipeline every
-- response must carry exactly the previous sequence number + 1.
last = -1
function response(status, headers, body)
  local s = tonumber(headers["X-Seq"] or headers["x-seq"])
  if not check then
  elseif expected % depth == 0 then
    if s == nil or s % depth ~= 0 or s <= last then bad = bad + 1 end
  elseif s ~= last + 1 then
    bad = bad + 1
  end
  if check then checked = checked + 1 end
  if s ~= nil then last = s end
  if status < 200 or status > 299 then non2xx = non2xx + 1 end
  local c = headers["Connection"] or headers["connection"]
  if c ~= nil and string.lower(c) == "close" then closed = closed + 1 end  -- wrk reconnects after it
  expected = expected + 1
end
function done(summary, latency, requests)
  local b, n, e, c = 0, 0, 0, 0
  for _, t in ipairs(threads) do
    b = b + t:get("bad"); n = n + t:get("checked"); e = e + t:get("non2xx"); c = c + t:get("closed")
  end
  io.write(string.format("ORDER checked=%d out_of_order=%d non2xx=%d closed=%d\n", n, b, e, c))
end
"""


def missing_tools(*names: str) -> list[str]:
    """The named executables found neither on PATH nor in the sbin directories (shmfabric.programs)."""
    return programs.missing(*names)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (the usual bind-to-0 trick; tiny race accepted)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0, proc: subprocess.Popen | None = None) -> None:
    """Wait until 127.0.0.1:port accepts connections (fail early if `proc` exits)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}: {err.strip()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


_NGINX_XFF_ECHO = """
    location = /xff {
      default_type text/plain;
      return 200 "$http_x_forwarded_for";
    }
    location = /fwd {
      default_type text/plain;
      return 200 "$http_forwarded";
    }"""


def nginx_config(tmp: Path, port: int, name: str = "nginx", xff_echo: bool = False) -> str:
    """An nginx.conf for one worker on 127.0.0.1:port; `/` answers a short text echoing X-Seq,
    `/echo` returns the request body (proxied to nginx itself is not needed: uses $request_body).
    With `xff_echo`, `/xff` and `/fwd` (those paths exactly) answer the X-Forwarded-For and the
    Forwarded header they received."""
    xff = _NGINX_XFF_ECHO if xff_echo else ""
    return f"""
worker_processes 1;
daemon off;
pid {tmp}/nginx-{port}.pid;
error_log {tmp}/nginx-{port}.err warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/body-{port};
  proxy_temp_path {tmp}/proxy-{port};
  fastcgi_temp_path {tmp}/fcgi-{port};
  uwsgi_temp_path {tmp}/uwsgi-{port};
  scgi_temp_path {tmp}/scgi-{port};
  keepalive_requests 1000000;
  keepalive_timeout 300s;
  server {{
    listen 127.0.0.1:{port} reuseport;
    location / {{
      add_header X-Seq $http_x_seq always;
      add_header X-Backend {name} always;
      default_type text/plain;
      return 200 "{name} $request_uri\\n";
    }}
    location /static/ {{
      alias {tmp}/static/;
      add_header X-Seq $http_x_seq always;
    }}{xff}
  }}
}}
"""


def haproxy_config(port: int, routes: Sequence[tuple[str, Sequence[str]]], default: Sequence[str],
                   threads: int = 1, *, forwardfor: bool = False, log_stdout: bool = False,
                   tls_pem: Path | None = None, stats_socket: Path | None = None) -> str:
    """HAProxy config routing path prefixes like the splicer's --route (same backends).

    `forwardfor`: add X-Forwarded-For to each request (`option forwardfor`). `log_stdout`: one
    HTTP log line per request (`option httplog`), written raw to HAProxy's standard output (no
    syslog needed; make that a pipe, see `log_sink`). `tls_pem`: terminate TLS on the port with
    that PEM file (certificate and key in one file), TLS 1.2 and 1.3 with OpenSSL's default ciphers and ALPN http/1.1, as the
    splicer's `tls:` does. `stats_socket`: a stats socket (UNIX) at that path."""
    lines = ["global", f"  nbthread {threads}", "  maxconn 4000"]
    if log_stdout:
        lines.append("  log stdout format raw local0")
    if stats_socket is not None:
        lines.append(f"  stats socket {stats_socket} mode 600 level user")
    if tls_pem is not None:
        lines.append("  ssl-default-bind-options ssl-min-ver TLSv1.2")
    lines += ["defaults", "  mode http", "  timeout connect 5s", "  timeout client 60s", "  timeout server 60s",
              "  option http-keep-alive", "  http-reuse always"]
    if log_stdout:
        lines += ["  log global", "  option httplog"]
    if forwardfor:
        lines.append("  option forwardfor")
    lines += ["frontend fe", f"  bind 127.0.0.1:{port}" + (f" ssl crt {tls_pem} alpn http/1.1" if tls_pem else "")]
    backends = []
    for i, (prefix, servers) in enumerate(routes):
        lines.append(f"  acl r{i} path_beg {prefix}")
        lines.append(f"  use_backend b{i} if r{i}")
        backends.append((f"b{i}", servers))
    lines.append("  default_backend bdefault")
    backends.append(("bdefault", default))
    for name, servers in backends:
        lines += [f"backend {name}", "  balance roundrobin"]
        lines += [f"  server s{j} {addr}" for j, addr in enumerate(servers)]
    return "\n".join(lines) + "\n"


def _popen(args: list[str], stdout=subprocess.DEVNULL, **kw) -> subprocess.Popen:
    return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.PIPE,
                            start_new_session=True, **kw)


def _stop(proc: subprocess.Popen) -> None:
    """Stop a process we started (its own session/group: the splicer's workers go too)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(5)
    if proc.stderr:
        proc.stderr.close()


@contextmanager
def start_nginx(tmp: Path, name: str = "nginx", xff_echo: bool = False) -> Iterator[int]:
    """Run nginx (one worker) on a free port; yields the port (`xff_echo`: see nginx_config)."""
    port = free_port()
    (tmp / "static").mkdir(exist_ok=True)
    conf = tmp / f"nginx-{port}.conf"
    conf.write_text(nginx_config(tmp, port, name, xff_echo))
    nginx = programs.find("nginx") or "nginx"  # /usr/sbin/nginx: not on a normal user's PATH
    proc = _popen([nginx, "-c", str(conf), "-p", str(tmp), "-e", str(tmp / f"nginx-{port}.err")])
    try:
        wait_port(port, proc=proc)
        yield port
    finally:
        _stop(proc)


#: What the `logged` scenario gives each proxy to write its access log to (printed with its rows).
LOG_SINK = "stdout -> pipe -> own `cat >> file`"


@contextmanager
def log_sink(path: Path) -> Iterator[int]:
    """A pipe whose reader is a `cat` appending to `path` (started here, in its own session);
    yields the pipe's write end, to be a proxy's standard output. On exit our copy of the write
    end is closed and `cat` is waited for: once the proxy has stopped too, it reads to the end of
    the pipe and exits, so every line the proxy wrote is in the file."""
    r, w = os.pipe()
    with open(path, "ab") as out:
        cat = subprocess.Popen(["cat"], stdin=r, stdout=out, stderr=subprocess.DEVNULL, start_new_session=True)
    os.close(r)
    try:
        yield w
    finally:
        os.close(w)
        try:
            cat.wait(15)
        except subprocess.TimeoutExpired:  # a writer still holds the pipe: do not hang the bench
            cat.kill()
            cat.wait(5)


@contextmanager
def start_haproxy(tmp: Path, routes: Sequence[tuple[str, Sequence[str]]], default: Sequence[str],
                  threads: int = 1, *, forwardfor: bool = False, log_stdout: int | None = None,
                  tls_pem: Path | None = None, stats_socket: Path | None = None) -> Iterator[int]:
    """Run HAProxy with the given routing on a free port; yields the port. `forwardfor` adds
    X-Forwarded-For to requests; `log_stdout` (a file descriptor: a `log_sink`'s pipe) becomes
    HAProxy's standard output, where it writes one HTTP log line per request; `tls_pem`,
    `stats_socket`: see haproxy_config."""
    port = free_port()
    conf = tmp / f"haproxy-{port}.cfg"
    conf.write_text(haproxy_config(port, routes, default, threads, forwardfor=forwardfor,
                                   log_stdout=log_stdout is not None, tls_pem=tls_pem, stats_socket=stats_socket))
    proc = _popen([programs.find("haproxy") or "haproxy", "-db", "-f", str(conf)],
                  stdout=subprocess.DEVNULL if log_stdout is None else log_stdout)
    try:
        wait_port(port, proc=proc)
        yield port
    finally:
        _stop(proc)


def _py_env() -> dict[str, str]:
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2])  # .../src, so children import this very tree
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


@contextmanager
def start_echo_backend(delay_ms: float, name: str) -> Iterator[int]:
    """Run an EchoBackend in its own process; yields the port."""
    port = free_port()
    proc = _popen([sys.executable, "-m", "shmfabric.bench.http_backend", str(port), str(delay_ms), name],
                  env=_py_env())
    try:
        wait_port(port, proc=proc)
        yield port
    finally:
        _stop(proc)


@contextmanager
def start_splicer(args: Sequence[str], stdout: int | None = None) -> Iterator[int]:
    """Run `shmfabric splice http ARGS --listen 127.0.0.1:PORT`; yields the port. `stdout`: a file
    descriptor for its standard output (an `access_log: "-"` goes there), else /dev/null."""
    port = free_port()
    code = "import sys; from shmfabric.cli.main import main; sys.exit(main(sys.argv[1:]))"
    proc = _popen([sys.executable, "-c", code, "splice", "http", "--listen", f"127.0.0.1:{port}", *args],
                  stdout=subprocess.DEVNULL if stdout is None else stdout, env=_py_env())
    try:
        wait_port(port, timeout=20, proc=proc)
        yield port
    finally:
        _stop(proc)


@dataclass
class WrkResult:
    requests_per_s: float
    requests: int
    checked: int
    out_of_order: int | None  # None: not checked (several connections per wrk thread)
    non2xx: int
    socket_errors: int
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    closed: int = 0  # responses carrying `Connection: close` (wrk reconnects after each)
    raw: str = field(default="", repr=False)


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    if not m:
        return float("nan")
    v = float(m.group(1))
    return v / 1000 if m.group(2) == "us" else v * 1000 if m.group(2) == "s" else v


def run_wrk(port: int, paths: Sequence[str], *, connections: int = 8, depth: int = 16, duration: float = 3.0,
            timeout_s: int = 5, scheme: str = "http", close: bool = False, threads: int | None = None) -> WrkResult:
    """wrk with one connection per thread and the pipelining, order-checking script (`scheme`
    https: over TLS, without checking the certificate, as wrk does). `close`: every request
    carries `Connection: close` (use depth 1), so wrk opens a new connection for each.
    `threads` fewer than `connections`: several connections per wrk thread, whose responses the
    script cannot tell apart, so order is not checked (out_of_order None; use depth 1)."""
    threads = connections if threads is None else threads
    check = threads == connections
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(WRK_PIPELINE_LUA)
        script = f.name
    try:
        out = subprocess.run(
            [programs.find("wrk") or "wrk", "-t", str(threads), "-c", str(connections),
             "-d", f"{max(1, round(duration))}s",
             "--timeout", f"{timeout_s}s", "--latency", "-s", script, f"{scheme}://127.0.0.1:{port}",
             "--", ",".join(paths), str(depth), *(["close"] if close else []), *([] if check else ["nocheck"])],
            capture_output=True, text=True, timeout=duration + 30)
    finally:
        os.unlink(script)
    text = out.stdout + out.stderr
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    total = re.search(r"(\d+) requests in", text)
    order = re.search(r"ORDER checked=(\d+) out_of_order=(\d+) non2xx=(\d+) closed=(\d+)", text)
    errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if not rps or not total or not order:
        raise RuntimeError(f"could not read wrk's output:\n{text}")
    p50 = re.search(r"\n\s+50%\s+(\S+)", text)
    p99 = re.search(r"\n\s+99%\s+(\S+)", text)
    # wrk times a call of the script's request(), which sends a whole pipeline, against the
    # first response: with pipelining its percentiles come out as 0.00us and mean nothing.
    # Those are reported as unknown (None), not as a latency of 0.
    p50_ms = _ms(p50.group(1)) if p50 else None
    p99_ms = _ms(p99.group(1)) if p99 else None
    if not p99_ms:
        p50_ms = p99_ms = None
    return WrkResult(float(rps.group(1)), int(total.group(1)), int(order.group(1)),
                     int(order.group(2)) if check else None,
                     int(order.group(3)), sum(int(x) for x in errs.groups()) if errs else 0,
                     p50_ms, p99_ms, int(order.group(4)), raw=text)


# wrk's shape in every scenario: this many connections, each with a pipeline of WRK_DEPTH requests;
# so at most WRK_CONNECTIONS * WRK_DEPTH requests are in flight when wrk stops.
WRK_CONNECTIONS, WRK_DEPTH = 8, 16


@dataclass
class ScenarioResult:
    """One row: `splicer` and `haproxy` hold each peer's median requests/s over its runs, the
    counts summed over them, and the runs themselves (`runs`, each with its `position` in the
    row's sequence of runs); `ratio` is of the medians, `run_ratios` the ratio of each round."""
    scenario: str
    workers: int
    splicer: dict
    haproxy: dict
    ratio: float
    target: float | None  # None: no target (the tls-handshake rows, the unequal-depth1 row)
    pipeline: int = 1  # requests pipelined per pooled backend connection (the splicer's --pipeline)
    connections: int = WRK_CONNECTIONS  # wrk's connections ...
    depth: int = WRK_DEPTH  # ... and requests pipelined on each
    run_ratios: list = field(default_factory=list)
    order: list = field(default_factory=list)  # the peers in the order they ran
    pool: int | None = None  # the splicer's pool max per backend server (HAProxy has no such cap here)

    @property
    def met(self) -> bool | None:
        """The target, met only by a clean run of the splicer: every checked response in request
        order, none other than 2xx, no socket error (a fast wrong answer is no result)."""
        if self.target is None:
            return None
        s = self.splicer
        clean = not s.get("out_of_order") and not s.get("non2xx") and not s.get("socket_errors")
        return bool(clean and self.ratio >= self.target)


def count_lines(path: Path) -> int:
    """Newline-terminated lines in `path` (0 if it does not exist)."""
    try:
        with open(path, "rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    except FileNotFoundError:
        return 0


def http_get_body(port: int, path: str, timeout: float = 10.0) -> str:
    """GET http://127.0.0.1:port/path on a fresh connection; the body as text (any status)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        return conn.getresponse().read().decode(errors="replace")
    finally:
        conn.close()


def make_self_signed_cert(folder: Path, name: str = "bench") -> tuple[Path, Path, Path]:
    """A self-signed EC P-256 certificate for 127.0.0.1 and localhost (valid two days) and its
    unencrypted key: (cert.pem, key.pem, cert+key.pem), the last for HAProxy's `crt`."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    paths = folder / f"{name}.crt", folder / f"{name}.key", folder / f"{name}.pem"
    for path, data in zip(paths, (cert_pem, key_pem, cert_pem + key_pem)):
        path.write_bytes(data)
        path.chmod(0o600)
    return paths


def tls_probe(port: int, cert: Path, path: str = "/a", reconnects: int = 10, timeout: float = 10.0) -> dict:
    """GET https://localhost:port/path with Python's ssl, verifying the proxy presents `cert`;
    then `reconnects` more requests, each on a new connection offering the previous one's
    session, as wrk does. Returns the negotiated protocol, cipher, ALPN, the first answer's status
    and body, and how many of the reconnects resumed their session."""
    import ssl

    ctx = ssl.create_default_context(cafile=str(cert))
    ctx.set_alpn_protocols(["http/1.1"])
    out: dict = {"resumed": 0, "reconnects": reconnects}
    session = None
    for i in range(reconnects + 1):
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
            t = ctx.wrap_socket(raw, server_hostname="localhost", session=session)
            try:
                t.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
                data = b""
                while chunk := t.recv(65536):
                    data += chunk
                if i == 0:
                    out.update(version=t.version(), cipher=t.cipher()[0], alpn=t.selected_alpn_protocol(),
                               status=int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.") else None,
                               body=data.partition(b"\r\n\r\n")[2].decode(errors="replace").strip())
                else:
                    out["resumed"] += t.session_reused
                session = t.session  # after the answer: TLS 1.3 tickets come after the handshake
                try:
                    t.unwrap()  # our close_notify: OpenSSL keeps a session only if it was shut down
                except (OSError, ssl.SSLError):
                    pass
            finally:
                t.close()
    return out


def stats_command(sock_path: Path, command: bytes) -> str:
    """`command` on HAProxy's stats socket (a UNIX stream socket, a new connection): its answer."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(sock_path))
        s.sendall(command + b"\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data.decode()


def haproxy_info(sock_path: Path) -> dict[str, str]:
    """HAProxy's `show info` (process-wide: e.g. DroppedLogs, the log lines it could not write)."""
    return dict(line.split(": ", 1) for line in stats_command(sock_path, b"show info").splitlines() if ": " in line)


def haproxy_stats(sock_path: Path) -> dict[str, int]:
    """The frontend's counters from HAProxy's stats socket: connections accepted (`conn_tot`),
    requests, and TLS sessions new (`ssl_sess`, a full handshake) and resumed (`ssl_reused_sess`)."""
    data = stats_command(sock_path, b"show stat")
    lines = data.splitlines()
    names = lines[0].lstrip("# ").split(",")
    for line in lines[1:]:
        row = dict(zip(names, line.split(",")))
        if row.get("pxname") == "fe" and row.get("svname") == "FRONTEND":
            return {k: int(row.get(k) or 0) for k in ("conn_tot", "req_tot", "ssl_sess", "ssl_reused_sess",
                                                      "ssl_failed_handshake")}
    raise RuntimeError(f"no FRONTEND row in HAProxy's stats:\n{data[:2000]}")


def _splicer_yaml(path: Path, routes: Sequence[tuple[str, Sequence[str]]], default: Sequence[str], pool: int,
                  workers: int, pipeline: int, access_log: str) -> Path:
    """The YAML `--config` of the `logged` scenario: the same routing, pool, workers and health
    settings as the flags scenario 2 passes, plus X-Forwarded-For and an access log (a path, or
    "-": standard output)."""
    import yaml

    http = {
        "routes": [{"prefix": p, "backends": list(s)} for p, s in routes],
        "default": list(default),
        "pool": {"min": min(8, pool), "max": pool, "pipeline": pipeline},
        "workers": workers,
        "health": {"enabled": False},
        "forwarded_for": True,
        "access_log": access_log,
        "access_log_format": "text",
    }
    path.write_text(yaml.safe_dump({"http": http}, sort_keys=False))
    return path


#: The unequal scenario's second row: the same WRK_CONNECTIONS * WRK_DEPTH requests in flight as
#: that many keep-alive connections without pipelining (WRK_CONNECTIONS wrk threads all the same).
UNPIPELINED = "unequal-depth1"


def _combine(runs: list[dict]) -> dict:
    """A peer's figures over its runs: median requests/s (and latency), counts summed; the runs
    themselves under `runs`."""
    import statistics

    out: dict = {"requests_per_s": statistics.median(r["requests_per_s"] for r in runs)}
    for k in ("requests", "checked", "non2xx", "socket_errors", "closed"):
        out[k] = sum(r[k] for r in runs)
    ooo = [r["out_of_order"] for r in runs]
    out["out_of_order"] = None if None in ooo else sum(ooo)
    for k in ("latency_p50_ms", "latency_p99_ms"):
        v = [r[k] for r in runs]
        out[k] = None if None in v else statistics.median(v)
    first = runs[0]
    if "tls" in first:
        out["tls"] = first["tls"]  # the first run's probe; every run's is in runs
        for k in ("connections", "tls_full", "tls_resumed"):
            out[k] = None if first[k] is None else sum(r[k] for r in runs)
    if "log_lines" in first:
        for k in ("log_lines", "in_flight_max"):
            out[k] = sum(r[k] for r in runs)
        out["dropped_logs"] = None if first["dropped_logs"] is None else sum(r["dropped_logs"] for r in runs)
        out["xff_echo"] = " | ".join(sorted({r["xff_echo"] for r in runs}))
        out["log_sink"] = first["log_sink"]
    out["runs"] = runs
    return out


def _one(kind: str, workers: int, duration: float, pool: int, tmp: Path, pipeline: int = 1, rounds: int = 2,
         first: int = 0) -> list[ScenarioResult]:
    """The rows of one scenario at one worker count: `rounds` rounds of both peers, in alternating
    order (the splicer first in rounds where first + round is even)."""
    logged = kind == "logged"
    tls = kind in TLS_SCENARIOS
    handshake = kind == "tls-handshake"
    with ExitStack() as stack:
        if kind == "unequal":
            fast = stack.enter_context(start_echo_backend(0, "fast"))
            slow = stack.enter_context(start_echo_backend(50, "slow"))
            routes = [("/slow", [f"127.0.0.1:{slow}"])]
            default = [f"127.0.0.1:{fast}"]
            paths, target = ["/fast", "/slow"], 5.0
        else:
            n1 = stack.enter_context(start_nginx(tmp, "n1", xff_echo=logged))
            n2 = stack.enter_context(start_nginx(tmp, "n2", xff_echo=logged))
            routes = []
            default = [f"127.0.0.1:{n1}", f"127.0.0.1:{n2}"]
            paths, target = ["/a", "/b"], (None if handshake else 0.5)
        if tls:
            cert, key, pem = make_self_signed_cert(tmp, f"bench-{kind}-w{workers}")
        # The rows measured on each start of a peer: (row, target, wrk connections, depth, wrk
        # threads, Connection: close). Each request alone on its own connection (tls-handshake) or
        # pipelines of WRK_DEPTH; the unequal scenario adds the same load without pipelining.
        if handshake:
            shapes = [(kind, target, WRK_CONNECTIONS, 1, WRK_CONNECTIONS, True)]
        else:
            shapes = [(kind, target, WRK_CONNECTIONS, WRK_DEPTH, WRK_CONNECTIONS, False)]
        if kind == "unequal":
            shapes.append((UNPIPELINED, None, WRK_CONNECTIONS * WRK_DEPTH, 1, WRK_CONNECTIONS, False))
        scheme = "https" if tls else "http"
        logs = {"splicer": tmp / f"splicer-access-w{workers}.log", "haproxy": tmp / f"haproxy-access-w{workers}.log"}
        if logged:
            for f in logs.values():
                f.unlink(missing_ok=True)
            split_args = ["--config", str(_splicer_yaml(tmp / f"splicer-logged-w{workers}.yaml", routes, default,
                                                        pool, workers, pipeline, "-"))]
        else:
            split_args = [f"--route={p}={','.join(s)}" for p, s in routes] + [
                "--default", ",".join(default), "--pool", str(pool), "--pool-min", "8", "--workers", str(workers),
                "--no-health", "--pipeline", str(pipeline)]
            if tls:
                split_args += ["--tls-cert", str(cert), "--tls-key", str(key)]
        order: list[str] = []
        for r in range(rounds):
            order += ["splicer", "haproxy"] if (first + r) % 2 == 0 else ["haproxy", "splicer"]
        runs: dict[str, dict[str, list[dict]]] = {row[0]: {"splicer": [], "haproxy": []} for row in shapes}
        for position, peer in enumerate(order, 1):
            stats_sock = tmp / f"haproxy-{kind}-w{workers}-{position}.sock"
            measured: list[dict] = []
            with ExitStack() as run:
                # logged: the proxy's standard output is a pipe to a `cat >> log` of its own, which
                # has read every line once this block is left (proxy stopped, then cat done)
                out = run.enter_context(log_sink(logs[peer])) if logged else None
                if peer == "splicer":
                    cm = start_splicer(split_args, stdout=out)
                elif logged:
                    cm = start_haproxy(tmp, routes, default, workers, forwardfor=True, log_stdout=out,
                                       stats_socket=stats_sock)
                elif tls:
                    cm = start_haproxy(tmp, routes, default, workers, tls_pem=pem, stats_socket=stats_sock)
                else:
                    cm = start_haproxy(tmp, routes, default, workers)
                port = run.enter_context(cm)
                for row, _, conns, depth, threads, close in shapes:
                    xff = probe = stats = dropped = None
                    wrk_kw = dict(connections=conns, depth=depth, scheme=scheme, close=close, threads=threads)
                    run_wrk(port, paths, duration=1, **wrk_kw)  # warm-up: pools fill
                    if tls:
                        # through the proxy to nginx over TLS, verifying the certificate: what was negotiated
                        probe = tls_probe(port, cert, paths[0])
                        if peer == "haproxy":
                            stats = haproxy_stats(stats_sock)
                    if logged:
                        # what nginx received, on a pool connection the warm-up has used
                        xff = http_get_body(port, "/xff")
                        time.sleep(0.3)  # the warm-up's last log lines land before the count starts
                        before = count_lines(logs[peer])
                        if peer == "haproxy":
                            dropped = int(haproxy_info(stats_sock).get("DroppedLogs", 0))
                    res = run_wrk(port, paths, duration=duration, **wrk_kw)
                    if stats is not None:  # HAProxy's counters over the measured run only
                        after = haproxy_stats(stats_sock)
                        stats = {k: after[k] - stats[k] for k in after}
                    if dropped is not None:
                        dropped = int(haproxy_info(stats_sock).get("DroppedLogs", 0)) - dropped
                    d = asdict(res)
                    d.pop("raw")
                    d["position"] = position
                    if tls:
                        d["tls"] = probe
                        # what the proxy counted during the measured run (HAProxy only; None for the splicer)
                        d["connections"] = stats["conn_tot"] if stats else None
                        d["tls_full"] = stats["ssl_sess"] if stats else None
                        d["tls_resumed"] = stats["ssl_reused_sess"] if stats else None
                    if logged:
                        d["log_lines"] = before  # minus the count after the proxy stopped, below
                        d["in_flight_max"] = conns * depth
                        d["xff_echo"] = xff
                        # HAProxy's count of the lines it could not write (the pipe was full); the
                        # splicer holds them for the reader (up to 1 MiB): see log_lines instead
                        d["dropped_logs"] = dropped
                        d["log_sink"] = LOG_SINK
                    runs[row][peer].append(d)
                    measured.append(d)
            if logged:
                # counted after the proxy stopped and its cat read the pipe to the end: the
                # measured run's lines only (the warm-up's were counted before it)
                for d in measured:
                    d["log_lines"] = count_lines(logs[peer]) - d["log_lines"]
    out = []
    for row, row_target, conns, depth, _, _ in shapes:
        s, h = _combine(runs[row]["splicer"]), _combine(runs[row]["haproxy"])
        ratios = [a["requests_per_s"] / b["requests_per_s"] if b["requests_per_s"] else float("inf")
                  for a, b in zip(runs[row]["splicer"], runs[row]["haproxy"])]
        sr, hr = s["requests_per_s"], h["requests_per_s"]
        out.append(ScenarioResult(row, workers, s, h, sr / hr if hr else float("inf"), row_target, pipeline, conns,
                                  depth, ratios, list(order), pool))
    return out


TLS_SCENARIOS = ("tls", "tls-handshake")
NGINX_SCENARIOS = ("uniform", "logged", *TLS_SCENARIOS)


def run_scenarios(scenarios: Sequence[str] = ("unequal", "uniform"), workers: Sequence[int] = (1, 2),
                  duration: float = 3.0, pool: int = 64, pipeline: int = 1, rounds: int = 2) -> list[ScenarioResult]:
    """Run each scenario for each worker count, same backends for both peers: `rounds` rounds
    each, the peers' order alternating within a row (A B B A) and from row to row."""
    if rounds < 1:
        raise ValueError("rounds must be at least 1")
    need = missing_tools("wrk", "haproxy", *(["nginx"] if set(NGINX_SCENARIOS) & set(scenarios) else []))
    if need:
        raise RuntimeError(programs.not_found(*need, fix="install the Debian packages as root: make debs"))
    out: list[ScenarioResult] = []
    n = 0
    with tempfile.TemporaryDirectory(prefix="shmfabric-bench-splice-") as tmp:
        for kind in scenarios:
            for w in workers:
                # the 50 ms backend serves one request per connection at a time: never pipeline to it
                out += _one(kind, w, duration, pool, Path(tmp), pipeline if kind in NGINX_SCENARIOS else 1, rounds,
                            first=n)
                n += 1
    return out
