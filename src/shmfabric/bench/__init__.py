"""shmfabric.bench layer."""
