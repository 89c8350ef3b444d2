"""A twemproxy (nutcracker) config run by the splicer: the mapping, its refusals, and a migration.

The migration test is the point of the feature: keys written through a real nutcracker are read
back through the splicer started from the same nutcracker.yml (after nutcracker stops), for a
ketama pool with weights, a named server and a hash tag, and for a modula pool.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shmfabric.cli.main import main
from shmfabric.splicer.config import ConfigError, RedisSpliceConfig
from shmfabric.splicer.twemproxy_conf import from_twemproxy

from .redis_fixtures import free_port, needs_nutcracker, needs_redis, pipeline, redis_servers, start_nutcracker, wait_port

FULL = {
    "alpha": {
        "listen": "127.0.0.1:22121", "hash": "md5", "hash_tag": "{}", "distribution": "modula",
        "timeout": 400, "backlog": 1024, "preconnect": True, "redis": True, "redis_auth": "s3cret",
        "redis_db": 2, "server_connections": 4, "auto_eject_hosts": True, "server_retry_timeout": 2000,
        "server_failure_limit": 3, "servers": ["127.0.0.1:6379:1", "127.0.0.1:6380:2 shard-b"],
    },
}


def test_every_directive_maps_to_its_splicer_field() -> None:
    # redis_auth with redis_db is refused unless the db is chosen (test_twemproxy_migration)
    data, notes = from_twemproxy(FULL, db=2)
    cfg = RedisSpliceConfig.model_validate(data)
    assert cfg.listen == "127.0.0.1:22121" and cfg.hash == "md5" and cfg.hash_tag == "{}"
    assert cfg.distribution == "modula"
    assert cfg.timeouts.request == pytest.approx(0.4)
    assert (cfg.pool.min, cfg.pool.max) == (4, 4)
    assert cfg.password == cfg.backend_password == "s3cret" and cfg.db == 2
    assert cfg.auto_eject and cfg.health.fall == 3 and cfg.health.interval == pytest.approx(2.0)
    assert cfg.health.mode == "passive" and cfg.health.rise == 1 and cfg.health.timeout == pytest.approx(0.4)
    assert [(s.address, s.weight, s.name) for s in cfg.servers] == [
        ("127.0.0.1:6379", 1, None), ("127.0.0.1:6380", 2, "shard-b")]
    assert notes[-1] == "twemproxy config: pool alpha: `backlog` is accepted and not applied (the splicer has no equivalent)"
    assert len(notes) == 1


def test_twemproxy_defaults_one_lazy_connection_per_server_and_ketama() -> None:
    data, _ = from_twemproxy({"p": {"listen": "127.0.0.1:1", "redis": True, "servers": ["127.0.0.1:2:1"]}})
    cfg = RedisSpliceConfig.model_validate(data)
    assert (cfg.pool.min, cfg.pool.max) == (0, 1)
    assert cfg.distribution == "ketama" and cfg.hash == "fnv1a_64" and not cfg.auto_eject


@pytest.mark.parametrize("pool,needle", [
    ({"listen": "127.0.0.1:1", "servers": ["127.0.0.1:2:1"]}, "memcached pool"),
    ({"listen": "/tmp/nc.sock 0755", "redis": True, "servers": ["127.0.0.1:2:1"]}, "UNIX socket"),
    ({"listen": "127.0.0.1:1", "redis": True, "servers": ["/tmp/redis.sock:1"]}, "UNIX sockets are not"),
    ({"listen": "127.0.0.1:1", "redis": True, "servers": []}, "non-empty list"),
    ({"redis": True, "servers": ["127.0.0.1:2:1"]}, "`listen` is missing"),
    ({"listen": "127.0.0.1:1", "redis": True, "servers": ["127.0.0.1:2:1"], "hash": "sha1"}, "hash: sha1"),
    ({"listen": "127.0.0.1:1", "redis": True, "servers": ["127.0.0.1:2:1"], "distribution": "random"}, "random"),
    ({"listen": "127.0.0.1:1", "redis": True, "servers": ["127.0.0.1:2:1"], "listne": 1}, "unknown directive listne"),
    ({"listen": "127.0.0.1:1", "redis": True, "servers": ["127.0.0.1:2:1"], "timeout": "fast"}, "milliseconds"),
    ({"listen": "127.0.0.1:1", "redis": True, "servers": ["127.0.0.1:2:1"], "server_connections": 0}, "1 to 4096"),
    ({"listen": "127.0.0.1:1", "redis": True, "servers": ["127.0.0.1:2:1"], "server_connections": 5000}, "1 to 4096"),
    ({"listen": "127.0.0.1:1", "redis": "yes", "servers": ["127.0.0.1:2:1"]}, "`redis` must be true or false"),
    ({"listen": "127.0.0.1:1", "redis": True, "servers": ["127.0.0.1:2"]}, "needs a weight"),
    ({"listen": "127.0.0.1:1", "redis": True, "servers": ["127.0.0.1:2:1 my server"]}, "cannot contain spaces"),
    ({"listen": "127.0.0.1:1", "redis": True, "servers": ["127.0.0.1:2:1"], "redis_auth": ""}, "`redis_auth` is empty"),
])
def test_what_cannot_carry_over_is_refused_with_the_reason(pool: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match="pool p") as exc:
        from_twemproxy({"p": pool})
    assert needle in str(exc.value)


def test_a_file_with_several_pools_needs_a_pool_name(tmp_path: Path, capsys) -> None:
    path = tmp_path / "nutcracker.yml"
    path.write_text("a:\n  listen: 127.0.0.1:22121\n  redis: true\n  servers: [127.0.0.1:7001:1]\n"
                    "b:\n  listen: 127.0.0.1:22122\n  redis: true\n  servers: ['127.0.0.1:7002:1 x']\n")
    assert main(["splice", "redis", "--twemproxy", str(path), "--check"]) == 2
    assert "2 pools (a, b)" in capsys.readouterr().err
    assert main(["splice", "redis", "--twemproxy", str(path), "--twemproxy-pool", "c", "--check"]) == 2
    assert "no pool 'c'" in capsys.readouterr().err
    # flags override the file, as with --config
    assert main(["splice", "redis", "--twemproxy", str(path), "--twemproxy-pool", "b", "--pool", "3", "--check"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["listen"] == "127.0.0.1:22122" and cfg["servers"][0]["name"] == "x" and cfg["pool"]["max"] == 3
    assert main(["splice", "redis", "--twemproxy", str(path), "--config", str(path), "--check"]) == 2
    assert "use one of them" in capsys.readouterr().err


def _file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "nutcracker.yml"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def test_values_are_read_as_written_not_as_yaml_types(tmp_path: Path) -> None:
    # nutcracker reads every value as the text written; YAML 1.1 would make 0123 the number 83,
    # 010 the number 8 and a pool named 010 the integer 8.
    from shmfabric.splicer.twemproxy_conf import load_twemproxy

    path = _file(tmp_path, "010:\n  listen: 127.0.0.1:22121\n  redis: true\n  redis_auth: 0123\n  redis_db: 010\n"
                           "  timeout: 0400\n  server_connections: 010\n  servers:\n   - 127.0.0.1:7001:1\n")
    with pytest.raises(ConfigError, match="`redis_db: 10`"):  # redis_auth with redis_db: refused, db read as 10
        load_twemproxy(path, "010")
    data, _ = load_twemproxy(path, "010", db=10)
    cfg = RedisSpliceConfig.model_validate(data)
    assert cfg.password == cfg.backend_password == "0123"
    assert cfg.db == 10 and cfg.pool.max == 10 and cfg.timeouts.request == pytest.approx(0.4)


def test_server_lines_are_read_as_nutcracker_reads_them() -> None:
    data, _ = from_twemproxy({"p": {"listen": "127.0.0.1:1", "redis": "true", "servers": [
        "127.0.0.1:7001:1 ", "::1:7002:2", "127.0.0.1:7003:3 c"]}})
    cfg = RedisSpliceConfig.model_validate(data)
    # The name is what follows the last space (empty after a trailing one, and hashed so);
    # the bare IPv6 form splits at the last two colons.
    assert [(s.address, s.weight, s.name) for s in cfg.servers] == [
        ("127.0.0.1:7001", 1, ""), ("[::1]:7002", 2, None), ("127.0.0.1:7003", 3, "c")]
    from shmfabric.splicer.config import split_address
    from shmfabric.splicer.redis_ketama import server_name

    assert [server_name(*split_address(s.address), s.name) for s in cfg.servers] == ["", "::1:7002", "c"]


@pytest.mark.parametrize("text,needle", [
    ("p:\n  listen: 127.0.0.1:1\n  redis: true\n  redis: true\n  servers: [127.0.0.1:2:1]\n", "`redis` is given twice"),
    ("p:\n  listen: 127.0.0.1:1\n  redis: true\n  servers: [127.0.0.1:2:1]\n"
     "p:\n  listen: 127.0.0.1:3\n  redis: true\n  servers: [127.0.0.1:4:1]\n", "`p` is given twice (first on line 1)"),
    (b"p:\n  listen: 127.0.0.1:1\n  redis: true\n  redis_auth: caf\xe9\n  servers: [127.0.0.1:2:1]\n", "line 4: not UTF-8"),
])
def test_a_key_given_twice_or_a_file_not_in_utf8_is_one_line(tmp_path: Path, text, needle: str, capsys) -> None:
    assert main(["splice", "redis", "--twemproxy", str(_file(tmp_path, text)), "--check"]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and err.count("\n") == 1, err
    assert err.count("fix:") == 1, err  # one fix, not ours and then a generic one


@pytest.mark.parametrize("servers,extra,needle", [
    (["127.0.0.1:7001:1 a", "127.0.0.1:7002:1 a"], [], "have the same name 'a'"),
    (["127.0.0.1:7001:1 127.0.0.1:7002", "127.0.0.1:7002:1"], [], "have the same name '127.0.0.1:7002'"),
    (["127.0.0.1:7001:1 " + "n" * 83, "127.0.0.1:7002:1"], [], "too long for ketama"),
    (["127.0.0.1:7001:1", "127.0.0.1:7002:1"], ["--hash-tag", "«»"], "not two bytes"),
])
def test_placement_problems_are_refused_by_check_not_at_start(servers: list[str], extra: list[str], needle: str,
                                                              capsys) -> None:
    argv = [x for s in servers for x in ("--server", s)] + extra
    assert main(["splice", "redis", *argv, "--check"]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err, err
    assert "(top level)" not in err, err  # a check across servers names no field


def test_a_long_name_twemproxy_hashes_in_full_is_accepted(capsys) -> None:
    # 2 servers: point labels go up to NAME-79, so 82 bytes of name still fit twemproxy's 85.
    assert main(["splice", "redis", "--server", "127.0.0.1:7001:1 " + "n" * 82, "--server", "127.0.0.1:7002:1",
                 "--check"]) == 0
    # modula never hashes names: no limit
    assert main(["splice", "redis", "--server", "127.0.0.1:7001:1 " + "n" * 200, "--server", "127.0.0.1:7002:1",
                 "--distribution", "modula", "--check"]) == 0


def test_twemproxy_timeout_0_and_eject_defaults_carry_over() -> None:
    data, notes = from_twemproxy({"p": {"listen": "127.0.0.1:1", "redis": "true", "timeout": "0",
                                        "auto_eject_hosts": "true", "servers": ["127.0.0.1:2:1"]}})
    cfg = RedisSpliceConfig.model_validate(data)
    assert cfg.timeouts.request == 30 and any("wait forever" in n for n in notes)
    assert cfg.auto_eject and cfg.health.fall == 2  # twemproxy's server_failure_limit default


@needs_redis
@needs_nutcracker
@pytest.mark.timeout(120)
def test_keys_written_through_twemproxy_are_read_through_the_splicer_from_the_same_file(tmp_path: Path) -> None:
    with redis_servers(tmp_path, 3) as srv:
        # A quoted line ending in a space names its server "" in twemproxy (hashed so), and a
        # pool named 010 is the text "010" to twemproxy, not YAML's integer 8.
        lines = [f"'127.0.0.1:{srv[0].port}:1 '", f"127.0.0.1:{srv[1].port}:1", f"127.0.0.1:{srv[2].port}:2 shard-c"]
        pools = {"ring": "  hash: fnv1a_64\n  hash_tag: \"{}\"\n  distribution: ketama\n",
                 "010": "  hash: md5\n  distribution: modula\n"}
        for attempt in range(3):
            ports = {name: free_port() for name in pools}
            conf = tmp_path / "nutcracker.yml"
            conf.write_text("".join(
                f"{name}:\n  listen: 127.0.0.1:{ports[name]}\n  redis: true\n  server_connections: 2\n{extra}"
                "  servers:\n" + "".join(f"   - {ln}\n" for ln in lines) for name, extra in pools.items()))
            nc = start_nutcracker(conf, ports.values(), tmp_path / "nc.log")
            if nc is not None:
                break
            if attempt == 2:
                raise TimeoutError("nutcracker did not listen on the ports picked for it, three times")
        keys = {name: [b"%s:%d" % (name.encode(), i) for i in range(200)] + [b"user:{%d}:%s" % (i, name.encode())
                                                                            for i in range(20)] for name in pools}
        try:
            for name, port in ports.items():
                replies = pipeline(port, [[b"SET", k, b"v-" + k] for k in keys[name]])
                assert set(replies) == {b"+OK\r\n"}, replies[:3]
        finally:
            nc.kill()
            nc.wait(timeout=10)
        # the keys really are spread over the three servers (else the check below proves little)
        for name in pools:
            held = [sum(r == b":1\r\n" for r in pipeline(s.port, [[b"EXISTS", k] for k in keys[name]])) for s in srv]
            assert sum(held) == len(keys[name]) and sum(h > 0 for h in held) >= 2, (name, held)
        for name, port in ports.items():
            for attempt in range(30):  # nutcracker's listening socket may linger a moment
                sp = subprocess.Popen([sys.executable, "-m", "shmfabric.cli.main", "splice", "redis", "--twemproxy",
                                       str(conf), "--twemproxy-pool", name], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)
                try:
                    wait_port(port, timeout=10)
                    break
                except TimeoutError:
                    sp.kill()
                    out, err = sp.communicate(timeout=10)
                    assert "cannot listen" in err, err
                    time.sleep(0.2)
            try:
                values = pipeline(port, [[b"GET", k] for k in keys[name]])
                assert values == [b"$%d\r\nv-%s\r\n" % (len(k) + 2, k) for k in keys[name]], name
                # and the split MGET finds every key on its server too
                merged = pipeline(port, [[b"MGET", *keys[name]]])[0]
                assert merged.count(b"v-") == len(keys[name]) and b"$-1" not in merged
            finally:
                sp.terminate()
                sp.wait(timeout=10)


def test_flags_that_move_keys_off_a_twemproxy_file_are_warned_about(tmp_path: Path, capsys) -> None:
    path = _file(tmp_path, "p:\n  listen: 127.0.0.1:22121\n  redis: true\n  servers:\n   - 127.0.0.1:7001:1\n")
    assert main(["splice", "redis", "--twemproxy", str(path), "--listen", "127.0.0.1:22122", "--check"]) == 0
    assert "override" not in capsys.readouterr().err  # --listen moves no key
    assert main(["splice", "redis", "--twemproxy", str(path), "--hash", "md5", "--check"]) == 0
    assert "--hash override(s) the twemproxy file's key placement" in capsys.readouterr().err
    assert main(["splice", "redis", "--twemproxy", str(path), "--hash", "sha1", "--check"]) == 2
    assert f"{path} with --hash: field `hash`" in capsys.readouterr().err  # the flag is named, not only the file
