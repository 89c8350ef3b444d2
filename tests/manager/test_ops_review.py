"""Regressions from the operator review: cwd imports, what `reload` reads, signal bursts, the API's
request handling, events in the log, `--api` errors. No test asserts a timing; each is bounded."""
from __future__ import annotations

import argparse
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from shmfabric.manager.api import MAX_BODY, ApiServer
from shmfabric.manager.config import ConfigError, load_topology, parse_topology
from shmfabric.manager.supervisor import Supervisor, SupervisorError
from tests.manager.conftest import wait_until

pytestmark = pytest.mark.timeout(180)

SF = str(Path(sys.executable).with_name("shmfabric"))

SMALL = """\
fabric: {name: "{fabric}", ring_size: 256, max_nodes: 8, networks: [{mtu: 1500, slots: 1024}]}
poll_interval: 0.1
nodes:
  - {name: gen, function: generator, config: {rate: 100, size: 128}}
  - {name: snk, function: sink}
chains:
  - {name: c, nodes: [gen, snk]}
"""

PLANTED = """\
# planted in the working directory: a process that imports it writes MARKER
import os, sys
with open(MARKER, "a") as f:
    f.write(f"{os.getpid()} {' '.join(sys.argv)[:100]}\\n")
_here = os.path.dirname(os.path.abspath(__file__))
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != _here]
del sys.modules["json"]
import json as _real
sys.modules["json"] = _real
globals().update({k: getattr(_real, k) for k in dir(_real) if not k.startswith("__")})
"""


def _plant(tmp_path: Path) -> tuple[Path, Path]:
    d = tmp_path / "cwd"
    d.mkdir()
    marker = tmp_path / "marker.txt"
    (d / "json.py").write_text(PLANTED.replace("MARKER", repr(str(marker))))
    return d, marker


# -- 1. the directory `up` ran in is not on the processes' sys.path --------------------------------
def test_instances_do_not_import_modules_from_the_cwd(run_topology, tmp_path, monkeypatch):
    d, marker = _plant(tmp_path)
    monkeypatch.chdir(d)
    sup = run_topology(SMALL)
    wait_until(lambda: all(i.state == "running" for n in sup.nodes.values() for i in n.instances),
               what="instances running", sup=sup)
    assert not marker.exists(), "an instance imported json.py from the cwd:\n" + marker.read_text()


def test_detached_manager_does_not_import_modules_from_the_cwd(tmp_path, monkeypatch):
    from shmfabric.cli import manager_cmds

    seen: list[list[str]] = []

    def fake_popen(argv, **kw):
        seen.append(list(argv))
        raise OSError("not started (test)")

    monkeypatch.setenv("SHMFABRIC_STATE_DIR", str(tmp_path / "state"))
    args = argparse.Namespace(api=None, fabric=None, duration=None, start_timeout=5, quiet=True, json=False)
    topo = parse_topology(SMALL.replace("{fabric}", "opsdetach"), "x.yaml")
    with monkeypatch.context() as m, pytest.raises(OSError):
        m.setattr(manager_cmds.subprocess, "Popen", fake_popen)
        sd = manager_cmds.open_state_dir(create=True)  # SHMFABRIC_STATE_DIR, set above
        manager_cmds._detach(args, str(tmp_path / "x.yaml"), topo, sd, "opsdetach.json")
    (argv,) = seen
    # the same interpreter options, then code that imports json, run from a directory holding json.py
    opts = argv[1:argv.index("-m")]
    d, marker = _plant(tmp_path)
    subprocess.run([argv[0], *opts, "-c", "import json"], cwd=d, check=True, timeout=60)
    assert not marker.exists(), f"{argv[:4]} imports json.py from the cwd"


# -- 2. what `reload` reads --------------------------------------------------------------------------
SHADOW = "root:*:20228:0:99999:7:::\ndaemon:secretvalue:20228:0:99999:7:::\n"


def test_a_file_that_is_not_a_topology_is_not_quoted(tmp_path):
    p = tmp_path / "shadow"
    p.write_text(SHADOW)
    with pytest.raises(ConfigError) as ei:
        load_topology(p)
    assert "root:*" not in str(ei.value) and "secretvalue" not in str(ei.value)
    assert "not a topology" in str(ei.value)


def test_a_yaml_error_does_not_quote_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("x: *secretalias\n")
    with pytest.raises(ConfigError) as ei:
        load_topology(p)
    assert "secretalias" not in str(ei.value) and "not valid YAML" in str(ei.value)


def test_only_a_regular_file_of_bounded_size_is_read(tmp_path):
    with pytest.raises(ConfigError, match="not a regular file"):
        load_topology("/dev/null")
    big = tmp_path / "big.yaml"
    with open(big, "w") as f:
        f.write("# padding\n" * (500_000))  # 5 MB of comments
    with pytest.raises(ConfigError, match="larger than 4 MiB"):
        load_topology(big)


class FileService:
    """A service whose reload reads the file as the Supervisor does (load_topology)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.reloaded: list = []

    def status(self) -> dict:
        return {"nodes": [], "rings": [], "pools": [], "chains": []}

    def node_status(self, name):
        raise SupervisorError("no node", status=404)

    def reload_file(self, path=None) -> dict:
        try:
            load_topology(path or self.source)
        except ConfigError as exc:
            raise SupervisorError(str(exc), status=422) from None
        self.reloaded.append(path)
        return {}

    reconfigure = scale = replace = node_status


@pytest.fixture
def file_api(tmp_path):
    src = tmp_path / "topo.yaml"
    src.write_text(SMALL.replace("{fabric}", "opsapi"))
    srv = ApiServer(FileService(str(src)), "127.0.0.1:0")
    srv._srv.request_timeout = 0.5  # seconds a short body may hold the connection (30 s in the manager)
    srv.start()
    yield srv
    srv.close()


def post(srv, path: str, body: dict, method: str = "POST"):
    req = urllib.request.Request(srv.url + path, data=json.dumps(body).encode(), method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_api_reload_of_a_device_or_another_users_file_is_refused(file_api, tmp_path):
    st, body = post(file_api, "/reload", {"path": "/dev/null"})
    assert st == 422 and "not a regular file" in body["error"]
    shadow = tmp_path / "shadow"
    shadow.write_text(SHADOW)
    os.chmod(shadow, 0o600)
    st, body = post(file_api, "/reload", {"path": str(shadow)})
    assert st == 422 and "root:*" not in body["error"] and "secretvalue" not in body["error"]
    st, body = post(file_api, "/reload", {"path": file_api._srv.service.source})
    assert st == 200  # the file last loaded
    if os.geteuid() == 0:
        other = tmp_path / "other.yaml"
        other.write_text(SMALL.replace("{fabric}", "opsapi"))
        os.chown(other, 65534, 65534)
        st, body = post(file_api, "/reload", {"path": str(other)})
        assert st == 403 and "not by the manager's user" in body["error"]
        assert file_api._srv.service.reloaded == [file_api._srv.service.source]


# -- 3. a burst of stop signals ----------------------------------------------------------------------
def test_stop_signal_inside_event_set_does_not_deadlock(tmp_path, monkeypatch):
    """The handler may run while the main thread is inside `stop.set()` (or inside the handler): it
    must take no lock. Simulated: the handler is called while the stop event's lock is held."""
    import shmfabric.manager.supervisor as supmod
    from shmfabric.cli import manager_cmds

    handlers: dict[int, object] = {}

    def fake_signal(signum, handler):
        old = handlers.get(signum, signal.SIG_DFL)
        handlers[signum] = handler
        return old

    made: list = []

    class FakeSup:
        def __init__(self, topo, **kw):
            self.kw, self.nodes, self.log_dir = kw, {}, tmp_path / "logs"
            made.append(self)

        def start(self):
            pass

        def redact_text(self, t):
            return t

        def run(self, stop, duration=None):
            h = handlers[signal.SIGTERM]
            with stop._cond:  # as if the signal arrived inside stop.set()
                h(signal.SIGTERM, None)
            for _ in range(5000):  # a burst: no nesting, no lock
                h(signal.SIGTERM, None)
                handlers[signal.SIGINT](signal.SIGINT, None)
            self.stopped_by_signal = stop.wait(60)

        def quiesce(self):
            return False

        def status(self):
            return {"nodes": []}

        def stop(self):
            pass

    monkeypatch.setenv("SHMFABRIC_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setattr(manager_cmds.signal, "signal", fake_signal)
    monkeypatch.setattr(supmod, "Supervisor", FakeSup)
    topo = parse_topology(SMALL.replace("{fabric}", "opssig").replace("poll_interval", "api: null\npoll_interval"),
                          "x.yaml")
    args = argparse.Namespace(api=None, fabric=None, duration=None, quiet=True, json=False, live=False)
    out: list = []
    sd = manager_cmds.open_state_dir(create=True)  # SHMFABRIC_STATE_DIR, set above
    t = threading.Thread(target=lambda: out.append(manager_cmds._foreground(args, "x.yaml", topo, sd, "opssig.json")),
                         daemon=True)
    t.start()
    t.join(90)
    assert not t.is_alive(), "the stop signal handler deadlocked"
    assert out == [0] and made[0].stopped_by_signal
    assert made[0].kw.get("event_stream") is sys.stderr  # 5: events go to the log
    assert handlers[signal.SIGTERM] is signal.SIG_DFL  # the handlers were put back


# -- 4. request bodies -------------------------------------------------------------------------------
def _raw(srv, data: bytes, timeout: float = 30) -> bytes:
    host, port = srv.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        try:
            s.sendall(data)
        except OSError:
            pass
        got = b""
        try:
            while True:
                d = s.recv(65536)
                if not d:
                    break
                got += d
        except (socket.timeout, ConnectionError):
            pass
    return got


def test_chunked_body_is_refused_and_the_connection_closed(file_api):
    got = _raw(file_api, b"POST /reload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"4\r\n{}  \r\n0\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 411 ") and got.count(b"HTTP/1.1 ") == 1
    assert file_api._srv.service.reloaded == []


def test_413_closes_the_connection(file_api):
    got = _raw(file_api, b"POST /reload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1)
               + b"AAAA\r\nGET /status HTTP/1.1\r\nHost: x\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 413 ") and got.count(b"HTTP/1.1 ") == 1
    assert b"Connection: close" in got


def test_short_body_does_not_hold_the_connection(file_api):
    # request_timeout 0.5 s: the server answers (or closes) instead of waiting for ever; the client
    # waits up to 30 s, and then finds the connection closed
    got = _raw(file_api, b"POST /reload HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{}", timeout=60)
    assert got.startswith(b"HTTP/1.1 408 ")
    assert file_api._srv.service.reloaded == []


def test_head_is_a_json_405(file_api):
    got = _raw(file_api, b"HEAD /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head = got.split(b"\r\n\r\n", 1)[0]
    assert head.startswith(b"HTTP/1.1 405 ") and b"Content-Type: application/json" in head
    assert b"Allow: GET" in head


def test_a_client_that_went_away_leaves_no_traceback(file_api, capsys):
    for exc in (BrokenPipeError(32, "Broken pipe"), ConnectionResetError(104, "reset"), TimeoutError()):
        try:
            raise exc
        except OSError:
            file_api._srv.handle_error(None, ("127.0.0.1", 1))
    assert capsys.readouterr().err == ""


# -- 5. events in the log ----------------------------------------------------------------------------
def test_each_event_is_one_line_on_the_event_stream():
    buf = io.StringIO()
    sup = Supervisor(parse_topology(SMALL.replace("{fabric}", "opsev"), "x.yaml"), event_stream=buf)
    sup._event("exited", "gen", "exit 1: Traceback\n  line two\nline three")
    sup._event("up", "", "fabric opsev, 2 instances")
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2
    assert "exited" in lines[0] and "gen" in lines[0] and "line three" in lines[0]


# -- 6. --api errors ---------------------------------------------------------------------------------
@pytest.mark.parametrize("url", ["http://[::1", "http://127.0.0.1:abc"])
def test_a_bad_api_url_is_an_error_not_a_traceback(url, tmp_path):
    r = subprocess.run([SF, "status", "--api", url], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "SHMFABRIC_STATE_DIR": str(tmp_path)})
    assert r.returncode == 2 and "Traceback" not in r.stderr and "error:" in r.stderr


def test_an_ipv6_api_address_is_refused_at_the_config_check():
    with pytest.raises(ConfigError, match="IPv4"):
        parse_topology(SMALL.replace("{fabric}", "opsv6").replace("poll_interval", "api: '[::1]:0'\npoll_interval"),
                       "x.yaml")


def test_node_counters_add_up_over_an_instances_processes_and_stay_after_it_stops():
    # was: a restarted sink's rx_frames started again from 0 (and the chain's delivered frames
    # with it: 63178 -> 35454, a spurious reset to Prometheus), and a stopped instance read 0
    from shmfabric.manager.supervisor import NODE_COUNTERS, Instance, _take_node_counters

    inst = Instance(name="snk", node="snk", function="sink", config={}, version=None, index=0, tracker=None)

    def entry(pid: int, rx: int) -> dict:
        return {"id": 3, "gen": 1, "pid": pid, **{k: 0 for k in NODE_COUNTERS}, "rx_frames": rx}

    def total() -> int:
        return inst.node_base.get("rx_frames", 0) + inst.node_last.get("rx_frames", 0)

    _take_node_counters(inst, entry(100, 500))
    _take_node_counters(inst, entry(100, 800))
    assert total() == 800
    _take_node_counters(inst, entry(101, 30))  # restarted: a new process counts from 0
    assert total() == 830
    _take_node_counters(inst, entry(101, 90))
    assert total() == 890  # and once it stops, nothing more is read: 890 stays
