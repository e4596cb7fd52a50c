"""Run recipes over several seeds and tabulate mean +- std of their test metrics under three
model-selection protocols, each labelled as such.

    mmscale-sweep recipes/m3col_rosmap.yaml recipes/unis_mmc_rosmap.yaml --seeds 0 1 2 3 4 \\
        --logreg ../shared/data/rosmap --out runs/rosmap_sweep

Each (recipe, seed) trains with `python -m mmscale.train RECIPE train.seed=S data.seed=S` into
OUT/<recipe>/seed<S> (a finished run is not run again; checkpoints are deleted afterwards unless
--keep-checkpoints). From each run's evaluations (metrics.jsonl, every train.eval_every steps):

- final: the model after the last step (results.json; with train.early_stopping, the best
  evaluation by its metric, which the run itself chose on validation data);
- validation-selected: the evaluation with the best --select metric on the validation split
  (data.val_fraction > 0; ties go to the lower val/loss, then the earlier step) - honest, the test
  labels play no part; with --epochs-from DIR, the step is chosen on DIR's runs of the same recipe
  and seed (e.g. trained with a validation split) and read off this run's evaluations (e.g. trained
  on all the training rows): "validation-selected epoch, refit";
- test-selected: the evaluation with the highest test accuracy, the papers' protocol (M3CoL's
  code evaluates on the test split every 10 epochs, without a validation split, and reports the
  best). It picks an epoch by looking at the test labels, so it is optimistic by construction.

--logreg ROOT adds logistic regression on the concatenated MOGONET views of ROOT (C chosen on a
20% split of the training rows, the split seeded; features scaled as --logreg-normalize), the
same under every protocol. Writes OUT/summary.json and OUT/summary.md.
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

from mmscale.files import RunDir

PROTOCOLS = {"final": "final epoch", "val": "validation-selected (honest)", "test": "test-selected (papers' protocol)"}
SHORT = {"final": "final", "val": "val-selected", "test": "test-selected"}


def train_run(recipe: str, seed: int, run_dir: str, overrides: list[str], keep_checkpoints: bool) -> None:
    """Train (recipe, seed) into run_dir unless it has finished there already."""
    if os.path.isfile(RunDir(run_dir).results):
        return
    cmd = [sys.executable, "-m", "mmscale.train", recipe, f"train.seed={seed}", f"data.seed={seed}",
           f"train.run_dir={run_dir}", *overrides]
    tic = time.time()
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "stdout.log"), "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        tail = open(os.path.join(run_dir, "stdout.log")).read()[-3000:]
        raise SystemExit(f"sweep: {' '.join(cmd)} failed ({proc.returncode}):\n{tail}")
    with open(os.path.join(run_dir, "wall_seconds"), "w") as f:
        f.write(f"{time.time() - tic:.1f}\n")
    if not keep_checkpoints:
        shutil.rmtree(RunDir(run_dir).checkpoints, ignore_errors=True)


def evaluations(run_dir: str) -> list[dict]:
    """The run's evaluation records (those with test metrics), in step order."""
    with open(RunDir(run_dir).metrics) as f:
        return [r for r in map(json.loads, f) if "test/acc" in r]


def select_validation(evals: list[dict], metric: str = "val/acc", mode: str = "max") -> dict | None:
    """The evaluation with the best validation metric; ties: the lower val/loss, then the earlier
    step. None when the run has no validation metrics."""
    cands = [r for r in evals if metric in r]
    if not cands:
        return None
    sign = -1 if mode == "max" else 1
    return min(cands, key=lambda r: (sign * r[metric], r.get("val/loss", 0.0), r["step"]))


def select_test(evals: list[dict]) -> dict:
    """The evaluation with the highest test accuracy (the earliest of equals)."""
    return min(evals, key=lambda r: (-r["test/acc"], r["step"]))


def protocols(run_dir: str, select: str, mode: str, epochs_from: str | None) -> dict:
    """{protocol: metrics of the evaluation it picks, with its step} for one finished run."""
    with open(RunDir(run_dir).results) as f:
        final = json.load(f)
    evals = evaluations(run_dir)
    out = {"final": final}
    if evals:  # runs without test/acc (image-text models) have the final protocol only
        out["test"] = select_test(evals)
    if epochs_from:
        chosen = select_validation(evaluations(epochs_from), select, mode)
        if chosen is None:
            raise SystemExit(f"sweep: {epochs_from} has no {select} to choose an epoch with")
        by_step = {r["step"]: r for r in evals}
        if chosen["step"] not in by_step:
            raise SystemExit(f"sweep: {run_dir} has no evaluation at step {chosen['step']} (chosen on {epochs_from})")
        out["val"] = by_step[chosen["step"]]
    else:
        val = select_validation(evals, select, mode)
        if val is not None:
            out["val"] = val
    wall = os.path.join(run_dir, "wall_seconds")
    out["wall_seconds"] = float(open(wall).read()) if os.path.isfile(wall) else float("nan")
    return out


def logreg_runs(root: str, seeds: list[int], normalize: str = "none") -> list[dict]:
    from mmscale.eval import classification_metrics, fit_logistic

    def views(split):
        files = sorted(f for f in os.listdir(root) if f.endswith(f"_{split}.csv") and f[0].isdigit())
        return [np.loadtxt(os.path.join(root, f), delimiter=",", ndmin=2) for f in files]
    x_tr, x_te = views("tr"), views("te")
    if normalize == "minmax":  # per feature, the training rows' statistics (as data.normalize=minmax)
        lo = [x.min(0) for x in x_tr]
        span = [x.max(0) - x.min(0) + 1e-10 for x in x_tr]
        x_tr = [(x - a) / b for x, a, b in zip(x_tr, lo, span)]
        x_te = [(x - a) / b for x, a, b in zip(x_te, lo, span)]
    x_tr, x_te = np.hstack(x_tr), np.hstack(x_te)
    y_tr = np.loadtxt(os.path.join(root, "labels_tr.csv")).astype(int)
    y_te = np.loadtxt(os.path.join(root, "labels_te.csv")).astype(int)
    out = []
    for seed in seeds:
        clf, c = fit_logistic(x_tr, y_tr, seed=seed)
        metrics = {f"test/{k}": v for k, v in classification_metrics(y_te, clf.predict_proba(x_te)).items()} | {"C": c}
        out.append({"final": metrics, "val": metrics, "test": metrics, "wall_seconds": float("nan")})
    return out


def mean_std(values: list[float]) -> str:
    """Mean +- the sample standard deviation (n - 1) over seeds, in %."""
    if not values:
        return "-"
    std = np.std(values, ddof=1) if len(values) > 1 else 0.0
    return f"{100 * np.mean(values):.1f} +- {100 * std:.1f}"


def table(results: dict, metrics: list[str]) -> str:
    """One markdown table: a row per method, ACC/F1/AUC (mean +- std over seeds, in %) under each
    protocol the runs have, the mean selected step and the mean wall time."""
    names = [m[len("test/"):].upper() if m.startswith("test/") else m for m in metrics]
    header = ["method"]
    shown = [p for p in PROTOCOLS if any(p in r for runs in results.values() for r in runs)]
    for p in shown:
        header += [f"{n} {SHORT[p]}" for n in names]
    header += ["step final / val / test", "s/run"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for name, runs in results.items():
        row = [name]
        for p in shown:
            row += [mean_std([r[p][m] for r in runs if p in r and m in r[p]]) for m in metrics]
        # with early stopping, results.json's best_step is the evaluation it holds
        steps = [f"{np.mean([r[p].get('best_step', r[p].get('step')) for r in runs]):.0f}"
                 if all(p in r and "step" in r[p] for r in runs) else "-" for p in ("final", "val", "test")]
        wall = np.nanmean([r["wall_seconds"] for r in runs]) if any(np.isfinite(r["wall_seconds"]) for r in runs) \
            else float("nan")
        row += [" / ".join(steps), "-" if not np.isfinite(wall) else f"{wall:.0f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="mmscale-sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipes", nargs="*", help="recipe files; each becomes a row named after the file (default: none, e.g. only --logreg)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="seeds (default: 0 1 2 3 4)")
    p.add_argument("--out", default=os.path.join("runs", "sweep"),
                   help="folder for the runs and summary.{json,md} (default: runs/sweep)")
    p.add_argument("--override", action="append", default=[], help="key.sub=value for every run; repeatable (default: none)")
    p.add_argument("--metrics", nargs="+", default=["test/acc", "test/f1", "test/auc"],
                   help="evaluation keys to tabulate (default: test/acc test/f1 test/auc)")
    p.add_argument("--select", default="val/acc", help="validation metric that picks the epoch (default: val/acc)")
    p.add_argument("--select-mode", choices=["max", "min"], default="max",
                   help="max: a higher --select metric is better, min: a lower one (default: max)")
    p.add_argument("--epochs-from", help="a sweep folder whose runs (same recipes and seeds) choose the epoch "
                                         "by --select; this sweep's runs are read at that step (default: none, each run chooses on its own "
                                         "validation split)")
    p.add_argument("--logreg", help="MOGONET folder: add logistic regression on the concatenated views (default: none)")
    p.add_argument("--logreg-normalize", choices=["none", "minmax"], nargs="+", default=["none"],
                   help="feature scaling(s) for --logreg, a row each (default: none)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep each run's checkpoints/ (default: deleted)")
    args = p.parse_args(argv)

    results = {}
    for recipe in args.recipes:
        name = os.path.splitext(os.path.basename(recipe))[0]
        runs = []
        for s in args.seeds:
            run_dir = os.path.join(args.out, name, f"seed{s}")
            train_run(recipe, s, run_dir, args.override, args.keep_checkpoints)
            source = os.path.join(args.epochs_from, name, f"seed{s}") if args.epochs_from else None
            runs.append(protocols(run_dir, args.select, args.select_mode, source))
        results[name] = runs
        first = args.metrics[0]
        print(f"{name}: " + ", ".join(f"{PROTOCOLS[k]} {first} {mean_std([r[k][first] for r in runs if first in r.get(k, {})])}"
                                      for k in PROTOCOLS), flush=True)
    for norm in args.logreg_normalize if args.logreg else []:
        name = "logistic_regression" + ("" if norm == "none" else f"_{norm}")
        results[name] = logreg_runs(args.logreg, args.seeds, norm)

    md = table(results, args.metrics)
    print(md)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump({"seeds": args.seeds, "command": " ".join(sys.argv), "protocols": PROTOCOLS, "runs": results},
                  f, indent=2)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
