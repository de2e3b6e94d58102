"""Entry point of the frozen app: the same `mammolab` command the package installs."""

import sys

from core.cli import main

if __name__ == "__main__":
    sys.exit(main())
