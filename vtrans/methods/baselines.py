"""Baselines that every claim is measured against: random, magnitude and Fisher (Kwon et al. 2022).

None retrains. Like OPTIN they prune heads and FFN neurons only (hidden dims and blocks stay), so the four
differ only in how they score units. Magnitude and Fisher choose with the same search as OPTIN.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from vtrans import distributed
from vtrans.arch import MaskValues, detach_masks
from vtrans.arch.base import weight_out_in
from vtrans.budget import Selection, select_kept
from vtrans.data import example_count
from vtrans.methods.base import Choice, Job
from vtrans.methods.rescale import GROUPS, RescaleSettings, rescale
from vtrans.methods.search import keep_structure_of, score_log, search_kept


def choose_random(job: Job, *_) -> Choice:
    """Uniformly random heads and FFN neurons (seeded) filling the budget.

    The selection ranks units by worth per cost, so each unit's random worth is scaled by its cost: the
    ranking is then uniform whatever a unit costs (unscaled, every head, 128 neurons' worth of cost, would
    rank below every neuron and go first)."""
    generator = torch.Generator().manual_seed(job.seed)
    dims = job.adapter.dims()
    worth = keep_structure_of({"heads": torch.ones(dims.layers, dims.heads),
                               "ffn": torch.ones(dims.layers, dims.ffn)}, dims)
    every = {name: torch.ones_like(w, dtype=torch.bool) for name, w in worth.items()}
    for ratio, price, name, index in Selection(job.adapter, worth, every, job.budget).candidates(dropping=True):
        if ratio < math.inf:  # the hidden dims and blocks stay
            worth[name][index] = price * torch.rand((), generator=generator).item()
    return Choice(kept=select_kept(job.adapter, worth, job.budget))


@torch.no_grad()
def magnitude_scores(adapter) -> dict[str, torch.Tensor]:
    """Squared L2 norm of every weight and bias that writes or reads a unit, per head and neuron. Squared
    norms add up over a unit's weights, so a head and a neuron are compared by the same measure."""
    dims = adapter.dims()
    scores = {}
    for group in GROUPS:
        rows = []
        for i in range(dims.layers):
            writers, reader, width = adapter.unit_linears(i)[group]
            # in float32 on the CPU, whatever the weights' dtype and device
            per_unit = weight_out_in(reader).float().cpu().square().sum(0).view(-1, width).sum(1)  # reading a unit
            for linear, unit_rows in writers:  # the rows writing it: (units, rows per unit)
                per_row = weight_out_in(linear).float().cpu().square().sum(1)
                if linear.bias is not None:
                    per_row = per_row + linear.bias.float().cpu().square()
                per_unit = per_unit + per_row[unit_rows].sum(1)
            rows.append(per_unit)
        scores[group] = torch.stack(rows)
    return scores


def choose_magnitude(job: Job, *_) -> Choice:
    scores = magnitude_scores(job.adapter)
    return Choice(kept=search_kept(job.adapter, job.budget, scores), log=score_log(scores))


@dataclass
class FisherSettings:
    samples: int = 2048  # examples whose squared mask gradients are summed
    rescale: RescaleSettings = field(default_factory=RescaleSettings)  # then the kept units' least squares


def fisher_scores(job: Job, loader, groups: tuple[str, ...] = GROUPS, limit: int | None = None,
                  at: dict[str, torch.Tensor] | None = None, size: dict[str, torch.Tensor] | None = None
                  ) -> dict[str, torch.Tensor]:
    """Diagonal Fisher information of the mask variables of `groups` over the loader's first batches (about
    `limit` examples): squared per-example gradients of the objective's Fisher loss (the task loss, where there
    are labels) with respect to the mask values, summed.
    Each example has its own row of mask variables (the masks' batch axis), so one backward pass gives
    every example's gradient.

    By default the gradients are taken at the dense model (every mask value 1). Given `at` (mask values, 0 for
    dropped units) and `size` (each unit's value when kept), they are taken at that masked model and scaled
    by `size`: (g * size)^2 is the first-order change in loss from removing a kept unit, or from adding back
    a dropped one."""
    model, adapter = job.model, job.adapter
    was_training = model.training
    model.eval()
    dims = adapter.dims()
    fisher = {group: torch.zeros(dims.mask_shapes()[group]) for group in groups}
    at = at or {name: torch.ones(shape) for name, shape in dims.mask_shapes().items()}
    hidden_keep = (at["hidden"] != 0).float()
    values = MaskValues()
    handles = adapter.attach_masks(values)
    batches = len(loader) if limit is None else min(len(loader), math.ceil(limit / loader.batch_size))
    try:
        for batch in tqdm(itertools.islice(loader, batches), total=batches, desc=f"{job.method}: Fisher information",
                          dynamic_ncols=True):
            b = example_count(batch)
            z = {name: value.detach().expand(b, *value.shape).clone().requires_grad_(name in groups)
                 for name, value in at.items()}
            values.set(z, hidden_keep)
            loss = job.objective.fisher_loss(model, batch)  # summed over the batch's examples
            grads = torch.autograd.grad(loss, [z[group] for group in groups])
            for group, grad in zip(groups, grads):
                scaled = grad if size is None else grad * size[group]
                fisher[group] += scaled.square().sum(0)
    finally:
        detach_masks(handles)
        values.set(None)
        model.train(was_training)
    for group in groups:  # each rank scored its rows of the batches
        distributed.sum_(fisher[group])
    return fisher


def choose_fisher(job: Job, *_, settings: FisherSettings | None = None) -> Choice:
    settings = settings or FisherSettings()
    scores = fisher_scores(job, job.sample_loader(settings.samples))
    kept = search_kept(job.adapter, job.budget, scores)
    scale, log = rescale(job, kept, settings.rescale)
    return Choice(kept=kept, scale=scale, log=score_log(scores) + log)
