"""On a CUDA GPU (`pytest -m gpu`; skipped without one; tools/gpu_check.sh runs them): the bf16
step under ZeRO 0, 2 and 3 for timm + transformers and for open_clip towers, the gradient cache
against the plain step in bf16, compiled against eager, the temperature clamp in bf16, and with
2+ GPUs the tiny recipe on 2 NCCL ranks logging, evaluating, checkpointing and resuming on 1."""
import importlib.util
import math
import os

import pytest
import torch

from conftest import ROOT
from helpers import OPEN_CLIP_TOWERS, finish, fp32_master, launch, records

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
# what a GPU or its image may lack, each case skipped with the reason
BF16 = pytest.mark.skipif(torch.cuda.is_available() and not torch.cuda.is_bf16_supported(including_emulation=False),
                          reason="needs a GPU with native bf16 (compute capability 8.0+)")
TRITON = pytest.mark.skipif(torch.cuda.is_available() and importlib.util.find_spec("triton") is None,
                            reason="inductor's GPU kernels need Triton, which this torch lacks")

TOWERS = {"timm_hf": [], "open_clip": OPEN_CLIP_TOWERS}


def train(run_dir, *overrides, gpus=1, timeout=600):
    """recipes/tiny.yaml on `gpus` GPUs (torchrun for 2+), NCCL as the default group; its output."""
    return finish(launch(run_dir, *overrides, ranks=gpus, env={"OMP_NUM_THREADS": "2"}), timeout=timeout)


@BF16
@pytest.mark.parametrize("stage", [0, 2, 3])
@pytest.mark.parametrize("towers", sorted(TOWERS))
def test_bf16_step_under_zero(stage, towers, tmp_path):
    run_dir = str(tmp_path / "run")
    train(run_dir, *TOWERS[towers], "train.precision=bf16", f"train.zero_stage={stage}", "train.steps=4",
          "train.log_every=1", "train.grad_cache_chunk=8", "eval.zeroshot=false")
    losses = [r["loss"] for r in records(run_dir) if "loss" in r]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] + 0.5  # trains, not diverges (4 steps on the tiny recipe)


def _cached_and_plain_grads(dtype, compile_backend=None):
    from mmscale.config import load_config
    from mmscale.gradcache import grad_cache_step
    from mmscale.losses import contrastive_loss
    from mmscale.models import DualEncoder
    cfg = load_config(os.path.join(ROOT, "recipes", "tiny.yaml"))  # dropout-free towers
    torch.manual_seed(0)
    model = DualEncoder(cfg.model).cuda().to(dtype)
    if compile_backend:
        for tower in model.named_towers().values():
            tower.compile(backend=compile_backend)
    g = torch.Generator().manual_seed(1)
    texts = [f"a photo of the number {i}" for i in range(32)]
    batch = {"image": torch.randn(32, 3, 32, 32, generator=g).cuda().to(dtype),
             **{k: v.cuda() for k, v in model.tokenize(texts).items()}}

    def loss_fn(out):
        return contrastive_loss(out["image"], out["text"], out["logit_scale"]), {}

    def grads():
        out = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        return out
    loss_fn(model(batch))[0].backward()
    plain = grads()
    grad_cache_step(model, loss_fn, batch, 8, lambda s, last: s.backward(), shared=("logit_scale",))
    return plain, grads()


def _relative_error(a: dict, b: dict) -> float:
    num = sum(((a[k] - b[k]) ** 2).sum() for k in a) ** 0.5
    return float(num / sum((b[k] ** 2).sum() for k in b) ** 0.5)


@BF16
def test_gradient_cache_in_bf16_matches_the_plain_bf16_step():
    """Same global batch (32 rows, chunks of 8) with bf16 weights and activations. Each chunk's
    matmuls round to bf16 (8-bit mantissa, 2^-8 ~ 4e-3 relative per op) in another order than
    the full batch's, so exact equality cannot hold: the whole gradient vector must agree to 2e-2
    relative (a dropped chunk or a wrong scale gives >= 0.25), and fp32 on the GPU to 1e-4."""
    plain, cached = _cached_and_plain_grads(torch.bfloat16)
    assert plain.keys() == cached.keys()
    assert _relative_error(cached, plain) < 2e-2
    plain32, cached32 = _cached_and_plain_grads(torch.float32)
    assert _relative_error(cached32, plain32) < 1e-4


@TRITON
def test_compiled_matches_eager_on_the_gpu():
    """inductor (Triton kernels) against eager, fp32, plain and gradient-cached: 1e-4 relative
    (TF32 stays off by default for matmuls in torch; the difference is fusion order)."""
    eager_plain, eager_cached = _cached_and_plain_grads(torch.float32)
    torch._dynamo.reset()
    comp_plain, comp_cached = _cached_and_plain_grads(torch.float32, compile_backend="inductor")
    assert _relative_error(comp_plain, eager_plain) < 1e-4
    assert _relative_error(comp_cached, eager_cached) < 1e-4


@BF16
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_temperature_clamp_under_bf16(stage, tmp_path):
    run_dir = str(tmp_path / "run")
    train(run_dir, "model.learn_temperature=true", "model.temperature=0.0099", "train.precision=bf16",
          f"train.zero_stage={stage}", "train.steps=3", "eval.zeroshot=false")
    master = fp32_master(run_dir, "step00000003", stage)
    assert master.dtype == torch.float32
    assert math.log(100) - 0.05 < master.item() <= math.log(100) + 1e-6


@BF16
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_nccl_ranks_log_evaluate_checkpoint_and_resume_on_one(tmp_path):
    run_dir = str(tmp_path / "run")
    train(run_dir, "train.steps=6", "train.eval_every=3", "train.checkpoint_every=3", "train.log_every=1",
          "train.zero_stage=2", "train.precision=bf16", gpus=2)
    recs = records(run_dir)
    assert [r["step"] for r in recs if "loss" in r] == list(range(1, 7))
    assert [r["step"] for r in recs if "train/loss" in r] == [3, 6]  # evaluations, gathered over NCCL
    out = train(run_dir, "train.steps=9", "train.zero_stage=2", "train.precision=bf16", "train.log_every=1", gpus=1)
    assert "was written by 2 ranks, this run has 1" in out
    steps = [r["step"] for r in records(run_dir) if "loss" in r]
    assert steps[-3:] == [7, 8, 9]
