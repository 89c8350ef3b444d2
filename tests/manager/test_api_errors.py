"""The management API's answers to requests it cannot serve: always a JSON `{"error"}` with a 4xx
status (never an HTML page, never a 500 for a client's mistake)."""
from __future__ import annotations

import http.client
import json
from urllib.parse import urlsplit

import pytest

from tests.manager.test_api import api, call  # noqa: F401  (fixture)


def raw(srv, method: str, path: str, body: bytes = b"", headers: dict | None = None) -> tuple[int, dict]:
    u = urlsplit(srv.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    try:
        conn.putrequest(method, path)
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        conn.endheaders(body or None)
        r = conn.getresponse()
        data = r.read()
        assert r.getheader("Content-Type", "").startswith("application/json"), data[:200]
        return r.status, json.loads(data)
    finally:
        conn.close()


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH"])
def test_other_methods_are_405_json(api, method):  # noqa: F811
    code, err = raw(api, method, "/nodes/fw")
    assert code == 405 and err["error"] == f"{method} /nodes/fw is not an endpoint (use GET)"
    code, err = raw(api, method, "/reload")
    assert code == 405 and "(use POST)" in err["error"]
    assert raw(api, method, "/nope")[0] == 404


@pytest.mark.parametrize("length", ["abc", "-5", "1e3"])
def test_a_bad_content_length_is_400(api, length):  # noqa: F811
    code, err = raw(api, "POST", "/reload", headers={"Content-Length": length})
    assert code == 400 and "is not a byte count" in err["error"]


def test_replace_fields_must_be_strings(api):  # noqa: F811
    code, err = call(api, "/nodes/fw/replace", {"function": 5})
    assert code == 400 and err["error"] == "`function` must be a non-empty string, got 5"
    code, err = call(api, "/nodes/fw/replace", {"version": 5})
    assert code == 400 and "`version` must be a non-empty string" in err["error"]
    assert not api.svc.calls


def test_unknown_fields_and_an_empty_path_are_refused(api):  # noqa: F811
    code, err = call(api, "/nodes/fw/config", {"config": {}, "instances": 2})
    assert code == 400 and err["error"] == "unknown field(s) ['instances']; use config"
    assert call(api, "/nodes/fw/scale", {"instances": 2, "x": 1})[0] == 400
    code, err = call(api, "/reload", {"path": ""})
    assert code == 400 and "`path` must be a file path" in err["error"]
    assert not api.svc.calls
