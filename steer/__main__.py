"""``python -m steer``: the same as the ``steer`` command."""

import sys

from steer.cli import main

sys.exit(main())
