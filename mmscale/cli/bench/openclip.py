"""open_clip beside mmscale's step: its towers as a recipe's (open_clip_overrides), its own
trainer's rate in a subprocess (open_clip_rate), and its model, ClipLoss and fused AdamW in a bare
torch loop alternated step by step with mmscale's step in this process (interleaved_vs_bare_open_clip)."""
from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
import tempfile
import time

from .instruments import synchronize


def open_clip_overrides(model: str) -> list[str]:
    """The recipe overrides that put open_clip's MODEL towers in: task clip, no heads, no
    pretrained weights, a learnt temperature (CLIP as open_clip trains it)."""
    import open_clip
    config = open_clip.get_model_config(model)
    if config is None:
        raise SystemExit(f"bench: --vs-open-clip {model}: not an open_clip model (open_clip.list_models())")
    size = config["vision_cfg"].get("image_size", 224)
    return ["task=clip", "model.image.source=open_clip", f"model.image.name={model}", "model.image.kwargs={}",
            f"model.image.image_size={size if isinstance(size, int) else size[0]}",
            "model.image.pretrained=false", "model.text.source=open_clip", f"model.text.name={model}",
            "model.text.config_overrides={}", "model.text.pretrained=false", "model.heads.enabled=false",
            "model.fusion.type=none", "model.learn_temperature=true"]


def open_clip_rate(model: str, batch: int, precision: str, steps: int, warmup: int, workers: int) -> dict:
    """samples/s of open_clip's own trainer on synthetic data, from its per-step log lines, and the
    share of its step time spent waiting for its loader (its `workers` build every image with PIL:
    with too few, the trainer measures its loader, not its step)."""
    precision = {"fp32": "fp32", "bf16": "amp_bf16"}[precision]
    with tempfile.TemporaryDirectory() as logs:
        cmd = [sys.executable, "-m", "open_clip_train.main", "--dataset-type", "synthetic", "--model", model,
               "--batch-size", str(batch), "--precision", precision, "--workers", str(workers),
               "--train-num-samples", str(batch * (steps + warmup)), "--epochs", "1", "--log-every-n-steps", "1",
               "--save-frequency", "0", "--logs", logs, "--name", "bench", "--lr", "1e-4", "--warmup", "10"]
        tic = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"})
        out = proc.stdout + proc.stderr
        if proc.returncode != 0:
            raise SystemExit(f"bench: open_clip's trainer failed ({proc.returncode}): {' '.join(cmd)}\n{out[-2000:]}")
    # "Data (t): 0.001 Batch (t): 12.759, 0.313507/s, 0.313507/s/gpu": logged every step, its meters
    # reset after each line, so these are the step's own loader wait and time (batch includes data)
    lines = re.findall(r"Data \(t\): ([\d.]+) Batch \(t\): ([\d.]+), [\d.e+-]+/s, ([\d.e+-]+)/s/gpu", out)
    timed = lines[warmup:] or lines
    waited, took = sum(float(d) for d, _, _ in timed), sum(float(b) for _, b, _ in timed)
    return {"command": " ".join(cmd), "workers": workers,
            "samples_per_s": len(timed) / sum(1 / float(r) for _, _, r in timed) if timed else None,
            "data_fraction": waited / took if took else None,
            "steps_logged": len(lines), "wall_s": round(time.time() - tic, 1)}


def interleaved_vs_bare_open_clip(model: str, trainer, batch: dict, precision: str, steps: int) -> dict:
    """open_clip's MODEL with its ClipLoss and torch's fused AdamW in a bare torch loop, on the same
    batch, alternated step by step with mmscale's step in this process: both see the same load, so
    the ratio is free of what changes between two processes (the trainer's ratio is not)."""
    import open_clip
    import torch
    from open_clip.loss import ClipLoss

    from mmscale.data.images import normalize_images

    device = trainer.device
    sync = functools.partial(synchronize, device)
    net = open_clip.create_model(model).to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=device.type in ("cuda", "cpu"))
    clip_loss = ClipLoss()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    images, texts = normalize_images(batch["image"]), batch["input_ids"]  # the batch holds them as uint8

    def bare_step():
        with autocast:
            image, text, scale = net(images, texts)[:3]
            loss = clip_loss(image, text, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def ours_step():
        trainer.train_step(dict(batch))

    seconds = {"mmscale": 0.0, "bare": 0.0}
    for i in range(steps + 1):  # the first round warms the bare loop up
        for name, step in (("mmscale", ours_step), ("bare", bare_step)):
            sync()
            tic = time.perf_counter()
            step()
            sync()
            if i:
                seconds[name] += time.perf_counter() - tic
    n = len(images) * steps
    del net, opt
    return {"steps": steps, "mmscale_samples_per_s": n / seconds["mmscale"], "bare_samples_per_s": n / seconds["bare"],
            "ratio": seconds["bare"] / seconds["mmscale"]}
