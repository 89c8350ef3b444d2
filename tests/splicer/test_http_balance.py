"""How the HTTP splicer spreads a route's requests: weights and backup servers.

Real sockets on loopback (asyncio echo backends); no test asserts a duration.
"""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from shmfabric.splicer.config import HttpSpliceConfig, parse_backend

from .test_http_proxy import Env, get, read_replies, run, wait_for

pytestmark = pytest.mark.timeout(60)


def test_backend_words_are_parsed_and_mistakes_named():
    assert parse_backend("127.0.0.1:9001") == ("127.0.0.1:9001", 1, False)
    assert parse_backend(" [::1]:9001  weight=3 backup ") == ("[::1]:9001", 3, True)
    for text, fragment in [("127.0.0.1:9001 weight=0", "from 1 to 256"), ("127.0.0.1:9001 weight=x", "from 1 to 256"),
                           ("127.0.0.1:9001 weight=257", "from 1 to 256"),
                           ("127.0.0.1:9001 wieght=3", "unknown word 'wieght=3'"), ("nope", "is not HOST:PORT")]:
        with pytest.raises(ValueError, match=fragment):
            parse_backend(text)
    for text, fragment in [("127.0.0.1:9001 weight=\u00b2", "from 1 to 256"),  # a superscript two
                           ("127.0.0.1:9001 weight=\u0661", "from 1 to 256"),  # an Arabic-Indic one
                           ("127.0.0.1:9001 weight=2 weight=5", "'weight' is given twice"),
                           ("backup", "a word of the backend before it")]:
        with pytest.raises(ValueError, match=fragment):
            parse_backend(text)
    with pytest.raises(ValidationError, match=r"127.0.0.1:9001 is listed twice"):
        HttpSpliceConfig(default=["127.0.0.1:9001", "127.0.0.1:9001 weight=3"])
    with pytest.raises(ValidationError, match=r"weight is a whole number"):
        HttpSpliceConfig(routes=[{"prefix": "/a", "backends": ["127.0.0.1:1 weight=0"]}])
    cfg = HttpSpliceConfig(default=["127.0.0.1:1   weight=2", "127.0.0.1:2 backup"])
    assert cfg.default == ["127.0.0.1:1 weight=2", "127.0.0.1:2 backup"]  # normalised


def _count(be) -> int:
    return sum(1 for p in be.stats.paths if p.startswith(b"/w"))


def test_requests_in_flight_follow_the_weights():
    async def main():
        env = Env()
        try:
            a = await env.backend("a")
            b = await env.backend("b")
            await env.splice(default=[f"{a.address} weight=3", b.address], pool={"min": 0, "max": 64})
            r, w = await env.connect()
            # 40 slow GETs in one pipeline: all are in flight together, spread by load per weight
            w.write(b"".join(get(f"/w{i}?delay=300", i) for i in range(40)))
            replies, _ = await read_replies(r, [b"GET"] * 40)
            assert [x.seq for x in replies] == [str(i).encode() for i in range(40)]
            assert _count(a) + _count(b) == 40
            assert abs(_count(a) - 30) <= 2 and abs(_count(b) - 10) <= 2, (_count(a), _count(b))
        finally:
            await env.close()
    run(main())


def test_requests_to_idle_fast_servers_split_in_the_ratio_of_the_weights():
    # One request at a time: every server is idle when each comes (the case of fast backends),
    # so the load never differs and the weighted round-robin among equals decides.
    async def main():
        env = Env()
        try:
            a = await env.backend("a")
            b = await env.backend("b")
            await env.splice(default=[f"{a.address} weight=3", b.address])
            r, w = await env.connect()
            for i in range(40):
                w.write(get(f"/w{i}", i))
                replies, _ = await read_replies(r, [b"GET"], probe=False)
                assert replies[0].status == 200
            assert (_count(a), _count(b)) == (30, 10)
        finally:
            await env.close()
    run(main())


def test_a_backup_server_takes_requests_only_while_no_other_is_up():
    async def main():
        env = Env()
        try:
            a = await env.backend("a")
            b = await env.backend("b")
            sp = await env.splice(default=[a.address, f"{b.address} backup"],
                                  health={"enabled": True, "interval": 0.1, "timeout": 0.5, "fall": 1, "rise": 1})
            r, w = await env.connect()
            w.write(b"".join(get(f"/w{i}?delay=20", i) for i in range(10)))
            replies, _ = await read_replies(r, [b"GET"] * 10)
            assert len(replies) == 10 and _count(a) == 10 and _count(b) == 0
            primary = a.address
            await a.close()  # the primary dies: checks take it out of rotation
            await wait_for(lambda: not sp.servers[primary].up)
            w.write(b"".join(get(f"/w{i}", i) for i in range(10, 20)))
            replies, _ = await read_replies(r, [b"GET"] * 10)
            assert [x.status for x in replies] == [200] * 10 and _count(b) == 10
        finally:
            await env.close()
    run(main())


def test_the_cli_takes_weights_and_backups_in_route_and_default(capsys):
    import json

    from shmfabric.cli.main import main as cli_main

    assert cli_main(["splice", "http", "--route", "/api=127.0.0.1:9001 weight=3,127.0.0.1:9002 backup",
                     "--route", "~a=b$=127.0.0.1:9003", "--default", "127.0.0.1:9004 weight=2", "--check"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert [(r.get("prefix") or r.get("regex"), r["backends"]) for r in cfg["routes"]] == [
        ("/api", ["127.0.0.1:9001 weight=3", "127.0.0.1:9002 backup"]), ("a=b$", ["127.0.0.1:9003"])]
    assert cfg["default"] == ["127.0.0.1:9004 weight=2"]


def test_a_refused_connection_is_tried_on_every_other_server_backups_included(tmp_path):
    # Two main servers that refuse connections and are still believed up (no checks yet): the
    # request goes on to the backup instead of ending in a 502 after one retry.
    from .test_http_access_log import parse_text

    log = tmp_path / "access.log"

    async def main():
        env = Env()
        try:
            b = await env.backend("b")
            dead = ["127.0.0.1:1", "127.0.0.1:2"]
            await env.splice(default=[f"{dead[0]} weight=2", dead[1], f"{b.address} backup"],
                             pool={"min": 0, "max": 4}, access_log=str(log))
            r, w = await env.connect()
            w.write(b"".join(get(f"/w{i}", i) for i in range(6)))
            replies, _ = await read_replies(r, [b"GET"] * 6)
            assert [x.status for x in replies] == [200] * 6 and _count(b) == 6
            await wait_for(lambda: log.exists() and log.read_text().count("\n") >= 6)
        finally:
            await env.close()
    run(main())
    tries = [parse_text(x)["tries"] for x in log.read_text().splitlines(keepends=True)]
    assert max(tries) == 3, tries  # both main servers, then the backup


@pytest.mark.parametrize("servers, tries", [(["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"], 3), (["127.0.0.1:1"], 2)])
def test_a_route_whose_servers_all_refuse_ends_in_one_502_after_each_was_tried(tmp_path, servers, tries):
    from .test_http_access_log import parse_text

    log = tmp_path / "access.log"

    async def main():
        env = Env()
        try:
            await env.splice(default=servers, pool={"min": 0, "max": 2}, access_log=str(log))
            r, w = await env.connect()
            w.write(get("/x", 1))
            replies, _ = await read_replies(r, [b"GET"])
            assert replies[0].status == 502
            await wait_for(lambda: log.exists() and log.read_text())
        finally:
            await env.close()
    run(main())
    (rec,) = [parse_text(x) for x in log.read_text().splitlines(keepends=True)]
    assert rec["tries"] == tries and "cannot connect" in rec["error"], rec  # each server once; a lone one twice
