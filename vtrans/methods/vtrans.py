"""VTrans: VIB masks on every structure, trained with the weights, the task loss, distillation from the dense
teacher and a Lagrangian that drives the expected cost to the budget; then the kept set is fixed to meet the
budget exactly, mu is folded into the weights, the model is cut, and a short distillation recovers accuracy.

Fast-VTrans is the same on a label-stratified sample of the data (`data_fraction`, 3% by default).
Faster-VTrans freezes the weights on that sample: only the masks and lambdas train; no recovery unless asked.

Loss while pruning:
    task + distillation + kl_weight * mean_KL + lambda1 * (s - t) + lambda2 * (s - t)^2
where s is the expected cost (a fraction of the dense cost, from the masks' keep probabilities) and t the
target, ramped from 1 down to the budget over the first `ramp` part of pruning (iterative pruning); the
lambdas follow gradient ascent.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from vtrans.arch import Kept, MaskValues, detach_masks
from vtrans.budget import dense_cost, exact_cost, kept_from_keep, select_kept
from vtrans.checkpoint import capture, restore
from vtrans.masks import VIBMasks
from vtrans.methods.base import Job, Outcome
from vtrans.surgery import cut_model
from vtrans.training import DistillWeights, TeacherOutputs, batches, distill, distill_loss, steps_for


SAMPLE_EPOCHS = 10.0  # default epochs over a data sample (fast and faster variants): a sample is small
SAMPLE_TEACHER_BYTES = 1 << 30  # teacher outputs remembered for a sample (343 MiniLM examples: ~0.1 GB)


@dataclass
class VTransSettings:
    lr: float = 3e-5  # weights, while pruning
    recover_lr: float = 5e-5  # weights of the cut model, while recovering
    mask_lr: float = 0.1
    lagrangian_lr: float = 0.05
    kl_weight: float = 0.01  # on the KL averaged over units
    ramp: float = 0.6  # share of pruning steps over which the target goes from 1 to the budget
    keep_temperature: float = 1.0  # of the sigmoid(log_alpha / T) keep probability in the expected cost
    log_sigma2_init: float = -6.0  # log_alpha starts at 6: every unit kept, little noise
    log_every: int = 10
    distill: DistillWeights = field(default_factory=DistillWeights)


class Lagrangian(nn.Module):
    """lambda1 * (s - t) + lambda2 * (s - t)^2; the lambdas follow gradient ascent."""

    def __init__(self):
        super().__init__()
        self.lambdas = nn.Parameter(torch.zeros(2))

    def forward(self, gap: torch.Tensor) -> torch.Tensor:
        return self.lambdas[0] * gap + self.lambdas[1] * gap * gap


def prune(job: Job, settings: VTransSettings, loader, epochs: float, train_weights: bool = True,
          state: dict | None = None, teacher: TeacherOutputs | None = None) -> tuple[Kept, dict, list]:
    """Train VIB masks (and the weights, unless frozen) under the Lagrangian; return the kept set meeting the
    budget, the mu of every unit, and the training log. `state`, from a checkpoint, resumes; `teacher` may
    remember the teacher's outputs across epochs."""
    teacher = teacher or TeacherOutputs(job.teacher, max_bytes=0)
    model, adapter, budget = job.model, job.adapter, job.budget
    dims = adapter.dims()
    dense = dense_cost(adapter, budget.seq_len)
    target = budget.fraction(dense)
    masks = VIBMasks(dims.mask_shapes(), log_sigma2_init=settings.log_sigma2_init)
    lagrangian = Lagrangian()
    optimizers = {"mask_optimizer": torch.optim.Adam(masks.parameters(), lr=settings.mask_lr),
                  "lagrangian_optimizer": torch.optim.Adam(lagrangian.parameters(), lr=settings.lagrangian_lr,
                                                           maximize=True)}
    model.requires_grad_(train_weights)  # the student is a copy of the frozen teacher: unfreeze to train it
    if train_weights:
        optimizers["optimizer"] = torch.optim.AdamW(model.parameters(), lr=settings.lr)
    objects = {"masks": masks, "lagrangian": lagrangian, **optimizers} | ({"model": model} if train_weights else {})
    start = restore(state, objects) if state is not None else 0
    log = state["log"] if state is not None else []
    values = MaskValues()
    handles = adapter.attach_masks(values)
    steps = steps_for(epochs, loader)
    ramp_steps = max(1, int(settings.ramp * steps))
    model.train(train_weights)
    try:
        for step, batch in batches(loader, steps, f"{job.method}: pruning", start):
            labels = batch.pop("labels")
            teacher_out = teacher(batch)
            hidden_keep = masks.hidden_keep()
            values.set(masks.sample(labels.shape[0]), hidden_keep)
            losses = distill_loss(model(**batch, output_hidden_states=True), teacher_out, labels,
                                  batch["attention_mask"], settings.distill, hidden_keep=hidden_keep)
            expected = adapter.cost(masks.expected_sizes(settings.keep_temperature), budget.seq_len)
            s = expected[budget.kind] / dense[budget.kind]
            t = 1 - (1 - target) * min(1.0, (step + 1) / ramp_steps)
            kl = masks.kl() / masks.num_units()
            (losses["loss"] + settings.kl_weight * kl + lagrangian(s - t)).backward()
            for optimizer in optimizers.values():
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if step % settings.log_every == 0 or step == steps - 1:
                now = kept_from_keep({name: m.keep() for name, m in masks.groups.items()})
                log.append({"phase": "prune", "step": step, "task": float(losses["task"]),
                            "distill": float(losses["distill"]), "kl": kl.item(),
                            "expected_cost": s.item(), "target": t,
                            "kept_cost": exact_cost(adapter, now, budget.seq_len)[budget.kind] / dense[budget.kind],
                            "lambda1": lagrangian.lambdas[0].item(), "lambda2": lagrangian.lambdas[1].item()})
            if job.checkpoint is not None and job.checkpoint.due(step):
                job.checkpoint.save(capture("prune", step, objects, log=log))
    finally:
        detach_masks(handles)
        values.set(None)
        model.requires_grad_(True)
    scores = masks.log_alphas()
    kept = select_kept(adapter, scores, budget)
    mu = {name: m.mu.detach().clone() for name, m in masks.groups.items()}
    return kept, mu, log


def _prune_and_cut(job: Job, settings: VTransSettings, loader, epochs: float, teacher: TeacherOutputs,
                   train_weights: bool = True) -> tuple[Kept, list, dict | None]:
    """Prune and cut, or, resuming a run killed while recovering, rebuild its cut model. Returns the kept set,
    the log, and the recovery state to resume (None to start recovery afresh)."""
    state = job.checkpoint.load() if job.checkpoint is not None and job.resume else None
    if state is not None and state["phase"] == "recover":
        kept = Kept(**state["kept"])
        job.adapter.cut(kept)  # the weights, already folded, come from the checkpoint
        return kept, state["log"], state
    kept, mu, log = prune(job, settings, loader, epochs, train_weights, state, teacher)
    cut_model(job.adapter, kept, mu)
    return kept, log, None


def _recover(job: Job, kept: Kept, loader, steps: int, settings: VTransSettings, log: list,
             state: dict | None, teacher: TeacherOutputs) -> None:
    distill(job.model, teacher, loader, steps, settings.recover_lr, settings.distill,
            hidden_index=torch.tensor(kept.hidden, dtype=torch.long), desc=f"{job.method}: recovering", log=log,
            checkpoint=job.checkpoint, state=state, extra={"kept": vars(kept)})


def run(job: Job) -> Outcome:
    """VTrans on all the data: prune, cut, recover."""
    return _prune_cut_recover(job, sampled=False)


def run_fast(job: Job) -> Outcome:
    """Fast-VTrans: the same on a label-stratified sample of `data_fraction` of the data."""
    return _prune_cut_recover(job, sampled=True)


def _prune_cut_recover(job: Job, sampled: bool, settings: VTransSettings | None = None) -> Outcome:
    settings = settings or VTransSettings()
    loader = job.loader(job.data_fraction if sampled else 1.0)
    default_epochs = SAMPLE_EPOCHS if sampled else 1.0
    epochs = default_epochs if job.prune_epochs is None else job.prune_epochs
    recover_epochs = epochs if job.recover_epochs is None else job.recover_epochs
    # a sample is seen many times: remember the teacher's outputs (the full data is seen once or twice)
    teacher = TeacherOutputs(job.teacher, max_bytes=SAMPLE_TEACHER_BYTES if sampled else 0)
    kept, log, state = _prune_and_cut(job, settings, loader, epochs, teacher)
    _recover(job, kept, loader, steps_for(recover_epochs, loader), settings, log, state, teacher)
    return Outcome(model=job.model, kept=kept, log=log)


def run_faster(job: Job, settings: VTransSettings | None = None) -> Outcome:
    """Faster-VTrans: weights frozen, masks learned on a sample; optional recovery of `recover_steps`."""
    settings = settings or VTransSettings()
    loader = job.loader(job.data_fraction)
    epochs = SAMPLE_EPOCHS if job.prune_epochs is None else job.prune_epochs
    teacher = TeacherOutputs(job.teacher, max_bytes=SAMPLE_TEACHER_BYTES)
    kept, log, state = _prune_and_cut(job, settings, loader, epochs, teacher, train_weights=False)
    _recover(job, kept, loader, job.recover_steps, settings, log, state, teacher)
    return Outcome(model=job.model, kept=kept, log=log)
