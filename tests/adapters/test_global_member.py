"""A member of a global address (`shmfabric adapter --global IP`) in a real namespace: the address
is on the namespace's lo and the interface never answers ARP for it while the adapter runs; the
adapter takes the address off again when it stops (SIGTERM, or an error), but never one that was
there before it; and a member with no address of its own is refused. Namespaces need root: those
tests skip with the reason otherwise."""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest

from shmfabric import programs
from shmfabric.fabric import Fabric

pytestmark = pytest.mark.timeout(60)

needs_root = [
    pytest.mark.skipif(os.geteuid() != 0, reason="TAP devices and network namespaces need root"),
    pytest.mark.skipif(programs.find("ip") is None,
                       reason=programs.not_found("ip", fix="Debian iproute2: `make setup` installs it as root")),
    pytest.mark.skipif(not os.path.exists("/dev/net/tun"), reason="no /dev/net/tun (the tun module) on this machine"),
]

VIP = "10.77.8.100"


def _root(f):
    for mark in needs_root:
        f = mark(f)
    return f


@pytest.fixture
def fabric() -> Iterator[str]:
    name = f"gmem{uuid.uuid4().hex[:6]}"
    fab = Fabric.create(name, ephemeral=True)
    yield name
    fab.close()
    Fabric.destroy(name)


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"sfgm{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def lo_addresses(ns: str) -> str:
    return subprocess.run(["ip", "-n", ns, "-o", "addr", "show", "dev", "lo"], capture_output=True, text=True,
                          check=True).stdout


def sysctl(ns: str, key: str) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-n", key], capture_output=True, text=True,
                          check=True).stdout.strip()


def start_member(fabric: str, ns: str) -> subprocess.Popen:
    """The member adapter, once its ready line is out (its address and settings are in place)."""
    p = subprocess.Popen([sys.executable, "-m", "shmfabric", "adapter", fabric, "m1", "--netns", ns,
                          "--address", "10.77.8.2/24", "--global", VIP],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout is not None
    ready, _, _ = select.select([p.stdout], [], [], 30)
    line = p.stdout.readline() if ready else ""
    if not line.startswith("adapter "):
        p.kill()
        _, err = p.communicate(timeout=10)
        pytest.fail(f"the adapter did not start: {line!r} {err}")
    return p


def stop(p: subprocess.Popen) -> tuple[int, str]:
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=30)
    return p.returncode, err


def test_a_member_without_an_address_of_its_own_is_refused() -> None:
    # (refused before the fabric or any namespace is looked at: no root needed)
    r = subprocess.run([sys.executable, "-m", "shmfabric", "adapter", f"nofab{uuid.uuid4().hex[:6]}", "m1",
                        "--global", VIP], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2, r.stderr
    assert f"--global {VIP} needs an address of this member's own" in r.stderr and "--address" in r.stderr
    assert "Traceback" not in r.stderr


def test_an_ipv4_global_address_needs_an_ipv4_address_of_the_members_own() -> None:
    r = subprocess.run([sys.executable, "-m", "shmfabric", "adapter", f"nofab{uuid.uuid4().hex[:6]}", "m1",
                        "--address", "fd00::2/64", "--global", VIP], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and f"--global {VIP} needs an IPv4 address" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


@_root
def test_a_member_holds_the_address_on_lo_while_it_runs_and_takes_it_off_on_sigterm(fabric: str,
                                                                                      netns: str) -> None:
    p = start_member(fabric, netns)
    try:
        assert f"inet {VIP}/32" in lo_addresses(netns)
        assert sysctl(netns, "net.ipv4.conf.sf0.arp_ignore") == "1"
        assert sysctl(netns, "net.ipv4.conf.sf0.arp_announce") == "2"
    finally:
        code, err = stop(p)
    assert code == 0, err
    assert VIP not in lo_addresses(netns)


@_root
def test_a_member_ended_by_an_error_takes_the_address_off_too(fabric: str, netns: str) -> None:
    p = start_member(fabric, netns)
    try:
        assert f"inet {VIP}/32" in lo_addresses(netns)
        subprocess.run(["ip", "-n", netns, "link", "del", "sf0"], check=True)  # the adapter ends with an error
        _, err = p.communicate(timeout=30)
    finally:
        if p.returncode is None:
            stop(p)
    assert p.returncode == 75 and "the interface sf0 was deleted" in err, err  # EX_TEMPFAIL: restarted
    assert VIP not in lo_addresses(netns)


@_root
def test_an_address_on_lo_before_the_member_started_stays_after_it_stops(fabric: str, netns: str) -> None:
    subprocess.run(["ip", "-n", netns, "addr", "add", f"{VIP}/32", "dev", "lo"], check=True)
    p = start_member(fabric, netns)
    try:
        assert lo_addresses(netns).count(f"inet {VIP}/32") == 1
    finally:
        code, err = stop(p)
    assert code == 0, err
    assert f"inet {VIP}/32" in lo_addresses(netns)
