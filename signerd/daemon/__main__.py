"""``python -m signerd.daemon``: the ``signerd`` console script (worker processes start so)."""

import sys

from signerd.daemon._main import main

sys.exit(main())
