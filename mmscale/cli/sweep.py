"""Run recipes over several seeds and tabulate mean +- std of their test metrics.

    mmscale-sweep recipes/m3col_rosmap.yaml recipes/unis_mmc_rosmap.yaml --seeds 0 1 2 3 4 \\
        --logreg ../shared/data/rosmap --out runs/rosmap_sweep

Each (recipe, seed) trains with `python -m mmscale.train RECIPE train.seed=S data.seed=S` into
OUT/<recipe>/seed<S> (a finished run is not run again; checkpoints are deleted afterwards unless
--keep-checkpoints). The table reports the final evaluation (results.json), which involves no
choice made on the test split. Next to it, for reference only, the best test accuracy over the
run's periodic evaluations: that picks an epoch by looking at the test labels and is optimistic.
--logreg ROOT adds logistic regression on the concatenated MOGONET views of ROOT (C chosen on a
20% split of the training rows, the split seeded). Writes OUT/summary.json and OUT/summary.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np


def run_one(recipe: str, seed: int, run_dir: str, overrides: list[str], keep_checkpoints: bool) -> dict:
    results = os.path.join(run_dir, "results.json")
    if not os.path.isfile(results):
        cmd = [sys.executable, "-m", "mmscale.train", recipe, f"train.seed={seed}", f"data.seed={seed}",
               f"train.run_dir={run_dir}", *overrides]
        tic = time.time()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"sweep: {' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}")
        with open(os.path.join(run_dir, "wall_seconds"), "w") as f:
            f.write(f"{time.time() - tic:.1f}\n")
        if not keep_checkpoints:
            shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)
    with open(results) as f:
        out = json.load(f)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        evals = [r for r in map(json.loads, f) if "test/acc" in r]
    best = max(evals, key=lambda r: r["test/acc"])
    out["best_eval_test/acc"], out["best_eval_step"] = best["test/acc"], best["step"]
    wall = os.path.join(run_dir, "wall_seconds")
    out["wall_seconds"] = float(open(wall).read()) if os.path.isfile(wall) else float("nan")
    return out


def logreg_runs(root: str, seeds: list[int]) -> list[dict]:
    from mmscale.eval import classification_metrics, fit_logistic

    def views(split):
        files = sorted(f for f in os.listdir(root) if f.endswith(f"_{split}.csv") and f[0].isdigit())
        return np.hstack([np.loadtxt(os.path.join(root, f), delimiter=",", ndmin=2) for f in files])
    x_tr, x_te = views("tr"), views("te")
    y_tr = np.loadtxt(os.path.join(root, "labels_tr.csv")).astype(int)
    y_te = np.loadtxt(os.path.join(root, "labels_te.csv")).astype(int)
    out = []
    for seed in seeds:
        clf, c = fit_logistic(x_tr, y_tr, seed=seed)
        out.append({f"test/{k}": v for k, v in classification_metrics(y_te, clf.predict_proba(x_te)).items()} | {"C": c})
    return out


def mean_std(runs: list[dict], key: str) -> str:
    values = [r[key] for r in runs if key in r]
    if not values:
        return "-"
    return f"{100 * np.mean(values):.1f} +- {100 * np.std(values):.1f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="mmscale-sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipes", nargs="*", help="recipe files; each becomes a row named after the file")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="seeds (default: 0 1 2 3 4)")
    p.add_argument("--out", default=os.path.join("runs", "sweep"),
                   help="folder for the runs and summary.{json,md} (default: runs/sweep)")
    p.add_argument("--override", action="append", default=[], help="key.sub=value for every run (repeatable)")
    p.add_argument("--metrics", nargs="+", default=["test/acc", "test/f1", "test/auc"],
                   help="results.json keys to tabulate (default: test/acc test/f1 test/auc)")
    p.add_argument("--logreg", help="MOGONET folder: add logistic regression on the concatenated views")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep each run's checkpoints/ (default: deleted)")
    args = p.parse_args(argv)

    table = {}
    for recipe in args.recipes:
        name = os.path.splitext(os.path.basename(recipe))[0]
        table[name] = [run_one(recipe, s, os.path.join(args.out, name, f"seed{s}"), args.override,
                               args.keep_checkpoints) for s in args.seeds]
        print(f"{name}: " + ", ".join(f"{m} {mean_std(table[name], m)}" for m in args.metrics), flush=True)
    if args.logreg:
        table["logistic_regression"] = logreg_runs(args.logreg, args.seeds)

    header = ["method"] + [m.split("/")[-1].upper() for m in args.metrics] + ["best-eval ACC (test-selected)", "s/run"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for name, runs in table.items():
        wall = np.mean([r["wall_seconds"] for r in runs]) if "wall_seconds" in runs[0] else float("nan")
        lines.append("| " + " | ".join([name] + [mean_std(runs, m) for m in args.metrics]
                                       + [mean_std(runs, "best_eval_test/acc"), f"{wall:.0f}"]) + " |")
    md = "\n".join(lines)
    print(md)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump({"seeds": args.seeds, "command": " ".join(sys.argv), "runs": table}, f, indent=2)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
