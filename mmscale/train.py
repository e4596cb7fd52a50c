"""Train a recipe: `deepspeed mmscale/train.py RECIPE [key.sub=value ...]`.

Runs under the deepspeed launcher, torchrun, srun or plain python (one process); also installed
as `mmscale-train`. The recipe's task (clip, classify, cbmf) decides what is trained; the run
folder (train.run_dir) gets config.yaml, metrics.jsonl, checkpoints/, export/ and results.json.
Rerunning the same command resumes from checkpoints/latest. Exit codes: 0 done, 2 bad recipe
(one line naming the key), 75 stopped by SIGTERM/SIGUSR1 at a checkpoint (rerun to continue).
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmscale-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="YAML recipe, e.g. recipes/cmla.yaml (schema: mmscale/config.py)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100 optim.lr=3e-4 (default: none, the recipe as written)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help="this process's rank on its node; set by the deepspeed launcher (default: none, then LOCAL_RANK from the environment)")
    args = parser.parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))

    from mmscale.config import ConfigError, load_config
    try:
        cfg = load_config(args.recipe, args.overrides)
        from mmscale.engine import Trainer
        from mmscale.tasks import build_task
        trainer = Trainer(cfg, build_task(cfg))
    except ConfigError as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"mmscale: config error: {e}", file=sys.stderr)
        return 2
    results = trainer.fit()
    if trainer.rank == 0:
        print(json.dumps(results))
    if results.get("preempted"):
        from mmscale.engine import PREEMPTED_EXIT
        return PREEMPTED_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(main())
