#!/usr/bin/env python
"""`python tools/curate.py ...` is `mmscale-curate ...`: see mmscale/cli/curate.py or `mmscale-curate --help`."""
import sys

from mmscale.cli.curate import main

if __name__ == "__main__":
    sys.exit(main())
