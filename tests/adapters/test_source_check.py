"""`shmfabric adapter --source-check`: frames naming another sender never reach the fabric.

Real namespaces, real kernels on both sides: the attacks are sent with a raw packet socket from
inside a namespace (what any program with CAP_NET_RAW there can do), and each is run once against
an unchecked adapter too, to show it works there (so the checked case's result is the check's).
Needs root; skipped with the reason otherwise.
"""
from __future__ import annotations

import os
import re
import textwrap
import time

import pytest

from shmfabric import programs
from shmfabric.bench.lan import FabricLan

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="TAP devices and network namespaces need root"),
    pytest.mark.skipif(programs.find("ip") is None,
                       reason=programs.not_found("ip", fix="Debian iproute2: `make setup` installs it as root")),
    pytest.mark.skipif(programs.find("ping") is None, reason=programs.not_found("ping")),
    pytest.mark.skipif(not os.path.exists("/dev/net/tun"), reason="no /dev/net/tun (the tun module) on this machine"),
    pytest.mark.timeout(120),
]


class CheckedLan(FabricLan):
    """A fabric LAN whose hosts' adapters get their own extra options (`args[host]`), and with
    `v6` an IPv6 address each (fd00:77::HOST+1/64)."""

    def __init__(self, hosts: int, args: dict[int, list[str]], v6: bool = False) -> None:
        super().__init__(hosts)
        self.args = args
        self.v6 = v6

    def ip6(self, host: int) -> str:
        return f"fd00:77::{host + 1}"

    def adapter_argv(self, host: int) -> list[str]:
        extra = ["--address", f"{self.ip6(host)}/64"] if self.v6 else []
        return super().adapter_argv(host) + extra + self.args.get(host, [])


def mac_of(lan: FabricLan, host: int) -> str:
    return re.search(r"mac ([0-9a-f:]{17})", lan.ready[host]).group(1)  # type: ignore[union-attr]


def neighbour(lan: FabricLan, host: int, ip: str) -> str | None:
    out = lan.run(host, ["ip", "neigh", "show", ip, "dev", "sf0"], capture_output=True, text=True).stdout
    m = re.search(r"lladdr ([0-9a-f:]{17})", out)
    return m.group(1) if m else None


def ping(lan: FabricLan, host: int, dst: str, *opts: str) -> bool:
    r = lan.run(host, ["ping", "-c", "2", "-i", "0.2", "-W", "2", *opts, dst], capture_output=True, text=True)
    return r.returncode == 0


RAW_SEND = textwrap.dedent("""
    import socket, sys
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind(("sf0", 0))
    for _ in range(3):
        s.send(bytes.fromhex(sys.argv[1]))
""")


def raw_send(lan: FabricLan, host: int, frame: bytes) -> None:
    r = lan.run(host, ["python3", "-c", RAW_SEND, frame.hex()], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def arp_reply(src_mac: bytes, sender_ip: str, dst_mac: bytes, target_ip: str) -> bytes:
    """An ARP reply from `src_mac` saying `sender_ip` is at `src_mac`, sent to `dst_mac`."""
    ip = lambda a: bytes(map(int, a.split(".")))  # noqa: E731
    return (dst_mac + src_mac + b"\x08\x06" + b"\x00\x01\x08\x00\x06\x04\x00\x02"
            + src_mac + ip(sender_ip) + dst_mac + ip(target_ip))


@pytest.mark.parametrize("checked", [False, True], ids=["unchecked", "checked"])
def test_an_arp_reply_claiming_another_hosts_address_moves_a_peers_cache_only_without_the_check(
        checked: bool) -> None:
    # host0 attacks: it tells host2 that host1's address is at host0's MAC (its own MAC: only the
    # claim is false, so the MAC check alone would not catch it)
    with CheckedLan(3, {0: ["--source-check"]} if checked else {}) as lan:
        assert ping(lan, 2, lan.ip(1)) and ping(lan, 0, lan.ip(2))
        victim, attacker = mac_of(lan, 1), mac_of(lan, 0)
        assert neighbour(lan, 2, lan.ip(1)) == victim
        time.sleep(1.2)  # past the entry's locktime (1 s): the kernel takes an overriding reply after it
        raw_send(lan, 0, arp_reply(mac_bytes(attacker), lan.ip(1), mac_bytes(mac_of(lan, 2)), lan.ip(2)))
        time.sleep(0.3)
        seen = neighbour(lan, 2, lan.ip(1))
        assert ping(lan, 0, lan.ip(2))  # the attacker's own traffic still flows either way
        counters = lan.stop(0)
    if checked:
        assert seen == victim
        assert counters.get("drop_spoofed_claim") == 3, counters
    else:
        assert seen == attacker  # the attack works on an unchecked adapter: the checked result is the check's
        assert "drop_spoofed_claim" not in counters


@pytest.mark.parametrize("checked", [False, True], ids=["unchecked", "checked"])
def test_a_frame_from_another_mac_reaches_the_peer_only_without_the_check(checked: bool) -> None:
    # an ARP reply from a made-up fabric MAC (the MAC of a node that is not there yet) for an
    # address nobody has: an unchecked adapter passes it and the peer's kernel learns it
    forged = bytes.fromhex("027366000fff")
    with CheckedLan(2, {0: ["--source-check"]} if checked else {}) as lan:
        assert ping(lan, 0, lan.ip(1))
        lan.run(1, ["sysctl", "-qw", "net.ipv4.conf.sf0.arp_accept=1"], check=True)  # learn new entries
        raw_send(lan, 0, arp_reply(forged, "10.77.2.77", mac_bytes(mac_of(lan, 1)), lan.ip(1)))
        time.sleep(0.3)
        seen = neighbour(lan, 1, "10.77.2.77")
        counters = lan.stop(0)
    if checked:
        assert seen is None
        assert counters.get("drop_spoofed_mac") == 3, counters
    else:
        assert seen == "02:73:66:00:0f:ff"
        assert "drop_spoofed_mac" not in counters


def test_a_source_address_the_adapter_was_not_given_is_dropped_and_its_own_and_allowed_ones_pass() -> None:
    with CheckedLan(2, {0: ["--allow-source", "10.77.9.0/24"]}) as lan:
        assert "sources checked (and 10.77.9.0/24)" in lan.ready[0]
        # addresses put on the interface behind the adapter's back: one outside, one inside the allowed prefix
        lan.run(0, ["ip", "addr", "add", "10.77.2.99/24", "dev", "sf0"], check=True)
        lan.run(0, ["ip", "addr", "add", "10.77.9.5/32", "dev", "sf0"], check=True)
        lan.run(1, ["ip", "route", "add", "10.77.9.0/24", "dev", "sf0"], check=True)
        assert ping(lan, 0, lan.ip(1))  # from its own address (ARP both ways)
        assert not ping(lan, 0, lan.ip(1), "-I", "10.77.2.99")
        assert ping(lan, 0, lan.ip(1), "-I", "10.77.9.5")
        counters = lan.stop(0)
    assert counters["drop_spoofed_ip"] >= 2  # the echo requests from 10.77.2.99 (and ARP replies are fine)
    assert counters["to_fabric"] >= 4


def test_ipv6_works_with_the_check_and_a_spoofed_ipv6_source_is_dropped() -> None:
    # neighbour discovery (duplicate address detection from ::, solicitations from the link-local
    # address with its MAC option, advertisements of its own address) passes the check
    with CheckedLan(2, {0: ["--source-check"], 1: ["--source-check"]}, v6=True) as lan:
        for h in (0, 1):  # duplicate address detection done: the addresses usable
            for _ in range(50):
                out = lan.run(h, ["ip", "-6", "addr", "show", "dev", "sf0", "tentative"], capture_output=True,
                              text=True).stdout
                if "inet6" not in out:
                    break
                time.sleep(0.1)
        assert ping(lan, 0, lan.ip6(1), "-6")
        assert ping(lan, 1, lan.ip6(0), "-6")
        lan.run(0, ["ip", "addr", "add", "fd00:77::99/64", "dev", "sf0", "nodad"], check=True)
        assert not ping(lan, 0, lan.ip6(1), "-6", "-I", "fd00:77::99")
        counters = lan.stop(0) | {"peer_" + k: v for k, v in lan.stop(1).items()}
    assert counters.get("drop_spoofed_ip", 0) >= 2, counters
    assert not any(k.startswith("peer_drop_spoofed") or k.startswith("peer_drop_malformed") for k in counters), counters


def test_bad_allow_source_is_a_one_line_error() -> None:
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "shmfabric", "adapter", "nofabric", "n", "--allow-source",
                        "10.9.0.1/16"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0, r.stderr
    assert "--allow-source" in r.stderr and "10.9.0.0/16" in r.stderr and "Traceback" not in r.stderr
