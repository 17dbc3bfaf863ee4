"""Data parallel over torch.distributed: `torchrun --nproc-per-node N -m vtrans compress ...` or
`accelerate launch --multi_gpu -m vtrans compress ...` (which runs torchrun).

The launcher sets RANK, WORLD_SIZE and MASTER_ADDR/PORT; `start` joins the process group (NCCL on GPUs, gloo
on CPUs). Every rank then runs the same program on the same global batches, each on its own contiguous share
of the rows (`shard`, applied by the training loaders), and:

  - gradients (masks, lambdas, and the weights when they train) are averaged after every backward pass
    (`average_gradients`), so every rank takes the same optimiser step and the masks, the Lagrangian and the
    kept set stay identical everywhere, as with DistributedDataParallel;
  - scores that are sums over examples (Fisher information, least-squares systems) are summed over ranks
    (`sum_`); OPTIN gives each rank a share of the units to score (`mine`);
  - the mask noise of the whole global batch is drawn on every rank and each takes its rows (`rows`), so a run
    gives the kept set one process would give with the same global batch and seed;
  - only rank 0 writes (the output directory, checkpoints, the teacher cache), and decisions that rest on a
    file or a measurement (is the teacher cached? this machine's latency fit) are rank 0's, sent to all
    (`from_main`);
  - a last batch with fewer rows than ranks is dropped (data.py), so no rank is left without rows;
  - what differs per rank and must survive a restart (random generator states: dropout under uneven shares,
    the varied copies of a sample) is gathered into rank 0's checkpoint (`every_rank`), each rank taking its
    own back on resume.

The whole batch's mask noise comes from the global random generator, as in one process; ranks draw the same
noise while they consume that generator alike, which dropout in the student breaks when shares are uneven: the
noise is then still independent noise, not one process's. The training log's losses are rank 0's rows.
Several machines need the teacher cache ($VTRANS_CACHE) on a filesystem they share.

Each rank's loss, a mean over its rows, is weighed by its share of the batch (`loss_weight`), so a last batch
that does not split evenly weighs every row as one process would. Losses averaged over tokens (the hidden-state
distillation) are averaged over each rank's tokens: equal to one process's where the shares have as many
tokens, close otherwise.

Without a launcher (WORLD_SIZE unset or 1) every function here is a no-op.
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from vtrans.errors import UsageError

DEVICES = ("auto", "cpu", "cuda")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_device(option: str) -> torch.device:
    """--device: `auto` is this rank's GPU where PyTorch sees one, else the CPU."""
    if option not in DEVICES:
        raise UsageError(f"--device {option}: choose one of {', '.join(DEVICES)}")
    if option == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: PyTorch sees no CUDA GPU on this machine (torch.cuda.is_available() is "
                         "False); use --device cpu, or auto")
    if option == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank())


def start(device: torch.device) -> None:
    """Join the process group the launcher describes (once); nothing without a launcher."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # masks, scores and counts are CPU tensors: gloo carries those, NCCL the GPU ones
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(hours=2))


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def _share(count: int, of_rank: int) -> slice:
    """Rank `of_rank`'s contiguous rows of `count` (the first ranks take one more when it does not divide)."""
    size, extra = divmod(count, world_size())
    begin = of_rank * size + min(of_rank, extra)
    return slice(begin, begin + size + (of_rank < extra))


def shard(batch: dict) -> dict:
    """This rank's rows of a global batch."""
    if not active():
        return batch
    count = len(next(iter(batch.values())))
    rows = _share(count, rank())
    return {name: value[rows] for name, value in batch.items()}


def rows(local_count: int) -> tuple[int, slice]:
    """(rows in the global batch, this rank's rows of it), given this rank's row count."""
    if not active():
        return local_count, slice(0, local_count)
    total = torch.tensor([local_count])
    dist.all_reduce(total)
    return int(total), _share(int(total), rank())


def loss_weight(local_count: int, total: int | None = None) -> float:
    """What this rank's loss (a mean over its rows) is multiplied by so that the gradients averaged over ranks
    are those of the mean over the global batch, also when it does not split evenly: world x rows / total.
    `total`, the global batch's rows, where the caller already has it from `rows`."""
    if not active():
        return 1.0
    if total is None:
        total, _ = rows(local_count)
    return world_size() * local_count / total


def mine(index: int) -> bool:
    """Whether the `index`-th piece of work split round-robin over ranks is this rank's."""
    return index % world_size() == rank()


def sum_(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor summed over ranks, in place (and returned)."""
    if active():
        dist.all_reduce(tensor)
    return tensor


def average_gradients(parameters) -> None:
    """Every parameter's gradient averaged over ranks: one flat all-reduce per device and dtype (the masks'
    gradients are on the CPU, the weights' on the GPU)."""
    if not active():
        return
    groups: dict[tuple, list[torch.Tensor]] = {}
    for p in parameters:
        if p.grad is not None:
            groups.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
    for grads in groups.values():  # the same groups, in the same order, on every rank
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= world_size()
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def barrier() -> None:
    if active():
        dist.barrier()


def from_main(value):
    """Rank 0's `value` on every rank (any picklable object), so that all ranks take rank 0's decision."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def every_rank(value) -> list:
    """Every rank's `value` (any picklable object), in rank order, on every rank."""
    if not active():
        return [value]
    values = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def own_row(stacked: torch.Tensor) -> torch.Tensor | None:
    """This rank's row of values `every_rank` gathered and stacked, as a tensor of its own (a generator's
    set_state reads a row of the stack from the wrong place: it crashed); None where another number of
    processes stacked them."""
    if stacked.shape[0] != world_size():
        return None
    return stacked[rank()].clone()


def stop() -> None:
    if active():
        dist.destroy_process_group()
