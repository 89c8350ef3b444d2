"""Key placement: the continuum itself, and equality with a real twemproxy (nutcracker)."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from shmfabric.splicer.redis_ketama import HASHES, Ketama, KetamaServer, hash_key, server_name

from .redis_fixtures import free_port, needs_nutcracker, needs_redis, pipeline, redis_servers, start_nutcracker


def test_points_per_server_follow_twemproxy_weights() -> None:
    assert Ketama([KetamaServer("a:1"), KetamaServer("b:1")]).npoints == 320
    # weights 1 and 2 of 3: floorf(pct*160/4*2) * 4 -> 26*4 and 53*4
    assert Ketama([KetamaServer("a:1", 1), KetamaServer("b:1", 2)]).npoints == 104 + 212
    assert Ketama([KetamaServer("a:1"), KetamaServer("b:1")], live=[True, False]).npoints == 160


def test_placement_is_stable_and_spread() -> None:
    k = Ketama([KetamaServer(f"10.0.0.{i}:6379") for i in range(4)])
    where = [k.locate(b"key:%d" % i) for i in range(4000)]
    assert where == [k.locate(b"key:%d" % i) for i in range(4000)]
    counts = [where.count(i) for i in range(4)]
    assert min(counts) > 600, counts  # ketama spreads roughly evenly (1000 each on average)


def test_removing_a_server_moves_only_its_keys() -> None:
    servers = [KetamaServer(f"10.0.0.{i}:6379") for i in range(4)]
    full = Ketama(servers)
    less = Ketama(servers, live=[True, True, False, True])
    for i in range(2000):
        key = b"k%d" % i
        if full.locate(key) != 2:
            assert less.locate(key) == full.locate(key)
        else:
            assert less.locate(key) != 2


def test_names_and_hash_tags() -> None:
    assert server_name("127.0.0.1", 6379) == "127.0.0.1:6379"
    assert server_name("127.0.0.1", 11211) == "127.0.0.1"
    assert server_name("127.0.0.1", 6379, "shard-a") == "shard-a"
    assert hash_key(b"user:{42}:name", "md5", b"{}") == hash_key(b"42", "md5")
    assert hash_key(b"user:{}:name", "md5", b"{}") == hash_key(b"user:{}:name", "md5")  # empty tag: whole key
    assert hash_key(b"", "fnv1a_64") == 0
    with pytest.raises(ValueError):
        Ketama([KetamaServer("a:1")], hash_name="sha1")
    with pytest.raises(ValueError):
        KetamaServer("a:1", 0)
    with pytest.raises(ValueError, match="use ketama or modula"):
        Ketama([KetamaServer("a:1")], distribution="random")


def test_modula_slots_follow_weights_in_twemproxy_server_order() -> None:
    # twemproxy sorts its server array by name (shorter first, then bytewise): "b:1" < "aa:1"
    k = Ketama([KetamaServer("aa:1", 2), KetamaServer("b:1", 1)], distribution="modula")
    assert k._index == [1, 0, 0]
    assert [k.dispatch(h) for h in range(6)] == [1, 0, 0, 1, 0, 0]
    assert k.locate(b"") == k.dispatch(0)  # an empty key hashes to 0
    down = Ketama([KetamaServer("aa:1", 2), KetamaServer("b:1", 1)], live=[True, False], distribution="modula")
    assert {down.locate(b"k%d" % i) for i in range(50)} == {0}
    with pytest.raises(LookupError):
        Ketama([KetamaServer("aa:1"), KetamaServer("b:1")], live=[False, False], distribution="modula").dispatch(5)


KEYS = [b"key:%d" % i for i in range(150)] + [b"\xff\x80\xc3\xa9-%d" % i for i in range(50)] + [
    b"user:{%d}:x" % i for i in range(20)]

POOLS = [(h, "ketama", None) for h in sorted(HASHES)] + [("md5", "ketama", "{}"), ("fnv1a_64", "ketama", "{}")] + [
    ("fnv1a_64", "modula", None), ("md5", "modula", None), ("crc32a", "modula", "{}")]


@needs_redis
@needs_nutcracker
@pytest.mark.timeout(120)
def test_placement_equals_nutcracker(tmp_path: Path) -> None:
    with redis_servers(tmp_path, 3) as srv:
        weights = [1, 1, 2]
        names = [None, None, "shard-c"]
        lines = [f"127.0.0.1:{s.port}:{w}" + (f" {n}" if n else "") for s, w, n in zip(srv, weights, names)]
        for attempt in range(3):
            # Ports picked free can be taken before nutcracker binds them (by any outgoing
            # connection); nutcracker then exits, and a fresh set of ports is tried.
            conf = []
            ports = []
            for i, (h, dist, tag) in enumerate(POOLS):
                port = free_port()
                ports.append(port)
                conf.append(f"pool{i}:\n  listen: 127.0.0.1:{port}\n  hash: {h}\n  distribution: {dist}\n"
                            f"  redis: true\n  auto_eject_hosts: false\n" + (f"  hash_tag: \"{tag}\"\n" if tag else "")
                            + "  servers:\n" + "".join(f"   - {ln}\n" for ln in lines))
            cfg = tmp_path / "nutcracker.yml"
            cfg.write_text("".join(conf))
            proc = start_nutcracker(cfg, ports, tmp_path / "nc.log")
            if proc is not None:
                break
            if attempt == 2:
                raise TimeoutError("nutcracker did not listen on the ports picked for it, three times")
        try:
            time.sleep(0.2)
            kservers = [KetamaServer(server_name("127.0.0.1", s.port, n), w) for s, w, n in zip(srv, weights, names)]
            for i, ((h, dist, tag), port) in enumerate(zip(POOLS, ports)):
                prefix = b"p%d/" % i
                keys = [prefix + k for k in KEYS]
                replies = pipeline(port, [[b"SET", k, b"1"] for k in keys])
                assert all(r == b"+OK\r\n" for r in replies), replies[:3]
                ours = Ketama(kservers, hash_name=h, hash_tag=(tag or "").encode(), distribution=dist)
                held = [pipeline(s.port, [[b"EXISTS", k] for k in keys]) for s in srv]
                mismatches = []
                for j, k in enumerate(keys):
                    theirs = [n for n in range(3) if held[n][j] == b":1\r\n"]
                    assert len(theirs) == 1, (k, theirs)
                    if ours.locate(k) != theirs[0]:
                        mismatches.append((k, ours.locate(k), theirs[0]))
                assert not mismatches, f"hash {h}/{dist}/tag {tag}: {len(mismatches)} keys differ, e.g. {mismatches[:3]}"
        finally:
            proc.kill()
            proc.wait(timeout=10)
