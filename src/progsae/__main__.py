"""`python -m progsae`: the `progsae` command (and what torchrun launches: `torchrun ... -m progsae train ...`)."""

import sys

from .cli import main

sys.exit(main())
