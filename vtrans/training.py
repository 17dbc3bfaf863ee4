"""The pieces every training loop here shares: stepping through data, the distillation loss, fine-tuning.

Loops stay explicit in the methods; this file holds only what more than one of them uses.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Iterator

import torch
from tqdm.auto import tqdm

from vtrans import distributed
from vtrans.checkpoint import Checkpoint, capture, restore
from vtrans.data import example_count, token_mask
from vtrans.objectives import Objective


def steps_for(epochs: float, loader) -> int:
    return max(1, math.ceil(epochs * len(loader))) if epochs > 0 else 0


def batches(loader, steps: int, desc: str, start: int = 0) -> Iterator[tuple[int, dict]]:
    """`steps` batches from `loader`, cycling through epochs, with a progress bar; a resumed run (`start`)
    draws and drops the batches it already saw, so the data order is that of an uninterrupted run."""
    iterator = iter(loader)
    progress = tqdm(total=steps, initial=start, desc=desc, dynamic_ncols=True)
    for step in range(steps):
        try:
            batch = next(iterator)
        except StopIteration:
            iterator = iter(loader)
            batch = next(iterator)
        if step >= start:
            yield step, batch
            progress.update()
    progress.close()


class TeacherOutputs:
    """The frozen teacher's outputs (what the objective distils: logits, or an embedding) and hidden states,
    remembered per example (keyed by its tokens) up to `max_bytes`. Faster-VTrans goes over the same small sample
    ten times, and the teacher's forward is a good part of each step; with it remembered, later epochs skip it
    (Fast-VTrans's varied copies are new every time: nothing to remember). Padding positions come back as
    zeros: every loss here ignores them. A batch with any example not remembered runs the teacher whole, so
    a cap that holds only part of the data saves little: it is meant for samples that fit."""

    def __init__(self, teacher, objective: Objective, max_bytes: int = 1 << 30):
        self.teacher, self.objective, self.max_bytes, self.stored_bytes = teacher, objective, max_bytes, 0
        self.memory: dict[bytes, tuple[torch.Tensor, list[torch.Tensor]]] = {}
        self.forwards = 0  # teacher forward passes run (for tests and curiosity)

    @staticmethod
    def _keys(batch: dict) -> list[bytes]:
        """Each example's inputs, hashed: its real tokens (ids, token types), or its pixels."""
        real = batch.get("attention_mask")
        keys = []
        for b in range(example_count(batch)):
            parts = []
            for name, value in sorted(batch.items()):
                if name in ("attention_mask", "labels"):
                    continue
                row = value[b]
                if real is not None and value.shape[:2] == real.shape:  # per token: the real ones only
                    row = row[real[b].bool()]
                parts.append(row.cpu().numpy().tobytes())
            keys.append(hashlib.sha256(b"|".join(parts)).digest())  # an image's pixels would make a big key
        return keys

    @torch.no_grad()
    def __call__(self, batch: dict) -> SimpleNamespace:
        if self.max_bytes == 0:  # nothing to remember: just the teacher
            return self._run(batch)
        keys = self._keys(batch)
        if not all(key in self.memory for key in keys):
            out = self._run(batch)
            real = token_mask(batch, out.hidden_states[0].shape[:2]).bool()
            for b, key in enumerate(keys):
                row = (out.outputs[b].clone(), [h[b][real[b]].clone() for h in out.hidden_states])
                size = sum(t.numel() * t.element_size() for t in [row[0], *row[1]])
                if key not in self.memory and self.stored_bytes + size <= self.max_bytes:
                    self.memory[key] = row
                    self.stored_bytes += size
            return out
        rows = [self.memory[key] for key in keys]
        real = token_mask(batch, (len(rows), rows[0][1][0].shape[0])).bool()
        hidden = []
        for layer in range(len(rows[0][1])):
            h = rows[0][1][layer].new_zeros(*real.shape, rows[0][1][layer].shape[-1])
            for b, row in enumerate(rows):
                h[b][real[b]] = row[1][layer]
            hidden.append(h)
        return SimpleNamespace(outputs=torch.stack([row[0] for row in rows]), hidden_states=tuple(hidden))

    def _run(self, batch: dict) -> SimpleNamespace:
        self.forwards += 1
        out = self.teacher(**batch, output_hidden_states=True)
        real = token_mask(batch, out.hidden_states[0].shape[:2])
        return SimpleNamespace(outputs=self.objective.outputs(out, real), hidden_states=out.hidden_states)


DISTILL_LAYERS = ("all", "last", "none")


@dataclass
class DistillWeights:
    task: float = 0.5  # cross-entropy on the labels
    logits: float = 0.5  # KL to the teacher's softened logits (times T^2)
    hidden: float = 1.0  # MSE to the teacher's per-layer hidden states, on the kept hidden dims
    temperature: float = 2.0
    layers: str = "all"  # hidden states matched: every layer's output 1:1, the last one only, or none


@contextlib.contextmanager
def frozen_input_embeddings(model):
    """The token embedding table stays as it is while training: its AdamW state alone would be half of a
    small model's (11.7M of MiniLM's 22.7M parameters), and a step updates every row of it."""
    embeddings = model.get_input_embeddings()
    if not isinstance(embeddings, torch.nn.Embedding):  # a vision model's patch projection: small, trained
        yield
        return
    table = embeddings.weight
    was = table.requires_grad
    table.requires_grad_(False)
    try:
        yield
    finally:
        table.requires_grad_(was)


def distill_loss(
    student,
    teacher,
    labels,
    attention_mask: torch.Tensor,
    weights: DistillWeights,
    objective: Objective,
    hidden_index: torch.Tensor | None = None,
    hidden_keep: torch.Tensor | None = None,
) -> dict:
    """The objective's task loss (where there are `labels`) + distillation from the teacher's logits (as the
    objective compares them) and hidden states.

    `attention_mask` (B, S) marks real tokens (data.token_mask); `hidden_index` selects the teacher dims that a
    cut student kept; `hidden_keep` (0/1) restricts the comparison for a masked student to its kept dims.
    """
    outputs = objective.outputs(student, attention_mask)
    # an augmented batch has no labels (data.Augmented): the teacher's outputs are its only targets
    task = objective.task_loss(outputs, labels, attention_mask) if labels is not None else outputs.new_zeros(())
    logits = objective.output_loss(outputs, teacher.outputs, attention_mask, weights.temperature)  # or embedding
    tokens = attention_mask.unsqueeze(-1).float()
    pairs = list(zip(student.hidden_states, teacher.hidden_states))
    pairs = {"all": pairs, "last": pairs[-1:], "none": []}[weights.layers]
    hidden = torch.zeros(())
    for s, h in pairs:
        if hidden_index is not None:
            h = h[..., hidden_index.to(h.device)]
        weight = tokens * (hidden_keep.to(tokens.device) if hidden_keep is not None else 1.0)
        hidden = hidden + ((s - h).square() * weight).sum() / weight.expand_as(s).sum().clamp(min=1)
    hidden = hidden / max(1, len(pairs))
    total = weights.task * task + weights.logits * logits + weights.hidden * hidden
    return {"loss": total, "task": task.detach(), "distill": (logits + hidden).detach()}


def linear_schedule(steps: int, warmup: float = 0.0):
    """The learning rate's factor at each of `steps` steps: rising linearly over the first `warmup` share of
    them, falling linearly to 0 over all of them (whichever is lower)."""
    warmup_steps = max(1, int(warmup * steps))

    def factor(step: int) -> float:
        return min((step + 1) / warmup_steps, 1 - step / steps)

    return factor


def train_steps(model, loader, steps: int, lr: float, loss_of, desc: str, log: list | None = None,
                phase: str = "", warmup: float = 0.0, checkpoint: Checkpoint | None = None,
                state: dict | None = None, extra: dict | None = None) -> None:
    """AdamW for `steps` batches, its learning rate warming up over the first `warmup` share of them, then
    decaying linearly; `loss_of(batch)` returns {'loss', other logged values}.

    With a checkpoint, the state (with `extra`) is saved every `checkpoint.every` steps; `state`, from such a
    checkpoint, continues where it stopped."""
    if not steps:
        return
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(steps, warmup))
    objects = {"model": model, "optimizer": optimizer, "schedule": schedule}
    start = restore(state, objects) if state is not None else 0
    model.train()
    for step, batch in batches(loader, steps, desc, start):
        weight = distributed.loss_weight(example_count(batch))  # 1 in one process
        losses = loss_of(batch)
        (losses["loss"] * weight).backward()
        distributed.average_gradients(model.parameters())
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if log is not None:
            log.append({"phase": phase, "step": step} | {k: float(v) for k, v in losses.items() if k != "loss"})
        if checkpoint is not None and checkpoint.due(step):
            checkpoint.save(capture(phase, step, objects, log=log, **(extra or {})))
    model.eval()


def finetune(model, loader, epochs: float, lr: float, desc: str = "fine-tuning teacher") -> None:
    """Plain supervised fine-tuning (used to make a teacher when the checkpoint has no trained head)."""
    train_steps(model, loader, steps_for(epochs, loader), lr, lambda batch: {"loss": model(**batch).loss}, desc)


def distill(student, teacher, loader, steps: int, lr: float, weights: DistillWeights, objective: Objective,
            hidden_index: torch.Tensor | None = None, desc: str = "recovering", log: list | None = None,
            warmup: float = 0.0, **checkpointing) -> None:
    """Train a (cut) student to match the teacher for `steps` batches, the learning rate warming up over the
    first `warmup` share of them; its structure is fixed. `teacher` is the model or a `TeacherOutputs` of it."""
    teacher_outputs = teacher if isinstance(teacher, TeacherOutputs) else TeacherOutputs(teacher, objective, 0)

    def loss_of(batch):
        labels = batch.pop("labels", None)
        target = teacher_outputs(batch)
        out = student(**batch, output_hidden_states=True)
        return distill_loss(out, target, labels, token_mask(batch, out.hidden_states[0].shape[:2]), weights,
                            objective, hidden_index=hidden_index)
    with frozen_input_embeddings(student):
        train_steps(student, loader, steps, lr, loss_of, desc, log, phase="recover", warmup=warmup, **checkpointing)
