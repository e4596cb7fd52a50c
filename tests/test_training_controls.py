"""The training controls CLIP users expect (issue 22): parameter groups (open_clip's weight-decay rule,
layer-wise LR decay, LR multipliers), patch dropout, activation checkpointing."""
import math

import pytest
import torch

from mmscale.config import ConfigError, load_config
from mmscale.engine.param_groups import excluded_from_decay, lr_scales, parameter_groups
from mmscale.models.towers import layer_ids
from mmscale.models import build_model

from conftest import ROOT
from helpers import OPEN_CLIP_TOWERS


def open_clip_rule(model):
    """open_clip_train/main.py (open_clip 3.3.0): parameters matching `exclude` get no weight decay:
    p.ndim < 2 or "bn" / "ln" / "bias" / "logit_scale" in the name."""
    return {n for n, p in model.named_parameters()
            if p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n}


def tiny(*overrides):
    return load_config(f"{ROOT}/recipes/tiny.yaml", list(overrides))


def test_decay_exclusions_equal_open_clips_rule_on_an_open_clip_model():
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-S-32-alt")  # a real open_clip CLIP: conv1, ln_pre, resblocks, logit_scale
    want = open_clip_rule(model)
    assert excluded_from_decay(model) == want
    assert "logit_scale" in want and "visual.ln_pre.weight" in want and "visual.conv1.weight" not in want


@pytest.mark.parametrize("towers", ["timm+hf", "open_clip"])
def test_decay_exclusions_equal_open_clips_rule_on_mmscale_models(towers):
    over = ["model.learn_temperature=true"] + (OPEN_CLIP_TOWERS if towers == "open_clip" else [])
    model = build_model(tiny(*over))
    excluded = excluded_from_decay(model)
    assert excluded == open_clip_rule(model)
    assert "logit_scale.log_value" in excluded
    groups = parameter_groups(model, tiny("optim.weight_decay=0.2").optim)
    by_id = {id(p): g for g in groups for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    # every trainable parameter in exactly one group, decayed unless the rule excludes it
    assert sorted(names[i] for i in by_id) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in groups) == len(by_id)
    for i, g in by_id.items():
        assert g["weight_decay"] == (0.0 if names[i] in excluded else 0.2), names[i]
    off = parameter_groups(model, tiny("optim.weight_decay=0.2", "optim.decay_exclusions=false").optim)
    assert [g["weight_decay"] for g in off] == [0.2]


def test_layer_decay_scales_each_block_of_the_vit_and_the_bert_tower():
    d = 0.5
    model = build_model(tiny())  # ViT of 3 blocks, BERT of 2 layers
    scales = lr_scales(model, tiny(f"optim.layer_decay={d}").optim)
    # ViT: cls/pos embeddings and the patch embedding are layer 0 -> d^4; block i -> d^(3 - i); final norm -> 1
    assert scales["image_tower.model.pos_embed"] == d ** 4 and scales["image_tower.model.patch_embed.proj.weight"] == d ** 4
    for i in range(3):
        assert scales[f"image_tower.model.blocks.{i}.attn.qkv.weight"] == d ** (3 - i)
    assert scales["image_tower.model.norm.weight"] == 1.0
    # BERT: embeddings d^3, encoder.layer.i -> d^(2 - i)
    assert scales["text_tower.model.embeddings.word_embeddings.weight"] == d ** 3
    for i in range(2):
        assert scales[f"text_tower.model.encoder.layer.{i}.attention.self.query.weight"] == d ** (2 - i)
    # outside the towers: the projection heads train at the full LR
    assert all(s == 1.0 for n, s in scales.items() if not n.startswith(("image_tower.", "text_tower.")))
    ids, count = layer_ids(model.image_tower)
    assert count == 3 and sorted(set(ids.values())) == [0, 1, 2, 3, 4]


def test_lr_mult_by_prefix_longest_wins_and_an_unknown_key_is_one_error():
    model = build_model(tiny())
    o = tiny("optim.lr_mult={image_tower: 0.1, image_tower.model.blocks.2: 0.5, text_head: 3}",
             "optim.layer_decay=0.8").optim
    scales = lr_scales(model, o)
    assert scales["image_tower.model.blocks.0.mlp.fc1.weight"] == pytest.approx(0.1 * 0.8 ** 3)
    assert scales["image_tower.model.blocks.2.mlp.fc1.weight"] == pytest.approx(0.5 * 0.8)  # longer prefix wins
    assert all(s == 3.0 for n, s in scales.items() if n.startswith("text_head."))
    groups = parameter_groups(model, o)
    assert all(g["lr"] == pytest.approx(1e-3 * g["lr_scale"]) for g in groups)
    assert len({(g["weight_decay"], g["lr_scale"]) for g in groups}) == len(groups)
    with pytest.raises(ConfigError, match=r"optim.lr_mult.vision: matches no trainable parameter .*image_tower"):
        lr_scales(model, tiny("optim.lr_mult={vision: 0.1}").optim)
    with pytest.raises(ConfigError, match="optim.layer_decay"):
        tiny("optim.layer_decay=0")
    with pytest.raises(ConfigError, match="optim.lr_mult.image_tower"):
        tiny("optim.lr_mult={image_tower: -1}")


def test_frozen_parameters_are_in_no_group():
    model = build_model(tiny())
    model.image_tower.freeze()
    groups = parameter_groups(model, tiny("optim.layer_decay=0.7").optim)
    ids = {id(p) for g in groups for p in g["params"]}
    assert not any(id(p) in ids for p in model.image_tower.parameters())
    assert math.isclose(sum(p.numel() for g in groups for p in g["params"]),
                        sum(p.numel() for p in model.parameters() if p.requires_grad))


def test_the_open_clip_recipe_has_open_clips_optimizer_on_the_cmla_towers():
    cfg = load_config(f"{ROOT}/recipes/clip_openclip.yaml", check_files=False)
    cmla = load_config(f"{ROOT}/recipes/cmla.yaml", check_files=False)
    o = cfg.optim
    assert (o.name, o.lr, o.betas, o.eps, o.weight_decay, o.decay_exclusions, o.schedule) == \
        ("adamw", 5e-4, [0.9, 0.98], 1e-6, 0.2, True, "cosine") and o.warmup_steps > 0
    assert cfg.model.learn_temperature and cfg.model.temperature == 0.07
    assert (cfg.model.image, cfg.model.text, cfg.data, cfg.train.global_batch_size) == \
        (cmla.model.image, cmla.model.text, cmla.data, cmla.train.global_batch_size)
    # its optimizer section on the tiny towers: 2-d weights decayed, the learnt temperature not
    model = build_model(tiny("model.learn_temperature=true"))
    groups = parameter_groups(model, o)
    names = {id(p): n for n, p in model.named_parameters()}
    wd = {names[id(p)]: g["weight_decay"] for g in groups for p in g["params"]}
    assert wd["logit_scale.log_value"] == 0.0 and wd["image_tower.model.blocks.0.attn.qkv.weight"] == 0.2
    assert wd["image_tower.model.blocks.0.attn.qkv.bias"] == 0.0 and wd["text_head.0.weight"] == 0.2


@pytest.mark.parametrize("towers", ["timm", "open_clip"])
def test_patch_dropout_keeps_the_class_token_drops_half_the_patches_and_only_in_training(towers):
    over = ["model.image.patch_dropout=0.5"] + (OPEN_CLIP_TOWERS if towers == "open_clip" else [])
    torch.manual_seed(0)
    model = build_model(tiny(*over))
    torch.manual_seed(0)
    plain = build_model(tiny(*over[1:]))
    plain.load_state_dict(model.state_dict())
    visual = model.image_tower.model
    first = visual.blocks[0] if towers == "timm" else visual.transformer.resblocks[0]
    seen = []
    first.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    images = torch.randn(4, 3, 32, 32)
    patches = (32 // 8) ** 2  # both test towers: 32 px, patch 8
    model.train()
    torch.manual_seed(1)
    a = model.image_tower(images)
    torch.manual_seed(2)
    b = model.image_tower(images)
    token_axis = 1 if towers == "timm" or seen[0][0] == 4 else 0  # open_clip may run sequence-first
    assert seen[0][token_axis] == 1 + patches // 2  # the class token and half the patches
    assert not torch.allclose(a, b)  # other patches per draw
    model.eval(), plain.eval()
    seen.clear()
    with torch.no_grad():
        assert torch.equal(model.image_tower(images), plain.image_tower(images))
    assert seen[0][token_axis] == 1 + patches  # evaluation sees every patch


def test_partial_locking_trains_only_the_last_groups_and_the_locked_part_never_moves():
    """ViT of 3 blocks (groups: embeddings, 3 blocks, final norm), 2 unlocked: block 2 and the
    final norm train; BERT of 2 layers and no pooler (groups: embeddings, 2 layers), 1 unlocked:
    its last layer."""
    torch.manual_seed(0)
    model = build_model(tiny("model.image.unlocked_groups=2", "model.text.unlocked_layers=1"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    image = {n for n in trainable if n.startswith("image_tower.")}
    assert image and all(n.startswith(("image_tower.model.blocks.2.", "image_tower.model.norm.")) for n in image)
    text = {n for n in trainable if n.startswith("text_tower.")}
    assert text and all(n.startswith("text_tower.model.encoder.layer.1.") for n in text)
    assert {n for n in trainable if not n.startswith(("image_tower.", "text_tower."))} == \
        {n for n, _ in model.named_parameters() if not n.startswith(("image_tower.", "text_tower."))}
    # the optimizer holds only the trainable tensors, its state only their size
    groups = parameter_groups(model, tiny().optim)
    opt = torch.optim.Adam(groups, lr=1e-2)
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in model.parameters() if p.requires_grad}
    # no autograd through the locked part: block 1's output carries no graph, block 2's does
    seen = {}
    for i in (1, 2):
        model.image_tower.model.blocks[i].register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, o.requires_grad))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = {"image": torch.randn(4, 3, 32, 32), **model.tokenize(["a photo of the number one."] * 4)}
    out = model(batch)
    assert seen == {1: False, 2: True}
    (out["image"] @ out["text"].T).diagonal().sum().backward()
    opt.step()
    state = sum(v.numel() for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.ndim)
    assert state == 2 * sum(p.numel() for p in model.parameters() if p.requires_grad) < \
        2 * sum(p.numel() for p in model.parameters())
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != (n in trainable), n
    with pytest.raises(ConfigError, match="model.image.unlocked_groups: 9, but the tower has 5 groups"):
        build_model(tiny("model.image.unlocked_groups=9"))


def test_freeze_bn_stats_keeps_the_locked_batchnorm_statistics():
    torch.manual_seed(0)
    over = ["model.image.name=resnet18", "model.image.kwargs={}", "model.image.unlocked_groups=1",  # layer4.1
            "model.image.freeze_bn_stats=true"]
    model = build_model(tiny(*over))
    tower = model.image_tower.train()
    locked = tower.model.bn1  # the stem, locked
    assert not locked.training and not locked.weight.requires_grad
    mean = locked.running_mean.clone()
    tower(torch.randn(2, 3, 32, 32))
    assert torch.equal(locked.running_mean, mean)
    unlocked = tower.model.layer4[1].bn2  # the last block trains, and updates its statistics
    assert unlocked.training and unlocked.weight.requires_grad


def test_weight_ema_averages_swaps_exactly_and_round_trips():
    from mmscale.engine.ema import WeightEMA
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    model[1].weight.requires_grad_(False)  # frozen: not averaged
    ema = WeightEMA(model, decay=0.9)
    assert set(ema.average) == {"0.weight", "0.bias", "1.bias"}
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    history = [start["0.weight"]]
    for k in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * (k + 1))
        history.append(model[0].weight.detach().clone())
        ema.update()
    want = history[0]
    for w in history[1:]:
        want = 0.9 * want + 0.1 * w
    assert torch.allclose(ema.average["0.weight"], want, atol=1e-6)
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    with ema.swapped_in():
        assert torch.equal(model[0].weight, ema.average["0.weight"])
        assert torch.equal(model[1].weight, trained["1.weight"])  # frozen stays
    assert all(torch.equal(p, trained[n]) for n, p in model.named_parameters())  # bit for bit back
    other = WeightEMA(model, decay=0.9)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 3 and all(torch.equal(other.average[n], ema.average[n]) for n in ema.average)
    with pytest.raises(ConfigError, match="train.ema.decay: not supported under ZeRO 3"):
        tiny("train.ema.decay=0.99", "train.zero_stage=3")
    with pytest.raises(ConfigError, match="train.ema.evaluate/export"):
        tiny("train.ema.export=true")


@pytest.mark.slow
def test_the_weight_ema_is_resumed_exactly_evaluated_and_exported(tmp_path):
    """One process, ZeRO 0, with parameter groups (weight decay with the exclusions, layer decay):
    8 steps straight, and 4 + a resumed 4, give the same EMA export (so the groups' LRs and weight
    decays and the average all came back); the run's evaluation scored the EMA weights (the
    export, rebuilt offline, gives its numbers) and the EMA is not the trained weights."""
    import json
    import os
    import subprocess
    from safetensors.torch import load_file
    from conftest import PY
    from mmscale.export import load_export
    from mmscale.tasks import ClipTask

    over = ["optim.schedule=constant", "optim.warmup_steps=0", "train.ema.decay=0.7", "train.ema.evaluate=true",
            "train.ema.export=true", "train.log_every=1", "train.checkpoint_every=0", "train.zero_stage=0",
            "optim.weight_decay=0.05", "optim.layer_decay=0.8"]

    def run(run_dir, steps, *extra):
        r = subprocess.run([PY, "mmscale/train.py", "recipes/tiny.yaml", f"train.run_dir={run_dir}",
                            f"train.steps={steps}", *over, *extra], cwd=ROOT, capture_output=True, text=True,
                           timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]

    ref, cut = str(tmp_path / "ref"), str(tmp_path / "cut")
    run(ref, 8)
    run(cut, 4)
    run(cut, 8)
    a, b = (load_file(os.path.join(d, "export", "model.safetensors")) for d in (ref, cut))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    from mmscale.export import checkpoint_state_dict
    trained = checkpoint_state_dict(os.path.join(ref, "checkpoints"), "step00000008", 0)
    assert max((a[k] - trained[k]).abs().max().item() for k in a if k in trained) > 1e-3  # the average, not the weights
    results = json.load(open(os.path.join(ref, "results.json")))
    cfg = load_config(os.path.join(ref, "config.yaml"))
    again = ClipTask(cfg).evaluate(load_export(os.path.join(ref, "export")), torch.device("cpu"), torch.float32)
    assert again["zeroshot/top1"] == pytest.approx(results["zeroshot/top1"], abs=1e-6)
