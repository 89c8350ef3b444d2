"""HTTP scenarios of `shmfabric bench splice`: the splicer against HAProxy, side by side.

Scenario 1 (`unequal`): two echo backends (separate processes), one answers at once, the other
after 50 ms, each serving one request at a time per connection. `wrk` with 8 connections (one
per wrk thread, so the Lua script can check order per connection) sends pipelines of 16
requests alternating `/fast` and `/slow`. Every response carries the request's `X-Seq` back;
the script counts responses out of request order.

Scenario 2 (`uniform`): two nginx backends (worker_processes 1 each) answering a small static
body; the same wrk pipelines alternate `/a` and `/b`, both routed to both servers.

Scenario 2 logged (`logged`, opt-in): scenario 2 with both proxies doing what a production
deployment does: each adds `X-Forwarded-For` to every request and appends one access-log line per
request to a file (splicer `forwarded_for` / `access_log` through a YAML `--config`; HAProxy
`option forwardfor`, `option httplog`, `log stdout format raw` with its stdout sent to a file).
After each run the log lines are counted against the requests wrk completed, and one request to
an nginx location echoing `$http_x_forwarded_for` shows what the backends received.

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
HAProxy `nbthread N`) and the same routing. The helpers here (nginx config, wrk script, process
start/stop) are also used by the tests.
"""
from __future__ import annotations

import os
import re
import shutil
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

__all__ = [
    "WRK_PIPELINE_LUA", "free_port", "wait_port", "nginx_config", "haproxy_config", "start_nginx", "start_haproxy",
    "start_echo_backend", "start_splicer", "run_wrk", "WrkResult", "ScenarioResult", "run_scenarios",
    "missing_tools", "count_lines", "http_get_body", "WRK_CONNECTIONS", "WRK_DEPTH", "NGINX_SCENARIOS",
    "TLS_SCENARIOS", "make_self_signed_cert", "tls_probe", "haproxy_stats",
]

# wrk Lua: pipelines of DEPTH requests cycling over PATHS, each with X-Seq; with one connection
# per wrk thread the per-thread counters are per-connection, so order is checked exactly
# (wrk sends the next pipeline of a connection only after every response of the last one).
WRK_PIPELINE_LUA = r"""
local threads = {}
function setup(thread) table.insert(threads, thread) end

local paths, depth, close = {}, 16, false
sent, expected, bad, non2xx, closed = 0, 0, 0, 0, 0  -- globals: done() reads them with thread:get()
function init(args)
  for p in string.gmatch(args[1] or "/", "[^,]+") do table.insert(paths, p) end
  depth = tonumber(args[2] or "16")
  close = args[3] == "close"  -- each request asks for its connection to be closed after it
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
  if expected % depth == 0 then
    if s == nil or s % depth ~= 0 or s <= last then bad = bad + 1 end
  elseif s ~= last + 1 then
    bad = bad + 1
  end
  if s ~= nil then last = s end
  if status < 200 or status > 299 then non2xx = non2xx + 1 end
  local c = headers["Connection"] or headers["connection"]
  if c ~= nil and string.lower(c) == "close" then closed = closed + 1 end  -- wrk reconnects after it
  expected = expected + 1
end
function done(summary, latency, requests)
  local b, n, e, c = 0, 0, 0, 0
  for _, t in ipairs(threads) do
    b = b + t:get("bad"); n = n + t:get("expected"); e = e + t:get("non2xx"); c = c + t:get("closed")
  end
  io.write(string.format("ORDER checked=%d out_of_order=%d non2xx=%d closed=%d\n", n, b, e, c))
end
"""


def missing_tools(*names: str) -> list[str]:
    """The named executables not found on PATH."""
    return [n for n in names if shutil.which(n) is None]


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
    syslog needed). `tls_pem`: terminate TLS on the port with that PEM file (certificate and key
    in one file), TLS 1.2 and 1.3 with OpenSSL's default ciphers and ALPN http/1.1, as the
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
    proc = _popen(["nginx", "-c", str(conf), "-p", str(tmp), "-e", str(tmp / f"nginx-{port}.err")])
    try:
        wait_port(port, proc=proc)
        yield port
    finally:
        _stop(proc)


@contextmanager
def start_haproxy(tmp: Path, routes: Sequence[tuple[str, Sequence[str]]], default: Sequence[str],
                  threads: int = 1, *, forwardfor: bool = False, log_to: Path | None = None,
                  tls_pem: Path | None = None, stats_socket: Path | None = None) -> Iterator[int]:
    """Run HAProxy with the given routing on a free port; yields the port. `forwardfor` adds
    X-Forwarded-For to requests; `log_to` appends one HTTP log line per request to that file
    (HAProxy's standard output, opened O_APPEND); `tls_pem`, `stats_socket`: see haproxy_config."""
    port = free_port()
    conf = tmp / f"haproxy-{port}.cfg"
    conf.write_text(haproxy_config(port, routes, default, threads, forwardfor=forwardfor,
                                   log_stdout=log_to is not None, tls_pem=tls_pem, stats_socket=stats_socket))
    with ExitStack() as files:
        out = files.enter_context(open(log_to, "ab")) if log_to is not None else subprocess.DEVNULL
        proc = _popen(["haproxy", "-db", "-f", str(conf)], stdout=out)
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
def start_splicer(args: Sequence[str]) -> Iterator[int]:
    """Run `shmfabric splice http ARGS --listen 127.0.0.1:PORT`; yields the port."""
    port = free_port()
    code = "import sys; from shmfabric.cli.main import main; sys.exit(main(sys.argv[1:]))"
    proc = _popen([sys.executable, "-c", code, "splice", "http", "--listen", f"127.0.0.1:{port}", *args],
                  env=_py_env())
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
    out_of_order: int
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
            timeout_s: int = 5, scheme: str = "http", close: bool = False) -> WrkResult:
    """wrk with one connection per thread and the pipelining, order-checking script (`scheme`
    https: over TLS, without checking the certificate, as wrk does). `close`: every request
    carries `Connection: close` (use depth 1), so wrk opens a new connection for each."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(WRK_PIPELINE_LUA)
        script = f.name
    try:
        out = subprocess.run(
            ["wrk", "-t", str(connections), "-c", str(connections), "-d", f"{max(1, round(duration))}s",
             "--timeout", f"{timeout_s}s", "--latency", "-s", script, f"{scheme}://127.0.0.1:{port}",
             "--", ",".join(paths), str(depth), *(["close"] if close else [])],
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
    return WrkResult(float(rps.group(1)), int(total.group(1)), int(order.group(1)), int(order.group(2)),
                     int(order.group(3)), sum(int(x) for x in errs.groups()) if errs else 0,
                     p50_ms, p99_ms, int(order.group(4)), raw=text)


@dataclass
class ScenarioResult:
    scenario: str
    workers: int
    splicer: dict
    haproxy: dict
    ratio: float
    target: float | None  # None: no target (the tls-handshake rows)
    pipeline: int = 1

    @property
    def met(self) -> bool | None:
        return None if self.target is None else self.ratio >= self.target


# wrk's shape in every scenario: this many connections, each with a pipeline of WRK_DEPTH requests;
# so at most WRK_CONNECTIONS * WRK_DEPTH requests are in flight when wrk stops.
WRK_CONNECTIONS, WRK_DEPTH = 8, 16


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


def haproxy_stats(sock_path: Path) -> dict[str, int]:
    """The frontend's counters from HAProxy's stats socket: connections accepted (`conn_tot`),
    requests, and TLS sessions new (`ssl_sess`, a full handshake) and resumed (`ssl_reused_sess`)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(sock_path))
        s.sendall(b"show stat\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    lines = data.decode().splitlines()
    names = lines[0].lstrip("# ").split(",")
    for line in lines[1:]:
        row = dict(zip(names, line.split(",")))
        if row.get("pxname") == "fe" and row.get("svname") == "FRONTEND":
            return {k: int(row.get(k) or 0) for k in ("conn_tot", "req_tot", "ssl_sess", "ssl_reused_sess",
                                                      "ssl_failed_handshake")}
    raise RuntimeError(f"no FRONTEND row in HAProxy's stats:\n{data.decode()[:2000]}")


def _splicer_yaml(path: Path, routes: Sequence[tuple[str, Sequence[str]]], default: Sequence[str], pool: int,
                  workers: int, pipeline: int, access_log: Path) -> Path:
    """The YAML `--config` of the `logged` scenario: the same routing, pool, workers and health
    settings as the flags scenario 2 passes, plus X-Forwarded-For and an access log."""
    import yaml

    http = {
        "routes": [{"prefix": p, "backends": list(s)} for p, s in routes],
        "default": list(default),
        "pool": {"min": min(8, pool), "max": pool, "pipeline": pipeline},
        "workers": workers,
        "health": {"enabled": False},
        "forwarded_for": True,
        "access_log": str(access_log),
        "access_log_format": "text",
    }
    path.write_text(yaml.safe_dump({"http": http}, sort_keys=False))
    return path


def _one(kind: str, workers: int, duration: float, pool: int, tmp: Path, pipeline: int = 1) -> ScenarioResult:
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
        # each request alone, on its own connection (Connection: close) or pipelines of WRK_DEPTH
        depth, close = (1, True) if handshake else (WRK_DEPTH, False)
        scheme = "https" if tls else "http"
        stats_sock = tmp / f"haproxy-{kind}-w{workers}.sock"
        logs = {"splicer": tmp / f"splicer-access-w{workers}.log", "haproxy": tmp / f"haproxy-access-w{workers}.log"}
        if logged:
            for f in logs.values():
                f.unlink(missing_ok=True)
            split_args = ["--config", str(_splicer_yaml(tmp / f"splicer-logged-w{workers}.yaml", routes, default,
                                                        pool, workers, pipeline, logs["splicer"]))]
        else:
            split_args = [f"--route={p}={','.join(s)}" for p, s in routes] + [
                "--default", ",".join(default), "--pool", str(pool), "--pool-min", "8", "--workers", str(workers),
                "--no-health", "--pipeline", str(pipeline)]
            if tls:
                split_args += ["--tls-cert", str(cert), "--tls-key", str(key)]
        results = {}
        for peer in ("splicer", "haproxy"):
            if peer == "splicer":
                cm = start_splicer(split_args)
            elif logged:
                cm = start_haproxy(tmp, routes, default, workers, forwardfor=True, log_to=logs["haproxy"])
            elif tls:
                cm = start_haproxy(tmp, routes, default, workers, tls_pem=pem, stats_socket=stats_sock)
            else:
                cm = start_haproxy(tmp, routes, default, workers)
            xff = probe = stats = None
            wrk_kw = dict(connections=WRK_CONNECTIONS, depth=depth, scheme=scheme, close=close)
            with cm as port:
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
                r = run_wrk(port, paths, duration=duration, **wrk_kw)
                if stats is not None:  # HAProxy's counters over the measured run only
                    after = haproxy_stats(stats_sock)
                    stats = {k: after[k] - stats[k] for k in after}
            d = asdict(r)
            d.pop("raw")
            if tls:
                d["tls"] = probe
                # what the proxy counted during the measured run (HAProxy only; None for the splicer)
                d["connections"] = stats["conn_tot"] if stats else None
                d["tls_full"] = stats["ssl_sess"] if stats else None
                d["tls_resumed"] = stats["ssl_reused_sess"] if stats else None
            if logged:
                # counted after the proxy stopped (and flushed): the measured run's lines only
                d["log_lines"] = count_lines(logs[peer]) - before
                d["in_flight_max"] = WRK_CONNECTIONS * WRK_DEPTH
                d["xff_echo"] = xff
            results[peer] = d
    s, h = results["splicer"]["requests_per_s"], results["haproxy"]["requests_per_s"]
    return ScenarioResult(kind, workers, results["splicer"], results["haproxy"], s / h if h else float("inf"), target,
                          pipeline)


TLS_SCENARIOS = ("tls", "tls-handshake")
NGINX_SCENARIOS = ("uniform", "logged", *TLS_SCENARIOS)


def run_scenarios(scenarios: Sequence[str] = ("unequal", "uniform"), workers: Sequence[int] = (1, 2),
                  duration: float = 3.0, pool: int = 64, pipeline: int = 1) -> list[ScenarioResult]:
    """Run each scenario for each worker count; splicer first, then HAProxy, same backends."""
    need = missing_tools("wrk", "haproxy", *(["nginx"] if set(NGINX_SCENARIOS) & set(scenarios) else []))
    if need:
        raise RuntimeError(f"missing tools: {', '.join(need)} (install the Debian packages: make debs)")
    out = []
    with tempfile.TemporaryDirectory(prefix="shmfabric-bench-splice-") as tmp:
        for kind in scenarios:
            for w in workers:
                # the 50 ms backend serves one request per connection at a time: never pipeline to it
                out.append(_one(kind, w, duration, pool, Path(tmp), pipeline if kind in NGINX_SCENARIOS else 1))
    return out
