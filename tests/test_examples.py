"""Every example runs and prints what its README says."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_two_nodes_example_prints_the_upper_cased_frames():
    out = subprocess.run([sys.executable, str(ROOT / "examples/two_nodes/two_nodes.py")], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[b'HELLO', b'FABRIC']"
    # ephemeral: the reaper removes the region shortly after the last node left
    path = Path("/dev/shm/shmfabric-two-nodes-example")
    deadline = time.monotonic() + 5
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not path.exists()
