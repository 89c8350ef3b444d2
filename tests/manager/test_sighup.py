"""SIGHUP makes a running manager reload its config file (kill -HUP, systemd ExecReload) instead of
stopping the deployment; `up --detach --quiet` prints nothing."""
from __future__ import annotations

import json
import os
import signal
import time

import pytest

from shmfabric.cli.manager_cmds import api_call
from tests.manager.test_manager_cmds import cli, env, topo  # noqa: F401  (fixtures)

pytestmark = pytest.mark.timeout(120)


def test_sighup_reloads_the_config_file(env, topo, tmp_path):  # noqa: F811
    path, name = topo
    p = cli(env, "up", path, "--detach", "--quiet")
    try:
        assert p.stdout == ""  # --quiet: not even the one line
        st = json.loads((tmp_path / "state" / f"{name}.json").read_text())
        path.write_text(path.read_text().replace('rules: "policy accept"', 'rules: "policy accept\\nconntrack off"'))
        os.kill(st["pid"], signal.SIGHUP)
        deadline = time.monotonic() + 30
        while True:
            s = api_call(st["api"], "/status", timeout=10)
            fw = next(n for n in s["nodes"] if n["name"] == "fw")
            if "conntrack off" in fw["config"]["rules"]:
                break
            assert time.monotonic() < deadline, "SIGHUP did not reload the file"
            time.sleep(0.1)
        assert all(i["state"] == "running" for n in s["nodes"] for i in n["instances"])
        assert any(e["kind"] == "reload" for e in s["events"])
        # the manager writes its "SIGHUP: reloaded" line once the reload returns, which may be
        # just after the new config shows in /status
        while True:
            log = (tmp_path / "state" / f"{name}.log").read_text()
            if "SIGHUP: reloaded" in log or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert "SIGHUP: reloaded" in log and "reconfigured fw" in log
    finally:
        cli(env, "down", "--fabric", name, check=False)


def test_metrics_port_0_is_recorded_and_reload_says_what_it_cannot_apply(env, topo, tmp_path):  # noqa: F811
    import urllib.request

    path, name = topo
    path.write_text(path.read_text().replace("poll_interval: 0.1", "poll_interval: 0.1\nmetrics: 127.0.0.1:0"))
    cli(env, "up", path, "--detach")
    try:
        st = json.loads((tmp_path / "state" / f"{name}.json").read_text())
        host, _, port = st["metrics"].rpartition(":")
        assert host == "127.0.0.1" and int(port) > 0
        with urllib.request.urlopen(f"http://{st['metrics']}/metrics", timeout=10) as r:
            assert b"shmfabric_node_up" in r.read()
        path.write_text(path.read_text().replace("metrics: 127.0.0.1:0", "metrics: 127.0.0.1:1")
                        .replace("poll_interval: 0.1", "poll_interval: 0.2"))
        p = cli(env, "reload", "--fabric", name)
        assert "settings poll_interval 0.1s -> 0.2s" in p.stdout
        assert "warning: `metrics:` changed (127.0.0.1:0 -> 127.0.0.1:1)" in p.stderr and "restart the manager" in p.stderr
    finally:
        cli(env, "down", "--fabric", name, check=False)
