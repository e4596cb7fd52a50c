#!/usr/bin/env python
"""A trained model's contrastive loss on COCO-MINI's training pairs as one batch (each photo five
times, once with each of its captions), with one positive per row (loss.positives: index) and
with the rows of one photo as each other's positives (image): InfoNCE at the model's temperature,
and SigLIP at its scale and bias when it has one; and the mean cosine of a photo with its five
captions and with the other photos' captions. Images at the evaluation transform (a photo's five
rows are then one vector). For docs/RESULTS.md.

    python tools/positives_coco.py runs/coco_infonce_image/export runs/coco_infonce_index/export
"""
import argparse
import os

import torch

from mmscale.config import DataConfig, image_size
from mmscale.data.images import load_splits
from mmscale.eval.evaluators import embed_images, embed_texts
from mmscale.export import load_run_model
from mmscale.losses import contrastive_loss, siglip_loss

COCO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "coco-mini")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="exports, run folders or checkpoints (what mmscale-eval reads)")
    p.add_argument("--coco", default=COCO, help="the COCO-MINI folder (default: ../shared/data/coco-mini)")
    a = p.parse_args(argv)
    samples = load_splits(DataConfig(type="coco", root=os.path.join(a.coco, "train2017"),
                                     captions=os.path.join(a.coco, "annotations", "captions_train2017.json"))).train
    keys = torch.tensor([s.image_id for s in samples])
    print(f"{len(samples)} pairs, {len(set(keys.tolist()))} photos; loss with positives index -> image")
    for path in a.models:
        model, cfg, _ = load_run_model(path)
        with torch.no_grad():
            image = embed_images(model, samples, image_size(cfg.model), "cpu", torch.float32)
            text = embed_texts(model, [s.caption for s in samples], "cpu")
            scale = model.logit_scale().float()
            line = [f"infonce {contrastive_loss(image, text, scale).item():.4f} -> "
                    f"{contrastive_loss(image, text, scale, keys=keys).item():.4f}"]
            if model.logit_bias is not None:
                bias = model.logit_bias().float()
                line.append(f"siglip {siglip_loss(image, text, scale, bias).item():.4f} -> "
                            f"{siglip_loss(image, text, scale, bias, keys=keys).item():.4f}")
            cos, same = image @ text.T, keys[:, None] == keys[None, :]
            line.append(f"cosine with its captions {cos[same].mean():.3f}, with others' {cos[~same].mean():.3f}")
        print(f"{path}: temperature {1 / scale.item():.4f}; " + "; ".join(line))


if __name__ == "__main__":
    main()
