#!/usr/bin/env python
"""`python tools/sweep.py ...` is `mmscale-sweep ...`: see mmscale/cli/sweep.py or `mmscale-sweep --help`."""
import sys

from mmscale.cli.sweep import main

if __name__ == "__main__":
    sys.exit(main())
