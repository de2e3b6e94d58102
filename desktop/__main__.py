"""``python -m desktop [PATH] [--model DIR] [--screenshot OUT.png]``: the same as ``mammolab``."""

import sys

from desktop.app import main

sys.exit(main())
