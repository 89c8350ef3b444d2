"""`shmfabric bench splice`: the command runs the side-by-side comparison and reports ratios."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest


def sf(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shmfabric", *args], capture_output=True, text=True, timeout=timeout)


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
