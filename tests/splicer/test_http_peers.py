"""The HTTP splicer with real peers: nginx backends, curl and wrk clients, the CLI as users run it.

Every process is started by the test on 127.0.0.1 with free ports and stopped in teardown;
tests skip with the reason when a binary is missing.
"""
from __future__ import annotations

import re
import subprocess
from contextlib import ExitStack
from pathlib import Path

import pytest

from shmfabric import programs
from shmfabric.bench.splice_http import free_port, run_wrk, start_echo_backend, start_nginx, start_splicer, wait_port

from .redis_fixtures import free_ports_in_a_row

pytestmark = pytest.mark.timeout(120)


def need(*tools: str) -> None:
    missing = programs.missing(*tools)
    if missing:
        pytest.skip(programs.not_found(*missing))


def curl(*args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--max-time", "15", "--noproxy", "*", *args],
                          capture_output=True, timeout=timeout)


@pytest.fixture
def nginx_pair(tmp_path: Path):
    need("nginx")
    with start_nginx(tmp_path, "n1") as a, start_nginx(tmp_path, "n2") as b:
        yield a, b


def test_curl_through_splicer_to_nginx(nginx_pair):
    need("curl")
    a, b = nginx_pair
    with start_splicer([f"--route=/api=127.0.0.1:{a}", "--default", f"127.0.0.1:{b}", "--pool", "4"]) as port:
        base = f"http://127.0.0.1:{port}"
        r = curl(f"{base}/api/users?id=1", f"{base}/other", "-H", "X-Seq: 7", "-v")
        assert r.returncode == 0, r.stderr
        assert r.stdout == b"n1 /api/users?id=1\nn2 /other\n"
        assert b"Re-using existing connection" in r.stderr or b"Reusing existing" in r.stderr
        assert b"X-Seq: 7" in r.stderr
        head = curl("-I", f"{base}/api/x")
        assert head.returncode == 0 and head.stdout.startswith(b"HTTP/1.1 200") and b"Content-Length: 10" in head.stdout
        post = curl("-X", "POST", "--data-binary", "x" * 5000, f"{base}/api/p")
        assert post.returncode == 0 and post.stdout == b"n1 /api/p\n"


def test_curl_bodies_expect_and_chunked_upload():
    need("curl")
    with start_echo_backend(0, "echo") as be, start_splicer(["--default", f"127.0.0.1:{be}"]) as port:
        base = f"http://127.0.0.1:{port}"
        body = b"y" * 200_000
        r = subprocess.run(["curl", "-sS", "--max-time", "15", "--expect100-timeout", "10", "-H",
                            "Expect: 100-continue", "--data-binary", "@-", f"{base}/upload", "-v"],
                           input=body, capture_output=True, timeout=30)
        assert r.returncode == 0, r.stderr
        assert b"HTTP/1.1 100 Continue" in r.stderr and b"body=200000 " in r.stdout
        r = subprocess.run(["curl", "-sS", "--max-time", "15", "-H", "Transfer-Encoding: chunked", "--data-binary", "@-",
                            f"{base}/chunked"], input=body, capture_output=True, timeout=30)
        assert r.returncode == 0 and b"body=200000 " in r.stdout
        r = curl(f"{base}/c?chunked=1", "--raw", "-i")
        assert b"Transfer-Encoding: chunked" in r.stdout and b"X-Trailer: done" in r.stdout
        r = curl("--http1.0", f"{base}/ten", "-i")
        assert r.returncode == 0 and b"Connection: close" in r.stdout


def test_wrk_pipelines_through_splicer_to_nginx_stay_in_order(nginx_pair):
    need("wrk")
    a, b = nginx_pair
    with start_splicer(["--default", f"127.0.0.1:{a},127.0.0.1:{b}", "--pool", "16"]) as port:
        res = run_wrk(port, ["/a", "/b", "/c"], connections=4, depth=16, duration=1)
    assert res.requests > 100
    assert res.checked > 100 and res.out_of_order == 0 and res.non2xx == 0 and res.socket_errors == 0


def test_wrk_pipelines_over_unequal_backends_stay_in_order():
    need("wrk")
    with ExitStack() as st:
        fast = st.enter_context(start_echo_backend(0, "fast"))
        slow = st.enter_context(start_echo_backend(20, "slow"))
        port = st.enter_context(start_splicer([f"--route=/slow=127.0.0.1:{slow}", "--default", f"127.0.0.1:{fast}",
                                               "--pool", "32"]))
        res = run_wrk(port, ["/fast", "/slow"], connections=4, depth=16, duration=1)
    assert res.checked > 50 and res.out_of_order == 0 and res.non2xx == 0


def test_two_workers_and_metrics_endpoint(nginx_pair):
    need("curl")
    a, _ = nginx_pair
    mport = free_ports_in_a_row(2)
    with start_splicer(["--default", f"127.0.0.1:{a}", "--workers", "2", "--metrics", f"127.0.0.1:{mport}"]) as port:
        for i in range(6):
            r = curl(f"http://127.0.0.1:{port}/w{i}")
            assert r.returncode == 0 and r.stdout == f"n1 /w{i}\n".encode()
        wait_port(mport)
        text = curl(f"http://127.0.0.1:{mport}/metrics").stdout.decode()
        assert "shmfabric_splicer_requests_total" in text
        assert re.search(r'shmfabric_splicer_pool_connections\{backend="127\.0\.0\.1:\d+",proto="http",state="free"\}', text)
        assert "shmfabric_splicer_request_duration_seconds_bucket" in text


def test_yaml_config_file(tmp_path, nginx_pair):
    need("curl")
    a, b = nginx_pair
    cfg = tmp_path / "splice.yaml"
    cfg.write_text(f"""
http:
  routes:
    - regex: '\\.png$'
      backends: [127.0.0.1:{a}]
    - host: api.example.com
      backends: [127.0.0.1:{b}]
  default: [127.0.0.1:{a}]
  pool: {{min: 1, max: 4}}
  timeouts: {{request: 5}}
""")
    with start_splicer(["--config", str(cfg)]) as port:
        assert curl(f"http://127.0.0.1:{port}/cat.png").stdout == b"n1 /cat.png\n"
        assert curl(f"http://127.0.0.1:{port}/x", "-H", "Host: api.example.com").stdout == b"n2 /x\n"
