"""What a method receives and returns, and the one path every method takes: choose, cut, recover.

A method chooses a kept set (and, optionally, mask values to fold into the kept units); `run` then cuts the
model down to it and, if asked, distils the dense teacher into the cut model, with the same recovery for
every method, so one-shot choices and VTrans compare like for like.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from vtrans.arch import Adapter, Kept
from vtrans.budget import Budget
from vtrans.checkpoint import Checkpoint
from vtrans.data import Augmented, Examples, order_state, restore_order, stratified_indices
from vtrans.objectives import Objective
from vtrans.objectives.classification import Classification
from vtrans.surgery import cut_model
from vtrans.training import TeacherOutputs, distill, steps_for

if TYPE_CHECKING:
    from vtrans.methods.vtrans import VTransSettings

SAMPLE_EPOCHS = 10.0  # default epochs over a data sample (fast and faster variants): a sample is small
SAMPLE_TEACHER_BYTES = 1 << 30  # teacher outputs remembered for a sample (343 MiniLM examples: ~0.1 GB)


@dataclass
class Job:
    method: str
    model: nn.Module  # the student: a copy of the teacher, changed in place
    adapter: Adapter  # the student's adapter
    teacher: nn.Module  # the dense model, frozen, in eval mode
    budget: Budget
    train: Examples
    batch_size: int = 32
    seed: int = 0
    prune_epochs: float | None = None  # None: the method's default
    recover_epochs: float | None = None  # None: the method's default
    data_fraction: float = 0.03  # for the methods that learn from a sample of the data
    recover_fraction: float | None = None  # the share of the data recovery distils on; None: the method's data
    augment: float = 0.15  # share of tokens replaced in the copies of a sample that weights learn from (0: none)
    checkpoint: Checkpoint | None = None  # where training state is saved every N steps
    resume: bool = False  # continue from the checkpoint
    vtrans: VTransSettings | None = None  # mask training settings (None: the defaults)
    objective: Objective = field(default_factory=Classification)  # the task's losses
    prunes_hidden: bool = True  # the hidden width competes for the budget (`run` sets it: method and objective)
    device: torch.device = torch.device("cpu")  # where the models and batches are (the masks stay on the CPU)

    def loader(self, fraction: float = 1.0):
        """Shuffled batches of the training data, or of a label-stratified sample of `fraction` of it: this
        rank's rows of each (global) batch, on the job's device."""
        indices = stratified_indices(self.train.strata, fraction, self.seed) if fraction < 1 else None
        return self.train.loader(
            self.batch_size,
            shuffle=True,
            seed=self.seed,
            indices=indices,
            shard=True,
            device=self.device,
        )

    def sample_loader(self, samples: int):
        """Batches of a label-stratified sample of about `samples` examples (all of them if fewer)."""
        return self.loader(min(1.0, samples / len(self.train)))


@dataclass
class Choice:
    kept: Kept
    scale: dict[str, torch.Tensor] | None = None  # mask values folded into the kept units at the cut
    log: list = field(default_factory=list)


@dataclass
class Outcome:
    model: nn.Module  # cut to `kept`
    kept: Kept
    log: list = field(default_factory=list)  # training curves, rows of {phase, step, ...}
    # wall time of choosing (with the cut) and of recovering; a resumed run adds what the runs before it spent
    seconds: dict[str, float] = field(default_factory=dict)


def never_rescales(adapter: Adapter) -> bool:
    return False


def always_rescales(adapter: Adapter) -> bool:
    return True


@dataclass(frozen=True)
class Method:
    """How a method chooses, and what it learns from.

    `choose(job, loader, teacher, state, epochs)` returns a Choice; `state` is a checkpoint to resume from
    (or None), `epochs` how long to prune (methods that do not train ignore it).
    A `sampled` method learns (and recovers, unless `recover_fraction` says otherwise) on a label-stratified
    `data_fraction` of the data; a `trains` method recovers after the cut by default (as many epochs as it
    pruned), the others only when asked. Weights that recover on a sample (Fast-VTrans's) learn from the
    teacher's outputs alone, on varied copies of it where the data can be varied (`Job.augment`,
    data.Augmented).

    What a run holds in memory (`vtrans plan`): `backprop`, whether choosing backpropagates into masks or
    weights; `forward_sequences`, how many sequences one forward carries on every process when the method
    batches its own (None: the run's batch, shared by the processes); `rescales(adapter)`, whether the choice
    ends with the least-squares rescaling by default.
    """

    choose: Callable[..., Choice]
    sampled: bool = False
    trains: bool = False
    prunes_hidden: bool = True
    backprop: bool = True
    forward_sequences: int | None = None
    rescales: Callable[[Adapter], bool] = never_rescales

    def prune_epochs(self, job: Job) -> float:
        default = SAMPLE_EPOCHS if self.sampled else 1.0
        return default if job.prune_epochs is None else job.prune_epochs

    def recover_epochs(self, job: Job) -> float:
        if job.recover_epochs is not None:
            return job.recover_epochs
        return self.prune_epochs(job) if self.trains else 0.0


def run(job: Job, method: Method) -> Outcome:
    """Choose, cut, recover. A run killed while recovering resumes from its cut model and recovery state."""
    job = replace(job, prunes_hidden=method.prunes_hidden and job.objective.prunes_hidden)
    loader = job.loader(job.data_fraction if method.sampled else 1.0)
    # masks searched on a sample see it many times, as it is: remember the teacher's outputs (the full data is
    # seen once or twice)
    teacher = TeacherOutputs(job.teacher, job.objective, SAMPLE_TEACHER_BYTES if method.sampled else 0)
    state = job.checkpoint.load() if job.checkpoint is not None and job.resume else None
    started = time.perf_counter()
    earlier = state.get("elapsed", 0.0) if state is not None else 0.0  # the interrupted runs', to their last save
    if job.checkpoint is not None:
        job.checkpoint.start_clock(earlier)
    recovering = state is not None and state["phase"] == "recover"  # resumed with the choice made
    if recovering:
        kept, log = Kept(**state["kept"]), state["log"]
        job.adapter.cut(kept)  # the weights, already folded, come from the checkpoint
    else:
        choice = method.choose(job, loader, teacher, state, method.prune_epochs(job))
        kept, log, state = choice.kept, choice.log, None
        cut_model(job.adapter, kept, choice.scale)
    choose_seconds = state.get("choose_seconds", 0.0) if recovering else earlier + time.perf_counter() - started
    settings = job.vtrans
    if settings is None:
        from vtrans.methods.vtrans import VTransSettings

        settings = VTransSettings()
    weights = settings.distill
    if job.recover_fraction is not None:  # e.g. a sampled method's choice, recovered like every other method's
        loader = job.loader(job.recover_fraction)
        teacher = TeacherOutputs(job.teacher, job.objective, 0)  # data seen once: nothing worth remembering
    elif method.sampled:
        # weights trained on a few hundred examples overfit their labels: they learn from the teacher's outputs
        # alone (DINOv2, fast-vtrans at flops=0.4: 83.95% against 82.90% with the labels; README nineteenth
        # session)
        weights = replace(weights, task=0.0)
        if job.augment > 0 and job.train.augments:
            # and from copies varied anew every epoch (MiniLM at flops=0.4), never seen twice: nothing to remember
            loader = Augmented(loader, job.train, job.augment, job.seed)
            teacher = TeacherOutputs(job.teacher, job.objective, 0)
    if state is not None and "order" in state:  # resumed while recovering: the data order where recovery began
        restore_order(loader, state["order"])  # (a checkpoint from before vtrans kept it: a fresh order)
    extra = {"kept": vars(kept), "choose_seconds": choose_seconds}
    if job.checkpoint is not None:  # taken before recovery draws its first batch; a collective for varied copies
        extra["order"] = order_state(loader)
    distill(
        job.model,
        teacher,
        loader,
        steps_for(method.recover_epochs(job), loader),
        settings.recover_lr,
        weights,
        job.objective,
        hidden_index=torch.tensor(kept.hidden, dtype=torch.long),
        desc=f"{job.method}: recovering",
        log=log,
        warmup=settings.recover_warmup,
        checkpoint=job.checkpoint,
        state=state,
        extra=extra,
    )
    total = earlier + time.perf_counter() - started
    seconds = {"choose": choose_seconds, "recover": total - choose_seconds}
    return Outcome(model=job.model, kept=kept, log=log, seconds=seconds)
