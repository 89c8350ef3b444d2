"""TAP adapters: unmodified programs in network namespaces talk over the fabric.

Real programs only (ping, redis-server and redis-cli, nginx and curl, iperf3's absence is fine);
each test makes its own namespaces and fabric. Needs root; skipped with the reason otherwise.
"""
from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from shmfabric import programs
from shmfabric.bench.lan import FabricLan, connect_times_out, wait_until
from shmfabric.fabric import Fabric

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="TAP devices and network namespaces need root"),
    pytest.mark.skipif(programs.find("ip") is None,
                       reason=programs.not_found("ip", fix="Debian iproute2: `make setup` installs it as root")),
    pytest.mark.skipif(not os.path.exists("/dev/net/tun"), reason="no /dev/net/tun (the tun module) on this machine"),
]

needs = lambda *names: pytest.mark.skipif(  # noqa: E731
    bool(programs.missing(*names)), reason=programs.not_found(*programs.missing(*names) or names))


def mac_of(ready_line: str) -> str:
    return re.search(r"mac ([0-9a-f:]{17})", ready_line).group(1)  # type: ignore[union-attr]


def neighbour_mac(lan: FabricLan, host: int, ip: str) -> str | None:
    out = lan.run(host, ["ip", "neigh", "show", ip], capture_output=True, text=True).stdout
    m = re.search(r"lladdr ([0-9a-f:]{17})", out)
    return m.group(1) if m else None


def device_exists(lan: FabricLan, host: int) -> bool:
    return lan.run(host, ["ip", "link", "show", "sf0"], capture_output=True).returncode == 0


@needs("ping")
def test_ping_resolves_the_peer_to_its_fabric_mac_over_the_broadcast_tape() -> None:
    with FabricLan(2) as lan:
        r = lan.run(0, ["ping", "-c", "3", "-i", "0.2", "-W", "5", lan.ip(1)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        assert " 0% packet loss" in r.stdout
        # the kernel's own ARP found the peer's fabric MAC (node id in the last two bytes)
        assert neighbour_mac(lan, 0, lan.ip(1)) == mac_of(lan.ready[1])
        c0, c1 = lan.stop(0), lan.stop(1)
    assert c0["flooded"] >= 1  # the ARP request went out on the broadcast tape
    assert c0["to_fabric"] >= 3 and c1["to_fabric"] >= 3  # echo requests and replies, unicast
    assert c1["to_device"] >= 4  # the ARP request and three echo requests reached host1's kernel
    assert not any(k.startswith("drop") for k in c0 | c1), (c0, c1)


@needs("redis-server", "redis-cli")
@pytest.mark.parametrize("network_mtu, mode", [(65536, "segmentation"), (1500, "checksum offload")])
def test_redis_cli_stores_and_reads_back_a_large_value_from_a_redis_server_on_another_adapter(
        tmp_path: Path, network_mtu: int, mode: str) -> None:
    value = os.urandom(400_000).hex().encode()  # 800 KB: hundreds of full-size TCP segments each way
    (tmp_path / "value").write_bytes(value)
    with FabricLan(2, network_mtu=network_mtu, slots=4096 if network_mtu < 16384 else 1024) as lan:
        # uncut 64 KB segments where slots hold them, else frames of the device's MTU
        assert mode in lan.ready[0] and mode in lan.ready[1]
        server = lan.redis(1, 6390, str(tmp_path))
        cli = ["redis-cli", "-h", lan.ip(1), "-p", "6390"]
        assert wait_until(lambda: lan.run(0, [*cli, "PING"], capture_output=True, text=True).stdout.strip() == "PONG",
                          timeout=20), "redis-server did not answer over the fabric"
        with open(tmp_path / "value", "rb") as f:
            r = lan.run(0, [*cli, "-x", "SET", "big"], stdin=f, capture_output=True, text=True, timeout=60)
        assert r.stdout.strip() == "OK", r.stdout + r.stderr
        got = lan.run(0, [*cli, "--raw", "GET", "big"], capture_output=True, timeout=60).stdout
        assert got.rstrip(b"\n") == value
        assert lan.run(0, [*cli, "STRLEN", "big"], capture_output=True, text=True).stdout.strip() == str(len(value))
        server.terminate()
        counters = lan.stop(0) | lan.stop(1)
    assert not any(k.startswith("drop") for k in counters if k != "drop_ring_full"), counters


NGINX_CONF = """
user root;
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx.err warn;
events {{ worker_connections 64; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/body;
  proxy_temp_path {tmp}/proxy;
  fastcgi_temp_path {tmp}/fcgi;
  uwsgi_temp_path {tmp}/uwsgi;
  scgi_temp_path {tmp}/scgi;
  server {{
    listen {ip}:8080;
    root {tmp}/www;
  }}
}}
"""


@needs("nginx", "curl")
def test_curl_downloads_a_file_from_nginx_on_another_adapter_intact(tmp_path: Path) -> None:
    (tmp_path / "www").mkdir()
    blob = os.urandom(3 << 20)
    (tmp_path / "www" / "blob").write_bytes(blob)
    with FabricLan(2) as lan:
        (tmp_path / "nginx.conf").write_text(NGINX_CONF.format(tmp=tmp_path, ip=lan.ip(1)))
        lan.popen(1, ["nginx", "-c", str(tmp_path / "nginx.conf"), "-e", str(tmp_path / "nginx.err")],
                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://{lan.ip(1)}:8080/blob"
        out = tmp_path / "got"
        ok = wait_until(lambda: lan.run(0, ["curl", "-sf", "--max-time", "30", "-o", str(out), url]).returncode == 0,
                        timeout=30, every=0.2)
        assert ok, f"curl could not fetch {url} over the fabric"
        assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(blob).digest()


UDP_LISTEN = textwrap.dedent("""
    import socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    s.bind(("0.0.0.0", 5999))
    s.settimeout(20)
    print("ready", flush=True)
    data, peer = s.recvfrom(100)
    print(data.decode(), peer[0], flush=True)
""")


def test_a_udp_broadcast_reaches_every_other_host() -> None:
    with FabricLan(3) as lan:
        listeners = [lan.popen(h, [sys.executable, "-c", UDP_LISTEN], stdout=subprocess.PIPE, text=True)
                     for h in (1, 2)]
        for p in listeners:
            assert p.stdout.readline().strip() == "ready"  # type: ignore[union-attr]
        send = ("import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
                "s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1); "
                f"s.sendto(b'hello-all', ('{lan.ip(0).rsplit('.', 1)[0]}.255', 5999))")
        assert lan.run(0, [sys.executable, "-c", send]).returncode == 0
        for p in listeners:
            out, _ = p.communicate(timeout=30)
            assert out.split("\n")[0] == f"hello-all {lan.ip(0)}"
        c = [lan.stop(h) for h in range(3)]
    assert c[0]["flooded"] >= 1  # one copy on the broadcast tape, read by both others


@needs("ping")
def test_a_killed_adapter_leaves_no_device_and_its_restart_on_another_mac_is_found_at_once() -> None:
    with FabricLan(2) as lan:
        ping = ["ping", "-c", "1", "-W", "5", lan.ip(1)]
        assert lan.run(0, ping, capture_output=True).returncode == 0
        old_mac = mac_of(lan.ready[1])
        assert neighbour_mac(lan, 0, lan.ip(1)) == old_mac
        lan.kill(1)
        # the device went with the process (non-persistent TAP), even on SIGKILL
        assert wait_until(lambda: not device_exists(lan, 1), timeout=10)
        # hold the dead adapter's node id (once the fabric reclaimed it), so the restart gets another
        fab = Fabric.open(lan.fabric)
        try:
            old_id = int(old_mac.replace(":", "")[-4:], 16)
            assert wait_until(lambda: old_id not in {n["id"] for n in fab.nodes()}, timeout=15)
            placeholder = fab.attach("placeholder")
            lan.start(1)
            new_mac = mac_of(lan.ready[1])
            assert new_mac != old_mac
            # the restarted kernel announced its address (gratuitous ARP): host0 learns the new
            # MAC without waiting for its cache entry to go stale
            assert wait_until(lambda: neighbour_mac(lan, 0, lan.ip(1)) == new_mac, timeout=10), \
                lan.run(0, ["ip", "neigh"], capture_output=True, text=True).stdout
            assert lan.run(0, ping, capture_output=True).returncode == 0
            placeholder.detach()
        finally:
            fab.close()
        assert lan.stop(0).get("drop_no_node", 0) == 0


def test_frames_to_a_fabric_mac_no_node_has_are_counted_and_the_rest_flows() -> None:
    with FabricLan(2) as lan:
        ghost = "10.77.2.99"
        # a static neighbour entry for a node id nobody holds (0x63)
        lan.run(0, ["ip", "neigh", "add", ghost, "lladdr", "02:73:66:00:00:63", "dev", "sf0"], check=True)
        send = ("import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
                f"[s.sendto(b'x', ('{ghost}', 9)) for _ in range(5)]")
        assert lan.run(0, [sys.executable, "-c", send]).returncode == 0
        if programs.find("ping"):
            assert lan.run(0, ["ping", "-c", "2", "-i", "0.2", "-W", "5", lan.ip(1)],
                           capture_output=True).returncode == 0
        c0 = lan.stop(0)
    assert c0["drop_no_node"] == 5


@needs("ping")
def test_a_jumbo_network_gives_the_device_its_mtu_and_carries_unfragmented_jumbo_frames() -> None:
    with FabricLan(2, mtu=9000) as lan:
        assert "mtu 9000" in lan.ready[0]
        link = lan.run(0, ["ip", "link", "show", "sf0"], capture_output=True, text=True).stdout
        assert "mtu 9000" in link
        # 8,972 bytes of ICMP payload + 28 of headers = 9,000, with "don't fragment"
        r = lan.run(0, ["ping", "-c", "2", "-i", "0.2", "-W", "5", "-M", "do", "-s", "8972", lan.ip(1)],
                    capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        r = lan.run(0, ["ping", "-c", "1", "-W", "2", "-M", "do", "-s", "8973", lan.ip(1)],
                    capture_output=True, text=True)
        assert r.returncode != 0 and "message too long" in (r.stdout + r.stderr).lower()


def adapter_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shmfabric", "adapter", *argv], capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("argv, says", [
    (["--address", "10.77.9.1"], "has no prefix length; give one, e.g. 10.77.9.1/24"),
    (["--address", "10.77.9.300/24"], "is not an IP address with a prefix"),
    (["--address", "10.77.9.1/24", "--ifname", "a-name-far-too-long"], "1-15 bytes"),
    (["--address", "10.77.9.1/24", "--netns", "sf-no-such-namespace"],
     "network namespace 'sf-no-such-namespace' does not exist"),
    (["--address", "10.77.9.1/24", "--network", "3"], "has networks 0..0, not 3"),
])
def test_bad_arguments_get_one_line_errors_and_leave_nothing(argv: list[str], says: str) -> None:
    name = f"adbad{os.getpid()}"
    Fabric.create(name).close()
    try:
        r = adapter_cli(name, "n0", *argv)
        assert r.returncode == 2, r.stderr
        assert says in r.stderr
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        fab = Fabric.open(name)
        assert fab.nodes() == []  # the refused adapter left no node behind
        fab.close()
    finally:
        Fabric.destroy(name)


def test_an_unknown_fabric_is_a_one_line_error() -> None:
    r = adapter_cli("sf-no-such-fabric", "n0", "--address", "10.77.9.1/24")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "sf-no-such-fabric" in r.stderr and "shmfabric create sf-no-such-fabric" in r.stderr


def test_a_device_name_another_interface_has_is_refused() -> None:
    with FabricLan(1) as lan:
        lan.run(0, ["ip", "link", "add", "taken0", "type", "veth", "peer", "name", "taken1"], check=True)
        r = subprocess.run(lan.exec_argv(0, [sys.executable, "-m", "shmfabric", "adapter", lan.fabric, "other",
                                             "--ifname", "taken0", "--address", "10.77.9.1/24"]),
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert "cannot create TAP device 'taken0'" in r.stderr
        assert device_exists(lan, 0)  # host0's running adapter is untouched
        lan.stop(0)


def test_an_adapter_answers_stats_and_stop_on_the_fabrics_control_path() -> None:
    from shmfabric.functions.control import ControlClient

    with FabricLan(2) as lan:
        fab = Fabric.open(lan.fabric)
        client = ControlClient(fab, "ops")
        try:
            if programs.find("ping"):
                assert lan.run(0, ["ping", "-c", "2", "-i", "0.2", "-W", "5", lan.ip(1)],
                               capture_output=True).returncode == 0
            stats = client.request("host0", {"op": "stats"}, timeout=10)  # (the client numbers it: `id` echoed)
            assert stats["ok"] and stats["function"] == "adapter" and stats["device"] == "sf0"
            assert stats["counters"]["from_device"] >= 1
            bad = client.request("host0", {"op": "reconfigure"}, timeout=10)
            assert not bad["ok"] and "an adapter answers stats and stop" in bad["error"]
            assert client.request("host1", {"op": "stop"}, timeout=10)["ok"]
            p = lan.adapters[1]
            assert p is not None and p.wait(timeout=15) == 0  # a clean exit
            assert wait_until(lambda: not device_exists(lan, 1), timeout=10)
            lan.adapters[1] = None
        finally:
            client.close()
            fab.close()


@needs("ping")
def test_a_stopped_adapter_holds_only_its_share_of_the_pool_and_the_others_go_on() -> None:
    # Without a bound, frames for a stopped receiver fill its ring (1,024) and with it the whole
    # pool of a 1,024-slot network: every other pair would stop too.
    with FabricLan(3, network_mtu=65536, slots=1024) as lan:
        assert lan.run(0, ["ping", "-c", "1", "-W", "5", lan.ip(1)], capture_output=True).returncode == 0
        victim = lan.adapters[1]
        os.kill(victim.pid, signal.SIGSTOP)  # type: ignore[union-attr]
        try:
            flood = ("import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                     f"for _ in range(3000): s.sendto(b'x' * 1000, ('{lan.ip(1)}', 9))")
            assert lan.run(0, [sys.executable, "-c", flood]).returncode == 0
            fab = Fabric.open(lan.fabric)
            try:
                pool = fab.pool_audit(0)
            finally:
                fab.close()
            assert pool["free"] > pool["total"] // 2, pool
            # host0 and host2 still talk, both ways
            assert lan.run(0, ["ping", "-c", "2", "-i", "0.2", "-W", "5", lan.ip(2)],
                           capture_output=True).returncode == 0
            assert lan.run(2, ["ping", "-c", "2", "-i", "0.2", "-W", "5", lan.ip(0)],
                           capture_output=True).returncode == 0
        finally:
            os.kill(victim.pid, signal.SIGCONT)  # type: ignore[union-attr]
        assert lan.run(0, ["ping", "-c", "1", "-W", "5", lan.ip(1)], capture_output=True).returncode == 0
        assert lan.stop(0)["drop_ring_full"] > 0  # (the interface's own queue drops some of the 3,000 too)


def test_an_adapter_whose_interface_is_deleted_ends_with_one_line_and_leaves_the_fabric() -> None:
    with FabricLan(2) as lan:
        lan.run(1, ["ip", "link", "del", "sf0"], check=True)
        p = lan.adapters[1]
        assert p is not None
        out, err = p.communicate(timeout=30)
        lan.adapters[1] = None
        assert p.returncode == 75, err  # EX_TEMPFAIL: a restart makes the interface again
        assert err.strip().splitlines()[-1] == ("shmfabric: error: the interface sf0 was deleted (File descriptor "
                                                "in bad state); adapter host1 left the fabric")
        assert "Traceback" not in err
        fab = Fabric.open(lan.fabric)
        try:
            assert wait_until(lambda: "host1" not in {n["name"] for n in fab.nodes()}, timeout=10)
        finally:
            fab.close()


@needs("ping")
def test_an_ipv4_address_in_use_on_the_fabric_is_refused_and_its_owner_keeps_it() -> None:
    with FabricLan(2) as lan:
        assert lan.run(1, ["ping", "-c", "1", "-W", "5", lan.ip(0)], capture_output=True).returncode == 0
        owner = mac_of(lan.ready[0])
        r = subprocess.run(lan.exec_argv(1, [sys.executable, "-m", "shmfabric", "adapter", lan.fabric, "dup",
                                             "--ifname", "dup0", "--address", lan.cidr(0)]),
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 75 and "Traceback" not in r.stderr  # EX_TEMPFAIL: clears when its owner goes
        assert f"address {lan.ip(0)} is in use on fabric {lan.fabric!r} by {owner} (node id 0)" in r.stderr
        assert "dup0" not in lan.run(1, ["ip", "link"], capture_output=True, text=True).stdout  # none left
        # nobody's cache moved: host1 still reaches host0 at its own MAC
        assert neighbour_mac(lan, 1, lan.ip(0)) == owner
        assert lan.run(1, ["ping", "-c", "1", "-W", "5", lan.ip(0)], capture_output=True).returncode == 0


# -- adapters behind a chain of functions ------------------------------------------------------------
@needs("redis-server", "redis-cli")
def test_a_firewall_between_two_namespaces_lets_redis_through_and_drops_what_its_rules_drop(tmp_path: Path) -> None:
    # client --via fw -> fw -> router -> server, and back the same way: unmodified redis-cli and
    # redis-server, a firewall function allowing only the Redis port (and, by connection tracking,
    # its replies), a router delivering by destination address.
    from shmfabric.functions.control import ControlClient

    with FabricLan(2, firewall="policy drop\ntcp dport 6390 accept\nmeta l4proto icmp accept") as lan:
        assert "via fw" in lan.ready[0] and "via fw" in lan.ready[1]
        lan.redis(1, 6390, str(tmp_path))
        # a second server on a port the firewall drops
        lan.redis(1, 6391, str(tmp_path))
        cli = ["redis-cli", "-h", lan.ip(1), "-p", "6390"]
        assert wait_until(lambda: lan.run(0, [*cli, "PING"], capture_output=True, text=True).stdout.strip() == "PONG",
                          timeout=30), "redis-server did not answer through the firewall"
        value = os.urandom(200_000).hex().encode()
        (tmp_path / "v").write_bytes(value)
        with open(tmp_path / "v", "rb") as f:
            assert lan.run(0, [*cli, "-x", "SET", "k"], stdin=f, capture_output=True, text=True,
                           timeout=60).stdout.strip() == "OK"
        assert lan.run(0, [*cli, "--raw", "GET", "k"], capture_output=True, timeout=60).stdout.rstrip(b"\n") == value
        # the other port: its SYNs die at the firewall
        assert connect_times_out(lan, 0, lan.ip(1), 6391)  # (a timeout, not a refusal: the SYNs died)
        assert not connect_times_out(lan, 0, lan.ip(1), 6390)
        fab = Fabric.open(lan.fabric)
        client = ControlClient(fab, "ops")
        try:
            fw = client.request("fw", {"op": "stats"}, timeout=10)
            router = client.request("router", {"op": "stats"}, timeout=10)
        finally:
            client.close()
            fab.close()
        # (the 400 KB each way cross as a few dozen 64 KB segments: offloads); the SYNs to 6391
        # fell to the policy
        assert fw["counters"]["in_frames"] > 20 and fw["function_counters"]["policy_hits"] >= 1
        assert router["function_counters"]["routed"] > 20
        assert router["function_counters"]["no_route"] == 0
