"""``python -m omuscd`` is the same program as the ``omuscd`` console script."""

import sys

from omuscd.cli import main

sys.exit(main())
