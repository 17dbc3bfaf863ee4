"""What a method receives and returns. Every method turns a Job into an Outcome: a cut, smaller model."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from vtrans.arch import Adapter, Kept
from vtrans.budget import Budget


@dataclass
class Job:
    method: str
    model: nn.Module  # the student: a copy of the teacher, changed in place
    adapter: Adapter  # the student's adapter
    teacher: nn.Module  # the dense model, frozen, in eval mode
    budget: Budget
    train_loader: object
    seed: int = 0


@dataclass
class Outcome:
    model: nn.Module  # cut to `kept`
    kept: Kept
    log: list = field(default_factory=list)  # training curves, rows of {phase, step, ...}
