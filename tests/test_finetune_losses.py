"""Fine-tuning losses against literal transcriptions of the papers' equations (plain loops over
small tensors, per-element torch ops so autograd can check the gradients too), sanity checks that
follow from the maths, and, on 2 gloo ranks, against the single-process full-batch gradients."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from distributed import run_ranks
from mmscale.dist import gather_outputs, global_index
from mmscale.losses import (m3co_loss, mixup_cross_entropy, multisoftclip_loss, pair_categories,
                            soft_target_contrastive_loss, unis_mmc_loss)

N, D, C = 6, 5, 3


def rand(*shape, seed=0, normalize=False):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return F.normalize(x, dim=-1) if normalize else x


def leaves64(tensors):
    """float64 leaf copies for the transcriptions (so they are the precise reference)."""
    return [t.detach().double().requires_grad_() for t in tensors]


def grads(tensors):
    return [t.grad for t in tensors]


def dot(u, v):
    return sum(u[k] * v[k] for k in range(len(u)))


def unit(u):
    return u / torch.sqrt(dot(u, u))


# ---------------------------------------------------------------- transcriptions of the papers


def cbmf_eq_3_6(a, b, logit_scale, second="T^T", reading="divide"):
    """S_ij = a_i.b_j / tau,  T_ij = exp((a_i.a_j + b_i.b_j)/2tau) / sum_k exp((a_i.a_k + b_i.b_k)/2tau),
    L = 1/2 [ -1/N sum_i sum_j T_ij log(exp S_ij / sum_k exp S_ik)  +  second term ].
    second="T^T": the transposed logits S^T against the transposed targets T^T, row-wise (eq. 6 as
                  CE(S^T, T^T)):  -1/N sum_j sum_i T_ij log(exp S_ij / sum_k exp S_kj)
    second="T":   the same with T_ji in place of T_ij (row j of T, i.e. CE(S^T, T)).
    reading: eq. 5's "(<x_i,x_j> + <y_i,y_j>) / 2 . tau" as / (2 tau) ("divide") or, left to right,
             as / 2 then * tau ("multiply")."""
    n = len(a)
    tau = 1 / logit_scale[0]
    s = [[dot(a[i], b[j]) / tau for j in range(n)] for i in range(n)]

    def eq5_exponent(i, k):
        inner = dot(a[i], a[k]) + dot(b[i], b[k])
        return inner / (2 * tau) if reading == "divide" else inner / 2 * tau
    e = [[torch.exp(eq5_exponent(i, k)) for k in range(n)] for i in range(n)]
    t = [[e[i][j] / sum(e[i]) for j in range(n)] for i in range(n)]
    first = -sum(t[i][j] * torch.log(torch.exp(s[i][j]) / sum(torch.exp(s[i][k]) for k in range(n)))
                 for i in range(n) for j in range(n)) / n
    target = (lambda j, i: t[i][j]) if second == "T^T" else (lambda j, i: t[j][i])
    second = -sum(target(j, i) * torch.log(torch.exp(s[i][j]) / sum(torch.exp(s[k][j]) for k in range(n)))
                  for j in range(n) for i in range(n)) / n
    return 0.5 * (first + second)


def unis_mmc_eq(embeddings, logits, labels, tau=0.07):
    """Per unordered pair (m, n): sample i is P (both unimodal predictions right), SP (one right)
    or N (both wrong); s_i = cos(r_i^m, r_i^n)/tau; L_mn = -log(sum_{P,SP} e^s_i / sum_all e^s_i),
    0 if there is no P/SP sample; the right modality of an SP sample is detached."""
    m_count, n = len(embeddings), len(labels)
    correct = [[int(torch.argmax(logits[m][i])) == int(labels[i]) for i in range(n)] for m in range(m_count)]
    total = 0.0
    for m in range(m_count):
        for o in range(m + 1, m_count):
            s, keep = [], []
            for i in range(n):
                rm, ro = embeddings[m][i], embeddings[o][i]
                cm, co = correct[m][i], correct[o][i]
                if cm and not co:
                    rm = rm.detach()
                if co and not cm:
                    ro = ro.detach()
                s.append(dot(unit(rm), unit(ro)) / tau)
                keep.append(cm or co)
            if not any(keep):
                continue
            total = total - torch.log(sum(torch.exp(s[i]) for i in range(n) if keep[i])
                                      / sum(torch.exp(s[i]) for i in range(n)))
    return total


def unis_mmc_code_first_row(embeddings, logits, labels, tau=0.07):
    """The expression of the authors' UniSMMConLoss (Vincent-ZHQ/UniS-MMC, model/model.py), per pair
    m < n: the logits are row 0 of the cross-sample matrix, s_j = cos(r_0^m, r_j^n)/tau, with the
    same detaching of the right side of a semi-positive pair; value -log( (sum_{j kept} e^s_j /
    sum_j e^s_j) / #kept ); no kept sample: every sample kept and detached, i.e. log N."""
    m_count, n = len(embeddings), len(labels)
    correct = [[int(torch.argmax(logits[m][i])) == int(labels[i]) for i in range(n)] for m in range(m_count)]
    total = 0.0
    for m in range(m_count):
        for o in range(m + 1, m_count):
            keep = [correct[m][i] or correct[o][i] for i in range(n)]
            if not any(keep):
                total = total + math.log(n)
                continue
            ra = embeddings[m][0].detach() if correct[m][0] and not correct[o][0] else embeddings[m][0]
            rb = [embeddings[o][j].detach() if correct[o][j] and not correct[m][j] else embeddings[o][j]
                  for j in range(n)]
            e = [torch.exp(dot(unit(ra), unit(rb[j])) / tau) for j in range(n)]
            total = total - torch.log(sum(e[j] for j in range(n) if keep[j]) / sum(e) / sum(keep))
    return total


def pair_list(m_count, pairs):
    """Ordered modality pairs: all m != n, or the authors' cyclic m -> m + 1 (mod M)."""
    if pairs == "all":
        return [(m, o) for m in range(m_count) for o in range(m_count) if o != m]
    return [(m, (m + 1) % m_count) for m in range(m_count)]


def m3col_eq_6_8_12(mixed, clean, perms, lambdas, tau=0.1, pairs="all", reverse=True):
    """For an ordered pair (m, n), p~_i = unit(mixed_m[i]), q_j = unit(clean_n[j]), k_i = perm_m(i):
    mixed anchor  -1/N sum_i [lam_i log sigma_i(i) + (1 - lam_i) log sigma_i(k_i)],
                  sigma_i(j) = exp(p~_i.q_j/tau) / sum_l exp(p~_i.q_l/tau)
    clean anchor  -1/N sum_i [lam_i log rho_i(i) + (1 - lam_i) log rho_{k_i}(i)],
                  rho_j(i) = exp(p~_i.q_j/tau) / sum_l exp(p~_l.q_j/tau)   (q_j against all mixed p~)
    l(m->n) = 1/2 [mixed anchor + clean anchor] (eq. 6-7 both directions, 1/2 per pair, eq. 12);
    L = sum over the pairs. reverse=False keeps the mixed anchor alone (for the checks below)."""
    n = len(mixed[0])
    total = 0.0
    for m, o in pair_list(len(mixed), pairs):
        q = [unit(clean[o][j]) for j in range(n)]
        p = [unit(mixed[m][i]) for i in range(n)]
        e = [[torch.exp(dot(p[i], q[j]) / tau) for j in range(n)] for i in range(n)]

        def sigma(i, j):
            return e[i][j] / sum(e[i])

        def rho(j, i):
            return e[i][j] / sum(e[l][j] for l in range(n))
        fwd, back = 0.0, 0.0
        for i in range(n):
            k, lam = int(perms[m][i]), lambdas[m][i]
            fwd = fwd + lam * torch.log(sigma(i, i)) + (1 - lam) * torch.log(sigma(i, k))
            back = back + lam * torch.log(rho(i, i)) + (1 - lam) * torch.log(rho(k, i))
        total = total + (0.5 * (-fwd / n - back / n) if reverse else -fwd / n)
    return total


def m3co_eq_2_6_8(p1, p2, pt1, pt2, j, k, lam, tau=0.1):
    """Two modalities, eq. 5-8 term by term. p1, p2: clean embeddings; pt1 = p~^(1) (sample i's
    modality 1 mixed with j_i, eq. 2), pt2 = p~^(2) (modality 2 mixed with k_i); one lam_i for both.
    L_sim(u, V; m) = -log(exp(u.V_m/tau) / sum_l exp(u.V_l/tau)), every vector L2-normalised;
    L^(1) = 1/N sum_i [lam_i L_sim(pt1_i, p2; i) + (1 - lam_i) L_sim(pt1_i, p2; j_i)]
          + 1/N sum_i {lam_i L_sim(p2_i, pt1; i) + (1 - lam_i) L_sim(p2_{j_i}, pt1; i)}     (eq. 6)
    L^(2) the same with pt2, p1 and k                                                  (eq. 7)
    L = 1/2 (L^(1) + L^(2))                                                            (eq. 8)"""
    n = len(p1)
    p1, p2 = [unit(v) for v in p1], [unit(v) for v in p2]
    pt1, pt2 = [unit(v) for v in pt1], [unit(v) for v in pt2]

    def l_sim(u, vs, m):
        return -torch.log(torch.exp(dot(u, vs[m]) / tau) / sum(torch.exp(dot(u, v) / tau) for v in vs))

    def eq_6(mixed, other, partner):
        first = sum(lam[i] * l_sim(mixed[i], other, i) + (1 - lam[i]) * l_sim(mixed[i], other, int(partner[i]))
                    for i in range(n)) / n
        second = sum(lam[i] * l_sim(other[i], mixed, i) + (1 - lam[i]) * l_sim(other[int(partner[i])], mixed, i)
                     for i in range(n)) / n
        return first + second
    return 0.5 * (eq_6(pt1, p2, j) + eq_6(pt2, p1, k))


def multisoftclip_eq_9_11(embeddings, tau=0.1, pairs="all", reverse="transposed"):
    """For an ordered pair (m, n), p = unit(emb_m), q = unit(emb_n), t_ij = softmax_j(q_i.q_j/tau):
    forward  -1/N sum_i sum_j t_ij log softmax_j(p_i.q_j/tau)
    reverse  -1/N sum_j sum_i w_ji log softmax_i(p_i.q_j/tau), with w_ji = t_ij ("transposed":
             anchor q_j's target on p_i is the forward target of pair (i, j)) or w_ji = t_ji ("rows",
             the authors' code: row j of t);
    l(m->n) = 1/2 [forward + reverse]; L = sum over the pairs."""
    n = len(embeddings[0])
    total = 0.0
    for m, o in pair_list(len(embeddings), pairs):
        p = [unit(embeddings[m][i]) for i in range(n)]
        q = [unit(embeddings[o][i]) for i in range(n)]
        eq = [[torch.exp(dot(q[i], q[j]) / tau) for j in range(n)] for i in range(n)]
        t = [[eq[i][j] / sum(eq[i]) for j in range(n)] for i in range(n)]
        ep = [[torch.exp(dot(p[i], q[j]) / tau) for j in range(n)] for i in range(n)]
        fwd = sum(t[i][j] * torch.log(ep[i][j] / sum(ep[i])) for i in range(n) for j in range(n))
        w = (lambda j, i: t[i][j]) if reverse == "transposed" else (lambda j, i: t[j][i])
        back = sum(w(j, i) * torch.log(ep[i][j] / sum(ep[l][j] for l in range(n))) for j in range(n) for i in range(n))
        total = total + 0.5 * (-fwd / n - back / n)
    return total


def mixup_ce_eq(logits, labels, perm, lam):
    """mean_i [lam_i CE(logits_i, y_i) + (1 - lam_i) CE(logits_i, y_perm(i))]."""
    n = len(labels)

    def ce(row, y):
        return -math.log(math.exp(float(row[y])) / sum(math.exp(float(v)) for v in row))
    return sum(float(lam[i]) * ce(logits[i], int(labels[i])) + (1 - float(lam[i])) * ce(logits[i], int(labels[perm[i]]))
               for i in range(n)) / n


# ---------------------------------------------------------------- 1. CBMF soft-target contrastive


def test_soft_target_matches_cbmf_eq_3_6_value_and_gradients():
    a, b = rand(N, D, seed=1, normalize=True), rand(N, D, seed=2, normalize=True)
    scale = torch.tensor([1 / 0.2])
    ours_in = [a.clone().requires_grad_(), b.clone().requires_grad_(), scale.clone().requires_grad_()]
    ours = soft_target_contrastive_loss(*ours_in)
    ours.backward()
    ref_in = leaves64([a, b, scale])
    ref = cbmf_eq_3_6(*ref_in)
    ref.backward()
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    # the data tells the two readings of the second term apart (T^T vs T as its targets)
    other = cbmf_eq_3_6(*leaves64([a, b, scale]), second="T").item()
    assert abs(other - ref.item()) > 1e-3
    # gradients flow through the soft targets as well (they depend on a, b and tau): no detach
    for got, want in zip(grads(ours_in), grads(ref_in)):
        assert torch.allclose(got.double(), want, atol=1e-5), (got, want)
    # ... and that matters here: detached targets would give a clearly different gradient
    det_in = leaves64([a, b, scale])
    with torch.no_grad():
        t = torch.softmax((det_in[0] @ det_in[0].T + det_in[1] @ det_in[1].T) * det_in[2] / 2, dim=-1)
    s = det_in[2] * det_in[0] @ det_in[1].T
    (0.5 * (-(t * s.log_softmax(-1)).sum(-1).mean() - (t.T * s.T.log_softmax(-1)).sum(-1).mean())).backward()
    assert not torch.allclose(det_in[0].grad, ref_in[0].grad, atol=1e-3)


def test_cbmf_target_scale_both_readings_of_eq_5():
    """loss.cbmf_target_scale: "divide" (T's exponent / (2 tau)) and "multiply" (/ 2 * tau) each
    match their transcription of eq. 3-6 in value and gradients (tau included); tau != 1 tells
    them apart."""
    a, b = rand(N, D, seed=3, normalize=True), rand(N, D, seed=4, normalize=True)
    scale = torch.tensor([1 / 0.3])
    values = {}
    for reading in ("divide", "multiply"):
        ours_in = [a.clone().requires_grad_(), b.clone().requires_grad_(), scale.clone().requires_grad_()]
        ours = soft_target_contrastive_loss(*ours_in, scale_targets=reading)
        ours.backward()
        ref_in = leaves64([a, b, scale])
        ref = cbmf_eq_3_6(*ref_in, reading=reading)
        ref.backward()
        assert ours.item() == pytest.approx(ref.item(), rel=1e-5), reading
        for got, want in zip(grads(ours_in), grads(ref_in)):
            assert torch.allclose(got.double(), want, atol=1e-5), reading
        values[reading] = ours.item()
    assert abs(values["divide"] - values["multiply"]) > 1e-2
    assert values["divide"] == pytest.approx(soft_target_contrastive_loss(a, b, scale).item())  # the default
    with pytest.raises(ValueError, match="cbmf_target_scale"):
        soft_target_contrastive_loss(a, b, scale, scale_targets="other")


def test_soft_target_on_a_regular_polygon_is_the_target_entropy():
    # a == b at the vertices of a regular N-gon: the Gram matrix is circulant and symmetric, so
    # T = softmax_rows(aa^T/tau) = softmax_rows(S) is symmetric (T^T = T) and both terms of eq. 6
    # are the cross-entropy of T's rows with themselves: L = mean row entropy of T.
    ang = torch.arange(N) * 2 * math.pi / N
    a = torch.stack([ang.cos(), ang.sin()], -1) @ torch.linalg.qr(rand(D, D, seed=3))[0][:2]
    scale = torch.tensor([1 / 0.3])
    t = torch.softmax(a @ a.T * scale, dim=-1)
    assert torch.allclose(t, t.T, atol=1e-6)
    entropy = -(t * t.log()).sum(-1).mean()
    assert soft_target_contrastive_loss(a, a, scale).item() == pytest.approx(entropy.item(), rel=1e-5)
    # a pairing the loss can see: rotating b's vertices by one step raises it
    assert soft_target_contrastive_loss(a, a.roll(1, 0), scale).item() > entropy.item()


def test_soft_target_is_clip_loss_when_targets_are_one_hot():
    # orthonormal a's and orthonormal b's: a_i.a_k + b_i.b_k = 2 delta_ik, so with tau = 0.01 the
    # off-diagonal targets are e^0 / e^100 ~ 1e-44: T = I and eq. 3-6 is the hard CLIP loss.
    qa, _ = torch.linalg.qr(rand(D + 3, D + 3, seed=4))
    qb, _ = torch.linalg.qr(rand(D + 3, D + 3, seed=5))
    a, b = qa[:N].contiguous(), qb[:N].contiguous()
    scale = torch.tensor([100.0])
    assert torch.allclose(soft_target_contrastive_loss(a, b, scale), ClipLoss()(a, b, scale[0]), atol=1e-5)


def test_soft_target_options_detached_and_hard():
    """loss.cbmf_targets: soft_detached has eq. 3-6's value with no gradient through T (checked
    against the transcription with T computed from detached copies); hard is InfoNCE (T = I),
    open_clip's ClipLoss, as the authors' code trains."""
    a, b = rand(N, D, seed=1, normalize=True), rand(N, D, seed=2, normalize=True)
    scale = torch.tensor([1 / 0.2])
    soft = soft_target_contrastive_loss(a, b, scale)
    det_in = [a.clone().requires_grad_(), b.clone().requires_grad_(), scale.clone().requires_grad_()]
    det = soft_target_contrastive_loss(*det_in, targets="soft_detached")
    det.backward()
    assert det.item() == pytest.approx(soft.item(), rel=1e-6)
    ref_in = leaves64([a, b, scale])
    with torch.no_grad():
        tgt = torch.softmax((ref_in[0] @ ref_in[0].T + ref_in[1] @ ref_in[1].T) * ref_in[2] / 2, dim=-1)
    n = len(a)
    s_ = [[dot(ref_in[0][i], ref_in[1][j]) * ref_in[2][0] for j in range(n)] for i in range(n)]
    ref = 0.5 * (-sum(tgt[i, j] * torch.log(torch.exp(s_[i][j]) / sum(torch.exp(s_[i][k]) for k in range(n)))
                      for i in range(n) for j in range(n)) / n
                 - sum(tgt[i, j] * torch.log(torch.exp(s_[i][j]) / sum(torch.exp(s_[k][j]) for k in range(n)))
                       for i in range(n) for j in range(n)) / n)
    ref.backward()
    for got, want in zip(grads(det_in), grads(ref_in)):
        assert torch.allclose(got.double(), want, atol=1e-5)
    soft_in = [a.clone().requires_grad_(), b.clone().requires_grad_(), scale.clone().requires_grad_()]
    soft_target_contrastive_loss(*soft_in).backward()
    assert not torch.allclose(soft_in[0].grad, det_in[0].grad, atol=1e-3)
    hard = soft_target_contrastive_loss(a, b, scale, targets="hard")
    assert torch.allclose(hard, ClipLoss()(a, b, scale[0]), atol=1e-6) and abs(hard.item() - soft.item()) > 1e-2
    with pytest.raises(ValueError, match="cbmf_targets"):
        soft_target_contrastive_loss(a, b, scale, targets="other")


# ---------------------------------------------------------------- 2. UniS-MMC


def unis_inputs(m_count, seed=0):
    """Embeddings, logits and labels where the predictions' correctness is set by hand:
    rows of `right` say which modalities predict the label."""
    right = [  # sample i: correct per modality  (pair 0-1 category)
        [1, 1, 0],  # P (and 0-2 SP, 1-2 SP)
        [1, 0, 0],  # SP, 0 right  (0-2 SP, 1-2 N)
        [0, 1, 1],  # SP, 1 right  (0-2 SP, 1-2 P)
        [0, 0, 0],  # N
        [0, 0, 1],  # N            (0-2 SP, 1-2 SP)
        [1, 1, 1],  # P
    ]
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    logits = []
    for m in range(m_count):
        lg = rand(N, C, seed=seed + 10 + m)
        for i in range(N):
            y = int(labels[i]) if right[i][m] else (int(labels[i]) + 1) % C
            lg[i, y] += 10.0
        logits.append(lg)
    embeddings = [rand(N, D, seed=seed + 20 + m) for m in range(m_count)]
    return embeddings, logits, labels


@pytest.mark.parametrize("m_count", [2, 3])
def test_unis_mmc_matches_equation_value_and_gradients(m_count):
    embeddings, logits, labels = unis_inputs(m_count)
    ours_in = [e.clone().requires_grad_() for e in embeddings]
    ours = unis_mmc_loss(ours_in, logits, labels, tau=0.07)
    ours.backward()
    ref_in = leaves64(embeddings)
    ref = unis_mmc_eq(ref_in, [lg.double() for lg in logits], labels, tau=0.07)
    ref.backward()
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    for got, want in zip(grads(ours_in), grads(ref_in)):
        assert torch.allclose(got.double(), want, atol=1e-5)
    g = grads(ours_in)
    zero, nonzero = torch.zeros(D), lambda v: v.abs().max() > 1e-4
    if m_count == 2:
        # sample 1: 0 right, 1 wrong; sample 2: 1 right, 0 wrong -> the right side is detached
        assert torch.equal(g[0][1], zero) and nonzero(g[1][1])
        assert torch.equal(g[1][2], zero) and nonzero(g[0][2])
        # P (0, 5) and N (3, 4) samples: both sides get gradient
        for i in (0, 3, 4, 5):
            assert nonzero(g[0][i]) and nonzero(g[1][i])
    else:
        # sample 1: only modality 0 right -> SP in (0,1) and (0,2), N in (1,2): no gradient into 0
        assert torch.equal(g[0][1], zero) and nonzero(g[1][1]) and nonzero(g[2][1])
        # sample 4: only modality 2 right -> no gradient into 2
        assert torch.equal(g[2][4], zero) and nonzero(g[0][4]) and nonzero(g[1][4])
        # sample 0: 0, 1 right, 2 wrong: (0,1) P gives 0 and 1 gradient; 2 gets it from both SP pairs
        assert nonzero(g[0][0]) and nonzero(g[1][0]) and nonzero(g[2][0])


@pytest.mark.parametrize("m_count", [2, 3])
def test_unis_mmc_first_row_matches_the_authors_expression(m_count):
    """loss.unis_mmc_logits=first_row against a transcription of the authors' UniSMMConLoss; it is
    a different function from the paper's per-sample pairs (which it does not reduce to)."""
    embeddings, logits, labels = unis_inputs(m_count)
    ours_in = [e.clone().requires_grad_() for e in embeddings]
    ours = unis_mmc_loss(ours_in, logits, labels, tau=0.07, form="first_row")
    ours.backward()
    ref_in = leaves64(embeddings)
    ref = unis_mmc_code_first_row(ref_in, [lg.double() for lg in logits], labels, tau=0.07)
    ref.backward()
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    for got, want in zip(grads(ours_in), grads(ref_in)):
        assert torch.allclose(got.double(), want, atol=1e-5)
    # only row 0 of modality m < n enters: the other rows of the first modality get no gradient
    assert torch.equal(grads(ours_in)[0][1:], torch.zeros(N - 1, D))
    assert abs(unis_mmc_loss(embeddings, logits, labels, form="pairs").item() - ours.item()) > 1e-2
    # no positive or semi-positive pair: the constant log N per pair, no gradient
    same = [logits[0]] * m_count
    wrong = (logits[0].argmax(-1) + 1) % C
    const_in = [e.clone().requires_grad_() for e in embeddings]
    const = unis_mmc_loss(const_in, same, wrong, form="first_row")
    assert const.item() == pytest.approx(m_count * (m_count - 1) / 2 * math.log(N))
    assert not const.requires_grad or all(g is None for g in torch.autograd.grad(const, const_in, allow_unused=True))


def test_pair_categories_by_hand():
    # pair (0, 1) of unis_inputs: P rows 0, 5; SP rows 1, 2; N rows 3, 4
    _, logits, labels = unis_inputs(2)
    shares = pair_categories(logits, labels)
    assert {k: round(v.item() * 6) for k, v in shares.items()} == {"positive": 2, "semi_positive": 2, "negative": 2}
    # three modalities, averaged over (0,1), (0,2), (1,2): P 2+1+2, SP 2+4+2, N 2+1+2 of 18
    _, logits, labels = unis_inputs(3)
    shares = pair_categories(logits, labels)
    assert {k: round(v.item() * 18) for k, v in shares.items()} == {"positive": 5, "semi_positive": 8, "negative": 5}


def test_unis_mmc_zero_when_all_negative_or_all_positive():
    embeddings, logits, labels = unis_inputs(3)
    same = [logits[0]] * 3  # every modality predicts the same classes
    pred = logits[0].argmax(-1)
    # every pair negative (all predictions wrong): each L_mn = 0
    assert unis_mmc_loss(embeddings, same, (pred + 1) % C).item() == 0.0
    # every pair positive: numerator == denominator, -log 1 = 0 whatever the embeddings
    assert unis_mmc_loss(embeddings, same, pred).item() == pytest.approx(0.0, abs=1e-6)


def test_unis_mmc_monotone_in_the_pair_similarity():
    embeddings, logits, labels = unis_inputs(2)
    base = unis_mmc_loss(embeddings, logits, labels).item()
    # cosine only: scaling representations changes nothing
    assert unis_mmc_loss([3 * embeddings[0], 0.5 * embeddings[1]], logits, labels).item() == pytest.approx(base, rel=1e-5)
    # aligning a positive pair (sample 0) lowers the loss; aligning a negative pair (sample 3) raises it
    pos = [embeddings[0], embeddings[1].clone()]
    pos[1][0] = embeddings[0][0]
    assert unis_mmc_loss(pos, logits, labels).item() < base
    neg = [embeddings[0], embeddings[1].clone()]
    neg[1][3] = embeddings[0][3]
    assert unis_mmc_loss(neg, logits, labels).item() > base


# ---------------------------------------------------------------- 3. M3CoL mixup contrastive


def m3co_inputs(m_count, seed=0):
    mixed = [rand(N, D, seed=seed + 30 + m) for m in range(m_count)]
    clean = [rand(N, D, seed=seed + 40 + m) for m in range(m_count)]
    perms = [torch.tensor([2, 1, 0, 5, 3, 4]), torch.tensor([1, 2, 3, 4, 5, 0]), torch.tensor([0, 3, 4, 1, 2, 5])][:m_count]
    # perms[0] has a fixed point (1), perms[2] two (0, 5)
    lambdas = [torch.rand(N, generator=torch.Generator().manual_seed(seed + 50 + m)) * 0.8 + 0.1 for m in range(m_count)]
    return mixed, clean, perms, lambdas


@pytest.mark.parametrize("m_count,pairs", [(2, "all"), (3, "all"), (3, "cyclic")])
def test_m3co_matches_eq_6_8_12_value_and_gradients(m_count, pairs):
    mixed, clean, perms, lambdas = m3co_inputs(m_count)
    ours_in = [t.clone().requires_grad_() for t in mixed + clean]
    ours = m3co_loss(ours_in[:m_count], ours_in[m_count:], perms, lambdas, tau=0.1, pairs=pairs)
    ours.backward()
    ref_in = leaves64(mixed + clean)
    lam64 = [lam.double() for lam in lambdas]
    ref = m3col_eq_6_8_12(ref_in[:m_count], ref_in[m_count:], perms, lam64, tau=0.1, pairs=pairs)
    ref.backward()
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    for got, want in zip(grads(ours_in), grads(ref_in)):
        assert torch.allclose(got.double(), want, atol=1e-5)
    # the data tells the readings apart: without the clean-anchor terms, or over other pairs, the
    # value differs (for two modalities "cyclic" is "all")
    with torch.no_grad():
        one_way = m3col_eq_6_8_12(*[leaves64(x) for x in (mixed, clean)], perms, lam64, pairs=pairs, reverse=False)
        assert abs(one_way.item() - ref.item()) > 1e-2
        other = "cyclic" if pairs == "all" else "all"
        alt = m3co_loss(mixed, clean, perms, lambdas, pairs=other).item()
        assert (abs(alt - ours.item()) > 1e-2) == (m_count > 2)


def test_m3co_paper_draws_match_eq_2_6_8_with_j_not_k():
    """The paper's draws: modality 1 mixed with partners j, modality 2 with other partners k,
    one lambda_i. m3co_loss with perms [j, k] and the shared lambda is eq. 6-8 transcribed term by
    term (value and gradients); sharing the partner (j for both) is a different loss."""
    j, k = torch.tensor([3, 0, 5, 1, 2, 4]), torch.tensor([1, 4, 0, 5, 3, 2])
    assert sorted(j.tolist()) == sorted(k.tolist()) == list(range(N)) and (j != k).all()
    lam = torch.tensor([0.9, 0.2, 0.55, 0.05, 0.7, 0.35])
    p1, p2 = rand(N, D, seed=61), rand(N, D, seed=62)
    pt1, pt2 = rand(N, D, seed=63), rand(N, D, seed=64)
    ours_in = [t.clone().requires_grad_() for t in (pt1, pt2, p1, p2)]
    ours = m3co_loss(ours_in[:2], ours_in[2:], [j, k], [lam, lam], tau=0.1)
    ours.backward()
    ref_in = leaves64([p1, p2, pt1, pt2])
    ref = m3co_eq_2_6_8(*ref_in, j, k, lam.double(), tau=0.1)
    ref.backward()
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    for got, want in zip(grads(ours_in), [ref_in[2].grad, ref_in[3].grad, ref_in[0].grad, ref_in[1].grad]):
        assert torch.allclose(got.double(), want, atol=1e-5)
    shared = m3co_loss([pt1, pt2], [p1, p2], [j, j], [lam, lam], tau=0.1).item()
    assert abs(shared - ours.item()) > 1e-2


@pytest.mark.parametrize("m_count", [2, 3])
def test_m3co_with_lambda_one_is_symmetric_infonce_mixed_to_clean(m_count):
    mixed, clean, perms, _ = m3co_inputs(m_count)
    ones = [torch.ones(N) for _ in range(m_count)]

    def clip(p, q):
        s = F.normalize(p, dim=-1) @ F.normalize(q, dim=-1).T / 0.1
        return 0.5 * (F.cross_entropy(s, torch.arange(N)) + F.cross_entropy(s.T, torch.arange(N)))
    infonce = sum(clip(mixed[m], clean[o]) for m in range(m_count) for o in range(m_count) if o != m)
    assert torch.allclose(m3co_loss(mixed, clean, perms, ones, tau=0.1), infonce, atol=1e-5)


def test_m3co_lower_when_mixed_is_the_lambda_mix_of_its_targets():
    mixed, clean, perms, lambdas = m3co_inputs(2)
    base = m3co_loss(mixed, clean, perms, lambdas).item()
    # mixed[m] is matched against clean[n], n != m: put it at lam q_i + (1 - lam) q_k
    q = [F.normalize(c, dim=-1) for c in clean]
    ideal = [lambdas[m][:, None] * q[1 - m] + (1 - lambdas[m][:, None]) * q[1 - m][perms[m]] for m in range(2)]
    better = m3co_loss(ideal, clean, perms, lambdas).item()
    assert better < base
    # the pairing matters: scrambling the mixed rows against the same perms/lambdas is worse
    assert m3co_loss([x.roll(1, 0) for x in ideal], clean, perms, lambdas).item() > better


# ---------------------------------------------------------------- 4. M3CoL MultiSoftClip


@pytest.mark.parametrize("m_count,pairs,reverse", [(2, "all", "transposed"), (3, "all", "transposed"),
                                                    (3, "all", "rows"), (3, "cyclic", "rows")])
def test_multisoftclip_matches_eq_9_11_value_and_gradients(m_count, pairs, reverse):
    embeddings = [rand(N, D, seed=60 + m) for m in range(m_count)]
    ours_in = [e.clone().requires_grad_() for e in embeddings]
    ours = multisoftclip_loss(ours_in, tau=0.1, pairs=pairs, reverse=reverse)
    ours.backward()
    ref_in = leaves64(embeddings)
    ref = multisoftclip_eq_9_11(ref_in, tau=0.1, pairs=pairs, reverse=reverse)
    ref.backward()
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    for got, want in zip(grads(ours_in), grads(ref_in)):
        assert torch.allclose(got.double(), want, atol=1e-5)
    other = "rows" if reverse == "transposed" else "transposed"  # the two reverse terms differ here
    assert abs(multisoftclip_loss(embeddings, tau=0.1, pairs=pairs, reverse=other).item() - ours.item()) > 1e-3


def test_multisoftclip_identical_modalities():
    # identical modalities: S = qq^T/tau is symmetric, so the forward term and the "rows" reverse
    # term are the cross-entropy of T = softmax(S) with itself, its entropy (Gibbs' minimum): each
    # l(m->n) of the authors' form is H(T); moving one modality away raises the loss. The paper's
    # transposed reverse term is -1/N sum_ij T_ji log T_ij instead.
    e = rand(N, D, seed=70)
    t = torch.softmax(F.normalize(e, dim=-1) @ F.normalize(e, dim=-1).T / 0.1, dim=-1)
    entropy = -(t * t.log()).sum(-1).mean()
    same = multisoftclip_loss([e, 2 * e, e], tau=0.1, reverse="rows")
    assert same.item() == pytest.approx(6 * entropy.item(), rel=1e-5)
    assert multisoftclip_loss([e + 0.3 * rand(N, D, seed=71), e, e], tau=0.1, reverse="rows").item() > same.item()
    cross = -(t.T * t.log()).sum(-1).mean()
    paper = multisoftclip_loss([e, 2 * e, e], tau=0.1)
    assert paper.item() == pytest.approx(6 * 0.5 * (entropy + cross).item(), rel=1e-5)


# ---------------------------------------------------------------- 5. mixup cross-entropy


def test_mixup_cross_entropy():
    logits, labels = rand(N, C, seed=80), torch.tensor([0, 1, 2, 2, 1, 0])
    perm, lam = torch.tensor([3, 0, 5, 1, 2, 4]), torch.rand(N, generator=torch.Generator().manual_seed(81))
    assert mixup_cross_entropy(logits, labels, perm, lam).item() == pytest.approx(mixup_ce_eq(logits, labels, perm, lam), rel=1e-5)
    ce = F.cross_entropy(logits, labels)
    assert torch.allclose(mixup_cross_entropy(logits, labels, perm, torch.ones(N)), ce, atol=1e-6)
    assert torch.allclose(mixup_cross_entropy(logits, labels, torch.arange(N), lam), ce, atol=1e-6)
    assert torch.allclose(mixup_cross_entropy(logits, labels, perm, torch.zeros(N)), F.cross_entropy(logits, labels[perm]), atol=1e-6)


# ---------------------------------------------------------------- 6. two gloo ranks == one process

WORLD, BATCH, DIMS = 2, 8, (6, 4, 5)
LOSSES = ["soft_target", "soft_target_detached", "soft_target_hard", "unis_mmc", "unis_mmc_first_row", "m3co",
          "m3co_cyclic", "multisoftclip", "multisoftclip_rows_cyclic", "mixup_ce"]


class Towers(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.ModuleList(nn.Linear(d, D) for d in DIMS)
        self.head = nn.ModuleList(nn.Linear(D, C) for _ in DIMS)
        self.log_scale = nn.Parameter(torch.tensor([math.log(1 / 0.2)]))

    def forward(self, xs, perms, lam):
        """Per-sample outputs; mixing uses the perms' rows of this same (local or full) batch."""
        emb = [enc(x) for enc, x in zip(self.enc, xs)]
        mix = [enc(lam[:, None] * x + (1 - lam[:, None]) * x[p]) for enc, x, p in zip(self.enc, xs, perms)]
        out = {f"emb{m}": e for m, e in enumerate(emb)}
        out.update({f"mix{m}": e for m, e in enumerate(mix)})
        out.update({f"logit{m}": h(e) for m, (h, e) in enumerate(zip(self.head, emb))})
        out["scale"] = self.log_scale.exp()
        return out


def dist_batch():
    """Inputs, labels, per-rank-local perms (each block of BATCH // WORLD rows permutes 0..n-1)
    and lambdas. Labels make every UniS-MMC category occur: some rows agree with modality 0's head."""
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(BATCH, d, generator=g) for d in DIMS]
    n = BATCH // WORLD
    perms = [torch.cat([torch.randperm(n, generator=g) for _ in range(WORLD)]) for _ in DIMS]
    lam = torch.rand(BATCH, generator=g) * 0.8 + 0.1
    with torch.no_grad():
        out = Towers()(xs, perms, lam)
    pred = [out[f"logit{m}"].argmax(-1) for m in range(len(DIMS))]
    labels = torch.where(torch.arange(BATCH) % 3 == 0, (pred[0] + 1) % C, pred[0])
    labels[5] = pred[1][5]
    return xs, labels, perms, lam


def loss_on(name, out, labels, perms, lam):
    emb = [out[f"emb{m}"] for m in range(len(DIMS))]
    if name.startswith("soft_target"):
        targets = {"soft_target": "soft", "soft_target_detached": "soft_detached", "soft_target_hard": "hard"}[name]
        return soft_target_contrastive_loss(F.normalize(emb[0], dim=-1), F.normalize(emb[1], dim=-1), out["scale"],
                                            targets=targets)
    if name.startswith("unis_mmc"):
        return unis_mmc_loss(emb, [out[f"logit{m}"] for m in range(len(DIMS))], labels,
                             form="first_row" if name.endswith("first_row") else "pairs")
    if name.startswith("m3co"):
        return m3co_loss([out[f"mix{m}"] for m in range(len(DIMS))], emb, perms, [lam] * len(DIMS),
                         pairs="cyclic" if name.endswith("cyclic") else "all")
    if name.startswith("multisoftclip"):
        return multisoftclip_loss(emb, **({"pairs": "cyclic", "reverse": "rows"} if name.endswith("cyclic") else {}))
    if name == "mixup_ce":
        return mixup_cross_entropy(out["logit0"], labels, perms[0], lam)
    raise ValueError(name)


def param_grads(model):
    return {k: torch.zeros_like(p) if p.grad is None else p.grad.clone() for k, p in model.named_parameters()}


def _ranks_finetune(rank, world, out_path):
    import torch.distributed as dist
    xs, labels, perms, lam = dist_batch()
    n = BATCH // world
    rows = slice(rank * n, (rank + 1) * n)
    model = Towers()
    results = {}
    for name in LOSSES:
        model.zero_grad(set_to_none=True)
        out = model([x[rows] for x in xs], [p[rows] for p in perms], lam[rows])
        out.update({"labels": labels[rows], "lam": lam[rows]})
        out.update({f"perm{m}": p[rows] for m, p in enumerate(perms)})
        g = gather_outputs(out, shared=("scale",))
        gperms = [global_index(g[f"perm{m}"]) for m in range(len(DIMS))]
        loss = loss_on(name, g, g["labels"], gperms, g["lam"])
        loss.backward()
        grads_ = param_grads(model)
        for v in grads_.values():  # DeepSpeed/DDP: average parameter gradients over ranks
            dist.all_reduce(v)
            v /= world
        results[name] = {"loss": loss.detach(), "grads": grads_, "perms": gperms}
    if rank == 0:
        torch.save(results, out_path)


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    path = tmp_path_factory.mktemp("ranks") / "r.pt"
    run_ranks(_ranks_finetune, WORLD, str(path))
    return torch.load(path)


@pytest.mark.parametrize("name", LOSSES)
def test_two_ranks_equal_single_process_full_batch(name, two_rank_results):
    xs, labels, perms, lam = dist_batch()
    n = BATCH // WORLD
    full = [p + torch.arange(BATCH) // n * n for p in perms]  # rank r's block starts at r * n
    got = two_rank_results[name]
    for gp, fp in zip(got["perms"], full):
        assert torch.equal(gp, fp)
    if name.startswith("unis_mmc"):  # the batch exercises P, SP and N samples
        with torch.no_grad():
            out = Towers()(xs, full, lam)
        r0, r1 = (out[f"logit{m}"].argmax(-1) == labels for m in range(2))
        assert (r0 & r1).any() and (r0 ^ r1).any() and (~r0 & ~r1).any()  # P, SP, N in pair (0, 1)
    model = Towers()
    ref = loss_on(name, model(xs, full, lam), labels, full, lam)
    ref.backward()
    assert torch.allclose(got["loss"], ref, atol=1e-6)
    want = param_grads(model)
    assert any(v.abs().max() > 0 for v in want.values())
    # float32 sums in another order (per-rank rows, then all-reduce): about 4e-6 at |g| ~ 6 on
    # some CPUs; a real mistake (a missing 1/W, a wrong row) is of the order of the gradient
    for k, v in want.items():
        assert torch.allclose(got["grads"][k], v, atol=1e-5), k
