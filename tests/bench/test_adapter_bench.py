"""`shmfabric bench adapter`: its table, and the kernel peer it runs the firewall case against."""
from __future__ import annotations

import os

import pytest

from shmfabric import programs
from shmfabric.bench.adapter import ROWS, format_table
from shmfabric.bench.lan import RoutedVethLan, connect_times_out, wait_until


def _figures(scale: float) -> dict:
    return {key: scale * (i + 1) for i, (key, _, _) in enumerate(ROWS)}


def test_the_table_has_every_row_for_every_mtu_and_the_firewall_case_with_ratios() -> None:
    res = {"runs": 3, "seconds": 5.0, "mtus": [1500, 9000],
           "median": {"fabric-1500": _figures(1), "veth-1500": _figures(2), "chain-1500": _figures(0.5),
                      "nft-1500": _figures(4), "fabric-9000": _figures(1), "veth-9000": _figures(4)}}
    text = format_table(res)
    for _, label, _ in ROWS:
        assert text.count(label) == (3 if "CPU" not in label else 2), label
    assert "0.50x" in text and "0.25x" in text  # fabric/veth at 1500 and 9000
    assert "0.12x" in text  # the firewall case: fabric+fw / veth+nft
    assert "veth+nft" in text


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
@pytest.mark.skipif(bool(programs.missing("ip", "nft", "redis-server", "redis-cli")),
                    reason=programs.not_found(*(programs.missing("ip", "nft", "redis-server", "redis-cli") or ["nft"])))
def test_the_nft_router_peer_forwards_the_accepted_port_and_drops_another(tmp_path) -> None:
    with RoutedVethLan(accept_tcp=(6390,)) as lan:
        for port in (6390, 6391):
            lan.redis(1, port, str(tmp_path))
        assert lan.ip(0) != lan.ip(1) and lan.ip(0).rsplit(".", 1)[0] != lan.ip(1).rsplit(".", 1)[0]  # two subnets
        ok = ["redis-cli", "-h", lan.ip(1), "-p", "6390", "PING"]
        assert wait_until(lambda: lan.run(0, ok, capture_output=True, text=True).stdout.strip() == "PONG", timeout=20)
        # the other port: its SYNs die in the forward chain (a timeout, not a refusal)
        assert connect_times_out(lan, 0, lan.ip(1), 6391)
        assert not connect_times_out(lan, 0, lan.ip(1), 6390)
        # the router namespace really forwards: the hosts have no route to each other but through it
        assert "via" in lan.run(0, ["ip", "route", "get", lan.ip(1)], capture_output=True, text=True).stdout
