"""`shmfabric up | down | status | top | reload` end to end, as a user runs them."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shmfabric.core.region import region_path
from shmfabric.fabric import Fabric
import urllib.request

from shmfabric.cli.main import CliError
from shmfabric.cli.manager_cmds import Rates, api_call
from tests.manager.conftest import unique_fabric

pytestmark = pytest.mark.timeout(120)

TOPO = """\
fabric: {name: FABRIC, ring_size: 256, max_nodes: 8, networks: [{mtu: 1500, slots: 1024}]}
poll_interval: 0.1
nodes:
  - {name: gen, function: generator, config: {rate: 2000, size: 100, flows: 16}}
  - {name: fw, function: firewall, config: {rules: "policy accept"}}
  - {name: sink, function: sink}
chains:
  - {name: main, nodes: [gen, fw, sink]}
"""


@pytest.fixture
def env(tmp_path):
    e = dict(os.environ, SHMFABRIC_STATE_DIR=str(tmp_path / "state"), PYTHONUNBUFFERED="1")
    return e


@pytest.fixture
def topo(tmp_path):
    name = unique_fabric()
    path = tmp_path / "t.yaml"
    path.write_text(TOPO.replace("FABRIC", name))
    yield path, name
    Fabric.destroy(name)


def cli(env, *args, timeout=60, check=True):
    p = subprocess.run([sys.executable, "-m", "shmfabric", *map(str, args)], env=env, capture_output=True, text=True,
                       timeout=timeout)
    if check and p.returncode != 0:
        pytest.fail(f"shmfabric {' '.join(map(str, args))} -> {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def test_config_error_names_file_line_and_fix(env, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(TOPO.replace("FABRIC", "x").replace("rate: 2000", "rat: 2000").replace("[gen, fw, sink]",
                                                                                          "[gen, fw, snk]"))
    p = cli(env, "up", bad, check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert f"{bad}:8: field `chains[0].nodes[2]`: node 'snk' is not defined" in p.stderr
    p = cli(env, "up", tmp_path / "nope.yaml", check=False)
    assert p.returncode == 2 and "cannot read" in p.stderr
    bad.write_text(TOPO.replace("FABRIC", "x").replace("rate: 2000", "rat: 2000"))
    p = cli(env, "up", bad, check=False)
    assert p.returncode == 2 and f"{bad}:4: field `nodes[0].config.rat`" in p.stderr


def test_unreadable_or_single_problem_configs_are_one_line(env, tmp_path):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\x00\xff\xfe garbage")
    _one_line_error(cli(env, "up", binary, check=False),
                    f"invalid config: {binary}:1: not UTF-8 text (byte 0xff at column 2); fix: save the file as UTF-8")
    missing = tmp_path / "missing.yaml"
    _one_line_error(cli(env, "up", missing, check=False),
                    f"invalid config: {missing}: cannot read: No such file or directory; fix: check the path")
    bad = tmp_path / "bad.yaml"
    bad.write_text(TOPO.replace("FABRIC", "x").replace("[gen, fw, sink]", "[gen, fw, snk]"))
    _one_line_error(cli(env, "up", bad, check=False), f"invalid config: {bad}:8: field `chains[0].nodes[2]`")
    # several problems: a heading, then one line each (docs/manager.md shows it)
    bad.write_text(TOPO.replace("FABRIC", "x").replace("rate: 2000", "rat: 2000").replace("[gen, fw, sink]",
                                                                                          "[gen, fw, snk]"))
    p = cli(env, "up", bad, check=False)
    assert p.returncode == 2 and p.stderr.splitlines()[0] == "shmfabric: error: invalid config:"
    assert len(p.stderr.splitlines()) == 3


def test_no_manager_running(env):
    for verb in ("status", "down", "reload", "top"):
        p = cli(env, verb, check=False)
        assert p.returncode == 2 and "no running manager" in p.stderr


def test_up_with_duration_prints_a_summary(env, topo):
    path, name = topo
    p = cli(env, "up", path, "--duration", "1.5")
    assert f"fabric {name} up: 3 instances of 3 nodes" in p.stdout
    assert "chain main:" in p.stdout and "frames delivered to sink" in p.stdout
    assert "0 orphaned" in p.stdout
    assert not region_path(name).exists()  # the fabric went with the manager


def test_detach_status_top_reload_down(env, topo, tmp_path):
    path, name = topo
    p = cli(env, "up", path, "--detach")
    assert f"fabric {name} up in the background" in p.stdout
    state = json.loads((tmp_path / "state" / f"{name}.json").read_text())
    try:
        time.sleep(0.8)
        st = json.loads(cli(env, "status", "--json").stdout)
        assert [n["name"] for n in st["nodes"]] == ["gen", "fw", "sink"]
        pids = [i["pid"] for n in st["nodes"] for i in n["instances"]]
        assert all(pids) and all(i["state"] == "running" for n in st["nodes"] for i in n["instances"])
        assert st["nodes"][2]["instances"][0]["counters"]["in_frames"] > 0
        table = cli(env, "status").stdout
        assert "gen" in table and "firewall" in table and "running" in table and "chain main" in table
        top = cli(env, "top", "--once", "--interval", "0.5").stdout
        assert "frames/s" in top and "CPU %" in top and "end to end" in top and "sink" in top
        path.write_text(path.read_text().replace('"policy accept"', '"policy accept\\nth dport 9 drop"'))
        assert "reloaded: reconfigured fw" in cli(env, "reload").stdout
        assert "nothing changed" in cli(env, "reload").stdout
        p = cli(env, "reload", "--fabric", "nope", check=False)
        assert p.returncode == 2 and "no running manager for fabric 'nope'" in p.stderr
        # the management API drives the real supervisor
        url = state["api"]
        node = api_call(url, "/nodes/fw/scale", {"instances": 2})
        assert [i["name"] for i in node["instances"]] == ["fw", "fw-2"]
        node = api_call(url, "/nodes/fw/replace", {"version": "2"})
        assert [(i["name"], i["version"], i["state"]) for i in node["instances"]] == [
            ("fw-3", "2", "running"), ("fw-4", "2", "running")]
        pids += [i["pid"] for i in node["instances"]]
        with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
            metrics = r.read().decode()
        assert 'shmfabric_node_instances{node="fw"} 2.0' in metrics
        assert 'shmfabric_node_rx_frames_total{function="sink",node="sink",node_instance="sink"}' in metrics
        with pytest.raises(CliError, match="no node named 'nope'"):
            api_call(url, "/nodes/nope/scale", {"instances": 2})
        # a second `up` of the same fabric is refused
        p = cli(env, "up", path, check=False)
        assert p.returncode == 2 and "already runs" in p.stderr
    finally:
        cli(env, "down", timeout=90)
    assert not _alive(state["pid"])
    assert not any(_alive(pid) for pid in pids)
    assert not region_path(name).exists()
    assert not (tmp_path / "state" / f"{name}.json").exists()


def test_ctrl_c_stops_everything_cleanly(env, topo):
    path, name = topo
    proc = subprocess.Popen([sys.executable, "-m", "shmfabric", "up", path, "--json"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        banner = proc.stderr.readline()  # with --json, stdout holds only the summary
        assert "Ctrl-C stops everything" in banner
        time.sleep(0.5)
        st = json.loads(cli(env, "status", "--json").stdout)
        pids = [i["pid"] for n in st["nodes"] for i in n["instances"]]
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    final = json.loads(out)  # the summary, as JSON
    assert [n["name"] for n in final["nodes"]] == ["gen", "fw", "sink"]
    assert len(pids) == 3 and all(pids) and not any(_alive(p) for p in pids)
    assert not region_path(name).exists()


def test_rates_from_two_snapshots():
    def snap(frames, cpu, delivered):
        inst = {"name": "fw", "function": "firewall", "state": "running", "pid": 7, "rx_frames": frames,
                "rx_bytes": frames * 100, "tx_frames": frames, "tx_bytes": frames * 100, "queue_depth": 3, "cpu_seconds": cpu, "restarts": 0,
                "dropped": 0, "counters": {"in_frames": frames, "out_frames": frames}}
        return {"nodes": [{"name": "fw", "instances": [inst]}],
                "chains": [{"name": "c", "delivered_frames": delivered}]}
    r = Rates()
    first = r.update(snap(0, 1.0, 0), 10.0)
    assert first["rows"][0]["fps"] is None and first["chains"][0]["fps"] is None
    v = r.update(snap(5000, 1.5, 4000), 12.0)
    row = v["rows"][0]
    assert row["fps"] == 2500 and row["bps"] == 250000 and row["cpu"] == 25.0
    assert v["chains"][0]["fps"] == 2000


def _sampled_snap(frames: int, counters_at: float, sampled_at: float, clock: float, cpu: float) -> dict:
    """A status as the manager answers it: counters as of its last poll, with the poll's times."""
    inst = {"name": "gen", "function": "generator", "state": "running", "pid": 7, "rx_frames": 0, "rx_bytes": 0,
            "tx_frames": frames, "tx_bytes": frames * 256, "queue_depth": 0, "cpu_seconds": cpu, "restarts": 0,
            "dropped": 0, "counters": {"in_frames": frames, "out_frames": frames}, "counters_at": counters_at}
    return {"nodes": [{"name": "gen", "instances": [inst]}], "chains": [{"name": "c", "delivered_frames": frames}],
            "sampled_at": sampled_at, "clock": clock, "poll_interval": 0.5}


def test_rates_divide_by_the_managers_sample_times_not_the_callers_clock():
    # a 20,000 frames/s source polled every 0.5 s; `top` reads status 1.0 s apart by its own clock,
    # but the samples it gets are 1.5 s apart (then 0.5 s): the rate is still 20,000/s
    r = Rates()
    r.update(_sampled_snap(10_000, counters_at=100.52, sampled_at=100.50, clock=100.9, cpu=1.0), 10.0)
    v = r.update(_sampled_snap(40_000, counters_at=102.02, sampled_at=102.00, clock=101.9, cpu=1.2), 11.0)
    row = v["rows"][0]
    assert row["fps"] == pytest.approx(20_000) and row["out_fps"] == pytest.approx(20_000)
    assert row["bps"] == pytest.approx(20_000 * 256)
    assert v["chains"][0]["fps"] == pytest.approx(20_000)
    assert row["cpu"] == pytest.approx(20.0)  # CPU time is read when status is built: its clock
    v = r.update(_sampled_snap(50_000, counters_at=102.52, sampled_at=102.50, clock=102.9, cpu=1.4), 12.0)
    assert v["rows"][0]["fps"] == pytest.approx(20_000) and v["chains"][0]["fps"] == pytest.approx(20_000)
    # the same sample again (read twice between two polls): the rate stands, it does not fall to 0
    v = r.update(_sampled_snap(50_000, counters_at=102.52, sampled_at=102.50, clock=103.0, cpu=1.42), 12.1)
    assert v["rows"][0]["fps"] == pytest.approx(20_000) and v["chains"][0]["fps"] == pytest.approx(20_000)
    # a restarted instance (new pid) starts over
    st = _sampled_snap(100, counters_at=103.02, sampled_at=103.0, clock=103.1, cpu=0.0)
    st["nodes"][0]["instances"][0]["pid"] = 8
    assert r.update(st, 12.5)["rows"][0]["fps"] is None


def test_top_once_rates_match_the_generators_rate(env, tmp_path):
    name = unique_fabric()
    path = tmp_path / "t.yaml"
    path.write_text(TOPO.replace("FABRIC", name).replace("poll_interval: 0.1", "poll_interval: 0.5")
                    .replace("rate: 2000", "rate: 4000"))
    cli(env, "up", path, "--detach")
    try:
        url = json.loads((tmp_path / "state" / f"{name}.json").read_text())["api"]
        r = Rates()
        first = api_call(url, "/status")
        r.update(first, time.monotonic())
        assert first["poll_interval"] == 0.5 and first["sampled_at"] is not None
        # the next status holding a new sample (bounded wait), read at a time unrelated to the polls
        deadline = time.monotonic() + 20
        gen = None
        while gen is None:
            assert time.monotonic() < deadline, "no new sample from the manager"
            time.sleep(0.7)
            st = api_call(url, "/status")
            row = [x for x in r.update(st, time.monotonic())["rows"] if x["name"] == "gen"][0]
            gen = row["fps"]
        a, b = first["nodes"][0]["instances"][0], st["nodes"][0]["instances"][0]
        assert a["counters_at"] < b["counters_at"] <= st["clock"] and st["sampled_at"] <= st["clock"]
        # the rate is the counter's change over the manager's own sample times
        want = (b["counters"]["in_frames"] - a["counters"]["in_frames"]) / (b["counters_at"] - a["counters_at"])
        assert gen == pytest.approx(want) and gen > 0
    finally:
        cli(env, "down", timeout=90)
        Fabric.destroy(name)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except OSError:
        return False


def test_kill_9_of_the_manager_stops_its_functions_and_up_works_again(env, topo, tmp_path):
    """A manager killed with SIGKILL cannot stop its nodes: they stop themselves (parent-death
    signal), detach, and a new `up` of the same file finds the fabric free."""
    path, name = topo
    cli(env, "up", path, "--detach")
    state = json.loads((tmp_path / "state" / f"{name}.json").read_text())
    pids: list[int] = []
    try:
        st = json.loads(cli(env, "status", "--json").stdout)
        pids = [i["pid"] for n in st["nodes"] for i in n["instances"]]
        assert len(pids) == 3 and all(pids)
        # one more, started by an API request (its own thread in the manager): it must die with
        # the manager too, and not with the request's thread
        api_call(state["api"], "/nodes/fw/scale", {"instances": 2})
        time.sleep(1.0)
        st = json.loads(cli(env, "status", "--json").stdout)
        fw2 = [i for n in st["nodes"] for i in n["instances"] if i["name"] == "fw-2"][0]
        assert fw2["state"] == "running" and fw2["restarts"] == 0
        pids.append(fw2["pid"])
        os.kill(state["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in pids if _alive(p)], "function processes outlived their killed manager"
        fab = Fabric.open(name)  # left behind (nobody removed it), but with no node up
        try:
            assert not [n["name"] for n in fab.nodes() if n["alive"] and n["state"] == "up"]
        finally:
            fab.close()
        p = cli(env, "up", path, "--duration", "1", timeout=90)
        assert f"fabric {name} up: 3 instances of 3 nodes" in p.stdout
        assert not region_path(name).exists()
    finally:
        for pid in [state["pid"], *pids]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_the_edge_example_runs_and_adds_up(env):
    """`make run`: the built-in default topology, bounded, with its JSON summary."""
    name = unique_fabric()
    try:
        p = cli(env, "up", "--fabric", name, "--duration", "2", "--json", timeout=90)
    finally:
        Fabric.destroy(name)
    st = json.loads(p.stdout)
    assert st["fabric"] == name
    inst = {i["name"]: i for n in st["nodes"] for i in n["instances"]}
    c = {k: v["counters"] for k, v in inst.items()}
    assert c["gen"]["out_frames"] > 1000
    # sources stopped and rings drained before the summary: every hop's counts match
    assert c["fw"]["in_frames"] == c["gen"]["out_frames"]
    assert c["ids"]["in_frames"] == c["fw"]["out_frames"] == c["fw"]["in_frames"] - c["fw"]["dropped"]
    assert c["lb"]["in_frames"] == c["ids"]["out_frames"] == c["lb"]["out_frames"]
    assert c["sink-a"]["in_frames"] + c["sink-b"]["in_frames"] == c["lb"]["out_frames"]
    assert c["sink-a"]["in_frames"] > 0 and c["sink-b"]["in_frames"] > 0
    assert inst["ids"]["function_counters"]["alerts"] > 0
    assert st["chains"][0]["delivered_frames"] == c["lb"]["out_frames"]
    assert st["pools"][0]["orphaned"] == 0
    # the summary comes after the drain: no node is reported as still running
    assert {i["state"] for i in inst.values()} <= {"drained", "stopped"}, {k: i["state"] for k, i in inst.items()}


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_line_error(p, *needles: str) -> None:
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    for n in needles:
        assert n in p.stderr, p.stderr


def test_down_api_stops_only_the_manager_at_that_url(env, topo, tmp_path):
    path, name = topo
    cli(env, "up", path, "--detach")
    state = json.loads((tmp_path / "state" / f"{name}.json").read_text())
    try:
        # nothing answers there: nothing is stopped, in particular not the manager of the state file
        p = cli(env, "down", "--api", f"http://127.0.0.1:{_closed_port()}", "--timeout", "5", check=False)
        _one_line_error(p, "cannot reach the management API", "nothing was stopped")
        assert _alive(state["pid"])
        assert json.loads(cli(env, "status", "--json").stdout)["pid"] == state["pid"]
        # the right URL but another fabric named: refused
        p = cli(env, "down", "--api", state["api"], "--fabric", "other", check=False)
        _one_line_error(p, f"runs fabric {name!r}, not 'other'")
        assert _alive(state["pid"])
        # the URL it answers at (HOST:PORT works too): stopped, and waited for
        p = cli(env, "down", "--api", state["api"].removeprefix("http://"), timeout=90)
        assert f"fabric {name} down" in p.stdout
        assert not _alive(state["pid"])
    finally:
        if _alive(state["pid"]):
            cli(env, "down", timeout=90, check=False)
    assert not region_path(name).exists()


def test_bad_numbers_are_refused_in_one_line(env, topo):
    path, _ = topo
    _one_line_error(cli(env, "up", path, "--duration", "-1", check=False), "--duration -1", "above 0")
    _one_line_error(cli(env, "up", path, "--duration", "0", check=False), "--duration 0", "above 0")
    _one_line_error(cli(env, "down", "--timeout", "-1", check=False), "--timeout -1", "above 0")
    _one_line_error(cli(env, "top", "--once", "--interval", "-1", check=False), "--interval -1", "above 0")
    _one_line_error(cli(env, "top", "--once", "--interval", "0", check=False), "--interval 0", "above 0")


def test_up_api_override_is_checked_and_blamed_on_api(env, topo):
    path, _ = topo
    p = cli(env, "up", path, "--fabric", unique_fabric(), "--api", "foo", "--duration", "1", check=False)
    _one_line_error(p, "--api 'foo': 'foo' is not HOST:PORT")
    assert "--fabric" not in p.stderr
    p = cli(env, "up", path, "--api", "foo", "--duration", "1", check=False)
    _one_line_error(p, "--api 'foo': 'foo' is not HOST:PORT")
    p = cli(env, "up", path, "--fabric", "a/b", "--duration", "1", check=False)
    _one_line_error(p, "--fabric 'a/b': fabric name 'a/b' may only hold")


def test_up_reports_field_cross_reference_and_function_errors_together(env, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(TOPO.replace("FABRIC", "x").replace("ring_size: 256", "ring_size: 250")
                   .replace("rate: 2000", "rat: 2000").replace("[gen, fw, sink]", "[gen, fw, fw]"))
    p = cli(env, "up", bad, check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert f"{bad}:1: field `fabric.ring_size`" in p.stderr
    assert f"{bad}:8: field `chains[0].nodes[2]`: node 'fw' appears twice in chain 'main'" in p.stderr
    assert f"{bad}:4: field `nodes[0].config.rat`" in p.stderr


def test_reload_help_says_which_file_a_plain_reload_reads(env):
    out = " ".join(cli(env, "reload", "--help").stdout.split())
    assert "the file last loaded" in out and "the last one given to reload" in out
