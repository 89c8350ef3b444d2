"""shmfabric.cli layer."""
