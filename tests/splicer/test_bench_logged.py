"""`shmfabric bench splice --scenario logged`: scenario 2 with X-Forwarded-For and an access log
in both proxies, written to the same sink (a pipe read by a `cat` of their own); the logs are
counted against wrk and the header is echoed back by nginx."""
from __future__ import annotations

import pytest

from shmfabric.bench.splice import render_table
from shmfabric.bench.splice_http import LOG_SINK, WRK_CONNECTIONS, missing_tools, run_scenarios


@pytest.mark.timeout(180)
def test_logged_scenario_logs_every_request_and_forwards_the_client_address():
    need = missing_tools("wrk", "haproxy", "nginx")
    if need:
        pytest.skip(f"needs {', '.join(need)} (Debian packages; `make debs` installs them)")
    rows = run_scenarios(["logged"], [1], duration=1.0, rounds=2)
    assert len(rows) == 1
    row = rows[0]
    assert row.scenario == "logged" and row.workers == 1
    assert row.order == ["splicer", "haproxy", "haproxy", "splicer"]
    for name, peer in (("splicer", row.splicer), ("haproxy", row.haproxy)):
        assert peer["requests_per_s"] > 0 and peer["requests"] > 0, (name, peer)
        assert peer["non2xx"] == 0, (name, peer)
        # nginx's /xff location answers the X-Forwarded-For it received through the proxy
        assert peer["xff_echo"] == "127.0.0.1", (name, peer)
        # both write to the same kind of sink: standard output, a pipe read by a cat of their own
        assert peer["log_sink"] == LOG_SINK, (name, peer)
        assert len(peer["runs"]) == 2
        for run in peer["runs"]:
            # One line per request of the measured run (the warm-up's are not counted). Every
            # response wrk read was answered, hence logged; the requests still in flight when wrk
            # stopped (at most one pipeline per connection) may be logged too, and HAProxy also
            # logs a connection closed before its request (at most one per connection). HAProxy
            # drops a line when the pipe is full: those are counted, and missing. Not a timing.
            slack = run["in_flight_max"]
            dropped = run["dropped_logs"] or 0
            assert run["requests"] - slack - dropped <= run["log_lines"] <= run["requests"] + slack + WRK_CONNECTIONS, \
                (name, run)
        assert peer["log_lines"] == sum(r["log_lines"] for r in peer["runs"])
    assert row.splicer["dropped_logs"] is None and isinstance(row.haproxy["dropped_logs"], int)
    assert row.splicer["out_of_order"] == 0  # every response in request order, logging or not
    table = render_table(rows)
    assert "access logs of the measured runs" in table
    assert f"{row.splicer['log_lines']:,}/{row.splicer['requests']:,}" in table
    assert "127.0.0.1 / 127.0.0.1" in table
    assert f"log sink of both: {LOG_SINK}" in table
