import sys

from mergebot.cli import main

sys.exit(main())
