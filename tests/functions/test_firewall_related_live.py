"""ICMP errors about a connection the firewall accepted reach its ends (ct state related), with
real kernels: two namespaces over TAP adapters, a firewall function (`policy drop`, no ICMP rule)
then a router between them. Needs root; skipped with the reason otherwise."""
from __future__ import annotations

import os
import textwrap

import pytest

from shmfabric import programs
from shmfabric.bench.lan import FabricLan
from shmfabric.fabric import Fabric

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="TAP devices and network namespaces need root"),
    pytest.mark.skipif(programs.find("ip") is None, reason=programs.not_found("ip")),
    pytest.mark.skipif(not os.path.exists("/dev/net/tun"), reason="no /dev/net/tun (the tun module) on this machine"),
    pytest.mark.timeout(120),
]

# a UDP request to a port nothing listens on: the server's kernel answers ICMP port unreachable,
# which the client's kernel turns into ECONNREFUSED on the connected socket
PROBE = textwrap.dedent("""
    import socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(3)
    s.connect((sys.argv[1], int(sys.argv[2])))
    s.send(b"hello")
    try:
        s.recv(100)
        print("answered")
    except ConnectionRefusedError:
        print("refused")
    except socket.timeout:
        print("timeout")
""")


def probe(lan: FabricLan, port: int) -> str:
    r = lan.run(0, ["python3", "-c", PROBE, lan.ip(1), str(port)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def fw_counters(lan: FabricLan) -> dict:
    from shmfabric.functions.control import ControlClient

    fab = Fabric.open(lan.fabric)
    client = ControlClient(fab, "ops")
    try:
        return client.request("fw", {"op": "stats"}, timeout=10)["function_counters"]
    finally:
        client.close()
        fab.close()


def test_port_unreachable_for_an_accepted_udp_request_reaches_the_client_through_the_firewall() -> None:
    with FabricLan(2, firewall="policy drop\nudp dport 9999 accept") as lan:
        # (the first probe may go before ARP settled on both sides: the kernel retries nothing
        # for UDP, so look until one answer comes back)
        seen = [probe(lan, 9999) for _ in range(2)]
        counters = fw_counters(lan)
        assert "refused" in seen, seen  # the server kernel's port unreachable crossed the firewall
        assert counters["related"] >= 1, counters
        # a port the rules drop: the request dies at the firewall, nothing comes back
        assert probe(lan, 9998) == "timeout"
