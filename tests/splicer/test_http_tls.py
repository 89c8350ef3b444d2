"""TLS termination in the HTTP splicer (`tls:`, `--tls-cert/--tls-key`).

Certificates are made by the test with `cryptography`; clients are Python's ssl, curl and wrk.
No test asserts a duration: waits are bounded loops with a deadline.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from shmfabric.bench.splice_http import _py_env, free_port, run_wrk, start_echo_backend
from shmfabric.splicer.config import TlsConfig
from shmfabric.splicer.tls import TlsError, server_context

from .test_http_access_log import HeadRecorder, _fields, _Splicer, need
from .test_http_proxy import Env, get, read_replies, run, wait_for

pytestmark = pytest.mark.timeout(90)


def make_cert(folder: Path, name: str = "site", days: int = 30, expired: bool = False,
              passphrase: bytes | None = None) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost, and its key: (cert.pem, key.pem)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    start, end = (now - dt.timedelta(days=10), now - dt.timedelta(days=1)) if expired else (
        now - dt.timedelta(minutes=5), now + dt.timedelta(days=days))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    enc = (serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption())
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc))
    return cert_path, key_path


def client_context(cert: Path, alpn: list[str] | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(cert))
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


# -- the context and its errors ----------------------------------------------------------------
def test_bad_certificates_and_keys_are_refused_with_the_file_and_the_fix(tmp_path):
    cert, key = make_cert(tmp_path)
    other_cert, other_key = make_cert(tmp_path, "other")
    _, enc_key = make_cert(tmp_path, "enc", passphrase=b"secret")
    cases = [
        (TlsConfig(cert=str(tmp_path / "missing.crt"), key=str(key)), "does not exist"),
        (TlsConfig(cert=str(tmp_path), key=str(key)), "is a directory"),
        (TlsConfig(cert=str(cert)), "holds no private key"),
        (TlsConfig(cert=str(key), key=str(key)), "holds no PEM certificate"),
        (TlsConfig(cert=str(cert), key=str(cert)), "holds no PEM private key"),
        (TlsConfig(cert=str(cert), key=str(other_key)), "does not belong to the certificate"),
        (TlsConfig(cert=str(cert), key=str(enc_key)), "encrypted with a passphrase"),
        (TlsConfig(cert=str(cert), key=str(key), ciphers="NO-SUCH-CIPHER"), "accepts no cipher"),
    ]
    for cfg, fragment in cases:
        with pytest.raises(TlsError) as info:
            server_context(cfg)
        assert fragment in str(info.value) and "fix:" in str(info.value), (fragment, str(info.value))
    combined = tmp_path / "combined.pem"
    combined.write_bytes(other_cert.read_bytes() + other_key.read_bytes())
    assert server_context(TlsConfig(cert=str(combined))).get_ca_certs() == []  # key in the cert file: fine
    ctx = server_context(TlsConfig(cert=str(cert), key=str(key), min_version="1.3"))
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3


# -- in-process -------------------------------------------------------------------------------
async def _tls_connect(port: int, cert: Path, alpn: list[str] | None = None):
    return await asyncio.open_connection("127.0.0.1", port, ssl=client_context(cert, alpn), server_hostname="localhost")


def test_pipelined_requests_over_tls_in_order_with_alpn_and_the_proto_forwarded(tmp_path):
    cert, key = make_cert(tmp_path)

    async def main():
        env = Env()
        rec = await HeadRecorder().start()
        try:
            be = await env.backend("a")
            await env.splice(routes=[{"prefix": "/rec", "backends": [rec.address]}], default=[be.address],
                             tls={"cert": str(cert), "key": str(key)}, forwarded_for=True, forwarded=True)
            r, w = await _tls_connect(env.splicer.port, cert, ["h2", "http/1.1"])
            assert w.get_extra_info("ssl_object").selected_alpn_protocol() == "http/1.1"
            w.write(get("/a?delay=40", 1) + get("/b", 2) + get("/rec/x", 3) + get("/c?chunked=1", 4))
            replies, closed = await read_replies(r, [b"GET"] * 4)
            assert [x.status for x in replies] == [200] * 4 and not closed
            assert [x.seq for x in replies] == [b"1", b"2", None, b"4"]  # in request order
            head = rec.heads[0]
            assert _fields(head, b"X-Forwarded-Proto") == [b"https"]
            assert _fields(head, b"Forwarded") == [b"for=127.0.0.1;proto=https"]
            # Connection: close over TLS, with the client still sending after it: every answer
            # arrives, then the close (TLS close_notify), and no reset takes answers away
            w.write(get("/d?delay=30", 5) + get("/e", 6, headers="Connection: close\r\n")
                    + b"".join(get(f"/never{i}", 7 + i) for i in range(2000)))
            replies, closed = await read_replies(r, [b"GET"] * 2)
            assert [x.seq for x in replies] == [b"5", b"6"] and closed
            assert not any(p.startswith(b"/never") for p in be.stats.paths)
            await rec.close()
        finally:
            await env.close()
    run(main())


def test_plain_http_and_a_stalled_handshake_on_the_tls_port_harm_nobody(tmp_path):
    cert, key = make_cert(tmp_path)

    async def main():
        env = Env()
        try:
            be = await env.backend("a")
            sp = await env.splice(default=[be.address], tls={"cert": str(cert), "key": str(key)},
                                  timeouts={"request_head": 0.5})
            # plain HTTP: the handshake fails and that connection is closed
            r, w = await asyncio.open_connection("127.0.0.1", sp.port)
            w.write(get("/plain", 1))
            assert await asyncio.wait_for(r.read(), 10) == b""
            # a client that connects and says nothing is closed after timeouts.request_head
            r2, w2 = await asyncio.open_connection("127.0.0.1", sp.port)
            assert await asyncio.wait_for(r2.read(), 10) == b""
            # TLS clients are served all the while
            r3, w3 = await _tls_connect(sp.port, cert)
            w3.write(get("/ok", 2))
            replies, _ = await read_replies(r3, [b"GET"])
            assert replies[0].status == 200
            assert b"/plain" not in be.stats.paths
            w3.close()
        finally:
            await env.close()  # also asserts no error reached the event loop's handler
    run(main())


# -- the CLI with curl and wrk, and a certificate renewed by a reload --------------------------
def _served_cert(port: int) -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s, ctx.wrap_socket(s) as t:
        return t.getpeercert(binary_form=True)


def _der(path: Path) -> bytes:
    return x509.load_pem_x509_certificate(path.read_bytes()).public_bytes(serialization.Encoding.DER)


def test_curl_and_wrk_over_tls_and_a_reload_puts_a_renewed_certificate_in_service(tmp_path):
    need("curl", "wrk")
    live = tmp_path / "live"
    live.mkdir()
    old_cert, old_key = make_cert(tmp_path, "old")
    new_cert, new_key = make_cert(tmp_path, "new")
    cert, key = live / "site.crt", live / "site.key"
    cert.write_bytes(old_cert.read_bytes())
    key.write_bytes(old_key.read_bytes())
    with start_echo_backend(0, "be") as be, \
            _Splicer(["--default", f"127.0.0.1:{be}", "--workers", "2", "--tls-cert", str(cert), "--tls-key",
                      str(key)]) as sp:
        base = f"https://localhost:{sp.port}"
        r = subprocess.run(["curl", "-sS", "--max-time", "10", "--noproxy", "*", "--cacert", str(old_cert),
                            "--resolve", f"localhost:{sp.port}:127.0.0.1", f"{base}/one", f"{base}/two", "-v"],
                           capture_output=True, timeout=20)
        assert r.returncode == 0, r.stderr
        assert b"be GET /one" in r.stdout and b"be GET /two" in r.stdout
        assert b"ALPN: server accepted http/1.1" in r.stderr or b"ALPN, server accepted to use http/1.1" in r.stderr
        res = run_wrk(sp.port, ["/w"], connections=4, depth=4, duration=1, scheme="https")
        assert res.requests > 0 and res.socket_errors == 0 and res.out_of_order == 0
        assert _served_cert(sp.port) == _der(old_cert)
        # renew: new files in place, then a reload; new connections get the new certificate
        cert.write_bytes(new_cert.read_bytes())
        key.write_bytes(new_key.read_bytes())
        os.kill(sp.proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 30
        while _served_cert(sp.port) != _der(new_cert):
            assert time.monotonic() < deadline, "the renewed certificate was not served after the reload"
            time.sleep(0.2)
        # a reload to a key that does not match is refused; the renewed certificate stays in service
        key.write_bytes(old_key.read_bytes())
        os.kill(sp.proc.pid, signal.SIGHUP)
        time.sleep(1)
        assert _served_cert(sp.port) == _der(new_cert)
        assert sp.proc.poll() is None


def test_cli_refuses_a_bad_key_and_warns_about_an_expired_certificate(tmp_path):
    cert, key = make_cert(tmp_path)
    _, other_key = make_cert(tmp_path, "other")
    old_cert, old_key = make_cert(tmp_path, "expired", expired=True)
    cmd = [sys.executable, "-m", "shmfabric", "splice", "http", "--default", "127.0.0.1:1", "--no-health"]
    r = subprocess.run(cmd + ["--tls-cert", str(cert), "--tls-key", str(other_key)], capture_output=True, text=True,
                       timeout=30, env=_py_env())
    assert r.returncode == 2 and "Traceback" not in r.stderr and "does not belong to the certificate" in r.stderr
    r = subprocess.run(cmd + ["--tls-key", str(key)], capture_output=True, text=True, timeout=30, env=_py_env())
    assert r.returncode == 2 and "--tls-key needs --tls-cert" in r.stderr
    r = subprocess.run(cmd + ["--tls-cert", str(old_cert), "--tls-key", str(old_key), "--check"], capture_output=True,
                       text=True, timeout=30, env=_py_env())
    assert r.returncode == 0 and "warning: the certificate in" in r.stderr and "expired on" in r.stderr


def test_a_drain_does_not_wait_for_a_client_that_never_answers_close_notify(tmp_path):
    # The splicer ends a TLS connection with close_notify and waits for the client's; a pooled
    # client that sits idle without reading never sends one. asyncio waited 30 s for it, so every
    # reload and stop took timeouts.drain; now it waits as long as a plain connection lingers.
    cert, key = make_cert(tmp_path)

    async def main():
        env = Env()
        loop = asyncio.get_running_loop()
        try:
            be = await env.backend("a")
            sp = await env.splice(default=[be.address], tls={"cert": str(cert), "key": str(key)})

            def idle_client() -> socket.socket:
                raw = socket.create_connection(("127.0.0.1", sp.port), timeout=10)
                tls = client_context(cert).wrap_socket(raw, server_hostname="localhost")
                tls.sendall(get("/a", 1))
                assert tls.recv(65536).startswith(b"HTTP/1.1 200")
                return tls  # kept open, never read again

            client = await loop.run_in_executor(None, idle_client)
            await wait_for(lambda: len(sp.clients) == 1)
            sp.drain()
            await wait_for(lambda: not sp.clients, timeout=15)  # asyncio's own bound was 30 s
            client.close()
        finally:
            await env.close()
    run(main())


def test_a_respawned_worker_keeps_serving_when_the_files_went_bad_and_says_why_it_cannot_start(tmp_path):
    # The TLS context is the master's, inherited by every worker it forks: a worker that replaces
    # a dead one serves the loaded certificate even if the files went bad meanwhile. A file a
    # worker opens itself (the access log) that went bad stops the replacement with its reason,
    # and no traceback.
    cert, key = make_cert(tmp_path)
    log = tmp_path / "access.log"
    with start_echo_backend(0, "be") as be, \
            _Splicer(["--default", f"127.0.0.1:{be}", "--tls-cert", str(cert), "--tls-key", str(key),
                      "--access-log", str(log)]) as sp:
        assert _served_cert(sp.port) == _der(cert)  # the worker is up

        def worker() -> int:
            pids = subprocess.run(["pgrep", "-P", str(sp.proc.pid)], capture_output=True, text=True).stdout.split()
            assert len(pids) == 1, pids
            return int(pids[0])

        first = worker()
        key.write_text("not a key\n")  # the files go bad under a running splicer...
        os.kill(first, signal.SIGKILL)  # ...and its worker is replaced
        deadline = time.monotonic() + 20
        while True:
            try:
                if _served_cert(sp.port) == _der(cert):
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "no replacement served the certificate"
            time.sleep(0.1)
        assert worker() != first
        log.unlink()
        log.mkdir()  # now the access log cannot be opened
        os.kill(worker(), signal.SIGKILL)
        seen = b""
        os.set_blocking(sp.proc.stderr.fileno(), False)
        while b"worker cannot start" not in seen:
            assert time.monotonic() < deadline + 20, seen
            time.sleep(0.1)
            seen += sp.proc.stderr.read() or b""
    assert b"worker cannot start: access_log: cannot open" in seen and b"Traceback" not in seen, seen


def test_sessions_resume_on_any_worker(tmp_path):
    # Every worker serves the master's context, so they share the key that encrypts session
    # tickets: a client resumes whichever worker takes its next connection (with a context per
    # worker, 36 of 60 reconnects resumed with 2 workers).
    from shmfabric.bench.splice_http import tls_probe

    cert, key = make_cert(tmp_path)
    with start_echo_backend(0, "be") as be, \
            _Splicer(["--default", f"127.0.0.1:{be}", "--workers", "2", "--tls-cert", str(cert), "--tls-key",
                      str(key)]) as sp:
        assert _served_cert(sp.port) == _der(cert)
        workers = subprocess.run(["pgrep", "-P", str(sp.proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) == 2
        deadline = time.monotonic() + 20
        while True:  # both workers ready (each has accepted a connection)
            r = tls_probe(sp.port, cert, path="/x", reconnects=30)
            if r["status"] == 200:
                break
            assert time.monotonic() < deadline
        assert r["resumed"] == 30 and r["version"] == "TLSv1.3", r


def test_refused_reloads_do_not_take_the_running_generations_certificate(tmp_path):
    # Each reload's context was built (and kept among the last 3) before the reload was checked:
    # refused reloads pushed out the running generation's context, and a worker respawned after
    # that loaded the files on disk, or none.
    cert, key = make_cert(tmp_path)
    yaml_file = tmp_path / "splice.yaml"

    def write(workers: int) -> None:
        yaml_file.write_text(f"http:\n  workers: {workers}\n  default: [127.0.0.1:{be}]\n"
                             f"  tls: {{cert: {cert}, key: {key}}}\n")

    with start_echo_backend(0, "be") as be:
        write(1)
        original_der = _der(cert)
        with _Splicer(["--config", str(yaml_file)]) as sp:
            assert _served_cert(sp.port) == original_der
            os.set_blocking(sp.proc.stderr.fileno(), False)
            seen = b""
            write(2)  # a changed worker count: every reload is refused
            for n in range(1, 5):
                os.kill(sp.proc.pid, signal.SIGHUP)
                deadline = time.monotonic() + 20
                while seen.count(b"reload refused") < n:
                    assert time.monotonic() < deadline, seen
                    time.sleep(0.05)
                    seen += sp.proc.stderr.read() or b""
            cert.write_text("garbage\n")
            key.write_text("garbage\n")
            (pid,) = subprocess.run(["pgrep", "-P", str(sp.proc.pid)], capture_output=True, text=True).stdout.split()
            os.kill(int(pid), signal.SIGKILL)
            deadline = time.monotonic() + 20
            while True:
                try:
                    served = _served_cert(sp.port)
                    break
                except OSError:
                    assert time.monotonic() < deadline, "no worker serves after the respawn"
                    time.sleep(0.1)
            assert served == original_der
