"""OPTIN (Khaki & Plataniotis, ICLR 2024): one-shot pruning with forward passes only, no weight update.

Each attention head and FFN neuron is scored by how much zeroing it disturbs what comes after it on a
calibration batch: its trajectory, the distance between the Gram matrices of L2-normalised token features
of every later layer with and without the unit, plus a temperature-scaled KL on the logits. Ablations are
batched: `units_per_forward` copies of the calibration batch go through the layers together, each copy with
one unit zeroed through the mask batch axis, and only the layers from the unit's own onwards are run.
Then `search_kept` (methods/search.py) picks how many heads and neurons to keep under the budget. The hidden
dimension is not pruned (OPTIN's scores are for heads and neurons).

The scores do not depend on the budget, and scoring is most of OPTIN's time (6 minutes per run on DINOv2 on 2
cores), so they are cached (`$VTRANS_CACHE/optin/`) under a digest of everything they are computed from (see
`_digest`). A run at another budget reads them.
"""
from __future__ import annotations

import functools
import hashlib
from dataclasses import astuple, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from vtrans import distributed
from vtrans.arch import MaskValues, call_layer, detach_masks, layer_stream, with_stream
from vtrans.data import Placed, example_count, stratified_indices, token_mask
from vtrans.methods.base import Choice, Job
from vtrans.methods.search import score_log, search_kept
from vtrans.surgery import write_cache
from vtrans.teacher import cache_root, fingerprint


@dataclass
class OptinSettings:
    calibration_samples: int = 8
    units_per_forward: int = 32
    logit_weight: float = 1.0
    temperature: float = 4.0


SCORES_VERSION = 1  # raise when the scores' definition changes: cached scores of other code are not read
# sequences in one of OPTIN's forwards: its calibration sequences, once per unit it ablates in that forward
FORWARD_SEQUENCES = OptinSettings().calibration_samples * OptinSettings().units_per_forward


def _token_gram(hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Per-example Gram matrix of L2-normalised token features, padding zeroed: (B, S, S)."""
    features = F.normalize(hidden.float(), dim=-1) * tokens
    return features @ features.transpose(1, 2)


def _repeat(value, copies: int, batch: int):
    """A layer argument for `copies` copies of the batch (tensors with a batch axis, and tuples of them)."""
    if isinstance(value, tuple):  # e.g. rotary (cos, sin)
        return tuple(_repeat(v, copies, batch) for v in value)
    if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == batch:
        return value.repeat(copies, *([1] * (value.dim() - 1)))
    return value


def _score_shapes(dims) -> dict[str, tuple[int, int]]:
    """One score per head and per FFN neuron of every layer, in the order they are scored."""
    return {"heads": (dims.layers, dims.heads), "ffn": (dims.layers, dims.ffn)}


def calibration_batch(job: Job, settings: OptinSettings) -> dict:
    """A label-stratified batch of about `calibration_samples` training examples, without labels."""
    fraction = min(1.0, settings.calibration_samples / len(job.train))
    indices = stratified_indices(job.train.strata, fraction, job.seed)
    batch = Placed(job.train.collate, device=job.device)([job.train[i] for i in indices])
    batch.pop("labels", None)
    return batch


def _digest(job: Job, settings: OptinSettings, batch: dict) -> str:
    """Everything the scores are computed from: the model (class, config, weights), the calibration batch (the
    data, seed and length reach the scores only through it), the settings, the objective, the device, and the
    code (SCORES_VERSION, transformers' version)."""
    config = {k: v for k, v in job.model.config.to_diff_dict().items() if k != "_name_or_path"}
    described = fingerprint(SCORES_VERSION, transformers.__version__, type(job.model).__name__, config,
                            job.objective.name, astuple(settings), job.device.type)
    digest = hashlib.sha256(described.encode())
    # non-tensor entries (a module's _extra_state) carry no weights
    named = [*job.model.state_dict().items(), *sorted(batch.items())]
    for name, tensor in named:
        if torch.is_tensor(tensor):
            digest.update(name.encode())
            digest.update(repr((tensor.dtype, tuple(tensor.shape))).encode())
            digest.update(tensor.detach().reshape(-1).view(torch.uint8).cpu().numpy())  # no extra host copy
    return digest.hexdigest()[:32]


def _read(path: Path, dims) -> dict[str, torch.Tensor] | None:
    """The scores stored at `path`, or None where there are none or they are unusable (a truncated file, other
    shapes): scoring again is always safe."""
    if not path.is_file():
        return None
    shapes = _score_shapes(dims)
    try:
        stored = load_file(path)
        scores = {group: stored[group] for group in shapes}  # in the order they were scored
    except (OSError, KeyError, SafetensorError):
        return None
    return scores if all(tuple(scores[g].shape) == shape for g, shape in shapes.items()) else None


def cached_scores(job: Job, settings: OptinSettings) -> dict[str, torch.Tensor]:
    """`trajectory_scores`, read from the cache where a run of the same model, data and settings left them.
    Rank 0 reads the cache and hands its scores to the other ranks: one decision, since scoring is collective,
    and no file system shared across machines needed."""
    batch = calibration_batch(job, settings)
    found = None
    if distributed.is_main():
        path = cache_root() / "optin" / f"{_digest(job, settings, batch)}.safetensors"
        found = _read(path, job.adapter.dims())
    found = distributed.from_main(found)
    if found is not None:
        return found
    scores = trajectory_scores(job, settings, batch)
    if distributed.is_main():
        write_cache(path, functools.partial(save_file, scores))  # atomic: runs at two budgets may score at once
    return scores


@torch.no_grad()
def trajectory_scores(job: Job, settings: OptinSettings, batch: dict | None = None) -> dict[str, torch.Tensor]:
    """Importance of every head and FFN neuron ({'heads': (L, n), 'ffn': (L, F)}); higher = keep. `batch`: the
    calibration batch (by default `calibration_batch`)."""
    model, adapter = job.model.eval(), job.adapter
    dims = adapter.dims()
    layers = adapter.layer_modules()
    batch = calibration_batch(job, settings) if batch is None else batch
    b = example_count(batch)

    captured = {}  # each layer's call in the dense forward: (stream, args, kwargs without the stream)

    def capture(module, args, kwargs, i):
        captured[i] = (layer_stream(args, kwargs), *with_stream(args, kwargs, None))

    hooks = [layer.register_forward_pre_hook(functools.partial(capture, i=i), with_kwargs=True)
             for i, layer in enumerate(layers)]
    try:
        reference = model(**batch, output_hidden_states=True)
    finally:
        detach_masks(hooks)
    real = token_mask(batch, reference.hidden_states[0].shape[:2])  # (B, S)
    tokens = real.unsqueeze(-1).float()
    reference_grams = [_token_gram(h, tokens) for h in reference.hidden_states[1:]]
    reference_outputs = job.objective.outputs(reference, real)
    pairs = tokens.sum((1, 2)) ** 2  # token pairs per example, to make Gram distances comparable

    values = MaskValues()
    handles = adapter.attach_masks(values)
    ones = {name: torch.ones(1, *shape) for name, shape in dims.mask_shapes().items()}
    scores = {group: torch.zeros(shape) for group, shape in _score_shapes(dims).items()}
    # the chunks of units scored in one forward, split round-robin over data-parallel ranks
    chunks = [(i, group, list(range(start, min(start + settings.units_per_forward, count))))
              for i in range(dims.layers)
              for group, count in (("heads", dims.heads), ("ffn", dims.ffn))
              for start in range(0, count, settings.units_per_forward)]
    chunks = [chunk for index, chunk in enumerate(chunks) if distributed.mine(index)]
    progress = tqdm(total=len(chunks), desc=f"{job.method}: scoring units", dynamic_ncols=True)
    try:
        for i, group, units in chunks:
            stream, args, kwargs = captured[i]
            copies = len(units)
            z = {name: v.expand(copies * b, *v.shape[1:]).clone() for name, v in ones.items()}
            for c, unit in enumerate(units):
                z[group][c * b:(c + 1) * b, i, unit] = 0
            values.set(z, ones["hidden"][0])
            hidden = _repeat(stream, copies, b)
            rest = tuple(_repeat(a, copies, b) for a in args)
            named = {k: _repeat(v, copies, b) for k, v in kwargs.items()}
            distance = torch.zeros(copies * b, device=hidden.device)
            for j in range(i, dims.layers):
                hidden = call_layer(layers[j], hidden, rest, named)
                gram = _token_gram(hidden, tokens.repeat(copies, 1, 1))
                diff = (gram - reference_grams[j].repeat(copies, 1, 1)).square().sum((1, 2))
                distance += diff / pairs.repeat(copies)
            mask = _repeat(real, copies, b)
            outputs = job.objective.head_outputs(adapter, hidden, mask)
            divergence = job.objective.divergence(outputs, _repeat(reference_outputs, copies, b), mask,
                                                  settings.temperature)
            distance += settings.logit_weight * divergence.clamp(min=0)  # rounding can dip below 0
            scores[group][i, units] = distance.view(copies, b).mean(1).float().cpu()
            progress.update()
    finally:
        progress.close()
        detach_masks(handles)
        values.set(None)
    for group_scores in scores.values():  # each rank scored its own chunks; the others' are 0 here
        distributed.sum_(group_scores)
    return scores


def choose(job: Job, *_, settings: OptinSettings | None = None) -> Choice:
    scores = cached_scores(job, settings or OptinSettings())
    return Choice(kept=search_kept(job.adapter, job.budget, scores), log=score_log(scores))
