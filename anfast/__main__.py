"""``python -m anfast``: the anfast command."""

import sys

from anfast.cli import main

sys.exit(main())
