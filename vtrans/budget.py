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
from vtrans.latency import LatencyModel
from vtrans.surgery import indicators

TOLERANCE = 0.01  # achieved cost must lie in [target * (1 - TOLERANCE), target]
KINDS = ("flops", "params", "latency")
_SUFFIX = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9}


@dataclass(frozen=True)
class Budget:
    kind: str  # "flops", "params" or "latency"
    value: float  # a fraction of the dense cost (0 < value <= 1), or an absolute count (ms) when absolute
    seq_len: int  # FLOPs are counted for one sequence of this many tokens
    absolute: bool = False
    latency: LatencyModel | None = None  # for latency budgets: predicted ms, fitted on this machine
    multiple: int = 1  # kept FFN neurons per layer and hidden width rounded to multiples of this (see Chunks)

    def of(self, costs: dict):
        """The budgeted cost in `costs` (from `Adapter.cost`): a count, or the predicted latency in ms."""
        if self.kind != "latency":
            return costs[self.kind]
        if self.latency is None:
            raise RuntimeError("a latency budget needs its latency model (vtrans.latency.fit_latency) first")
        return self.latency.predict(costs)

    def fraction(self, dense: dict[str, float]) -> float:
        return self.value / self.of(dense) if self.absolute else self.value

    def to_dict(self) -> dict:
        return {"kind": self.kind, "value": self.value, "seq_len": self.seq_len, "absolute": self.absolute}


def parse_target(text: str, seq_len: int) -> Budget:
    """`flops=0.4` (fraction of dense FLOPs), `params=0.5` or `params=30M` (absolute count), `latency=2x` (a
    speedup) or `latency=40ms` (at the latency batch and length)."""
    usage = ("use --target flops=F or params=P, with 0 < F, P <= 1 a fraction of the dense model, or P a count like "
             "30M; or latency=2x (a speedup) or latency=40ms")
    latency = re.fullmatch(r"\s*latency\s*=\s*([0-9]*\.?[0-9]+)\s*(x|ms)\s*", (text or "").lower())
    if latency:
        number, unit = float(latency.group(1)), latency.group(2)
        if number <= 0 or (unit == "x" and number < 1):
            raise UsageError(f"--target '{text}': a speedup is at least 1x and a latency more than 0 ms")
        return Budget(kind="latency", value=number if unit == "ms" else 1 / number, seq_len=seq_len,
                      absolute=unit == "ms")
    match = re.fullmatch(r"\s*(\w+)\s*=\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([kKmMbBgG]?)\s*", text or "")
    if not match:
        raise UsageError(f"--target '{text}' is not understood: {usage}")
    kind, number, suffix = match.group(1).lower(), float(match.group(2)), match.group(3).lower()
    if kind not in KINDS:
        raise UsageError(f"--target '{text}': unknown kind '{kind}'; {usage}")
    if kind == "latency":
        raise UsageError(f"--target '{text}': give a latency as a speedup (latency=2x) or a time (latency=40ms)")
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


def check_reachable(adapter: Adapter, budget: Budget, keep_hidden: bool = False, hint: str = "") -> None:
    """Fail before any work if even the smallest model the structures allow is over budget (with every
    hidden dim kept, for methods that do not prune it); `hint` ends the error (e.g. which methods go further)."""
    dims = adapter.dims()
    dense = dense_cost(adapter, budget.seq_len)
    minimal = adapter.minimal_kept()
    if keep_hidden:
        minimal.hidden = list(range(dims.hidden))
    smallest = exact_cost(adapter, minimal, budget.seq_len)
    target = budget.fraction(dense)
    floor = float(budget.of(smallest) / budget.of(dense))
    if target > 1:
        raise UsageError(f"--target {budget.kind}={budget.value:g} is larger than the dense model "
                         f"({budget.of(dense):,.0f} {budget.kind}); ask for less")
    if target < floor:
        allows = "architecture and method allow" if keep_hidden else "architecture allows"
        raise UsageError(f"--target {budget.kind}={budget.value:g} cannot be met: the smallest model this "
                         f"{allows} keeps {floor:.4f} of the dense {budget.kind} "
                         f"({budget.of(smallest):,.0f}); ask for at least that{hint}")


def kept_from_keep(keep: dict[str, torch.Tensor]) -> Kept:
    """The Kept record of boolean tensors shaped like the masks."""
    return Kept(hidden=keep["hidden"].nonzero().flatten().tolist(),
                heads=[row.nonzero().flatten().tolist() for row in keep["heads"]],
                ffn=[row.nonzero().flatten().tolist() for row in keep["ffn"]],
                attention=keep["attention"].tolist(), ffn_block=keep["ffn_block"].tolist())


# Which group each block mask gates, and the block that gates each group.
BLOCK_CONTENTS = {"attention": "heads", "ffn_block": "ffn"}
CONTAINER = {contents: block for block, contents in BLOCK_CONTENTS.items()}


def within_blocks(keep: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`keep` (0/1 or bool per unit) with nothing kept inside a dropped block."""
    out = {name: k.bool() for name, k in keep.items()}
    for block, contents in BLOCK_CONTENTS.items():
        out[contents] = out[contents] & out[block].unsqueeze(-1)
    return out


def keep_changes(before: dict[str, torch.Tensor], after: Kept, dims) -> dict[str, dict[str, int]]:
    """Units per group that `after` adds to or removes from the kept set `before` (what selection changed)."""
    final = indicators(after, dims)
    added, removed = {}, {}
    for name, start in within_blocks(before).items():
        end = final[name].bool()
        added[name] = int((end & ~start).sum())
        removed[name] = int((start & ~end).sum())
    return {"added": added, "removed": removed}


class Selection:
    """A kept set under edit: its exact cost, and what each unit is worth per unit of cost."""

    def __init__(self, adapter: Adapter, worth: dict[str, torch.Tensor], keep: dict[str, torch.Tensor],
                 budget: Budget, sizes: dict[str, torch.Tensor] | None = None):
        """`sizes`: how many units each entry stands for (a chunk of `Chunks`); 1 by default."""
        self.adapter, self.worth, self.budget = adapter, worth, budget
        self.kept = {name: k.clone().bool() for name, k in keep.items()}
        self.sizes = sizes or {}

    def cost(self) -> float:
        counts = unit_counts({name: k.double() * self.sizes.get(name, 1) for name, k in self.kept.items()})
        return float(self.budget.of(self.adapter.cost(counts, self.budget.seq_len)))

    def price(self, name: str, index: tuple, current: float) -> float:
        """What keeping the unit costs, given everything else: the cost change when it is toggled."""
        self.kept[name][index] = ~self.kept[name][index]
        toggled = self.cost()
        self.kept[name][index] = ~self.kept[name][index]
        return abs(current - toggled)

    def block_worth(self, block: str, layer: int) -> float:
        """A block is worth what it holds: dropped whole, it loses all of it. inf (never drop) stays inf."""
        own = float(self.worth[block][layer])
        held = self.worth[BLOCK_CONTENTS[block]][layer][self.kept[BLOCK_CONTENTS[block]][layer]]
        return own if own == math.inf else float(held.sum())

    def candidates(self, dropping: bool) -> list[tuple[float, float, str, tuple]]:
        """(worth per cost, cost, group, index) of every unit that can be dropped (the kept ones) or added
        (the others), least worth per cost first. Units of one group and layer cost the same, so one toggle
        prices them all. Units inside a dropped block are no candidates: the block is, with what it held."""
        current = self.cost()
        rows = []
        for name, worth in self.worth.items():
            kept = self.kept[name]
            if name in BLOCK_CONTENTS:
                for layer in (kept == dropping).nonzero().flatten().tolist():
                    price = self.price(name, (layer,), current)
                    rows.append((self.block_worth(name, layer), price, name, (layer,)))
                continue
            block = CONTAINER.get(name)
            for layer in range(kept.shape[0]) if kept.dim() == 2 else [None]:
                if block is not None and not self.kept[block][layer]:
                    continue
                prefix = () if layer is None else (layer,)
                units = ((kept[prefix] if prefix else kept) == dropping).nonzero().flatten().tolist()
                if not units:
                    continue
                price = self.price(name, prefix + (units[0],), current)
                rows += [(float(worth[prefix + (u,)]), price, name, prefix + (u,)) for u in units]
        rows = [(_per_cost(value, price), price, name, index) for value, price, name, index in rows if price > 0]
        return sorted(rows, key=lambda row: row[0])


def _per_cost(value: float, price: float) -> float:
    return value if value == math.inf else value / price


class Chunks:
    """FFN neurons and hidden dims grouped `multiple` at a time, best with best by worth, each row (layer) on
    its own: any set of kept chunks keeps a multiple of `multiple` units (hardware-friendly matrix sizes; a
    row's last chunk holds the remainder). A chunk is worth what its members are together."""

    GROUPS = ("hidden", "ffn")

    def __init__(self, worth: dict[str, torch.Tensor], multiple: int):
        self.members: dict[str, list[list[torch.Tensor]]] = {}  # group -> per row, the unit indices per chunk
        self.worth, self.sizes = dict(worth), {}
        for name in self.GROUPS:
            rows = worth[name].reshape(-1, worth[name].shape[-1])
            self.members[name] = [row.argsort(descending=True, stable=True).split(multiple) for row in rows]
            chunk_worth = [[float(row[chunk].sum()) for chunk in chunks]
                           for row, chunks in zip(rows, self.members[name])]
            shape = (*worth[name].shape[:-1], -1)
            self.worth[name] = torch.tensor(chunk_worth, dtype=worth[name].dtype).reshape(shape)
            self.sizes[name] = torch.tensor([[len(chunk) for chunk in chunks] for chunks in self.members[name]],
                                            dtype=torch.float64).reshape(shape)

    def to_chunks(self, keep: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A unit-level kept set as chunks: a chunk is kept if most of its members are."""
        out = dict(keep)
        for name in self.GROUPS:
            rows = keep[name].reshape(-1, keep[name].shape[-1]).float()
            kept = [[bool(row[chunk].mean() > 0.5) for chunk in chunks]
                    for row, chunks in zip(rows, self.members[name])]
            out[name] = torch.tensor(kept).reshape(self.worth[name].shape)
        return out

    def to_units(self, keep: dict[str, torch.Tensor], unit_shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
        out = dict(keep)
        for name in self.GROUPS:
            units = torch.zeros(unit_shapes[name], dtype=torch.bool)
            rows, kept_rows = units.reshape(-1, units.shape[-1]), keep[name].reshape(-1, keep[name].shape[-1])
            for row, kept, chunks in zip(rows, kept_rows, self.members[name]):
                for chunk, on in zip(chunks, kept.tolist()):
                    row[chunk] = on
            out[name] = units
        return out


def select_kept(adapter: Adapter, worth: dict[str, torch.Tensor], budget: Budget,
                keep: dict[str, torch.Tensor] | None = None) -> Kept:
    """The kept set closest to `keep` (default: everything) that meets the budget, in multiples of
    `budget.multiple` FFN neurons per layer and hidden dims (`Chunks`) when that is more than 1."""
    if budget.multiple <= 1:
        return kept_from_keep(_select(adapter, worth, budget, keep))
    chunks = Chunks(worth, budget.multiple)
    start = chunks.to_chunks(keep) if keep is not None else None
    kept = _select(adapter, chunks.worth, budget, start, chunks.sizes)
    return kept_from_keep(chunks.to_units(kept, {name: w.shape for name, w in worth.items()}))


def _select(adapter: Adapter, worth: dict[str, torch.Tensor], budget: Budget,
            keep: dict[str, torch.Tensor] | None = None, sizes: dict[str, torch.Tensor] | None = None
            ) -> dict[str, torch.Tensor]:
    """The kept set (boolean tensors shaped like `worth`) closest to `keep` that meets the budget.

    `worth` (>= 0 per unit, shaped like the masks; inf: never drop) is what a unit is worth, and each unit
    is judged by its worth per cost in the current kept set. A block is worth what it holds, so its worth
    per cost is its contents' average: the least worthy units inside it go before the block goes whole.
    While over budget, the least worth per cost goes first (prices refreshed as they change); while more
    than TOLERANCE under, the most worth per cost comes back first, skipping whatever would break the budget.
    If only coarse units are left to add (a hidden dim costs a share of every layer), the best of them
    comes back and the least worthy FFN neurons, the finest units, make room for it.
    """
    dense = dense_cost(adapter, budget.seq_len)
    target = budget.fraction(dense) * budget.of(dense)
    floor = target * (1 - TOLERANCE)
    start = keep if keep is not None else {name: torch.ones_like(w, dtype=torch.bool) for name, w in worth.items()}
    selection = Selection(adapter, worth, start, budget, sizes)
    kept = selection.kept

    def drop(groups=None) -> float:
        """Drop the least worth per cost while over budget, half the excess at a time between repricings."""
        current = selection.cost()
        while current > target:
            rows = [r for r in selection.candidates(dropping=True)
                    if r[0] < math.inf and (groups is None or r[2] in groups)]
            removed = 0.0
            for _, price, name, index in rows:
                if name == "hidden" and int(kept["hidden"].sum()) == 1:
                    continue
                kept[name][index] = False
                removed += price
                if name in BLOCK_CONTENTS or removed >= 0.5 * (current - target):
                    break  # a block went, or prices may have moved: reprice
            if removed == 0:
                break
            current = selection.cost()
        return current

    def fill() -> float:
        """Add the most worth per cost while more than TOLERANCE under budget and it fits."""
        current = selection.cost()
        while current < floor:
            added = False
            for _, price, name, index in reversed(selection.candidates(dropping=False)):
                if current + price > target:
                    continue
                kept[name][index] = True
                trial = selection.cost()
                if trial > target:
                    kept[name][index] = False
                    continue
                current, added = trial, True
                if current >= floor or name in BLOCK_CONTENTS:
                    break  # done, or a block came back with its contents: reprice
            if not added:
                break
        return current

    drop()
    current = fill()
    for _ in range(8):
        if current >= floor:
            break
        coarse = [r for r in selection.candidates(dropping=False) if r[2] != "ffn"]
        if not coarse:
            break
        _, _, name, index = coarse[-1]
        kept[name][index] = True
        if drop(groups={"ffn"}) > target:
            kept[name][index] = False  # not enough neurons to make room: give up on it
            break
        current = fill()
    return kept
