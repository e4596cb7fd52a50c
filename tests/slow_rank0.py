"""mmscale-train with rank 0's host work slowed by MMSCALE_TEST_SLOW_S seconds each: the universal
checkpoint conversion and the linear probe's fit, the two jobs only rank 0 does while the other
ranks wait. test_engine launches it in place of mmscale/train.py."""
import os
import sys
import time

from mmscale.engine import checkpoint
from mmscale.eval import evaluators
from mmscale.train import main

SECONDS = float(os.environ["MMSCALE_TEST_SLOW_S"])


def slowed(fn):
    def slow(*args, **kwargs):
        time.sleep(SECONDS)
        return fn(*args, **kwargs)
    return slow


checkpoint.to_universal = slowed(checkpoint.to_universal)
evaluators.logistic_probe = slowed(evaluators.logistic_probe)

if __name__ == "__main__":
    sys.exit(main())
