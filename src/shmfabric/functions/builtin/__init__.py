"""The built-in network functions (registered in shmfabric.functions.registry and pyproject)."""
