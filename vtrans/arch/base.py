"""What every family adapter provides, and the record of what a compressed model keeps.

The methods see a model only through this interface: the prunable structures (`Dims`), a way to apply
masks to the model's forward pass (`attach_masks`), the cost of a given set of structure sizes (`cost`),
and the surgery that cuts the model down (`cut`). A new family is one new file beside this one.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

# The mask groups every adapter exposes. Shapes, for a model of L layers:
#   hidden (H,), heads (L, n_heads), ffn (L, ffn_size), attention (L,), ffn_block (L,)
MASK_GROUPS = ("hidden", "heads", "ffn", "attention", "ffn_block")


@dataclass(frozen=True)
class Dims:
    """The dense model's prunable sizes."""

    hidden: int
    layers: int
    heads: int
    head_dim: int
    ffn: int

    def mask_shapes(self) -> dict[str, tuple[int, ...]]:
        return {
            "hidden": (self.hidden,),
            "heads": (self.layers, self.heads),
            "ffn": (self.layers, self.ffn),
            "attention": (self.layers,),
            "ffn_block": (self.layers,),
        }


@dataclass
class Kept:
    """Which units survive: indices into the dense model's hidden dims, heads and FFN neurons per layer.

    A layer whose attention (or FFN) block is dropped keeps no heads (or neurons).
    """

    hidden: list[int]
    heads: list[list[int]]
    ffn: list[list[int]]
    attention: list[bool] = field(default_factory=list)
    ffn_block: list[bool] = field(default_factory=list)

    def __post_init__(self):
        layers = len(self.heads)
        self.attention = list(self.attention) if self.attention else [True] * layers
        self.ffn_block = list(self.ffn_block) if self.ffn_block else [True] * layers
        # A dropped block keeps nothing inside it; an empty block still keeps its output bias.
        self.heads = [sorted(h) if on else [] for h, on in zip(self.heads, self.attention)]
        self.ffn = [sorted(f) if on else [] for f, on in zip(self.ffn, self.ffn_block)]
        self.hidden = sorted(self.hidden)

    @classmethod
    def dense(cls, dims: Dims) -> "Kept":
        return cls(
            hidden=list(range(dims.hidden)),
            heads=[list(range(dims.heads)) for _ in range(dims.layers)],
            ffn=[list(range(dims.ffn)) for _ in range(dims.layers)],
        )

    @classmethod
    def from_sizes(cls, sizes: dict) -> "Kept":
        """The kept set of a saved model: its units renumbered 0..n-1 (what `load` rebuilds)."""
        layers = sizes["layers"]
        return cls(
            hidden=list(range(sizes["hidden"])),
            heads=[list(range(layer["heads"])) for layer in layers],
            ffn=[list(range(layer["ffn"])) for layer in layers],
            attention=[layer["attention"] for layer in layers],
            ffn_block=[layer["ffn_block"] for layer in layers],
        )

    def sizes(self) -> dict:
        """The JSON record saved in the config and the report."""
        return {
            "hidden": len(self.hidden),
            "layers": [
                {"heads": len(h), "ffn": len(f), "attention": a, "ffn_block": b}
                for h, f, a, b in zip(self.heads, self.ffn, self.attention, self.ffn_block)
            ],
        }

    def size_tensors(self) -> dict[str, torch.Tensor]:
        """Counts in the form `Adapter.cost` takes (float tensors, so expected counts fit the same code)."""
        as_float = lambda xs: torch.tensor(xs, dtype=torch.float64)  # noqa: E731
        return {
            "hidden": as_float(len(self.hidden)),
            "heads": as_float([len(h) for h in self.heads]),
            "ffn": as_float([len(f) for f in self.ffn]),
            "attention": as_float([float(a) for a in self.attention]),
            "ffn_block": as_float([float(b) for b in self.ffn_block]),
        }


def unit_counts(per_unit: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Counts in the form `Adapter.cost` takes, from per-unit keep values shaped like the masks: 0/1 for a
    kept set, keep probabilities for an expected cost."""
    return {"hidden": per_unit["hidden"].sum(), "heads": per_unit["heads"].sum(-1), "ffn": per_unit["ffn"].sum(-1),
            "attention": per_unit["attention"], "ffn_block": per_unit["ffn_block"]}


class MaskValues:
    """The mask values the attached hooks read on each forward pass.

    `z[group]` has a leading batch axis of 1 or B (see `Dims.mask_shapes` for the rest); `hidden_keep` is the
    0/1 set of kept hidden dims, over which LayerNorm statistics are taken so that a masked model equals the
    model cut down to those dims. With `z` None the hooks do nothing and the model is dense.
    """

    def __init__(self):
        self.z: dict[str, torch.Tensor] | None = None
        self.hidden_keep: torch.Tensor | None = None

    def set(self, z: dict[str, torch.Tensor] | None, hidden_keep: torch.Tensor | None = None):
        self.z = z
        self.hidden_keep = hidden_keep


class Adapter:
    """One per family. Subclasses set `family` and implement the methods below."""

    family: str = ""
    model_types: tuple[str, ...] = ()  # the config.model_type values this adapter handles

    def __init__(self, model: nn.Module):
        self.model = model

    def dims(self) -> Dims:
        raise NotImplementedError

    @staticmethod
    def max_tokens(config) -> int:
        """The longest sequence the model's position embeddings allow."""
        return config.max_position_embeddings

    def attach_masks(self, values: MaskValues) -> list:
        """Register hooks that apply `values` in the forward pass; returns the hook handles."""
        raise NotImplementedError

    def cost(self, sizes: dict[str, torch.Tensor], seq_len: int) -> dict[str, torch.Tensor]:
        """{'params', 'flops'} of a model keeping `sizes` (counts, or expected counts: differentiable)."""
        raise NotImplementedError

    def fold(self, scale: dict[str, torch.Tensor]) -> None:
        """Multiply each unit's mask value into the weights, so the unmasked model equals the masked one."""
        raise NotImplementedError

    def cut(self, kept: Kept) -> None:
        """Replace every pruned layer by a smaller dense one holding only the kept units (in place)."""
        raise NotImplementedError

    def layer_modules(self) -> nn.ModuleList:
        """The transformer layers, in order: each maps the residual stream to the next."""
        raise NotImplementedError

    def unit_linears(self, layer: int) -> dict[str, tuple[list[nn.Linear], nn.Linear]]:
        """For 'heads' and 'ffn' of a dense layer: the linears whose output rows make the units (head_dim rows
        per head, in head order) and the linear that reads them as input columns, whose output is the sum of
        the units' contributions plus its bias. Weight-based methods (magnitude, Fisher's rescaling) use it."""
        raise NotImplementedError

    def head_logits(self, last_hidden: torch.Tensor) -> torch.Tensor:
        """The task logits from the last layer's output (what the model's head does after the layers)."""
        raise NotImplementedError

    def minimal_kept(self) -> Kept:
        """The smallest model the structures allow: one hidden dim, no attention or FFN blocks."""
        dims = self.dims()
        return Kept(hidden=[0], heads=[[]] * dims.layers, ffn=[[]] * dims.layers,
                    attention=[False] * dims.layers, ffn_block=[False] * dims.layers)


def detach_masks(handles: list) -> None:
    for handle in handles:
        handle.remove()
