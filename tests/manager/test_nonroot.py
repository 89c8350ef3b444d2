"""shmfabric as a normal user, next to other users' fabrics and state (a review run as a non-root user):

1. another user's region in /dev/shm (say root's `make run` fabric, running or killed): `up --fabric
   NAME` and `destroy NAME` say in one line whose it is (exit 2), never a traceback nor "no live
   process maps it", and remove nothing;
2. programs Debian puts in /usr/sbin (nginx, haproxy, nutcracker, nft, conntrack, ip) are found
   although a user's PATH lacks it, and run by their full path (shmfabric.programs);
3. the state directory is made 0700 and the state files 0600; one owned by another user, writable
   by its group or others, or a symbolic link is refused by every verb, naming SHMFABRIC_STATE_DIR,
   so a state file planted there is never trusted (`down` signals no one).

The non-root CLI runs in a process that imports what it needs while root, then drops to uid and
gid 65534 (nobody) for good and only then runs `main`: the venv's interpreter may live in a home
only root may enter (here /root, mode 0700), where `runuser -u nobody` could not even start it.
"""
from __future__ import annotations

import ast
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from shmfabric import programs
from shmfabric.core.region import region_path
from shmfabric.fabric import Fabric
from tests.manager.conftest import unique_fabric
from tests.manager.test_manager_cmds import TOPO, cli

pytestmark = pytest.mark.timeout(120)

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: makes files owned by another uid "
                                "(os.chown) and runs the CLI as uid 65534")

# argv: uid, a config to load first ("" for none), then the CLI's arguments
_AS_USER = textwrap.dedent("""
    import os, sys
    uid, cfg, argv = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    # what the CLI imports lazily, imported while the interpreter's own files are still readable
    import json, pwd, stat, urllib.request
    from shmfabric.cli.main import build_parser, main
    build_parser()
    import shmfabric.cli.manager_cmds as mc
    import shmfabric.core.region, shmfabric.fabric, shmfabric.manager.api, shmfabric.manager.supervisor
    if cfg:
        mc._load(cfg)  # the functions the config names
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    assert os.getuid() == os.geteuid() == uid
    sys.exit(main(argv))
""")


def cli_as(uid: int, *args, env: dict, cfg: Path | str = "", timeout: float = 60) -> subprocess.CompletedProcess:
    """`shmfabric ARGS` run as `uid` (see the module's docstring)."""
    return subprocess.run([sys.executable, "-c", _AS_USER, str(uid), str(cfg), *map(str, args)], env=env, cwd="/",
                          capture_output=True, text=True, timeout=timeout)


def one_line(p: subprocess.CompletedProcess) -> str:
    err = p.stderr.strip()
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


@pytest.fixture
def nobody_dir() -> Path:
    """A scratch directory of uid 65534's own (0700), outside root's 0700 pytest tree."""
    d = Path(tempfile.mkdtemp(prefix="shmfabric-nonroot-"))
    try:
        os.chown(d, NOBODY, NOBODY)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def nobody_env(nobody_dir: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XDG_RUNTIME_DIR", "SHMFABRIC_STATE_DIR")}
    return dict(env, SHMFABRIC_STATE_DIR=str(nobody_dir / "state"), PYTHONUNBUFFERED="1",
                PYTHONDONTWRITEBYTECODE="1", HOME=str(nobody_dir))


@pytest.fixture(params=[(0o600, False), (0o666, False), (0o600, True)],
                ids=["killed-0600", "killed-0666", "running-0600"])
def roots_region(request):
    """A region root made (as `make run` does): mode 0600 (nobody cannot open it: the "unreadable"
    path) or 0666 (nobody opens it and finds no live node), with a live node attached or none."""
    mode, live = request.param
    name = unique_fabric()
    fab = Fabric.create(name, max_nodes=4, ring_size=64, mode=mode)
    try:
        os.chmod(region_path(name), mode)  # whatever the umask
        if live:
            fab.attach("holder")  # heartbeats from this process while the test runs
        yield name
    finally:
        fab.close()
        Fabric.destroy(name)


# -- 1. another user's region ----------------------------------------------------------------------------
@needs_root
def test_up_refuses_another_users_region_in_one_line(roots_region, nobody_dir, nobody_env):
    name = roots_region
    path = region_path(name)
    ino = os.stat(path).st_ino
    cfg = nobody_dir / "t.yaml"
    cfg.write_text(TOPO.replace("FABRIC", "unused"))
    os.chmod(cfg, 0o644)
    p = cli_as(NOBODY, "up", cfg, "--fabric", name, "--duration", "1", "--quiet", env=nobody_env, cfg=cfg)
    err = one_line(p)
    assert err == (f"shmfabric: error: region {path} belongs to uid 0 (root); choose another fabric name "
                   "(--fabric) or ask its owner to remove it")
    assert "no live process" not in p.stdout + p.stderr
    assert os.stat(path).st_ino == ino  # not replaced, not removed


@needs_root
def test_destroy_of_another_users_region_names_its_owner_in_one_line(roots_region, nobody_env):
    name = roots_region
    path = region_path(name)
    err = one_line(cli_as(NOBODY, "destroy", name, env=nobody_env))
    assert err.startswith(f"shmfabric: error: cannot remove {path} (Operation not permitted): it belongs to "
                          "uid 0 (root)"), err
    assert "ask its owner to remove it, or choose another fabric name" in err
    assert path.exists()


@needs_root
def test_fabric_destroy_raises_fabric_error_naming_the_owner(nobody_dir):
    """A region of uid 65534 (no live node), removed by uid 65533 through the Python API."""
    name = unique_fabric()
    path = region_path(name)
    path.write_bytes(b"\0" * 4096)  # a creation that died half made
    try:
        os.chown(path, NOBODY, NOBODY)
        code = ("import os, sys\nfrom shmfabric.fabric import Fabric, FabricError\nimport pwd\n"
                "os.setgroups([]); os.setresgid(65533, 65533, 65533); os.setresuid(65533, 65533, 65533)\n"
                f"try:\n    Fabric.destroy({name!r})\nexcept FabricError as e:\n    print(type(e).__name__, e)\n")
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd="/")
        assert p.returncode == 0 and not p.stderr, p.stderr
        assert p.stdout.startswith(f"CoreError cannot remove {path} (Operation not permitted): it belongs to uid "
                                   f"{NOBODY} (nobody)"), p.stdout
        assert path.exists()
    finally:
        path.unlink(missing_ok=True)


# -- 2. programs in /usr/sbin ----------------------------------------------------------------------------
def test_programs_imports_nothing_of_shmfabric():
    tree = ast.parse(Path(programs.__file__).read_text())
    mods = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    mods += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [m for m in mods if m.split(".")[0] == "shmfabric"], mods


def test_find_looks_on_path_first_then_in_sbin(tmp_path, monkeypatch):
    sbin, bin_ = tmp_path / "sbin", tmp_path / "bin"
    for d in (sbin, bin_):
        d.mkdir()
        exe = d / "shmfabric-test-peer"
        exe.write_text("#!/bin/sh\n")
        exe.chmod(0o755)
    monkeypatch.setattr(programs, "SBIN_DIRS", (str(sbin),))
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert programs.find("shmfabric-test-peer") == str(sbin / "shmfabric-test-peer")
    monkeypatch.setenv("PATH", f"{bin_}:/usr/bin:/bin")
    assert programs.find("shmfabric-test-peer") == str(bin_ / "shmfabric-test-peer")
    assert programs.missing("shmfabric-test-peer", "shmfabric-no-such-peer") == ["shmfabric-no-such-peer"]
    assert programs.not_found("shmfabric-no-such-peer") == (
        f"needs shmfabric-no-such-peer: not found on PATH or in {sbin}; `make setup` installs it as root")


@pytest.mark.skipif(not Path("/usr/sbin/nginx").exists(), reason="needs /usr/sbin/nginx (Debian nginx-light: "
                    "`make setup` installs it as root)")
def test_benches_find_and_run_sbin_peers_off_a_users_path(tmp_path, monkeypatch):
    from shmfabric.bench.splice_http import missing_tools, start_nginx
    from shmfabric.bench.splice_redis import _need

    monkeypatch.setenv("PATH", "/usr/local/bin:/usr/bin:/bin")  # a Debian user's: no sbin
    assert shutil.which("nginx") is None
    assert programs.find("nginx") == "/usr/sbin/nginx"
    assert missing_tools("nginx") == []
    with start_nginx(tmp_path, "n1") as port:  # run by its full path
        assert port > 0
    if Path("/usr/sbin/nutcracker").exists():
        assert _need("nutcracker", "nutcracker") == "/usr/sbin/nutcracker"


# -- 3. the state directory ------------------------------------------------------------------------------
def _umask_022():
    os.umask(0o022)


@pytest.mark.parametrize("detach", [True, False], ids=["detach", "foreground"])
def test_a_fresh_state_dir_is_0700_and_the_state_file_0600(tmp_path, detach):
    name = unique_fabric()
    cfg = tmp_path / "t.yaml"
    cfg.write_text(TOPO.replace("FABRIC", name))
    state = tmp_path / "new" / "state"
    env = dict(os.environ, SHMFABRIC_STATE_DIR=str(state), PYTHONUNBUFFERED="1")
    args = ["--detach"] if detach else ["--duration", "30"]
    proc = subprocess.Popen([sys.executable, "-m", "shmfabric", "up", str(cfg), "--quiet", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_umask_022)
    try:
        deadline = time.monotonic() + 60
        while not (state / f"{name}.json").exists():
            assert proc.poll() in (None, 0), proc.communicate()
            assert time.monotonic() < deadline, "no state file within 60 s"
            time.sleep(0.1)
        if detach:
            assert proc.wait(60) == 0, proc.communicate()
            assert stat.S_IMODE(os.lstat(state / f"{name}.log").st_mode) == 0o600
        assert stat.S_IMODE(os.lstat(state).st_mode) == 0o700
        assert stat.S_IMODE(os.lstat(state / f"{name}.json").st_mode) == 0o600
        assert stat.S_IMODE(os.lstat(state / f"{name}-logs").st_mode) == 0o700
    finally:
        cli(env, "down", "--fabric", name, check=False)
        proc.communicate(timeout=60)
        Fabric.destroy(name)


def _refused(p: subprocess.CompletedProcess, state: Path, problem: str) -> None:
    err = one_line(p)
    assert f"state directory {state} {problem}" in err and "SHMFABRIC_STATE_DIR" in err, err


@pytest.mark.parametrize("mode, was", [(0o777, "was writable by others (mode 777)"),
                                       (0o1777, "was writable by others (mode 1777)"),
                                       (0o775, "was writable by its group (mode 775)")])
def test_a_state_dir_of_yours_others_may_write_is_made_0700(tmp_path, mode, was):
    """An older version made the directory under the umask (0775 under umask 002): refusing it
    locked users out of their own running managers. Ours and holding only our files: made 0700."""
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(mode)
    (state / "old.log").write_text("")
    env = dict(os.environ, SHMFABRIC_STATE_DIR=str(state))
    p = cli(env, "status", check=False)
    assert f"state directory {state} {was}: made 0700" in p.stderr, p.stderr
    assert "no running manager found" in p.stderr and "not used" not in p.stderr, p.stderr  # used
    assert stat.S_IMODE(os.lstat(state).st_mode) == 0o700


@needs_root
def test_a_state_dir_others_could_write_holding_their_files_is_refused(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o777)
    planted = state / "edge.json"
    planted.write_text("{}")
    os.chown(planted, 65534, 65534)  # someone else's, put there while the directory was open
    env = dict(os.environ, SHMFABRIC_STATE_DIR=str(state))
    for verb in ("status", "down"):
        _refused(cli(env, verb, check=False), state, "was writable by others (mode 777)")
    name = unique_fabric()
    cfg = tmp_path / "t.yaml"
    cfg.write_text(TOPO.replace("FABRIC", name))
    p = cli(env, "up", cfg, "--duration", "1", check=False)
    _refused(p, state, "was writable by others (mode 777)")
    assert "holds files that are not yours (edge.json)" in p.stderr and "down --api" in p.stderr
    assert not region_path(name).exists()  # refused before anything started
    assert stat.S_IMODE(os.lstat(state).st_mode) == 0o777  # left as it was: refused again next time


def test_a_state_dir_that_is_a_symbolic_link_is_refused(tmp_path):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    state = tmp_path / "state"
    state.symlink_to(real)
    env = dict(os.environ, SHMFABRIC_STATE_DIR=str(state))
    _refused(cli(env, "status", check=False), state, "is a symbolic link")


@needs_root
def test_a_state_file_planted_in_another_users_state_dir_is_never_trusted(tmp_path):
    name = unique_fabric()
    state = tmp_path / "planted"
    state.mkdir(mode=0o755)  # nobody's, not writable by others: only the owner is wrong
    os.chown(state, NOBODY, NOBODY)
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        with open(f"/proc/{victim.pid}/stat", "rb") as f:
            start = int(f.read().rsplit(b")", 1)[1].split()[19])
        (state / f"{name}.json").write_text(json.dumps({"kind": "shmfabric-manager", "fabric": name,
                                                        "pid": victim.pid, "start_time": start, "api": None}))
        env = dict(os.environ, SHMFABRIC_STATE_DIR=str(state))
        problem = f"belongs to uid {NOBODY} (nobody), not to you (uid 0)"
        _refused(cli(env, "down", "--fabric", name, "--timeout", "3", check=False), state, problem)
        _refused(cli(env, "status", check=False), state, problem)
        cfg = tmp_path / "t.yaml"
        cfg.write_text(TOPO.replace("FABRIC", name))
        _refused(cli(env, "up", cfg, "--duration", "1", check=False), state, problem)
        assert victim.poll() is None  # never signalled
        assert not region_path(name).exists()
    finally:
        victim.kill()
        victim.wait()


@needs_root
def test_the_default_state_dir_made_first_by_another_user_is_refused(nobody_env):
    """/tmp/shmfabric-65534 (no XDG_RUNTIME_DIR, no SHMFABRIC_STATE_DIR) made first by root, 1777."""
    planted = Path(f"/tmp/shmfabric-{NOBODY}")
    if os.path.lexists(planted):
        pytest.skip(f"{planted} exists already: not ours to replace")
    env = {k: v for k, v in nobody_env.items() if k != "SHMFABRIC_STATE_DIR"}
    planted.mkdir()
    try:
        planted.chmod(0o1777)
        for verb in ("status", "down"):
            _refused(cli_as(NOBODY, verb, env=env), planted, "belongs to uid 0 (root), not to you (uid 65534)")
    finally:
        shutil.rmtree(planted, ignore_errors=True)
