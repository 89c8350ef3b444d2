"""`shmfabric bench splice --scenario tls,tls-handshake`: scenario 2 with both proxies terminating
TLS (same certificate), and the same with a new TLS connection per request. No timing or ratio
is asserted: only that both proxies answered over TLS, in order, and that each request of the
handshake rows came on its own connection."""
from __future__ import annotations

import pytest

from shmfabric.bench.splice import render_table
from shmfabric.bench.splice_http import missing_tools, run_scenarios


@pytest.mark.timeout(240)
def test_tls_scenarios_answer_over_tls_in_order_and_reconnect_per_request():
    need = missing_tools("wrk", "haproxy", "nginx")
    if need:
        pytest.skip(f"needs {', '.join(need)} (Debian packages; `make debs` installs them)")
    rows = run_scenarios(["tls", "tls-handshake"], [1], duration=1.0, rounds=2)
    assert [(r.scenario, r.workers) for r in rows] == [("tls", 1), ("tls-handshake", 1)]
    # the peers' order alternates within a row and from row to row
    assert rows[0].order == ["splicer", "haproxy", "haproxy", "splicer"]
    assert rows[1].order == ["haproxy", "splicer", "splicer", "haproxy"]
    for row in rows:
        for name, peer in (("splicer", row.splicer), ("haproxy", row.haproxy)):
            where = (row.scenario, name, peer)
            assert peer["requests_per_s"] > 0 and peer["requests"] > 0, where
            assert peer["out_of_order"] == 0 and peer["non2xx"] == 0, where
            # a probe through the proxy, verifying the bench's certificate: really TLS, really
            # proxied to one of the nginx backends (they answer "n1 /a" or "n2 /a")
            assert len(peer["runs"]) == 2, where
            for tls in (run["tls"] for run in peer["runs"]):
                assert tls["version"].startswith("TLSv1."), where
                assert tls["alpn"] == "http/1.1" and tls["status"] == 200, where
                assert tls["body"] in ("n1 /a", "n2 /a"), where
            assert peer["tls"] == peer["runs"][0]["tls"], where
    hs = rows[1]
    assert hs.target is None and hs.met is None  # connections/s: no target
    for name, peer in (("splicer", hs.splicer), ("haproxy", hs.haproxy)):
        # every response said Connection: close, so wrk opened a new connection for each request
        assert peer["closed"] == peer["requests"], (name, peer)
    # HAProxy's own counters over the measured run: at least one connection and one TLS
    # handshake (full or resumed) per completed request
    h = hs.haproxy
    assert h["connections"] >= h["requests"] and h["tls_full"] + h["tls_resumed"] >= h["requests"], h
    assert rows[0].splicer["closed"] == 0  # the pipelined rows keep their connections
    table = render_table(rows)
    assert "TLS through each proxy" in table and "new connections of the measured run" in table
