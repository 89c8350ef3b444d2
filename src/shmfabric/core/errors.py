"""Errors of the fabric, one type per operation (create, open, attach), each with a clear message.

The hot-path errors are raised by the compiled core; they are given their public names here.
"""
from __future__ import annotations

from shmfabric.core.native import (
    CoreError,
    DestinationError,
    FrameSizeError,
    NodeReclaimedError,
    ReleasedError,
    TapeBusyError,
)

FabricError = CoreError
"""Base class of every shmfabric error."""

UnknownDestinationError = DestinationError
"""A frame was addressed to a node that is not attached (never was, detached or dead)."""

ReleasedFrameError = ReleasedError
"""A frame or buffer was used after its batch was released, after it was forwarded or sent."""

FrameTooLargeError = FrameSizeError
"""A frame does not fit the network's MTU (also a ValueError)."""

NodeReclaimedError = NodeReclaimedError
"""This node's entry was reclaimed while the node still ran (it was stopped longer than the
liveness limit in another pid namespace, where only its heartbeat tells it is alive): its slots
and id are gone; attach again."""

TapeBusyError = TapeBusyError
"""A broadcast or multicast tape's writer lock stayed held (a writer is stopped); also a TimeoutError."""


class RegionCreateError(FabricError):
    """A region could not be created (it exists, bad parameters, no space)."""


class RegionOpenError(FabricError):
    """A region file could not be mapped: missing, not a region, other version, truncated, corrupt."""

    reason = "open"


class RegionNotFoundError(RegionOpenError):
    reason = "not-found"


class BadMagicError(RegionOpenError):
    reason = "bad-magic"


class VersionMismatchError(RegionOpenError):
    reason = "version-mismatch"


class TruncatedRegionError(RegionOpenError):
    reason = "truncated"


class CorruptRegionError(RegionOpenError):
    reason = "corrupt"


class AttachError(FabricError):
    """A node could not attach (table full, name in use, unknown network)."""


class AttachBusyError(AttachError):
    """Another node stands in the way (it holds the name, or the table is full): attaching again
    can work once it goes, so a program stopping on it exits EXIT_RETRY, not "fix the config"."""


class NameInUseError(AttachBusyError):
    """A live node holds the name: attaching again can work once it detaches (or dies)."""


class FabricFullError(AttachBusyError):
    """The node table is full: attaching again can work once a node detaches."""


# The exit status of a program that stopped on a condition that may clear by itself (a name, a
# device or an address held by another process): sysexits.h's EX_TEMPFAIL. Status 2 stays "fix
# the command line or config": a service manager restarts the first and gives up on the second
# (the shmfabric manager does; so does systemd with RestartPreventExitStatus=2).
EXIT_RETRY = 75
