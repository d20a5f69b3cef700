"""`python -m localhub ...`."""

import sys

from localhub.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
