"""`python -m mmscale.cli.bench ...` (and `torchrun ... -m mmscale.cli.bench ...`) is `mmscale-bench ...`."""
import sys

from .measure import main

sys.exit(main())
