"""`shmfabric bench memif`: its table, and one short run end to end against testpmd."""
from __future__ import annotations

import pytest

from shmfabric.bench.memif import format_table, run
from shmfabric.bench.testpmd import testpmd_available


def test_the_table_has_both_directions_per_size_with_ratios() -> None:
    res = {"runs": 3, "seconds": 5.0, "sizes": [64, 1500],
           "median": {"in-64": {"fabric_fps": 1e6, "dpdk_fps": 4e6}, "out-64": {"fabric_fps": 2e6, "dpdk_fps": 4e6},
                      "in-1500": {"fabric_fps": 5e5, "dpdk_fps": 2e6},
                      "out-1500": {"fabric_fps": 1e6, "dpdk_fps": 2e6}}}
    text = format_table(res)
    assert text.count("testpmd txonly -> memif port -> sink node") == 2
    assert text.count("sender node -> memif port -> testpmd rxonly") == 2
    assert "0.250x" in text and "0.500x" in text and "1,000,000" in text


@pytest.mark.skipif(testpmd_available() is not None, reason=f"needs DPDK's testpmd: {testpmd_available()}")
def test_a_short_run_measures_both_sides_and_leaves_nothing() -> None:
    import glob

    before = set(glob.glob("/dev/shm/shmfabric-bm*"))
    res = run(seconds=0.5, runs=1, sizes=(64,))
    for key in ("in-64", "out-64"):
        m = res["median"][key]
        assert m["fabric_fps"] > 0 and m["dpdk_fps"] > 0, res
        counters = res["samples"][key][0]["fabric_counters"]
        assert counters["link_ups"] == 1  # the port's own report, read from `shmfabric memif --json`
    assert set(glob.glob("/dev/shm/shmfabric-bm*")) == before  # the bench's fabrics are gone
