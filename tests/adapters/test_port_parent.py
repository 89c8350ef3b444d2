"""`--parent-pid`: a port started by a service manager stops when the manager dies, even by SIGKILL."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

from shmfabric.fabric import Fabric

PARENT = """
import subprocess, sys, time
child = subprocess.Popen(sys.argv[1:] + ["--parent-pid", str(__import__("os").getpid())],
                         stdout=subprocess.PIPE, text=True)
print(child.pid, flush=True)
print(child.stdout.readline(), end="", flush=True)
time.sleep(60)
"""


def test_the_memif_port_stops_when_its_parent_is_killed():
    name = f"ppar{uuid.uuid4().hex[:8]}"
    Fabric.create(name).close()
    workdir = tempfile.mkdtemp(prefix="ppar", dir="/tmp")
    sock = os.path.join(workdir, "m.sock")
    exe = os.path.join(os.path.dirname(sys.executable), "shmfabric")
    parent = subprocess.Popen([sys.executable, "-c", PARENT, exe, "memif", name, "mp", "--socket", sock],
                              stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        assert "listening on" in parent.stdout.readline()
        assert os.path.exists(sock)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(5)
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{child}") and time.monotonic() < deadline:
            time.sleep(0.05)
            try:
                os.waitpid(child, os.WNOHANG)  # (reaped by init normally; harmless if not ours)
            except ChildProcessError:
                pass
        assert not os.path.exists(f"/proc/{child}") or open(f"/proc/{child}/stat").read().split()[2] == "Z"
        assert not os.path.exists(sock)  # it stopped gracefully: its socket file went with it
        fab = Fabric.open(name)
        assert fab.node_id("mp") is None  # and it left the fabric
        fab.close()
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        Fabric.destroy(name)
        shutil.rmtree(workdir, ignore_errors=True)


def test_the_memif_secret_can_come_from_a_file_not_the_command_line():
    from shmfabric.adapters.memif import MemifBridge, MemifConfig
    from shmfabric.adapters.memif_wire import PeerDisconnected

    name = f"psec{uuid.uuid4().hex[:8]}"
    Fabric.create(name).close()
    workdir = tempfile.mkdtemp(prefix="psec", dir="/tmp")
    sock = os.path.join(workdir, "m.sock")
    with open(os.path.join(workdir, "secret"), "w") as f:
        f.write("s3cret\n")
    exe = os.path.join(os.path.dirname(sys.executable), "shmfabric")
    port = subprocess.Popen([exe, "memif", name, "mp", "--socket", sock, "--secret-file", os.path.join(workdir, "secret")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    fab = Fabric.open(name)
    node = fab.attach("client")
    try:
        assert "listening on" in port.stdout.readline()
        assert "s3cret" not in open(f"/proc/{port.pid}/cmdline").read()
        try:
            MemifBridge(node, MemifConfig(sock, role="client", secret=b"wrong"))._dial()
            raise AssertionError("a wrong secret was taken")
        except PeerDisconnected as exc:
            assert exc.reason == "incorrect secret"
        conn = MemifBridge(node, MemifConfig(sock, role="client", secret=b"s3cret"))._dial()
        conn.close()
    finally:
        node.detach()
        fab.close()
        port.terminate()
        port.communicate(timeout=10)
        Fabric.destroy(name)
        shutil.rmtree(workdir, ignore_errors=True)
