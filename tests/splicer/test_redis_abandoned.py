"""A client that pipelines large reads and leaves without reading: its replies are drained.

The backend connections are shared; a reply the splicer stopped reading would sit in the
server's output buffer (unbounded for normal clients by default) and stall every client behind
it on that connection. The splicer reads and drops the replies of a gone client at full speed,
and never leaves a backend connection paused for it.
"""
from __future__ import annotations

import socket
import time

import pytest

from shmfabric.splicer.redis_resp import encode_command

from .redis_fixtures import needs_redis, redis_servers, splicer

pytestmark = [needs_redis, pytest.mark.timeout(120)]

VALUE = b"v" * 65536  # small enough for a test box: 4 x 300 x 64 KiB = 75 MiB of replies


def _output_buffers(servers) -> int:
    """Bytes queued in the servers' output buffers for their clients (the splicer's pool)."""
    # (Not the connection asking: CLIENT LIST's own reply may be counted in its omem.)
    return sum(int(c["omem"]) for srv in servers for c in srv.client().client_list()
               if not c["cmd"].startswith("client"))


def test_replies_of_a_client_that_left_are_drained(tmp_path) -> None:
    with redis_servers(tmp_path, 2) as servers, splicer(servers) as sp:
        r = sp.client()
        keys = [f"big:{i}" for i in range(8)]  # over both servers
        for k in keys:
            r.set(k, VALUE)
        stream = b"".join(encode_command([b"GET", k.encode()]) for k in keys) * 40  # 320 < max_pipeline
        for _ in range(4):
            with socket.create_connection(("127.0.0.1", sp.port), timeout=10) as c:
                c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                c.sendall(stream)
            # closed without reading a byte

        deadline = time.monotonic() + 30  # a bound, not a timing: the condition is what counts
        while True:
            st = sp.stats()
            queued = _output_buffers(servers)
            if queued == 0 and st["clients"] == 1 and all(s["inflight"] == 0 for s in st["servers"]):
                break
            assert time.monotonic() < deadline, (queued, st)
            time.sleep(0.05)

        # The shared connections still carry other clients' requests, in order.
        assert r.mget(keys) == [VALUE] * len(keys)
        other = sp.client()
        assert other.get(keys[3]) == VALUE
        assert _output_buffers(servers) == 0
