"""Baselines that every claim is measured against: random, magnitude and Fisher (Kwon et al. 2022).

None retrains. Like OPTIN they prune heads and FFN neurons only (hidden dims and blocks stay), so the four
differ only in how they score units. Magnitude and Fisher choose with the same search as OPTIN.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from vtrans import distributed
from vtrans.arch import Kept, MaskValues, detach_masks
from vtrans.arch.base import weight_out_in
from vtrans.budget import Selection, select_kept
from vtrans.data import example_count, token_mask
from vtrans.methods.base import Choice, Job
from vtrans.methods.search import keep_structure_of, score_log, search_kept
from vtrans.surgery import indicators

GROUPS = ("heads", "ffn")


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
    rescale_samples: int = 512  # examples for the per-layer least-squares rescaling
    ridge: float = 1e-6  # relative damping of the least-squares normal equations
    max_scale: float = 10.0  # a solution with a value outside [-max_scale, max_scale] is not used (Kwon et al.)


def _sample_loader(job: Job, samples: int):
    """Batches of a label-stratified sample of about `samples` examples (all of them if fewer)."""
    return job.loader(min(1.0, samples / len(job.train)))


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


@torch.no_grad()
def rescale(job: Job, kept: Kept, settings: FisherSettings) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Kwon et al.'s mask tuning: layer by layer, heads then neurons, the kept units' mask values are set by
    least squares so that the layer reading them (attention output, FFN output) reproduces the dense model's
    output, given the pruned model's own input (earlier layers already rescaled). Unlike Kwon et al., the
    target is that layer's output alone, not output + residual stream: the drift that earlier pruned layers
    leave in the residual is not compensated. Returns mask values for `cut_model` and, per layer and group,
    the squared reconstruction error before and after."""
    job.model.eval()
    adapter = job.adapter
    dims = adapter.dims()
    teacher_adapter = type(adapter)(job.teacher)
    loader = _sample_loader(job, settings.rescale_samples)
    scale = indicators(kept, dims)
    values = MaskValues()
    handles = adapter.attach_masks(values)
    log = []
    progress = tqdm(total=dims.layers * len(GROUPS), desc=f"{job.method}: least-squares rescaling", leave=False)
    try:
        for i in range(dims.layers):
            for group in GROUPS:
                progress.update()
                units = torch.tensor(kept.heads[i] if group == "heads" else kept.ffn[i], dtype=torch.long)
                if len(units) == 0:
                    continue
                _, reader, width = adapter.unit_linears(i)[group]
                gram, rhs, target_energy = _normal_equations(
                    job, loader, values, scale, reader, teacher_adapter.unit_linears(i)[group][1], units, width)
                damping = settings.ridge * gram.diagonal().mean() * torch.eye(len(units), dtype=gram.dtype)
                solution = torch.linalg.solve(gram + damping, rhs)
                ones = torch.ones_like(solution)
                usable = bool(solution.abs().max() <= settings.max_scale)  # else ill-posed: keep the plain units
                solution = solution if usable else ones
                log.append({"phase": "rescale", "layer": i, "group": group, "rescaled": usable,
                            "error_before": _squared_error(ones, gram, rhs, target_energy),
                            "error_after": _squared_error(solution, gram, rhs, target_energy)})
                scale[group][i, units] = solution.float()
    finally:
        progress.close()
        detach_masks(handles)
        values.set(None)
    return scale, log


def _squared_error(m: torch.Tensor, gram: torch.Tensor, rhs: torch.Tensor, energy: float) -> float:
    """|C m - b|^2 from the normal equations' pieces C^T C, C^T b and b^T b."""
    return float(energy - 2 * m @ rhs + m @ gram @ m)


def _normal_equations(job, loader, values, scale, reader, teacher_reader, units, width):
    """Accumulate, over the loader, the least-squares system for the kept units' mask values m:
    minimise sum_t |sum_u m_u C_u(t) - (Y_t - bias)|^2 over real tokens t, where C_u(t) is unit u's
    contribution to the reader's output and Y the dense model's reader output. Returns (C^T C, C^T b, b^T b)."""
    captured = {}
    hooks = [reader.register_forward_pre_hook(lambda m, args: captured.__setitem__("x", args[0])),
             teacher_reader.register_forward_hook(lambda m, args, out: captured.__setitem__("y", out))]
    n = len(units)
    weight = weight_out_in(reader)
    weight = weight.reshape(weight.shape[0], -1, width)[:, units].flatten(1).double()  # (H, n*w)
    weight_gram = weight.T @ weight  # (n*w, n*w): W_u^T W_v blocks
    bias = reader.bias if reader.bias is not None else 0
    inputs_gram, rhs, energy = torch.zeros_like(weight_gram), weight_gram.new_zeros(n * width), 0.0
    try:
        for batch in loader:
            batch.pop("labels", None)
            job.teacher(**batch)
            values.set({name: v.unsqueeze(0) for name, v in scale.items()}, scale["hidden"])
            job.model(**batch)
            tokens = token_mask(batch, captured["x"].shape[:2]).bool()
            # the kept units' values are still 1 here, so the reader's input holds their plain activations
            x = captured["x"][tokens].unflatten(-1, (-1, width))[:, units].flatten(1).double()  # (T, n*w)
            b = (captured["y"][tokens] - bias).double()
            inputs_gram += x.T @ x
            rhs += ((b @ weight) * x).sum(0)
            energy += float(b.square().sum())
    finally:
        values.set(None)
        for hook in hooks:
            hook.remove()
    # C_u(t) = W_u x_tu, so C^T C = sum over each unit pair's (w x w) block of (X^T X) * (W^T W)
    gram = (inputs_gram * weight_gram).view(n, width, n, width).sum((1, 3))
    sums = distributed.sum_(torch.cat([gram.flatten(), rhs.view(n, width).sum(1), rhs.new_tensor([energy])]))
    sums = sums.cpu()  # each rank summed over its rows of the batches
    return sums[:n * n].view(n, n), sums[n * n:-1], float(sums[-1])


def choose_fisher(job: Job, *_, settings: FisherSettings | None = None) -> Choice:
    settings = settings or FisherSettings()
    scores = fisher_scores(job, _sample_loader(job, settings.samples))
    kept = search_kept(job.adapter, job.budget, scores)
    scale, log = rescale(job, kept, settings)
    return Choice(kept=kept, scale=scale, log=score_log(scores) + log)
