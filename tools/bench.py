#!/usr/bin/env python
"""`python tools/bench.py ...` is `mmscale-bench ...`: see mmscale/cli/bench/ or `mmscale-bench --help`."""
import sys

from mmscale.cli.bench import main

if __name__ == "__main__":
    sys.exit(main())
