"""``python -m magjax.refcheck``: see :mod:`magjax.refcheck`."""

import sys

from magjax.refcheck import main

sys.exit(main())
