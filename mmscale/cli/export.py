"""Write a trained model in another format.

    mmscale-export runs/cmla OUT --format open_clip
    python -c "import open_clip; open_clip.create_model_and_transforms('local-dir:OUT')"

RUN_OR_EXPORT is an export folder (model.safetensors + config.yaml), a run folder (its latest
checkpoint), its checkpoints/ folder or one checkpoints/stepN folder.

--format open_clip: open_clip_config.json, open_clip_model.safetensors and, for an HF text tower,
its config and tokenizer: a folder open_clip and CLIP_benchmark open as local-dir:OUT. Two model
forms have one: open_clip towers without heads (model.heads.enabled=false), and a timm image
tower + an HF text tower with model.heads.style=open_clip heads (or none). Anything else is one
line saying what open_clip cannot express, exit 2.
--format mmscale: an mmscale export (what mmscale-eval and load_export read), e.g. of a checkpoint.
"""
from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mmscale-export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="RUN_OR_EXPORT",
                   help="an export folder, a run folder (its latest checkpoint), checkpoints/ or checkpoints/stepN")
    p.add_argument("out", metavar="OUT", help="the folder to write (created; files in it are replaced)")
    p.add_argument("--format", choices=["open_clip", "mmscale"], default="open_clip",
                   help="open_clip: a local-dir: folder for open_clip; mmscale: an mmscale export (default: open_clip)")
    args = p.parse_args(argv)

    from mmscale.config import ConfigError
    from mmscale.export import load_run_model, save_export
    from mmscale.export.openclip import save_open_clip
    try:
        model, cfg, _ = load_run_model(args.model)
        if args.format == "open_clip":
            if cfg.task != "clip":
                raise ConfigError(f"--format open_clip: open_clip holds a CLIP (task clip); this model's task is "
                                  f"{cfg.task}")
            save_open_clip(model, args.out)
        else:
            save_export(model, cfg, args.out)
    except ConfigError as e:
        print(f"mmscale-export: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as e:
        print(f"mmscale-export: {e}", file=sys.stderr)
        return 1
    print(f"wrote {os.path.abspath(args.out)}" + (f" (open_clip: local-dir:{os.path.abspath(args.out)})"
                                                  if args.format == "open_clip" else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
