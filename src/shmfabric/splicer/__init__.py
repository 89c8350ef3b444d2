"""shmfabric.splicer layer."""
