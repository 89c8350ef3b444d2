"""Run a chain of `python -m shmfabric.functions.run` processes on a fresh fabric (tests of the
ratelimit, monitor and tunnel functions). Every process is killed and the fabric destroyed at the end."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from shmfabric.fabric import Fabric


class Chain:
    def __init__(self, tmp: Path, mtu: int = 1500, slots: int = 4096):
        self.name = f"fx-{uuid.uuid4().hex[:8]}"
        self.fab = Fabric.create(self.name, networks=[{"mtu": mtu, "slots": slots}], ring_size=512)
        self.tmp = tmp
        self.p: dict[str, subprocess.Popen] = {}

    def start(self, node: str, function: str, config: dict, nxt: str = "") -> subprocess.Popen:
        cmd = [sys.executable, "-m", "shmfabric.functions.run", "--fabric", self.name, "--node", node,
               "--function", function, "--config", json.dumps(config), "--stats-json", str(self.tmp / f"{node}.json")]
        if nxt:
            cmd += ["--next", nxt]
        self.p[node] = subprocess.Popen(cmd, stderr=open(self.tmp / f"{node}.log", "w"))
        return self.p[node]

    def wait_attached(self, *nodes: str, timeout: float = 30) -> None:
        end = time.monotonic() + timeout
        while any(self.fab.node_id(n) is None for n in nodes):
            assert time.monotonic() < end, f"nodes {nodes} did not attach; logs:\n{self.logs()}"
            for n, p in self.p.items():
                assert p.poll() is None, f"{n} exited early ({p.returncode}):\n{self.logs()}"
            time.sleep(0.02)

    def wait_rx(self, node: str, want: int, timeout: float = 30) -> int:
        end = time.monotonic() + timeout
        got = 0
        while time.monotonic() < end:
            got = sum(n["rx_frames"] for n in self.fab.nodes() if n["name"] == node)
            if got >= want:
                return got
            time.sleep(0.05)
        return got

    def stop(self, node: str, timeout: float = 30) -> dict:
        """SIGTERM (graceful: drains its input), then its final stats."""
        p = self.p[node]
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=timeout) == 0, f"{node} failed:\n{self.logs()}"
        return json.loads((self.tmp / f"{node}.json").read_text())

    def wait_exit(self, node: str, timeout: float = 60) -> dict:
        assert self.p[node].wait(timeout=timeout) == 0, f"{node} failed:\n{self.logs()}"
        return json.loads((self.tmp / f"{node}.json").read_text())

    def logs(self) -> str:
        return "\n".join(f"--- {f.name}\n{f.read_text()[-1500:]}" for f in sorted(self.tmp.glob("*.log")))

    def close(self) -> None:
        for p in self.p.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        self.fab.close()
        Fabric.destroy(self.name)
