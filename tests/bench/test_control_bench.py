"""`shmfabric bench control`: the three states are really reached and every figure is there."""
from __future__ import annotations

import json

import pytest

from shmfabric import programs
from shmfabric.cli.main import main


def test_control_bench_reaches_each_state_and_compares_with_haproxy(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "control", "--requests", "40", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    fab = result["shmfabric"]
    assert set(fab) == {"idle", "forwarding", "blocked"}
    for state, r in fab.items():
        assert r["requests"] == 40 and 0 < r["p50_ms"] <= r["p99_ms"], (state, r)
    assert fab["idle"]["forwarded_during"] == 0  # no traffic yet
    assert fab["forwarding"]["forwarded_during"] > 0  # the generator's frames went through meanwhile
    assert fab["blocked"]["forwarded_during"] == 0  # its next hop was stopped: answered from the wait
    if programs.find("haproxy"):
        assert set(result["haproxy"]) == {"show info", "show stat"}
        assert len(result["ratios"]) == 6
    else:
        assert result["haproxy"] is None


def test_control_bench_table_and_bad_count(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "control", "--requests", "0"]) == 2
    assert "--requests must be at least 1" in capsys.readouterr().err


def test_control_bench_json_says_what_it_ran_with(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "control", "--requests", "5", "--json"]) == 0
    meta = json.loads(capsys.readouterr().out)["meta"]
    assert meta["command"] and meta["time_utc"].endswith("Z")  # (this process's command line: pytest here)
    assert meta["commit"] is None or len(meta["commit"]) == 40
    assert meta["machine"]["cpus"] >= 1 and len(meta["machine"]["loadavg"].split()) == 3
    assert main(["bench", "control", "--requests", "5"]) == 0
    assert "load average" in capsys.readouterr().out.splitlines()[-1]  # the same, under the table
