"""A pool moved from twemproxy behaves as twemproxy did (findings of a side-by-side review with
nutcracker 0.5): a busy server is not ejected by a check it is slow to answer, an ejected server
comes back on one check, `redis_auth` with `redis_db` is not started on a database where the
keys are not, a bare IPv6 `listen` is read as nutcracker reads it; and numkeys errors use
redis-server's words.

No timing is asserted: what is checked is where keys land, what the servers were sent, and
what the splicer answers.
"""
from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pytest
import redis

from shmfabric.cli.main import main
from shmfabric.splicer.config import ConfigError, RedisSpliceConfig, load_config
from shmfabric.splicer.redis_resp import encode_command
from shmfabric.splicer.twemproxy_conf import from_twemproxy, load_twemproxy

from .redis_fixtures import (NUTCRACKER, RedisServer, SplicerThread, free_port, needs_nutcracker, needs_redis,
                             pipeline, placed_on, redis_servers, splicer, wait_port)


def _pool(servers: list[RedisServer], **directives) -> dict:
    pool = {"listen": f"127.0.0.1:{free_port()}", "redis": "true", "hash": "md5", "servers": [
        f"{s.address}:1 s{i}" for i, s in enumerate(servers)]}
    pool.update({k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in directives.items()})
    return {"p": pool}


def _start(doc: dict, **kw) -> SplicerThread:
    data, _ = from_twemproxy(doc, **kw)
    return SplicerThread(RedisSpliceConfig.model_validate(data))


def _pings(server: RedisServer) -> int:
    stats = server.client().info("commandstats")
    return int(stats.get("cmdstat_ping", {}).get("calls", 0))


class _Sleep:
    """DEBUG SLEEP on a server's own connection; `wait()` returns when the server is awake."""

    def __init__(self, server: RedisServer, seconds: float) -> None:
        self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
        self.sock.sendall(encode_command([b"DEBUG", b"SLEEP", str(seconds).encode()]))
        for _ in range(100):  # until the server is seen asleep (a PING it does not answer at once)
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as probe:
                probe.settimeout(0.2)
                probe.sendall(b"PING\r\n")
                try:
                    probe.recv(100)
                except TimeoutError:
                    return
            time.sleep(0.02)
        raise AssertionError("the server did not go to sleep")

    def wait(self) -> None:
        assert self.sock.recv(100) == b"+OK\r\n"
        self.sock.close()


# -- finding 1: a busy server is not ejected --------------------------------------------------------

def test_an_imported_pool_is_ejected_by_failed_requests_not_by_checks() -> None:
    data, _ = from_twemproxy({"p": {"listen": "127.0.0.1:1", "redis": "true", "auto_eject_hosts": "true",
                                    "timeout": "5000", "servers": ["127.0.0.1:2:1"]}})
    h = RedisSpliceConfig.model_validate(data).health
    # twemproxy's defaults: server_failure_limit 2, server_retry_timeout 30 s; a check waits as
    # long as a request
    assert (h.mode, h.fall, h.rise, h.interval, h.timeout) == ("passive", 2, 1, 30.0, 5.0)


@needs_redis
@pytest.mark.timeout(120)
def test_a_server_busy_within_the_timeout_keeps_its_keys(tmp_path: Path) -> None:
    """DEBUG SLEEP 4 (a BGSAVE fork, a slow script) with twemproxy's `timeout: 10000`: nutcracker
    waits and writes the keys on their server; the splicer's 1 s health check ejected it, and the
    writes went to the other server, to be read back stale once it returned."""
    with redis_servers(tmp_path, 2) as pair:
        sp = _start(_pool(pair, auto_eject_hosts=True, server_failure_limit=2, server_retry_timeout=500,
                          timeout=10000))
        try:
            keys = placed_on(sp, 1, 6, "busy")
            r = sp.client(socket_timeout=30)
            for k in keys:
                r.set(k, "before")
            time.sleep(1.5)  # idle: several rounds of what were the health checks
            sleep = _Sleep(pair[1], 4)
            for k in keys:  # one at a time, across the sleep: each waits for the server
                assert r.set(k, "during")
            sleep.wait()
            assert [pair[1].client().get(k) for k in keys] == [b"during"] * len(keys)
            assert pair[0].client().dbsize() == 0  # nothing was written elsewhere
            assert sp.stats()["servers"][1]["up"] and sp.splicer.router.pool == [0, 1]
            assert _pings(pair[0]) == 0  # no health check while a server is up, as in twemproxy
        finally:
            sp.stop()


@needs_redis
@pytest.mark.timeout(120)
def test_a_reply_clears_the_failures_so_far(tmp_path: Path) -> None:
    """twemproxy's server_ok: any reply restarts the count of failures, so two timeouts far apart
    (each followed by replies) do not eject with server_failure_limit 2."""
    with redis_servers(tmp_path, 2) as pair:
        sp = _start(_pool(pair, auto_eject_hosts=True, server_failure_limit=2, server_retry_timeout=500,
                          timeout=500))
        try:
            key = placed_on(sp, 1, 1, "ok")[0]
            r = sp.client(socket_timeout=30)
            r.set(key, "v")
            for _ in range(2):
                sleep = _Sleep(pair[1], 3)
                with pytest.raises(Exception, match="did not answer within 0.5 s"):
                    r.get(key)  # one failure: the request timeout
                sleep.wait()
                for _ in range(50):  # the lane reconnects after its backoff, then answers
                    try:
                        value = r.get(key)
                    except redis.ResponseError as exc:
                        assert "unavailable" in str(exc), exc
                        time.sleep(0.05)
                    else:
                        assert value == b"v"
                        break
                else:
                    raise AssertionError("the server was not tried again")
                assert sp.stats()["servers"][1]["up"]
            assert sp.splicer.router.pool == [0, 1]
        finally:
            sp.stop()


# -- finding 3: an ejected server comes back as in twemproxy -------------------------------------------

@needs_redis
@pytest.mark.timeout(120)
def test_an_ejected_server_rejoins_on_one_check(tmp_path: Path) -> None:
    """twemproxy puts an ejected server back server_retry_timeout after the ejection; the splicer
    wanted two passing checks (rise 2), one every server_retry_timeout, so up to twice as long.
    Now: checks only while it is out, and the first that passes brings it back."""
    with redis_servers(tmp_path, 2) as pair:
        sp = _start(_pool(pair, auto_eject_hosts=True, server_failure_limit=1, server_retry_timeout=300,
                          timeout=2000))
        try:
            key = placed_on(sp, 1, 1, "back")[0]
            r = sp.client(socket_timeout=30)
            r.set(key, "1")
            port = pair[1].port
            pair[1].kill()
            for _ in range(200):
                try:
                    r.get(key)
                except Exception:
                    pass
                if sp.splicer.router.pool == [0]:
                    break
                time.sleep(0.05)
            assert sp.splicer.router.pool == [0] and not sp.stats()["servers"][1]["up"]
            assert r.set(key, "2") and pair[0].client().get(key) == b"2"  # its keys go elsewhere meanwhile
            with pytest.raises(Exception, match=r"ejected after 1 failure\(s\) in a row: back after a passing "
                                                 r"check, one every 0.3 s from the ejection"):
                r.flushall()  # a write to every server names the ejection
            pair[1].port = port
            pair[1].start()
            for _ in range(600):
                if sp.splicer.router.pool == [0, 1]:
                    break
                time.sleep(0.05)
            assert sp.splicer.router.pool == [0, 1] and sp.stats()["servers"][1]["up"]
            time.sleep(1)  # several intervals: no check once it is back
            assert _pings(pair[1]) == 1  # the one check that brought it back
            assert _pings(pair[0]) == 0
            pair[1].client().set(key, "b")
            assert r.get(key) == b"b"  # read from the returning server again, as twemproxy reads it
        finally:
            sp.stop()


def _raw(port: int, payload: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(payload)
    return s


def _read_reply(s: socket.socket) -> bytes:
    got = b""
    while not got.endswith(b"\r\n"):
        chunk = s.recv(65536)
        assert chunk, got
        got += chunk
    return got


@needs_redis
@pytest.mark.timeout(120)
def test_one_stall_seen_by_a_resp2_and_a_resp3_client_is_one_failure(tmp_path: Path) -> None:
    """A server has a connection per protocol version: a stall times out a RESP2 client's and a
    RESP3 client's request together. Counted twice, it ejected (server_failure_limit 2) a server
    nutcracker keeps, and its keys were written elsewhere."""
    with redis_servers(tmp_path, 2) as pair:
        sp = _start(_pool(pair, auto_eject_hosts=True, server_failure_limit=2, server_retry_timeout=30000,
                          timeout=1000))
        try:
            key = placed_on(sp, 1, 1, "stall")[0].encode()
            port = sp.port
            c3 = _raw(port, encode_command([b"HELLO", b"3"]))
            assert _read_reply(c3).startswith(b"%")
            sleep = _Sleep(pair[1], 2.5)
            c2 = _raw(port, encode_command([b"GET", key]))
            c3.sendall(encode_command([b"GET", key]))
            for c in (c2, c3):
                assert b"did not answer within 1 s" in _read_reply(c)
                c.close()
            sleep.wait()
            assert sp.stats()["servers"][1]["up"] and sp.splicer.router.pool == [0, 1]
        finally:
            sp.stop()


@needs_redis
@pytest.mark.timeout(120)
def test_reconnects_nobody_waited_for_do_not_eject(tmp_path: Path) -> None:
    """With `preconnect`, the pool's connections are reopened while a server restarts; those
    refused connects are no failed requests (twemproxy counts none), yet two of them ejected the
    server for server_retry_timeout."""
    with redis_servers(tmp_path, 2) as pair:
        sp = _start(_pool(pair, auto_eject_hosts=True, server_failure_limit=2, server_retry_timeout=30000,
                          preconnect=True))
        try:
            srv = sp.splicer._servers[1]
            port = pair[1].port
            pair[1].kill()
            for _ in range(400):  # the pool's connections tried again, and refused
                if srv.last_error and "cannot connect" in srv.last_error:
                    break
                time.sleep(0.05)
            assert "cannot connect" in (srv.last_error or "")
            pair[1].port = port
            pair[1].start()
            assert sp.stats()["servers"][1]["up"] and sp.splicer.router.pool == [0, 1]
            key = placed_on(sp, 1, 1, "pre")[0]
            r = sp.client(socket_timeout=30)
            for _ in range(100):  # after the reconnect backoff, the server takes its keys again
                try:
                    r.set(key, "v")
                    break
                except redis.ResponseError:
                    time.sleep(0.1)
            assert pair[1].client().get(key) == b"v"
        finally:
            sp.stop()


@needs_redis
@pytest.mark.timeout(120)
def test_a_reply_whose_handler_sends_on_the_same_connection_still_clears_the_failures(tmp_path: Path) -> None:
    """A write to every server is sent after a PING of each; the PING's reply sends it on the same
    connection. That reply was not counted (replies were counted as the queue's shrinkage), so a
    failure before and the write's own timeout ejected the server."""
    with redis_servers(tmp_path, 2) as pair:
        sp = _start(_pool(pair, auto_eject_hosts=True, server_failure_limit=2, server_retry_timeout=30000,
                          timeout=500))
        try:
            srv = sp.splicer._servers[1]

            async def fail_once() -> None:
                sp.splicer._record_health(srv, False)  # a failure so far, not yet cleared

            sp.call(fail_once())
            assert srv.failing and srv.up
            pair[1].client().execute_command("CLIENT", "PAUSE", "3000", "WRITE")  # PING answered, writes wait
            r = sp.client(socket_timeout=30)
            with pytest.raises(redis.ResponseError, match="did not answer within 0.5 s"):
                r.flushall()
            assert sp.stats()["servers"][1]["up"] and sp.splicer.router.pool == [0, 1]
            pair[1].client().execute_command("CLIENT", "UNPAUSE")
        finally:
            sp.stop()


def test_the_start_does_not_wait_a_request_timeout_per_hung_server(monkeypatch) -> None:
    """An imported pool's checks wait as long as a request (30 s without `timeout`); the start's
    INFO to learn the servers' version used that too, so one hung server (accepting, never
    answering) held the listener back 30 s and a reload failed the workers' 30 s ready limit."""
    import asyncio

    from shmfabric.splicer.redis_proxy import RedisSplicer

    data, _ = from_twemproxy({"p": {"listen": "127.0.0.1:0", "redis": "true", "auto_eject_hosts": "true",
                                    "servers": ["127.0.0.1:1:1", "127.0.0.1:2:1"]}})
    cfg = RedisSpliceConfig.model_validate(data)
    assert cfg.health.timeout == 30.0
    asked: list[float | None] = []

    async def hung(self, srv, command, timeout=None):
        asked.append(timeout)
        raise asyncio.TimeoutError

    monkeypatch.setattr(RedisSplicer, "_probe", hung)
    asyncio.run(RedisSplicer(cfg)._learn_version())
    assert len(asked) == 2 and all(t is not None and t <= 2.0 for t in asked), asked


def test_without_auto_eject_a_failing_server_is_never_marked_down() -> None:
    """twemproxy without auto_eject_hosts counts nothing: each request tries the server."""
    sp = _start({"p": {"listen": f"127.0.0.1:{free_port()}", "redis": "true", "servers": ["127.0.0.1:1:1", "127.0.0.1:2:1"]}})
    try:
        srv = sp.splicer._servers[1]
        for _ in range(5):
            sp.splicer._record_health(srv, False)
        assert srv.up
    finally:
        sp.stop()


def test_health_mode_is_a_redis_field_only(tmp_path: Path) -> None:
    f = tmp_path / "s.yaml"
    f.write_text("redis:\n  servers: [127.0.0.1:6379]\n  health: {mode: passive, rise: 1}\n")
    assert load_config(f).redis.health.mode == "passive"
    f.write_text("http:\n  default: [127.0.0.1:1]\n  health: {mode: passive}\n")
    with pytest.raises(ConfigError, match=r"field `http.health.mode`"):
        load_config(f)
    f.write_text("redis:\n  servers: [127.0.0.1:6379]\n  health: {mode: lazy}\n")
    with pytest.raises(ConfigError, match=r"field `redis.health.mode`"):
        load_config(f)


# -- finding 2: redis_auth with redis_db ---------------------------------------------------------------

def test_redis_auth_with_redis_db_is_refused_saying_where_the_keys_are(tmp_path: Path, capsys) -> None:
    doc = {"p": {"listen": "127.0.0.1:1", "redis": "true", "redis_auth": "pw", "redis_db": "3",
                 "servers": ["127.0.0.1:2:1"]}}
    with pytest.raises(ConfigError) as exc:
        from_twemproxy(doc)
    msg = str(exc.value)
    assert msg.startswith("twemproxy config: pool p: `redis_auth` with `redis_db: 3`")
    assert "SELECT 3 before AUTH" in msg and "in db 0, not db 3" in msg and "remove `redis_db`" in msg
    assert "`--twemproxy-db 0`" in msg and "`--twemproxy-db 3`" in msg
    path = tmp_path / "nutcracker.yml"
    path.write_text("p:\n  listen: 127.0.0.1:22121\n  redis: true\n  redis_auth: pw\n  redis_db: 3\n"
                    "  servers:\n   - 127.0.0.1:7001:1\n")
    assert main(["splice", "redis", "--twemproxy", str(path), "--check"]) == 2
    assert "in db 0, not db 3" in capsys.readouterr().err
    for n in (0, 3):  # the choice, on the command line
        assert main(["splice", "redis", "--twemproxy", str(path), "--twemproxy-db", str(n), "--check"]) == 0
        assert f'"db": {n},' in capsys.readouterr().out
    assert main(["splice", "redis", "--twemproxy-db", "3", "--server", "127.0.0.1:7001", "--check"]) == 2
    assert "--twemproxy-db goes with a --twemproxy file" in capsys.readouterr().err
    # the choice, made: db 0 or db 3
    assert RedisSpliceConfig.model_validate(from_twemproxy(doc, db=0)[0]).db == 0
    assert RedisSpliceConfig.model_validate(load_twemproxy(path, db=3)[0]).db == 3
    # either one alone, or db 0, is as before
    base = {k: v for k, v in doc["p"].items() if k not in ("redis_auth", "redis_db")}
    for pool in ({"redis_auth": "pw"}, {"redis_db": "3"}, {"redis_auth": "pw", "redis_db": "0"}):
        cfg = RedisSpliceConfig.model_validate(from_twemproxy({"p": base | pool})[0])
        assert cfg.db == int(pool.get("redis_db", 0))


@needs_redis
@needs_nutcracker
@pytest.mark.timeout(120)
def test_where_nutcracker_put_the_keys_depends_on_the_servers_password(tmp_path: Path) -> None:
    """Why the refusal: with servers that require the password nutcracker's SELECT fails and its
    keys are in db 0; with servers that do not, they are in redis_db. With the choice made (db 0
    for the first), the splicer reads every key nutcracker wrote."""
    for requirepass in (True, False):
        extra = ["--requirepass", "pw"] if requirepass else []
        with redis_servers(tmp_path / str(requirepass), 2, extra) as pair:
            listen = free_port()
            conf = tmp_path / f"nc-{requirepass}.yml"
            conf.write_text(f"p:\n  listen: 127.0.0.1:{listen}\n  redis: true\n  hash: md5\n  redis_auth: pw\n"
                            f"  redis_db: 3\n  servers:\n" + "".join(f"   - {s.address}:1 s{i}\n" for i, s in enumerate(pair)))
            nc = subprocess.Popen([NUTCRACKER, "-c", str(conf), "-s", str(free_port()), "-o", str(tmp_path / "nc.log")],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                wait_port(listen, timeout=5)
                replies = pipeline(listen, [[b"AUTH", b"pw"]] + [[b"SET", b"k%d" % i, b"v"] for i in range(100)])
                assert set(replies) == {b"+OK\r\n"}, replies[:3]
            finally:
                nc.kill()
                nc.wait(timeout=10)
            direct = [s.client(password="pw" if requirepass else None) for s in pair]
            spaces = {db for c in direct for db in c.info("keyspace")}
            assert spaces == ({"db0"} if requirepass else {"db3"})
            if requirepass:
                with pytest.raises(ConfigError, match="remove `redis_db`"):
                    load_twemproxy(conf)
                data, _ = load_twemproxy(conf, db=0)
                data["listen"] = f"127.0.0.1:{free_port()}"
                sp = SplicerThread(RedisSpliceConfig.model_validate(data))
                try:
                    got = pipeline(sp.port, [[b"AUTH", b"pw"]] + [[b"GET", b"k%d" % i] for i in range(100)])
                    assert got == [b"+OK\r\n"] + [b"$1\r\nv\r\n"] * 100
                finally:
                    sp.stop()


# -- finding 4: a bare IPv6 listen ---------------------------------------------------------------------

@pytest.mark.parametrize("listen,expected", [("::1:22121", "[::1]:22121"), ("[::1]:22121", "[::1]:22121"),
                                             ("0.0.0.0:22121", "0.0.0.0:22121"), ("fe80::1:2:22121", "[fe80::1:2]:22121"),
                                             ("localhost:22121", "localhost:22121")])
def test_listen_is_split_at_its_last_colon_as_nutcracker_does(listen: str, expected: str) -> None:
    data, _ = from_twemproxy({"p": {"listen": listen, "redis": "true", "servers": ["127.0.0.1:2:1"]}})
    assert RedisSpliceConfig.model_validate(data).listen == expected


@pytest.mark.parametrize("listen", ["127.0.0.1", "127.0.0.1:http", "::1", "127.0.0.1:70000"])
def test_a_bad_listen_names_the_pool(listen: str) -> None:
    with pytest.raises(ConfigError, match=rf"pool p: `listen: {listen}`: .*fix: write HOST:PORT"):
        from_twemproxy({"p": {"listen": listen, "redis": "true", "servers": ["127.0.0.1:2:1"]}})


def test_the_cli_runs_a_bare_ipv6_listen(tmp_path: Path, capsys) -> None:
    path = tmp_path / "v6.yml"
    path.write_text("v6:\n  listen: \"::1:27170\"\n  redis: true\n  servers:\n   - 127.0.0.1:7001:1\n")
    assert main(["splice", "redis", "--twemproxy", str(path), "--check"]) == 0
    assert '"listen": "[::1]:27170"' in capsys.readouterr().out


# -- finding 5: numkeys errors in redis-server's words -------------------------------------------------

NUMKEYS = [
    (cmd, nk) for cmd in ("ZINTERSTORE", "ZUNIONSTORE") for nk in ("0", "-1", "5", "x", "05", "-0", "99999999999999999999")
] + [(cmd, nk) for cmd in ("LMPOP", "ZMPOP") for nk in ("0", "-1", "5", "x")]


def _numkeys_command(cmd: str, nk: str) -> list[bytes]:
    args = [cmd, "dst", nk, "a", "b"] if cmd.endswith("STORE") else [cmd, nk, "a", "b"]
    if cmd == "LMPOP":
        args.append("LEFT")
    if cmd == "ZMPOP":
        args.append("MIN")
    return [a.encode() for a in args]


@needs_redis
def test_a_bad_numkeys_gets_redis_servers_own_error(tmp_path: Path) -> None:
    with redis_servers(tmp_path, 1) as one, splicer(one) as sp:
        commands = [_numkeys_command(c, nk) for c, nk in NUMKEYS] + [
            [b"BLMPOP", b"0", nk, b"a", b"LEFT"] for nk in (b"0", b"5", b"x")] + [
            [b"BZMPOP", b"0", nk, b"a", b"MIN"] for nk in (b"0", b"5", b"x")]
        theirs = pipeline(one[0].port, commands)
        ours = pipeline(sp.port, commands)
        assert all(t.startswith(b"-") for t in theirs), theirs
        assert [(c[0], c[-3:], o) for c, o in zip(commands, ours)] == [(c[0], c[-3:], t) for c, t in zip(commands, theirs)]
