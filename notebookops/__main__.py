"""``python -m notebookops``."""

import sys

from notebookops.cli import main

if __name__ == "__main__":
    sys.exit(main())
