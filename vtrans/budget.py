"""Budgets: what the user asks for (`flops=0.4`, `params=30M`), and choosing a kept set that meets it.

Costs come from the family adapter (`Adapter.cost`), exact for a kept set and differentiable for expected
counts. A budget is met when the achieved cost is at most the target and within `TOLERANCE` of it.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from vtrans.arch import Adapter, Kept, unit_counts
from vtrans.errors import UsageError

TOLERANCE = 0.01  # achieved cost must lie in [target * (1 - TOLERANCE), target]
KINDS = ("flops", "params")
_SUFFIX = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9}


@dataclass(frozen=True)
class Budget:
    kind: str  # "flops" or "params"
    value: float  # a fraction of the dense cost (0 < value <= 1), or an absolute count when absolute
    seq_len: int  # FLOPs are counted for one sequence of this many tokens
    absolute: bool = False

    def fraction(self, dense: dict[str, float]) -> float:
        return self.value / dense[self.kind] if self.absolute else self.value

    def to_dict(self) -> dict:
        return {"kind": self.kind, "value": self.value, "seq_len": self.seq_len, "absolute": self.absolute}


def parse_target(text: str, seq_len: int) -> Budget:
    """`flops=0.4` (fraction of dense FLOPs), `params=0.5` or `params=30M` (absolute count)."""
    usage = "use --target flops=F or params=P, with 0 < F, P <= 1 a fraction of the dense model, or P a count like 30M"
    match = re.fullmatch(r"\s*(\w+)\s*=\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([kKmMbBgG]?)\s*", text or "")
    if not match:
        raise UsageError(f"--target '{text}' is not understood: {usage}")
    kind, number, suffix = match.group(1).lower(), float(match.group(2)), match.group(3).lower()
    if kind not in KINDS:
        raise UsageError(f"--target '{text}': unknown kind '{kind}'; {usage}")
    if not math.isfinite(number) or number <= 0:
        raise UsageError(f"--target '{text}': the budget must be greater than 0; {usage}")
    absolute = bool(suffix) or number > 1
    if absolute and kind == "flops":
        raise UsageError(f"--target '{text}': FLOPs budgets are fractions of the dense model (0 < F <= 1)")
    return Budget(kind=kind, value=number * _SUFFIX[suffix], seq_len=seq_len, absolute=absolute)


def exact_cost(adapter: Adapter, kept: Kept, seq_len: int) -> dict[str, float]:
    return {k: float(v) for k, v in adapter.cost(kept.size_tensors(), seq_len).items()}


def dense_cost(adapter: Adapter, seq_len: int) -> dict[str, float]:
    return exact_cost(adapter, Kept.dense(adapter.dims()), seq_len)


def check_reachable(adapter: Adapter, budget: Budget, keep_hidden: bool = False) -> None:
    """Fail before any work if even the smallest model the structures allow is over budget (with every
    hidden dim kept, for methods that do not prune it)."""
    dims = adapter.dims()
    dense = dense_cost(adapter, budget.seq_len)
    minimal = adapter.minimal_kept()
    if keep_hidden:
        minimal.hidden = list(range(dims.hidden))
    smallest = exact_cost(adapter, minimal, budget.seq_len)
    target = budget.fraction(dense)
    floor = smallest[budget.kind] / dense[budget.kind]
    if target > 1:
        raise UsageError(f"--target {budget.kind}={budget.value:g} is larger than the dense model "
                         f"({dense[budget.kind]:,.0f} {budget.kind}); ask for less")
    if target < floor:
        allows = "architecture and method allow" if keep_hidden else "architecture allows"
        raise UsageError(f"--target {budget.kind}={budget.value:g} cannot be met: the smallest model this "
                         f"{allows} keeps {floor:.4f} of the dense {budget.kind} "
                         f"({smallest[budget.kind]:,.0f}); ask for at least that")


def kept_from_keep(keep: dict[str, torch.Tensor]) -> Kept:
    """The Kept record of boolean tensors shaped like the masks."""
    return Kept(hidden=keep["hidden"].nonzero().flatten().tolist(),
                heads=[row.nonzero().flatten().tolist() for row in keep["heads"]],
                ffn=[row.nonzero().flatten().tolist() for row in keep["ffn"]],
                attention=keep["attention"].tolist(), ffn_block=keep["ffn_block"].tolist())


def select_kept(adapter: Adapter, scores: dict[str, torch.Tensor], budget: Budget,
                keep: dict[str, torch.Tensor] | None = None) -> Kept:
    """The kept set closest to `keep` (default: score > 0) that meets the budget.

    Units are dropped lowest score first while over budget, then added back highest score first while
    more than TOLERANCE under it, skipping any unit that would break the budget. If only coarse units are
    left to add (a hidden dim costs a share of every layer), the best of them goes back in and FFN neurons,
    the finest units, make room for it.
    """
    seq_len = budget.seq_len
    dense = dense_cost(adapter, seq_len)
    target = budget.fraction(dense) * dense[budget.kind]
    floor = target * (1 - TOLERANCE)
    start = keep if keep is not None else {name: s > 0 for name, s in scores.items()}
    kept = {name: k.clone().bool() for name, k in start.items()}

    def cost() -> float:
        counts = unit_counts({name: k.double() for name, k in kept.items()})
        return float(adapter.cost(counts, seq_len)[budget.kind])

    def drop(units, until: float) -> float:
        current = cost()
        for _, name, idx in units:
            if current <= until:
                break
            if kept[name][idx] and not (name == "hidden" and int(kept["hidden"].sum()) == 1):
                kept[name][idx] = False
                current = cost()
        return current

    def fill(units) -> float:
        current = cost()
        for _, name, idx in units:
            if current >= floor:
                break
            if not kept[name][idx]:
                kept[name][idx] = True
                trial = cost()
                if trial <= target:
                    current = trial
                else:
                    kept[name][idx] = False
        return current

    units = sorted(((float(s), name, idx) for name, tensor in scores.items()
                    for idx, s in zip(_indices(tensor), tensor.flatten().tolist())), key=lambda u: u[0])
    drop(units, target)
    current = fill(units[::-1])
    for _ in range(8):
        if current >= floor:
            break
        coarse = next(((n, i) for _, n, i in reversed(units) if n != "ffn" and not kept[n][i]), None)
        if coarse is None:
            break
        kept[coarse[0]][coarse[1]] = True
        if drop([u for u in units if u[1] == "ffn"], target) > target:
            kept[coarse[0]][coarse[1]] = False  # not enough neurons to make room: give up on it
            break
        current = fill(units[::-1])
    return kept_from_keep(kept)


def _indices(tensor: torch.Tensor) -> list[tuple[int, ...]]:
    return [tuple(i) for i in torch.cartesian_prod(*[torch.arange(n) for n in tensor.shape]).reshape(
        tensor.numel(), tensor.dim()).tolist()]
