"""``python -m minions ...``: the same command as the ``minions`` console script."""

import sys

from minions.cli import main

if __name__ == "__main__":
    sys.exit(main())
