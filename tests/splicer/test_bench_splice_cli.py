"""`shmfabric bench splice`: the command runs the side-by-side comparison and reports ratios."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from shmfabric import programs


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


@pytest.mark.skipif(bool(programs.missing("wrk", "haproxy")), reason=programs.not_found("wrk", "haproxy"))
@pytest.mark.timeout(240)
def test_unequal_scenario_side_by_side_in_order():
    r = sf("bench", "splice", "--scenario", "unequal", "--workers", "1", "--duration", "1", "--rounds", "2", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    rows = out["http"]
    # the row (8 connections x pipelines of 16) and the same 128 requests in flight as 128
    # connections without pipelining, measured on the same proxy processes
    assert [(x["scenario"], x["connections"], x["depth"]) for x in rows] == [("unequal", 8, 16), ("unequal-depth1", 128, 1)]
    for row in rows:
        assert row["splicer"]["requests_per_s"] > 0 and row["haproxy"]["requests_per_s"] > 0
        assert row["ratio"] == pytest.approx(row["splicer"]["requests_per_s"] / row["haproxy"]["requests_per_s"], rel=0.01)
        # two rounds, the order alternating: splicer, haproxy, haproxy, splicer
        assert row["order"] == ["splicer", "haproxy", "haproxy", "splicer"]
        for peer, positions in (("splicer", [1, 4]), ("haproxy", [2, 3])):
            runs = row[peer]["runs"]
            assert [x["position"] for x in runs] == positions
            assert row[peer]["requests"] == sum(x["requests"] for x in runs)
            assert sorted([row[peer]["requests_per_s"], *(x["requests_per_s"] for x in runs)])[1] == pytest.approx(
                row[peer]["requests_per_s"])  # the median of two lies between them
        assert len(row["run_ratios"]) == 2
    assert rows[0]["splicer"]["out_of_order"] == 0  # every response in request order
    assert rows[0]["target"] == 5.0 and rows[1]["target"] is None and rows[1]["met"] is None
    assert rows[1]["splicer"]["out_of_order"] is None  # one request in flight per connection: not checked
    # what the figures were measured with
    meta = out["meta"]
    assert "bench splice --scenario unequal" in meta["command"]
    assert meta["commit"] is None or len(meta["commit"]) == 40
    assert meta["machine"]["cpus"] >= 1 and meta["machine"]["kernel"] and meta["machine"]["python"]


def test_render_table_shows_the_unpipelined_row_and_the_rounds():
    from shmfabric.bench.splice import render_table
    from shmfabric.bench.splice_http import ScenarioResult

    def peer(rps: float, ooo: int | None) -> dict:
        return {"requests_per_s": rps, "out_of_order": ooo, "non2xx": 0, "socket_errors": 0}
    order = ["splicer", "haproxy", "haproxy", "splicer"]
    rows = [ScenarioResult("unequal", 1, peer(2000, 0), peer(250, 0), 8.0, 5.0, 1, 8, 16, [7.5, 8.5], order),
            ScenarioResult("unequal-depth1", 1, peer(2500, None), peer(5000, None), 0.5, None, 1, 128, 1, [0.4, 0.6],
                           order)]
    table = render_table(rows)
    lines = table.splitlines()
    pipelined = next(x for x in lines if x.startswith("1. unequal"))
    plain = next(x for x in lines if x.startswith("1b. same 128 in flight"))
    assert "8x16" in pipelined and "8.00x" in pipelined and "7.50 8.50" in pipelined and "SHHS" in pipelined
    assert "128x1" in plain and "0.50x" in plain and "0.40 0.60" in plain and " n/a " in plain


@pytest.mark.parametrize("fault", [None, "out_of_order", "non2xx", "socket_errors"])
def test_a_target_is_met_only_by_a_clean_run(fault):
    # a splicer fast enough but answering out of order, with errors, or losing connections
    # has not met the target (it says: every response checked to be in request order)
    from shmfabric.bench.splice_http import ScenarioResult

    splicer = {"requests_per_s": 2000.0, "out_of_order": 0, "non2xx": 0, "socket_errors": 0}
    if fault:
        splicer[fault] = 3
    row = ScenarioResult("unequal", 1, splicer, {"requests_per_s": 250.0}, 8.0, 5.0)
    assert row.met is (fault is None)
    assert ScenarioResult("unequal", 1, splicer, {"requests_per_s": 250.0}, 4.0, 5.0).met is False


@pytest.mark.skipif(bool(programs.missing("redis-server", "redis-benchmark", "nutcracker", "haproxy")),
                    reason=programs.not_found("redis-server", "redis-benchmark", "nutcracker", "haproxy"))
@pytest.mark.timeout(240)
def test_redis_bench_one_and_two_each_and_the_mget_budget():
    res = bench_json("splice_redis", "--requests", "4000", "--mget-runs", "20", "--rounds", "2")
    for name in ("twemproxy", "splicer", "twemproxy_x2", "splicer_x2"):
        assert res[name]["set"] > 0 and res[name]["get"] > 0, name
        assert len(res[name]["runs"]) == 2, name
    assert res["ratios"]["get_ops_vs_twemproxy_two_each"] == pytest.approx(
        res["splicer_x2"]["get"] / res["twemproxy_x2"]["get"])
    assert len(res["ratios_per_round"]) == 2
    # the peers' order alternates from round to round (A B B A)
    assert res["order"]["throughput"] == ["twemproxy_x2", "splicer_x2", "twemproxy", "splicer",
                                          "splicer_x2", "twemproxy_x2", "splicer", "twemproxy"]
    mget = res["order"]["mget"]
    assert mget[6:] == mget[:6][::-1] and mget[0] == "direct"
    # as many connections per server on both sides
    assert res["twemproxy_server_connections"] == res["pool"] == 2
    # both servers hold part of the spread keys (none holds them all: "direct" is a third server)
    assert res["mget_spread_over"]["server0_of_first_200"] > 0 and res["mget_spread_over"]["server1_of_first_200"] > 0
    assert res["mget_spread_over"]["server0_of_first_200"] + res["mget_spread_over"]["server1_of_first_200"] == 200
    # each proxy's MGETs reached both spread servers (INFO commandstats), none the direct one;
    # the direct MGETs went to the third server only
    for name in ("splicer", "twemproxy"):
        calls = res["mget_calls"][name]
        assert calls["server0"] > 0 and calls["server1"] > 0 and calls["direct"] == 0, (name, calls)
    assert res["mget_calls"]["direct"]["direct"] > 0
    assert res["mget_calls"]["direct"]["server0"] == res["mget_calls"]["direct"]["server1"] == 0
    for name in ("relay_one", "twemproxy_one", "splicer_one"):
        assert res["mget_calls"][name]["direct"] > 0 and res["mget_calls"][name]["server0"] == 0, name
    assert res["meta"]["machine"]["cpus"] >= 1 and "splice_redis" in res["meta"]["command"]
    for name in ("splicer", "twemproxy", "relay_one", "twemproxy_one", "splicer_one"):
        m = res[f"mget_{name}"]
        assert m["p50_ms"] > 0 and m["proxy_user_us_per_mget"] + m["proxy_sys_us_per_mget"] == pytest.approx(m["cpu_us_per_mget"])
        assert m["servers_cpu_us_per_mget"] >= 0
    # the floor rows relay the same MGET to one server: the ratio printed is theirs
    assert res["ratios"]["mget_relay_floor_vs_direct"] == pytest.approx(
        res["mget_relay_one"]["p50_ms"] / res["mget_direct"]["p50_ms"])


@pytest.mark.skipif(bool(programs.missing("redis-server", "nutcracker")),
                    reason=programs.not_found("redis-server", "nutcracker"))
@pytest.mark.timeout(240)
def test_reload_bench_adds_a_server_under_load_and_no_command_runs_unanswered_through_the_splicer():
    res = bench_json("splice_reload", "--clients", "4", "--seconds", "2")
    for name in ("splicer", "twemproxy"):
        assert res[name]["answered"] > 0, name
    # A reload closes a connection only after answering every command it read: a command the
    # client got no answer for did not run (so sending it again is safe). Not a timing.
    assert res["splicer"]["ran_unanswered"] == 0, res["splicer"]
    assert res["splicer"]["refused"] == 0, res["splicer"]


@pytest.mark.skipif(bool(programs.missing("redis-server", "nutcracker")),
                    reason=programs.not_found("redis-server", "nutcracker"))
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


@pytest.mark.skipif(bool(programs.missing("redis-server", "nutcracker")),
                    reason=programs.not_found("redis-server", "nutcracker"))
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


@pytest.mark.skipif(bool(programs.missing("redis-server", "redis-cli", "nutcracker")),
                    reason=programs.not_found("redis-server", "redis-cli", "nutcracker"))
@pytest.mark.timeout(240)
def test_pipe_bench_times_every_stream_through_the_splicer_and_records_twemproxys_refusals():
    # Each figure is a time only if every command was answered without an error; otherwise the
    # bench records why (what twemproxy does with inline requests and redis-cli's final ECHO).
    res = bench_json("splice_pipe", "--commands", "3000")
    assert res["commands"] == 3000
    for rows in (res["streams"], res["redis_cli"]):
        assert len(rows) == 5
        for name, row in rows.items():
            assert isinstance(row["direct"], float) and isinstance(row["splicer"], float), (name, row)
    twem = res["streams"]
    assert isinstance(twem["multibulk SET"]["twemproxy"], float) and isinstance(twem["MGET of 3 keys over both servers"]["twemproxy"], float)
    assert all(isinstance(v, str) for k, v in twem["inline SET"].items() if k == "twemproxy")
    assert all(isinstance(row["twemproxy"], str) for row in res["redis_cli"].values())
