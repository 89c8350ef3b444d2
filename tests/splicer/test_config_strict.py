"""Numbers and booleans in a splicer config are taken as written, not coerced: `workers: true`
used to start 1 worker, `workers: "2"` 2 and `timeouts.drain: true` meant 1 s. Each is now refused in one line naming the file, the field, what
was given and what to write. What YAML writes as numbers and booleans still passes (an integer
where seconds are wanted too), and so do the command-line flags and twemproxy files, whose
values the splicer converts itself."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from shmfabric.cli.main import main
from shmfabric.splicer.config import ConfigError, load_config
from shmfabric.splicer.twemproxy_conf import load_twemproxy


def _load(tmp_path: Path, body: str):
    f = tmp_path / "splice.yaml"
    f.write_text(textwrap.dedent(body))
    return f, load_config(f)


@pytest.mark.parametrize("section,line,field,says", [
    ("http", "workers: true", "http.workers", "write a whole number, not true or false (got true, a boolean)"),
    ("http", 'workers: "2"', "http.workers", 'write a whole number without quotes (got "2", a string)'),
    ("http", "workers: 2.0", "http.workers", "write a whole number (got 2.0)"),
    ("http", "pool: {max: '8'}", "http.pool.max", 'without quotes (got "8", a string)'),
    ("http", "timeouts: {drain: true}", "http.timeouts.drain", "write a number, not true or false"),
    ("http", "timeouts: {request: '2.5'}", "http.timeouts.request", 'write a number without quotes (got "2.5"'),
    ("http", "limits: {max_headers: false}", "http.limits.max_headers", "not true or false"),
    ("http", "health: {enabled: 1}", "http.health.enabled", "write true or false (got 1)"),
    ("http", "forwarded_for: 'true'", "http.forwarded_for", 'write true or false without quotes (got "true"'),
    ("redis", 'workers: "2"', "redis.workers", "without quotes"),
    ("redis", "db: '1'", "redis.db", "without quotes"),
    ("redis", "auto_eject: 'false'", "redis.auto_eject", "write true or false without quotes"),
])
def test_a_number_or_boolean_of_another_type_is_refused_in_one_line(tmp_path: Path, section: str, line: str,
                                                                     field: str, says: str) -> None:
    base = "default: [127.0.0.1:9001]" if section == "http" else "servers: [127.0.0.1:6379]"
    with pytest.raises(ConfigError) as exc:
        _load(tmp_path, f"{section}:\n  {base}\n  {line}\n")
    text = str(exc.value)
    assert "\n" not in text, text
    assert text.startswith(f"{tmp_path / 'splice.yaml'}: field `{field}`:") and says in text, text


def test_a_redis_server_weight_given_as_a_string_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        _load(tmp_path, "redis:\n  servers: [{address: '127.0.0.1:6379', weight: '2'}]\n")
    assert "field `redis.servers[0].weight`" in str(exc.value) and "without quotes" in str(exc.value)


def test_numbers_and_booleans_written_as_such_still_pass(tmp_path: Path) -> None:
    _, cfg = _load(tmp_path, """\
        http:
          workers: 2
          default: [127.0.0.1:9001]
          pool: {min: 0, max: 4, pipeline: 2}
          timeouts: {drain: 5, request: 2.5, queue: 1}
          health: {enabled: no, interval: 1, timeout: 0.5, rise: 1, fall: 2, eject_after: 0}
          forwarded_for: yes
          forwarded: false
        redis:
          workers: 3
          servers: ["127.0.0.1:6379:2 a", {address: "127.0.0.1:6380", weight: 3}]
          db: 1
          auto_eject: true
          timeouts: {connect: 1}
        """)
    h, r = cfg.http, cfg.redis
    assert h.workers == 2 and h.pool.max == 4 and h.timeouts.drain == 5.0 and isinstance(h.timeouts.drain, float)
    assert h.health.enabled is False and h.forwarded_for is True and h.timeouts.queue == 1.0
    assert r.workers == 3 and [s.weight for s in r.servers] == [2, 3] and r.db == 1 and r.auto_eject is True


def test_command_line_flags_and_twemproxy_files_still_pass(tmp_path: Path, capsys) -> None:
    code = main(["splice", "http", "--default", "127.0.0.1:9001", "--workers", "2", "--pool", "4", "--timeout", "3",
                 "--drain", "1", "--forwarded-for", "--no-health", "--check"])
    assert code == 0, capsys.readouterr().err
    nc = tmp_path / "nutcracker.yml"
    nc.write_text(textwrap.dedent("""\
        alpha:
          listen: 127.0.0.1:22121
          redis: true
          hash: fnv1a_64
          distribution: ketama
          auto_eject_hosts: true
          server_retry_timeout: 2000
          server_failure_limit: 1
          server_connections: 2
          preconnect: true
          timeout: 400
          servers:
            - 127.0.0.1:6379:1 one
            - 127.0.0.1:6380:2 two
        """))
    capsys.readouterr()
    code = main(["splice", "redis", "--twemproxy", str(nc), "--check"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert '"auto_eject": true' in out and '"request": 0.4' in out
    load_twemproxy(nc)
