"""Fixtures for the fabric tests: uniquely named fabrics that are always destroyed, and worker
processes (tests/fabric/_workers.py) that are always killed, whatever the test did."""
from __future__ import annotations

import json
import os
import secrets
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from shmfabric.core.region import region_path
from shmfabric.fabric import Fabric

WORKERS = Path(__file__).with_name("_workers.py")


def unique_name(tag: str = "t") -> str:
    """A fabric name no other test (or test run) uses; short enough for the 31-byte limit."""
    return f"{tag[:8]}-{os.getpid()}-{secrets.token_hex(3)}"


class Worker:
    """A worker process with line-oriented JSON output."""

    def __init__(self, role: str, *args: Any):
        self.role = role
        self.proc = subprocess.Popen([sys.executable, str(WORKERS), role, *map(str, args)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, bufsize=1)
        self.pid = self.proc.pid

    def read(self, timeout: float = 10.0) -> dict:
        """The next JSON line the worker prints; fails the test (with its stderr) on timeout or exit."""
        deadline = time.monotonic() + timeout
        while True:
            left = max(0.0, deadline - time.monotonic())
            r, _, _ = select.select([self.proc.stdout], [], [], left)
            if not r and time.monotonic() >= deadline:
                raise AssertionError(f"worker {self.role} printed nothing within {timeout} s")
            if r:
                line = self.proc.stdout.readline()
                if not line:
                    self.proc.wait(timeout=5)
                    raise AssertionError(f"worker {self.role} exited ({self.proc.returncode}) early: "
                                         f"{self.proc.stderr.read()[-2000:]}")
                return json.loads(line)

    def write(self, line: str = "go") -> None:
        """Send one line to the worker's stdin (e.g. its start signal)."""
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def finish(self, timeout: float = 10.0) -> int:
        """Close its stdin (the 'you may go' signal) and wait for it to exit."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        rc = self.proc.wait(timeout=timeout)
        if rc != 0:
            raise AssertionError(f"worker {self.role} failed ({rc}): {self.proc.stderr.read()[-2000:]}")
        return rc

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=5)


class Harness:
    """What a test creates; everything is cleaned up in the fixture's teardown."""

    def __init__(self) -> None:
        self.fabrics: list[Fabric] = []
        self.names: list[str] = []
        self.workers: list[Worker] = []

    def create(self, tag: str = "t", **kw: Any) -> Fabric:
        name = unique_name(tag)
        self.names.append(name)
        fab = Fabric.create(name, **kw)
        self.fabrics.append(fab)
        return fab

    def worker(self, role: str, *args: Any) -> Worker:
        w = Worker(role, *args)
        self.workers.append(w)
        return w

    def cleanup(self) -> None:
        for w in self.workers:
            if w.proc.poll() is None:
                w.proc.kill()
            try:
                w.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            for s in (w.proc.stdin, w.proc.stdout, w.proc.stderr):
                try:
                    s.close()
                except OSError:
                    pass
        for f in self.fabrics:
            try:
                f.close()
            except Exception:
                pass
        for n in self.names:
            Fabric.destroy(n)


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness()
    try:
        yield h
    finally:
        h.cleanup()


@pytest.fixture
def fab(harness: Harness) -> Fabric:
    """A small, uniquely named fabric (network 0: MTU 1500, 1024 slots), destroyed afterwards."""
    return harness.create(networks=[{"mtu": 1500, "slots": 1024}], ring_size=64, max_nodes=8)


def wait_until(cond: Callable[[], Any], timeout: float, interval: float = 0.02) -> Any:
    """Poll `cond` until it is true or `timeout` passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v or time.monotonic() >= deadline:
            return v
        time.sleep(interval)


def assert_conserved(fab: Fabric, network: int = 0) -> dict:
    """free + held by live nodes = total, nothing orphaned, and the free stack agrees with the owner table."""
    a = fab.pool_audit(network)
    assert a["orphaned"] == 0, a
    assert a["free"] + sum(a["held"].values()) == a["total"], a
    assert a["stack_count"] == a["free"], a
    assert a["on_stack"] == a["free"], a  # no slot is free but out of the stack's reach
    return a


def alloc_all(node) -> list:
    """Every buffer `node` can allocate, until the pool is dry."""
    bufs = []
    while True:
        try:
            bufs.append(node.alloc())
        except MemoryError:
            return bufs


def assert_every_slot_once(node, total: int) -> None:
    """`node` can allocate `total` buffers, no two sharing a slot (nothing was freed twice)."""
    import struct

    bufs = alloc_all(node)
    assert len(bufs) == total
    for i, b in enumerate(bufs):
        with memoryview(b) as v:
            v[:4] = struct.pack("<I", i)
    for i, b in enumerate(bufs):  # no two buffers share a slot
        with memoryview(b) as v:
            assert struct.unpack("<I", v[:4])[0] == i
    del bufs


def assert_all_free(fab: Fabric, network: int = 0) -> dict:
    """assert_conserved, and every slot back in the pool (no node holds any)."""
    a = assert_conserved(fab, network)
    assert a["free"] == a["total"], a
    return a


def shm_leftover(name: str) -> bool:
    return region_path(name).exists()
