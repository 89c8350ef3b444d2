"""The splicer's YAML/flag configuration schema and its error messages."""
from __future__ import annotations

import pytest

from shmfabric.splicer.config import ConfigError, HttpSpliceConfig, RedisSpliceConfig, load_config, split_address


def test_split_address():
    assert split_address("127.0.0.1:80") == ("127.0.0.1", 80)
    assert split_address("[::1]:6379") == ("::1", 6379)
    assert split_address("localhost:0", allow_zero=True) == ("localhost", 0)
    for bad in ("127.0.0.1", "127.0.0.1:0", "h:70000", ":80", "a b:1"):
        with pytest.raises(ValueError):
            split_address(bad)


def test_defaults_and_routes():
    cfg = HttpSpliceConfig(routes=[{"prefix": "/api", "backends": ["127.0.0.1:1"]}])
    assert cfg.pool.min == 1 and cfg.pool.max == 8 and cfg.upgrade == "tunnel" and cfg.timeouts.request == 30
    with pytest.raises(ValueError, match="either prefix or regex"):
        HttpSpliceConfig(routes=[{"prefix": "/a", "regex": "x", "backends": ["127.0.0.1:1"]}])


def test_redis_servers_in_twemproxy_form():
    cfg = RedisSpliceConfig(servers=["127.0.0.1:6379:2 a", "127.0.0.1:6380", {"address": "127.0.0.1:6381", "weight": 3}])
    assert [(s.address, s.weight, s.name) for s in cfg.servers] == [
        ("127.0.0.1:6379", 2, "a"), ("127.0.0.1:6380", 1, None), ("127.0.0.1:6381", 3, None)]


def test_a_health_path_must_be_a_request_target(tmp_path):
    # Sent as it is: "healthz" got a 400 from every backend, and every server stayed down.
    f = tmp_path / "s.yaml"
    f.write_text("http:\n  default: [127.0.0.1:1]\n  health: {path: healthz}\n")
    with pytest.raises(ConfigError, match=r"field `http.health.path`: path 'healthz' must start with '/'"):
        load_config(f)
    f.write_text("http:\n  default: [127.0.0.1:1]\n  health: {path: /health z}\n")
    with pytest.raises(ConfigError, match="no spaces"):
        load_config(f)
    f.write_text("http:\n  default: [127.0.0.1:1]\n  health: {path: \"/healthz?full=1\"}\n")
    assert load_config(f).http.health.path == "/healthz?full=1"


def test_file_errors_name_file_field_and_fix(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("http:\n  routes:\n    - prefix: api\n      backends: [127.0.0.1:1]\n  timeouts: {request: -1}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(f)
    text = str(exc.value)
    assert f"{f}: field `http.routes[0].prefix`: prefix 'api' must start with '/'" in text
    assert f"{f}: field `http.timeouts.request`" in text and "fix:" in text
    f.write_text("")
    with pytest.raises(ConfigError, match="empty"):
        load_config(f)
    f.write_text("- a\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(f)
    f.write_text("http:\n  default: [127.0.0.1:1]\nredis:\n  servers: [127.0.0.1:6379]\n")
    cfg = load_config(f)
    assert cfg.http is not None and cfg.redis is not None


@pytest.mark.parametrize("field", ["health: {path: /healthz}", "health: {eject_after: 3}", "pool: {pipeline: 4}",
                                   "timeouts: {client_idle: 5}", "timeouts: {request_head: 5}",
                                   "limits: {max_head_bytes: 4096}", "limits: {max_url_bytes: 100}"])
def test_an_http_only_field_in_a_redis_section_is_refused_not_ignored(tmp_path, field):
    f = tmp_path / "r.yaml"
    f.write_text(f"redis:\n  servers: [127.0.0.1:6379]\n  {field}\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    name = field.split(":")[0] + "." + field.split("{")[1].split(":")[0]
    assert f"field `redis.{name}`" in str(e.value) and "docs/splicer-redis.md" in str(e.value), str(e.value)


@pytest.mark.parametrize("field", ["limits: {max_request_bytes: 4096}", "limits: {max_unread_bytes: 2000000}"])
def test_a_redis_only_field_in_an_http_section_is_refused_not_ignored(tmp_path, field):
    f = tmp_path / "h.yaml"
    f.write_text(f"http:\n  default: [127.0.0.1:80]\n  {field}\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert "field `http.limits." in str(e.value), str(e.value)


def test_the_http_docs_configuration_example_validates():
    # docs/splicer-http.md shows every field; a field renamed or removed must fail here.
    from pathlib import Path

    import yaml

    from shmfabric.splicer.config import SpliceFile

    text = (Path(__file__).resolve().parents[2] / "docs" / "splicer-http.md").read_text()
    block = text.split("## Configuration file", 1)[1].split("```yaml", 1)[1].split("```", 1)[0]
    cfg = SpliceFile.model_validate(yaml.safe_load(block)).http
    assert cfg is not None and cfg.tls is not None and cfg.access_log and cfg.forwarded_for
    assert cfg.routes[0].backends == ["127.0.0.1:9001 weight=2", "127.0.0.1:9002", "127.0.0.1:9005 backup"]
