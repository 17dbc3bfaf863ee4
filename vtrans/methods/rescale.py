"""Least-squares rescaling of the kept units (Kwon et al. 2022, "mask tuning"), for a model whose weights stay.

Layer by layer, heads then neurons, the kept units' mask values are set by least squares so that the residual
stream just after the layer's output is added matches the dense model's, given the pruned model's own residual
(earlier layers already rescaled): the fit compensates the drift earlier pruned layers leave in the stream.
Where a family's stream cannot be read there (`Adapter.residual_norm`: DINOv2's LayerScale scales each output
before the add), the layer's output alone is fitted. The values are folded into the kept units at the cut.

Used after the Fisher baseline's choice and, by default, Faster-VTrans's (frozen weights: nothing else
adapts the kept units to their lost neighbours). Measured on MiniLM at flops=0.4 (seed 0): fisher 81.44%
with the stream's target vs 80.52% with the layer's output alone; faster-vtrans 83.27% vs 80.90%.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from vtrans import distributed
from vtrans.arch import Kept, MaskValues, detach_masks
from vtrans.arch.base import weight_out_in
from vtrans.data import token_mask
from vtrans.methods.base import Job
from vtrans.surgery import indicators

GROUPS = ("heads", "ffn")


@dataclass
class RescaleSettings:
    samples: int = 512  # examples whose tokens set up each layer's least-squares system
    ridge: float = 1e-6  # relative damping of the normal equations
    max_scale: float = 10.0  # a solution with a value outside [-max_scale, max_scale] is not used (Kwon et al.)


class _LayerDone(Exception):
    """Raised by a hook once the layer being rescaled has been reached: the rest of the forward pass is not
    needed (on average this halves the passes' cost)."""


@torch.no_grad()
def rescale(job: Job, kept: Kept, settings: RescaleSettings | None = None, hidden: torch.Tensor | None = None,
            loader=None) -> tuple[dict[str, torch.Tensor], list]:
    """Mask values of every unit (0 for dropped ones) for `cut_model`, and per layer and group the squared
    reconstruction error before (every kept unit at 1) and after. `hidden`: the hidden dims' values (a trained
    mu), kept as they are (1 by default); a block needs none: its units' values absorb its scale. `loader`: the
    examples to fit on (default: a sample of `settings.samples` training examples)."""
    settings = settings or RescaleSettings()
    was_training = job.model.training
    job.model.eval()
    adapter = job.adapter
    dims = adapter.dims()
    teacher_adapter = type(adapter)(job.teacher)
    loader = loader if loader is not None else job.sample_loader(settings.samples)
    scale = indicators(kept, dims)
    if hidden is not None:
        scale["hidden"] = scale["hidden"] * hidden
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
                gram, rhs, target_energy = _normal_equations(job, loader, values, scale, i, group, teacher_adapter,
                                                             units)
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
        job.model.train(was_training)
    return scale, log


def _squared_error(m: torch.Tensor, gram: torch.Tensor, rhs: torch.Tensor, energy: float) -> float:
    """|C m - b|^2 from the normal equations' pieces C^T C, C^T b and b^T b."""
    return float(energy - 2 * m @ rhs + m @ gram @ m)


def _forward_until(model, batch: dict) -> None:
    try:
        model(**batch)
    except _LayerDone:
        pass


def _input_into(captured: dict, key: str, stop: bool = False):
    """A forward pre-hook keeping its module's input as `captured[key]`; with `stop`, the pass ends there."""
    def hook(module, args):
        captured[key] = args[0]
        if stop:
            raise _LayerDone
    return hook


def _output_into(captured: dict, key: str, stop: bool = False):
    """A forward hook keeping its module's output as `captured[key]`; with `stop`, the pass ends there."""
    def hook(module, args, output):
        captured[key] = output
        if stop:
            raise _LayerDone
    return hook


def _normal_equations(job, loader, values, scale, layer, group, teacher_adapter, units):
    """Accumulate, over the loader, the least-squares system for the kept units' mask values m:
    minimise sum_t |sum_u m_u C_u(t) - b_t|^2 over real tokens t, where C_u(t) is unit u's contribution to the
    reader's output. As Kwon et al., b makes the residual stream after the add match the dense model's:
    b = S_dense - R - bias, with S the stream after the add (the input of the next norm) and R the pruned
    model's residual (S - Y, Y the reader's output at plain values). Where the stream cannot be read
    (Adapter.residual_norm), b = Y_dense - bias: the reader's output alone. Returns (C^T C, C^T b, b^T b)."""
    _, reader, width = job.adapter.unit_linears(layer)[group]
    residual = job.adapter.residual_norm(layer, group), teacher_adapter.residual_norm(layer, group)
    captured = {}
    if residual[0] is not None:  # read the streams at the norms after the add, then stop
        hooks = [reader.register_forward_pre_hook(_input_into(captured, "x")),
                 reader.register_forward_hook(_output_into(captured, "y")),
                 residual[0].register_forward_pre_hook(_input_into(captured, "stream", stop=True)),
                 residual[1].register_forward_pre_hook(_input_into(captured, "dense_stream", stop=True))]
    else:  # the reader's input (student) and output (dense model) are all it needs
        teacher_reader = teacher_adapter.unit_linears(layer)[group][1]
        hooks = [reader.register_forward_pre_hook(_input_into(captured, "x", stop=True)),
                 teacher_reader.register_forward_hook(_output_into(captured, "dense_y", stop=True))]
    n = len(units)
    hidden_keep = (scale["hidden"] != 0).float()
    # only the kept hidden dims are fitted (the cut model has no others); indices where the weights are
    rows = hidden_keep.nonzero().flatten().to(reader.weight.device)
    weight = weight_out_in(reader)[rows]
    weight = weight.reshape(weight.shape[0], -1, width)[:, units].flatten(1).double()  # (H, n*w)
    weight_gram = weight.T @ weight  # (n*w, n*w): W_u^T W_v blocks
    bias = reader.bias[rows] if reader.bias is not None else 0
    inputs_gram, rhs, energy = torch.zeros_like(weight_gram), weight_gram.new_zeros(n * width), 0.0
    try:
        for batch in loader:
            batch.pop("labels", None)
            _forward_until(job.teacher, batch)
            values.set({name: v.unsqueeze(0) for name, v in scale.items()}, hidden_keep)
            _forward_until(job.model, batch)
            tokens = token_mask(batch, captured["x"].shape[:2]).bool()
            # the kept units' values are still 1 here, so the reader's input holds their plain activations
            x = captured["x"][tokens].unflatten(-1, (-1, width))[:, units].flatten(1).double()  # (T, n*w)
            if residual[0] is not None:  # S_dense - (S - Y) - bias
                target = captured["dense_stream"] - captured["stream"] + captured["y"]
            else:
                target = captured["dense_y"]
            b = (target[tokens][:, rows] - bias).double()
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
