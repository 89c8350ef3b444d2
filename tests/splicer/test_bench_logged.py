"""`shmfabric bench splice --scenario logged`: scenario 2 with X-Forwarded-For and an access log
in both proxies; the logs are counted against wrk and the header is echoed back by nginx."""
from __future__ import annotations

import pytest

from shmfabric.bench.splice import render_table
from shmfabric.bench.splice_http import WRK_CONNECTIONS, missing_tools, run_scenarios


@pytest.mark.timeout(180)
def test_logged_scenario_logs_every_request_and_forwards_the_client_address():
    need = missing_tools("wrk", "haproxy", "nginx")
    if need:
        pytest.skip(f"needs {', '.join(need)} (Debian packages; `make debs` installs them)")
    rows = run_scenarios(["logged"], [1], duration=1.0)
    assert len(rows) == 1
    row = rows[0]
    assert row.scenario == "logged" and row.workers == 1
    for name, peer in (("splicer", row.splicer), ("haproxy", row.haproxy)):
        assert peer["requests_per_s"] > 0 and peer["requests"] > 0, (name, peer)
        assert peer["non2xx"] == 0, (name, peer)
        # nginx's /xff location answers the X-Forwarded-For it received through the proxy
        assert peer["xff_echo"] == "127.0.0.1", (name, peer)
        # One line per request of the measured run (the warm-up's are not counted). Every
        # response wrk read was answered, hence logged; the requests still in flight when wrk
        # stopped (at most one pipeline per connection) may be logged too, and HAProxy also logs
        # a connection closed before its request (at most one per connection). Not a timing.
        slack = peer["in_flight_max"]
        assert peer["requests"] - slack <= peer["log_lines"] <= peer["requests"] + slack + WRK_CONNECTIONS, (name, peer)
    assert row.splicer["out_of_order"] == 0  # every response in request order, logging or not
    table = render_table(rows)
    assert "access logs of the measured run" in table
    assert f"{row.splicer['log_lines']:,}/{row.splicer['requests']:,}" in table
    assert "127.0.0.1 / 127.0.0.1" in table
