"""What a benchmark result was measured with, kept beside its figures: the command line, the time,
the git commit of the tree the bench runs from (and the files changed since), the machine (with
its load average when the bench started) and the peers' versions. Every `shmfabric bench VERB
--json` carries it (`meta`, or in each row of the benches that print a list of rows), and the
tables end with `info_line`, so a figure copied into the README can be traced to its run."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable

from shmfabric import programs

#: Peer programs whose version is recorded when installed: (program, arguments that print it).
PEERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("haproxy", ("-v",)), ("nginx", ("-v",)), ("wrk", ("-v",)), ("redis-server", ("--version",)),
    ("nutcracker", ("--version",)), ("iperf3", ("-v",)), ("nft", ("--version",)),
)
#: Peers that are Python packages or Debian packages (no version flag that starts nothing).
PACKAGES: tuple[tuple[str, str], ...] = (("iceoryx2", "python"), ("dpdk", "debian"))

_TREE = Path(__file__).resolve().parents[3]  # src/shmfabric/bench/<this> -> the checkout


def _git(*args: str) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(["git", "--no-optional-locks", "-C", str(_TREE), *args], capture_output=True,
                              text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None


def commit() -> tuple[str | None, list[str] | None]:
    """HEAD of the checkout this module is in and the tracked files changed since it ([] if
    none); (None, None) when it does not run from a checkout (an installed package)."""
    if not (_TREE / "src" / "shmfabric").is_dir():
        return None, None
    head = _git("rev-parse", "HEAD")
    if head is None or head.returncode:
        return None, None
    st = _git("status", "--porcelain", "--untracked-files=no")
    changed = [line[3:] for line in st.stdout.splitlines()] if st is not None and not st.returncode else None
    return head.stdout.strip(), changed


def machine() -> dict[str, Any]:
    """CPU model and count, kernel, Python, and the load average now."""
    cpu = None
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        pass
    try:
        usable: int | None = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = None
    return {
        "cpu_model": cpu or platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "cpus_usable": usable, "arch": platform.machine(), "kernel": platform.release(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def _program_version(name: str, args: Iterable[str]) -> str | None:
    path = programs.find(name)
    if path is None:
        return None
    try:
        out = subprocess.run([path, *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    text = (out.stdout + out.stderr).strip()
    return text.splitlines()[0].strip() if text else None


def _package_version(name: str, kind: str) -> str | None:
    if kind == "python":
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", name], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def peer_versions() -> dict[str, str]:
    """The installed peers' versions, by name (those not installed are left out)."""
    found = {name: _program_version(name, args) for name, args in PEERS}
    found.update({name: _package_version(name, kind) for name, kind in PACKAGES})
    return {k: v for k, v in found.items() if v}


def run_info() -> dict[str, Any]:
    """Everything above, as one JSON object. Call it before the run: the load average is then
    the machine's, not the bench's."""
    sha, changed = commit()
    return {"command": shlex.join(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]),
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "commit": sha, "uncommitted_changes": changed, "machine": machine(), "peers": peer_versions()}


def info_line(meta: dict[str, Any]) -> str:
    """`run_info()` as one line under a table."""
    m = meta["machine"]
    dirty = f" + {len(meta['uncommitted_changes'])} changed file(s)" if meta.get("uncommitted_changes") else ""
    sha = (meta["commit"] or "no git checkout")[:12]
    return (f"measured {meta['time_utc']} at commit {sha}{dirty}; {m['cpu_model']}, {m['cpus']} CPUs; "
            f"Linux {m['kernel']}; {m['python']}; load average {m['loadavg']} at the start")
