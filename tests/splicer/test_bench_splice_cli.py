"""`shmfabric bench splice`: the command runs the side-by-side comparison and reports ratios."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest


def sf(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shmfabric", *args], capture_output=True, text=True, timeout=timeout)


def bench_json(module: str, *args: str) -> dict:
    """Run `python -m shmfabric.bench.MODULE --json ARGS` and return what it printed."""
    r = subprocess.run([sys.executable, "-m", f"shmfabric.bench.{module}", "--json", *args],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_unknown_scenario_is_one_line():
    r = sf("bench", "splice", "--scenario", "bogus")
    assert r.returncode == 2
    assert "unknown scenario bogus" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.skipif(not all(shutil.which(b) for b in ("wrk", "haproxy")), reason="wrk and haproxy are needed")
@pytest.mark.timeout(240)
def test_unequal_scenario_side_by_side_in_order():
    r = sf("bench", "splice", "--scenario", "unequal", "--workers", "1", "--duration", "1", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["http"]
    assert len(rows) == 1
    row = rows[0]
    assert row["splicer"]["requests_per_s"] > 0 and row["haproxy"]["requests_per_s"] > 0
    assert row["splicer"]["out_of_order"] == 0  # every response in request order
    assert row["ratio"] == pytest.approx(row["splicer"]["requests_per_s"] / row["haproxy"]["requests_per_s"], rel=0.01)


@pytest.mark.skipif(not all(shutil.which(b) for b in ("redis-server", "redis-benchmark", "nutcracker", "haproxy")),
                    reason="redis-server, redis-benchmark (redis-tools), nutcracker and haproxy are needed")
@pytest.mark.timeout(240)
def test_redis_bench_one_and_two_each_and_the_mget_budget():
    res = bench_json("splice_redis", "--requests", "4000", "--mget-runs", "20")
    for name in ("twemproxy", "splicer", "twemproxy_x2", "splicer_x2"):
        assert res[name]["set"] > 0 and res[name]["get"] > 0, name
    assert res["ratios"]["get_ops_vs_twemproxy_two_each"] == pytest.approx(
        res["splicer_x2"]["get"] / res["twemproxy_x2"]["get"])
    # both servers hold part of the spread keys, so the proxies really split the MGET
    assert res["mget_spread_over"]["server0_of_first_200"] > 0 and res["mget_spread_over"]["server1_of_first_200"] > 0
    for name in ("splicer", "twemproxy", "relay_one", "twemproxy_one", "splicer_one"):
        m = res[f"mget_{name}"]
        assert m["p50_ms"] > 0 and m["proxy_user_us_per_mget"] + m["proxy_sys_us_per_mget"] == pytest.approx(m["cpu_us_per_mget"])
        assert m["servers_cpu_us_per_mget"] >= 0
    # the floor rows relay the same MGET to one server: the ratio printed is theirs
    assert res["ratios"]["mget_relay_floor_vs_direct"] == pytest.approx(
        res["mget_relay_one"]["p50_ms"] / res["mget_direct"]["p50_ms"])


@pytest.mark.skipif(not all(shutil.which(b) for b in ("redis-server", "nutcracker")),
                    reason="redis-server and nutcracker are needed")
@pytest.mark.timeout(240)
def test_reload_bench_adds_a_server_under_load_and_no_command_runs_unanswered_through_the_splicer():
    res = bench_json("splice_reload", "--clients", "4", "--seconds", "2")
    for name in ("splicer", "twemproxy"):
        assert res[name]["answered"] > 0, name
    # A reload closes a connection only after answering every command it read: a command the
    # client got no answer for did not run (so sending it again is safe). Not a timing.
    assert res["splicer"]["ran_unanswered"] == 0, res["splicer"]
    assert res["splicer"]["refused"] == 0, res["splicer"]


@pytest.mark.skipif(not all(shutil.which(b) for b in ("redis-server", "nutcracker")),
                    reason="redis-server and nutcracker are needed")
@pytest.mark.timeout(240)
def test_fanout_bench_scans_every_key_and_records_twemproxy():
    r = sf("bench", "splice", "--scenario", "fanout", "--json", timeout=240)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)["fanout"]
    n = res["keys"]
    assert sum(res["held_per_server"]) == n and min(res["held_per_server"]) > 0  # spread over both
    assert res["scan"]["splicer"]["keys_found"] == res["scan"]["direct"]["keys_found"] == n
    assert res["ratios"]["scan_time_splicer_vs_direct"] == pytest.approx(
        res["scan"]["splicer"]["seconds"] / res["scan"]["direct"]["seconds"])
    assert res["lock_cycles_per_s"]["splicer"] > 0 and res["dbsize_p50_ms"]["splicer"] > 0
    # twemproxy refuses whole-server commands: its answers are recorded, whatever they are
    assert set(res["twemproxy"]) == {"SCAN 0", "DBSIZE", "redis-py Lock acquire + release"}
    assert res["twemproxy"]["redis-py Lock acquire + release"] != "works"


@pytest.mark.skipif(not all(shutil.which(b) for b in ("redis-server", "nutcracker")),
                    reason="redis-server and nutcracker are needed")
@pytest.mark.timeout(240)
def test_pubsub_bench_delivers_every_message_and_item_and_records_twemproxy():
    # The bench itself fails (exit 2) on a message that does not arrive, arrives wrong, a
    # PUBLISH that does not count its one subscriber, or a BLPOP that gets another item.
    r = sf("bench", "splice", "--scenario", "pubsub", "--json", timeout=240)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)["pubsub"]
    for side in ("direct", "splicer"):
        assert res["messages_per_s"][side] > 0 and 0 < res["latency"][side]["p50_ms"] <= res["latency"][side]["p99_ms"]
    assert res["ratios"]["rate_splicer_vs_direct"] == pytest.approx(
        res["messages_per_s"]["splicer"] / res["messages_per_s"]["direct"])
    assert res["handoff"]["splicer"]["p50_ms"] > 0 and res["ratios"]["handoff_p50_splicer_vs_direct"] > 0
    assert set(res["twemproxy"]) == {"SUBSCRIBE", "BLPOP"}


@pytest.mark.skipif(not all(shutil.which(b) for b in ("redis-server", "redis-cli", "nutcracker")),
                    reason="redis-server, redis-cli and nutcracker are needed")
@pytest.mark.timeout(240)
def test_pipe_bench_times_every_stream_through_the_splicer_and_records_twemproxys_refusals():
    # Each figure is a time only if every command was answered without an error; otherwise the
    # bench records why (what twemproxy does with inline requests and redis-cli's final ECHO).
    res = bench_json("splice_pipe", "--commands", "3000")
    assert res["commands"] == 3000
    for rows in (res["streams"], res["redis_cli"]):
        assert len(rows) == 4
        for name, row in rows.items():
            assert isinstance(row["direct"], float) and isinstance(row["splicer"], float), (name, row)
    twem = res["streams"]
    assert isinstance(twem["multibulk SET"]["twemproxy"], float) and isinstance(twem["MGET of 3 keys over both servers"]["twemproxy"], float)
    assert all(isinstance(v, str) for k, v in twem["inline SET"].items() if k == "twemproxy")
    assert all(isinstance(row["twemproxy"], str) for row in res["redis_cli"].values())
