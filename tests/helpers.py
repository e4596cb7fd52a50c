"""Helpers the test modules share (no test module imports another)."""
import os

import torch

# open_clip towers at test size, as recipe overrides (a model_cfg instead of a named model)
OPEN_CLIP_TINY = ("{model_cfg: {embed_dim: 32, vision_cfg: {image_size: 32, layers: 1, width: 64, head_width: 32, "
                  "patch_size: 8}, text_cfg: {context_length: 16, vocab_size: 49408, width: 64, heads: 2, layers: 1}}}")
OPEN_CLIP_TOWERS = ["model.image.source=open_clip", "model.image.name=tiny", f"model.image.kwargs={OPEN_CLIP_TINY}",
                    "model.text.source=open_clip", "model.text.name=tiny", f"model.text.config_overrides={OPEN_CLIP_TINY}"]


def fp32_master(run_dir, tag, stage, name="logit_scale.log_value"):
    """A parameter's float32 master copy in a checkpoint: under ZeRO 1-3 the consolidated
    partitions; bf16 under ZeRO 0 keeps its own fp32 copies (FP16_UnfusedOptimizer's fp32_groups)
    in the order of the model's trainable parameters."""
    from mmscale.export import checkpoint_state_dict, load_model
    if stage:
        return checkpoint_state_dict(os.path.join(run_dir, "checkpoints"), tag, stage)[name]
    sd = torch.load(os.path.join(run_dir, "checkpoints", tag, "mp_rank_00_model_states.pt"), map_location="cpu",
                    weights_only=False)
    names = [n for n, p in load_model(run_dir)[0].named_parameters() if p.requires_grad]
    assert len(names) == len(sd["optimizer"]["fp32_groups"][0])
    return sd["optimizer"]["fp32_groups"][0][names.index(name)]
