"""Task metrics and measured latency."""
from __future__ import annotations

import statistics
import time

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


@torch.inference_mode()
def latency_ms(models: dict[str, torch.nn.Module], batch_size: int = 32, seq_len: int = 64,
               repeats: int = 10, vocab_size: int = 1000) -> dict[str, float]:
    """Median forward time of each model on the same random batch, runs interleaved so that load on the
    machine affects all models alike."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, vocab_size, (batch_size, seq_len), generator=generator)
    mask = torch.ones_like(input_ids)
    times: dict[str, list[float]] = {name: [] for name in models}
    for model in models.values():
        model.eval()
        for _ in range(2):  # warm-up
            model(input_ids=input_ids, attention_mask=mask)
    for _ in range(repeats):
        for name, model in models.items():
            start = time.perf_counter()
            model(input_ids=input_ids, attention_mask=mask)
            times[name].append(1000 * (time.perf_counter() - start))
    return {name: statistics.median(t) for name, t in times.items()}
