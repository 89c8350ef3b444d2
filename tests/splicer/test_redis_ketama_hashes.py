"""twemproxy's crc16, hsieh and jenkins key hashes: the functions, and 2000 keys placed as a real
nutcracker places them (ketama and modula), read back through a splicer started from the same
nutcracker.yml."""
from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from shmfabric.splicer.config import RedisSpliceConfig
from shmfabric.splicer.redis_ketama import HASHES, Ketama, KetamaServer, server_name
from shmfabric.splicer.twemproxy_conf import load_twemproxy

from .redis_fixtures import (SplicerThread, free_port, needs_nutcracker, needs_redis, pipeline, redis_servers,
                             start_nutcracker)

NEW = ("crc16", "hsieh", "jenkins")


def test_crc16_uses_twemproxy_05s_table() -> None:
    from shmfabric.splicer.redis_ketama import _CRC16

    # nc_crc16.c of nutcracker 0.5.0: the first and last rows of its table
    assert _CRC16[:8] == [0x0000, 0x1021, 0x2042, 0x3063, 0x4084, 0x50A5, 0x60C6, 0x70E7]
    assert _CRC16[-8:] == [0x6E17, 0x7E36, 0x4E55, 0x5E74, 0x2E93, 0x3EB2, 0x0ED1, 0x1EF0]


@pytest.mark.parametrize("key,crc16,hsieh,jenkins", [
    # from twemproxy's C functions built with gcc on x86-64 (nc_crc16.c of 0.5.0, nc_hsieh.c, nc_jenkins.c)
    (b"a", 31879, 2472816263, 3768813200),
    (b"abc", 2088017366, 3843582778, 2403423744),  # crc16's running value is never cut to 16 bits
    (b"key:1", 1880267265, 2159826137, 2193389018),
    (b"\xff\x80\xc3", 512900564, 3809240773, 1488110407),  # hsieh reads a 3-byte tail's last byte signed
    (b"hello world!x", 995602061, 1005526292, 3035823180),  # jenkins: one whole 12-byte block, then a tail
])
def test_hashes_equal_twemproxys_c(key: bytes, crc16: int, hsieh: int, jenkins: int) -> None:
    assert (HASHES["crc16"](key), HASHES["hsieh"](key), HASHES["jenkins"](key)) == (crc16, hsieh, jenkins)


def test_every_twemproxy_hash_is_offered() -> None:
    for h in NEW:
        cfg = RedisSpliceConfig.model_validate({"servers": ["127.0.0.1:1", "127.0.0.1:2"], "hash": h})
        assert cfg.hash == h


def _keys() -> list[bytes]:
    # the mix of /tmp/rev-twem/parity.py: plain, tagged, empty and unclosed tags, binary, UTF-8
    rnd = random.Random(7)
    keys = []
    for i in range(2000):
        m = i % 8
        if m == 0:
            k = f"key:{i}".encode()
        elif m == 1:
            k = f"{{user{i % 37}}}:field:{i}".encode()
        elif m == 2:
            k = f"{{}}empty{i}".encode()
        elif m == 3:
            k = f"a{{{i}".encode()
        elif m == 4:
            k = bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 30)))
        elif m == 5:
            k = f"x}}{{y{i}}}".encode()
        elif m == 6:
            k = ("ключ" + str(i)).encode()
        else:
            k = f"{{t{i % 5}}}{{second}}{i}".encode()
        keys.append(k)
    return list(dict.fromkeys(keys))


@needs_redis
@needs_nutcracker
@pytest.mark.timeout(240)
def test_2000_keys_are_placed_as_nutcracker_places_them(tmp_path: Path) -> None:
    keys = _keys()
    assert len(keys) > 1900
    pools = [(h, d) for h in NEW for d in ("ketama", "modula")]
    with redis_servers(tmp_path, 3) as srv:
        lines = [f"127.0.0.1:{srv[0].port}:1 alpha", f"127.0.0.1:{srv[1].port}:2", f"127.0.0.1:{srv[2].port}:3 gamma"]
        names = ["alpha", None, "gamma"]
        kservers = [KetamaServer(server_name("127.0.0.1", s.port, n), w) for s, w, n in zip(srv, (1, 2, 3), names)]
        conf = tmp_path / "nutcracker.yml"
        for attempt in range(3):
            ports = [free_port() for _ in pools]
            conf.write_text("".join(
                f"p{i}:\n  listen: 127.0.0.1:{port}\n  redis: true\n  hash: {h}\n  hash_tag: \"{{}}\"\n"
                f"  distribution: {d}\n  servers:\n" + "".join(f"   - {ln}\n" for ln in lines)
                for i, ((h, d), port) in enumerate(zip(pools, ports))))
            nc = start_nutcracker(conf, ports, tmp_path / "nc.log")
            if nc is not None:
                break
            if attempt == 2:
                raise TimeoutError("nutcracker did not listen on the ports picked for it, three times")
        try:
            time.sleep(0.2)
            for i, (h, d) in enumerate(pools):
                mine = [b"p%d/" % i + k for k in keys]
                assert set(pipeline(ports[i], [[b"SET", k, k] for k in mine])) == {b"+OK\r\n"}, (h, d)
        finally:
            nc.kill()
            nc.wait(timeout=10)
        for i, (h, d) in enumerate(pools):
            mine = [b"p%d/" % i + k for k in keys]
            held = [pipeline(s.port, [[b"EXISTS", k] for k in mine]) for s in srv]
            theirs = [[n for n in range(3) if held[n][j] == b":1\r\n"] for j in range(len(mine))]
            assert all(len(t) == 1 for t in theirs)
            assert len({t[0] for t in theirs}) == 3, (h, d)  # spread over the three servers
            ours = Ketama(kservers, hash_name=h, hash_tag=b"{}", distribution=d)
            differ = [(k, ours.locate(k), t[0]) for k, t in zip(mine, theirs) if ours.locate(k) != t[0]]
            assert not differ, f"{h}/{d}: {len(differ)} of {len(mine)} keys placed elsewhere, e.g. {differ[:3]}"
            # and a splicer started from the same file reads every one of them back
            data, _ = load_twemproxy(conf, f"p{i}")
            data["listen"] = f"127.0.0.1:{free_port()}"
            sp = SplicerThread(RedisSpliceConfig.model_validate(data))
            try:
                got = pipeline(sp.port, [[b"GET", k] for k in mine])
                assert got == [b"$%d\r\n%s\r\n" % (len(k), k) for k in mine], f"{h}/{d}"
            finally:
                sp.stop()
