"""shmfabric.manager layer."""
