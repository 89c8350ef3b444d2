"""shmfabric.net layer."""
