"""Fixtures for the manager's lifecycle tests: a Supervisor running a real topology (real function
processes on a real fabric), always stopped and its fabric removed, whatever the test did."""
from __future__ import annotations

import os
import secrets
import textwrap
import threading
import time
from typing import Callable, Iterator

import pytest

from shmfabric.fabric import Fabric
from shmfabric.manager.config import parse_topology
from shmfabric.manager.supervisor import Supervisor


def unique_fabric() -> str:
    return f"m{os.getpid() % 100000}x{secrets.token_hex(3)}"


def wait_until(pred: Callable[[], object], timeout: float = 20.0, what: str = "condition", sup=None) -> object:
    """Poll `pred` (ticking the supervisor, if given) until it is truthy; fail with `what` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        if sup is not None:
            sup.tick()
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            events = "\n".join(f"  {e['kind']} {e['node']}: {e['detail']}" for e in sup.events) if sup else ""
            pytest.fail(f"timed out waiting for {what}\nevents:\n{events}")
        time.sleep(0.05)


def counters(sup: Supervisor, inst: str, fn: bool = False) -> dict:
    """An instance's latest runtime (or function) counters from the supervisor's status."""
    for node in sup.status()["nodes"]:
        for i in node["instances"]:
            if i["name"] == inst:
                return i["function_counters" if fn else "counters"]
    return {}


@pytest.fixture
def run_topology(tmp_path) -> Iterator[Callable[..., Supervisor]]:
    """run_topology(yaml_text_with_{fabric}) -> a started Supervisor; stopped and cleaned up after."""
    started: list[Supervisor] = []
    names: list[str] = []

    def start(text: str, **kw) -> Supervisor:
        name = unique_fabric()
        names.append(name)
        body = textwrap.dedent(text).replace("{fabric}", name)
        path = tmp_path / f"{name}.yaml"
        path.write_text(body)
        sup = Supervisor(parse_topology(body, str(path)), source=str(path), log_dir=tmp_path / "logs", **kw)
        started.append(sup)
        sup.start()
        return sup

    yield start
    for sup in started:
        try:
            sup.stop()
        finally:
            for node in sup.nodes.values():  # belt and braces: no process outlives the test
                for inst in node.instances:
                    if inst.proc is not None and inst.proc.poll() is None:
                        inst.proc.kill()
    for name in names:
        Fabric.destroy(name)


def fenced_blocks(text: str, after: str) -> list[str]:
    """The bodies of the fenced blocks that follow the first line containing `after`."""
    out, body = [], None
    for line in text[text.index(after):].splitlines():
        if line.startswith("```"):
            if body is None:
                body = []
            else:
                out.append("\n".join(body) + "\n")
                body = None
        elif body is not None:
            body.append(line)
    return out


def in_thread(fn: Callable[..., object], *args, **kw) -> tuple[threading.Thread, dict]:
    """Run fn(*args, **kw) in a daemon thread: (thread, out), out["value"] or out["error"] once done."""
    out: dict = {}

    def run() -> None:
        try:
            out["value"] = fn(*args, **kw)
        except Exception as exc:  # checked by the caller
            out["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def status_within(sup: Supervisor, timeout: float = 10.0, why: str = "") -> dict:
    """status() from another thread, bounded: a wedged manager fails the test instead of hanging it."""
    t, out = in_thread(sup.status)
    t.join(timeout)
    assert not t.is_alive(), f"status() did not answer within {timeout:g}s{why}"
    return out["value"]


def until_events(pred: Callable[[], object], sup: Supervisor, timeout: float, what: str) -> object:
    """wait_until without ticking (a loop thread does), listing the manager's events if it times out."""
    try:
        return wait_until(pred, timeout=timeout, what=what)
    except pytest.fail.Exception:
        events = "\n".join(f"  {e['kind']} {e['node']}: {e['detail']}" for e in list(sup.events))
        pytest.fail(f"timed out waiting for {what}\nevents:\n{events}")


@pytest.fixture
def loop() -> Iterator[Callable[[Supervisor], None]]:
    """loop(sup) runs a supervisor's loop in a thread (as `up` does); stopped after the test."""
    stops: list[tuple[threading.Event, threading.Thread]] = []

    def start(sup: Supervisor) -> None:
        stop = threading.Event()
        t = threading.Thread(target=sup.run, args=(stop,), daemon=True)
        t.start()
        stops.append((stop, t))

    yield start
    for stop, t in stops:
        stop.set()
        t.join(60)
