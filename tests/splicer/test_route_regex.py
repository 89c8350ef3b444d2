"""Route regexes run on RE2 (linear time): a pattern that makes a backtracking engine take
exponential time answers at once and holds up nobody; what RE2 cannot take (backreferences,
lookaround, ...) is refused when the configuration is loaded, in one line naming the route and
what is not supported. The matching itself is what it was: searched in the path (not the query),
unanchored unless the pattern anchors it, inline flags honoured. No test asserts a duration:
every wait is bounded, at a few seconds a backtracking engine would need far more than
(`^/(a|a)+$` on 27 characters took Python's re 14 s; these paths have 5000).
"""
from __future__ import annotations

import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from shmfabric.cli.main import main
from shmfabric.splicer.config import ConfigError, load_config
from shmfabric.splicer.http_router import Router

from .redis_fixtures import free_port
from .test_graceful_stop import _HttpBackend, _ready, _splice
from .test_master import _finish, _get

pytestmark = pytest.mark.timeout(120)

EVIL = r"^/(a|a)+$"
LONG = "/" + "a" * 4999 + "b"  # no match: a backtracking engine tries 2**4999 ways


def _bounded(fn, seconds: float = 5.0):
    """fn() in a thread, waited for at most `seconds` (a stuck regex cannot be interrupted)."""
    out: list = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    t.join(seconds)
    assert out, f"no answer within {seconds} s"
    return out[0]


def test_a_pathological_pattern_matches_a_long_path_at_once() -> None:
    # In a child process: a backtracking match holds the GIL, so no thread could time it out.
    code = ("from shmfabric.splicer.http_router import Router\n"
            f"r = Router.from_config([(None, {EVIL!r}, None, 'evil')], 'dflt')\n"
            f"print(r.match(b'h', {LONG.encode()!r}), r.match(b'h', b'/' + b'a' * 5000))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=10)
    assert out.stdout.split() == ["dflt", "evil"], out.stderr


def test_the_matching_is_what_it_was_search_in_the_path_flags_honoured() -> None:
    r = Router.from_config([(None, r"\.png$", None, "img"), (None, r"(?i)/API/v\d+", None, "api"),
                            (None, r"^/exact$", None, "exact"), ("/p", None, None, "prefix")], "dflt")
    assert r.match(b"h", b"/a/cat.png?size=2") == "img"  # searched, not matched from the start
    assert r.match(b"h", b"/a/cat.png.html") == "dflt"
    assert r.match(b"h", b"/x/api/V2/users") == "api"  # (?i), unanchored
    assert r.match(b"h", b"/exact?q=1") == "exact"  # the query is not part of the path
    assert r.match(b"h", b"/exactly") == "dflt"
    assert r.match(b"h", b"http://example.com/x/cat.png") == "img"  # absolute-form: its path
    assert r.match(b"h", b"/p/x") == "prefix"


@pytest.mark.parametrize("pattern,what", [
    (r"^/(\w+)/\1$", r"a backreference (\1)"),
    (r"^/(?P<a>\w+)/(?P=a)$", "a named backreference"),
    (r"^/(?!admin)", "negative lookahead"),
    (r"(?<=/v1)/x", "lookbehind"),
    (r"^/a++$", "a possessive quantifier"),
    (r"/x\Z", r"\Z (write \z"),
    (r"^/a{,3}$", "{,N}"),
])
def test_what_re2_cannot_take_is_refused_at_load_in_one_line(tmp_path: Path, capsys, pattern: str, what: str) -> None:
    from shmfabric.splicer.http_router import compile_route_regex

    with pytest.raises(ValueError) as exc:
        compile_route_regex(pattern)
    assert what in str(exc.value)
    f = tmp_path / "splice.yaml"
    f.write_text("http:\n  routes:\n    - prefix: /ok\n      backends: [127.0.0.1:1]\n"
                 f"    - regex: '{pattern}'\n      backends: [127.0.0.1:2]\n")
    with pytest.raises(ConfigError) as cerr:
        load_config(f)
    line = str(cerr.value)
    assert "\n" not in line and f"{f}: field `http.routes[1].regex`:" in line and what in line, line
    # The command line says the same, naming the --route.
    code = main(["splice", "http", "--route", f"~{pattern}=127.0.0.1:1", "--check"])
    err = capsys.readouterr().err
    assert code == 2 and "--route `routes[0].regex`" in err and what in err and "Traceback" not in err, err


@pytest.fixture
def backend():
    b = _HttpBackend("A")
    yield b
    b.close()


def test_a_pathological_route_holds_up_no_request(backend) -> None:
    port = free_port()
    proc: subprocess.Popen = _splice("http", "--listen", f"127.0.0.1:{port}", "--route",
                                     f"~{EVIL}=127.0.0.1:{backend.port}", "--default", f"127.0.0.1:{backend.port}")
    try:
        _ready(proc, port)
        # One worker: a request stuck in the regex would hold up every other one.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as evil:
            evil.sendall(f"GET {LONG} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
            assert _bounded(lambda: _get(port, "/other")[0]) == 200  # sent after it, not held up
            head = b""
            while b"\r\n\r\n" not in head:
                data = evil.recv(65536)  # the socket's timeout bounds the wait
                assert data, head
                head += data
            assert head.startswith(b"HTTP/1.1 200"), head[:100]
        assert _bounded(lambda: _get(port, LONG[:-1] + "a")[0]) == 200  # the regex route matches it
    finally:
        _finish(proc)
