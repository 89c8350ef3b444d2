"""The suite's own rule (tests/conftest.py): a run that executes no test fails."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"


def _run(tmp_path: Path, body: str) -> subprocess.CompletedProcess:
    (tmp_path / "conftest.py").write_text(CONFTEST.read_text())
    (tmp_path / "test_sample.py").write_text("import pytest\n\n" + body)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)


def test_a_run_whose_every_test_skipped_fails(tmp_path: Path) -> None:
    r = _run(tmp_path, "@pytest.mark.skip(reason='needs root')\ndef test_a():\n    pass\n")
    assert r.returncode == 5, r.stdout
    assert "no test ran" in r.stdout


def test_a_run_with_one_passing_test_among_skips_passes(tmp_path: Path) -> None:
    r = _run(tmp_path, "@pytest.mark.skip(reason='needs root')\ndef test_a():\n    pass\n\n"
                       "def test_b():\n    assert 1 + 1 == 2\n")
    assert r.returncode == 0, r.stdout


def test_a_failing_run_keeps_its_failure_status(tmp_path: Path) -> None:
    r = _run(tmp_path, "@pytest.mark.skip(reason='x')\ndef test_a():\n    pass\n\ndef test_b():\n    assert False\n")
    assert r.returncode == 1, r.stdout
