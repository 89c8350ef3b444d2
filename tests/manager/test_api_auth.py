"""Opt-in bearer-token authentication of the management API (`api: {listen, token_file}`), the token
file's checks, the CLI sending the token, and the metrics label `node_instance` (not `instance`,
Prometheus's own target label)."""
from __future__ import annotations

import http.client
import json
import os
import socket
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from shmfabric.core.region import region_path
from shmfabric.fabric import Fabric
from shmfabric.manager.api import ApiServer, TokenFileError, ensure_token_file, load_token
from shmfabric.manager.config import ApiSection, ConfigError, api_listen, api_token_file, parse_topology
from tests.manager.conftest import unique_fabric
from tests.manager.test_api import FakeService

pytestmark = pytest.mark.timeout(180)

TOKEN = "t0ken-for-the-tests-0123456789abcdef"


# -- the server, against a fake service ------------------------------------------------------------
@pytest.fixture
def authed():
    svc = FakeService()
    stopped: list[bool] = []
    srv = ApiServer(svc, "127.0.0.1:0", on_shutdown=lambda: stopped.append(True), token=TOKEN).start()
    srv.svc, srv.stopped = svc, stopped
    yield srv
    srv.close()


def request(srv, method: str, path: str, body: bytes = b"", headers: dict | None = None):
    """(status, headers, parsed body) of one request on a fresh connection."""
    u = urlsplit(srv.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    try:
        conn.putrequest(method, path)
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        if body:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body or None)
        r = conn.getresponse()
        raw = r.read()
        hdrs = {k.lower(): v for k, v in r.getheaders()}
        if method == "HEAD" or not raw:
            return r.status, hdrs, None
        if hdrs.get("content-type", "").startswith("application/json"):
            return r.status, hdrs, json.loads(raw)
        return r.status, hdrs, raw.decode()
    finally:
        conn.close()


ENDPOINTS = [("GET", "/", b""), ("GET", "/status", b""), ("GET", "/nodes/fw", b""), ("GET", "/metrics", b""),
             ("POST", "/reload", b"{}"), ("POST", "/nodes/fw/config", b'{"config": {}}'),
             ("POST", "/nodes/fw/scale", b'{"instances": 3}'), ("POST", "/nodes/fw/replace", b'{"version": "2"}'),
             ("POST", "/shutdown", b"{}"), ("HEAD", "/status", b""), ("PUT", "/nodes/fw", b""),
             ("GET", "/nope", b"")]


def test_without_a_token_the_api_is_open_as_before():
    svc = FakeService()
    srv = ApiServer(svc, "127.0.0.1:0").start()
    try:
        code, _, st = request(srv, "GET", "/status")
        assert code == 200 and st["fabric"] == "f"
        # an Authorization header is ignored by a server without a token
        code, _, _ = request(srv, "POST", "/nodes/fw/scale", b'{"instances": 2}', {"Authorization": "Bearer x"})
        assert code == 200 and svc.calls == [("scale", "fw", 2)]
    finally:
        srv.close()


@pytest.mark.parametrize("method,path,body", ENDPOINTS, ids=[f"{m} {p}" for m, p, _ in ENDPOINTS])
@pytest.mark.parametrize("auth", [None, "Bearer wrong-token-0123456789", f"Basic {TOKEN}", "Bearer",
                                  f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}"],
                         ids=["none", "wrong", "basic", "empty", "longer", "shorter"])
def test_every_endpoint_needs_the_token_and_a_refusal_does_nothing(authed, method, path, body, auth):
    code, hdrs, err = request(authed, method, path, body, {"Authorization": auth} if auth else None)
    assert code == 401
    assert hdrs["www-authenticate"].startswith("Bearer")
    assert hdrs.get("connection") == "close"  # its body, if any, was not read
    if method != "HEAD":
        assert set(err) == {"error"} and isinstance(err["error"], str)
        if auth and auth.lower().startswith("bearer "):
            assert err["error"].startswith("invalid bearer token")
            assert 'error="invalid_token"' in hdrs["www-authenticate"]
        else:
            assert err["error"].startswith("authentication required")
    assert authed.svc.calls == [] and authed.stopped == []


def test_the_right_token_is_served(authed):
    good = {"Authorization": f"Bearer {TOKEN}"}
    assert request(authed, "GET", "/status", headers=good)[0] == 200
    assert request(authed, "GET", "/status", headers={"Authorization": f"bearer  {TOKEN} "})[0] == 200
    code, _, text = request(authed, "GET", "/metrics", headers=good)
    assert code == 200 and "shmfabric_node_instances" in text
    assert request(authed, "POST", "/nodes/fw/scale", b'{"instances": 3}', good)[0] == 200
    # after authentication the usual answers: 404, 405, 400
    assert request(authed, "GET", "/nope", headers=good)[0] == 404
    assert request(authed, "PUT", "/nodes/fw", headers=good)[0] == 405
    assert request(authed, "POST", "/nodes/fw/scale", b'{"instances": "x"}', good)[0] == 400
    assert request(authed, "POST", "/shutdown", b"{}", good)[:3:2] == (200, {"ok": True})
    assert authed.svc.calls == [("scale", "fw", 3)] and authed.stopped == [True]


def test_two_authorization_headers_are_refused(authed):
    u = urlsplit(authed.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    try:
        conn.putrequest("GET", "/status")
        conn.putheader("Authorization", f"Bearer {TOKEN}")
        conn.putheader("Authorization", "Bearer other-token-0123456789")
        conn.endheaders()
        assert conn.getresponse().status == 401
    finally:
        conn.close()


def test_a_weak_token_is_not_served():
    with pytest.raises(ValueError):
        ApiServer(FakeService(), "127.0.0.1:0", token="short")


# -- token files ------------------------------------------------------------------------------------
def test_a_missing_token_file_is_created_0600_with_a_random_token(tmp_path):
    path = tmp_path / "api.token"
    assert ensure_token_file(str(path)) is True
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    token = load_token(str(path))
    assert len(token) == 43 and path.read_text() == token + "\n"
    assert ensure_token_file(str(path)) is False and load_token(str(path)) == token  # never replaced
    other = tmp_path / "other.token"
    ensure_token_file(str(other))
    assert load_token(str(other)) != token


def test_a_token_file_is_not_created_through_a_symlink_or_in_a_missing_directory(tmp_path):
    target = tmp_path / "target"
    (tmp_path / "link").symlink_to(target)
    # a dangling symlink is a file that exists (O_EXCL): nothing is written through it
    assert ensure_token_file(str(tmp_path / "link")) is False
    assert not target.exists()
    with pytest.raises(TokenFileError, match=f"cannot read the API token file {tmp_path}/link"):
        load_token(str(tmp_path / "link"))
    with pytest.raises(TokenFileError, match="cannot create it: No such file or directory"):
        ensure_token_file(str(tmp_path / "nodir" / "t"))


@pytest.mark.parametrize("mode,who", [(0o640, "its group"), (0o604, "others"), (0o660, "its group"),
                                      (0o602, "others"), (0o644, "its group and others")])
def test_a_token_file_open_to_group_or_others_is_refused_in_one_line(tmp_path, mode, who):
    path = tmp_path / "api.token"
    path.write_text(TOKEN + "\n")
    os.chmod(path, mode)
    with pytest.raises(TokenFileError) as ei:
        load_token(str(path))
    msg = str(ei.value)
    assert "\n" not in msg
    assert msg == (f"API token file {path}: permissions {mode:04o} are too open (open to {who}); it must be its "
                   f"owner's only: chmod 600 {path}")


@pytest.mark.parametrize("content,needle", [("", "empty"), ("  \n", "empty"), ("short\n", "shorter than 16"),
                                            ("two words and more text\n", "one line of visible ASCII"),
                                            (TOKEN + "\n" + TOKEN + "\n", "one line"),
                                            ("x" * 5000, "over 4096 bytes")])
def test_a_token_file_that_holds_no_usable_token_is_refused(tmp_path, content, needle):
    path = tmp_path / "api.token"
    path.write_text(content)
    os.chmod(path, 0o600)
    with pytest.raises(TokenFileError, match=needle):
        load_token(str(path))


def test_unreadable_token_files_name_the_file(tmp_path):
    with pytest.raises(TokenFileError, match=f"cannot read the API token file {tmp_path}/nope: No such file"):
        load_token(str(tmp_path / "nope"))
    with pytest.raises(TokenFileError, match="not a regular file"):
        load_token(str(tmp_path))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file to another user")
def test_the_manager_refuses_a_token_file_of_another_user(tmp_path):
    path = tmp_path / "api.token"
    path.write_text(TOKEN)
    os.chmod(path, 0o600)
    os.chown(path, 12345, 12345)
    with pytest.raises(TokenFileError, match="owned by uid 12345"):
        load_token(str(path))
    assert load_token(str(path), check_owner=False) == TOKEN  # a client may read whoever's file it can


# -- the `api:` section -----------------------------------------------------------------------------
BASE = """\
fabric: {name: t1}
API
nodes:
  - {name: gen, function: generator}
  - {name: a, function: sink}
chains:
  - {name: main, nodes: [gen, a]}
"""


def topo_with(api_line: str):
    return parse_topology(BASE.replace("API", api_line), "t.yaml")


def test_every_form_of_api_parses():
    assert topo_with("").api == "127.0.0.1:0"
    assert topo_with("api: 127.0.0.1:7000").api == "127.0.0.1:7000"
    assert topo_with("api: null").api is None
    t = topo_with("api: {listen: 127.0.0.1:7000, token_file: /etc/shmfabric/t.token}")
    assert t.api == ApiSection(listen="127.0.0.1:7000", token_file="/etc/shmfabric/t.token")
    assert (api_listen(t.api), api_token_file(t.api)) == ("127.0.0.1:7000", "/etc/shmfabric/t.token")
    t = topo_with("api:\n  token_file: /t.token")
    assert (api_listen(t.api), api_token_file(t.api)) == ("127.0.0.1:0", "/t.token")
    assert (api_listen("1.2.3.4:5"), api_token_file("1.2.3.4:5")) == ("1.2.3.4:5", None)
    assert (api_listen(None), api_token_file(None)) == (None, None)


@pytest.mark.parametrize("api_line,error", [
    ("api: {listen: 127.0.0.1:7000, token_file: rel.token}",
     "t.yaml:2: field `api.token_file`: token_file 'rel.token' is not an absolute path"),
    ("api: {listen: 127.0.0.1:7000, tokenfile: /x}",
     "t.yaml:2: field `api.tokenfile`: Extra inputs are not permitted"),
    ("api: {listen: 'nope'}", "t.yaml:2: field `api.listen`: 'nope' is not HOST:PORT"),
    ("api: {listen: '[::1]:7000'}", "t.yaml:2: field `api.listen`: '[::1]:7000': the management API listens on IPv4"),
    ("api: {listen: null}", "t.yaml:2: field `api.listen`: listen must be HOST:PORT (to run without a management "
                            "API, write `api: null`)"),
    ("api: 5", "t.yaml:2: field `api`: expected a HOST:PORT string or a mapping {listen: HOST:PORT, token_file: "
               "PATH}, got int"),
    ("api: nope", "t.yaml:2: field `api`: 'nope' is not HOST:PORT"),
])
def test_a_bad_api_section_is_one_error_naming_its_line(api_line, error):
    with pytest.raises(ConfigError) as ei:
        topo_with(api_line)
    assert str(ei.value).startswith(error), str(ei.value)
    assert "\n" not in str(ei.value)


# -- the CLI and a real manager -----------------------------------------------------------------------
TOPO = """\
fabric: {name: FABRIC, ring_size: 256, max_nodes: 8, networks: [{mtu: 1500, slots: 1024}]}
poll_interval: 0.1
api: {listen: 127.0.0.1:0, token_file: TOKEN_FILE}
metrics: 127.0.0.1:0
nodes:
  - {name: gen, function: generator, config: {rate: 500, size: 100, flows: 4}}
  - {name: sink, function: sink}
chains:
  - {name: main, nodes: [gen, sink]}
"""


@pytest.fixture
def env(tmp_path):
    e = dict(os.environ, SHMFABRIC_STATE_DIR=str(tmp_path / "state"), PYTHONUNBUFFERED="1")
    e.pop("SHMFABRIC_API_TOKEN_FILE", None)
    return e


@pytest.fixture
def topo(tmp_path):
    name = unique_fabric()
    token_file = tmp_path / "keys" / "api.token"
    token_file.parent.mkdir()
    path = tmp_path / "t.yaml"
    path.write_text(TOPO.replace("FABRIC", name).replace("TOKEN_FILE", str(token_file)))
    yield path, name, token_file
    Fabric.destroy(name)


def cli(env, *args, timeout=90, check=True):
    p = subprocess.run([sys.executable, "-m", "shmfabric", *map(str, args)], env=env, capture_output=True, text=True,
                       timeout=timeout)
    if check and p.returncode != 0:
        pytest.fail(f"shmfabric {' '.join(map(str, args))} -> {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def _one_line_error(p, *needles: str) -> None:
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    for n in needles:
        assert n in p.stderr, p.stderr


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except OSError:
        return False


def _http(url: str, method: str = "GET", token: str | None = None, body: bytes | None = None):
    req = urllib.request.Request(url, data=body, method=method,
                                 headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _up(env, path, state_dir: Path, name: str):
    p = cli(env, "up", path, "--detach", "--json")
    state = json.loads(p.stdout)
    assert state == json.loads((state_dir / f"{name}.json").read_text())
    return p, state


def _kill_leftover(env, state: dict) -> None:
    if _alive(state["pid"]):
        subprocess.run([sys.executable, "-m", "shmfabric", "down", "--fabric", state["fabric"]], env=env,
                       capture_output=True, timeout=90)
    if _alive(state["pid"]):
        os.kill(state["pid"], 9)


def test_a_token_protects_a_real_manager_and_the_cli_sends_it(env, topo, tmp_path):
    path, name, token_file = topo
    p, state = _up(env, path, tmp_path / "state", name)
    try:
        # the missing token file was made, 0600; the state file names it and does not hold the token
        assert f"created the API token file {token_file}" in p.stderr
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = load_token(str(token_file))
        assert state["api_token_file"] == str(token_file)
        assert token not in (tmp_path / "state" / f"{name}.json").read_text()
        url = state["api"]
        # no token, a wrong token: 401, and nothing happens (the manager still runs)
        code, body = _http(url + "/status")
        assert code == 401 and json.loads(body)["error"].startswith("authentication required")
        for tok in (None, "not-the-token-0123456789"):
            assert _http(url + "/shutdown", "POST", tok, b"{}")[0] == 401
            assert _http(url + "/nodes/gen/scale", "POST", tok, b'{"instances": 2}')[0] == 401
        assert _http(url + "/metrics")[0] == 401
        assert _alive(state["pid"])
        # the right token; the metrics label is node_instance (Prometheus's `instance` is the target's)
        code, body = _http(url + "/status", token=token)
        assert code == 200 and json.loads(body)["fabric"] == name
        code, metrics = _http(url + "/metrics", token=token)
        assert code == 200
        assert 'shmfabric_node_rx_frames_total{function="sink",node="sink",node_instance="sink"}' in metrics
        assert "instance=" not in metrics.replace("node_instance=", "")
        # the separate `metrics:` listener is read-only and stays open to scrapers
        code, open_metrics = _http(f"http://{state['metrics']}/metrics")
        assert code == 200 and 'node_instance="sink"' in open_metrics
        # the CLI: through the state file
        st = json.loads(cli(env, "status", "--json").stdout)
        assert [n["name"] for n in st["nodes"]] == ["gen", "sink"]
        assert "sink" in cli(env, "top", "--once", "--interval", "0.3").stdout
        # --api URL without a token: one line saying how to give one
        p = cli(env, "status", "--api", url, check=False)
        _one_line_error(p, f"the management API at {url} needs a token", "--api-token-file PATH",
                        "SHMFABRIC_API_TOKEN_FILE")
        # --api URL with --api-token-file, or SHMFABRIC_API_TOKEN_FILE
        st = json.loads(cli(env, "status", "--json", "--api", url, "--api-token-file", token_file).stdout)
        assert st["fabric"] == name
        st = json.loads(cli(dict(env, SHMFABRIC_API_TOKEN_FILE=str(token_file)), "status", "--json",
                            "--api", url).stdout)
        assert st["fabric"] == name
        # a token file that is not the manager's: refused by the server, one line naming the file
        other = tmp_path / "other.token"
        other.write_text("another-token-0123456789abcdef\n")
        os.chmod(other, 0o600)
        p = cli(env, "status", "--api", url, "--api-token-file", other, check=False)
        _one_line_error(p, f"refused the token of {other}", "invalid bearer token")
        # a token file that cannot be read: one line naming it and where it was named
        p = cli(env, "status", "--api", url, "--api-token-file", tmp_path / "nope", check=False)
        _one_line_error(p, f"cannot read the API token file {tmp_path / 'nope'}: No such file",
                        "(given by --api-token-file)")
        p = cli(dict(env, SHMFABRIC_API_TOKEN_FILE=str(tmp_path / "nope")), "status", "--api", url, check=False)
        _one_line_error(p, f"cannot read the API token file {tmp_path / 'nope'}", "(given by SHMFABRIC_API_TOKEN_FILE)")
        os.chmod(other, 0o640)
        p = cli(env, "status", "--api", url, "--api-token-file", other, check=False)
        _one_line_error(p, f"API token file {other}: permissions 0640 are too open", f"chmod 600 {other}")
        # a reload that changes the token file is not applied: a warning says a restart is needed,
        # and the token of the start still works
        path.write_text(path.read_text().replace(str(token_file), str(other)))
        p = cli(env, "reload")
        assert "`api:` changed" in p.stderr and f"token_file {other}" in p.stderr and "restart" in p.stderr
        assert _http(url + "/status", token=token)[0] == 200
        # down --api URL without the token stops nothing
        p = cli(env, "down", "--api", url, check=False)
        _one_line_error(p, "needs a token", "nothing was stopped")
        assert _alive(state["pid"])
        p = cli(env, "down", "--api", url, "--api-token-file", token_file, timeout=90)
        assert p.stdout.strip() == f"fabric {name} down"
        assert not _alive(state["pid"])
    finally:
        _kill_leftover(env, state)
    assert not region_path(name).exists()
    assert not (tmp_path / "state" / f"{name}.json").exists()


def test_down_through_the_state_file_sends_the_token(env, topo, tmp_path):
    path, name, token_file = topo
    ensure_token_file(str(token_file))  # an existing file is used as it is
    token = load_token(str(token_file))
    p, state = _up(env, path, tmp_path / "state", name)
    try:
        assert "created the API token file" not in p.stderr and load_token(str(token_file)) == token
        assert cli(env, "status", "--json").returncode == 0
        # the token file the state file names cannot be used: one line naming it, and where it was named
        os.chmod(token_file, 0o644)
        p = cli(env, "status", check=False)
        _one_line_error(p, f"API token file {token_file}: permissions 0644 are too open",
                        f"(named by the state file of the manager of fabric {name!r})")
        os.chmod(token_file, 0o600)
        p = cli(env, "down", "--json", timeout=90)
        assert json.loads(p.stdout)["stopped"] is True and p.stderr == ""
        assert not _alive(state["pid"])
    finally:
        _kill_leftover(env, state)
    assert not region_path(name).exists()


@pytest.mark.parametrize("detach", [False, True], ids=["foreground", "detach"])
def test_up_refuses_a_group_readable_token_file_in_one_line(env, topo, tmp_path, detach):
    path, name, token_file = topo
    token_file.write_text(TOKEN + "\n")
    os.chmod(token_file, 0o640)
    p = cli(env, "up", path, *(["--detach"] if detach else ["--duration", "5"]), check=False)
    _one_line_error(p, f"API token file {token_file}: permissions 0640 are too open (open to its group)",
                    f"chmod 600 {token_file}")
    assert not region_path(name).exists()  # nothing started
    assert not (tmp_path / "state" / f"{name}.json").exists()
    assert token_file.read_text() == TOKEN + "\n"  # and the file was left as it was


def test_without_a_token_file_the_state_file_names_none_and_the_cli_works_as_before(env, tmp_path):
    name = unique_fabric()
    path = tmp_path / "t.yaml"
    path.write_text(TOPO.replace("FABRIC", name).replace("{listen: 127.0.0.1:0, token_file: TOKEN_FILE}",
                                                         "127.0.0.1:0"))
    try:
        p, state = _up(env, path, tmp_path / "state", name)
        try:
            assert state["api_token_file"] is None
            assert _http(state["api"] + "/status")[0] == 200
            assert cli(env, "status", "--json", "--api", state["api"]).returncode == 0
            # a token file given to a manager without authentication is sent and ignored
            tf = tmp_path / "t.token"
            ensure_token_file(str(tf))
            assert cli(env, "status", "--json", "--api", state["api"], "--api-token-file", tf).returncode == 0
            cli(env, "down", timeout=90)
            assert not _alive(state["pid"])
        finally:
            _kill_leftover(env, state)
    finally:
        Fabric.destroy(name)


def test_up_api_override_keeps_the_token_file(env, topo, tmp_path):
    path, name, token_file = topo
    # --api moves the listener; the file's token_file still applies
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    state = json.loads(cli(env, "up", path, "--detach", "--json", "--api", f"127.0.0.1:{port}").stdout)
    try:
        assert state["api"] == f"http://127.0.0.1:{port}" and state["api_token_file"] == str(token_file)
        assert _http(state["api"] + "/status")[0] == 401
        assert _http(state["api"] + "/status", token=load_token(str(token_file)))[0] == 200
        # a reload of the unchanged file warns about nothing
        p = cli(env, "reload")
        assert "warning" not in p.stderr, p.stderr
    finally:
        _kill_leftover(env, state)
    assert not region_path(name).exists()
