"""Adapter nodes under the supervisor, three cases noted as gaps: (a) a reload that adds a TAP adapter a
chain's end sends to (a router's port, or a chain's next step), (b) an adapter whose `via:` node's
first instance failed for good while another instance of it runs, (c) an adapter whose restart by
the manager (its via moved) dies while starting. Real processes: TAP adapters in network namespaces
created here (random names, deleted after), a firewall and a router between them, the supervisor's
loop running as under `shmfabric up`; the user's check is a ping through the chain."""
from __future__ import annotations

import os
import signal
import subprocess
import textwrap
import threading
import time
import uuid
from typing import Callable, Iterator

import pytest

from shmfabric.manager.config import parse_topology
from tests.manager.conftest import in_thread

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(os.geteuid() != 0, reason="TAP adapters and network namespaces need root")]

WAIT = 10.0  # seconds a user may wait for what each test expects (far more than it takes when it works)
NET = "10.78.0"


def _ip(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(["ip", *argv], capture_output=True, text=True, timeout=20, check=False)
    if check and p.returncode:
        pytest.fail(f"ip {' '.join(argv)} -> {p.returncode}: {p.stderr}")
    return p


@pytest.fixture
def spaces() -> Iterator[Callable[[int], list[str]]]:
    """spaces(n) -> n new network namespaces (random names), deleted after the test."""
    made: list[str] = []

    def make(n: int) -> list[str]:
        out = []
        for _ in range(n):
            ns = f"sfg{uuid.uuid4().hex[:8]}"
            _ip("netns", "add", ns)
            made.append(ns)
            out.append(ns)
        return out

    yield make
    for ns in made:
        _ip("netns", "del", ns, check=False)


def tap(name: str, ns: str, host: int, via: str | None = "fw") -> str:
    return textwrap.indent(textwrap.dedent(f"""\
        - name: {name}
          adapter: {{kind: tap, netns: {ns}, address: [{NET}.{host}/24]}}
        """) + (f"  via: {via}\n" if via else ""), "  ")


def topology(taps: str, router_ports: dict[str, int] | None, fw_extra: str = "", chains: str = "") -> str:
    """Taps + a firewall `fw` (accepting all) + optionally a `router` ({port: host}) after it."""
    text = textwrap.dedent("""\
        fabric: {name: "{fabric}", ring_size: 256, max_nodes: 16, networks: [{mtu: 1500, slots: 2048}]}
        poll_interval: 0.1
        api: null
        policies:
          restart: {backoff_initial: 0.1, backoff_max: 1}
        nodes:
        """) + taps + textwrap.indent(textwrap.dedent("""\
        - name: fw
          function: firewall
          config: {rules: "policy accept"}
        """) + fw_extra, "  ")
    if router_ports is not None:
        routes = ", ".join(f"{NET}.{h}/32: {p}" for p, h in router_ports.items())
        text += textwrap.indent(textwrap.dedent(f"""\
            - name: router
              function: router
              ports: [{', '.join(router_ports)}]
              config: {{routes: {{{routes}}}}}
            """), "  ")
        chains = chains or "  - {name: c, nodes: [fw, router]}\n"
    return text + ("chains:\n" + chains if chains else "")


def ping(ns: str, host: int) -> bool:
    p = subprocess.run(["ip", "netns", "exec", ns, "ping", "-c", "1", "-W", "1", f"{NET}.{host}"],
                       capture_output=True, timeout=10, check=False)
    return p.returncode == 0


def ping_within(ns: str, host: int, timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ping(ns, host):
            return True
        time.sleep(0.2)
    return False


def explain(sup, *nodes: str) -> str:
    """The named nodes' instances (state, via, drop_no_via) and the manager's events, for a failure."""
    lines = []
    st = sup.status()
    for n in st["nodes"]:
        if n["name"] in nodes:
            for i in n["instances"]:
                via = next((x.via for x in sup.nodes[n["name"]].instances if x.name == i["name"]), None)
                lines.append(f"  {i['name']}: {i['state']}, via {via}, drop_no_via "
                             f"{(i.get('counters') or {}).get('drop_no_via')}, error {i.get('error')}")
    lines += [f"  event {e['kind']} {e['node']}: {e['detail']}" for e in list(sup.events)[-25:]]
    return "\n".join(lines)


def _until(pred: Callable[[], object], timeout: float = WAIT) -> object:
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v or time.monotonic() > deadline:
            return v
        time.sleep(0.1)


# -- (a) ---------------------------------------------------------------------------------------------
def test_a_reload_adding_a_tap_adapter_at_a_routers_port_makes_it_reachable(spaces, run_topology, loop):
    a, b, c = spaces(3)
    sup = run_topology(topology(tap("client", a, 1) + tap("web", b, 2), {"client": 1, "web": 2}))
    loop(sup)
    assert ping_within(a, 2), "client -> web through fw and router before the reload\n" + explain(sup, "client", "web")
    new = topology(tap("client", a, 1) + tap("web", b, 2) + tap("web2", c, 3), {"client": 1, "web": 2, "web2": 3})
    new = new.replace("{fabric}", sup.topo.fabric.name)
    t, out = in_thread(sup.reload, parse_topology(new, "new.yaml"))
    t.join(40)
    assert not t.is_alive(), "reload did not return within 40 s"
    assert "error" not in out, f"the reload failed: {out.get('error')}\n" + explain(sup, "router", "web2")
    assert "web2" in out["value"]["added"]
    # the user's expectation: the new adapter is reachable through the chain, with no further reload
    assert ping_within(a, 3), "client -> web2 after the reload\n" + explain(sup, "router", "web2")


def test_a_reload_adding_a_tap_adapter_as_a_chains_next_step_makes_it_reachable(spaces, run_topology, loop):
    # client -> fw (its via) -> next step; the chain [fw, web2] and web2 come with the reload
    a, b = spaces(2)
    sup = run_topology(topology(tap("client", a, 1), None))
    loop(sup)
    new = topology(tap("client", a, 1) + tap("web2", b, 3, via=None), None,
                   chains="  - {name: c, nodes: [fw, web2]}\n").replace("{fabric}", sup.topo.fabric.name)
    t, out = in_thread(sup.reload, parse_topology(new, "new.yaml"))
    t.join(40)
    assert not t.is_alive(), "reload did not return within 40 s"
    assert "error" not in out, f"the reload failed: {out.get('error')}\n" + explain(sup, "fw", "web2")
    # fw was told its new next step (web2, up before the commit) at the reload, not left without one
    assert "fw" in out["value"]["resteered"], out["value"]
    assert ping_within(a, 3), "client -> web2 after the reload\n" + explain(sup, "fw", "web2")


# -- (b) ---------------------------------------------------------------------------------------------
def test_an_adapter_leaves_a_via_instance_that_failed_for_good_for_one_that_runs(spaces, run_topology, loop):
    a, b = spaces(2)
    # two instances from the file; the policy's bounds (1..2) neither add one when fw fails nor take
    # fw-2 away meanwhile: only the failure changes the group
    fw_extra = "  instances: 2\n  scale: {min_instances: 1, max_instances: 2, in_for: 3600}\n" \
               "  restart: {max_restarts: 0}\n"
    sup = run_topology(topology(tap("client", a, 1) + tap("web", b, 2), {"client": 1, "web": 2}, fw_extra=fw_extra))
    loop(sup)
    assert [i.name for i in sup.nodes["fw"].instances] == ["fw", "fw-2"]
    assert sup.nodes["client"].instances[0].via == "fw"
    assert ping_within(a, 2), "client -> web before fw fails\n" + explain(sup, "client", "web", "fw")
    os.kill(sup.nodes["fw"].instances[0].pid, signal.SIGKILL)
    assert _until(lambda: sup.nodes["fw"].instances[0].state == "failed"), explain(sup, "fw")
    # fw-2 runs: the adapters should now send through it (the user's view: the ping works again)
    ok = ping_within(a, 2)
    assert ok and sup.nodes["client"].instances[0].via == "fw-2", (
        "client -> web after fw failed for good while fw-2 runs\n" + explain(sup, "client", "web", "fw"))


# -- (c) ---------------------------------------------------------------------------------------------
def test_an_adapter_that_dies_starting_at_its_via_restart_is_restarted_by_the_policy(spaces, run_topology, loop):
    a, b = spaces(2)
    sup = run_topology(topology(tap("client", a, 1) + tap("web", b, 2), {"client": 1, "web": 2}))
    loop(sup)
    assert ping_within(a, 2), "client -> web before the replace\n" + explain(sup, "client", "web")
    killed: list[int] = []
    done = threading.Event()

    def kill_web_on_fw2() -> None:
        # the instance of `web` the manager starts on the new via (fw-2): killed while it starts, as a
        # crash at start would (the OOM killer, a bug): a failure the restart policy retries elsewhere
        while not done.is_set():
            for inst in list(sup.nodes["web"].instances):
                if inst.via == "fw-2" and inst.proc is not None and inst.state == "starting":
                    os.kill(inst.proc.pid, signal.SIGKILL)
                    killed.append(inst.proc.pid)
                    return
            time.sleep(0.002)

    killer = threading.Thread(target=kill_web_on_fw2, daemon=True)
    killer.start()
    try:
        sup.replace("fw", version="2")  # fw -> fw-2: the adapters are restarted on it
    finally:
        done.set()
        killer.join(5)
    assert killed, "the test did not catch web's restart on fw-2 while it started\n" + explain(sup, "web")

    def web_back() -> bool:
        (inst,) = sup.nodes["web"].instances
        return inst.state == "running" and inst.via == "fw-2" and inst.pid not in killed

    assert _until(web_back), "web is not running again after it died starting on fw-2\n" + explain(sup, "web")
    assert ping_within(a, 2), "client -> web after web's restart\n" + explain(sup, "client", "web")


def test_a_reload_adding_a_routers_port_adapter_on_a_device_a_removed_one_holds_is_refused_with_two_steps(
        spaces, run_topology, loop):
    # web leaves and web3 takes its interface (sf0 in netns b) in one reload: web3 can start only once
    # web has stopped (after the commit), but the new router instance would wait for its port web3
    # before the commit: refused at once (409), saying to apply it in two reloads; and those work
    a, b = spaces(2)
    sup = run_topology(topology(tap("client", a, 1) + tap("web", b, 2), {"client": 1, "web": 2}))
    loop(sup)
    assert ping_within(a, 2), "client -> web before the reload\n" + explain(sup, "client", "web")
    name = sup.topo.fabric.name
    both = topology(tap("client", a, 1) + tap("web3", b, 3), {"client": 1, "web3": 3}).replace("{fabric}", name)
    t, out = in_thread(sup.reload, parse_topology(both, "new.yaml"))
    t.join(40)
    assert not t.is_alive(), "reload did not return within 40 s"
    err = out.get("error")
    assert err is not None and getattr(err, "status", None) == 409, f"not refused with 409: {out}"
    assert "two reloads" in str(err) and "'web'" in str(err) and "'web3'" in str(err), str(err)
    assert "web3" not in sup.nodes and sup.nodes["web"].instances[0].state == "running", explain(sup, "web")
    assert ping_within(a, 2), "client -> web after the refused reload\n" + explain(sup, "client", "web")
    first = topology(tap("client", a, 1), {"client": 1}).replace("{fabric}", name)
    for step in (first, both):
        t, out = in_thread(sup.reload, parse_topology(step, "new.yaml"))
        t.join(40)
        assert not t.is_alive() and "error" not in out, f"reload: {out.get('error')}\n" + explain(sup, "router")
    assert ping_within(a, 3), "client -> web3 after the two reloads\n" + explain(sup, "router", "web3")


def _reload(sup, text: str) -> dict:
    """sup.reload(text) in a thread, bounded: {"value": changes} or {"error": exc}."""
    t, out = in_thread(sup.reload, parse_topology(text.replace("{fabric}", sup.topo.fabric.name), "new.yaml"))
    t.join(60)
    assert not t.is_alive(), "reload did not return within 60 s"
    return out


def test_a_reload_adding_an_adapter_early_is_undone_with_the_rest_when_it_fails(spaces, run_topology, loop):
    # web2 starts before the commit (with the other new instances); gen2 (frames over the MTU) does
    # not come up, so the reload fails: web2 must go again, its device with it, and nothing changed
    a, b, c = spaces(3)
    sup = run_topology(topology(tap("client", a, 1) + tap("web", b, 2), {"client": 1, "web": 2}))
    loop(sup)
    assert ping_within(a, 2), "client -> web before the reload\n" + explain(sup, "client", "web")
    before = {e["name"] for e in sup.fabric.nodes() if e["state"] == "up"}
    gen = "  - name: gen2\n    function: generator\n    config: {rate: 10, size: 1600, flows: 1}\n"
    out = _reload(sup, topology(tap("client", a, 1) + tap("web", b, 2) + tap("web2", c, 3) + gen,
                                {"client": 1, "web": 2, "web2": 3},
                                chains="  - {name: c, nodes: [fw, router]}\n  - {name: g, nodes: [gen2, fw]}\n"))
    assert "error" in out, f"the reload did not fail: {out}"
    assert "web2" not in sup.nodes and "gen2" not in sup.nodes, explain(sup, "web2", "gen2")
    # it did start before the commit, and was withdrawn with the rest
    events = [(e["kind"], e["node"]) for e in list(sup.events)]
    assert ("start", "web2") in events, events

    def device_gone() -> bool:
        return _ip("-n", c, "link", "show", "sf0", check=False).returncode != 0

    assert _until(device_gone), "web2's interface is still in its namespace after the failed reload"
    assert _until(lambda: {e["name"] for e in sup.fabric.nodes() if e["state"] == "up"} == before), (
        before, sup.fabric.nodes())
    assert ping_within(a, 2), "client -> web after the failed reload\n" + explain(sup, "client", "web")


def test_a_reload_replacing_a_global_member_in_its_namespace_keeps_the_global_address(
        spaces, run_topology, loop):
    # m1 leaves and m2 (another interface and address in the same namespace) joins the same global
    # address: m2 must not find the address on lo (m1's) and leave it, for m1 takes it off as it stops
    (a,) = spaces(1)
    g = f"{NET}.100"

    def topo(member: str, ifname: str, host: int) -> str:
        return textwrap.dedent("""\
            fabric: {name: "{fabric}", ring_size: 256, max_nodes: 16, networks: [{mtu: 1500, slots: 2048}]}
            poll_interval: 0.1
            api: null
            nodes:
            """) + (f"  - name: g\n    adapter: {{kind: global, address: {g}, members: [{member}]}}\n"
                    f"  - name: {member}\n    adapter: {{kind: tap, netns: {a}, ifname: {ifname}, "
                    f"address: [{NET}.{host}/24], global: [{g}]}}\n")

    def on_lo() -> bool:
        shown = _ip("-n", a, "-br", "addr", "show", "lo").stdout
        return f"{g}/32" in shown

    sup = run_topology(topo("m1", "sf0", 2))
    loop(sup)
    assert _until(on_lo), "the global address is not on lo before the reload"
    out = _reload(sup, topo("m2", "sf1", 3))
    assert "error" not in out, f"the reload failed: {out.get('error')}\n" + explain(sup, "g", "m2")
    assert "m2" in out["value"]["added"] and "m1" in out["value"]["removed"], out["value"]
    assert sup.nodes["m2"].instances[0].state == "running", explain(sup, "g", "m2")
    # the reload returned with m1 stopped and m2 running: the address must be on lo now
    assert on_lo(), ("the global address left lo in the namespace when m1 stopped; m2 runs without it\n"
                     + _ip("-n", a, "-br", "addr", "show", "lo").stdout + explain(sup, "g", "m2"))


def test_a_reload_starts_an_added_adapter_after_a_changed_one_frees_its_device(spaces, run_topology, loop):
    # web3 takes web's interface (sf0 in b) while web moves to c, and web3 comes first in the start
    # order: web's old instance must stop before web3 starts, else web3 finds sf0 taken (exit 2)
    a, b, c = spaces(3)
    sup = run_topology(topology(tap("client", a, 1) + tap("web", b, 2), None))
    loop(sup)
    new = topology(tap("client", a, 1) + tap("web3", b, 3) + tap("web", c, 2), None)
    assert parse_topology(new.replace("{fabric}", "x"), "new.yaml").start_order().index("web3") < \
        parse_topology(new.replace("{fabric}", "x"), "new.yaml").start_order().index("web"), "web3 not first"
    out = _reload(sup, new)
    assert "error" not in out, f"the reload failed: {out.get('error')}\n" + explain(sup, "web", "web3")
    assert not out["value"].get("warnings"), out["value"]
    assert "web3" in out["value"]["added"] and "web" in out["value"]["replaced"], out["value"]
    for name in ("web3", "web"):
        assert sup.nodes[name].instances[0].state == "running", explain(sup, "web", "web3")


def test_an_adapter_restart_whose_exit_the_loop_judged_during_the_ready_probe_is_judged_once(
        spaces, run_topology, loop, monkeypatch):
    # web is restarted on fw-2 (fw replaced); while the manager waits for its ready reply (the lock
    # released), the process dies and the loop judges that exit (backoff). The reply that came in
    # before must not mark the dead process running: its exit would be judged a second time
    a, b = spaces(2)
    sup = run_topology(topology(tap("client", a, 1) + tap("web", b, 2), {"client": 1, "web": 2}))
    loop(sup)
    assert ping_within(a, 2), "client -> web before the replace\n" + explain(sup, "client", "web")
    real_ready = sup._ready
    raced: list[int] = []

    def ready(inst):
        # the race, made deterministic: the process dies and the loop's judgement (`_watch`, which
        # runs whenever `_ready` releases the lock) happens inside the probe, whose reply said ready
        if inst.node == "web" and inst.via == "fw-2" and not inst.staged and not raced:
            raced.append(inst.proc.pid)
            inst.proc.kill()
            inst.proc.wait(10)
            sup._watch(sup.nodes["web"], inst, sup.clock())
            return True
        return real_ready(inst)

    monkeypatch.setattr(sup, "_ready", ready)
    n0 = len(sup.events)
    sup.replace("fw", version="2")
    monkeypatch.undo()
    assert raced, "web was not restarted on fw-2\n" + explain(sup, "web")

    def web_back() -> bool:
        (inst,) = sup.nodes["web"].instances
        return inst.state == "running" and inst.pid not in raced and inst.proc.poll() is None

    assert _until(web_back), "web is not running again after it died starting on fw-2\n" + explain(sup, "web")
    exits = [e for e in list(sup.events)[n0:] if e["node"] == "web" and e["kind"] in ("exited", "failed")]
    assert len(exits) == 1, "one exit judged more than once:\n" + explain(sup, "web")
    assert sup.nodes["web"].instances[0].restarts == 1, explain(sup, "web")


def test_an_instance_that_cannot_be_started_again_is_judged_by_its_restart_limit(
        spaces, run_topology, loop, monkeypatch):
    # fw is killed; its restarts cannot start a process (e.g. EMFILE, ENOMEM): each is an exit at start
    # for the restart policy, which gives up at its limit, instead of an error every round for ever
    (a,) = spaces(1)
    fw_extra = "  restart: {max_restarts: 2, window: 3600, backoff_initial: 0.1, backoff_max: 0.2}\n"
    sup = run_topology(topology(tap("client", a, 1), None, fw_extra=fw_extra))
    real_launch = sup._launch
    launches = []

    def launch(node, inst, now):
        if inst.node == "fw":  # (fw's first start came before this patch: every restart fails)
            launches.append(inst.name)
            raise OSError(24, "Too many open files")
        return real_launch(node, inst, now)

    monkeypatch.setattr(sup, "_launch", launch)
    loop(sup)
    os.kill(sup.nodes["fw"].instances[0].pid, signal.SIGKILL)
    assert _until(lambda: sup.nodes["fw"].instances[0].state == "failed"), explain(sup, "fw")
    details = [e["detail"] for e in list(sup.events) if e["node"] == "fw"]
    assert any("cannot start" in d and "restart limit reached" in d for d in details), details
    assert launches and sup.nodes["fw"].instances[0].restarts == 0, (launches, "a failed launch counted")
