"""``python -m rlrestore ...``: the same command line as the ``rlrestore`` console script."""

import sys

from rlrestore.orchestration.cli import main

sys.exit(main())
