"""`shmfabric bench global`: its table and parsing, one short run of every case end to end, and
the cleanup when it is stopped by SIGTERM halfway."""
from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from shmfabric import programs
from shmfabric.bench import global_net
from shmfabric.bench.global_net import BenchError, CASES, WORKLOADS, format_table, parse_wrk, summarize

_ROOT_ONLY = [
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and TAP devices need root"),
    pytest.mark.skipif(bool(programs.missing(*global_net.PROGRAMS)),
                       reason=programs.not_found(*(programs.missing(*global_net.PROGRAMS) or ["wrk"]))),
    pytest.mark.skipif(not os.path.exists("/dev/net/tun"), reason="no /dev/net/tun (the tun module) on this machine"),
]


def root_only(test):
    for mark in _ROOT_ONLY:
        test = mark(test)
    return test

WRK_OUT = """Running 1s test @ http://10.77.5.100/
  1 threads and 8 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   310.12us  120.50us   4.10ms   90.00%
    Req/Sec    27.61k     1.20k   29.00k    80.00%
  27611 requests in 1.00s, 4.01MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:  27611.13
Transfer/sec:      4.01MB
"""


def _run(rate: float, members: list[int], error: str | None = None) -> dict:
    return {"requests": int(rate), "rate": rate, "socket_errors": 0, "non_2xx": 0, "members": members,
            "member_connections": members, "error": error}


def _result() -> dict:
    samples = {case: {wl: [_run(1000.0 * (i + 1) * (j + 1), [50, 50])] for j, wl in enumerate(WORKLOADS)}
               for i, case in enumerate(CASES)}
    samples["nft"]["close"] = [_run(10.0, [10, 0], "member 2 answered no request (split 10 / 0)")]
    return {"seconds": 1, "runs": 1, "connections": 8, "cases": list(CASES), "workloads": list(WORKLOADS),
            **summarize(samples), "samples": samples, "dispatcher": [{}]}


def test_wrk_output_gives_requests_rate_socket_errors_and_non_2xx() -> None:
    assert parse_wrk(WRK_OUT) == {"requests": 27611, "rate": 27611.13, "socket_errors": 3, "non_2xx": 4}
    with pytest.raises(BenchError, match="wrk printed no result"):
        parse_wrk("unable to connect to 10.77.5.100:80 Connection refused\n")


def test_a_workload_with_an_error_in_any_run_has_no_median_and_keeps_its_message() -> None:
    res = _result()
    assert res["median"]["nft"]["close"] is None
    assert res["median"]["nft"]["keepalive"] == 3000.0
    assert res["errors"] == {"nft": {"close": ["member 2 answered no request (split 10 / 0)"]}}
    assert res["members"]["fabric"]["keepalive"] == [50, 50]
    assert global_net.has_errors(res)


def test_the_table_shows_each_workload_against_each_peer_with_ratios_the_split_and_the_errors() -> None:
    text = format_table(_result())
    assert text.count(" vs direct") == 2 and text.count(" vs nft") == 2 and text.count(" vs haproxy") == 2
    assert "0.50x" in text  # fabric 1,000 req/s vs direct 2,000
    assert "0.25x" in text  # fabric 1,000 vs haproxy 4,000
    assert "error" in text.split(" vs nft", 2)[2].splitlines()[0]  # the close row against nft: no figure, no ratio
    assert "nft close" not in text and "nft new connection: member 2 answered no request" in text
    assert "  fabric   keep-alive 50 / 50" in text


def test_a_dispatcher_that_did_not_stop_cleanly_is_reported_and_counts_as_an_error() -> None:
    res = _result()
    res["samples"]["nft"]["close"] = [_run(10.0, [5, 5])]
    res.update(summarize(res["samples"]))
    assert not global_net.has_errors(res)
    res["dispatcher"] = [{"error": "the dispatcher exited with 1: boom"}]
    assert global_net.has_errors(res)
    assert "the dispatcher at its stop: the dispatcher exited with 1: boom" in format_table(res)


def test_not_root_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(BenchError, match="needs root"):
        global_net.check_prerequisites()


def _workdirs() -> set[str]:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "shmfabric-global-*")))


def _bench(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "shmfabric", "bench", "global", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


@root_only
def test_a_short_run_moves_requests_in_every_case_and_spreads_them_over_both_members() -> None:
    before = _workdirs()
    p = _bench("--seconds", "1", "--runs", "1", "--json")
    out, err = p.communicate(timeout=170)
    assert p.returncode == 0, f"exit {p.returncode}: {err[-2000:]}\n{out[-2000:]}"
    res = json.loads(out)
    # what the figures were measured with, beside them
    assert "bench global" in res["meta"]["command"] and res["meta"]["machine"]["loadavg"]
    assert "nft" in res["meta"]["peers"] and "haproxy" in res["meta"]["peers"]
    assert res["cases"] == ["fabric", "direct", "nft", "haproxy"] and res["workloads"] == ["keepalive", "close"]
    assert res["errors"] == {}, res["errors"]
    for case in CASES:
        for wl in WORKLOADS:
            (run,) = res["samples"][case][wl]
            assert run["error"] is None and run["requests"] > 0 and res["median"][case][wl] == run["rate"] > 0
            m1, m2 = run["members"]
            if case == "direct":  # member 1's own address: member 2 has no part in it
                assert m1 > 0 and m2 == 0, (case, wl, run)
            else:
                assert m1 > 0 and m2 > 0, (case, wl, run)
    # the dispatcher's own report (its --json line at SIGTERM), read back: it placed connections
    # (fewer than wrk made: a client port reused while its member still holds the old connection
    # keeps its entry)
    (counters,) = res["dispatcher"]
    assert counters.get("table_placed", 0) > 0, counters
    text = format_table(res)
    assert "fabric/peer" in text and "errors" not in text
    assert _workdirs() == before  # the nginx/haproxy configs and logs are gone


def _nginx_of(workdir: str) -> list[int]:
    pids = []
    for d in glob.glob("/proc/[0-9]*"):
        try:
            with open(f"{d}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
        except OSError:
            continue
        if any(a.startswith(workdir.encode()) for a in cmd):
            pids.append(int(d[6:]))
    return pids


@root_only
def test_sigterm_halfway_removes_the_namespaces_servers_and_files() -> None:
    before = _workdirs()
    p = _bench("--seconds", "1", "--runs", "1")
    try:
        deadline = time.monotonic() + 60
        pids: list[int] = []
        while not pids and time.monotonic() < deadline and p.poll() is None:
            time.sleep(0.2)
            pids = [pid for w in _workdirs() - before for pid in _nginx_of(w)]
        assert pids, f"no nginx of the bench appeared: {p.stderr.read() if p.poll() is not None else ''}"
        (workdir,) = _workdirs() - before
        namespaces = {subprocess.run(["ip", "netns", "identify", str(pid)], capture_output=True,
                                     text=True).stdout.strip() for pid in pids} - {""}
        assert namespaces
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode != 0
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not [ns for ns in namespaces if ns in listed.split()], listed
    assert not os.path.exists(workdir)
    assert not _nginx_of(workdir)

