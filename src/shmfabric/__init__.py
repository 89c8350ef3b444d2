"""shmfabric: network functions as processes coupled by a shared-memory fabric."""

__version__ = "0.1.0"
