"""Task metrics."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm


@torch.inference_mode()
def predict_logits(model, loader, desc: str = "evaluating") -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    logits, labels = [], []
    for batch in tqdm(loader, desc=desc, leave=False):
        labels.append(batch.pop("labels"))
        logits.append(model(**batch).logits.float())
    return torch.cat(logits), torch.cat(labels)


def accuracy(model, loader, desc: str = "evaluating") -> dict[str, float]:
    logits, labels = predict_logits(model, loader, desc)
    return {"accuracy": float((logits.argmax(-1) == labels).float().mean())}
