"""The contrastive loss against open_clip's ClipLoss, a literal transcription of CMLA eq. 5-8,
and, on 2 gloo ranks, against the single-process full-batch loss and gradients."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from distributed import run_ranks
from mmscale.losses import contrastive_loss


def features(n=12, d=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, d, generator=g), dim=-1), F.normalize(torch.randn(n, d, generator=g), dim=-1))


def cmla_eq_5_8(z_img, z_txt, tau):
    """L = 1/2 (L_i2t + L_t2i), L_i2t = -1/N sum_i log exp(s_ii/tau) / sum_j exp(s_ij/tau)."""
    n = len(z_img)
    s = [[float(z_img[i] @ z_txt[j]) for j in range(n)] for i in range(n)]
    i2t = -sum(math.log(math.exp(s[i][i] / tau) / sum(math.exp(s[i][j] / tau) for j in range(n))) for i in range(n)) / n
    t2i = -sum(math.log(math.exp(s[i][i] / tau) / sum(math.exp(s[j][i] / tau) for j in range(n))) for i in range(n)) / n
    return 0.5 * (i2t + t2i)


@pytest.mark.parametrize("variant", ["global", "local"])
def test_matches_open_clip_and_the_paper(variant):
    img, txt = features()
    scale = torch.tensor([1 / 0.07])
    ours = contrastive_loss(img, txt, scale, variant)
    assert torch.allclose(ours, ClipLoss()(img, txt, scale[0]), atol=1e-6)
    assert ours.item() == pytest.approx(cmla_eq_5_8(img, txt, 0.07), rel=1e-5)
    # swapping a pair's captions must raise the loss: the loss sees the pairing
    assert contrastive_loss(img, txt.flip(0), scale, variant) > ours


class TwoTowers(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.img, self.txt = nn.Linear(6, 5), nn.Linear(4, 5)
        self.log_scale = nn.Parameter(torch.tensor([math.log(1 / 0.07)]))

    def forward(self, x, y):
        return F.normalize(self.img(x), dim=-1), F.normalize(self.txt(y), dim=-1), self.log_scale.exp()


def batch(n=16):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=g), torch.randn(n, 4, generator=g)


def _ranks_loss(rank, world, variant, out_path):
    import torch.distributed as dist
    model = TwoTowers()
    x, y = batch()
    n = len(x) // world
    loss = contrastive_loss(*model(x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]), variant)
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():  # DDP/DeepSpeed convention: average over ranks
        dist.all_reduce(p.grad)
        grads[name] = p.grad / world
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    if rank == 0:
        torch.save({"loss": mean_loss / world, "grads": grads}, out_path)


@pytest.mark.parametrize("variant", ["global", "local"])
def test_two_ranks_equal_single_process_full_batch(variant, tmp_path):
    run_ranks(_ranks_loss, 2, variant, str(tmp_path / "r.pt"))
    got = torch.load(tmp_path / "r.pt")
    model = TwoTowers()
    ref = contrastive_loss(*model(*batch()))
    ref.backward()
    assert torch.allclose(got["loss"], ref, atol=1e-6)
    for name, p in model.named_parameters():
        assert torch.allclose(got["grads"][name], p.grad, atol=1e-6), name
