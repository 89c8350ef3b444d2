"""Secrets in function configs (the `encrypt` tunnel's inline AES `key`) never leave the manager: not on
an instance's command line (/proc/PID/cmdline, `ps`), not in `status --json`, the API's answers, its
events and errors, nor in the files of the state directory; the tunnel still works, and a reload or
an API push that changes only the key does reach the instances (the manager compares real values)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from shmfabric.fabric import Fabric
from shmfabric.manager.supervisor import SupervisorError
from tests.manager.conftest import counters, unique_fabric, wait_until

pytestmark = pytest.mark.timeout(180)

KEY1 = "5ec12e75ec12e75ec12e75ec12e75ec12e75ec12e75ec12e75ec12e75ec12e7a"
KEY2 = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"
KEY3 = "c0ffee00c0ffee00c0ffee00c0ffee00"  # AES-128

TUNNEL = """\
fabric: {name: "{fabric}", ring_size: 256, max_nodes: 12, networks: [{name: lan, mtu: 1600, slots: 2048}]}
api: 127.0.0.1:0
poll_interval: 0.1
policies:
  restart: {backoff_initial: 0.1, backoff_max: 1}
nodes:
  - {name: gen, function: generator, config: {rate: 300, size: 200, flows: 16}}
  - {name: seal, function: encrypt, config: {mode: encap, key: "SEALKEY", resalt_after: 0.5}}
  - {name: unseal, function: encrypt, config: {mode: decap, key: "UNSEALKEY", max_clock_skew: 0.5}}
  - {name: sink, function: sink}
chains:
  - {name: t, nodes: [gen, seal, unseal, sink]}
"""


def tunnel(seal: str = KEY1, unseal: str = KEY1) -> str:
    return TUNNEL.replace("UNSEALKEY", unseal).replace("SEALKEY", seal)


def _cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode()


def _no_key(text: str, *keys: str) -> None:
    for k in keys:
        assert k not in text, f"a secret key leaked: {text[max(0, text.find(k) - 200):text.find(k) + 80]!r}"


# -- the helpers ---------------------------------------------------------------------------------------

def test_secret_fields_are_repr_false_or_marked_secret():
    from pydantic import BaseModel, Field

    from shmfabric.functions.api import secret_fields
    from shmfabric.functions.builtin.tunnel import Encrypt, EncryptConfig

    class Cfg(BaseModel):
        user: str = "u"
        password: str = Field("", json_schema_extra={"secret": True})
        token: str = Field("", alias="api-token", repr=False)
        note: str = Field("", json_schema_extra={"secret": False})

    assert secret_fields(EncryptConfig) == {"key"}
    assert secret_fields(Encrypt) == {"key"}  # a function class: its Config
    assert secret_fields(Cfg) == {"password", "token", "api-token"}
    assert secret_fields(object) == frozenset()


@pytest.mark.parametrize("memfd", [True, False])
def test_the_config_fd_reads_the_config_once_and_leaves_nothing_on_disk(monkeypatch, memfd):
    from shmfabric.functions import run
    from shmfabric.manager import supervisor

    if not memfd:  # where memfd_create is missing or refused: a pipe
        def refuse(*a, **k):
            raise OSError(38, "Function not implemented")
        monkeypatch.setattr(os, "memfd_create", refuse)
    config = {"mode": "decap", "key": KEY1, "rules": "x" * 200_000}  # over a pipe's buffer
    fd = supervisor._config_fd(config)
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
        assert target.startswith("/memfd:" if memfd else "pipe:"), target
        with open(f"/proc/self/fd/{fd}") as f:
            assert json.loads(f.read()) == config
    finally:
        run._close_own_fd(f"/proc/self/fd/{fd}")  # what the function's process does once it read it
    with pytest.raises(OSError):
        os.fstat(fd)


# -- end to end: `shmfabric up --detach | status | reload | down` ----------------------------------------

def _cli(env, *args, timeout=90):
    p = subprocess.run([sys.executable, "-m", "shmfabric", *map(str, args)], env=env, capture_output=True, text=True,
                       timeout=timeout)
    if p.returncode != 0:
        pytest.fail(f"shmfabric {' '.join(map(str, args))} -> {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p.stdout + p.stderr


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def _fc(st: dict, inst: str) -> dict:
    return next(i["function_counters"] for n in st["nodes"] for i in n["instances"] if i["name"] == inst)


def test_the_key_stays_out_of_cmdline_status_api_and_state_files_and_a_reload_pushes_it(tmp_path):
    name = unique_fabric()
    state = tmp_path / "state"
    env = dict(os.environ, SHMFABRIC_STATE_DIR=str(state), PYTHONUNBUFFERED="1")
    cfg = tmp_path / "tun.yaml"
    cfg.write_text(tunnel().replace("{fabric}", name))
    _cli(env, "up", cfg, "--detach")
    url = json.loads((state / f"{name}.json").read_text())["api"]
    pids: list[int] = []
    try:
        # the command lines first: no config on them, it came on an fd
        pids = [i["pid"] for n in json.loads(_get(url + "/status"))["nodes"] for i in n["instances"]]
        assert len(pids) == 4 and all(pids)
        lines = [_cmdline(pid) for pid in pids]
        _no_key(" ".join(lines), KEY1)
        for line in lines:
            assert "--config @/proc/self/fd/" in line, line

        def status() -> dict:
            out = _cli(env, "status", "--json")
            _no_key(out, KEY1, KEY2)
            return json.loads(out)

        def frames(st: dict) -> int:
            return int(_fc(st, "sink").get("frames", 0))

        # the tunnel works: frames go through encap -> decap, none fails authentication
        st = status()
        deadline = time.monotonic() + 30
        while frames(st) < 50 and time.monotonic() < deadline:
            time.sleep(0.2)
            st = status()
        assert frames(st) >= 50, st["events"]
        assert _fc(st, "unseal")["out_packets"] > 0 and _fc(st, "unseal")["auth_failed"] == 0
        assert _fc(st, "seal")["out_packets"] > 0
        # status --json: the config is there, its secret field redacted
        conf = {n["name"]: n["config"] for n in st["nodes"]}
        assert conf["seal"] == {"mode": "encap", "key": "<redacted>", "resalt_after": 0.5}
        assert conf["unseal"] == {"mode": "decap", "key": "<redacted>", "max_clock_skew": 0.5}
        assert conf["gen"]["rate"] == 300  # the others as they are
        # each function read its config and closed the fd (the instances are the same: none restarted)
        assert [i["pid"] for n in st["nodes"] for i in n["instances"]] == pids
        for pid in pids:
            assert not [t for t in _fd_targets(pid) if t.startswith("/memfd:")], "the function kept its config fd"
        # the API
        for path in ("/status", "/nodes/seal", "/nodes/unseal", "/metrics"):
            _no_key(_get(url + path), KEY1)

        # a reload that changes only the decap's key: the manager pushes it (the decap now fails
        # every packet the encap seals with the old key)
        cfg.write_text(tunnel(seal=KEY1, unseal=KEY2).replace("{fabric}", name))
        out = _cli(env, "reload")
        _no_key(out, KEY1, KEY2)
        assert "reconfigured unseal" in out and "reconfigured seal" not in out
        deadline = time.monotonic() + 30
        while _fc(st := status(), "unseal")["auth_failed"] < 20 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _fc(st, "unseal")["auth_failed"] >= 20, "the new key did not reach the decap"
        # and the encap's too: frames get through again, none fails any more
        cfg.write_text(tunnel(seal=KEY2, unseal=KEY2).replace("{fabric}", name))
        out = _cli(env, "reload")
        _no_key(out, KEY1, KEY2)
        assert "reconfigured seal" in out
        deadline = time.monotonic() + 30
        base = status()
        while True:
            time.sleep(0.5)
            st = status()
            moved = frames(st) - frames(base)
            if moved >= 30 and _fc(st, "unseal")["auth_failed"] == _fc(base, "unseal")["auth_failed"]:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"the tunnel does not work after both keys changed: {_fc(st, 'unseal')}")
            if moved < 30:
                continue
            base = st  # frames sealed with the old key were still in flight: look again
        for path in ("/status", "/nodes/seal", "/nodes/unseal"):
            _no_key(_get(url + path), KEY1, KEY2)
        _state_files_clean(state, KEY1, KEY2)
    finally:
        _cli(env, "down")
        Fabric.destroy(name)
    _state_files_clean(state, KEY1, KEY2)
    assert not any(_alive(p) for p in pids)


def _fd_targets(pid: int) -> list[str]:
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:  # closed meanwhile
            pass
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except OSError:
        return False


def _state_files_clean(state: Path, *keys: str) -> None:
    files = [p for p in state.rglob("*") if p.is_file()]
    assert files  # the state file, the manager's log, the instances' logs
    for p in files:
        _no_key(p.read_text(errors="replace"), *keys)
    for p in state.rglob("*.log"):
        assert p.stat().st_mode & 0o077 == 0, f"{p} is readable by others: {oct(p.stat().st_mode)}"


# -- the management API against the real supervisor: pushes, restarts, scale-out --------------------------

def _api(url: str, path: str, body: dict | None = None) -> tuple[int, str]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method="GET" if body is None else "POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_api_pushes_restarts_and_scale_out_keep_the_key_secret_and_working(run_topology):
    from shmfabric.manager.api import ApiServer

    sup = run_topology(tunnel().replace("api: 127.0.0.1:0\n", ""))
    api = ApiServer(sup, "127.0.0.1:0").start()
    try:
        url = api.url

        def fc(inst: str) -> dict:
            return counters(sup, inst, fn=True)

        def flowing(what: str, more: int = 30) -> None:
            """Frames reach the sink again and none fails authentication any more."""
            base = [int(fc("sink").get("frames", 0)), sum(int(counters(sup, i.name, fn=True).get("auth_failed", 0))
                                                          for i in sup.nodes["unseal"].instances)]

            def ok() -> bool:
                now = [int(fc("sink").get("frames", 0)), sum(int(counters(sup, i.name, fn=True).get("auth_failed", 0))
                                                             for i in sup.nodes["unseal"].instances)]
                if now[0] - base[0] < more:
                    return False
                if now[1] != base[1]:
                    base[:] = now  # in flight under the old key: look again
                    return False
                return True
            wait_until(ok, what=what, sup=sup, timeout=30)

        flowing("frames through the tunnel")
        code, body = _api(url, "/status")
        assert code == 200
        _no_key(body, KEY1)
        assert json.loads(body)["nodes"][1]["config"]["key"] == "<redacted>"

        # a config copied from status (key "<redacted>") keeps the key the node runs
        code, body = _api(url, "/nodes/unseal/config", {"config": {"mode": "decap", "key": "<redacted>",
                                                                   "max_clock_skew": 0.5, "replay_window": 2048}})
        assert code == 200, body
        _no_key(body, KEY1)
        assert sup.nodes["unseal"].config == {"mode": "decap", "key": KEY1, "max_clock_skew": 0.5, "replay_window": 2048}
        flowing("frames after a push that kept the key")

        # a new key on both ends, pushed live: the answers never show it, the manager holds it
        # (a decap that restarts accepts senders again after max_clock_skew: kept short)
        for node, conf in (("unseal", {"mode": "decap", "max_clock_skew": 0.5}), ("seal", {"mode": "encap",
                                                                                          "resalt_after": 0.5})):
            code, body = _api(url, f"/nodes/{node}/config", {"config": {**conf, "key": KEY3}})
            assert code == 200, body
            _no_key(body, KEY1, KEY3)
            assert json.loads(body)["config"]["key"] == "<redacted>"
            assert all(i.config["key"] == KEY3 for i in sup.nodes[node].instances)
        flowing("frames under the new key")

        # a bad key is refused without being quoted, in the answer as in the events
        code, body = _api(url, "/nodes/seal/config", {"config": {"mode": "encap", "key": KEY3[:-2] + "zz"}})
        assert code == 422 and "not hex" in body, body
        _no_key(body, KEY3, KEY3[:-2])

        # kill -9 of the decap: the restarted process got the current config (KEY3) on its fd
        old = sup.nodes["unseal"].instances[0]
        old_pid = old.pid
        os.kill(old_pid, signal.SIGKILL)
        wait_until(lambda: old.restarts == 1 and old.state == "running", what="unseal restarted", sup=sup)
        assert old.pid != old_pid
        _no_key(_cmdline(old.pid), KEY1, KEY3)
        flowing("frames through the restarted decap")

        # scale-out: the new encap instance too
        code, body = _api(url, "/nodes/seal/scale", {"instances": 2})
        assert code == 200, body
        _no_key(body, KEY3)
        seals = sup.nodes["seal"].instances
        assert len(seals) == 2 and all(i.state == "running" for i in seals)
        for i in seals:
            _no_key(_cmdline(i.pid), KEY3)
        wait_until(lambda: int(counters(sup, "seal-2", fn=True).get("out_packets", 0)) > 5,
                   what="the new encap instance sealing", sup=sup, timeout=30)
        flowing("frames through both encap instances")

        # a secret quoted anywhere the manager shows text is redacted (events, errors)
        sup._event("error", "seal", f"something said {KEY3} and {KEY1}")
        code, body = _api(url, "/status")
        _no_key(body, KEY1, KEY3)
        assert "something said <redacted> and <redacted>" in body
        assert sup.redact_text(f"x{KEY3}y") == "x<redacted>y"
        _no_key(repr(sup.nodes["seal"]), KEY3)
        _no_key(repr(sup.nodes["seal"].instances[0]), KEY3)
    finally:
        api.close()


def test_a_refused_push_makes_nothing_a_secret_and_the_remembered_secrets_are_bounded(run_topology):
    """A push refused by validation used to have its secret field's value remembered first: a
    mistaken key "unseal" (a node name) then turned every later "unseal" into "<redacted>", and
    every refused value was kept for good."""
    from shmfabric.manager import supervisor as sv

    sup = run_topology(tunnel().replace("api: 127.0.0.1:0\n", ""))
    with pytest.raises(SupervisorError):
        sup.reconfigure("seal", {"mode": "encap", "key": "unseal"})
    assert "unseal" not in sup._secret_values
    with pytest.raises(SupervisorError) as err:
        sup.scale("nosuch", 2)
    assert "unseal" in sup.redact_text(str(err.value)), "a node name was redacted"
    for i in range(sv.MAX_REMEMBERED_SECRETS + 50):  # valid pushes: remembered, but not without end
        sup._remember_secrets("encrypt", {"key": f"{i:064x}"})
    assert len(sup._secret_values) <= sv.MAX_REMEMBERED_SECRETS
    assert f"{sv.MAX_REMEMBERED_SECRETS + 49:064x}" in sup._secret_values  # the newest stay


def test_the_config_fd_never_lands_on_a_standard_descriptor(tmp_path):
    """In a process started with stdin closed, the config's memfd took fd 0, and the child's stdin
    (/dev/null) then replaced it: the instance read an empty config."""
    code = ("import os, sys\n"
            "os.close(0)\n"
            "from shmfabric.manager.supervisor import _config_fd\n"
            "fd = _config_fd({'rate': 50})\n"
            "print(fd, open(f'/proc/self/fd/{fd}').read())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    fd, text = out.stdout.split(" ", 1)
    assert int(fd) > 2 and text.strip() == '{"rate":50}', out.stdout + out.stderr
