"""Train a recipe: `deepspeed mmscale/train.py RECIPE [key.sub=value ...]`.

Runs under the deepspeed launcher, torchrun, srun or plain python (one process); also installed
as `mmscale-train`. The recipe's task (clip, classify, cbmf) decides what is trained; the run
folder (train.run_dir) gets config.yaml, metrics.jsonl, checkpoints/, export/ and results.json.
Rerunning the same command resumes from checkpoints/latest, on any number of ranks. Exit codes:
0 done; 1 training failed (e.g. train.max_nonfinite_steps non-finite steps in a row); 2 bad recipe
(one line naming the key); 69 another rank died or hung for train.dist_timeout_s (nothing saved);
74 a checkpoint could not be written (no partial folder is left, checkpoints/latest is the last
complete one; train.on_checkpoint_error=continue trains on instead); 75 stopped by SIGTERM/SIGUSR1
at a checkpoint. No intact checkpoint to resume from is exit 2 (the line says how to start
over). After 1, 69, 74 or 75, rerun to continue.

`mmscale-train --explain [KEY]` lists the recipe keys (type, default, range, help; docs/CONFIG.md
has the same tables), or only KEY and what is under it (e.g. model.image.patch_dropout, optim);
model and loss keys are listed per task (--task, or a RECIPE's task, shows one).
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmscale-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", nargs="?", help="YAML recipe, e.g. recipes/cmla.yaml (keys: docs/CONFIG.md, --explain); required to train (default: none; --explain needs none)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100 optim.lr=3e-4 (default: none, the recipe as written)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help="this process's rank on its node; set by the deepspeed launcher (default: none, then LOCAL_RANK from the environment)")
    parser.add_argument("--explain", nargs="?", const="", metavar="KEY", help="print every recipe key, or KEY and the keys under it, with type, default, range and help, and exit (default: off, train)")
    parser.add_argument("--task", choices=["clip", "classify", "cbmf"], help="with --explain: only this task's model and loss keys (default: the recipe's task with a recipe, else every task's)")
    args = parser.parse_args(argv)
    if args.explain is not None:
        return explain(args)
    if args.recipe is None:
        parser.error("the following arguments are required: recipe")
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))

    from mmscale.config import ConfigError, load_config

    def error(kind: str, e: Exception, code: int) -> int:
        if os.environ.get("RANK", "0") == "0":  # one line, once
            print(f"mmscale: {kind}: {e}", file=sys.stderr)
        return code

    try:
        cfg = load_config(args.recipe, args.overrides)
    except ConfigError as e:  # before anything heavy is imported: a bad recipe fails in a second
        return error("config error", e, 2)
    from mmscale.engine import PREEMPTED_EXIT, CheckpointError, Trainer, TrainingError
    from mmscale.tasks import build_task
    try:
        trainer = Trainer(cfg, build_task(cfg))
        results = trainer.fit()
    except ConfigError as e:  # what only the data or the world size reveal
        return error("config error", e, 2)
    except CheckpointError as e:
        return error("checkpoint error", e, e.exit_code)
    except TrainingError as e:
        return error("error", e, 1)
    if trainer.rank == 0:
        print(json.dumps(results))
    if results.get("preempted"):
        return PREEMPTED_EXIT
    return 0


def explain(args) -> int:
    """--explain: the keys asked for, for the task asked for; an unknown key is one line, exit 2."""
    from mmscale.config import ConfigError, parse_overrides, read_recipe
    from mmscale.config.doc import explain as explain_keys
    try:
        task = args.task
        if task is None and args.recipe:
            task = dict(parse_overrides(args.overrides)).get("task", read_recipe(args.recipe).get("task", "clip"))
        text = explain_keys(args.explain or None, task)
    except ConfigError as e:
        print(f"mmscale: config error: {e}", file=sys.stderr)
        return 2
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
