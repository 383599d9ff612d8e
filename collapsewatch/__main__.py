"""``python -m collapsewatch``: the command line."""

import sys

from collapsewatch.cli import main

sys.exit(main())
