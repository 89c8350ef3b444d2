"""One IP address for several adapters (`shmfabric global`), end to end: real TCP and UDP servers
in two member namespaces, a client in a third, all joined by the fabric; the dispatcher places
each connection by the members' sockets and the members answer the client straight.

Root only (namespaces, TAP devices)."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from shmfabric.bench.lan import FabricLan, GlobalFabricLan, LanError, wait_until

pytestmark = [pytest.mark.timeout(180),
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces and TAP devices")]

BOTH, ONLY_HOST2, UDP_PORT, LATE = 7000, 7001, 7002, 7003

# In a member: TCP 7000 (and 7001 on host2 only) says which host it is, then echoes each line;
# UDP 7002, bound to the global address itself, answers "hostN <datagram>".
SERVER = r"""
import socket, sys, threading
name, vip, ports = sys.argv[1], sys.argv[2], [int(p) for p in sys.argv[3].split(",")]
def serve(c):
    with c:
        c.sendall(f"{name}\n".encode())
        f = c.makefile("rb")
        for line in f:
            c.sendall(f"{name} ".encode() + line)
def tcp(port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(64)
    while True:
        threading.Thread(target=serve, args=(s.accept()[0],), daemon=True).start()
def udp():
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind((vip, %d))
    while True:
        data, peer = u.recvfrom(65536); u.sendto(f"{name} ".encode() + data, peer)
for p in ports:
    threading.Thread(target=tcp, args=(p,), daemon=True).start()
threading.Thread(target=udp, daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
""" % UDP_PORT

# In the client: commands on stdin, one per line, answers on stdout.
#   open PORT -> the host that answered (or "refused"/"timeout"); send I TEXT -> the echo on
#   connection I; udp N -> for N sockets, the hosts that answered two datagrams each
CLIENT = r"""
import socket, sys
vip = sys.argv[1]
conns = []
for cmd in sys.stdin:
    words = cmd.split()
    try:
        if words[0] == "open":
            s = socket.create_connection((vip, int(words[1])), timeout=8)
            f = s.makefile("rb")
            conns.append((s, f))
            out = f.readline().decode().strip() + f" {len(conns) - 1}"
        elif words[0] == "send":
            s, f = conns[int(words[1])]
            s.sendall(words[2].encode() + b"\n")
            out = f.readline().decode().strip()
        elif words[0] == "udp":
            size = int(words[2]) if len(words) > 2 else 0
            hosts = []
            for i in range(int(words[1])):
                u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(3)
                u.connect((vip, %d))
                got = []
                for j in range(2):
                    data = f"d{i}.{j}".encode().ljust(size, b"x")
                    u.send(data)
                    back = u.recv(65536)
                    got.append(back.split()[0].decode() if back.endswith(data) else f"bad{len(back)}")
                hosts.append("+".join(got))
                u.close()
            out = " ".join(hosts)
    except ConnectionRefusedError:
        out = "refused"
    except OSError as exc:
        out = f"error {type(exc).__name__}"
    print(out, flush=True)
""" % UDP_PORT


class Client:
    """A client process in host0, driven line by line."""

    def __init__(self, lan: GlobalFabricLan) -> None:
        self.p = lan.popen(0, [sys.executable, "-u", "-c", CLIENT, lan.vip], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True)

    def ask(self, line: str) -> str:
        self.p.stdin.write(line + "\n")  # type: ignore[union-attr]
        self.p.stdin.flush()  # type: ignore[union-attr]
        return self.p.stdout.readline().strip()  # type: ignore[union-attr]

    def close(self) -> None:
        self.p.kill()
        self.p.wait()


@pytest.fixture(scope="module")
def lan():
    try:
        with GlobalFabricLan(members=2, lan=6) as lan:
            for h in (1, 2):
                ports = f"{BOTH},{ONLY_HOST2}" if h == 2 else str(BOTH)
                p = lan.popen(h, [sys.executable, "-u", "-c", SERVER, f"host{h}", lan.vip, ports],
                              stdout=subprocess.PIPE, text=True)
                assert p.stdout.readline().strip() == "ready"  # type: ignore[union-attr]
            lan.start_dispatcher()
            yield lan
    except LanError as exc:
        pytest.fail(str(exc))


@pytest.fixture
def client(lan):
    c = Client(lan)
    yield c
    c.close()


def test_new_connections_are_spread_over_the_members_and_each_stays_with_its_own(client) -> None:
    hosts = [client.ask(f"open {BOTH}").split()[0] for _ in range(6)]
    assert sorted(hosts) == ["host1"] * 3 + ["host2"] * 3, hosts
    for i, host in enumerate(hosts):
        for j in range(3):
            assert client.ask(f"send {i} m{j}") == f"{host} m{j}"


def test_a_port_only_one_member_listens_on_goes_to_that_member(client) -> None:
    assert [client.ask(f"open {ONLY_HOST2}").split()[0] for _ in range(4)] == ["host2"] * 4


def test_a_port_nobody_listens_on_is_refused_as_a_host_refuses_it(client) -> None:
    # (the first SYN waits for a fresh walk of the members' sockets; its retry is refused)
    assert client.ask("open 7009") == "refused"


def test_udp_associations_are_spread_and_each_stays_with_its_member(client) -> None:
    pairs = client.ask("udp 16").split()  # (placed by a hash of each flow: 16 spread over both)
    assert len(pairs) == 16 and all(a == b for a, b in (p.split("+") for p in pairs)), pairs
    assert {p.split("+")[0] for p in pairs} == {"host1", "host2"}, pairs


def test_fragmented_datagrams_reach_their_member_whole(client) -> None:
    # 4,000-byte datagrams on a 1,500-byte link: the client's kernel cuts each into three
    # fragments, only the first with the ports; the dispatcher sends the rest after it
    pairs = client.ask("udp 8 4000").split()
    assert len(pairs) == 8 and all(a == b and a.startswith("host") for a, b in (p.split("+") for p in pairs)), pairs


def test_the_global_address_answers_ping(lan) -> None:
    r = lan.run(0, ["ping", "-c", "3", "-i", "0.2", "-W", "2", lan.vip], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and " 0% packet loss" in r.stdout, r.stdout + r.stderr


def test_a_server_started_after_the_dispatcher_gets_its_connections(lan, client) -> None:
    late = lan.popen(1, [sys.executable, "-u", "-c", SERVER, "host1", lan.vip, str(LATE)], stdout=subprocess.PIPE,
                     text=True)
    try:
        assert late.stdout.readline().strip() == "ready"  # type: ignore[union-attr]
        # (the SYN that finds no listener yet asks for a walk; TCP's retry finds the server)
        assert client.ask(f"open {LATE}").split()[0] == "host1"
    finally:
        late.kill()
        late.wait()


def test_open_connections_survive_the_dispatcher_killed_and_restarted(lan, client) -> None:
    opened = [client.ask(f"open {BOTH}").split() for _ in range(2)]
    lan.kill_dispatcher()
    lan.start_dispatcher()
    # The new dispatcher walked the members first: each connection goes on with its own member
    # (the client's ARP cache took the new dispatcher's MAC from its announcement).
    for host, i in opened:
        assert client.ask(f"send {i} after") == f"{host} after"
    assert sorted(client.ask(f"open {BOTH}").split()[0] for _ in range(2)) == ["host1", "host2"]


def test_a_member_that_leaves_gets_no_new_connections_until_it_is_back(lan, client) -> None:
    lan.stop(1)
    try:
        # its node leaves the fabric: the dispatcher stops placing connections on it
        assert wait_until(lambda: client.ask(f"open {BOTH}").split()[0] == "host2", timeout=10)
        assert {client.ask(f"open {BOTH}").split()[0] for _ in range(4)} == {"host2"}
    finally:
        lan.start(1)
    assert wait_until(lambda: client.ask(f"open {BOTH}").split()[0] == "host1", timeout=15)


def test_the_dispatcher_counts_what_it_did(lan, client) -> None:
    lan.stop_dispatcher()
    lan.start_dispatcher()
    lan.run(0, ["ip", "neigh", "flush", "all"], check=True)  # the client asks for the address again
    hosts = [client.ask(f"open {BOTH}").split()[0] for _ in range(4)]
    assert client.ask("open 7009") == "refused"
    counters = lan.stop_dispatcher()
    try:
        assert counters["to_host1"] > 0 and counters["to_host2"] > 0, counters
        assert counters["forwarded"] == counters["to_host1"] + counters["to_host2"], counters
        assert counters["arp_replies"] >= 1 and counters["refused"] == 1, counters
        assert counters["table_placed"] == len(hosts), counters  # one placement per connection
        assert counters["table_nodes"] == 2, counters
    finally:
        lan.start_dispatcher()


V6 = "fd00:77:7::{}"


class _Lan6(GlobalFabricLan):
    """The members and the client with IPv6 addresses too; the global address an IPv6 one."""

    @property
    def vip(self) -> str:
        return V6.format(100)

    def adapter_argv(self, host: int) -> list[str]:
        argv = FabricLan.adapter_argv(self, host) + ["--address", V6.format(host + 1) + "/64"]
        return argv + ["--global", self.vip] if host >= 1 else argv


V6_SERVER = r"""
import socket, sys, threading
def udp():
    u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); u.bind((sys.argv[2], 5300))
    while True:
        data, peer = u.recvfrom(65536); u.sendto(sys.argv[1].encode() + b" " + data, peer)
threading.Thread(target=udp, daemon=True).start()
s = socket.socket(socket.AF_INET6); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", 8080)); s.listen(16)
print("ready", flush=True)
while True:
    c, _ = s.accept(); c.sendall(sys.argv[1].encode() + b"\n"); c.close()
"""
V6_CLIENT = r"""
import socket, sys, time
def once(port):
    try:
        s = socket.create_connection((sys.argv[1], port), timeout=5)
        return s.makefile().readline().strip()
    except ConnectionRefusedError:
        return "refused"
    except OSError as exc:
        return type(exc).__name__
deadline = time.monotonic() + 20  # duplicate address detection holds new IPv6 addresses a moment
while once(8080) not in ("host1", "host2") and time.monotonic() < deadline:
    time.sleep(0.3)
def big():  # a 4,000-byte datagram: IPv6 fragments, only the first with the ports
    u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); u.settimeout(3); u.connect((sys.argv[1], 5300))
    data = b"z" * 4000
    u.send(data)
    try:
        back = u.recv(65536)
    except OSError as exc:
        return type(exc).__name__
    return "whole" if back.endswith(data) and back.split()[0] in (b"host1", b"host2") else f"bad{len(back)}"
print(" ".join(once(8080) for _ in range(4)), once(8081), big())
"""


def test_an_ipv6_global_address_resolves_spreads_and_refuses() -> None:
    try:
        with _Lan6(members=2, lan=7) as lan:
            for h in (1, 2):
                p = lan.popen(h, [sys.executable, "-u", "-c", V6_SERVER, f"host{h}", lan.vip], stdout=subprocess.PIPE,
                              text=True)
                assert p.stdout.readline().strip() == "ready"  # type: ignore[union-attr]
            lan.start_dispatcher()
            r = lan.run(0, [sys.executable, "-c", V6_CLIENT, lan.vip], capture_output=True, text=True, timeout=60)
            *hosts, closed, big = r.stdout.split()
            assert sorted(hosts) == ["host1", "host1", "host2", "host2"] and closed == "refused", r.stdout + r.stderr
            assert big == "whole", r.stdout
            ping = lan.run(0, ["ping", "-6", "-c", "2", "-i", "0.2", "-W", "2", lan.vip], capture_output=True,
                           text=True, timeout=30)
            assert ping.returncode == 0, ping.stdout + ping.stderr
            counters = lan.stop_dispatcher()
            assert counters["nd_replies"] >= 1 and counters.get("arp_replies", 0) == 0, counters
    except LanError as exc:
        pytest.fail(str(exc))


STALLED_PORT = 7004
BACKLOG_SERVER = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", %d)); s.listen(int(sys.argv[2]))
print("ready", flush=True)
while True:
    c, _ = s.accept(); c.sendall(sys.argv[1].encode() + b"\n"); c.close()
""" % STALLED_PORT
FILL_THEN_ASK = r"""
import socket, sys, time
vip, port, then = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def ask(n, timeout=1.0):
    got = []
    for i in range(n):
        try:
            s = socket.create_connection((vip, port), timeout=timeout)
            got.append(s.makefile().readline().strip() or "eof")
        except OSError as exc:
            got.append(type(exc).__name__)
    return got
if then == "fill":
    held = []
    for i in range(12):  # fill the stalled member's accept queue (its kernel completes the handshakes)
        c = socket.socket(); c.settimeout(0.5)
        try:
            c.connect((vip, port))
        except OSError:
            pass
        held.append(c)
# until the answers are what is waited for (walks see the queue full twice in a row, or room again)
want = {"fill": lambda g: g == ["host2"] * 6, "both": lambda g: set(g) == {"host1", "host2"}}[then if then != "fill" else "fill"]
deadline = time.monotonic() + 20
got = ask(6)
while not want(got) and time.monotonic() < deadline:
    time.sleep(0.3)
    got = ask(6)
print(" ".join(got))
"""


def test_a_member_whose_server_stopped_accepting_gets_no_new_connections(lan) -> None:
    import signal

    servers = [lan.popen(h, [sys.executable, "-u", "-c", BACKLOG_SERVER, f"host{h}", "1" if h == 1 else "64"],
                         stdout=subprocess.PIPE, text=True) for h in (1, 2)]

    def client(then: str) -> list[str]:
        r = lan.run(0, [sys.executable, "-c", FILL_THEN_ASK, lan.vip, str(STALLED_PORT), then], capture_output=True,
                    text=True, timeout=90)
        return r.stdout.split() or [r.stderr[-300:]]

    try:
        for p in servers:
            assert p.stdout.readline().strip() == "ready"  # type: ignore[union-attr]
        assert set(client("both")) == {"host1", "host2"}  # both take connections at first
        # host1's server hangs (SIGSTOP; `ip netns exec` execs it: the pid is its own): its listener
        # stays, its accept queue fills
        os.kill(servers[0].pid, signal.SIGSTOP)
        assert client("fill") == ["host2"] * 6
        os.kill(servers[0].pid, signal.SIGCONT)  # it accepts again: its queue drains, it is a candidate again
        assert set(client("both")) == {"host1", "host2"}
    finally:
        for p in servers:
            p.kill()
            p.wait()


FW_CLIENT = r"""
import socket, sys
out = []
for port in (8080, 8080, 8080, 8080, 8081):
    try:
        s = socket.create_connection((sys.argv[1], port), timeout=2)
        out.append(s.makefile().readline().strip() or "eof")
    except OSError as exc:
        out.append(type(exc).__name__)
print(" ".join(out))
"""
TWO_PORTS = r"""
import socket, sys, threading
def serve(s):
    while True:
        c, _ = s.accept(); c.sendall(sys.argv[1].encode() + b"\n"); c.close()
for p in (8080, 8081):  # (both listening before "ready")
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("0.0.0.0", p)); s.listen(16)
    threading.Thread(target=serve, args=(s,), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""


def test_a_firewall_chain_in_front_of_the_global_address() -> None:
    # Every adapter sends its unicast frames through `fw` (accepting TCP 8080 only) and `router`,
    # which hands the global address's packets to the dispatcher: the members' port 8081 is
    # unreachable through it, 8080 spread over both.
    try:
        with GlobalFabricLan(members=2, lan=8, firewall="policy drop\ntcp dport 8080 accept") as lan:
            for h in (1, 2):
                p = lan.popen(h, [sys.executable, "-u", "-c", TWO_PORTS, f"host{h}"], stdout=subprocess.PIPE,
                              text=True)
                assert p.stdout.readline().strip() == "ready"  # type: ignore[union-attr]
            lan.start_dispatcher()
            r = lan.run(0, [sys.executable, "-c", FW_CLIENT, lan.vip], capture_output=True, text=True, timeout=60)
            assert len(r.stdout.split()) == 5, r.stdout + r.stderr
            *hosts, other = r.stdout.split()
            assert sorted(hosts) == ["host1", "host1", "host2", "host2"], r.stdout + r.stderr
            assert other == "TimeoutError", r.stdout  # dropped by the firewall (through the dispatcher it is answered)
            counters = lan.stop_dispatcher()
            assert counters["forwarded"] > 0 and counters.get("refused", 0) == 0, counters
    except LanError as exc:
        pytest.fail(str(exc))
