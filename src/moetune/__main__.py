"""`python -m moetune` is the `moetune` console script."""

import sys

from moetune.cli import main

sys.exit(main())
