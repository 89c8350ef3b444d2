"""shmfabric: network functions as processes coupled by a shared-memory fabric."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # The fabric API is imported lazily so that `import shmfabric.splicer` does not need the
    # compiled core.
    if name in {"Fabric", "Node", "Frame", "FrameBatch", "Buffer", "NetworkSpec"}:
        from shmfabric import fabric

        return getattr(fabric, name)
    raise AttributeError(name)
