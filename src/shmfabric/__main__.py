"""`python -m shmfabric` is the `shmfabric` command."""
import sys

from shmfabric.cli.main import main

sys.exit(main())
