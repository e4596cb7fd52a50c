"""Evaluate a trained dual encoder (task clip) or CBMF model outside training.

    mmscale-eval runs/tiny/export --zeroshot cifar10=../shared/data/cifar10 \
        --retrieval coco=../shared/data/coco-mini/annotations/captions_val2017.json

CHECKPOINT_OR_EXPORT is an export folder (model.safetensors + config.yaml), a run folder (its
latest checkpoint), its checkpoints/ folder or one checkpoints/stepN folder. Writes eval.json
(metrics, recall@k curves, the command) and PNGs (training curves from the run's metrics.jsonl,
one retrieval curve per retrieval set) into --out, by default <run>/eval.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from mmscale.files import RunDir, atomic_write_json


def _named(values: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in values or []:
        name, sep, spec = item.partition("=")
        if not sep or not name or not spec:
            raise SystemExit(f"eval: {flag} {item!r}: expected NAME=PATH")
        out[name] = spec
    return out


def load_model(path: str):
    """(model, run dir or None); see mmscale.export.load_model."""
    from mmscale.export import load_model as load
    try:
        return load(path)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"eval: {e}") from None


def plot_training(metrics_file: str, out: str) -> bool:
    """Loss, learning rate and every evaluation metric against the step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    series: dict[str, list[tuple[int, float]]] = {}
    with open(metrics_file) as f:
        for line in f:
            record = json.loads(line)
            if "step" not in record:
                continue
            for key, value in record.items():
                if key in ("loss", "lr") or ("/" in key and isinstance(value, (int, float))):
                    series.setdefault(key, []).append((record["step"], value))
    if not series:
        return False
    # one panel per evaluation kind (zeroshot, retrieval, linear_probe) keeps the legends readable
    kinds = sorted({k.split("/")[0] for k in series if "/" in k})
    panels = [(k, [k]) for k in ("loss", "lr") if k in series]
    panels += [(kind, sorted(k for k in series if k.startswith(kind + "/"))) for kind in kinds]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        ax.set_prop_cycle(color=plt.cm.tab20.colors)
        for key in keys:
            steps, values = zip(*series[key])
            ax.plot(steps, values, marker="o" if len(steps) < 20 else None, label=key.split("/", 1)[-1])
        ax.set_xlabel("step")
        ax.set_title(title)
        if len(keys) > 1:
            ax.legend(fontsize=6, ncol=2)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return True


def plot_retrieval(name: str, curves: dict, out: str) -> None:
    """recall@k against k for both directions (the CBMF Fig. 4 plot)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.8))
    labels = {"i2t": "image -> text", "t2i": "text -> image"}
    for direction, curve in curves.items():
        ax.plot(range(1, len(curve) + 1), curve, marker="o", label=labels.get(direction, direction))
    ax.set_xlabel("k")
    ax.set_ylabel("recall@k")
    ax.set_ylim(0, 1)
    ax.set_title(f"retrieval: {name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mmscale-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="CHECKPOINT_OR_EXPORT",
                   help="an export folder, a run folder (its latest checkpoint), checkpoints/ or checkpoints/stepN")
    p.add_argument("--zeroshot", action="append", metavar="NAME=PATH",
                   help="zero-shot classification set: CIFAR pickles, PATH/test/<class>/*.jpg or PATH/<class>/*.jpg "
                        "(classnames.txt optional); repeatable (default: none)")
    p.add_argument("--retrieval", action="append", metavar="NAME=CAPTIONS_JSON[,IMAGE_DIR]",
                   help="image-text retrieval set from COCO-format captions; repeatable (default: none)")
    p.add_argument("--linear-probe", action="append", metavar="NAME=PATH",
                   help="linear probe: logistic regression on image embeddings, train split -> test split "
                        "(or a held-out share); repeatable (default: none)")
    p.add_argument("--templates", nargs="+", default=["cmla"],
                   help="zero-shot prompt presets (cmla, cifar, openai_imagenet, simple_imagenet) and/or templates "
                        "with {} (default: cmla)")
    p.add_argument("--max-per-class", type=int, default=0, help="cap images per class (default: 0 = all)")
    p.add_argument("--max-images", type=int, default=0, help="cap images per retrieval set (default: 0 = all)")
    p.add_argument("--retrieval-k", type=int, default=10, help="recall@k curve up to this k (default: 10)")
    p.add_argument("--batch-size", type=int, default=256, help="images or captions per forward (default: 256)")
    p.add_argument("--out", help="output folder (default: <run>/eval, or eval/ next to the export)")
    args = p.parse_args(argv)

    datasets = {"zeroshot": _named(args.zeroshot, "--zeroshot"), "retrieval": _named(args.retrieval, "--retrieval"),
                "linear_probe": _named(args.linear_probe, "--linear-probe")}
    if not any(datasets.values()):
        p.error("give at least one of --zeroshot, --retrieval, --linear-probe")

    import torch
    from mmscale.config import image_size
    from mmscale.eval import resolve_templates, run_evaluations
    try:
        resolve_templates(args.templates)
    except ValueError as e:
        raise SystemExit(f"eval: --templates: {e}") from None
    model, run_dir = load_model(args.model)
    size = image_size(model.cfg)
    if size is None:
        raise SystemExit(f"eval: {args.model}: the model has no image tower; zero-shot, retrieval and the "
                         f"linear probe need one")
    out = args.out or os.path.join(run_dir or os.path.dirname(os.path.abspath(args.model)), "eval")
    os.makedirs(out, exist_ok=True)
    try:
        metrics, curves = run_evaluations(
            model, datasets, templates=args.templates, image_size=size,
            device=torch.device("cpu"), dtype=torch.float32, max_per_class=args.max_per_class,
            max_images=args.max_images, retrieval_k=args.retrieval_k, batch_size=args.batch_size)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"eval: {e}") from None

    plots = []
    for key, c in curves.items():
        file = os.path.join(out, f"{key.replace('/', '_')}.png")
        plot_retrieval(key.split("/", 1)[1], c, file)
        plots.append(file)
    if run_dir and os.path.isfile(RunDir(run_dir).metrics):
        file = os.path.join(out, "training_curves.png")
        if plot_training(RunDir(run_dir).metrics, file):
            plots.append(file)
    report = {"model": os.path.abspath(args.model), "command": " ".join(sys.argv), "metrics": metrics,
              "curves": curves, "plots": plots}
    atomic_write_json(os.path.join(out, "eval.json"), report)
    print(json.dumps(metrics, indent=2))
    print(f"wrote {os.path.join(out, 'eval.json')} and {len(plots)} plot(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
