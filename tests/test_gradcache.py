"""Gradient cache: exact full-batch gradients (1 process, and 2 gloo ranks under DeepSpeed
ZeRO 0-3, ZeRO 3 with activation checkpointing), for every loss (InfoNCE global, local and ring, SigLIP
with its three exchanges, whole and tiled), dropout and patch-dropout replay, and activation memory
bounded by the chunk; across ranks, one gradient reduction per step (engine/reduction.py) and, in
bf16, chunk gradients summed in fp32."""
import json
import math
import os

import pytest
import torch
import torch.nn as nn

from conftest import LONG, ROOT
from distributed import run_ranks
from mmscale.config import load_config
from mmscale.gradcache import grad_cache_step
from mmscale.losses import clip_loss, contrastive_loss
from mmscale.models import DualEncoder

B = 16


def tiny_cfg(*overrides):
    return load_config(os.path.join(ROOT, "recipes", "tiny.yaml"), list(overrides))


def make_model(cfg, dropout=0.0):
    torch.manual_seed(0)
    if dropout:
        cfg.model.image.kwargs = {**cfg.model.image.kwargs, "drop_rate": dropout, "proj_drop_rate": dropout}
        cfg.model.text.config_overrides = {**cfg.model.text.config_overrides, "hidden_dropout_prob": dropout}
    else:
        cfg.model.text.config_overrides = {**cfg.model.text.config_overrides, "hidden_dropout_prob": 0.0,
                                           "attention_probs_dropout_prob": 0.0}
    return DualEncoder(cfg.model)


def make_batch(model, n=B, seed=1):
    g = torch.Generator().manual_seed(seed)
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven"]
    texts = [f"a photo of the number {words[i % 8]} {i}" for i in range(n)]
    return {"image": torch.randn(n, 3, 32, 32, generator=g), **model.tokenize(texts)}


SHARED = ("logit_scale", "logit_bias")
SIGLIP = ["loss.name=siglip", "model.logit_bias=-10", "model.temperature=0.1"]
# every loss the dual encoder trains with, whole and tiled (tiles that do not divide the batch)
LOSSES = {"infonce": [], "infonce_tiled": ["loss.tile=5"], "infonce_local_tiled": ["loss.variant=local", "loss.tile=3"],
          "infonce_ring": ["loss.variant=ring", "loss.tile=3"], "siglip": SIGLIP, "siglip_tiled": [*SIGLIP, "loss.tile=5"],
          "siglip_gather": [*SIGLIP, "loss.exchange=gather"], "siglip_ring": [*SIGLIP, "loss.exchange=ring"]}


def loss_fn(cfg=None):
    if cfg is None:
        return lambda out: (contrastive_loss(out["image"], out["text"], out["logit_scale"]), {})
    return lambda out: (clip_loss(out, cfg.loss), {})


def full_batch_grads(model, batch, cfg=None):
    model.zero_grad()
    loss, _ = loss_fn(cfg)(model(batch))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def plain_backward(surrogate, last):
    surrogate.backward()


@pytest.mark.parametrize("learn_temperature,loss", [(False, "infonce"), *((True, name) for name in LOSSES)])
def test_equals_full_batch_single_process(learn_temperature, loss):
    cfg = tiny_cfg(f"model.learn_temperature={str(learn_temperature).lower()}", *LOSSES[loss])
    model = make_model(cfg)
    batch = make_batch(model)
    ref_loss, ref = full_batch_grads(model, batch, cfg)
    model.zero_grad()
    loss, _ = grad_cache_step(model, loss_fn(cfg), batch, 4, plain_backward, shared=SHARED)
    assert torch.allclose(loss, ref_loss, atol=1e-6)
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == ref.keys()
    if learn_temperature:
        assert "logit_scale.log_value" in got and got["logit_scale.log_value"].abs().item() > 0
    if cfg.model.logit_bias is not None:
        assert got["logit_bias.value"].abs().item() > 0
    for n in ref:
        assert torch.allclose(got[n], ref[n], atol=1e-5, rtol=1e-4), (n, (got[n] - ref[n]).abs().max())


@pytest.mark.parametrize("loss", ["infonce_tiled", "infonce_ring", "siglip"])
def test_the_task_loss_with_several_positives_is_exact_under_the_cache(loss):
    """loss.positives: the key travels in the batch like the labels, through ClipTask.loss (the
    engine's closure over the local batch), so the cached chunks see the whole batch's positives."""
    from mmscale.tasks import ClipTask
    cfg = tiny_cfg("model.learn_temperature=true", "loss.positives=caption", *LOSSES[loss])
    model = make_model(cfg)
    batch = make_batch(model)
    batch["caption_id"] = torch.arange(B) % 5  # planted: rows 0, 5, 10, 15 share a caption, and so on
    task = ClipTask(cfg)

    def loss_fn(out):
        return task.loss(out, batch, None)
    model.zero_grad()
    ref_loss, _ = loss_fn(model(batch))
    ref_loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    loss, _ = grad_cache_step(model, loss_fn, batch, 4, plain_backward, shared=SHARED)
    assert torch.allclose(loss, ref_loss, atol=1e-6)
    assert not torch.allclose(loss, clip_loss(model(batch), cfg.loss))  # the keys were used
    for n, g in ref.items():
        assert torch.allclose(model.get_parameter(n).grad, g, atol=1e-5, rtol=1e-4), n


def chunked_reference(model, batch, chunk, seed):
    """Same dropout masks as the cache's first pass: forward the chunks in order, with grad."""
    torch.manual_seed(seed)
    outs = [model({k: v[i:i + chunk] for k, v in batch.items()}) for i in range(0, B, chunk)]
    out = {k: torch.cat([o[k] for o in outs]) for k in ("image", "text")}
    out["logit_scale"] = outs[0]["logit_scale"]
    model.zero_grad()
    loss_fn()(out)[0].backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_dropout_masks_are_replayed(monkeypatch):
    model = make_model(tiny_cfg(), dropout=0.3)
    batch = make_batch(model)
    ref = chunked_reference(model, batch, 4, seed=123)

    def cached():
        model.zero_grad()
        torch.manual_seed(123)
        grad_cache_step(model, loss_fn(), batch, 4, plain_backward, shared=("logit_scale",))
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    got = cached()
    for n in ref:
        assert torch.allclose(got[n], ref[n], atol=1e-5, rtol=1e-4), n
    # without the replay the re-forward draws new masks and the gradients are wrong
    monkeypatch.setattr("mmscale.gradcache.RngState.restore", lambda self: None)
    wrong = cached()
    assert max((wrong[n] - ref[n]).abs().max().item() for n in ref) > 1e-3


def cached_grads(model, batch, chunk, seed):
    model.zero_grad()
    torch.manual_seed(seed)
    grad_cache_step(model, loss_fn(), batch, chunk, plain_backward, shared=("logit_scale",))
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


CKPT = ["model.image.grad_checkpointing=true", "model.text.grad_checkpointing=true"]


@pytest.mark.parametrize("controls", [["model.image.patch_dropout=0.5"], CKPT, ["model.image.patch_dropout=0.5", *CKPT]],
                         ids=["patch_dropout", "grad_checkpointing", "both"])
def test_patch_dropout_and_activation_checkpointing_are_exact_under_the_cache(controls, monkeypatch):
    """With dropout on: patch dropout drops the same tokens in the re-forward as in the first pass
    (the cache replays the RNG), and activation checkpointing (blocks recomputed in the backward,
    torch's checkpoint replaying the RNG too) gives the gradients of the same step without it."""
    plain = make_model(tiny_cfg(*[c for c in controls if "grad_checkpointing" not in c]), dropout=0.2)
    model = make_model(tiny_cfg(*controls), dropout=0.2)
    model.load_state_dict(plain.state_dict())
    batch = make_batch(model)
    ref = chunked_reference(plain, batch, 4, seed=123)
    calls = []
    # inside the first block (transformers checkpoints a layer's forward, not its hooks); pre-hooks,
    # since a recompute stops as soon as it has what the backward needs
    for module in (model.image_tower.model.blocks[0].attn, model.text_tower.model.encoder.layer[0].attention):
        module.register_forward_pre_hook(lambda m, i: calls.append(m))
    got = cached_grads(model, batch, 4, seed=123)
    # 4 chunks embedded, the 3 not kept re-forwarded, and with checkpointing all 4 recomputed in the backward
    assert len(calls) == 2 * (11 if "model.image.grad_checkpointing=true" in controls else 7)
    assert got.keys() == ref.keys()
    for n in ref:
        assert torch.allclose(got[n], ref[n], atol=1e-5, rtol=1e-4), (n, (got[n] - ref[n]).abs().max())
    if "model.image.patch_dropout=0.5" in controls:  # other tokens dropped in the re-forward: wrong
        monkeypatch.setattr("mmscale.gradcache.RngState.restore", lambda self: None)
        wrong = cached_grads(model, batch, 4, seed=123)
        assert max((wrong[n] - ref[n]).abs().max().item() for n in ref) > 1e-3


# inductor's C++ code generation costs about 70 s on a cold cache (CI's 2 cores): opt-in, like the Slurm tests
INDUCTOR = pytest.mark.skipif(os.environ.get("MMSCALE_INDUCTOR_TESTS") != "1",
                              reason="opt-in: MMSCALE_INDUCTOR_TESTS=1 (about 70 s of compilation on a cold cache)")


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=[pytest.mark.slow, INDUCTOR])])
def test_compiled_towers_give_the_eager_gradients(backend, monkeypatch):
    """train.compile: the towers under torch.compile give the eager gradients, plain and
    gradient-cached, dropout included (the cache replays the RNG into the compiled graphs).
    aot_eager runs dynamo's capture and AOT autograd, where compile and the cache could disagree;
    inductor (train.compile_backend's default) also generates and compiles C++ kernels with gcc.
    Its dropout draws from its own generator unless told to fall back to eager's random ops
    (torch._inductor.config.fallback_random), which this comparison needs for the same masks."""
    if backend == "inductor":
        import torch._inductor.config as inductor_config
        monkeypatch.setattr(inductor_config, "fallback_random", True)
        torch._dynamo.reset()
    cfg = tiny_cfg()
    batch = make_batch(make_model(cfg))

    def grads(model, chunk):
        model.zero_grad()
        torch.manual_seed(7)
        if chunk:
            grad_cache_step(model, loss_fn(), batch, chunk, plain_backward, shared=("logit_scale",))
        else:
            loss_fn()(model(batch))[0].backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    eager = make_model(tiny_cfg(), dropout=0.2)
    compiled = make_model(tiny_cfg(), dropout=0.2)
    for tower in compiled.named_towers().values():
        tower.compile(backend=backend)
    for chunk in (0, 4):
        want, got = grads(eager, chunk), grads(compiled, chunk)
        assert got.keys() == want.keys()
        for n in want:
            # inductor fuses and reorders float32 arithmetic: 1e-5 absolute (it measured <= 3e-6)
            atol = 1e-6 if backend == "aot_eager" else 1e-5
            assert torch.allclose(got[n], want[n], atol=atol, rtol=1e-5), (chunk, n, (got[n] - want[n]).abs().max())


class SavedActivations:
    """Bytes of activations autograd holds for backward (parameters excluded), peak over time."""

    def __init__(self, model):
        self.params = {p.data_ptr() for p in model.parameters()}
        self.live = self.peak = 0

    def pack(self, t):
        size = 0 if t.data_ptr() in self.params else t.numel() * t.element_size()
        self.live += size
        self.peak = max(self.peak, self.live)
        return (t, size)

    def unpack(self, packed):
        return packed[0]

    def backward(self, loss):
        loss.backward()
        self.live = 0  # the graph is freed after backward


def test_activation_memory_is_bounded_by_the_chunk():
    model = make_model(tiny_cfg())
    batch = make_batch(model, n=32)
    full = SavedActivations(model)
    with torch.autograd.graph.saved_tensors_hooks(full.pack, full.unpack):
        full.backward(loss_fn()(model(batch))[0])
    cached = SavedActivations(model)
    with torch.autograd.graph.saved_tensors_hooks(cached.pack, cached.unpack):
        grad_cache_step(model, loss_fn(), batch, 4, lambda s, last: cached.backward(s), shared=("logit_scale",))
    print(f"saved activations: full batch 32 = {full.peak} B, grad cache chunk 4 = {cached.peak} B")
    # chunk 4 of 32: an eighth of the activations, plus the small gathered-embedding loss graph
    assert cached.peak < full.peak / 8 * 1.25


# ---------------------------------------------------------------- DeepSpeed, 2 ranks

# (ZeRO stage, overrides): the four stages (the gradients reduced as train.grad_cache_reduce=auto
# does: once a step, per chunk under ZeRO 3), ZeRO 2 per chunk and ZeRO 3 once a step, and ZeRO 3
# with both towers' activation checkpointing
ZERO_RUNS = {"zero0": (0, []), "zero1": (1, []), "zero2": (2, []), "zero3": (3, []), "zero3_ckpt": (3, CKPT),
             "zero2_chunk": (2, ["train.grad_cache_reduce=chunk"]), "zero3_step": (3, ["train.grad_cache_reduce=step"]),
             "zero0_siglip": (0, SIGLIP), "zero2_local_tiled": (2, LOSSES["infonce_local_tiled"]),
             "zero1_ring": (1, LOSSES["infonce_ring"]), "zero2_siglip_ring": (2, LOSSES["siglip_ring"]),
             "zero3_siglip_tiled": (3, LOSSES["siglip_tiled"])}
CHUNKS = 4  # per rank: B // 2 ranks // chunk 2


def _deepspeed_ranks(rank, world, out_dir, runs=tuple(ZERO_RUNS)):
    import deepspeed
    from deepspeed.utils import safe_get_full_grad
    deepspeed.init_distributed(dist_backend="gloo")
    from mmscale.cli.bench.instruments import CommCounter
    from mmscale.dist import all_reduce_sum
    from mmscale.engine.backend import initialize
    from mmscale.engine.reduction import GradReduction
    for run in runs:
        stage, extra = ZERO_RUNS[run]
        cfg = tiny_cfg(f"train.zero_stage={stage}", "train.precision=fp32", f"train.global_batch_size={B}",
                       "model.learn_temperature=true", *extra)
        model = make_model(cfg)
        batch = make_batch(model)
        n = B // world
        local = {k: v[rank * n:(rank + 1) * n] for k, v in batch.items()}
        engine = initialize(model, cfg, n)  # the trainer's: DeepSpeed around torch's Adam
        reduction = GradReduction(engine, n // 2, cfg.train.grad_cache_reduce)  # the trainer's
        with CommCounter() as count, reduction.step():
            loss, _ = grad_cache_step(engine, loss_fn(cfg), local, 2, reduction.backward, shared=SHARED)
        # the gradients' reductions: DeepSpeed's reducing collectives (the loss's gathers are mmscale's)
        reduced = [r for r in count.table() if r["package"] == "deepspeed" and r["collective"] in
                   ("all_reduce", "reduce_scatter", "reduce")]
        loss = torch.tensor(all_reduce_sum(loss) / world)  # the local losses (siglip, local) differ per rank; their mean is the loss
        grads = {name: safe_get_full_grad(p) for name, p in engine.module.named_parameters()}
        if rank == 0:
            torch.save({"loss": loss, "grads": grads, "reduces": engine.enable_backward_allreduce,
                        "reduced": reduced, "per_chunk": reduction.mode == "chunk"}, os.path.join(out_dir, f"{run}.pt"))
        engine.step()
        engine.destroy()


@pytest.mark.slow
def test_deepspeed_zero_stages_equal_full_batch(tmp_path):
    """2 ranks, 4 chunks each: the gradients equal the full batch's under every stage and loss, and
    cross ranks once a step (one reducing collective over every gradient, counted by the bench's
    CommCounter) except ZeRO 2-3 with train.grad_cache_reduce=chunk (ZeRO 3's default): 4."""
    run_ranks(_deepspeed_ranks, 2, str(tmp_path))
    report = {}
    for run, (stage, extra) in ZERO_RUNS.items():
        cfg = tiny_cfg("model.learn_temperature=true", *extra)
        model = make_model(cfg)
        ref_loss, ref = full_batch_grads(model, make_batch(model), cfg)
        got = torch.load(tmp_path / f"{run}.pt")
        passes = CHUNKS if got["per_chunk"] else 1
        asked = next((o.split("=")[1] for o in extra if o.startswith("train.grad_cache_reduce=")), "auto")
        assert got["per_chunk"] == (asked == "chunk" or asked == "auto" and stage == 3), run
        assert sum(r["calls"] for r in got["reduced"]) == passes, (run, got["reduced"])
        # every gradient once a pass (give or take ZeRO 3's padding, and the temperature's, which
        # comes with one chunk only)
        volume = sum(r["bytes"] for r in got["reduced"]) / (4 * sum(g.numel() for g in ref.values()))
        assert volume == pytest.approx(passes, rel=0.01), (run, got["reduced"])
        assert torch.allclose(got["loss"], ref_loss, atol=1e-6), run
        diffs = []
        for name, g in ref.items():
            assert got["grads"][name] is not None, (run, name)
            assert torch.allclose(got["grads"][name].reshape(g.shape), g, atol=1e-5, rtol=1e-4), (run, name)
            diffs.append((got["grads"][name].reshape(g.shape) - g).abs().max().item())
        report[run] = max(diffs)
    print("max abs grad diff vs single-process full batch:", json.dumps(report))



# ---------------------------------------------------------------- bf16: chunks summed in fp32

BF16_CHUNKS = (2, 8, 32)  # chunks per rank of 32 samples; 1 is the plain step
BF16_BATCH = 64  # 2 ranks x 32


class _ClipTask:
    """The trainer's view of the dual encoder (tasks/clip.py's forward and loss), for TrainStep."""
    shared_outputs = SHARED

    def __init__(self, cfg):
        self.cfg = cfg

    def forward(self, model, batch, progress):
        return model(batch)

    def loss(self, out, batch, progress):
        return clip_loss(out, self.cfg.loss), {}


def bf16_batch(model, n):
    """make_batch's captions with uint8 images, as the loaders hand them out (the step normalises
    them chunk by chunk)."""
    g = torch.Generator().manual_seed(2)
    return {**make_batch(model, n=n), "image": torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)}


def _bf16_ranks(rank, world, out_dir, runs):
    import deepspeed
    from deepspeed.utils import safe_get_full_grad
    deepspeed.init_distributed(dist_backend="gloo")
    from mmscale.engine.backend import initialize
    from mmscale.engine.step import TrainStep
    n = BF16_BATCH // world
    for stage, mode in runs:
        for chunks in (1, *BF16_CHUNKS):
            cfg = tiny_cfg(f"train.zero_stage={stage}", "train.precision=bf16", f"train.global_batch_size={BF16_BATCH}",
                           "model.learn_temperature=true", f"train.grad_cache_reduce={mode}")
            model = make_model(cfg)
            local = {k: v[rank * n:(rank + 1) * n] for k, v in bf16_batch(model, BF16_BATCH).items()}
            engine = initialize(model, cfg, n)
            step = TrainStep(engine, _ClipTask(cfg), n, n // chunks, mode, torch.bfloat16)  # the trainer's step
            step.forward_backward(local, None)
            grads = {name: safe_get_full_grad(p).float() for name, p in engine.module.named_parameters()}
            if rank == 0:
                torch.save(grads, os.path.join(out_dir, f"zero{stage}-{mode}-{chunks}.pt"))
            engine.destroy()


def relative_difference(a: dict, b: dict) -> float:
    """||a - b|| / ||b|| over every parameter's gradient."""
    diff = sum(((a[k].reshape(b[k].shape) - b[k]) ** 2).sum() for k in b)
    return float((diff / sum((v ** 2).sum() for v in b.values())).sqrt())


@pytest.mark.slow
@pytest.mark.parametrize("runs", [[(2, "auto"), (3, "step"), (0, "auto")],
                                  pytest.param([(1, "auto"), (3, "auto")], marks=LONG)],
                         ids=["zero2-zero3step-zero0", "zero1-zero3chunk"])
def test_bf16_chunks_are_summed_in_fp32(tmp_path, runs):
    """bf16 on 2 ranks, 32 samples each in 2, 8 and 32 chunks: the cached step's gradients stay
    within sqrt(2) u of the plain bf16 step's (u = 2^-8, bf16's unit roundoff; relative, in norm over
    every gradient) for every number of chunks. The bound: the plain step rounds its gradient to
    bf16 once, the cached step once more (its fp32 sum of the chunks' bf16 gradients, before the
    reduction), each rounding at most u of every element, and independent roundings add in
    quadrature. Summed in bf16 (what DeepSpeed does by itself under ZeRO 0 and coalesced ZeRO 2-3)
    every chunk rounds the running sum once more: about u sqrt(C / 6) more, which grows with C
    (measured with the fp32 sum switched off: 3.1e-3, 4.6e-3 and 6.8e-3 for 2, 8, 32 chunks under
    ZeRO 2, 7.2e-3 under ZeRO 0 at 32: over the bound)."""
    run_ranks(_bf16_ranks, 2, str(tmp_path), runs)
    bound = math.sqrt(2) * 2 ** -8
    for stage, mode in runs:
        plain = torch.load(tmp_path / f"zero{stage}-{mode}-1.pt")
        diffs = {c: relative_difference(torch.load(tmp_path / f"zero{stage}-{mode}-{c}.pt"), plain) for c in BF16_CHUNKS}
        print(f"ZeRO {stage} ({mode}) bf16, cached step vs plain step, by chunks per rank: "
              + ", ".join(f"{c}: {d:.2e}" for c, d in diffs.items()) + f" (bound {bound:.2e})")
        assert all(d <= bound for d in diffs.values()), (stage, mode, diffs, bound)

def test_one_rank_zero0_skips_the_identity_reduction():
    """On one rank, ZeRO 0 leaves out DeepSpeed's gradient all-reduce (a flatten, an all-reduce and a
    copy back that change nothing there); the gradients are still the full-batch ones."""
    import tempfile
    with tempfile.TemporaryDirectory() as out:
        run_ranks(_deepspeed_ranks, 1, out, ("zero0",))
        got = torch.load(os.path.join(out, "zero0.pt"))
    model = make_model(tiny_cfg("model.learn_temperature=true"))
    ref_loss, ref = full_batch_grads(model, make_batch(model))
    assert got["reduces"] is False
    assert torch.allclose(got["loss"], ref_loss, atol=1e-6)
    for name, g in ref.items():
        assert torch.allclose(got["grads"][name].reshape(g.shape), g, atol=1e-5, rtol=1e-4), name


def test_a_trainable_batchnorm_tower_is_refused_under_the_cache():
    """Per-chunk BatchNorm statistics make the cache inexact: one config line, the way out named."""
    from mmscale.config import ConfigError
    from mmscale.gradcache import check_exact
    bn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(ConfigError, match=r"train.grad_cache_chunk: the image tower has 1 trainable BatchNorm.*"
                                          r"model.image.freeze=true"):
        check_exact({"image": bn, "text": nn.LayerNorm(4)})
    for p in bn.parameters():
        p.requires_grad_(False)
    check_exact({"image": bn, "text": nn.LayerNorm(4)})  # frozen: fine

