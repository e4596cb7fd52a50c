"""The contrastive losses against open_clip (ClipLoss, SigLipLoss) and literal transcriptions of
CMLA eq. 5-8 and SigLIP eq. 1; tiled and ring forms against the whole logits; and, on 2 and 3 gloo
ranks, every variant against open_clip's and the single-process full-batch loss and gradients."""
import functools
import math
import os

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from conftest import LONG
from distributed import run_ranks
from mmscale.losses import contrastive_loss, siglip_loss


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


# ---------------------------------------------------------------- SigLIP and tiling

def leaves(n=12, d=7, seed=0, scale=10.0, bias=-10.0):
    """Normalised features, a learnt scale and bias, all leaves with gradients."""
    img, txt = features(n, d, seed)
    return (img.requires_grad_(), txt.requires_grad_(), torch.tensor([scale], requires_grad=True),
            torch.tensor([bias], requires_grad=True))


def grads_of(loss, tensors):
    grads = torch.autograd.grad(loss, tensors, allow_unused=True)  # InfoNCE has no bias
    return [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, tensors)]


def siglip_eq_1(z_img, z_txt, t, b, keys=None):
    """SigLIP (Zhai et al. 2023) eq. 1: -1/|B| sum_i sum_j log 1 / (1 + exp(z_ij (-t x_i . y_j - b))),
    z_ij = 1 for a pair (with keys: for rows sharing a key), -1 otherwise."""
    n = len(z_img)
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if (i == j if keys is None else keys[i] == keys[j]) else -1.0
            total += math.log(1.0 / (1.0 + math.exp(z * (-t * float(z_img[i] @ z_txt[j]) - b))))
    return -total / n


@pytest.mark.parametrize("tile", [0, 5])
def test_siglip_matches_open_clip_and_the_paper(tile):
    from open_clip.loss import SigLipLoss
    img, txt, scale, bias = leaves(scale=3.0, bias=-2.0)
    ours = siglip_loss(img, txt, scale, bias, tile=tile)
    ref = SigLipLoss()(img, txt, scale[0], bias[0])
    assert torch.allclose(ours, ref, atol=1e-6)
    assert ours.item() == pytest.approx(siglip_eq_1(img.detach(), txt.detach(), 3.0, -2.0), rel=1e-5)
    for got, want in zip(grads_of(ours, [img, txt, scale, bias]), grads_of(ref, [img, txt, scale, bias])):
        assert torch.allclose(got, want, atol=1e-6)
    assert siglip_loss(img, txt.flip(0), scale, bias, tile=tile) > ours


@pytest.mark.parametrize("variant", ["global", "local"])
@pytest.mark.parametrize("n,tile", [(12, 4), (13, 5), (13, 1), (7, 16)])  # divisible, not, 1 x 1, one partial tile
def test_tiled_infonce_equals_the_whole_logits(variant, n, tile):
    img, txt, scale, _ = leaves(n=n, scale=1 / 0.07)
    whole = contrastive_loss(img, txt, scale, variant)
    tiled = contrastive_loss(img, txt, scale, variant, tile=tile)
    assert torch.allclose(tiled, whole, atol=1e-5)
    for got, want in zip(grads_of(tiled, [img, txt, scale]), grads_of(whole, [img, txt, scale])):
        assert torch.allclose(got, want, atol=1e-6)


def test_tiled_losses_hold_no_logit_matrix():
    """Every tensor autograd keeps for the backward is at most one embedding matrix (the tiled
    functions recompute their blocks there): the B x B logits are never held, nor, with several
    positives per row, a B x B mask (the keys are compared where each block is)."""
    n, d, tile = 64, 4, 8
    img, txt, scale, bias = leaves(n=n, d=d)
    keys = torch.arange(n) // 4
    biggest = []

    def pack(t):
        biggest.append(t.numel())
        return t

    for loss_fn in (lambda: contrastive_loss(img, txt, scale, "global", tile=tile),
                    lambda: siglip_loss(img, txt, scale, bias, tile=tile),
                    lambda: contrastive_loss(img, txt, scale, "global", tile=tile, keys=keys),
                    lambda: siglip_loss(img, txt, scale, bias, tile=tile, keys=keys)):
        biggest.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = loss_fn()
        assert max(biggest) <= n * d < n * n, biggest
        loss.backward()
    biggest.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        contrastive_loss(img, txt, scale, "global")
    assert max(biggest) == n * n  # the check sees the whole matrix where there is one


def _ranks_siglip(rank, world, out_dir):
    """This rank's SigLIP loss and its features' gradients: open_clip's SigLipLoss (bidir and
    gather) against ours with both exchanges, whole and tiled."""
    from open_clip.loss import SigLipLoss
    img, txt, scale, bias = leaves(n=6 * world, scale=3.0, bias=-2.0)
    n = 6
    rows = slice(rank * n, (rank + 1) * n)
    results = {}
    for mode in ("bidir", "gather", "ring"):
        for tile in (0, 4):
            local = [img.detach()[rows].clone().requires_grad_(), txt.detach()[rows].clone().requires_grad_(),
                     scale.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()]
            loss = siglip_loss(*local, exchange=mode, tile=tile)
            results[f"ours-{mode}-{tile}"] = (loss.detach(), grads_of(loss, local))
        if mode == "ring":
            continue  # open_clip has no ring exchange
        local = [img.detach()[rows].clone().requires_grad_(), txt.detach()[rows].clone().requires_grad_(),
                 scale.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()]
        ref = SigLipLoss(rank=rank, world_size=world, dist_impl=mode)(local[0], local[1], local[2][0], local[3][0])
        results[f"open_clip-{mode}"] = (ref.detach(), grads_of(ref, local))
    torch.save(results, os.path.join(out_dir, f"siglip{rank}.pt"))


def _ranks_losses(rank, world, out_dir):
    _ranks_siglip(rank, world, out_dir)
    _ranks_tiled(rank, world, out_dir)
    _ranks_positives(rank, world, out_dir)


# 3 ranks: a ring whose left and right neighbours differ; 2 ranks is a second case of the same code
@pytest.mark.parametrize("world", [pytest.param(2, marks=LONG), 3])
def test_losses_on_ranks_equal_open_clip_and_the_full_batch(world, tmp_path):
    """One launch of `world` gloo ranks for the three checks below (each launch costs seconds)."""
    run_ranks(_ranks_losses, world, str(tmp_path))
    check_siglip_on_ranks(world, tmp_path)
    check_tiled_and_ring_infonce_on_ranks(world, tmp_path)
    check_positives_on_ranks(world, tmp_path)


def check_siglip_on_ranks(world, tmp_path):
    img, txt, scale, bias = leaves(n=6 * world, scale=3.0, bias=-2.0)
    full = siglip_loss(img, txt, scale, bias)
    full_grads = grads_of(full, [img, txt, scale, bias])
    per_rank = [torch.load(tmp_path / f"siglip{r}.pt") for r in range(world)]
    for key in per_rank[0]:
        for r in range(world):
            want_loss, want_grads = per_rank[r]["open_clip-bidir"]
            got_loss, got_grads = per_rank[r][key]
            assert torch.allclose(got_loss, want_loss, atol=1e-5), (key, r)
            for got, want in zip(got_grads, want_grads):
                assert torch.allclose(got, want, atol=1e-5), (key, r)
        # the mean of the ranks' losses, and the ranks' feature gradients over the world, are the
        # full batch's (the parameters average over ranks: the local convention)
        assert torch.allclose(sum(p[key][0] for p in per_rank) / world, full, atol=1e-5), key
        img_grad = torch.cat([p[key][1][0] for p in per_rank]) / world
        assert torch.allclose(img_grad, full_grads[0], atol=1e-6), key
        assert torch.allclose(sum(p[key][1][3] for p in per_rank) / world, full_grads[3], atol=1e-6), key


def _ranks_tiled(rank, world, out_dir):
    img, txt, scale, bias = leaves(n=13 * world, scale=1 / 0.07)
    n = 13
    rows = slice(rank * n, (rank + 1) * n)
    results, held = {}, {}
    losses = {f"{variant}-{tile}": functools.partial(contrastive_loss, variant=variant, tile=tile)
              for variant in ("global", "local", "ring") for tile in (0, 5)}
    losses["siglip-ring-5"] = lambda i, t, s: siglip_loss(i, t, s, bias.detach(), exchange="ring", tile=5)
    for key, fn in losses.items():
        local = [img.detach()[rows].clone().requires_grad_(), txt.detach()[rows].clone().requires_grad_(),
                 scale.detach().clone().requires_grad_()]
        sizes = [0]
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            loss = fn(*local)
        held[key] = max(sizes)
        results[key] = (loss.detach(), grads_of(loss, local))
    torch.save({"results": results, "held": held}, os.path.join(out_dir, f"tiled{rank}.pt"))


def check_tiled_and_ring_infonce_on_ranks(world, tmp_path):
    """13 rows per rank in tiles of 5 (not divisible), a learnt temperature: each rank's feature
    and temperature gradients, averaged over ranks as DeepSpeed does, equal the full batch's, for
    the global, local and ring variants. The ring holds nothing larger than a rank's own rows for
    the backward (the gathers hold all W ranks'), and SigLIP's ring no more either."""
    img, txt, scale, _ = leaves(n=13 * world, scale=1 / 0.07)
    full = contrastive_loss(img, txt, scale)
    full_grads = grads_of(full, [img, txt, scale])
    saved = [torch.load(tmp_path / f"tiled{r}.pt") for r in range(world)]
    per_rank = [s["results"] for s in saved]
    for key in per_rank[0]:
        if key.startswith("siglip"):
            continue
        assert torch.allclose(sum(p[key][0] for p in per_rank) / world, full, atol=1e-5), key
        for k, want in enumerate(full_grads[:2]):
            assert torch.allclose(torch.cat([p[key][1][k] for p in per_rank]) / world, want, atol=1e-6), key
        assert torch.allclose(sum(p[key][1][2] for p in per_rank) / world, full_grads[2], atol=1e-5), key
    d = img.shape[1]
    for s in saved:
        assert s["held"]["ring-5"] <= 13 * d and s["held"]["siglip-ring-5"] <= 13 * d, s["held"]
        assert s["held"]["local-5"] == 13 * world * d  # the gathered copy, where there is one


# ---------------------------------------------------------------- several positives per row (loss.positives)

def planted_keys(n, seed=0):
    """n keys drawn from about n / 2 values: pairs, triples and singles, wherever the ranks split them."""
    return torch.randint(0, max(1, n // 2), (n,), generator=torch.Generator().manual_seed(seed))


def supcon_l_out(z_img, z_txt, tau, keys):
    """SupCon's L_out (Khosla et al. 2020, eq. 2) between the modalities, both directions halved,
    loop by loop: l_i = -1/|P(i)| sum_{p in P(i)} log exp(s_ip / tau) / sum_j exp(s_ij / tau),
    P(i) = {j : key_j = key_i}."""
    n = len(z_img)
    s = [[float(z_img[i] @ z_txt[j]) / tau for j in range(n)] for i in range(n)]

    def direction(s):
        total = 0.0
        for i in range(n):
            positives = [p for p in range(n) if keys[p] == keys[i]]
            log_z = math.log(sum(math.exp(s[i][j]) for j in range(n)))
            total -= sum(s[i][p] - log_z for p in positives) / len(positives)
        return total / n
    return 0.5 * (direction(s) + direction([list(col) for col in zip(*s)]))


def dense_positives(img, txt, scale, bias, keys, siglip):
    """The single-process dense reference: InfoNCE as cross-entropy against targets spread evenly
    over each row's positives (L_out in another form), or SigLIP's log-sigmoid of z_ij x_ij."""
    same = (keys[:, None] == keys[None, :]).float()
    logits = scale * img @ txt.T
    if siglip:
        return -F.logsigmoid((2 * same - 1) * (logits + bias)).sum() / len(img)
    targets = same / same.sum(1, keepdim=True)
    return -0.5 * ((targets * logits.log_softmax(1)).sum(1).mean() + (targets * logits.T.log_softmax(1)).sum(1).mean())


def positive_forms(tile):
    """Every contrastive form as fn(image, text, scale, bias, keys) -> this rank's loss."""
    forms = {f"{v}-{tile}": functools.partial(lambda i, t, s, b, k, v: contrastive_loss(i, t, s, v, tile, k), v=v)
             for v in ("global", "local", "ring")}
    forms.update({f"siglip-{e}-{tile}": functools.partial(lambda i, t, s, b, k, e: siglip_loss(i, t, s, b, e, tile, k), e=e)
                  for e in ("bidir", "gather", "ring")})
    return forms


FORMS = {**positive_forms(0), **positive_forms(5)}
ALL_FORMS = {**FORMS, **positive_forms(3)}


def positive_leaves(n=13):
    return leaves(n=n, scale=1 / 0.07, bias=-2.0)


def test_several_positives_are_supcon_l_out_and_siglip_eq_1_with_z_from_the_keys():
    img, txt, scale, bias = positive_leaves()
    keys = planted_keys(13)
    assert 1 < len(set(keys.tolist())) < 13
    for name, fn in positive_forms(0).items():
        got = fn(img, txt, scale, bias, keys).item()
        if name.startswith("siglip"):
            want = siglip_eq_1(img.detach(), txt.detach(), 1 / 0.07, -2.0, keys.tolist())
        else:
            want = supcon_l_out(img.detach(), txt.detach(), 0.07, keys.tolist())
        assert got == pytest.approx(want, rel=1e-5), name
        assert got != pytest.approx(fn(img, txt, scale, bias, None).item(), rel=1e-3), name  # the keys matter


@pytest.mark.parametrize("form", FORMS)
def test_several_positives_equal_the_dense_reference(form):
    """Loss and gradients (features, temperature, bias) of every form, whole and tiled (13 rows in
    tiles of 5), against the dense reference on planted duplicate keys."""
    img, txt, scale, bias = positive_leaves()
    keys = planted_keys(13)
    tensors = [img, txt, scale, bias]
    got = FORMS[form](*tensors, keys)
    want = dense_positives(*tensors, keys, siglip=form.startswith("siglip"))
    assert torch.allclose(got, want, atol=1e-5), (got, want)
    for g, w in zip(grads_of(got, tensors), grads_of(want, tensors)):
        assert torch.allclose(g, w, atol=1e-6), (g - w).abs().max()


@pytest.mark.parametrize("form", FORMS)
def test_unique_keys_give_the_loss_without_keys_bit_for_bit(form):
    img, txt, scale, bias = positive_leaves()
    tensors = [img, txt, scale, bias]
    unique = torch.randperm(1000, generator=torch.Generator().manual_seed(1))[:13]
    with_keys, without = FORMS[form](*tensors, unique), FORMS[form](*tensors, None)
    assert torch.equal(with_keys, without)
    for g, w in zip(grads_of(with_keys, tensors), grads_of(without, tensors)):
        assert torch.equal(g, w)


def _ranks_positives(rank, world, out_dir):
    """Every form on this rank's 7 rows with planted keys (duplicates across ranks), unique keys
    and none; the gradient cache (chunks of 3) over linear towers with keys; which rank each
    bidir block came from; a caption id computed in this process."""
    from mmscale.data.images import stable_id
    from mmscale.dist import other_ranks_blocks, other_ranks_order
    from mmscale.gradcache import grad_cache_step
    n = 7
    rows = slice(rank * n, (rank + 1) * n)
    img, txt, scale, bias = positive_leaves(n * world)
    keys = planted_keys(n * world, seed=world)
    unique = torch.randperm(1000, generator=torch.Generator().manual_seed(1))[:n * world]
    results = {}
    for name, fn in {**positive_forms(0), **positive_forms(3)}.items():
        for label, k in (("planted", keys), ("unique", unique), ("none", None)):
            local = [t.detach()[rows].clone().requires_grad_() for t in (img, txt)]
            local += [scale.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()]
            loss = fn(*local, None if k is None else k[rows])
            results[(name, label)] = (loss.detach(), grads_of(loss, local))
    for name in ("global-3", "ring-0", "siglip-bidir-0"):
        towers = CachedTowers()
        batch = {"x": img.detach()[rows], "y": txt.detach()[rows], "key": keys[rows]}
        loss, _ = grad_cache_step(towers, lambda out: (ALL_FORMS[name](
            out["image"], out["text"], out["logit_scale"], out["logit_bias"], batch["key"]), {}), batch, 3,
            lambda surrogate, last: surrogate.backward(), shared=("logit_scale", "logit_bias"))
        results[("cached", name)] = (loss, param_grads(towers))
    results["order"] = ([int(b) for b in other_ranks_blocks(torch.tensor([float(rank)]))], other_ranks_order())
    results["caption_id"] = stable_id("a photo of a cat")
    torch.save(results, os.path.join(out_dir, f"positives{rank}.pt"))


class CachedTowers(torch.nn.Module):
    """A linear tower per modality and a learnt temperature and bias: a model for the gradient cache."""

    def __init__(self, d=7):
        super().__init__()
        torch.manual_seed(0)
        self.image, self.text = torch.nn.Linear(d, d), torch.nn.Linear(d, d)
        self.log_scale, self.bias = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07))), torch.nn.Parameter(torch.tensor(-2.0))

    def forward(self, batch):
        return {"image": F.normalize(self.image(batch["x"]), dim=-1), "text": F.normalize(self.text(batch["y"]), dim=-1),
                "logit_scale": self.log_scale.exp(), "logit_bias": self.bias}


def param_grads(module):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in module.parameters()]


def check_positives_on_ranks(world, tmp_path):
    """On `world` ranks, each form's mean loss and its gradients (averaged over ranks, as DeepSpeed
    does) are the dense single-process reference's with the same planted keys; unique keys give
    each rank the keyless loss and gradients bit for bit; the gradient cache over towers gives
    the full batch's parameter gradients; bidir's blocks come from the ranks other_ranks_order
    names; a caption's id is the same in every process."""
    from mmscale.data.images import stable_id
    saved = [torch.load(tmp_path / f"positives{r}.pt") for r in range(world)]
    img, txt, scale, bias = positive_leaves(7 * world)
    keys = planted_keys(7 * world, seed=world)
    tensors = [img, txt, scale, bias]
    for name in {**positive_forms(0), **positive_forms(3)}:
        want = dense_positives(*tensors, keys, siglip=name.startswith("siglip"))
        want_grads = grads_of(want, tensors)
        got = [s[(name, "planted")] for s in saved]
        assert torch.allclose(sum(g[0] for g in got) / world, want, atol=1e-5), name
        for k in range(2):
            assert torch.allclose(torch.cat([g[1][k] for g in got]) / world, want_grads[k], atol=1e-6), (name, k)
        for k in range(2, 4):
            assert torch.allclose(sum(g[1][k] for g in got) / world, want_grads[k], atol=1e-5), (name, k)
        for s in saved:
            (loss, grads), (plain, plain_grads) = s[(name, "unique")], s[(name, "none")]
            assert torch.equal(loss, plain) and all(torch.equal(a, b) for a, b in zip(grads, plain_grads)), name
    for name in ("global-3", "ring-0", "siglip-bidir-0"):
        towers = CachedTowers()
        out = towers({"x": img.detach(), "y": txt.detach()})
        loss = ALL_FORMS[name](out["image"], out["text"], out["logit_scale"], out["logit_bias"], keys)
        loss.backward()
        for k, want in enumerate(param_grads(towers)):
            assert torch.allclose(sum(s[("cached", name)][1][k] for s in saved) / world, want, atol=1e-5), (name, k)
    for s in saved:
        assert s["order"][0] == s["order"][1]
        assert s["caption_id"] == stable_id("a photo of a cat")
