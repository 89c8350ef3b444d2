"""`--json` of the manager's verbs: `up --detach` and `down` print one JSON object with stable names."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from shmfabric.core.region import region_path
from shmfabric.fabric import Fabric
from tests.manager.conftest import unique_fabric

pytestmark = pytest.mark.timeout(180)

TOPO = """\
fabric: {name: FABRIC, ring_size: 256, max_nodes: 8, networks: [{mtu: 1500, slots: 1024}]}
poll_interval: 0.1
nodes:
  - {name: gen, function: generator, config: {rate: 1000, size: 100, flows: 4}}
  - {name: sink, function: sink}
chains:
  - {name: main, nodes: [gen, sink]}
"""

DOWN_FIELDS = {"fabric", "pid", "api", "stopped", "seconds"}


@pytest.fixture
def env(tmp_path):
    return dict(os.environ, SHMFABRIC_STATE_DIR=str(tmp_path / "state"), PYTHONUNBUFFERED="1")


@pytest.fixture
def topo(tmp_path):
    name = unique_fabric()
    path = tmp_path / "t.yaml"
    path.write_text(TOPO.replace("FABRIC", name))
    yield path, name
    Fabric.destroy(name)


def cli(env, *args, timeout=90):
    p = subprocess.run([sys.executable, "-m", "shmfabric", *map(str, args)], env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, f"shmfabric {' '.join(map(str, args))} -> {p.returncode}\n{p.stdout}\n{p.stderr}"
    return p


def _one_json_object(stdout: str) -> dict:
    lines = stdout.strip().splitlines()
    assert len(lines) == 1, stdout
    out = json.loads(lines[0])
    assert isinstance(out, dict)
    return out


@pytest.mark.parametrize("by_api", [False, True], ids=["state-file", "api"])
def test_down_json_prints_one_object_with_the_up_json_names(env, topo, by_api):
    path, name = topo
    up = _one_json_object(cli(env, "up", path, "--detach", "--json").stdout)
    assert up["fabric"] == name and up["pid"] > 0 and up["api"].startswith("http://")
    try:
        args = ["--api", up["api"]] if by_api else []
        p = cli(env, "down", *args, "--json")
    except BaseException:
        subprocess.run([sys.executable, "-m", "shmfabric", "down", "--fabric", name], env=env, timeout=90)
        raise
    assert p.stderr == ""
    down = _one_json_object(p.stdout)
    assert set(down) == DOWN_FIELDS
    # the names up --json uses mean the same here
    assert (down["fabric"], down["pid"], down["api"]) == (name, up["pid"], up["api"])
    assert down["stopped"] is True
    assert isinstance(down["seconds"], float) and 0 <= down["seconds"] <= 90
    assert not region_path(name).exists()


def test_down_help_shows_the_timeout_default(env):
    out = cli(env, "down", "--help").stdout
    assert "--timeout" in out and "(default: 60)" in " ".join(out.split())
