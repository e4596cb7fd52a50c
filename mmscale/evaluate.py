"""Zero-shot classification with prompt-template ensembles (CLIP / CMLA section V)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def zeroshot_classifier(model, classnames: list[str], templates: list[str], device, dtype) -> torch.Tensor:
    """[C, D] class embeddings: the normalised mean of each class's normalised prompt embeddings."""
    weights = []
    for name in classnames:
        tok = model.tokenize([t.format(name) for t in templates])
        emb = model.encode_text(tok["input_ids"].to(device), tok["attention_mask"].to(device)).float()
        weights.append(F.normalize(emb.mean(0), dim=-1))
    return torch.stack(weights)


@torch.no_grad()
def zeroshot_accuracy(model, loader, classifier: torch.Tensor, device, dtype, topk=(1, 5)) -> dict:
    correct = {k: 0 for k in topk}
    total = 0
    for images, labels in loader:
        logits = model.encode_image(images.to(device, dtype)).float() @ classifier.T
        labels = labels.to(device)
        ranked = logits.topk(max(topk), dim=-1).indices
        for k in topk:
            correct[k] += (ranked[:, :k] == labels[:, None]).any(-1).sum().item()
        total += len(labels)
    return {f"top{k}": correct[k] / total for k in topk if k <= classifier.shape[0]}
