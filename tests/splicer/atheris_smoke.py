"""Run an atheris harness of this folder for a short, seeded, bounded time (the smoke tests)."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest


def run_atheris_smoke(harness: str, tmp_path: Path, *flags: str) -> None:
    """Run tests/splicer/`harness` with libFuzzer `flags`; fail with its output if it finds anything."""
    if importlib.util.find_spec("atheris") is None:
        pytest.skip("atheris not installed: it has no wheel for this platform (pip install -e '.[fuzz]' to build it)")
    path = Path(__file__).with_name(harness)
    r = subprocess.run([sys.executable, str(path), "-seed=1", f"-artifact_prefix={tmp_path}/", *flags],
                       capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode(errors="replace")[-3000:]
