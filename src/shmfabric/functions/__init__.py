"""shmfabric.functions layer."""
