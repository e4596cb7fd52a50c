import os

import torch

from conftest import ROOT, shared_path
from helpers import write_digit_shards
from mmscale.config import DataConfig
from mmscale.data.images import CaptionDataset, SyntheticPairs, image_transform, load_splits
from mmscale.data.batches import BatchStream, Collate


class Items(torch.utils.data.Dataset):  # the key is the item
    def __len__(self):
        return 50

    def __getitem__(self, key):
        return key[2]


def take(stream, n):
    it = iter(stream)
    return [next(it) for _ in range(n)]


def test_ranks_partition_each_epoch_and_resume_exactly():
    collate = lambda items: list(items)
    ranks = [BatchStream(Items(), collate, global_batch=8, rank=r, world=2, seed=3) for r in range(2)]
    assert ranks[0].steps_per_epoch == 6  # 50 // 8, the tail is dropped
    epoch0 = [take(s, 6) for s in ranks]
    seen = [i for r in epoch0 for b in r for i in b]
    assert len(seen) == len(set(seen)) == 48
    assert ranks[0].state_dict() == {"epoch": 1, "step": 0, "global_batch": 8}
    # a new stream restored at (epoch 0, step 2) yields what the original yielded from there
    again = BatchStream(Items(), collate, global_batch=8, rank=1, world=2, seed=3)
    again.load_state_dict({"epoch": 0, "step": 2})
    assert take(again, 4) == epoch0[1][2:]
    # the next epoch is a different permutation
    assert take(ranks[0], 1)[0] != epoch0[0][0]


def test_another_world_resplits_the_same_global_batches():
    """A checkpoint written by 2 ranks, resumed by 1, then by 4: every step covers exactly the
    samples of the uninterrupted run's step (re-split over the new ranks), so no sample of the
    epoch is seen twice or skipped."""
    collate = lambda items: list(items)

    def world(n, state=None, steps=2):
        streams = [BatchStream(Items(), collate, global_batch=8, rank=r, world=n, seed=3) for r in range(n)]
        for s in streams:
            if state:
                s.load_state_dict(state)
        per_rank = [take(s, steps) for s in streams]
        return [sorted(i for r in per_rank for i in r[k]) for k in range(steps)], streams[0].state_dict()

    whole, _ = world(1, steps=6)
    a, state = world(2)
    b, state = world(1, state)
    c, state = world(4, state)
    assert a + b + c == whole and state == {"epoch": 1, "step": 0, "global_batch": 8}
    seen = [i for batch in a + b + c for i in batch]
    assert len(seen) == len(set(seen)) == 48
    # another global batch: at the same sample if a step starts there, else a one-line error
    half = BatchStream(Items(), collate, global_batch=4, rank=0, world=1, seed=3)
    half.load_state_dict({"epoch": 0, "step": 3, "global_batch": 8})
    assert half.state_dict() == {"epoch": 0, "step": 6, "global_batch": 4}
    first, second = take(half, 2)
    assert sorted(first + second) == whole[3]
    import pytest
    from mmscale.config import ConfigError
    with pytest.raises(ConfigError, match="24 samples into epoch 0 with batches of 8; 16 does not divide"):
        BatchStream(Items(), collate, global_batch=16, rank=0, world=1, seed=3).load_state_dict(
            {"epoch": 0, "step": 3, "global_batch": 8})


def test_digits_captions_and_augmentation_are_keyed():
    splits = load_splits(DataConfig(type="digits", caption_template="a photo of the number {}.", eval_fraction=0.2))
    assert len(splits.train) + len(splits.eval) == 1797 and len(splits.classnames) == 10
    s = splits.train[0]
    assert s.caption == f"a photo of the number {splits.classnames[s.label]}."
    ds = CaptionDataset(splits.train, image_transform(32, train=True))
    a, b = ds[(0, 1, 5)][0], ds[(0, 1, 5)][0]
    assert a.shape == (3, 32, 32) and torch.equal(a, b)
    # an 8x8 digit has few distinct crops, so some other epoch must differ, not every one
    assert any(not torch.equal(a, ds[(0, e, 5)][0]) for e in range(2, 12))


def test_images_travel_as_bytes_and_normalise_on_the_device_exactly():
    """The loader hands out uint8; normalize_images gives, bit for bit, what torchvision's
    ToTensor + Normalize gave on the host, and to_device (or, for the training step, model_inputs
    after to_device kept them as bytes) applies it to image batches only."""
    from PIL import Image
    from torchvision import transforms as T
    from mmscale.data.images import CLIP_MEAN, CLIP_STD, normalize_images
    from mmscale.data.batches import model_inputs, to_device
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (5, 7, 3), generator=g, dtype=torch.uint8)
    image = Image.fromarray(pixels.numpy())
    raw = image_transform(5, train=False)(image)
    assert raw.dtype == torch.uint8 and raw.shape == (3, 5, 5)
    host = T.Compose([T.Resize(5, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(5), T.ToTensor(),
                      T.Normalize(CLIP_MEAN, CLIP_STD)])(image)
    assert torch.equal(normalize_images(raw[None])[0], host)
    batch = to_device({"image": raw[None], "input_ids": torch.ones(1, 4, dtype=torch.long), "skipped": 2},
                      torch.device("cpu"), torch.bfloat16)
    assert batch["image"].dtype == torch.bfloat16 and torch.equal(batch["image"][0], host.to(torch.bfloat16))
    assert batch["input_ids"].dtype == torch.long and batch["skipped"] == 2
    # the trainer's: bytes on the device, normalised by the step chunk by chunk (model_inputs)
    kept = to_device({"image": raw[None], "skipped": 2}, torch.device("cpu"), torch.bfloat16, images="uint8")
    assert kept["image"].dtype == torch.uint8
    assert torch.equal(model_inputs(kept, torch.bfloat16)["image"], batch["image"])
    from types import SimpleNamespace
    from mmscale.engine.trainer import Trainer
    on_device = Trainer.to_device(SimpleNamespace(device=torch.device("cpu"), dtype=torch.bfloat16), {"image": raw[None]})
    assert on_device["image"].dtype == torch.uint8  # what the trainer hands its step


def test_cifar10_folders_from_shared():
    root = shared_path("cifar10", "train")
    splits = load_splits(DataConfig(type="imagefolder", root=root, max_per_class=20, eval_fraction=0.25))
    assert splits.classnames[:3] == ["airplane", "automobile", "bird"]
    assert len(splits.train) == 150 and len(splits.eval) == 50
    ds = CaptionDataset(splits.eval, image_transform(32, train=False))
    collate = Collate(lambda texts: {"input_ids": torch.tensor([[len(t)] for t in texts]),
                                     "attention_mask": torch.ones(len(texts), 1, dtype=torch.long)})
    batch = collate([ds[i] for i in range(4)])
    assert batch["image"].shape == (4, 3, 32, 32) and batch["label"].tolist() == [0] * 4


def test_shard_dataset_reads_by_index_and_skips_corrupt_samples(tmp_path):
    import warnings
    from mmscale.data.indexed_shards import ShardDataset
    write_digit_shards(str(tmp_path), per_shard=10, shards=2, corrupt={12})
    ds = ShardDataset(str(tmp_path), image_transform(32, train=False))
    assert len(ds) == 20
    image, caption, label, skipped, _ = ds[(0, 0, 3)]
    assert image.shape == (3, 32, 32) and caption.startswith("a photo of the number") and skipped == 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        replaced = ds[(0, 0, 12)]
    stand_in = ds.after(12, (0, 0, 12, 0))  # a hash of (seed, epoch, i, try): the same in any process
    assert stand_in != 12 and replaced[3] == 1 and "sample 12" in str(caught[0].message)
    assert torch.equal(replaced[0], ds[(0, 0, stand_in)][0])
    stream = BatchStream(ds, Collate(lambda t: {"input_ids": torch.zeros(len(t), 1)}), 20, 0, 1, seed=0)
    batch = next(iter(stream))
    assert int(batch["skipped"]) == 1 and batch["image"].shape[0] == 20
    # a rebuilt folder is read afresh (wids' default cache would serve the old shards)
    write_digit_shards(str(tmp_path), per_shard=15, shards=2)
    rebuilt = ShardDataset(str(tmp_path), image_transform(32, train=False))
    assert len(rebuilt) == 30 and rebuilt[(0, 0, 29)][3] == 0 and rebuilt[(0, 0, 12)][3] == 0


def test_training_streams_webdataset_shards(tmp_path):
    """Two steps of the tiny recipe on shards written with webdataset's TarWriter."""
    import subprocess, json, sys
    from conftest import ROOT
    urls = write_digit_shards(str(tmp_path / "shards"))
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "mmscale/train.py", "recipes/tiny.yaml", "data.type=webdataset",
                        f"data.shards={urls}", "data.num_samples=300", "data.shuffle_buffer=50",
                        "train.steps=2", "train.log_every=1", f"train.run_dir={run}", "train.export=false"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    losses = [json.loads(l) for l in open(run / "metrics.jsonl") if '"loss"' in l]
    assert [x["step"] for x in losses] == [1, 2] and all(x["epoch"] == 0 for x in losses)


def test_synthetic_pairs_are_a_function_of_the_index():
    ds = SyntheticPairs(50, 16, "a photo of the number {}.", image_transform(16, train=True))
    image, caption, label, skipped, _ = ds[(0, 0, 13)]
    again = ds[(0, 0, 13)]
    assert image.shape == (3, 16, 16) and image.dtype == torch.uint8 and torch.equal(image, again[0])
    assert (caption, label, skipped, len(ds)) == ("a photo of the number three.", 3, 0, 50)
    assert not torch.equal(ds[(0, 0, 14)][0], image)


def test_bench_loader_times_the_recipes_loader_and_a_bad_override_is_one_line(capsys):
    """mmscale-bench-loader on the tiny recipe (digits) and on COCO-MINI as docs/DATA.md runs it."""
    from mmscale.cli.bench_loader import main
    tiny = os.path.join(ROOT, "recipes", "tiny.yaml")
    assert main([tiny, "--workers", "0", "--batches", "1", "--batch", "16"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert rows[0].split()[:2] == ["workers", "images/s"] and float(rows[1].split()[1]) > 0
    assert main([tiny, "model.image.image_size=224", "--batches", "1"]) == 2  # tiny's ViT is built at 32
    assert capsys.readouterr().err.startswith("bench_loader: config error: model.image.image_size: 224")
    coco = shared_path("coco-mini")
    assert main([tiny, "data.type=coco", f"data.root={coco}/val2017",
                 f"data.captions={coco}/annotations/captions_val2017.json", "model.image.image_size=224",
                 "model.image.kwargs.img_size=224", "--workers", "0", "--batches", "1", "--batch", "8"]) == 0


def test_batches_carry_the_positives_keys(tmp_path):
    """loss.positives' keys: image_id is the same for one image, whether the data says so (COCO's
    image id) or only the bytes do (one photo under two captions in shards, indexed or streamed);
    caption_id is the same for one caption text up to whitespace."""
    import webdataset as wds
    from helpers import real_photos
    from mmscale.data.indexed_shards import ShardDataset, write_index
    from mmscale.data.tar_stream import ShardStream
    photo, other = real_photos(2)
    with wds.TarWriter(str(tmp_path / "00000.tar")) as sink:
        for k, (image, caption) in enumerate([(photo, "a cat on a mat"), (other, "a dog"), (photo, " a cat  on a mat")]):
            sink.write({"__key__": f"{k:08d}", "jpg": image, "txt": caption})
    write_index(str(tmp_path), [{"url": "00000.tar", "nsamples": 3}])
    collate = Collate(lambda texts: {"input_ids": torch.zeros(len(texts), 1, dtype=torch.long)})
    transform = image_transform(16, train=False)
    indexed = collate([ShardDataset(str(tmp_path), transform)[(0, 0, i)] for i in range(3)])
    streamed = next(iter(ShardStream(str(tmp_path / "00000.tar"), 3, transform, collate, 3, 0, 1, shuffle_buffer=0)))
    for batch in (indexed, streamed):
        images, captions = batch["image_id"].tolist(), batch["caption_id"].tolist()
        assert images[0] == images[2] != images[1] and captions[0] == captions[2] != captions[1]
    assert batch["image_id"].dtype == batch["caption_id"].dtype == torch.int64

    root = shared_path("coco-mini")
    samples = load_splits(DataConfig(type="coco", root=f"{root}/train2017",
                                     captions=f"{root}/annotations/captions_train2017.json")).train
    first = [i for i, s in enumerate(samples) if s.image == samples[0].image]
    picked = first + [i for i, s in enumerate(samples) if s.image != samples[0].image][:2]
    ds = CaptionDataset(samples, transform)
    batch = collate([ds[i] for i in picked])
    ids = batch["image_id"].tolist()
    assert len(first) == 5 and set(ids[:5]) == {samples[0].image_id} and ids[5] != ids[0]
    assert len(set(batch["caption_id"].tolist())) == 7  # COCO's five captions of a photo differ


def test_label_positives_need_shards_with_labels(tmp_path):
    from types import SimpleNamespace

    import pytest
    from mmscale.config import ConfigError, load_config
    from mmscale.tasks import ClipTask
    write_digit_shards(str(tmp_path), per_shard=10, shards=1)  # captions, no classes
    cfg = load_config(os.path.join(ROOT, "recipes", "tiny.yaml"),
                      ["data.type=shards", f"data.shards={tmp_path}", "loss.positives=label"])
    model = SimpleNamespace(text_tower=SimpleNamespace(tokenize_fn=lambda: None))
    with pytest.raises(ConfigError, match=r"loss.positives: label needs class labels, and the shards' first sample has"):
        ClipTask(cfg).train_stream(model, 0, 1)
