"""``python -m signerd.cli``: the ``signerctl`` console script."""

import sys

from signerd.cli.signerctl import main

sys.exit(main())
