"""`python -m anfast.train`: the train command without the rest of the CLI."""

import sys

from anfast.train.cli import main

sys.exit(main())
