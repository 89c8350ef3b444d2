"""The management API and metrics against a fake service (no processes, no fabric)."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from shmfabric.manager.api import ApiServer
from shmfabric.manager.supervisor import SupervisorError


def _inst(name: str) -> dict:
    return {"name": name, "function": "firewall", "version": "1", "pid": 123, "state": "running", "restarts": 2,
            "exit_code": None, "error": None, "node_id": 1, "cpu_seconds": 1.5, "uptime": 3.0, "rx_frames": 10,
            "rx_bytes": 640, "tx_frames": 9, "tx_bytes": 576, "tx_drops": 0, "tx_ring_full": 1, "tx_nobuf": 0, "rx_bad": 0,
            "queue_depth": 4, "dropped": 1, "counters": {"in_frames": 10, "dropped": 1},
            "function_counters": {"rule_0_hits": 7}}


class FakeService:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def status(self) -> dict:
        return {"fabric": "f", "pid": 1, "uptime": 1.0, "running": True,
                "nodes": [{"name": "fw", "function": "firewall", "instances": [_inst("fw"), _inst("fw-2")]}],
                "chains": [{"name": "main", "nodes": ["gen", "fw"], "tail": ["fw"], "delivered_frames": 20}],
                "rings": [{"src": "gen", "dst": "fw", "depth": 4, "enqueued": 100, "dequeued": 96, "full_events": 2,
                           "down": False}],
                "pools": [{"network": 0, "mtu": 1500, "total": 512, "free": 500, "held": 12, "orphaned": 0}],
                "events": []}

    def node_status(self, name: str) -> dict:
        if name != "fw":
            raise SupervisorError(f"no node named {name!r}; nodes: fw", status=404)
        return {"name": "fw", "instances": [_inst("fw")]}

    def reload_file(self, path=None) -> dict:
        self.calls.append(("reload", path))
        return {"added": ["x"]}

    def reconfigure(self, name, config) -> dict:
        self.calls.append(("config", name, config))
        if config.get("bad"):
            raise SupervisorError("invalid config: fw.config.bad: nope", status=422)
        return {"name": name}

    def scale(self, name, instances) -> dict:
        self.calls.append(("scale", name, instances))
        return {"name": name, "instances": [{}] * instances}

    def replace(self, name, function=None, config=None, version=None) -> dict:
        self.calls.append(("replace", name, function, config, version))
        return {"name": name, "processed_by_old": 5}


@pytest.fixture
def api():
    svc = FakeService()
    stopped = []
    srv = ApiServer(svc, "127.0.0.1:0", on_shutdown=lambda: stopped.append(True)).start()
    srv.svc, srv.stopped = svc, stopped
    yield srv
    srv.close()


def call(srv, path, body=None, method=None):
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(srv.url + path, data=data, method=method or ("GET" if body is None else "POST"))
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            raw = r.read()
            return r.status, (raw.decode() if path == "/metrics" else json.loads(raw))
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_status_and_node(api):
    code, st = call(api, "/status")
    assert code == 200 and st["nodes"][0]["instances"][1]["name"] == "fw-2"
    assert call(api, "/nodes/fw")[1]["name"] == "fw"
    code, err = call(api, "/nodes/nope")
    assert code == 404 and "no node named 'nope'" in err["error"]


def test_post_endpoints_reach_the_service(api):
    assert call(api, "/reload", {})[1] == {"ok": True, "changes": {"added": ["x"]}}
    assert call(api, "/reload", {"path": "/x.yaml"})[0] == 200
    assert call(api, "/nodes/fw/config", {"config": {"rules": "policy drop"}})[0] == 200
    assert call(api, "/nodes/fw/scale", {"instances": 3})[0] == 200
    assert call(api, "/nodes/fw/replace", {"function": "firewall", "version": "2"})[1]["processed_by_old"] == 5
    assert api.svc.calls == [("reload", None), ("reload", "/x.yaml"), ("config", "fw", {"rules": "policy drop"}),
                             ("scale", "fw", 3), ("replace", "fw", "firewall", None, "2")]


def test_bad_requests_are_explained(api):
    assert call(api, "/nodes/fw/scale", {"instances": "3"}) == (400, {"error": 'body must be {"instances": N} '
                                                                             "with an integer N"})
    assert call(api, "/nodes/fw/config", {"rules": "x"})[0] == 400
    code, err = call(api, "/nodes/fw/config", b"{not json")
    assert code == 400 and "not JSON" in err["error"]
    assert call(api, "/nodes/fw/replace", {"fuction": "x"})[0] == 400
    code, err = call(api, "/nodes/fw/config", {"config": {"bad": 1}})
    assert code == 422 and "invalid config" in err["error"]
    assert call(api, "/status", {})[0] == 405
    assert call(api, "/nope")[0] == 404
    assert call(api, "/reload", {"path": 3})[0] == 400


def test_shutdown_calls_back(api):
    assert call(api, "/shutdown", {}) == (200, {"ok": True})
    assert api.stopped == [True]


def test_metrics_cover_nodes_rings_pools_and_function_counters(api):
    code, text = call(api, "/metrics")
    assert code == 200
    for line in ('shmfabric_node_rx_frames_total{function="firewall",node="fw",node_instance="fw-2"} 10.0',
                 'shmfabric_node_queue_depth{function="firewall",node="fw",node_instance="fw"} 4.0',
                 'shmfabric_node_restarts_total{function="firewall",node="fw",node_instance="fw"} 2.0',
                 'shmfabric_function_counter{counter="rule_0_hits",function="firewall",kind="function",node="fw",'
                 'node_instance="fw"} 7.0',
                 'shmfabric_function_counter{counter="in_frames",function="firewall",kind="runtime",node="fw",'
                 'node_instance="fw"} 10.0',
                 'shmfabric_ring_depth{dst="fw",src="gen"} 4.0',
                 'shmfabric_ring_full_events_total{dst="fw",src="gen"} 2.0',
                 'shmfabric_pool_free_slots{network="0"} 500.0',
                 'shmfabric_chain_delivered_frames_total{chain="main"} 20.0',
                 'shmfabric_node_instances{node="fw"} 2.0'):
        assert line in text, line
