"""``python -m relay.publisher --config providers.yaml``."""

import sys

from .cli import main

sys.exit(main())
