"""`shmfabric global` and `adapter --global` refuse what cannot work with one clear line (exit 2,
no traceback), and a member whose namespace is missing is reported, not fatal."""
from __future__ import annotations

import subprocess
import sys
import uuid

import pytest

from shmfabric.fabric import Fabric

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def fabric():
    name = f"gcli{uuid.uuid4().hex[:6]}"
    fab = Fabric.create(name, ephemeral=True)
    yield name
    fab.close()
    Fabric.destroy(name)


def shmfabric(*argv: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shmfabric", *argv], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("argv,says", [
    (["--address", "10.0.0.300", "--member", "a=ns"], "is not an IP address"),
    (["--address", "224.0.0.5", "--member", "a=ns"], "cannot be shared"),
    (["--address", "10.0.0.100"], "needs at least one member"),
    (["--address", "10.0.0.100", "--member", "=ns"], "has no node name"),
    (["--address", "10.0.0.100", "--member", "a=x", "--member", "a=y"], "member 'a' given twice"),
    (["--address", "10.0.0.100", "--member", "gw=ns"], "cannot be its own member"),
    (["--address", "10.0.0.100", "--member", "a=ns", "--walk-every", "0"], "must be positive"),
])
def test_what_cannot_work_is_refused_in_one_line(fabric: str, argv: list[str], says: str) -> None:
    r = shmfabric("global", fabric, "gw", *argv)
    assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_missing_fabric_says_how_to_make_one() -> None:
    r = shmfabric("global", f"nofab{uuid.uuid4().hex[:6]}", "gw", "--address", "10.0.0.100", "--member", "a=ns")
    assert r.returncode == 2 and "shmfabric create" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_member_whose_namespace_is_missing_is_reported_and_the_dispatcher_runs_on(fabric: str) -> None:
    ns = f"sfnone{uuid.uuid4().hex[:6]}"
    r = shmfabric("global", fabric, "gw", "--address", "10.0.0.100", "--member", f"a={ns}", "--seconds", "1.5",
                  "--json")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("global gw: address 10.0.0.100"), r.stdout
    assert "member a takes no new connections" in r.stderr and f"ip netns add {ns}" in r.stderr, r.stderr
    assert '"table_nodes": 0' in r.stdout, r.stdout


def test_adapter_global_takes_one_unicast_address(fabric: str) -> None:
    for bad, says in (("10.0.0.0/24", "is not an IP address"), ("ff02::1", "cannot be shared")):
        r = shmfabric("adapter", fabric, "m1", "--address", "10.0.0.2/24", "--global", bad)
        assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, r.stderr
