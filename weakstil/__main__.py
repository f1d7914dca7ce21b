"""``python -m weakstil`` = the ``weakstil`` command."""

from weakstil.cli import main

if __name__ == "__main__":
    main()
