import sys

from steer.cli import main

sys.exit(main())
