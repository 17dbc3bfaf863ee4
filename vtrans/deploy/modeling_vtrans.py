"""Modeling code for a model compressed by vtrans: a transformers architecture, resized to the sizes in its config.

vtrans writes this file into every compressed model's directory, followed by two short classes naming the
dense architecture (`VTransConfig` and the model class, see vtrans/deploy/remote_code.py), so that

    AutoModelFor...from_pretrained(DIR, trust_remote_code=True)

loads the smaller model with torch and transformers alone. `vtrans.load` builds models with the same `resize`.

config.json keeps the dense architecture; its "vtrans" entry says where the parts are ("parts") and how many
units each keeps ("kept"):

    parts   layers, embeddings, embedding_projections (a patch Conv2d), embedding_vectors (parameters such as a
            CLS token), embedding_norm, final_norm, head: paths (the head from the model, the rest from the base
            model); per layer: attention, attention_inputs, attention_output, mlp, mlp_inputs, mlp_output,
            norms, vectors (LayerScale); head_input_copies (hidden-wide pieces the head reads); fused_qkv,
            query_group (query heads per KV head), head_dim, and attention_sizes: attributes an attention
            module keeps about its own size ("heads" or "width")
    kept    hidden: the kept hidden width; layers: per layer the kept head units (a KV head with its query
            group), FFN neurons, and whether the attention and MLP blocks are kept

Only torch and transformers may be imported here: the file must run where vtrans is not installed.
"""
from __future__ import annotations

import copy
import warnings

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


def weight_out_in(linear: nn.Module) -> torch.Tensor:
    """The weight as (out_features, in_features), for nn.Linear and GPT-2's Conv1D (stored (in, out))."""
    return linear.weight.T if isinstance(linear, Conv1D) else linear.weight


def resized_linear(old: nn.Module, out_features: int, in_features: int) -> nn.Module:
    """A layer of the same kind (Linear or Conv1D), bias and device as `old`, of the given size, uninitialised."""
    device, dtype = old.weight.device, old.weight.dtype
    with warnings.catch_warnings():  # a block that keeps no units has empty layers: nothing to initialise
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        if isinstance(old, Conv1D):  # Conv1D takes no device argument: built on the meta device, then given storage
            with torch.device("meta"):
                new = Conv1D(out_features, in_features)
            return new.to_empty(device=device).to(dtype)
        return torch.nn.utils.skip_init(
            nn.Linear,
            in_features,
            out_features,
            bias=old.bias is not None,
            device=device,
            dtype=dtype,
        )


def resized_norm(old: nn.Module, width: int) -> nn.Module:
    """The same norm (LayerNorm or RMSNorm of any family, same settings) over `width` dims, uninitialised."""
    new = copy.copy(old)
    new._parameters = dict(old._parameters)  # its own, so replacing them leaves `old` as it was
    new.weight = nn.Parameter(torch.empty(width, device=old.weight.device, dtype=old.weight.dtype))
    if getattr(old, "bias", None) is not None:
        new.bias = nn.Parameter(torch.empty(width, device=old.bias.device, dtype=old.bias.dtype))
    if isinstance(new, nn.LayerNorm):
        new.normalized_shape = (width,)
    return new


def resized_embedding(old: nn.Embedding, width: int) -> nn.Embedding:
    return nn.Embedding(
        old.num_embeddings,
        width,
        padding_idx=old.padding_idx,
        device=old.weight.device,
        dtype=old.weight.dtype,
    )


def resized_projection(old: nn.Module, width: int) -> nn.Module:
    """An input projection (a Linear, or a vision model's patch Conv2d) with `width` outputs, uninitialised."""
    if not isinstance(old, nn.Conv2d):
        return resized_linear(old, width, weight_out_in(old).shape[1])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        return torch.nn.utils.skip_init(
            nn.Conv2d,
            old.in_channels,
            width,
            old.kernel_size,
            stride=old.stride,
            padding=old.padding,
            bias=old.bias is not None,
            device=old.weight.device,
            dtype=old.weight.dtype,
        )


def resized_vector(old: torch.Tensor, width: int) -> nn.Parameter:
    """A parameter whose last axis is the hidden width (a CLS token, position embeddings), uninitialised."""
    return nn.Parameter(torch.empty(*old.shape[:-1], width, device=old.device, dtype=old.dtype))


def replace_parameter(root: nn.Module, path: str, parameter: nn.Parameter) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, parameter)


class EmptyBlock(nn.Module):
    """Stands in for an attention (or MLP) module that keeps no heads (or neurons): it contributes only its
    output projection's bias, zero once the block is dropped. The projection, when it lives inside the
    replaced module, stays under its own name, so the state dict keeps its keys; when it lives outside
    (BERT), this gives the projection an input of width 0."""

    def __init__(self, output_name: str | None = None, output: nn.Module | None = None, attention: bool = True):
        super().__init__()
        self.output_name = output_name
        self.attention = attention  # attention modules return (output, attention weights)
        if output is not None:
            self.add_module(output_name, output)

    def forward(self, hidden_states, *args, **kwargs):
        if self.output_name is None:
            out = hidden_states.new_zeros(*hidden_states.shape[:-1], 0)
        else:  # the projection's output for an empty input (GPT-2's Conv1D cannot take a width of 0)
            output = getattr(self, self.output_name)
            width = weight_out_in(output).shape[0]
            bias = output.bias if output.bias is not None else hidden_states.new_zeros(width)
            out = bias.expand(*hidden_states.shape[:-1], width).clone()
        return (out, None) if self.attention else out


def empty_block(layer: nn.Module, block: str, output: str, attention: bool = True) -> EmptyBlock:
    """The EmptyBlock that replaces `layer.block`, holding its output projection when that lives inside it."""
    if output.startswith(block + "."):
        return EmptyBlock(output.removeprefix(block + "."), layer.get_submodule(output), attention)
    return EmptyBlock(attention=attention)


def replace(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def attention_widths(heads: int, parts: dict) -> list[int]:
    """Output widths of the attention input projections when a layer keeps `heads` head units: a unit owns
    query_group * head_dim query rows and head_dim key and value rows; a fused projection holds all three."""
    query = heads * parts["query_group"] * parts["head_dim"]
    key = value = heads * parts["head_dim"]
    return [query + key + value] if parts["fused_qkv"] else [query, key, value]


def set_attention_sizes(attention: nn.Module, heads: int, parts: dict) -> None:
    """Update what an attention module keeps about its own size (GPT-2's split_size, ...) to `heads` units."""
    query_width = heads * parts["query_group"] * parts["head_dim"]
    for attribute, size in parts["attention_sizes"].items():
        setattr(attention, attribute, heads if size == "heads" else query_width)


@torch.no_grad()
def resize(model: nn.Module, record: dict) -> None:
    """Give every part of a dense `model` the kept sizes in `record` (config.vtrans), in place, uninitialised:
    the checkpoint's weights are loaded next."""
    parts, kept = record["parts"], record["kept"]
    base = model.base_model
    hidden = kept["hidden"]
    for path in parts["embeddings"]:
        replace(base, path, resized_embedding(base.get_submodule(path), hidden))
    for path in parts.get("embedding_projections", ()):
        replace(base, path, resized_projection(base.get_submodule(path), hidden))
    for path in parts.get("embedding_vectors", ()):
        replace_parameter(base, path, resized_vector(base.get_parameter(path), hidden))
    for path in (parts["embedding_norm"], parts["final_norm"]):
        if path:
            replace(base, path, resized_norm(base.get_submodule(path), hidden))
    for layer, sizes in zip(base.get_submodule(parts["layers"]), kept["layers"]):
        for path in parts["norms"]:
            replace(layer, path, resized_norm(layer.get_submodule(path), hidden))
        for path in parts.get("vectors", ()):
            replace_parameter(layer, path, resized_vector(layer.get_parameter(path), hidden))
        heads, neurons = sizes["heads"], sizes["ffn"]
        for path, width in zip(parts["attention_inputs"], attention_widths(heads, parts)):
            replace(layer, path, resized_linear(layer.get_submodule(path), width, hidden))
        query_width = heads * parts["query_group"] * parts["head_dim"]
        output = parts["attention_output"]
        replace(layer, output, resized_linear(layer.get_submodule(output), hidden, query_width))
        if heads:
            set_attention_sizes(layer.get_submodule(parts["attention"]), heads, parts)
        else:
            replace(layer, parts["attention"], empty_block(layer, parts["attention"], output))
        for path in parts["mlp_inputs"]:
            replace(layer, path, resized_linear(layer.get_submodule(path), neurons, hidden))
        output = parts["mlp_output"]
        replace(layer, output, resized_linear(layer.get_submodule(output), hidden, neurons))
        if not neurons and parts["mlp"] is not None:
            replace(layer, parts["mlp"], empty_block(layer, parts["mlp"], output, attention=False))
    head = parts["head"]
    inputs = hidden * parts.get("head_input_copies", 1)  # the first head linear may read several hidden-wide pieces
    for path in head[:-1]:  # -> hidden
        replace(model, path, resized_linear(model.get_submodule(path), hidden, inputs))
        inputs = hidden
    if head:  # the last head linear keeps its outputs (labels, vocabulary, a bare encoder's pooler)
        last = model.get_submodule(head[-1])
        if parts["tied_head"]:  # shares the input embedding's weight
            last.weight = base.get_submodule(parts["embeddings"][0]).weight
            last.in_features = hidden
        else:
            replace(model, head[-1], resized_linear(last, weight_out_in(last).shape[0], inputs))


class Resized:
    """Mixin before a transformers model class: the dense architecture, resized to `config.vtrans` as it is built."""

    def __init__(self, config):
        super().__init__(config)
        resize(self, config.vtrans)
