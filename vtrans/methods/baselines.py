"""Baselines that every claim is measured against."""
from __future__ import annotations

import torch

from vtrans.methods.base import Job, Outcome
from vtrans.methods.optin import keep_structure_of
from vtrans.budget import select_kept
from vtrans.surgery import cut_model


def run_random(job: Job) -> Outcome:
    """Uniformly random heads and FFN neurons (seeded) filling the budget; hidden dims and blocks stay, like
    OPTIN's, so the two differ only in which units they choose. No retraining."""
    generator = torch.Generator().manual_seed(job.seed)
    dims = job.adapter.dims()
    scores = {"heads": torch.rand(dims.layers, dims.heads, generator=generator),
              "ffn": torch.rand(dims.layers, dims.ffn, generator=generator)}
    kept = select_kept(job.adapter, keep_structure_of(scores, dims), job.budget)
    cut_model(job.adapter, kept)
    return Outcome(model=job.model, kept=kept)
