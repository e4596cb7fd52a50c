#!/usr/bin/env python
"""`python tools/bench_loader.py ...` is `mmscale-bench-loader ...`: see mmscale/cli/bench_loader.py or `mmscale-bench-loader --help`."""
import sys

from mmscale.cli.bench_loader import main

if __name__ == "__main__":
    sys.exit(main())
