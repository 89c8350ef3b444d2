"""The fabric layer: the Python API over the compiled core (Fabric, Node, frames, errors)."""
from shmfabric.core.errors import (  # noqa: F401
    AttachBusyError,
    AttachError,
    BadMagicError,
    CorruptRegionError,
    FabricError,
    FabricFullError,
    FrameTooLargeError,
    NameInUseError,
    NodeReclaimedError,
    RegionCreateError,
    RegionNotFoundError,
    RegionOpenError,
    ReleasedFrameError,
    TapeBusyError,
    TruncatedRegionError,
    UnknownDestinationError,
    VersionMismatchError,
)
from shmfabric.core.native import Buffer, Frame, FrameBatch  # noqa: F401
from shmfabric.core.region import NetworkSpec  # noqa: F401
from shmfabric.fabric.fabric import Fabric, Node  # noqa: F401
