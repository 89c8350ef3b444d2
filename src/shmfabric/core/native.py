"""The compiled core's names, re-exported; nothing else imports `_fabric` directly."""
from __future__ import annotations

from shmfabric.core._fabric import (  # noqa: F401  (re-exports)
    FLAG_CONTROL,
    LAYOUT,
    NODE_ATTACHING,
    NODE_DOWN,
    NODE_FREE,
    NODE_RECLAIM,
    NODE_UP,
    WAIT_ADAPTIVE,
    WAIT_BLOCK,
    WAIT_POLL,
    Buffer,
    CoreError,
    DestinationError,
    Frame,
    FrameBatch,
    FrameSizeError,
    NodeReclaimedError,
    Port,
    Region,
    ReleasedError,
    TapeBusyError,
    load_u16_acquire,
    store_u16_release,
)
