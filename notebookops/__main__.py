"""``python -m notebookops``."""

import sys

from notebookops.cli import console

if __name__ == "__main__":
    sys.exit(console())
