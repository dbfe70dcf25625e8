"""``python -m clipkit ...``: the same as the ``clipkit`` command."""

import sys

from clipkit.cli import main

sys.exit(main())
