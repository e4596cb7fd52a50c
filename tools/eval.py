#!/usr/bin/env python
"""`python tools/eval.py ...` is `mmscale-eval ...`: see mmscale/cli/eval.py or `mmscale-eval --help`."""
import sys

from mmscale.cli.eval import main

if __name__ == "__main__":
    sys.exit(main())
