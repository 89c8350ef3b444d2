"""Smoke tests of the net and function-logic micro-benchmarks: they run and report every case
(timings are not asserted)."""
from shmfabric.bench import function_logic, net_parse


def test_net_parse_reports_every_case(capsys):
    rows = net_parse.run(frames=4, rounds=1)
    assert {r["op"] for r in rows} >= {"classify_batch", "decode", "flow_hash", "checksum"}
    assert all(float(r["ns_per_frame"]) > 0 for r in rows)
    assert net_parse.main(["--frames", "2", "--rounds", "1", "--json"]) == 0
    assert '"ns_per_frame"' in capsys.readouterr().out


def test_function_logic_reports_every_case():
    rows = function_logic.run(rounds=1)
    assert len(rows) == 5 and all(float(r["ns_per_packet"]) > 0 for r in rows)
