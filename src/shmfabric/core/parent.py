"""Tie a child process's life to its parent's: `die_with_parent`.

Shared by the splicer's workers and the service manager's functions, which both must not
outlive a parent killed with SIGKILL. Nothing here touches the fabric.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent: int) -> None:
    """Have the kernel send this process SIGTERM (its graceful stop) when `parent` dies.

    Call it once the SIGTERM handler is installed. The kernel signals when the *thread* that
    forked this process ends, so the parent must start it from a thread that lives as long as
    it does. prctl through ctypes: the standard library has no wrapper, and a package for one
    call is not worth it. The interpreter's own symbols hold libc's prctl (find_library("c")
    would run ldconfig in a subprocess, ~30 ms on every start).
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)
