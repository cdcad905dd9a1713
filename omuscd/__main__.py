"""``python -m omuscd`` is the same program as the ``omuscd`` console script."""

import sys

from omuscd.entry import main

sys.exit(main())
