#!/usr/bin/env python
"""`python tools/export.py ...` is `mmscale-export ...`: see mmscale/cli/export.py or `mmscale-export --help`."""
import sys

from mmscale.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
