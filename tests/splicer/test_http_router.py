"""Routing by path prefix, regex and Host."""
from __future__ import annotations

from shmfabric.splicer.http_router import Router, normalize_host, request_path


def test_request_path_forms():
    assert request_path(b"/a/b?x=1") == b"/a/b"
    assert request_path(b"http://example.com/a?q") == b"/a"
    assert request_path(b"http://example.com") == b"/"
    assert request_path(b"*") == b"*"


def test_normalize_host():
    assert normalize_host(b"Example.COM:8080") == b"example.com"
    assert normalize_host(b"[::1]:80") == b"[::1]"


def test_first_match_wins_and_default():
    r = Router.from_config([("/api", None, None, "api"), (None, r"\.png$", None, "img"),
                            ("/", None, "*.example.com", "sub"), (None, None, "example.com", "apex")], "dflt")
    assert r.match(b"h", b"/api") == "api"
    assert r.match(b"h", b"/api/v1?x") == "api"
    assert r.match(b"h", b"/apix") == "dflt"
    assert r.match(b"h", b"/a/cat.png?size=2") == "img"
    assert r.match(b"www.Example.com:443", b"/x") == "sub"
    assert r.match(b"example.com", b"/x") == "apex"
    assert r.match(b"badexample.com", b"/x") == "dflt"
    assert Router.from_config([("/a", None, None, 1)], None).match(b"h", b"/b") is None


def test_cache_is_bounded():
    r = Router.from_config([("/a", None, None, 1)], 0)
    for i in range(10_000):
        r.match(b"h", b"/p%d" % i)
    assert len(r._cache) <= 4096


def test_a_trailing_dot_case_and_port_do_not_change_the_route():
    # `example.com.` is the same name rooted in DNS (RFC 1034 section 3.1); names are
    # case-insensitive (RFC 4343), and the port is not part of the routing key. These all routed
    # to the default before (the trailing dot made it another name).
    r = Router.from_config([(None, None, "example.com", "apex"), ("/", None, "*.example.org", "sub")], "dflt")
    for host in (b"example.com", b"example.com.", b"EXAMPLE.com.:80", b"Example.COM:80", b"example.com.:8080"):
        assert r.match(host, b"/x") == "apex", host
    assert r.match(b"www.example.org.", b"/x") == "sub"
    assert r.match(b"example.com..", b"/x") == "dflt"  # not a name: no second dot is dropped
    assert normalize_host(b"EXAMPLE.com.:80") == normalize_host(b"example.com.") == b"example.com"
    assert Router.from_config([(None, None, "Example.com.", "apex")], None).match(b"example.com", b"/") == "apex"
