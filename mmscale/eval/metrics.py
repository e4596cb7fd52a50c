"""Metrics on predictions and embeddings, with no model in sight: classification (ACC, F1,
AUC), top-k accuracy, retrieval ranks and recall@k, and the logistic-regression probe."""
from __future__ import annotations

import numpy as np
import torch


def classification_metrics(labels: np.ndarray, probs: np.ndarray) -> dict:
    """acc, f1 (positive class 1; binary tasks only), auc (binary: of class 1's probability;
    multi-class: one-vs-rest macro, when every class occurs), f1_weighted and f1_macro."""
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score
    pred = probs.argmax(1)
    out = {"acc": float(accuracy_score(labels, pred)),
           "f1_weighted": float(f1_score(labels, pred, average="weighted", labels=range(probs.shape[1]), zero_division=0)),
           "f1_macro": float(f1_score(labels, pred, average="macro", labels=range(probs.shape[1]), zero_division=0))}
    present = np.unique(labels)
    if probs.shape[1] == 2:
        out["f1"] = float(f1_score(labels, pred, pos_label=1, zero_division=0))
        if len(present) == 2:
            out["auc"] = float(roc_auc_score(labels, probs[:, 1]))
    elif len(present) == probs.shape[1]:
        out["auc"] = float(roc_auc_score(labels, probs, multi_class="ovr", average="macro"))
    return out


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, topk=(1, 5)) -> dict:
    """{"top{k}": share of rows whose label is among the k highest logits}, k <= #classes."""
    topk = [k for k in topk if k <= logits.shape[1]]
    ranked = logits.topk(max(topk), dim=-1).indices
    hits = ranked == labels.to(ranked.device)[:, None]
    return {f"top{k}": hits[:, :k].any(-1).float().mean().item() for k in topk}


def retrieval_ranks(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: torch.Tensor,
                    chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based rank of the first correct answer per query, for image->text and text->image.

    An image's answer is its best-scored caption (any of its captions counts); a caption's is
    its image. Ties count in the query's favour (only strictly higher scores rank above).
    """
    text_to_image = text_to_image.to(image_emb.device)
    n_img = image_emb.shape[0]
    i2t = torch.empty(n_img, dtype=torch.long)
    t2i = torch.empty(text_emb.shape[0], dtype=torch.long)
    for start in range(0, n_img, chunk):
        sim = image_emb[start:start + chunk] @ text_emb.T  # [c, M]
        rows = torch.arange(start, start + sim.shape[0], device=sim.device)
        own = text_to_image[None, :] == rows[:, None]
        best_own = sim.masked_fill(~own, float("-inf")).max(1, keepdim=True).values
        i2t[start:start + sim.shape[0]] = (sim > best_own).sum(1).cpu()
    for start in range(0, text_emb.shape[0], chunk):
        sim = text_emb[start:start + chunk] @ image_emb.T  # [c, N]
        own = sim.gather(1, text_to_image[start:start + chunk, None])
        t2i[start:start + sim.shape[0]] = (sim > own).sum(1).cpu()
    return i2t, t2i


def recall_curve(ranks: torch.Tensor, max_k: int) -> list[float]:
    """recall@k for k = 1..max_k."""
    return [(ranks < k).float().mean().item() for k in range(1, max_k + 1)]


def fit_logistic(train_x: np.ndarray, train_y: np.ndarray, cs=(0.01, 0.1, 1.0, 10.0), seed: int = 0):
    """L2-regularised logistic regression with C picked on a stratified 20% validation split of
    the training rows, refitted on all of them. Returns (classifier, C)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score
    from sklearn.model_selection import train_test_split
    fit_x, val_x, fit_y, val_y = train_test_split(train_x, train_y, test_size=0.2, random_state=seed,
                                                  stratify=train_y)
    scores = {}
    for c in cs:
        clf = LogisticRegression(C=c, max_iter=1000, random_state=seed).fit(fit_x, fit_y)
        scores[c] = accuracy_score(val_y, clf.predict(val_x))
    best = max(cs, key=lambda c: scores[c])
    return LogisticRegression(C=best, max_iter=1000, random_state=seed).fit(train_x, train_y), float(best)


def logistic_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                   cs=(0.01, 0.1, 1.0, 10.0), seed: int = 0) -> dict:
    """CLIP's linear probe on frozen features: fit_logistic, scored once on the test features."""
    clf, c = fit_logistic(train_x, train_y, cs, seed)
    return {"top1": float((clf.predict(test_x) == test_y).mean()), "C": c}
