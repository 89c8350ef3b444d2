"""shmfabric.fabric layer."""
