"""open_clip's format both ways, in process against open_clip 3.3.0 itself: an export that
`open_clip.create_model_and_transforms("local-dir:...")` opens (same embeddings, temperature,
bias, tokens and preprocess as ours), CLIP_benchmark's zero-shot on it equal to mmscale-eval's,
`model.init` from an open_clip checkpoint, and one line for what open_clip cannot express."""
import io
import os

import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from conftest import ROOT
from helpers import OPEN_CLIP_TINY, OPEN_CLIP_TOWERS, real_photos, write_digit_files

TINY = os.path.join(ROOT, "recipes", "tiny.yaml")
# the two forms open_clip has: its CLIP (open_clip towers, their own projections, a SigLIP bias
# here) and CustomTextCLIP (a timm ViT at its own 160 px, an HF text tower, open_clip's MLP heads)
FORMS = {
    "clip": [*OPEN_CLIP_TOWERS, "model.heads.enabled=false", "loss.name=siglip", "model.logit_bias=-10"],
    "custom_text": ["model.image.name=test_vit", "model.image.kwargs={}", "model.image.image_size=160",
                    "model.heads.style=open_clip"],
}
TEXTS = ["a photo of the number seven.", "two", "a caption much longer than the sixteen tokens the tower reads in all"]


def build(overrides, seed=0):
    from mmscale.config import load_config
    from mmscale.models import build_model
    torch.manual_seed(seed)
    model = build_model(load_config(TINY, overrides, check_files=False)).eval()
    with torch.no_grad():  # every weight away from its init, so a weight left behind shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def open_folder(folder):
    import open_clip
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    return model.eval(), preprocess, open_clip.get_tokenizer(f"local-dir:{folder}")


def embeddings(model, images, texts):
    with torch.no_grad():
        t = model.tokenize(texts)
        return model.encode_image(images), model.encode_text(t["input_ids"], t["attention_mask"]), t["input_ids"]


@pytest.mark.parametrize("form", FORMS)
def test_export_opens_in_open_clip_with_our_embeddings_and_preprocess(form, tmp_path):
    from mmscale.data.images import image_transform, normalize_images
    from mmscale.export.openclip import save_open_clip
    ours = build(FORMS[form])
    folder = save_open_clip(ours, str(tmp_path / "oc"))
    theirs, preprocess, tokenizer = open_folder(folder)
    assert type(theirs).__name__ == {"clip": "CLIP", "custom_text": "CustomTextCLIP"}[form]

    size = ours.cfg.image.image_size
    photos = [Image.open(io.BytesIO(b)) for b in real_photos(3)]
    pixels = normalize_images(torch.stack([image_transform(size, train=False)(p) for p in photos]))
    assert torch.allclose(torch.stack([preprocess(p) for p in photos]), pixels, atol=1e-5)

    img, txt, ids = embeddings(ours, pixels, TEXTS)
    assert torch.equal(tokenizer(TEXTS), ids)
    with torch.no_grad():
        assert torch.allclose(F.normalize(theirs.encode_image(pixels), dim=-1), img, atol=1e-6)
        assert torch.allclose(F.normalize(theirs.encode_text(ids), dim=-1), txt, atol=1e-6)
    assert torch.allclose(theirs.logit_scale.exp(), ours.logit_scale()[0])
    if ours.logit_bias is not None:
        assert theirs.logit_bias.item() == pytest.approx(ours.logit_bias.value.item())


def test_what_open_clip_cannot_express_is_one_line_and_no_folder(tmp_path, capsys):
    from mmscale.config import load_config
    from mmscale.cli.export import main
    from mmscale.export import save_export
    from mmscale.export.openclip import blocker
    cases = {
        "model.heads.style: cmla heads": [],  # tiny.yaml itself: CMLA's ReLU heads
        "model.heads.enabled: open_clip's CLIP has no MLP heads": OPEN_CLIP_TOWERS,
        "model.fusion.type: shared_block": ["model.fusion.type=shared_block", "model.fusion.num_heads=2"],
        "model.image.kwargs: open_clip builds a timm tower from its name alone": ["model.heads.style=open_clip"],
        "model.image.image_size: open_clip builds timm's test_vit at its own input size 160":
            ["model.image.name=test_vit", "model.image.kwargs={}", "model.heads.style=open_clip"],
        "model.image.source/model.text.source: efficientnet_lite + hf":
            ["model.image.source=efficientnet_lite", "model.image.name=efficientnet-lite0", "model.image.kwargs={}"],
    }
    for start, over in cases.items():
        reason = blocker(load_config(TINY, over, check_files=False))
        assert reason and reason.startswith(start), (start, reason)
    assert "task clip" in blocker(load_config(os.path.join(ROOT, "recipes", "cbmf_tiny.yaml"), check_files=False))

    export = save_export(build([]), load_config(TINY, check_files=False), str(tmp_path / "export"))
    out = tmp_path / "oc"
    assert main([export, str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmscale-export: model.heads.style: cmla heads") and "\n" not in err
    assert not out.exists()


def test_export_format_open_clip_is_checked_when_the_run_starts():
    from mmscale.config import ConfigError, load_config
    from mmscale.engine import Trainer
    cfg = load_config(TINY, ["train.export_format=open_clip"], check_files=False)
    with pytest.raises(ConfigError, match="model.heads.style"):
        Trainer(cfg, task=None)  # before any process group, data or model


def test_model_init_loads_a_released_clip(tmp_path):
    """A checkpoint as open_clip's trainer saves it ({"state_dict": {"module.<name>": ...}}) from
    open_clip's own random init: both towers, projections and the temperature arrive; CMLA heads
    on top keep their init; a folder open_clip opens works too."""
    import open_clip
    from mmscale.config import ConfigError, load_config
    from mmscale.models import build_model
    torch.manual_seed(1)
    released = open_clip.CLIP(**yaml.safe_load(OPEN_CLIP_TINY)["model_cfg"]).eval()
    with torch.no_grad():
        released.logit_scale.fill_(3.0)
    path = str(tmp_path / "epoch_3.pt")
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in released.state_dict().items()}}, path)

    def model(*over):
        torch.manual_seed(0)
        return build_model(load_config(TINY, [*OPEN_CLIP_TOWERS, *over], check_files=False)).eval()

    ours = model("model.heads.enabled=false", f"model.init={path}", "model.learn_temperature=true")
    pixels, tokens = torch.randn(2, 3, 32, 32), open_clip.SimpleTokenizer(context_length=16)(TEXTS)
    img, txt, ids = embeddings(ours, pixels, TEXTS)
    assert torch.equal(ids, tokens)
    with torch.no_grad():
        assert torch.allclose(img, F.normalize(released.encode_image(pixels), dim=-1), atol=1e-6)
        assert torch.allclose(txt, F.normalize(released.encode_text(tokens), dim=-1), atol=1e-6)
    assert ours.logit_scale().item() == pytest.approx(torch.tensor(3.0).exp().item())

    from mmscale.tasks import build_task
    trained = build_task(load_config(TINY, [*OPEN_CLIP_TOWERS, f"model.init={path}"], check_files=False)).build_model()
    assert torch.equal(trained.text_tower.model.text_projection, released.text_projection)  # what training starts from

    headed = model(f"model.init={path}")
    assert torch.equal(headed.image_tower.model.proj, released.visual.proj)
    assert torch.equal(headed.image_head[0].weight, model().image_head[0].weight)  # the recipe's seed-0 init

    from mmscale.export.openclip import save_open_clip
    folder = save_open_clip(ours, str(tmp_path / "oc"))
    again = model("model.heads.enabled=false", f"model.init={folder}")
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), ours.state_dict().values()))

    wider = OPEN_CLIP_TINY.replace("width: 64, head_width", "width: 96, head_width")
    with pytest.raises(ConfigError, match=r"model.init: visual.class_embedding is \[64\] in .*epoch_3.pt, \[96\]"):
        model(f"model.image.kwargs={wider}", f"model.init={path}")
    with pytest.raises(ConfigError, match="set model.text.pretrained to false"):
        load_config(TINY, [f"model.init={path}", "model.text.pretrained=true"], check_files=False)
    with pytest.raises(ConfigError, match="not found"):
        model("model.init=/nowhere/epoch_3.pt")
    with pytest.raises(ConfigError, match="not a released open_clip model/tag"):
        model("model.init=open_clip:ViT-B-32/no_such_tag")


def test_clip_benchmark_zero_shot_on_the_export_equals_mmscale_eval(tmp_path):
    """CLIP_benchmark 1.6.2's own zero-shot code (zero_shot_classifier, run_classification) on the
    open_clip folder, over a class-folder dataset of digits, gives mmscale-eval's top-1, image by
    image. Its accuracy() calls float() on a one-element array, which numpy >= 2.4 refuses, so
    top-1 is taken from its logits here."""
    from clip_benchmark.metrics.zeroshot_classification import run_classification, zero_shot_classifier
    from torchvision.datasets import ImageFolder
    from mmscale.eval import run_evaluations
    from mmscale.export.openclip import save_open_clip
    data = str(tmp_path / "digits")
    write_digit_files(data, "imagefolder", n=120)
    ours = build(FORMS["clip"], seed=3)
    folder = save_open_clip(ours, str(tmp_path / "oc"))
    theirs, preprocess, tokenizer = open_folder(folder)

    dataset = ImageFolder(data, transform=preprocess)
    classifier = zero_shot_classifier(theirs, tokenizer, dataset.classes, ["a photo of the number {c}."], "cpu",
                                      amp=False)
    logits, target = run_classification(theirs, classifier, torch.utils.data.DataLoader(dataset, batch_size=50),
                                        "cpu", amp=False)
    top1 = (logits.argmax(1) == target).float().mean().item()
    metrics, _ = run_evaluations(ours, {"zeroshot": {"digits": data}}, templates=["a photo of the number {}."],
                                 image_size=32, device=torch.device("cpu"), dtype=torch.float32)
    assert metrics["zeroshot/digits/top1"] == pytest.approx(top1, abs=1e-9)
    assert 0 < top1 < 1  # neither all right nor all wrong: a real comparison
