"""The socket walk: real sockets in a namespace of our own, read back through sock_diag.

One program per namespace (`ip netns exec NS python -c ...`) opens listeners (IPv4, dual-stack
and v6only IPv6), established pairs, UDP sockets and a request socket, then prints its client
ports and waits; the tests compare what `SocketWalker(NS).walk()` reports with what the program
made. A fresh namespace holds nothing else, so the records per port are compared exactly.
Namespace tests need root; the ones in the current namespace and the error for a missing
namespace do not.
"""
from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import select
import socket
import subprocess
import sys
import textwrap
import threading
import time
from typing import Iterator

import pytest

from shmfabric import programs
from shmfabric.adapters.sockwalk import NETNS_DIR, NamespaceGone, SocketRecord, SocketWalker, WalkError

pytestmark = pytest.mark.timeout(60)

IP = programs.find("ip")
NO_NETNS = ("network namespaces need root (ip netns add, setns)" if os.geteuid() != 0 else
            programs.not_found("ip", fix="Debian iproute2: `make setup` installs it as root") if IP is None else None)
needs_netns = pytest.mark.skipif(NO_NETNS is not None, reason=NO_NETNS or "")

LO4 = int(ipaddress.IPv4Address("127.0.0.1"))
LO6 = ipaddress.IPv6Address("::1").packed

# Runs inside the namespace. Ports are fixed: the namespace is new and holds nothing else.
PROGRAM = textwrap.dedent("""
    import json, socket, sys
    from socket import AF_INET, AF_INET6, SOCK_DGRAM, IPPROTO_IPV6, IPV6_V6ONLY

    def listener(family, addr, v6only=None):
        s = socket.socket(family, socket.SOCK_STREAM)
        if v6only is not None:
            s.setsockopt(IPPROTO_IPV6, IPV6_V6ONLY, int(v6only))
        s.bind(addr)
        s.listen(16)
        return s

    v4 = listener(AF_INET, ("127.0.0.1", 7001))
    dual = listener(AF_INET6, ("::", 7002), v6only=False)
    only6 = listener(AF_INET6, ("::", 7003), v6only=True)
    c1 = socket.create_connection(("127.0.0.1", 7001)); a1, _ = v4.accept()
    c2 = socket.create_connection(("127.0.0.1", 7002)); a2, _ = dual.accept()  # AF_INET6, ::ffff:127.0.0.1
    c3 = socket.socket(AF_INET6); c3.connect(("::1", 7003)); a3, _ = only6.accept()
    ub = socket.socket(AF_INET, SOCK_DGRAM); ub.bind(("0.0.0.0", 7004))
    uc = socket.socket(AF_INET, SOCK_DGRAM); uc.bind(("127.0.0.1", 7005)); uc.connect(("127.0.0.1", 7004))
    u6 = socket.socket(AF_INET6, SOCK_DGRAM); u6.setsockopt(IPPROTO_IPV6, IPV6_V6ONLY, 0); u6.bind(("::", 7006))
    # TCP_DEFER_ACCEPT: the kernel ignores the handshake's bare final ACK, so the server side
    # stays a request socket in SYN_RECV while the client is already established.
    deferred = listener(AF_INET, ("127.0.0.1", 7007))
    deferred.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 30)
    c4 = socket.create_connection(("127.0.0.1", 7007))
    print(json.dumps({"c1": c1.getsockname()[1], "c2": c2.getsockname()[1], "c3": c3.getsockname()[1],
                      "c4": c4.getsockname()[1], "a2_family": int(a2.family)}), flush=True)
    sys.stdin.read()  # hold every socket until the test closes our stdin (or kills us)
""")


def ip(*args: str) -> None:
    r = subprocess.run([IP or "ip", *args], capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, f"ip {' '.join(args)}: {r.stderr}"


@contextlib.contextmanager
def namespace() -> Iterator[str]:
    name = f"sfwalk-{secrets.token_hex(4)}"
    ip("netns", "add", name)
    try:
        ip("-n", name, "link", "set", "lo", "up")
        yield name
    finally:
        subprocess.run([IP or "ip", "netns", "del", name], capture_output=True, timeout=20)


class Program:
    """PROGRAM running in a namespace; `ports` is what it printed once all its sockets exist."""

    def __init__(self, ns: str) -> None:
        self.proc = subprocess.Popen([IP or "ip", "netns", "exec", ns, sys.executable, "-c", PROGRAM],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        ready, _, _ = select.select([self.proc.stdout], [], [], 20)
        line = self.proc.stdout.readline() if ready else ""  # type: ignore[union-attr]
        if not line:
            pytest.fail(f"the socket program in {ns} did not start: {self.stop()}")
        self.ports: dict[str, int] = json.loads(line)

    def stop(self) -> str:
        """Kill the program (if still running); its stderr."""
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.communicate(timeout=10)[1]


@pytest.fixture(scope="module")
def ns_program() -> Iterator[tuple[str, dict[str, int]]]:
    if NO_NETNS is not None:
        pytest.skip(NO_NETNS)
    if not os.path.exists("/proc/net/if_inet6"):
        pytest.skip("IPv6 is disabled in this kernel: the program opens IPv6 sockets")
    with namespace() as ns:
        prog = Program(ns)
        try:
            yield ns, prog.ports
        finally:
            prog.stop()


@pytest.fixture(scope="module")
def records(ns_program: tuple[str, dict[str, int]]) -> list[SocketRecord]:
    with SocketWalker(ns_program[0]) as w:
        return w.walk()


def on_port(records: list[SocketRecord], port: int, proto: int = 6) -> set[SocketRecord]:
    return {r for r in records if r.proto == proto and (r.lport == port or r.rport == port)}


def rec(family: int, proto: int, laddr: int | bytes | None, lport: int, raddr: int | bytes | None, rport: int,
        state: str) -> SocketRecord:
    return SocketRecord(family, proto, laddr, lport, raddr, rport, state)


# -- records in a namespace -------------------------------------------------------------------------

def test_an_ipv4_listener_and_its_established_pair_are_reported_both_ends(
        records: list[SocketRecord], ns_program: tuple[str, dict[str, int]]) -> None:
    c1 = ns_program[1]["c1"]
    assert on_port(records, 7001) == {
        rec(4, 6, LO4, 7001, None, 0, "listen"),
        rec(4, 6, LO4, c1, LO4, 7001, "established"),  # the client's end
        rec(4, 6, LO4, 7001, LO4, c1, "established"),  # the accepted end
    }


def test_a_dual_stack_listener_on_any_is_reported_twice_once_per_family(records: list[SocketRecord]) -> None:
    listeners = {r for r in on_port(records, 7002) if r.state == "listen"}
    assert listeners == {rec(4, 6, None, 7002, None, 0, "listen"), rec(6, 6, None, 7002, None, 0, "listen")}


def test_a_v6only_listener_on_any_is_reported_once_as_ipv6(records: list[SocketRecord]) -> None:
    listeners = {r for r in on_port(records, 7003) if r.state == "listen"}
    assert listeners == {rec(6, 6, None, 7003, None, 0, "listen")}


def test_an_ipv4_connection_accepted_by_an_ipv6_socket_is_reported_with_ipv4_ints(
        records: list[SocketRecord], ns_program: tuple[str, dict[str, int]]) -> None:
    ports = ns_program[1]
    assert ports["a2_family"] == socket.AF_INET6  # the accepted socket really is IPv6 (::ffff:127.0.0.1)
    established = {r for r in on_port(records, 7002) if r.state == "established"}
    assert established == {rec(4, 6, LO4, ports["c2"], LO4, 7002, "established"),
                           rec(4, 6, LO4, 7002, LO4, ports["c2"], "established")}


def test_an_ipv6_connection_has_16_byte_addresses_both_ends(
        records: list[SocketRecord], ns_program: tuple[str, dict[str, int]]) -> None:
    c3 = ns_program[1]["c3"]
    established = {r for r in on_port(records, 7003) if r.state == "established"}
    assert established == {rec(6, 6, LO6, c3, LO6, 7003, "established"),
                           rec(6, 6, LO6, 7003, LO6, c3, "established")}


def test_udp_sockets_are_bound_or_connected_and_a_dual_stack_one_is_reported_twice(
        records: list[SocketRecord]) -> None:
    udp = {r for r in records if r.proto == 17}
    assert udp == {
        rec(4, 17, None, 7004, None, 0, "bound"),
        rec(4, 17, LO4, 7005, LO4, 7004, "connected"),
        rec(4, 17, None, 7006, None, 0, "bound"),
        rec(6, 17, None, 7006, None, 0, "bound"),
    }


def test_a_request_socket_not_yet_accepted_shows_syn_recv(
        records: list[SocketRecord], ns_program: tuple[str, dict[str, int]]) -> None:
    c4 = ns_program[1]["c4"]
    assert on_port(records, 7007) == {
        rec(4, 6, LO4, 7007, None, 0, "listen"),
        rec(4, 6, LO4, c4, LO4, 7007, "established"),
        rec(4, 6, LO4, 7007, LO4, c4, "syn_recv"),
    }


def test_the_namespace_holds_only_what_the_program_opened(records: list[SocketRecord]) -> None:
    # nothing from the test's own namespace leaks in
    assert {r.lport for r in records if r.state in ("listen", "bound")} == {7001, 7002, 7003, 7004, 7006, 7007}


def test_the_walker_works_from_another_thread_and_leaves_the_callers_namespace_alone(
        ns_program: tuple[str, dict[str, int]]) -> None:
    before = os.readlink("/proc/thread-self/ns/net")
    with SocketWalker(ns_program[0]) as w:
        assert os.readlink("/proc/thread-self/ns/net") == before
        got: list[list[SocketRecord]] = []
        for _ in range(2):  # and again: the socket stays usable
            t = threading.Thread(target=lambda: got.append(w.walk()))
            t.start()
            t.join(20)
        assert len(got) == 2
        for recs in got:
            assert rec(4, 6, LO4, 7001, None, 0, "listen") in recs
            assert rec(6, 6, None, 7003, None, 0, "listen") in recs
        assert set(got[0]) == set(w.walk())  # the caller's own thread reads the same namespace
    assert os.readlink("/proc/thread-self/ns/net") == before


# -- namespaces missing, gone, re-created, no root -------------------------------------------------

def test_a_walker_for_a_missing_namespace_raises_naming_it_and_how_to_create_it() -> None:
    name = f"sfwalk-missing-{secrets.token_hex(4)}"
    with pytest.raises(NamespaceGone) as e:  # (a WalkError that says: whatever it held is unreachable)
        SocketWalker(name)
    assert name in str(e.value)
    assert f"ip netns add {name}" in str(e.value)


@pytest.mark.parametrize("bad", ["", "../etc", "a/b"])
def test_a_namespace_name_with_a_slash_or_empty_is_refused(bad: str) -> None:
    with pytest.raises(WalkError, match="bad network namespace name"):
        SocketWalker(bad)


@needs_netns
def test_a_walk_after_the_namespace_is_deleted_raises_saying_it_is_gone() -> None:
    with namespace() as ns:
        w = SocketWalker(ns)
        assert w.walk() == []  # lo is up, nothing listens
        ip("netns", "del", ns)
        with pytest.raises(NamespaceGone, match=f"{ns}.*is gone"):
            w.walk()
        w.close()


@needs_netns
def test_a_walk_after_the_namespace_is_recreated_raises_asking_for_a_new_walker() -> None:
    with namespace() as ns:
        with SocketWalker(ns) as w:
            w.walk()
            ip("netns", "del", ns)
            ip("netns", "add", ns)
            with pytest.raises(NamespaceGone, match="created again.*new SocketWalker"):
                w.walk()


@needs_netns
def test_entering_a_namespace_without_root_raises_a_walk_error_saying_root_is_needed() -> None:
    with namespace() as ns:
        # A forked child drops to nobody (the venv's interpreter may not be runnable by nobody,
        # so no exec) and reports what SocketWalker raised through a pipe.
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                os.close(rfd)
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
                try:
                    SocketWalker(ns).close()
                    msg = "no error"
                except WalkError as e:
                    msg = f"WalkError: {e}"
                os.write(wfd, msg.encode())
            finally:
                os._exit(0)
        os.close(wfd)
        with os.fdopen(rfd, "rb") as f:
            out = f.read().decode()
        os.waitpid(pid, 0)
        assert out.startswith("WalkError:"), out
        assert ns in out and "root" in out


# -- the current namespace (no root needed) --------------------------------------------------------

def test_a_walk_in_the_current_namespace_sees_a_listener_the_test_opens() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with SocketWalker() as w:
            assert rec(4, 6, LO4, port, None, 0, "listen") in w.walk()
        s.close()
        with SocketWalker() as w:
            assert not any(r.lport == port and r.state == "listen" for r in w.walk())


def test_a_connection_closed_by_the_client_shows_time_wait_on_the_client_side() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        sport = server.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", sport), timeout=10)
        cport = client.getsockname()[1]
        accepted, _ = server.accept()
        client.close()  # the client closes first: its end goes through FIN_WAIT to TIME_WAIT
        accepted.settimeout(10)
        assert accepted.recv(1) == b""
        accepted.close()
        with SocketWalker() as w:
            deadline = time.monotonic() + 10
            while True:
                recs = w.walk()
                client_side = [r for r in recs if r.lport == cport and r.rport == sport]
                if client_side and client_side[0].state == "time_wait" or time.monotonic() > deadline:
                    break
                time.sleep(0.02)
        assert client_side == [rec(4, 6, LO4, cport, LO4, sport, "time_wait")]
        assert not any(r.lport == sport and r.rport == cport and r.state == "time_wait" for r in recs)


def test_a_closed_walker_refuses_to_walk() -> None:
    w = SocketWalker()
    w.close()
    w.close()  # idempotent
    with pytest.raises(WalkError, match="closed"):
        w.walk()


def test_a_listeners_accept_queue_and_backlog_are_read() -> None:
    # (what tells the dispatcher a member's server stopped accepting: queued > backlog is full)
    import socket as _socket

    srv = _socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(2)
    port = srv.getsockname()[1]
    clients = []
    try:
        for _ in range(5):
            c = _socket.socket()
            c.setblocking(False)
            try:
                c.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
            clients.append(c)
        deadline = time.monotonic() + 5
        with SocketWalker(None) as w:
            while True:
                (rec,) = [r for r in w.walk() if r.lport == port and r.state == "listen"]
                if rec.queued > rec.backlog or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
        assert rec.backlog == 2 and rec.queued == 3, rec
        assert rec == SocketRecord(4, 6, 0x7F000001, port, None, 0, "listen")  # (not part of its identity)
    finally:
        for c in clients:
            c.close()
        srv.close()
