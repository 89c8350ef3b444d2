"""`shmfabric adapter --source-check`: frames naming another sender never reach the fabric.

Real namespaces, real kernels on both sides: the attacks are sent with a raw packet socket from
inside a namespace (what any program with CAP_NET_RAW there can do), and each is run once against
an unchecked adapter too, to show it works there (so the checked case's result is the check's).
Needs root; skipped with the reason otherwise.
"""
from __future__ import annotations

import ipaddress
import os
import re
import struct
import subprocess
import sys
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
    vnet = bytes.fromhex(sys.argv[2])
    if vnet:
        s.setsockopt(263, 15, 1)  # SOL_PACKET, PACKET_VNET_HDR: the frame goes with an offload request
    s.bind(("sf0", 0))
    for _ in range(int(sys.argv[3])):
        s.send(vnet + bytes.fromhex(sys.argv[1]))
""")


def raw_send(lan: FabricLan, host: int, frame: bytes, vnet: bytes = b"", times: int = 3) -> None:
    """Send `frame` from host `host`'s interface `times` times, as any program with CAP_NET_RAW can."""
    r = lan.run(host, ["python3", "-c", RAW_SEND, frame.hex(), vnet.hex(), str(times)], capture_output=True,
                text=True)
    assert r.returncode == 0, r.stderr


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def ip4(a: str) -> bytes:
    return ipaddress.ip_address(a).packed


def arp_reply(src_mac: bytes, sender_ip: str, dst_mac: bytes, target_ip: str, op: int = 2) -> bytes:
    """An ARP reply (or with op 1 a request) from `src_mac` saying `sender_ip` is at `src_mac`,
    sent to `dst_mac`."""
    return (dst_mac + src_mac + b"\x08\x06" + b"\x00\x01\x08\x00\x06\x04" + op.to_bytes(2, "big")
            + src_mac + ip4(sender_ip) + dst_mac + ip4(target_ip))


@pytest.mark.parametrize("checked", [False, True], ids=["unchecked", "checked"])
def test_an_arp_request_claiming_another_hosts_address_moves_a_peers_cache_only_without_the_check(
        checked: bool) -> None:
    # host0 attacks: it asks host2 for host2's address "from" host1's address at host0's MAC (its
    # own MAC: only the claim is false, so the MAC check alone would not catch it); a request
    # for the receiver's own address updates its entry for the sender at once (no locktime)
    with CheckedLan(3, {0: ["--source-check"]} if checked else {}) as lan:
        assert ping(lan, 2, lan.ip(1)) and ping(lan, 0, lan.ip(2))
        victim, attacker = mac_of(lan, 1), mac_of(lan, 0)
        assert neighbour(lan, 2, lan.ip(1)) == victim
        raw_send(lan, 0, arp_reply(mac_bytes(attacker), lan.ip(1), mac_bytes(mac_of(lan, 2)), lan.ip(2), op=1))
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


@pytest.mark.parametrize("checked", [False, True], ids=["unchecked", "checked"])
def test_a_source_address_the_adapter_was_not_given_is_dropped_and_its_own_and_allowed_ones_pass(
        checked: bool) -> None:
    with CheckedLan(2, {0: ["--allow-source", "10.77.9.0/24"]} if checked else {}) as lan:
        if checked:
            assert "sources checked (and 10.77.9.0/24)" in lan.ready[0]
        # an address put on the interface behind the adapter's back, and a network routed behind
        # the namespace (on its lo, reached through its own address) in the allowed prefix
        lan.run(0, ["ip", "addr", "add", "10.77.2.99/24", "dev", "sf0"], check=True)
        lan.run(0, ["ip", "addr", "add", "10.77.9.5/32", "dev", "lo"], check=True)
        lan.run(1, ["ip", "route", "add", "10.77.9.0/24", "via", lan.ip(0)], check=True)
        assert ping(lan, 0, lan.ip(1))  # from its own address (ARP both ways)
        spoofed = ping(lan, 0, lan.ip(1), "-I", "10.77.2.99")
        assert ping(lan, 0, lan.ip(1), "-I", "10.77.9.5")
        counters = lan.stop(0)
    assert spoofed is not checked  # answered through an unchecked adapter: the checked result is the check's
    if checked:
        assert counters["drop_spoofed_ip"] >= 2  # the echo requests from 10.77.2.99
        assert counters["to_fabric"] >= 4


def test_ipv6_works_with_the_check_and_a_spoofed_ipv6_source_is_dropped() -> None:
    # neighbour discovery (duplicate address detection from ::, solicitations from the link-local
    # address with its MAC option, advertisements of its own address) passes the check
    with CheckedLan(2, {0: ["--source-check"], 1: ["--source-check"]}, v6=True) as lan:
        for h in (0, 1):  # duplicate address detection done: the addresses usable
            wait_dad(lan, h)
        assert ping(lan, 0, lan.ip6(1), "-6")
        assert ping(lan, 1, lan.ip6(0), "-6")
        lan.run(0, ["ip", "addr", "add", "fd00:77::99/64", "dev", "sf0", "nodad"], check=True)
        assert not ping(lan, 0, lan.ip6(1), "-6", "-I", "fd00:77::99")
        counters = lan.stop(0) | {"peer_" + k: v for k, v in lan.stop(1).items()}
    assert counters.get("drop_spoofed_ip", 0) >= 2, counters
    assert not any(k.startswith("peer_drop_spoofed") or k.startswith("peer_drop_malformed") for k in counters), counters


def csum_fix(frame: bytes, start: int, offset: int, want: bytes, pad_at: int) -> bytes:
    """`frame` with the two bytes at `pad_at` chosen so that completing its checksum (what an
    adapter does for a flooded frame marked "checksum left to the device") writes `want`."""
    from shmfabric.adapters.ethernet import complete_checksum

    for pad in range(65536):
        f = bytearray(frame)
        f[pad_at:pad_at + 2] = pad.to_bytes(2, "big")
        done = bytearray(f)
        complete_checksum(done, start, offset)
        if done[start + offset:start + offset + 2] == want:
            return bytes(f)
    raise AssertionError("no pad gives that checksum")


@pytest.mark.parametrize("checked", [False, True], ids=["unchecked", "checked"])
def test_an_offload_request_cannot_rewrite_a_checked_frame_after_the_check(checked: bool) -> None:
    # an ARP request with host0's own address (the check passes it), broadcast with a virtio-net
    # header asking for a "UDP checksum" at the sender address's last two bytes: completed by the
    # adapter before it floods the frame, it would turn the sender into host1's address
    with CheckedLan(3, {0: ["--source-check"]} if checked else {}) as lan:
        assert ping(lan, 2, lan.ip(1)) and ping(lan, 0, lan.ip(2))
        attacker, victim = mac_bytes(mac_of(lan, 0)), mac_of(lan, 1)
        arp = b"\x00\x01\x08\x00\x06\x04\x00\x01" + attacker + ip4(lan.ip(0)) + bytes(6) + ip4(lan.ip(2))
        frame = b"\xff" * 6 + attacker + b"\x08\x06" + arp + bytes(18)
        start, offset = 14 + 10, 6  # the checksum lands on frame[30:32], the sender address's last two bytes
        frame = csum_fix(frame, start, offset, ip4(lan.ip(1))[2:], pad_at=50)
        raw_send(lan, 0, frame, vnet=struct.pack("<BBHHHH", 1, 0, 0, 0, start, offset))
        time.sleep(0.3)
        seen = neighbour(lan, 2, lan.ip(1))
        counters = lan.stop(0)
    if checked:
        assert seen == victim
        assert counters.get("drop_bad_offload") == 3, counters
    else:
        assert seen == attacker.hex(":")  # rewritten: host2 now sends host1's traffic to host0


def icmpv6(src: bytes, dst: bytes, body: bytes) -> bytes:
    """An IPv6 packet carrying ICMPv6 `body` (its checksum filled in), hop limit 255."""
    pseudo = src + dst + struct.pack("!I", len(body)) + b"\0\0\0\x3a"
    data = pseudo + body + (b"\0" if len(body) % 2 else b"")
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    body = body[:2] + struct.pack("!H", ~total & 0xFFFF) + body[4:]
    return b"\x60\0\0\0" + struct.pack("!H", len(body)) + b"\x3a\xff" + src + dst + body


@pytest.mark.parametrize("checked", [False, True], ids=["unchecked", "checked"])
def test_a_rogue_router_advertisement_routes_a_peer_through_the_sender_only_without_the_check(
        checked: bool) -> None:
    from shmfabric.adapters.source_guard import link_local

    with CheckedLan(2, {0: ["--source-check"]} if checked else {}, v6=True) as lan:
        lan.run(1, ["sysctl", "-qw", "net.ipv6.conf.sf0.accept_ra=1"], check=True)  # (a host's default)
        wait_dad(lan, 1)  # (a kernel ignores router advertisements while its link-local address is tentative)
        attacker = mac_bytes(mac_of(lan, 0))
        ra = struct.pack("!BBHBBHII", 134, 0, 0, 64, 0, 1800, 0, 0) + bytes((1, 1)) + attacker
        all_nodes = ipaddress.ip_address("ff02::1").packed
        raw_send(lan, 0, b"\x33\x33\0\0\0\x01" + attacker + b"\x86\xdd"
                 + icmpv6(link_local(attacker).packed, all_nodes, ra))

        def routes() -> str:
            return lan.run(1, ["ip", "-6", "route", "show", "default"], capture_output=True, text=True).stdout

        # (checked: the frames are counted before they could arrive; the route would be there by then)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not (routes() if not checked else counters_of(lan, 0).get(
                "drop_router_message", 0) >= 3):
            time.sleep(0.05)
        seen = routes()
        counters = lan.stop(0)
    if checked:
        assert "default" not in seen, seen
        assert counters.get("drop_router_message") == 3, counters
    else:
        assert f"via {link_local(attacker)}" in seen, seen


def wait_dad(lan: FabricLan, host: int) -> None:
    """Until host `host`'s IPv6 addresses are no longer tentative (duplicate address detection done)."""
    for _ in range(100):
        out = lan.run(host, ["ip", "-6", "addr", "show", "dev", "sf0", "tentative"], capture_output=True,
                      text=True).stdout
        if "inet6" not in out:
            return
        time.sleep(0.1)


def counters_of(lan: FabricLan, host: int) -> dict:
    """Host `host`'s adapter's counters now (its `stats` on the fabric's control path)."""
    from shmfabric.fabric import Fabric
    from shmfabric.functions.control import ControlClient

    fab = Fabric.open(lan.fabric)
    client = ControlClient(fab, "ops")
    try:
        return client.request(f"host{host}", {"op": "stats"}, timeout=10)["counters"]
    finally:
        client.close()
        fab.close()


def test_a_checked_interface_takes_no_address_from_a_router_advertisement_and_keeps_working() -> None:
    # a peer (unchecked) advertises a prefix: a checked adapter's kernel must not make itself an
    # address from it (one the adapter was not given: its own traffic would be dropped)
    from shmfabric.adapters.source_guard import link_local

    with CheckedLan(2, {0: ["--source-check"]}, v6=True) as lan:
        for key, want in (("accept_ra", "0"), ("autoconf", "0"), ("use_tempaddr", "0"), ("addr_gen_mode", "0")):
            got = lan.run(0, ["sysctl", "-n", f"net.ipv6.conf.sf0.{key}"], capture_output=True, text=True).stdout
            assert got.strip() == want, key
        for key, want in (("arp_ignore", "1"), ("arp_announce", "2")):
            got = lan.run(0, ["sysctl", "-n", f"net.ipv4.conf.sf0.{key}"], capture_output=True, text=True).stdout
            assert got.strip() == want, key
        wait_dad(lan, 0)
        router = mac_bytes(mac_of(lan, 1))
        prefix_info = (bytes((3, 4, 64, 0xC0)) + struct.pack("!II", 86400, 14400) + bytes(4)
                       + ipaddress.ip_address("fd00:99::").packed)
        ra = struct.pack("!BBHBBHII", 134, 0, 0, 64, 0, 1800, 0, 0) + bytes((1, 1)) + router + prefix_info
        raw_send(lan, 1, b"\x33\x33\0\0\0\x01" + router + b"\x86\xdd"
                 + icmpv6(link_local(router).packed, ipaddress.ip_address("ff02::1").packed, ra))
        time.sleep(0.5)
        addrs = lan.run(0, ["ip", "-6", "addr", "show", "dev", "sf0"], capture_output=True, text=True).stdout
        assert "fd00:99:" not in addrs, addrs
        assert ping(lan, 0, lan.ip6(1), "-6")
        counters = lan.stop(0)
    assert not any(k.startswith("drop_") for k in counters), counters


@pytest.mark.parametrize("checked", [False, True], ids=["unchecked", "checked"])
def test_a_global_member_cannot_claim_the_shared_ipv6_address_with_a_solicitation(checked: bool) -> None:
    # a member may send from the global address (direct return), but a neighbour solicitation from
    # it carrying the member's MAC moves the client's entry for the address from the dispatcher to
    # the member: its connections would bypass the dispatcher
    from shmfabric.bench.lan import GlobalFabricLan

    class Lan6(GlobalFabricLan):
        @property
        def vip(self) -> str:
            return "fd00:77::100"

        def adapter_argv(self, host: int) -> list[str]:
            return super().adapter_argv(host) + ["--address", f"fd00:77::{host + 1}/64"]

        def routes(self) -> dict[str, str]:
            return {}

    with Lan6(members=2, adapter_args=["--source-check"] if checked else []) as lan:
        for h in range(3):
            wait_dad(lan, h)
        lan.start_dispatcher()
        dispatcher = re.search(r"mac ([0-9a-f:]{17})", lan.dispatcher_ready).group(1)  # type: ignore[union-attr]
        lan.run(0, ["ping", "-6", "-c", "1", "-W", "2", lan.vip], capture_output=True)
        assert neighbour(lan, 0, lan.vip) == dispatcher
        member, client = mac_bytes(mac_of(lan, 1)), mac_bytes(mac_of(lan, 0))
        vip = ipaddress.ip_address(lan.vip).packed
        ns = struct.pack("!BBHI", 135, 0, 0, 0) + ipaddress.ip_address("fd00:77::1").packed + bytes((1, 1)) + member
        raw_send(lan, 1, client + member + b"\x86\xdd" + icmpv6(vip, ipaddress.ip_address("fd00:77::1").packed, ns))
        time.sleep(0.3)
        seen = neighbour(lan, 0, lan.vip)
        counters = lan.stop(1)
    if checked:
        assert seen == dispatcher
        assert counters.get("drop_spoofed_claim") == 3, counters
    else:
        assert seen == member.hex(":")


UDHCPC_SCRIPT = '#!/bin/sh\n[ "$1" = bound ] && echo "$ip $router" > "$0.lease"\nexit 0\n'


@pytest.mark.skipif(programs.find("dnsmasq") is None, reason=programs.not_found("dnsmasq", fix="Debian dnsmasq-base"))
@pytest.mark.skipif(programs.find("udhcpc") is None, reason=programs.not_found("udhcpc", fix="Debian udhcpc"))
@pytest.mark.parametrize("args", [[], ["--source-check"], ["--source-check", "--dhcp-server"]],
                         ids=["unchecked", "checked", "checked-dhcp-server"])
def test_a_rogue_dhcp_server_leases_only_through_an_unchecked_adapter_or_one_allowed_to_serve(
        tmp_path, args: list[str]) -> None:
    # host0 runs a real DHCP server (dnsmasq) handing out itself as the router; host1's real DHCP
    # client (udhcpc) asks over the fabric. A checked adapter drops the server's offers unless it
    # was started with --dhcp-server
    script = tmp_path / "lease.sh"
    script.write_text(UDHCPC_SCRIPT)
    script.chmod(0o755)
    with CheckedLan(2, {0: args}) as lan:
        pool = lan.ip(0).rsplit(".", 1)[0]
        server = lan.popen(0, ["dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--port=0", "--user=root",
                               "--interface=sf0", "--bind-interfaces", "--no-ping", f"--pid-file={tmp_path / 'dnsmasq.pid'}",
                               f"--dhcp-leasefile={tmp_path / 'leases'}",
                               f"--dhcp-range={pool}.150,{pool}.160,255.255.255.0,2m",
                               f"--dhcp-option=3,{lan.ip(0)}"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            time.sleep(0.5)
            assert server.poll() is None, server.communicate()[1]
            client = lan.run(1, ["udhcpc", "-i", "sf0", "-n", "-q", "-f", "-t", "3", "-T", "1", "-A", "1",
                                 "-s", str(script)], capture_output=True, text=True, timeout=30)
        finally:
            server.terminate()
            server.wait(10)
        counters = lan.stop(0)
    lease = tmp_path / "lease.sh.lease"
    if args == ["--source-check"]:
        assert client.returncode != 0 and not lease.exists(), client.stderr
        assert counters.get("drop_dhcp_server", 0) >= 1, counters
    else:  # the lease is real: an address of the server's range, the server as the router
        assert client.returncode == 0, client.stderr
        ip, router = lease.read_text().split()
        assert ip.startswith(f"{pool}.1") and router == lan.ip(0), (ip, router)
        assert "drop_dhcp_server" not in counters, counters
