"""The state files `up` leaves and `down | status | top | reload` read: a pid reused by another process
is not taken for the manager (never signalled, never blocks `up`), `--fabric` cannot name a path, and
files in the state directory the manager did not write are neither deleted nor a crash."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.manager.conftest import unique_fabric
from tests.manager.test_manager_cmds import TOPO, cli, env, topo  # noqa: F401  (fixtures)

pytestmark = pytest.mark.timeout(120)


def test_a_reused_pid_is_neither_signalled_nor_blocking_up(env, topo, tmp_path):  # noqa: F811
    path, name = topo
    state = tmp_path / "state"
    state.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        # as a manager that was killed left it, its pid since given to an unrelated process
        (state / f"{name}.json").write_text(json.dumps({"kind": "shmfabric-manager", "fabric": name, "pid": other.pid,
                                                        "start_time": 1, "api": "http://127.0.0.1:1"}))
        p = cli(env, "down", "--fabric", name, "--timeout", "3", check=False)
        assert p.returncode == 2 and "no running manager" in p.stderr and "Traceback" not in p.stderr
        assert "removed the stale state file" in p.stderr
        assert other.poll() is None  # not signalled
        (state / f"{name}.json").write_text(json.dumps({"kind": "shmfabric-manager", "fabric": name, "pid": other.pid,
                                                        "start_time": 1, "api": None}))
        p = cli(env, "up", path, "--duration", "0.5", check=False)
        assert p.returncode == 0, p.stderr
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_fabric_names_a_state_file_never_a_path(env, tmp_path):  # noqa: F811
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "package.json").write_text('{"name": "my-app"}')
    for verb in ("status", "down", "top", "reload"):
        p = cli(env, verb, "--fabric", "../victim/package", check=False)
        assert p.returncode == 2 and "--fabric '../victim/package'" in p.stderr and "Traceback" not in p.stderr
    for bad in ("-rf", ".."):
        p = cli(env, "status", f"--fabric={bad}", check=False)
        assert p.returncode == 2 and "must start with a letter or digit" in p.stderr and "Traceback" not in p.stderr
    assert (victim / "package.json").exists()


def test_foreign_files_in_the_state_dir_are_skipped_not_deleted(env, tmp_path):  # noqa: F811
    state = tmp_path / "state"
    state.mkdir()
    files = {"list.json": "[1, 2]", "abc.json": '{"fabric": "abc", "pid": "abc"}', "pkg.json": '{"name": "x"}',
             "old.json": '{"fabric": "old", "pid": 999999999}'}
    for n, body in files.items():
        (state / n).write_text(body)
    p = cli(env, "status", check=False)
    assert p.returncode == 2 and "no running manager" in p.stderr and "Traceback" not in p.stderr
    assert sorted(f.name for f in state.iterdir()) == sorted(files)  # none was written by a manager
    name = unique_fabric()
    (state / f"{name}.json").write_text(json.dumps({"kind": "shmfabric-manager", "fabric": name, "pid": 999999999}))
    p = cli(env, "status", check=False)
    assert "removed the stale state file" in p.stderr and not (state / f"{name}.json").exists()
