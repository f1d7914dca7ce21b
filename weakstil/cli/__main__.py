"""``python -m weakstil.cli`` = the ``weakstil`` command."""

import sys

from weakstil.cli import main

if __name__ == "__main__":
    sys.exit(main())
