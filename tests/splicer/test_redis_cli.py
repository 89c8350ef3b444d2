"""`shmfabric splice redis`: flags, config file, errors, and a real run."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from shmfabric.cli.main import main

from .redis_fixtures import free_port, free_ports_in_a_row, needs_redis, redis_servers, wait_port


def test_check_prints_effective_config(capsys) -> None:
    assert main(["splice", "redis", "--server", "127.0.0.1:7001", "--server", "127.0.0.1:7002:2 shard-b",
                 "--pool", "4", "--hash", "md5", "--hash-tag", "{}", "--check"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["servers"] == [{"address": "127.0.0.1:7001", "weight": 1, "name": None},
                              {"address": "127.0.0.1:7002", "weight": 2, "name": "shard-b"}]
    assert (cfg["pool"]["min"], cfg["pool"]["max"]) == (4, 4) and cfg["hash"] == "md5" and cfg["hash_tag"] == "{}"


def test_config_file_and_flag_override(tmp_path: Path, capsys) -> None:
    path = tmp_path / "splice.yaml"
    path.write_text("redis:\n  listen: 127.0.0.1:6500\n  servers: [127.0.0.1:7001, 127.0.0.1:7002]\n"
                    "  hash: fnv1a_64\n  password: s3cret\n  timeouts: {request: 2}\n")
    assert main(["splice", "redis", "--config", str(path), "--listen", "127.0.0.1:6501", "--check"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["listen"] == "127.0.0.1:6501" and cfg["timeouts"]["request"] == 2
    # passwords are shown as set, not printed (--check output lands in terminals and CI logs)
    assert cfg["password"] == "<redacted>" and cfg["backend_password"] is None
    assert "s3cret" not in json.dumps(cfg)


@pytest.mark.parametrize("argv,needle", [
    (["--check"], "no servers"),
    (["--server", "nonsense", "--check"], "is not HOST:PORT"),
    (["--server", "127.0.0.1:1", "--hash", "sha1", "--check"], "hash"),
    (["--server", "127.0.0.1:1", "--pool", "0", "--check"], "pool"),
    (["--config", "/nonexistent/x.yaml"], "cannot read"),
])
def test_user_errors_are_one_line(argv: list[str], needle: str, capsys) -> None:
    assert main(["splice", "redis", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("shmfabric: error:") and needle in err and "Traceback" not in err


@needs_redis
@pytest.mark.timeout(60)
def test_runs_and_serves(tmp_path: Path) -> None:
    import redis

    with redis_servers(tmp_path, 2) as servers:
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "shmfabric.cli.main", "splice", "redis", "--listen",
                                 f"127.0.0.1:{port}", *[x for s in servers for x in ("--server", s.address)],
                                 "--pool", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_port(port)
            r = redis.Redis(port=port, socket_timeout=10)
            assert r.set("cli:k", "v") and r.get("cli:k") == b"v"
            assert r.mget(["cli:k", "cli:none"]) == [b"v", None]
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                out, err = proc.communicate(timeout=20)
            finally:
                proc.kill()  # never left running (a stop that hangs is the failure, not a leak)
        assert "splice redis: listening on" in out
        assert "Traceback" not in err


@needs_redis
@pytest.mark.timeout(60)
def test_two_workers_share_the_port_and_stop_cleanly(tmp_path: Path) -> None:
    import redis

    with redis_servers(tmp_path, 2) as servers:
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "shmfabric", "splice", "redis", "--listen",
                                 f"127.0.0.1:{port}", *[x for s in servers for x in ("--server", s.address)],
                                 "--workers", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_port(port)
            clients = [redis.Redis(port=port, socket_timeout=10) for _ in range(8)]
            for i, c in enumerate(clients):
                assert c.set(f"w:{i}", i) and c.get(f"w:{i}") == str(i).encode()
            assert clients[0].mget([f"w:{i}" for i in range(8)]) == [str(i).encode() for i in range(8)]
        finally:
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        assert "2 worker(s)" in out and "Traceback" not in err


def _splice_workers(server: str, port: int, *extra: str, stderr=subprocess.DEVNULL) -> subprocess.Popen:
    """`shmfabric splice redis --workers 2` in front of `server`, listening on `port`; returned
    once both workers accept (the master's socket accepts before they exist)."""
    proc = subprocess.Popen([sys.executable, "-m", "shmfabric", "splice", "redis", "--listen", f"127.0.0.1:{port}",
                             "--server", server, "--workers", "2", *extra],
                            stdout=subprocess.PIPE, stderr=stderr, text=True)
    line = proc.stdout.readline()  # type: ignore[union-attr]
    if not line.startswith("splice redis: listening on"):
        proc.kill()
        raise AssertionError(f"the splicer did not start: {line!r}")
    return proc


@needs_redis
@pytest.mark.timeout(60)
def test_workers_stop_when_the_parent_is_killed(tmp_path: Path) -> None:
    # kill -9 of the process the user started must not leave workers serving the port (a new
    # splicer on that port would share it with them)
    import os
    import socket
    import time

    with redis_servers(tmp_path, 1) as servers:
        port = free_port()
        proc = _splice_workers(servers[0].address, port)
        children: list[int] = []
        try:
            wait_port(port)
            children = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
            assert len(children) == 2
            proc.kill()
            proc.wait(timeout=10)
            deadline = time.monotonic() + 15
            while True:  # the port closes once the workers are gone (no one left listening)
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                except OSError:
                    break
                assert time.monotonic() < deadline, f"workers {children} outlived their parent"
                time.sleep(0.05)
            deadline = time.monotonic() + 15
            def running(pid: int) -> bool:
                try:
                    return "Z" not in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
                except OSError:
                    return False

            while any(running(c) for c in children):
                assert time.monotonic() < deadline, f"workers {children} still run"
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                proc.kill()  # a failed assertion above must not leave the master respawning workers
            for c in children:
                try:
                    os.kill(c, 9)
                except ProcessLookupError:
                    pass


@pytest.mark.timeout(60)
@pytest.mark.parametrize("verb", ["redis", "http"])
def test_a_busy_listen_or_metrics_port_is_one_line(verb: str) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        taken = f"127.0.0.1:{busy.getsockname()[1]}"
        target = ["--server", "127.0.0.1:1"] if verb == "redis" else ["--default", "127.0.0.1:1"]
        cases = [(["--listen", taken], f"cannot listen on {taken}: Address already in use"),
                 (["--listen", taken, "--workers", "2"], f"cannot listen on {taken}: Address already in use")]
        if verb == "redis":
            cases.append((["--listen", f"127.0.0.1:{free_port()}", "--metrics", taken],
                          f"cannot serve metrics on {taken}: Address already in use"))
        for extra, message in cases:
            r = subprocess.run([sys.executable, "-m", "shmfabric", "splice", verb, *target, "--no-health", *extra],
                               capture_output=True, text=True, timeout=30)
            assert r.returncode == 2 and message in r.stderr, (extra, r.stderr)
            assert "Traceback" not in r.stderr and "listening on" not in r.stdout


@needs_redis
@pytest.mark.timeout(60)
def test_workers_killed_from_outside_are_replaced_and_say_so(tmp_path: Path) -> None:
    import signal
    import socket

    from .test_master import kill_workers

    with redis_servers(tmp_path, 1) as servers:
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "shmfabric", "splice", "redis", "--listen", f"127.0.0.1:{port}",
                                 "--server", servers[0].address, "--workers", "2"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            # Announced once both workers accept (one killed before that is a failed start).
            assert proc.stdout.readline().startswith("splice redis: listening on")
            old = [int(c) for c in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
            kill_workers(old)
            # Served by the replacements: the connection waits in the master's socket meanwhile.
            with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
                s.sendall(b"PING\r\n")
                assert s.recv(100) == b"+PONG\r\n"
            new = [int(c) for c in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
            assert len(new) == 2 and not set(new) & set(old)
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, err
        assert err.count("was killed by signal 9; starting a new one") == 2, err


@needs_redis
@pytest.mark.timeout(60)
def test_every_worker_serves_its_own_metrics_on_port_plus_i(tmp_path: Path) -> None:
    import urllib.request

    with redis_servers(tmp_path, 1) as servers:
        port, mport = free_port(), free_ports_in_a_row(2)
        proc = _splice_workers(servers[0].address, port, "--metrics", f"127.0.0.1:{mport}", stderr=subprocess.PIPE)
        try:
            for p in (port, mport, mport + 1):
                wait_port(p)
            for p in (mport, mport + 1):
                text = urllib.request.urlopen(f"http://127.0.0.1:{p}/metrics", timeout=5).read().decode()
                assert "shmfabric_splicer" in text
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=20)


def test_an_unknown_field_in_a_redis_config_points_at_the_redis_docs(tmp_path: Path, capsys) -> None:
    f = tmp_path / "r.yaml"
    f.write_text("redis:\n  servers: [127.0.0.1:6379]\n  limits: {max_pipelin: 4}\n")
    assert main(["splice", "redis", "--config", str(f), "--check"]) == 2
    err = capsys.readouterr().err
    assert "max_pipelin" in err and "docs/splicer-redis.md" in err
