"""shmfabric.core layer."""
