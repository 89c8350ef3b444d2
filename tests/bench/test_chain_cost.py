"""Smoke test of the chain functions' micro-benchmark: it runs and reports every case (timings
are not asserted)."""
from shmfabric.bench import chain_cost


def test_chain_cost_reports_every_function(capsys):
    rows = chain_cost.run([64], rounds=1)
    assert {(r["function"], r["frames"]) for r in rows} == {
        (f, k) for f in ("fw", "ids", "lb") for k in ("fabric batch", "bytes list")}
    assert all(r["ns_per_frame"] > 0 for r in rows)
    assert chain_cost.main(["--sizes", "64", "--rounds", "1", "--json"]) == 0
    assert '"ns_per_frame"' in capsys.readouterr().out


def test_tcp_window_rows_run_every_mode():
    # the rows assert inside that every handshake and data segment passed the firewall
    rows = chain_cost.tcp_window_rows(rounds=1)
    assert [r["frames"] for r in rows] == ["tcp strict", "tcp liberal", "tcp off"]
    assert all(r["function"] == "fw" and r["ns_per_frame"] > 0 for r in rows)
