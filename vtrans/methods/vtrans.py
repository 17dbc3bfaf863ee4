"""VTrans: VIB masks on every structure, trained with the task loss, distillation from the dense teacher and a
Lagrangian that drives the expected cost to the budget; iterative: the weights train with the masks.

Fast-VTrans and Faster-VTrans search on a label-stratified sample of the data (`data_fraction`, 3% by
default) with the weights frozen: only the masks and lambdas train. Fast-VTrans then trains the kept model's
weights on varied copies of the sample (its recovery: methods/base.py, data.Augmented); Faster-VTrans stops at
the choice. Weights that trained with the masks on so small a sample made the masks choose worse: on MiniLM at
flops=0.4, that Fast-VTrans scored 84.06% (three seeds) against 85.05% this way, and its choice before a
full recovery was 0.97 points below Fisher's, where the frozen search's ties it (README, eighteenth session).
Both keep the hidden width: removing hidden dims changes every LayerNorm's statistics, which frozen weights
cannot follow (measured: 1.6-1.9 points lost at flops=0.4 and 0.6 on MiniLM when faster-vtrans pruned them),
nor weights that see a few hundred examples.

Pruning runs in two phases over its steps:

  search   masks z = mu + eps * sigma; loss = task + distillation + kl_weight * sum_KL
           + lambda1 * (s - t) + lambda2 * (s - t)^2, where s is the expected cost (a fraction of the dense
           cost, from the keep probabilities sigmoid(log_alpha / T)) and t the target, ramped from the masks'
           starting expected cost to the budget over the first `ramp` share of the search, then held; the
           lambdas follow plain gradient ascent, so they move in proportion to the gap and stop where s meets t.
           (A warm start begins below 1: a ramp from 1 would first push the units it meant to drop back up.)
  settle   (the last `settle` share of the steps) the kept set is fixed: z = mu on kept units, 0 elsewhere,
           deterministic, so what trains is exactly what is kept; mu (and the weights, if trained) go on
           learning. By default a quarter of the steps with frozen weights, none otherwise; where the
           rescaling below follows (with the hidden width fixed) it replaces all settling would learn, so those
           steps are skipped: the run ends with its search (Faster-VTrans: the same choice in 25% less time).

With frozen weights (Faster-VTrans) the kept units' values are then set by least squares, layer by layer, to
reproduce the dense model's residual stream (methods/rescale.py; `rescale`), on the method's own examples;
measured on MiniLM, this beats folding in mu (three seeds: 83.19% vs 82.81% at flops=0.4, 85.82% vs 84.80% at
0.6). Where the weights train, recovery does that job.

Whole blocks (a layer's attention or FFN) have no trained mask: theirs stays at 1 through the search, and a
block goes when the kept set is chosen, as what it holds goes (a block is worth its contents). A trained block
mask, one scalar priced at its whole block's cost (the cost its contents already carry), was the first thing
the Lagrangian's push drove under threshold: on MiniLM at flops=0.15 and 0.25 VTrans switched off FFN blocks
whose neurons training kept. Without that push, the KL and distillation alone drove one under in a tiny model.
Held at 1 (README, fourteenth session): at flops=0.15, 83.35% and 84.80% on two seeds where the trained block
masks scored 82.73% and 83.80% (103 vs 82 examples, McNemar p = 0.14), level with fisher+recover; at 0.4 and
0.6 unchanged (three seeds each: 73 vs 73, 56 vs 49).

The kept set is chosen once, when the search ends: units with mu^2 > sigma^2 (log_alpha > 0), brought within
the budget (budget.select_kept) judging units by their first-order effect on the loss at that kept set, per
cost (`choose`); the log records how many units the selection moved from what training converged to.

Warm start (`mask_init="fisher"`): Adam moves every log_alpha by about the same step, so units started
equal cross the threshold together and the expected cost collapses. Instead each unit starts at a
log_alpha spread by its Fisher information per cost (squared per-example gradients of its mask, as the
fisher baseline computes them): the units a one-shot Fisher choice at the budget would drop start low, in
their order, the rest high; training then reorders them.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn

from vtrans import distributed
from vtrans.arch import Adapter, MaskValues, detach_masks
from vtrans.budget import (
    BLOCK_CONTENTS,
    Selection,
    dense_cost,
    exact_cost,
    keep_changes,
    kept_from_keep,
    select_kept,
)
from vtrans.checkpoint import capture, restore
from vtrans.data import example_count, token_mask
from vtrans.masks import VIBMasks
from vtrans.methods.base import Choice, Job
from vtrans.methods.baselines import fisher_scores
from vtrans.methods.rescale import rescale
from vtrans.surgery import indicators
from vtrans.training import DistillWeights, TeacherOutputs, batches, distill_loss, frozen_input_embeddings, steps_for

MASK_INITS = ("fisher", "uniform")
# Initial log_alpha: units a one-shot choice would drop start in [LOW, LOW + SPREAD), the others in
# [HIGH, HIGH + SPREAD); uniform starts every unit at UNIFORM.
LOW, HIGH, SPREAD, UNIFORM = 1.0, 5.0, 2.0, 6.0
UNIT_GROUPS = ("hidden", "heads", "ffn")  # the groups Fisher information scores (blocks are worth what they hold)
FIXED = 20.0  # log_alpha of a group held at 1 through the search (`_held_at_one`): sigma^2 = e^-20 mu^2, not trained


def _scored_groups(job: Job) -> tuple[str, ...]:
    """The unit groups that compete for the budget (the hidden width too, unless the objective keeps it)."""
    return UNIT_GROUPS if job.prunes_hidden else tuple(g for g in UNIT_GROUPS if g != "hidden")


def _held_at_one(job: Job) -> tuple[str, ...]:
    """The mask groups that stay at 1 through the search, untrained: the blocks (a block is judged by what it
    holds, when the kept set is chosen) and the hidden width where the method or the objective keeps it."""
    return tuple(BLOCK_CONTENTS) + (() if job.prunes_hidden else ("hidden",))


def _never_dropped(job: Job, dims) -> dict[str, torch.Tensor]:
    return {} if job.prunes_hidden else {"hidden": torch.full((dims.hidden,), float("inf"))}


@dataclass
class VTransSettings:
    lr: float = 3e-5  # weights, while pruning
    recover_lr: float = 5e-5  # weights of the cut model, while recovering
    # share of the recovery over which its learning rate rises to recover_lr: a fresh AdamW's first steps move
    # every weight by about the full rate, which a short recovery does not repair (DINOv2, fast-vtrans at
    # flops=0.4: 82.90% with it, 81.35% without; README nineteenth session)
    recover_warmup: float = 0.1
    mask_lr: float | None = None  # None: 4 / ramp steps, within [0.01, 0.1] (short runs need bigger steps)
    lagrangian_lr: float = 0.1  # plain gradient ascent on the lambdas
    penalty: float = 1000.0  # initial lambda2: a proportional push on the gap from the first step (Lagrangian)
    kl_weight: float = 1e-6  # per unit, on the KL summed over units
    ramp: float = 0.5  # share of the search over which the target goes from the masks' start to the budget
    settle: float | None = None  # share of the steps with the kept set fixed; None: see `settle_share`
    rescale: bool | None = None  # least squares on the kept units' values at the end; None: see `rescales`
    temperature: float = 1.0  # of the keep probability sigmoid(log_alpha / T) in the expected cost
    mask_init: str = "fisher"  # or "uniform"
    init_samples: int = 512  # examples for the Fisher warm start and for the budget fix-up's scores
    log_every: int = 10
    distill: DistillWeights = field(default_factory=DistillWeights)
    search_layers: str | None = None  # hidden states the search matches; None: see `search_distill`

    def search_distill(self, rescales: bool) -> DistillWeights:
        """The distillation the mask search trains with: `distill`, matching only the last layer's hidden states
        where the least-squares rescaling follows (unless `search_layers` says otherwise). The fit reproduces
        every layer's stream itself; a search made to as well, with frozen weights, picked worse units:
        faster-vtrans on MiniLM at flops=0.4 scored 83.32% (three seeds) matching the last layer, 82.63%
        matching all (126 vs 99 examples, README fifteenth session)."""
        layers = self.search_layers
        if layers is None:
            layers = "last" if rescales and self.distill.layers == "all" else self.distill.layers
        return replace(self.distill, layers=layers)

    def mask_lr_for(self, ramp_steps: int) -> float:
        if self.mask_lr is not None:
            return self.mask_lr
        return min(0.1, max(0.01, 4.0 / ramp_steps))

    def settle_share(self, train_weights: bool) -> float:
        if self.settle is not None:
            return self.settle
        return 0.0 if train_weights else 0.25

    def runs_settle(self, replaced: bool) -> bool:
        """Whether the settle steps run: by default not where all they would learn is `replaced` (by the
        rescaling, with the hidden width fixed: the fit replaces the heads' and neurons' mu, blocks fold in as
        0/1; a pruned hidden width would keep its settled mu). The run then ends with its search."""
        return self.settle is not None or not replaced

    def rescales(self, train_weights: bool, adapter) -> bool:
        """By default with frozen weights, where the family's residual stream can be read (Adapter.residual_norm):
        fitting each layer's output alone, blind to the stream's drift, lost 1.6 points at flops=0.4 on MiniLM.
        Not where outputs reach the stream scaled (LayerScale): on DINOv2 at flops=0.4 the fit scored 75.05%
        against 83.45% for the trained mu (its stream error, dominated by a few huge dims, is a poor guide)."""
        if self.rescale is not None:
            return self.rescale
        readable = adapter.residual_norm(0, "heads") is not None
        return not train_weights and readable and adapter.output_scale(0, "heads") is None


class Lagrangian(nn.Module):
    """lambda1 * (s - t) + lambda2 * (s - t)^2; the lambdas follow gradient ascent.

    lambda2 starts at `penalty`, so the push on the masks, lambda1 + 2 lambda2 (s - t), follows the gap from
    the first step and changes sign with it; lambda1 alone (an integral of the gap) lags behind the ramp,
    then winds up and drives the cost far below the target before it unwinds.

    A unit feels that push times its share of the cost, against its distillation gradient: of MiniLM's
    parameters, about 2e-3 for a hidden dim or a head and 3e-5 for an FFN neuron. At a penalty of 100 the
    expensive units held out: on MiniLM at params=0.5 the expected cost lagged the ramp by 0.094 where it
    ended and the budget fix-up then removed 1,179 neurons; at 1000 it lagged by 0.016 and the fix-up removed
    229 (README, eleventh session)."""

    def __init__(self, penalty: float = 0.0):
        super().__init__()
        self.lambdas = nn.Parameter(torch.tensor([0.0, penalty]))

    def forward(self, gap: torch.Tensor) -> torch.Tensor:
        return self.lambdas[0] * gap + self.lambdas[1] * gap * gap


def warm_start(job: Job, loader, samples: int) -> dict[str, torch.Tensor]:
    """Initial log_alpha of the scored units from Fisher information per cost (see the module docstring); the
    one-shot choice keeps every block, as the search does (`_held_at_one`)."""
    dims = job.adapter.dims()
    fisher = fisher_scores(job, _own_order(job, loader), _scored_groups(job), limit=samples)
    shapes = dims.mask_shapes()
    worth = fisher | {name: torch.full(shapes[name], float("inf")) for name in _held_at_one(job)}
    dropped = {name: ~keep for name, keep in _keep_tensors(select_kept(job.adapter, worth, job.budget), dims).items()}
    every = {name: torch.ones_like(w, dtype=torch.bool) for name, w in worth.items()}
    ratios = {name: torch.zeros(w.shape) for name, w in worth.items()}
    # each unit's Fisher information per cost, priced as the final selection prices it
    for ratio, _, name, index in Selection(job.adapter, worth, every, job.budget).candidates(dropping=True):
        ratios[name][index] = ratio
    init = {name: torch.empty(f.shape) for name, f in fisher.items()}
    for tier, base in ((True, LOW), (False, HIGH)):  # dropped by the one-shot choice, then kept
        members = [(float(ratios[name][index]), name, index) for name in fisher
                   for index in map(tuple, dropped[name].eq(tier).nonzero().tolist())]
        for rank, (_, name, index) in enumerate(sorted(members)):
            init[name][index] = base + SPREAD * rank / max(1, len(members))
    return init


def _own_order(job: Job, loader):
    """Batches of the same data in an order of their own: the training loader's shuffle stays untouched, so a
    resumed run (which skips what uses this) sees the batches an uninterrupted one does."""
    return torch.utils.data.DataLoader(loader.dataset, batch_size=loader.batch_size, shuffle=True,
                                       collate_fn=loader.collate_fn, generator=torch.Generator().manual_seed(job.seed))


def _keep_tensors(kept, dims) -> dict[str, torch.Tensor]:
    return {name: value.bool() for name, value in indicators(kept, dims).items()}


def choose(job: Job, masks: VIBMasks, loader, samples: int) -> tuple[dict[str, torch.Tensor], dict]:
    """The kept set at the end of the search (as 0/1 tensors) and how far it is from what training converged to
    (mu^2 > sigma^2): the budget fix-up and, with `--round-to`, the rounding to multiples.

    The fix-up judges units by their first-order effect on the loss at the searched model (Fisher information
    at the kept set, scaled by mu), per cost: keep probabilities saturate near 1, so per cost they would only
    say which units are expensive."""
    dims = job.adapter.dims()
    converged = masks.keep()  # every block kept: their masks stay at 1 (`_held_at_one`)
    mu = {name: m.mu.detach() for name, m in masks.groups.items()}
    at = {name: mu[name] * converged[name] for name in mu}
    worth = fisher_scores(job, _own_order(job, loader), _scored_groups(job), limit=samples, at=at, size=mu)
    worth |= _never_dropped(job, dims)
    worth |= {block: torch.zeros(dims.layers) for block in BLOCK_CONTENTS}  # a block is worth what it holds
    kept = select_kept(job.adapter, worth, job.budget, converged)
    return _keep_tensors(kept, dims), keep_changes(converged, kept, dims)


def expected_fraction(job: Job, masks: VIBMasks, temperature: float, dense: dict) -> torch.Tensor:
    """The budgeted cost the keep probabilities expect, as a fraction of the dense model's (differentiable)."""
    expected = job.adapter.cost(masks.expected_sizes(temperature), job.budget.seq_len)
    return job.budget.of(expected) / job.budget.of(dense)


def _step(job: Job, settings: VTransSettings, distill: DistillWeights, masks: VIBMasks, lagrangian: Lagrangian,
          values: MaskValues, batch: dict, teacher: TeacherOutputs, settled: dict | None, target: float,
          dense: dict) -> tuple[dict, float, float]:
    """One pruning step's forward and backward, towards this step's (ramped) `target`; returns the losses, the
    expected cost and the KL."""
    model = job.model
    labels = batch.pop("labels", None)
    teacher_out = teacher(batch)
    count = example_count(batch)
    total, rows = distributed.rows(count)  # one count over ranks: for the noise's rows and the loss weight
    if settled is None:  # search: sampled masks, this rank's rows of the global batch's noise
        hidden_keep = masks.hidden_keep()
        held = _held_at_one(job)  # exactly 1, not applied (MaskValues.set); still drawn, for the same noise
        values.set({name: z[rows] for name, z in masks.sample(total).items() if name not in held}, hidden_keep)
    else:  # settle: exactly the kept model, scaled by mu
        hidden_keep = settled["hidden"].float()
        values.set({name: (m.mu * settled[name]).unsqueeze(0) for name, m in masks.groups.items()}, hidden_keep)
    out = model(**batch, output_hidden_states=True)
    losses = distill_loss(out, teacher_out, labels, token_mask(batch, out.hidden_states[0].shape[:2]),
                          distill, job.objective, hidden_keep=hidden_keep)
    s = expected_fraction(job, masks, settings.temperature, dense)
    kl = masks.kl()
    loss = losses["loss"]
    if settled is None:
        loss = loss + settings.kl_weight * kl + lagrangian(s - target)
    (loss * distributed.loss_weight(count, total)).backward()
    distributed.average_gradients([*masks.parameters(), *lagrangian.parameters(), *model.parameters()])
    return losses, s.item(), kl.item()


def prune(job: Job, settings: VTransSettings, loader, epochs: float, train_weights: bool = True,
          state: dict | None = None, teacher: TeacherOutputs | None = None) -> Choice:
    """Train VIB masks (and the weights, unless frozen) under the Lagrangian, then settle (see runs_settle) and,
    if it rescales, fit the kept units' values; return the kept set meeting the budget, the values to fold in
    and the training log. `state`, from a checkpoint, resumes; `teacher` may remember the teacher's outputs
    across epochs."""
    teacher = teacher or TeacherOutputs(job.teacher, job.objective, max_bytes=0)
    model, adapter, budget = job.model, job.adapter, job.budget
    dense = dense_cost(adapter, budget.seq_len)
    target = budget.fraction(dense)
    steps = steps_for(epochs, loader)
    search_steps = max(1, steps - int(settings.settle_share(train_weights) * steps))
    rescales = settings.rescales(train_weights, adapter)
    distill = settings.search_distill(rescales)
    if not settings.runs_settle(replaced=rescales and not job.prunes_hidden):
        steps = search_steps
    ramp_steps = max(1, int(settings.ramp * search_steps))
    if settings.mask_init not in MASK_INITS:
        raise ValueError(f"mask_init {settings.mask_init!r}: choose one of {', '.join(MASK_INITS)}")
    shapes = adapter.dims().mask_shapes()
    if settings.mask_init == "fisher" and state is None:
        init = warm_start(job, loader, settings.init_samples)
    else:  # uniform, or resuming: the checkpoint holds the masks
        init = {name: torch.full(shapes[name], UNIFORM) for name in _scored_groups(job)}
    held = _held_at_one(job)
    init |= {name: torch.full(shapes[name], FIXED) for name in held}
    masks = VIBMasks(shapes, init)
    for name in held:
        masks.groups[name].requires_grad_(False)
    lagrangian = Lagrangian(settings.penalty)
    optimizers = {"mask_optimizer": torch.optim.Adam(masks.parameters(), lr=settings.mask_lr_for(ramp_steps)),
                  "lagrangian_optimizer": torch.optim.SGD(lagrangian.parameters(), lr=settings.lagrangian_lr,
                                                          maximize=True)}
    model.requires_grad_(train_weights)  # the student is a copy of the frozen teacher: unfreeze to train it
    try:
        with frozen_input_embeddings(model):
            if train_weights:
                weights = [p for p in model.parameters() if p.requires_grad]
                optimizers["optimizer"] = torch.optim.AdamW(weights, lr=settings.lr)
            objects = {"masks": masks, "lagrangian": lagrangian, **optimizers}
            objects |= {"model": model} if train_weights else {}
            start = restore(state, objects) if state is not None else 0
            log = state["log"] if state is not None else []
            if state is None:  # the ramp starts where the masks do
                with torch.no_grad():
                    ramp_from = float(expected_fraction(job, masks, settings.temperature, dense))
            else:
                ramp_from = state["ramp_from"]
            settled = state.get("settled") if state is not None else None  # the kept set, once chosen
            values = MaskValues()
            handles = adapter.attach_masks(values)
            model.train(train_weights)
            try:
                for step, batch in batches(loader, steps, f"{job.method}: pruning", start):
                    if step == search_steps and settled is None:
                        values.set(None)  # the search's masks off: the choice attaches its own
                        settled, changes = choose(job, masks, loader, settings.init_samples)
                        log.append({"phase": "select", "step": step, **changes})
                    # the target goes from where the masks started to the budget, then holds
                    t = ramp_from - (ramp_from - target) * min(1.0, (step + 1) / ramp_steps)
                    losses, s, kl = _step(job, settings, distill, masks, lagrangian, values, batch, teacher, settled, t,
                                          dense)
                    for optimizer in optimizers.values():
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                    if step % settings.log_every == 0 or step == steps - 1:
                        now = kept_from_keep(settled if settled is not None else masks.keep())
                        kept_cost = budget.of(exact_cost(adapter, now, budget.seq_len)) / budget.of(dense)
                        log.append({"phase": "prune", "step": step, "task": float(losses["task"]),
                                    "distill": float(losses["distill"]), "kl": kl, "expected_cost": s, "target": t,
                                    "kept_cost": kept_cost, "settled": settled is not None,
                                    "lambda1": lagrangian.lambdas[0].item(), "lambda2": lagrangian.lambdas[1].item()})
                    if job.checkpoint is not None and job.checkpoint.due(step):
                        job.checkpoint.save(capture("prune", step, objects, log=log, settled=settled,
                                                     ramp_from=ramp_from))
            finally:
                detach_masks(handles)
                values.set(None)
    finally:
        model.requires_grad_(True)
    if settled is None:  # no settle phase: choose now
        settled, changes = choose(job, masks, loader, settings.init_samples)
        log.append({"phase": "select", "step": steps, **changes})
    kept = kept_from_keep(settled)
    mu = {name: m.mu.detach().clone() for name, m in masks.groups.items()}
    if rescales:  # the heads' and neurons' values by least squares, replacing mu
        # on the method's own examples (a sampled variant learns from its sample alone), in an order of their
        # own: the training loader's next shuffle depends on how many epochs ran
        scale, rescale_log = rescale(job, kept, trained=mu, loader=_own_order(job, loader))
        return Choice(kept=kept, scale=scale, log=log + rescale_log)
    return Choice(kept=kept, scale=mu, log=log)


def rescales_frozen(adapter: Adapter) -> bool:
    """Whether a run with frozen weights (Faster-VTrans) ends with the least-squares fit by default."""
    return VTransSettings().rescales(train_weights=False, adapter=adapter)


def settings_of(job: Job) -> VTransSettings:
    return job.vtrans if job.vtrans is not None else VTransSettings()


def choose_trained(job: Job, loader, teacher: TeacherOutputs, state: dict | None, epochs: float) -> Choice:
    """VTrans: masks and weights train together."""
    return prune(job, settings_of(job), loader, epochs, True, state, teacher)


def choose_frozen(job: Job, loader, teacher: TeacherOutputs, state: dict | None, epochs: float) -> Choice:
    """Fast-VTrans and Faster-VTrans: the weights stay frozen; only the masks (and lambdas) train."""
    return prune(job, settings_of(job), loader, epochs, False, state, teacher)
