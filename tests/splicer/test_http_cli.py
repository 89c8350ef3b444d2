"""`shmfabric splice http` as a command: flag parsing, --check output, error messages."""
from __future__ import annotations

import json

import pytest

from shmfabric.cli.main import main
from shmfabric.cli.splice import parse_route


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_parse_route_forms():
    assert parse_route("/api=127.0.0.1:1,127.0.0.1:2") == {"prefix": "/api", "backends": ["127.0.0.1:1", "127.0.0.1:2"]}
    assert parse_route("ex.com/img=127.0.0.1:1") == {"prefix": "/img", "host": "ex.com", "backends": ["127.0.0.1:1"]}
    assert parse_route(r"~\.png$=127.0.0.1:1") == {"regex": r"\.png$", "backends": ["127.0.0.1:1"]}
    assert parse_route("*.ex.com~^/a=b=127.0.0.1:1")["regex"] == "^/a=b"  # '=' inside a regex is fine
    assert parse_route("api.ex.com=127.0.0.1:1") == {"host": "api.ex.com", "backends": ["127.0.0.1:1"]}


def test_a_host_route_that_looks_like_a_forgotten_slash_is_warned_about(capsys):
    assert parse_route("api=127.0.0.1:1") == {"host": "api", "backends": ["127.0.0.1:1"]}
    err = capsys.readouterr().err
    assert "routes the requests whose Host is 'api'" in err and "--route /api=127.0.0.1:1" in err, err
    for quiet in ("api.ex.com=127.0.0.1:1", "localhost=127.0.0.1:1", "/api=127.0.0.1:1", "*.ex.com=127.0.0.1:1"):
        parse_route(quiet)
        assert capsys.readouterr().err == "", quiet


def test_check_prints_effective_config(capsys):
    code, out, _ = run_cli(capsys, "splice", "http", "--listen", "127.0.0.1:8089", "--route", "/api=127.0.0.1:9001,127.0.0.1:9002",
                           "--default", "127.0.0.1:9003", "--pool", "8", "--timeout", "2.5", "--check")
    assert code == 0
    cfg = json.loads(out)
    assert cfg["listen"] == "127.0.0.1:8089" and cfg["pool"] == {"min": 1, "max": 8, "pipeline": 1}
    assert cfg["routes"][0]["prefix"] == "/api" and cfg["default"] == ["127.0.0.1:9003"]
    assert cfg["timeouts"]["request"] == 2.5


@pytest.mark.parametrize("argv,needle", [
    (["--route", "/api=127.0.0.1:99999"], "routes[0].backends"),
    (["--route", "api=127.0.0.1:1", "--route", "/x"], "expected [HOST]/PREFIX=ADDR"),
    (["--route", "~(=127.0.0.1:1"], "does not compile"),
    ([], "no backends"),
    (["--default", "localhost"], "is not HOST:PORT"),
    (["--default", "127.0.0.1:1", "--pool", "2", "--pool-min", "5"], "min (5) is larger than max (2)"),
])
def test_bad_flags_give_one_clear_line(capsys, argv, needle):
    code, out, err = run_cli(capsys, "splice", "http", *argv, "--check")
    assert code == 2 and needle in err and "Traceback" not in err


def test_bad_config_file_names_file_field_and_fix(capsys, tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("http:\n  listen: 127.0.0.1:8080\n  pool: {min: 1, max: 0}\n  lmits: {}\n  default: [127.0.0.1:1]\n")
    code, _, err = run_cli(capsys, "splice", "http", "--config", str(f), "--check")
    assert code == 2
    assert f"{f}: field `http.lmits`: Extra inputs are not permitted; fix: remove it" in err
    assert f"{f}: field `http.pool.max`" in err
    f.write_text("http: [\n")
    code, _, err = run_cli(capsys, "splice", "http", "--config", str(f), "--check")
    assert code == 2 and "not valid YAML" in err and "line" in err
    code, _, err = run_cli(capsys, "splice", "http", "--config", str(tmp_path / "missing.yaml"), "--check")
    assert code == 2 and "cannot read" in err
    f.write_text("redis:\n  servers: [127.0.0.1:6379]\n")
    code, _, err = run_cli(capsys, "splice", "http", "--config", str(f), "--check")
    assert code == 2 and "no `http:` section" in err


def test_config_file_with_flag_overrides(capsys, tmp_path):
    f = tmp_path / "ok.yaml"
    f.write_text("http:\n  default: [127.0.0.1:9003]\n  limits: {max_pipeline: 32}\n")
    code, out, _ = run_cli(capsys, "splice", "http", "--config", str(f), "--listen", "127.0.0.1:0", "--workers", "2", "--check")
    cfg = json.loads(out)
    assert code == 0 and cfg["workers"] == 2 and cfg["listen"] == "127.0.0.1:0" and cfg["limits"]["max_pipeline"] == 32
    code, _, err = run_cli(capsys, "splice", "http", "--config", str(f), "--route", "/a=127.0.0.1:1", "--check")
    assert code == 2 and "not both" in err
