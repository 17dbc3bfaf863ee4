"""What a method receives and returns. Every method turns a Job into an Outcome: a cut, smaller model."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from vtrans.arch import Adapter, Kept
from vtrans.budget import Budget
from vtrans.checkpoint import Checkpoint
from vtrans.data import Encoded, stratified_indices


@dataclass
class Job:
    method: str
    model: nn.Module  # the student: a copy of the teacher, changed in place
    adapter: Adapter  # the student's adapter
    teacher: nn.Module  # the dense model, frozen, in eval mode
    budget: Budget
    train: Encoded
    batch_size: int = 32
    seed: int = 0
    prune_epochs: float | None = None  # None: the method's default
    recover_epochs: float | None = None
    data_fraction: float = 0.03  # for the methods that learn from a sample of the data
    recover_steps: int = 0  # for faster-vtrans: optional distillation after the cut
    checkpoint: Checkpoint | None = None  # where training state is saved every N steps
    resume: bool = False  # continue from the checkpoint

    def loader(self, fraction: float = 1.0):
        """Shuffled batches of the training data, or of a label-stratified sample of `fraction` of it."""
        indices = stratified_indices(self.train.labels, fraction, self.seed) if fraction < 1 else None
        return self.train.loader(self.batch_size, shuffle=True, seed=self.seed, indices=indices)


@dataclass
class Outcome:
    model: nn.Module  # cut to `kept`
    kept: Kept
    log: list = field(default_factory=list)  # training curves, rows of {phase, step, ...}
