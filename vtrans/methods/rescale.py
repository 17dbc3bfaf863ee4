"""Least-squares rescaling of the kept units (Kwon et al. 2022, "mask tuning"), for a model whose weights stay.

Layer by layer, heads then neurons, the kept units' mask values are set by least squares so that the residual
stream just after the layer's output is added matches the dense model's, given the pruned model's own residual
(earlier layers already rescaled): the fit compensates the drift earlier pruned layers leave in the stream.
Where a LayerScale scales each output before the add (DINOv2), the fit weighs each unit's contribution as it
reaches the stream; where a family's stream cannot be read (`Adapter.residual_norm`), the layer's output alone
is fitted. The values are folded into the kept units at the cut.

Used after the Fisher baseline's choice and, by default, Faster-VTrans's (frozen weights: nothing else
adapts the kept units to their lost neighbours). Measured on MiniLM at flops=0.4 (seed 0): fisher 81.44%
with the stream's target vs 80.52% with the layer's output alone; faster-vtrans 83.27% vs 80.90%.
"""
from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from vtrans import distributed
from vtrans.arch import Kept, MaskValues, call_layer, detach_masks, first_output, layer_stream, with_stream
from vtrans.arch.base import weight_out_in
from vtrans.data import token_mask
from vtrans.methods.base import Job
from vtrans.surgery import indicators

GROUPS = ("heads", "ffn")  # the unit groups inside a layer, each read by one linear


@dataclass
class RescaleSettings:
    samples: int = 512  # examples whose tokens set up each layer's least-squares system
    ridge: float = 1e-6  # relative damping of the normal equations
    max_scale: float = 10.0  # a solution with a value outside [-max_scale, max_scale] is not used (Kwon et al.)


class _LayerDone(Exception):
    """Raised by a hook once a call has given what a fit reads (the stream after an add, the layer 0 input): the
    rest of the call is not run."""


@torch.no_grad()
def rescale(job: Job, kept: Kept, settings: RescaleSettings | None = None,
            trained: dict[str, torch.Tensor] | None = None, loader=None) -> tuple[dict[str, torch.Tensor], list]:
    """Mask values of every unit (0 for dropped ones) for `cut_model`, and per layer and group the squared
    reconstruction error before (every kept unit at 1) and after. `trained`: values a method learnt (its mu),
    by group: the hidden dims keep theirs (1 by default); where a group's fit is unusable, its units take
    theirs if they reproduce the stream better than plain 1s. A block needs none: its units' values absorb its
    scale. `loader`: the examples to fit on, its first `settings.samples` (default: a sample of that many
    training examples).

    The student runs once, recording each layer's arguments and layer 0's input (the dense model records that
    input); after that each layer is replayed on its input streams (as SliceGPT does), so every fit costs a few
    passes of one layer, not of the model up to it. The streams of `samples` examples stay in memory."""
    settings = settings or RescaleSettings()
    was_training = job.model.training
    job.model.eval()
    adapter = job.adapter
    dims = adapter.dims()
    teacher_adapter = type(adapter)(job.teacher)
    loader = loader if loader is not None else job.sample_loader(settings.samples)
    # at most `samples` examples (the same number of batches on every rank): the inputs stay in memory
    batches = [{name: value for name, value in batch.items() if name != "labels"}
               for batch in itertools.islice(loader, math.ceil(settings.samples / job.batch_size))]
    trained = trained or {}
    scale = indicators(kept, dims)
    if "hidden" in trained:
        scale["hidden"] = scale["hidden"] * trained["hidden"]
    values = MaskValues()
    handles = adapter.attach_masks(values)
    log = []
    progress = tqdm(total=dims.layers * len(GROUPS), desc=f"{job.method}: least-squares rescaling", leave=False)
    try:
        student = _Replay(job.model, adapter, batches, values, scale)
        # the layers' other arguments (masks, rotary embeddings) depend on neither weights nor mask values, but
        # take the model's dtype: a dense model in another dtype (bfloat16 beside a training student) records its own
        same_dtype = next(job.model.parameters()).dtype == next(job.teacher.parameters()).dtype
        dense = _Replay(job.teacher, teacher_adapter, batches, arguments=student.arguments if same_dtype else None)
        for i in range(dims.layers):
            references = dense.advance(i, references=True)  # what layer i's fits aim at, per group and batch
            for group in GROUPS:
                progress.update()
                units = torch.tensor(kept.heads[i] if group == "heads" else kept.ffn[i], dtype=torch.long)
                if len(units) == 0:
                    continue
                system = _normal_equations(student, references[group], i, group, units)  # C^T C, C^T b, b^T b
                gram, rhs, _ = system
                damping = settings.ridge * gram.diagonal().mean() * torch.eye(len(units), dtype=gram.dtype)
                solution = torch.linalg.solve(gram + damping, rhs)
                ones = torch.ones_like(solution)
                usable = bool(solution.abs().max() <= settings.max_scale)  # else ill-posed: not used
                source = "least squares"
                # Not used whole, not damped: damping such a fit towards the fallback until it fits lowered the
                # stream error but lost accuracy (fisher and faster-vtrans at flops=0.4 and 0.6, seed 0: 34 vs
                # 51 examples, README fifteenth session). Out of range says the fit is overfitted.
                if not usable:  # the trained values where they reproduce the stream better, else 1s (Kwon et al.)
                    learnt = trained[group][i, units].to(ones) if group in trained else ones
                    better = _squared_error(learnt, system) < _squared_error(ones, system)
                    solution, source = (learnt, "trained") if better else (ones, "plain")
                log.append({"phase": "rescale", "layer": i, "group": group, "rescaled": usable, "values": source,
                            "error_before": _squared_error(ones, system),
                            "error_after": _squared_error(solution, system)})
                scale[group][i, units] = solution.float()
            del references  # before the next layer's are made: at most 5 sets of streams are held at once
            if i + 1 < dims.layers:
                student.advance(i)
    finally:
        progress.close()
        detach_masks(handles)
        values.set(None)
        job.model.train(was_training)
    return scale, log


def _squared_error(m: torch.Tensor, system: tuple[torch.Tensor, torch.Tensor, float]) -> float:
    """|C m - b|^2 from the normal equations' pieces C^T C, C^T b and b^T b (an exact fit's may round below 0)."""
    gram, rhs, energy = system
    return max(0.0, float(energy - 2 * m @ rhs + m @ gram @ m))


def _input_into(captured: dict, key: str, stop: bool = False):
    """A forward pre-hook keeping its module's input as `captured[key]`; with `stop`, the pass ends there."""
    def hook(module, args):
        captured[key] = args[0]
        if stop:
            raise _LayerDone
    return hook


def _output_into(captured: dict, key: str, stop: bool = False):
    """A forward hook keeping its module's output (its first, for a layer's tuple) as `captured[key]`; with
    `stop`, the pass ends there."""
    def hook(module, args, output):
        captured[key] = first_output(output)
        if stop:
            raise _LayerDone
    return hook


@contextlib.contextmanager
def _passed_through(layers):
    """Every layer hands its input stream on as it is, computing nothing: for a pass that only records the
    layers' arguments (which depend on neither the weights nor the stream). A forward already replaced on the
    instance (an offloading hook's) is put back."""
    def passthrough(*args, **kwargs):
        return layer_stream(args, kwargs)

    own = [layer.__dict__.get("forward") for layer in layers]
    for layer in layers:
        layer.forward = passthrough
    try:
        yield
    finally:
        for layer, forward in zip(layers, own):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward


class _Replay:
    """One model's layers called again on stored inputs, one call per batch. A first forward pass records the
    arguments each layer got (attention mask, rotary embeddings, ...: a layer may get its own, e.g. a sliding
    window) and layer 0's input stream, and stops after the last layer's arguments (no head is run); its layers
    compute nothing (`_passed_through`: computing them took a fifth of the fit's time on MiniLM; without them
    Faster-VTrans's fit went from 8.9 s to 7.2 s, Fisher's from 13.0 s to 10.1 s);
    `advance` moves the stream on by one layer. `arguments`: another replay's, for a model of the same
    architecture and dtype (then the pass stops at layer 0). `values`/`scale`: the student's mask values, set
    before each of its calls (a fit changes them)."""

    def __init__(self, model, adapter, batches: list[dict], values: MaskValues | None = None,
                 scale: dict | None = None, arguments: list | None = None):
        self.model, self.adapter, self.batches, self.values, self.scale = model, adapter, batches, values, scale
        layers = adapter.layer_modules()
        self.arguments = arguments or [[] for _ in layers]  # per layer, per batch: (args, kwargs) without the stream
        self.streams = []  # per batch: the input stream of the layer `run` calls next

        def record(layer: int):
            def hook(module, args, kwargs):
                if layer == 0:
                    self.streams.append(layer_stream(args, kwargs))
                if arguments is not None:  # only layer 0's input is needed
                    raise _LayerDone
                self.arguments[layer].append(with_stream(args, kwargs, None))  # the stream is set at each call
                if layer == len(layers) - 1:
                    raise _LayerDone
            return hook

        hooks = [layer.register_forward_pre_hook(record(i), with_kwargs=True) for i, layer in enumerate(layers)]
        self._set_values()  # layer 0's input: the embeddings' norm reads the hidden dims' values
        try:
            with _passed_through(layers):
                for batch in batches:
                    try:
                        model(**batch)
                    except _LayerDone:
                        pass
        finally:
            detach_masks(hooks)

    def _set_values(self) -> None:
        if self.values is not None:
            hidden_keep = (self.scale["hidden"] != 0).float()
            self.values.set({name: v.unsqueeze(0) for name, v in self.scale.items()}, hidden_keep)

    def run(self, layer: int):
        """Call layer `layer` on every batch's stream (a hook may end a call early), yielding each batch after
        its call. The values are set once: a fit changes them between runs, never during one."""
        module = self.adapter.layer_modules()[layer]
        self._set_values()
        for batch, stream, (args, kwargs) in zip(self.batches, self.streams, self.arguments[layer]):
            try:
                call_layer(module, stream, args, kwargs)
            except _LayerDone:
                pass
            yield batch

    def advance(self, layer: int, references: bool = False) -> dict[str, list[torch.Tensor]]:
        """Move to layer `layer + 1`: its input streams are layer `layer`'s outputs at the current values.
        With `references`, also return per group, per batch, what a fit of that group aims at: the stream just
        after the add (`stream_hook`), or where it cannot be read, the reader's output."""
        captured = {}
        hooks = [self.adapter.layer_modules()[layer].register_forward_hook(_output_into(captured, "out"))]
        for group in GROUPS if references else ():
            hook = self.stream_hook(layer, group, captured, group, stop=False)
            if hook is None:
                reader = self.adapter.unit_linears(layer)[group][1]
                hook = reader.register_forward_hook(_output_into(captured, group))
            hooks.append(hook)
        streams, targets = [], {group: [] for group in GROUPS if references}
        try:
            for _ in self.run(layer):
                streams.append(captured["out"])
                for group in targets:
                    targets[group].append(captured[group])
        finally:
            detach_masks(hooks)
        self.streams = streams
        return targets

    def stream_hook(self, layer: int, group: str, captured: dict, key: str, stop: bool = True):
        """A hook keeping the residual stream just after `layer`'s `group` output is added (with `stop`,
        ending the call there): the input of the norm after the add, or the layer's output where that norm is
        the next layer's (pre-norm). None where the family's stream cannot be read (`Adapter.residual_norm`)."""
        norm = self.adapter.residual_norm(layer, group)
        if norm is None:
            return None
        module = self.adapter.layer_modules()[layer]
        if any(part is norm for part in module.modules()):
            return norm.register_forward_pre_hook(_input_into(captured, key, stop=stop))
        return module.register_forward_hook(_output_into(captured, key))


def _normal_equations(student: _Replay, references: list[torch.Tensor], layer: int, group: str,
                      units: torch.Tensor):
    """Accumulate, over the batches, the least-squares system for the kept units' mask values m:
    minimise sum_t |sum_u m_u C_u(t) - b_t|^2 over real tokens t, where C_u(t) is unit u's contribution to the
    reader's output as it reaches the stream. As Kwon et al., b makes the residual stream after the add match
    the dense model's: b = S_dense - R - bias, with S the stream after the add (the input of the next norm) and
    R the pruned model's residual (S - Y, Y the reader's output at plain values). Where a LayerScale gamma
    scales the output before the add (Adapter.output_scale), the stream gets gamma * (W x + bias): C_u and the
    bias are scaled by gamma and R = S - gamma Y. Where the stream cannot be read (Adapter.residual_norm),
    b = gamma (Y_dense - bias): the reader's output alone. `references`: per batch, S_dense or Y_dense
    (`_Replay.advance`). Returns (C^T C, C^T b, b^T b)."""
    _, reader, width = student.adapter.unit_linears(layer)[group]
    gamma = student.adapter.output_scale(layer, group)  # LayerScale: the stream gets gamma * (W x + bias)
    captured = {}
    stream = student.stream_hook(layer, group, captured, "stream")  # read the stream after the add, then stop
    hooks = [reader.register_forward_pre_hook(_input_into(captured, "x")),
             reader.register_forward_hook(_output_into(captured, "y", stop=stream is None))]
    hooks += [stream] if stream is not None else []
    n = len(units)
    hidden_keep = (student.scale["hidden"] != 0).float()
    # only the kept hidden dims are fitted (the cut model has no others); indices where the weights are
    rows = hidden_keep.nonzero().flatten().to(reader.weight.device)
    weight = weight_out_in(reader)[rows]
    weight = weight.reshape(weight.shape[0], -1, width)[:, units].flatten(1).float()  # (H, n*w)
    bias = reader.bias[rows] if reader.bias is not None else 0
    gamma = gamma[rows].float() if gamma is not None else torch.ones(len(rows), device=weight.device)
    weight = gamma.unsqueeze(1) * weight  # each unit's contribution as it reaches the stream
    # each batch's products in float32 (half the time of float64), summed over batches in float64
    inputs_gram = weight.new_zeros(n * width, n * width, dtype=torch.float64)
    rhs, energy = weight.new_zeros(n * width, dtype=torch.float64), 0.0
    try:
        for batch, reference in zip(student.run(layer), references):
            tokens = token_mask(batch, captured["x"].shape[:2]).bool()
            # the kept units' values are still 1 here, so the reader's input holds their plain activations
            x = captured["x"][tokens].unflatten(-1, (-1, width))[:, units].flatten(1).float()  # (T, n*w)
            if stream is not None:  # S_dense - (S - gamma Y) - gamma bias
                b = (reference - captured["stream"])[tokens][:, rows] + gamma * (captured["y"][tokens][:, rows] - bias)
            else:  # gamma (Y_dense - bias): the reader's output, weighted as it reaches the stream
                b = gamma * (reference[tokens][:, rows] - bias)
            b = b.float()  # (T, H)
            inputs_gram += (x.T @ x).double()
            rhs += ((b @ weight) * x).sum(0).double()
            energy += float(b.double().square().sum())
    finally:
        detach_masks(hooks)
    # C_u(t) = W_u x_tu, so C^T C = sum over each unit pair's (w x w) block of (X^T X) * (W^T W)
    weight = weight.double()
    gram = (inputs_gram * (weight.T @ weight)).view(n, width, n, width).sum((1, 3))
    sums = distributed.sum_(torch.cat([gram.flatten(), rhs.view(n, width).sum(1), rhs.new_tensor([energy])]))
    sums = sums.cpu()  # each rank summed over its rows of the batches
    return sums[:n * n].view(n, n), sums[n * n:-1], float(sums[-1])
