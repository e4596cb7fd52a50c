#!/usr/bin/env python
"""`python tools/build_shards.py ...` is `mmscale-build-shards ...`: see mmscale/cli/build_shards.py or `mmscale-build-shards --help`."""
import sys

from mmscale.cli.build_shards import main

if __name__ == "__main__":
    sys.exit(main())
