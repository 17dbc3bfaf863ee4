"""The family adapter: a model's parts by name plus its traits, with masks, cost, fold and cut written once.

A family (arch/bert.py, arch/gpt2.py, arch/llama.py) only says where its parts are and what kind they are
(`Traits`, `LayerParts`); everything a method does to a model goes through the `Adapter` methods below, so a
new family of the same shape is a short file.

Where the masks act, for every family:
  hidden     the output of every norm (embedding norm, each layer's norms, final norm), with the norm's
             statistics taken over the kept dims only, as the cut model computes them; and the input of the
             head's later linears (BERT's classifier after the pooler). Every reader of the residual stream
             is a norm, so dims it drops are never read: in a pre-norm model they may go on holding values.
  heads      the input of the attention output projection, one value per head unit (a KV head and the
             query heads that share it under grouped-query attention; one head without GQA)
  attention  the output of the attention output projection (bias included): the whole attention block
  ffn        the input of the MLP output projection, one value per neuron
  ffn_block  the output of the MLP output projection (bias included): the whole MLP block
Each is a scale on a linear layer's input columns or output rows, or on a norm's affine parameters, so `fold`
is exact and `cut` only removes rows, columns and norm entries.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.cache_utils import Cache

from vtrans.deploy.modeling_vtrans import (
    empty_block,
    replace_parameter,
    resized_embedding,
    resized_linear,
    resized_norm,
    resized_projection,
    set_attention_sizes,
    weight_out_in,
)

# The mask groups every adapter exposes. Shapes, for a model of L layers:
#   hidden (H,), heads (L, head units), ffn (L, ffn_size), attention (L,), ffn_block (L,)
MASK_GROUPS = ("hidden", "heads", "ffn", "attention", "ffn_block")


@dataclass(frozen=True)
class Dims:
    """The dense model's prunable sizes. A head unit is a KV head with its `query_group` query heads."""

    hidden: int
    layers: int
    heads: int
    head_dim: int
    ffn: int
    query_group: int = 1  # query heads per KV head (1 without grouped-query attention)

    def mask_shapes(self) -> dict[str, tuple[int, ...]]:
        return {
            "hidden": (self.hidden,),
            "heads": (self.layers, self.heads),
            "ffn": (self.layers, self.ffn),
            "attention": (self.layers,),
            "ffn_block": (self.layers,),
        }


@dataclass(frozen=True)
class Traits:
    """What kind of parts a family has."""

    norm: str = "layer"  # "layer": LayerNorm (weight, bias); "rms": RMSNorm (weight only)
    fused_qkv: bool = False  # one attention input projection writes query, key and value, in that order
    head_tokens: str = "first"  # tokens the head maps: "first" (a pooled [CLS]) or "all" (every position)


@dataclass(frozen=True)
class LayerParts:
    """Module paths inside one transformer layer."""

    attention: str  # replaced by `EmptyBlock` when the layer keeps no heads
    attention_inputs: tuple[str, ...]  # query, key, value projections (or the one fused projection)
    attention_output: str
    mlp_inputs: tuple[str, ...]  # up projection (and the gate of a gated MLP): one row per neuron each
    mlp_output: str
    norms: tuple[str, ...]
    mlp: str | None = None  # replaced by `EmptyBlock` when the layer keeps no neurons (None: never needed)
    vectors: tuple[str, ...] = ()  # parameters whose last axis is the hidden width (DINOv2's LayerScale)
    # per-dim scales of the attention's and the FFN's outputs on their way to the residual stream (LayerScale;
    # also in `vectors`), in that order; () where the outputs are added as they are
    output_scales: tuple[str, ...] = ()


@dataclass
class Kept:
    """Which units survive: indices into the dense model's hidden dims, head units and FFN neurons per layer.

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
        return {
            "hidden": _float_tensor(len(self.hidden)),
            "heads": _float_tensor([len(h) for h in self.heads]),
            "ffn": _float_tensor([len(f) for f in self.ffn]),
            "attention": _float_tensor([float(a) for a in self.attention]),
            "ffn_block": _float_tensor([float(b) for b in self.ffn_block]),
        }


def _float_tensor(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def unit_counts(per_unit: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Counts in the form `Adapter.cost` takes, from per-unit keep values shaped like the masks: 0/1 for a
    kept set, keep probabilities for an expected cost."""
    return {"hidden": per_unit["hidden"].sum(), "heads": per_unit["heads"].sum(-1), "ffn": per_unit["ffn"].sum(-1),
            "attention": per_unit["attention"], "ffn_block": per_unit["ffn_block"]}


class MaskValues:
    """The mask values the attached hooks read on each forward pass.

    `z[group]` has a leading batch axis of 1 or B (see `Dims.mask_shapes` for the rest); `hidden_keep` is the
    0/1 set of kept hidden dims, over which norm statistics are taken so that a masked model equals the
    model cut down to those dims. With `z` None the hooks do nothing and the model is dense.

    A group left out of `z` is not applied: `set` leaves out values that are all exactly 1 and asked for no
    gradient (and `hidden_keep` keeping every dim), since multiplying by 1 changes nothing and a norm over
    every dim is the plain norm. Their hooks then cost nothing: in Faster-VTrans's search, where the hidden
    width and the blocks stay at 1, a step took 0.41 s with them applied and 0.38 s without (MiniLM).
    """

    def __init__(self):
        self.z: dict[str, torch.Tensor] | None = None
        self.hidden_keep: torch.Tensor | None = None

    def set(self, z: dict[str, torch.Tensor] | None, hidden_keep: torch.Tensor | None = None):
        if z is not None:
            z = {name: value for name, value in z.items() if value.requires_grad or not bool(value.eq(1).all())}
            if "hidden" not in z and hidden_keep is not None and bool(hidden_keep.eq(1).all()):
                hidden_keep = None
        self.z = z
        self.hidden_keep = hidden_keep


# -- weights of either orientation ---------------------------------------------------------------------------
def scale_rows(linear: nn.Module, scale: torch.Tensor) -> None:
    """Multiply output feature i (weight row and bias) by scale[i] (or all of them by a scalar)."""
    weight_out_in(linear).mul_(scale.unsqueeze(-1) if scale.dim() else scale)
    if linear.bias is not None:
        linear.bias.mul_(scale)


def scale_columns(linear: nn.Module, scale: torch.Tensor) -> None:
    """Multiply input feature j's weights by scale[j]."""
    weight_out_in(linear).mul_(scale)


def cut_linear(old: nn.Module, rows=None, cols=None) -> nn.Module:
    """A new layer of the same kind holding only the given output rows and input columns of `old`."""
    weight = weight_out_in(old).data
    bias = old.bias.data if old.bias is not None else None
    if rows is not None:
        weight = weight[rows]
        bias = bias[rows] if bias is not None else None
    if cols is not None:
        weight = weight[:, cols]
    new = resized_linear(old, *weight.shape)
    weight_out_in(new).data.copy_(weight)
    if bias is not None:
        new.bias.data.copy_(bias)
    return new


def cut_norm(old: nn.Module, keep: torch.Tensor) -> nn.Module:
    """The norm over the kept dims only (LayerNorm or RMSNorm, of any family)."""
    new = resized_norm(old, len(keep))
    new.weight.data.copy_(old.weight.data[keep])
    if getattr(old, "bias", None) is not None:
        new.bias.data.copy_(old.bias.data[keep])
    return new


def cut_embedding(old: nn.Embedding, keep: torch.Tensor) -> nn.Embedding:
    new = resized_embedding(old, len(keep))
    new.weight.data.copy_(old.weight.data[:, keep])
    return new


def cut_projection(old: nn.Module, keep: torch.Tensor) -> nn.Module:
    """An input projection (Linear or patch Conv2d) keeping only the given outputs."""
    new = resized_projection(old, len(keep))
    new.weight.data.copy_(old.weight.data[keep])
    if old.bias is not None:
        new.bias.data.copy_(old.bias.data[keep])
    return new


def norm_eps(norm: nn.Module) -> float:
    return norm.eps if hasattr(norm, "eps") else norm.variance_epsilon


def masked_norm(norm: nn.Module, rms: bool, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The norm's output with its statistics taken over the kept dims only (keep is 0/1 over the last axis):
    what the cut model's smaller norm computes on those dims."""
    keep = keep.to(x.device)
    count = keep.sum().clamp(min=1)
    dtype, x = x.dtype, x.float()
    if rms:  # x / sqrt(mean(x^2) + eps) * weight
        mean_square = (x.square() * keep).sum(-1, keepdim=True) / count
        return norm.weight * (x * torch.rsqrt(mean_square + norm_eps(norm))).to(dtype)
    mean = (x * keep).sum(-1, keepdim=True) / count
    var = ((x - mean).square() * keep).sum(-1, keepdim=True) / count
    out = (x - mean) * torch.rsqrt(var + norm_eps(norm)) * norm.weight
    return out + norm.bias if norm.bias is not None else out


@dataclass(frozen=True)
class Shape:
    """What the cost model needs to know of the dense model beyond `Dims`: which linears have biases (1.0) or
    not (0.0), the embedding tables' rows, the head's outputs and whether it is tied to the embedding."""

    bias: dict[str, float]
    embedding_rows: int  # parameters per hidden dim outside the layers: embedding rows, vector entries
    projection_inputs: int  # weights (and biases) per hidden dim of the input projections, used once per token
    layer_vector_rows: int  # parameters per hidden dim of each layer's vectors (LayerScale)
    head_biases: list[float]
    head_outputs: int
    tied_head: bool


class Adapter:
    """One per family. A family sets the class attributes and the few methods marked "family" below."""

    family: str = ""
    model_types: tuple[str, ...] = ()  # the config.model_type values this adapter handles
    traits: Traits = Traits()
    layer_parts: LayerParts
    layers_path: str = ""  # the transformer layers, from the base model
    embeddings: tuple[str, ...] = ()  # every embedding table of width hidden, from the base model
    embedding_projections: tuple[str, ...] = ()  # input projections writing the hidden dims (a patch Conv2d)
    embedding_vectors: tuple[str, ...] = ()  # parameters whose last axis is the hidden width (CLS token, positions)
    projected_tokens_missing: int = 0  # tokens the projections do not make (a CLS token), for their FLOPs
    head_input_copies: int = 1  # hidden-wide pieces the head's first linear reads (DINOv2: CLS and mean patch)
    embedding_norm: str | None = None  # a norm right after the embeddings (post-norm encoders)
    final_norm: str | None = None  # a norm after the last layer (pre-norm models)
    vision: bool = False  # reads images (pixel_values), not tokens
    resizes_images: bool = False  # takes images of any size (interpolating its position embeddings)
    # attributes an attention module keeps about its own size, set on a cut: "heads" (head units) or "width"
    attention_sizes: dict[str, str] = {}

    def __init__(self, model: nn.Module):
        """`model` is dense (or an empty-weights skeleton of it): its sizes are read once, here."""
        self.model = model
        self.base = model.base_model
        self._dims = self._read_dims()
        self._shape = self._read_shape()

    # -- family ------------------------------------------------------------------------------------------
    def head_paths(self) -> tuple[str, ...]:
        """The head's linears, from the model, in order: each but the last maps hidden to hidden, the last maps
        hidden to the outputs (labels or vocabulary). Its first reads the last norm's output."""
        raise NotImplementedError

    def head_logits(self, last_hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The task logits from the last layer's output (what the model does after the layers)."""
        raise NotImplementedError

    @staticmethod
    def max_tokens(config) -> int:
        """The longest sequence the model's position embeddings allow."""
        return config.max_position_embeddings

    @staticmethod
    def image_tokens(config, image_size: int) -> int:
        """Tokens of one square image `image_size` pixels a side (vision families only)."""
        raise NotImplementedError

    # -- parts -------------------------------------------------------------------------------------------
    def layer_modules(self) -> nn.ModuleList:
        """The transformer layers, in order: each maps the residual stream to the next."""
        return self.base.get_submodule(self.layers_path)

    def part(self, layer: int, path: str) -> nn.Module:
        return self.layer_modules()[layer].get_submodule(path)

    def _replace(self, root: nn.Module, path: str, module: nn.Module) -> None:
        parent, _, name = path.rpartition(".")
        setattr(root.get_submodule(parent) if parent else root, name, module)

    def head(self) -> list[nn.Module]:
        return [self.model.get_submodule(path) for path in self.head_paths()]

    def norms(self) -> list[nn.Module]:
        """Every norm, in forward order; each reads the residual stream."""
        norms = [self.base.get_submodule(self.embedding_norm)] if self.embedding_norm else []
        for layer in self.layer_modules():
            norms += [layer.get_submodule(path) for path in self.layer_parts.norms]
        return norms + ([self.base.get_submodule(self.final_norm)] if self.final_norm else [])

    def residual_norm(self, layer: int, group: str) -> nn.Module | None:
        """The norm whose input is the residual stream just after `layer`'s attention output ("heads") or FFN
        output ("ffn") is added to it. In forward order every add is followed by the next norm: post-norm, the
        add's own; pre-norm, the next sublayer's (or the final norm). None where the norms do not follow that
        pattern."""
        norms = self.norms()
        if len(norms) != 2 * self.dims().layers + 1:
            return None
        return norms[1 + 2 * layer + (group == "ffn")]

    def output_scale(self, layer: int, group: str) -> torch.Tensor | None:
        """The per-dim scale on `layer`'s attention ("heads") or FFN ("ffn") output before it is added to the
        residual stream (LayerScale), or None where the output is added as it is."""
        if not self.layer_parts.output_scales:
            return None
        path = self.layer_parts.output_scales[group == "ffn"]
        return self.layer_modules()[layer].get_parameter(path).detach()

    def head_outputs(self) -> int:
        """The outputs of the head's last linear: labels, vocabulary, or a bare encoder's width (0: no head)."""
        return self._shape.head_outputs

    def tied_head(self) -> bool:
        """Whether the last head linear shares its weight with the input embedding (GPT-2, small LLaMAs), as
        the config says: a model built without weights is not tied yet."""
        tied_keys = getattr(self.model, "_tied_weights_keys", None) or {}
        paths = self.head_paths()
        return bool(paths and getattr(self.model.config, "tie_word_embeddings", False)
                    and f"{paths[-1]}.weight" in tied_keys)

    @staticmethod
    def ffn_size(config) -> int:
        return config.intermediate_size

    def dims(self) -> Dims:
        """The dense model's sizes (also after a cut)."""
        return self._dims

    def _read_dims(self) -> Dims:
        config = self.model.config
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return Dims(hidden=config.hidden_size, layers=len(self.layer_modules()), heads=kv_heads, head_dim=head_dim,
                    ffn=self.ffn_size(config), query_group=heads // kv_heads)

    def _read_shape(self) -> "Shape":
        parts, layer = self.layer_parts, self.layer_modules()[0]

        def has_bias(path):
            return float(layer.get_submodule(path).bias is not None)

        inputs = [has_bias(path) for path in parts.attention_inputs]
        query, key, value = inputs * 3 if self.traits.fused_qkv else inputs
        head = self.head()
        return Shape(
            bias={"query": query, "key": key, "value": value,
                  "attention_output": has_bias(parts.attention_output),
                  "mlp_input": has_bias(parts.mlp_inputs[0]), "mlp_output": has_bias(parts.mlp_output)},
            embedding_rows=sum(self.base.get_submodule(path).num_embeddings for path in self.embeddings)
            + sum(self.base.get_parameter(path)[..., 0].numel() for path in self.embedding_vectors),
            layer_vector_rows=sum(layer.get_parameter(path)[..., 0].numel() for path in parts.vectors),
            projection_inputs=sum(self.base.get_submodule(path).weight[0].numel()
                                  + (self.base.get_submodule(path).bias is not None)
                                  for path in self.embedding_projections),
            head_biases=[float(linear.bias is not None) for linear in head],
            head_outputs=weight_out_in(head[-1]).shape[0] if head else 0,
            tied_head=self.tied_head(),
        )

    def attention_rows(self, heads: list[int] | torch.Tensor, dims: Dims) -> list[torch.Tensor]:
        """Per attention input projection, the output rows that belong to the given head units: a unit owns
        query_group * head_dim query rows and head_dim key and value rows. A fused projection holds all the
        query rows, then all the key rows, then all the value rows."""
        heads = torch.as_tensor(heads, dtype=torch.long)
        widths = [dims.query_group * dims.head_dim, dims.head_dim, dims.head_dim]  # query, key, value per unit
        rows = [_unit_rows(heads, width) for width in widths]
        if not self.traits.fused_qkv:
            return rows
        offsets = [0, dims.heads * widths[0], dims.heads * (widths[0] + widths[1])]
        return [torch.cat([r + offset for r, offset in zip(rows, offsets)])]

    def unit_linears(self, layer: int) -> dict[str, tuple[list[tuple[nn.Module, torch.Tensor]], nn.Module, int]]:
        """For 'heads' and 'ffn' of a dense layer: the writers (each linear with its output rows per unit, shaped
        (units, rows)), the linear that reads the units as contiguous input columns (its output is the sum of
        the units' contributions plus its bias), and the reader's columns per unit. Weight-based methods use it."""
        dims, parts = self.dims(), self.layer_parts
        rows = self.attention_rows(torch.arange(dims.heads), dims)
        if self.traits.fused_qkv:  # (query | key | value, units, width) -> (units, all of a unit's rows)
            rows = [rows[0].view(3, dims.heads, -1).transpose(0, 1).flatten(1)]
        else:
            rows = [r.view(dims.heads, -1) for r in rows]
        head_writers = [(self.part(layer, path), r) for path, r in zip(parts.attention_inputs, rows)]
        neuron_writers = [(self.part(layer, path), torch.arange(dims.ffn).unsqueeze(1)) for path in parts.mlp_inputs]
        return {"heads": (head_writers, self.part(layer, parts.attention_output), dims.query_group * dims.head_dim),
                "ffn": (neuron_writers, self.part(layer, parts.mlp_output), 1)}

    def minimal_kept(self) -> Kept:
        """The smallest model the structures allow: one hidden dim, no attention or FFN blocks."""
        dims = self.dims()
        return Kept(hidden=[0], heads=[[]] * dims.layers, ffn=[[]] * dims.layers,
                    attention=[False] * dims.layers, ffn_block=[False] * dims.layers)

    # -- masks -------------------------------------------------------------------------------------------
    def attach_masks(self, values: MaskValues) -> list:
        """Register hooks that apply `values` in the forward pass; returns the hook handles."""
        dims, parts = self.dims(), self.layer_parts
        rms = self.traits.norm == "rms"

        def scale(group, index=None, per_unit=1):
            """A function multiplying a tensor's last axis (or all of it) by the current mask values."""
            def apply(x):
                if group not in values.z:  # at 1 (MaskValues.set)
                    return x
                z = values.z[group]
                z = z[:, index] if index is not None else z
                if per_unit > 1:
                    z = z.repeat_interleave(per_unit, dim=-1)
                if z.dim() == 1:  # one value per example: a whole block
                    z = z[:, None]
                while z.dim() < x.dim():
                    z = z.unsqueeze(1)
                return x * z.to(x.device, x.dtype)  # mask values live on the CPU; activations may not
            return apply

        def on_output(fn):
            def hook(module, args, output):
                return None if values.z is None else fn(output)
            return hook

        def on_input(fn):
            def hook(module, args):
                return None if values.z is None else (fn(args[0]),) + tuple(args[1:])
            return hook

        def norm_hook(module, args, output):
            if values.z is None or ("hidden" not in values.z and values.hidden_keep is None):
                return None  # every dim kept at 1: the plain norm
            out = masked_norm(module, rms, args[0], values.hidden_keep)
            return scale("hidden")(out).to(output.dtype)

        handles = [norm.register_forward_hook(norm_hook) for norm in self.norms()]
        for i in range(dims.layers):
            attention_output, mlp_output = self.part(i, parts.attention_output), self.part(i, parts.mlp_output)
            handles += [
                attention_output.register_forward_pre_hook(
                    on_input(scale("heads", i, dims.query_group * dims.head_dim))),
                attention_output.register_forward_hook(on_output(scale("attention", i))),
                mlp_output.register_forward_pre_hook(on_input(scale("ffn", i))),
                mlp_output.register_forward_hook(on_output(scale("ffn_block", i))),
            ]
        handles += [linear.register_forward_pre_hook(on_input(scale("hidden"))) for linear in self.head()[1:]]
        return handles

    # -- cost --------------------------------------------------------------------------------------------
    def cost(self, sizes: dict[str, torch.Tensor], seq_len: int) -> dict[str, torch.Tensor]:
        """Parameters and FLOPs of a model keeping `sizes` (counts, or expected counts: differentiable), and the
        other terms a latency model reads (vtrans/latency.py: LatencyModel).

        FLOPs are 2 x the multiply-adds of every matmul for one sequence of s tokens (norms, activations and
        softmax left out), as in Kaplan et al. 2020, section 2.1: per layer 2 s (weights of the layer) for the
        projections, plus 2 s^2 (query width) each for the attention scores and their weighted sum."""
        dims, shape = self.dims(), self._shape
        h = sizes["hidden"]
        heads = sizes["heads"] * sizes["attention"]  # head units per layer
        query_width = heads * dims.query_group * dims.head_dim
        key_width = heads * dims.head_dim  # and as many value rows
        ffn = sizes["ffn"] * sizes["ffn_block"]
        mlp_inputs = len(self.layer_parts.mlp_inputs)
        layer_weights = h * (query_width + 2 * key_width) + query_width * h + mlp_inputs * h * ffn + ffn * h
        layer_biases = (query_width * shape.bias["query"] + key_width * (shape.bias["key"] + shape.bias["value"])
                        + h * shape.bias["attention_output"] + mlp_inputs * ffn * shape.bias["mlp_input"]
                        + h * shape.bias["mlp_output"])
        layer_params = (layer_weights + layer_biases + len(self.layer_parts.norms) * self._norm_params(h)
                        + shape.layer_vector_rows * h)
        base_norms = (self.embedding_norm is not None) + (self.final_norm is not None)
        head_params, head_weights = self._head_cost(h)
        params = ((shape.embedding_rows + shape.projection_inputs) * h + base_norms * self._norm_params(h)
                  + layer_params.sum() + head_params)
        s = seq_len
        head_tokens = s if self.traits.head_tokens == "all" else 1
        projected = s - self.projected_tokens_missing  # e.g. image patches: every token but the CLS
        flops = ((2 * s * layer_weights + 2 * 2 * s * s * query_width).sum() + 2 * head_tokens * head_weights
                 + 2 * projected * shape.projection_inputs * h)
        # what a latency model adds to FLOPs: each block kept costs launches and memory traffic of its own, and
        # norms, residual adds and activations grow with the hidden width
        return {"params": params, "flops": flops, "attention_blocks": sizes["attention"].sum(),
                "mlp_blocks": sizes["ffn_block"].sum(), "hidden": h}

    def _norm_params(self, h: torch.Tensor) -> torch.Tensor:
        return h if self.traits.norm == "rms" else 2 * h

    def _head_cost(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(parameters, weights multiplied per token) of the head at hidden width h."""
        params = weights = torch.zeros((), dtype=torch.float64)
        if not self._shape.head_biases:  # a bare encoder
            return params, weights
        inputs = h * self.head_input_copies  # the first linear's input width
        for has_bias in self._shape.head_biases[:-1]:  # -> hidden
            weights = weights + inputs * h
            params = params + inputs * h + h * has_bias
            inputs = h
        outputs = self._shape.head_outputs
        weights = weights + inputs * outputs
        if not self._shape.tied_head:  # a tied head's weight is the embedding's, counted there
            params = params + inputs * outputs + outputs * self._shape.head_biases[-1]
        return params, weights

    # -- surgery -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def fold(self, scale: dict[str, torch.Tensor]) -> None:
        """Multiply each unit's mask value into the weights, so the unmasked model equals the masked one."""
        dims, parts = self.dims(), self.layer_parts
        hidden = scale["hidden"]
        for norm in self.norms():
            norm.weight.mul_(hidden)
            if getattr(norm, "bias", None) is not None:
                norm.bias.mul_(hidden)
        for linear in self.head()[1:]:
            scale_columns(linear, hidden)
        for i in range(dims.layers):
            attention_output, mlp_output = self.part(i, parts.attention_output), self.part(i, parts.mlp_output)
            scale_columns(attention_output, scale["heads"][i].repeat_interleave(dims.query_group * dims.head_dim))
            scale_rows(attention_output, scale["attention"][i])
            scale_columns(mlp_output, scale["ffn"][i])
            scale_rows(mlp_output, scale["ffn_block"][i])

    @torch.no_grad()
    def cut(self, kept: Kept) -> None:
        """Replace every pruned layer by a smaller dense one holding only the kept units (in place)."""
        dims, parts = self.dims(), self.layer_parts
        tied = self._shape.tied_head
        h = torch.tensor(kept.hidden, dtype=torch.long)
        for path in self.embeddings:
            self._replace(self.base, path, cut_embedding(self.base.get_submodule(path), h))
        for path in self.embedding_projections:
            self._replace(self.base, path, cut_projection(self.base.get_submodule(path), h))
        for path in self.embedding_vectors:
            replace_parameter(self.base, path, nn.Parameter(self.base.get_parameter(path).data[..., h].clone()))
        if self.embedding_norm:
            self._replace(self.base, self.embedding_norm, cut_norm(self.base.get_submodule(self.embedding_norm), h))
        if self.final_norm:
            self._replace(self.base, self.final_norm, cut_norm(self.base.get_submodule(self.final_norm), h))
        record = self.parts_record()  # the sizes an attention module keeps about itself, as `resize` sets them
        for layer, heads, ffn in zip(self.layer_modules(), kept.heads, kept.ffn):
            for path in parts.norms:
                self._replace(layer, path, cut_norm(layer.get_submodule(path), h))
            for path in parts.vectors:
                replace_parameter(layer, path, nn.Parameter(layer.get_parameter(path).data[..., h].clone()))
            columns = _unit_rows(torch.tensor(heads, dtype=torch.long), dims.query_group * dims.head_dim)
            for path, rows in zip(parts.attention_inputs, self.attention_rows(heads, dims)):
                self._replace(layer, path, cut_linear(layer.get_submodule(path), rows, h))
            self._replace(layer, parts.attention_output, cut_linear(layer.get_submodule(parts.attention_output),
                                                                    h, columns))
            if heads:
                set_attention_sizes(layer.get_submodule(parts.attention), len(heads), record)
            else:
                self._replace(layer, parts.attention, empty_block(layer, parts.attention, parts.attention_output))
            neurons = torch.tensor(ffn, dtype=torch.long)
            for path in parts.mlp_inputs:
                self._replace(layer, path, cut_linear(layer.get_submodule(path), neurons, h))
            self._replace(layer, parts.mlp_output, cut_linear(layer.get_submodule(parts.mlp_output), h, neurons))
            if not ffn and parts.mlp is not None:
                self._replace(layer, parts.mlp, empty_block(layer, parts.mlp, parts.mlp_output, attention=False))
        head_paths = self.head_paths()
        first_columns = self._head_input_columns(h, dims)
        for i, path in enumerate(head_paths[:-1]):
            columns = first_columns if i == 0 else h
            self._replace(self.model, path, cut_linear(self.model.get_submodule(path), h, columns))
        if tied:  # the head is the cut embedding: share it rather than copy a vocabulary-sized weight first
            self.tie_head()
            self.head()[-1].in_features = len(h)
        elif head_paths:  # the last head linear keeps its outputs (labels, vocabulary, a bare encoder's pooler)
            columns = h if len(head_paths) > 1 else first_columns
            self._replace(self.model, head_paths[-1],
                          cut_linear(self.model.get_submodule(head_paths[-1]), None, columns))

    def _head_input_columns(self, h: torch.Tensor, dims: Dims) -> torch.Tensor:
        """The first head linear's kept input columns: the kept dims in each hidden-wide piece it reads."""
        return torch.cat([h + copy * dims.hidden for copy in range(self.head_input_copies)])

    def parts_record(self) -> dict:
        """Where the parts are and what sizes they take, as config.json records them for `resize`
        (vtrans/deploy/modeling_vtrans.py), which rebuilds the cut model without vtrans."""
        dims, parts = self.dims(), self.layer_parts
        return {
            "layers": self.layers_path,
            "embeddings": list(self.embeddings),
            "embedding_projections": list(self.embedding_projections),
            "embedding_vectors": list(self.embedding_vectors),
            "embedding_norm": self.embedding_norm,
            "final_norm": self.final_norm,
            "head": list(self.head_paths()),
            "tied_head": self._shape.tied_head,
            "attention": parts.attention,
            "attention_inputs": list(parts.attention_inputs),
            "attention_output": parts.attention_output,
            "mlp": parts.mlp,
            "mlp_inputs": list(parts.mlp_inputs),
            "mlp_output": parts.mlp_output,
            "norms": list(parts.norms),
            "vectors": list(parts.vectors),
            "head_input_copies": self.head_input_copies,
            "fused_qkv": self.traits.fused_qkv,
            "query_group": dims.query_group,
            "head_dim": dims.head_dim,
            "attention_sizes": dict(self.attention_sizes),
        }

    def tie_head(self) -> None:
        """Make the head's last linear share the input embedding's weight again (a tied head is saved once)."""
        self.head()[-1].weight = self.base.get_submodule(self.embeddings[0]).weight


def _unit_rows(units: torch.Tensor, width: int, offset: int = 0) -> torch.Tensor:
    """The rows (or columns) of the given units when each owns `width` consecutive ones after `offset`."""
    return (offset + units.unsqueeze(1) * width + torch.arange(width)).flatten()


def detach_masks(handles: list) -> None:
    for handle in handles:
        handle.remove()


# -- replaying a transformer layer on stored inputs (OPTIN's trajectories, the least-squares rescaling) ------
def layer_stream(args: tuple, kwargs: dict) -> torch.Tensor:
    """The residual stream a layer was called with: its first positional argument, or `hidden_states`."""
    return args[0] if args else kwargs["hidden_states"]


def with_stream(args: tuple, kwargs: dict, stream: torch.Tensor | None) -> tuple[tuple, dict]:
    """A layer call's arguments with the stream replaced (None: left out, to store the rest) and a decoder's
    key/value cache left out: replays must not append to it (GPT-2 passes it by position, LLaMA by name)."""
    args = tuple(None if isinstance(value, Cache) else value for value in args)
    kwargs = {name: None if isinstance(value, Cache) else value for name, value in kwargs.items()}
    if args:
        return (stream, *args[1:]), kwargs
    return args, kwargs | {"hidden_states": stream}


def first_output(output) -> torch.Tensor:
    """A module's main output: the first of a tuple (a layer's stream, before its attention weights or cache)."""
    return output[0] if isinstance(output, tuple) else output


def call_layer(layer: nn.Module, stream: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    """Layer `layer` called on `stream` with a recorded call's other arguments; the stream it gives back."""
    args, kwargs = with_stream(args, kwargs, stream)
    return first_output(layer(*args, **kwargs))
