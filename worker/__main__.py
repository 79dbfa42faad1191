"""``python -m worker``: the same as ``relay worker``."""

import sys

from worker.cli import main

sys.exit(main())
