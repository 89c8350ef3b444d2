"""External programs (nginx, haproxy, nutcracker, nft, conntrack, ip, wrk, ...), found as root finds them.

Debian installs daemons and administration tools in /usr/sbin and /sbin, which only root's PATH
holds: for a normal user `shutil.which("nginx")` is None although nginx is installed (and runs
fine unprivileged on a high port). `find` looks on PATH first, then in the sbin directories, and
gives the full path: run the program by that path, never by its bare name (which would not be
found on that user's PATH either).

This module imports nothing from shmfabric, so every layer (benches, tests, the CLI) may use it.
"""
from __future__ import annotations

import os
import shutil

__all__ = ["SBIN_DIRS", "find", "missing", "not_found"]

#: Searched after PATH, in this order (root's PATH has them; a Debian user's does not).
SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")


def find(name: str) -> str | None:
    """The full path of executable `name`: on PATH, else in /usr/local/sbin, /usr/sbin or /sbin; None if in neither."""
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN_DIRS))


def missing(*names: str) -> list[str]:
    """The programs among `names` that `find` does not find, in the order given."""
    return [n for n in names if find(n) is None]


def not_found(*names: str, fix: str = "`make setup` installs {them} as root") -> str:
    """Why something that needs `names` cannot run, for a skip reason or an error message:
    "needs nginx: not found on PATH or in /usr/local/sbin, /usr/sbin, /sbin; `make setup` installs
    it as root". `fix` may say {them} (it or them)."""
    them = "them" if len(names) > 1 else "it"
    return (f"needs {', '.join(names)}: not found on PATH or in {', '.join(SBIN_DIRS)}; "
            + fix.format(them=them))
