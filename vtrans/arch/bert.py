"""BERT-style post-LayerNorm encoders with a sequence-classification head: BERT, RoBERTa (and MiniLM etc.).

Where the masks act (post-LN residual stream, so every residual write ends in a LayerNorm):
  hidden     the output of every LayerNorm (embeddings and both per layer) and the classifier head's input;
             LayerNorm statistics are taken over the kept dims only, as the cut model computes them.
  heads      the input of attention.output.dense, one value per head (its head_dim columns)
  attention  the output of attention.output.dense (bias included): the whole attention block
  ffn        the output of the intermediate activation, one value per neuron
  ffn_block  the output of output.dense (bias included): the whole FFN block
Each of these is a scale on a linear layer's input columns or output rows, or on a LayerNorm's affine
parameters, so `fold` is exact, and `cut` only removes rows, columns and LayerNorm entries.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from vtrans.arch.base import Adapter, Dims, Kept, MaskValues


class NoHeads(nn.Module):
    """Stands in for a self-attention module that keeps no heads: it contributes nothing."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states.new_zeros(*hidden_states.shape[:-1], 0), None


def masked_layer_norm(module: nn.LayerNorm, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the kept dims only (keep is 0/1 over the last axis)."""
    count = keep.sum().clamp(min=1)
    mean = (x * keep).sum(-1, keepdim=True) / count
    var = ((x - mean).square() * keep).sum(-1, keepdim=True) / count
    return (x - mean) * torch.rsqrt(var + module.eps) * module.weight + module.bias


def cut_linear(old: nn.Linear, rows=None, cols=None) -> nn.Linear:
    """A new Linear holding only the given output rows and input columns of `old`."""
    weight = old.weight.data
    bias = old.bias.data if old.bias is not None else None
    if rows is not None:
        weight = weight[rows]
        bias = bias[rows] if bias is not None else None
    if cols is not None:
        weight = weight[:, cols]
    # the weights are copied in next: no initialisation, and no warning that an empty layer (a block that keeps
    # no units) cannot be initialised
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        new = torch.nn.utils.skip_init(nn.Linear, weight.shape[1], weight.shape[0], bias=bias is not None,
                                       device=weight.device, dtype=weight.dtype)
    new.weight.data.copy_(weight)
    if bias is not None:
        new.bias.data.copy_(bias)
    return new


def cut_layer_norm(old: nn.LayerNorm, keep) -> nn.LayerNorm:
    new = nn.LayerNorm(len(keep), eps=old.eps, device=old.weight.device, dtype=old.weight.dtype)
    new.weight.data.copy_(old.weight.data[keep])
    new.bias.data.copy_(old.bias.data[keep])
    return new


def cut_embedding(old: nn.Embedding, keep) -> nn.Embedding:
    new = nn.Embedding(old.num_embeddings, len(keep), padding_idx=old.padding_idx,
                       device=old.weight.device, dtype=old.weight.dtype)
    new.weight.data.copy_(old.weight.data[:, keep])
    return new


class BertAdapter(Adapter):
    family = "bert"
    model_types = ("bert", "roberta")

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.base = model.base_model
        self.layers = self.base.encoder.layer
        self.embeddings = self.base.embeddings
        # The classifier head: a hidden->hidden projection, then hidden->labels. BERT: pooler + classifier;
        # RoBERTa: classifier.dense + classifier.out_proj.
        if hasattr(model.classifier, "out_proj"):
            self.head_owner, self.head_in_name = model.classifier, "dense"
            self.head_out_owner, self.head_out_name = model.classifier, "out_proj"
        else:
            self.head_owner, self.head_in_name = self.base.pooler, "dense"
            self.head_out_owner, self.head_out_name = model, "classifier"

    @property
    def head_in(self) -> nn.Linear:
        return getattr(self.head_owner, self.head_in_name)

    @property
    def head_out(self) -> nn.Linear:
        return getattr(self.head_out_owner, self.head_out_name)

    @staticmethod
    def max_tokens(config) -> int:
        # RoBERTa numbers positions from pad_token_id + 1
        offset = config.pad_token_id + 1 if config.model_type == "roberta" else 0
        return config.max_position_embeddings - offset

    def dims(self) -> Dims:
        config = self.model.config
        head_dim = config.hidden_size // config.num_attention_heads
        return Dims(hidden=config.hidden_size, layers=config.num_hidden_layers,
                    heads=config.num_attention_heads, head_dim=head_dim, ffn=config.intermediate_size)

    def layer_modules(self) -> nn.ModuleList:
        return self.layers

    def unit_linears(self, layer: int) -> dict[str, tuple[list[nn.Linear], nn.Linear]]:
        block = self.layers[layer]
        attention = block.attention
        return {"heads": ([attention.self.query, attention.self.key, attention.self.value], attention.output.dense),
                "ffn": ([block.intermediate.dense], block.output.dense)}

    def head_logits(self, last_hidden: torch.Tensor) -> torch.Tensor:
        if self.head_out_owner is self.model:  # BERT: pooler, dropout, classifier
            return self.model.classifier(self.model.dropout(self.base.pooler(last_hidden)))
        return self.model.classifier(last_hidden)

    # -- masks ---------------------------------------------------------------------------------------
    def attach_masks(self, values: MaskValues) -> list:
        head_dim = self.dims().head_dim

        def scale(group, index=None, per_unit=1):
            """A hook multiplying a tensor's last axis (or all of it) by the current mask values."""
            def apply(x):
                z = values.z[group]
                z = z[:, index] if index is not None else z
                if per_unit > 1:
                    z = z.repeat_interleave(per_unit, dim=-1)
                if z.dim() == 1:  # one value per example: a whole block
                    z = z[:, None]
                while z.dim() < x.dim():
                    z = z.unsqueeze(1)
                return x * z
            return apply

        def on_output(fn):
            return lambda module, args, output: None if values.z is None else fn(output)

        def on_input(fn):
            return lambda module, args: None if values.z is None else (fn(args[0]),) + tuple(args[1:])

        def layer_norm_hook(module, args, output):
            if values.z is None:
                return None
            return scale("hidden")(masked_layer_norm(module, args[0], values.hidden_keep))

        handles = [self.embeddings.LayerNorm.register_forward_hook(layer_norm_hook)]
        for i, layer in enumerate(self.layers):
            attn_out = layer.attention.output
            handles += [
                attn_out.dense.register_forward_pre_hook(on_input(scale("heads", i, head_dim))),
                attn_out.dense.register_forward_hook(on_output(scale("attention", i))),
                attn_out.LayerNorm.register_forward_hook(layer_norm_hook),
                layer.intermediate.register_forward_hook(on_output(scale("ffn", i))),
                layer.output.dense.register_forward_hook(on_output(scale("ffn_block", i))),
                layer.output.LayerNorm.register_forward_hook(layer_norm_hook),
            ]
        handles.append(self.head_out.register_forward_pre_hook(on_input(scale("hidden"))))
        return handles

    # -- cost ----------------------------------------------------------------------------------------
    def cost(self, sizes: dict[str, torch.Tensor], seq_len: int) -> dict[str, torch.Tensor]:
        """Parameters and FLOPs (2 x multiply-adds of every matmul, one sequence of seq_len tokens)."""
        config, dims = self.model.config, self.dims()
        h = sizes["hidden"]
        attn = sizes["heads"] * sizes["attention"] * dims.head_dim  # width of q, k, v per layer
        ffn = sizes["ffn"] * sizes["ffn_block"]
        labels = self.head_out.out_features
        vocab = config.vocab_size + config.max_position_embeddings + config.type_vocab_size
        embedding_params = vocab * h + 2 * h
        layer_params = (3 * (h * attn + attn) + attn * h + h + 2 * h  # q k v, attention output, its LayerNorm
                        + h * ffn + ffn + ffn * h + h + 2 * h)  # intermediate, output, its LayerNorm
        head_params = h * h + h + h * labels + labels
        params = embedding_params + layer_params.sum() + head_params
        s = seq_len
        layer_flops = 2 * s * (3 * h * attn + attn * h) + 2 * 2 * s * s * attn + 2 * 2 * s * h * ffn
        flops = layer_flops.sum() + 2 * (h * h + h * labels)
        return {"params": params, "flops": flops}

    # -- surgery -------------------------------------------------------------------------------------
    @torch.no_grad()
    def fold(self, scale: dict[str, torch.Tensor]) -> None:
        head_dim = self.dims().head_dim
        hidden = scale["hidden"]
        for norm in self._layer_norms():
            norm.weight.mul_(hidden)
            norm.bias.mul_(hidden)
        self.head_out.weight.mul_(hidden)
        for i, layer in enumerate(self.layers):
            attn_dense, ffn_dense = layer.attention.output.dense, layer.output.dense
            attn_dense.weight.mul_(scale["heads"][i].repeat_interleave(head_dim))
            attn_dense.weight.mul_(scale["attention"][i])
            attn_dense.bias.mul_(scale["attention"][i])
            ffn_dense.weight.mul_(scale["ffn"][i])
            ffn_dense.weight.mul_(scale["ffn_block"][i])
            ffn_dense.bias.mul_(scale["ffn_block"][i])

    def _layer_norms(self) -> list[nn.LayerNorm]:
        norms = [self.embeddings.LayerNorm]
        for layer in self.layers:
            norms += [layer.attention.output.LayerNorm, layer.output.LayerNorm]
        return norms

    @torch.no_grad()
    def cut(self, kept: Kept) -> None:
        head_dim = self.dims().head_dim
        h = torch.tensor(kept.hidden, dtype=torch.long)
        emb = self.embeddings
        for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
            setattr(emb, name, cut_embedding(getattr(emb, name), h))
        emb.LayerNorm = cut_layer_norm(emb.LayerNorm, h)
        for layer, heads, ffn in zip(self.layers, kept.heads, kept.ffn):
            columns = torch.tensor([head * head_dim + j for head in heads for j in range(head_dim)],
                                   dtype=torch.long)
            attention = layer.attention
            if heads:
                for name in ("query", "key", "value"):
                    setattr(attention.self, name, cut_linear(getattr(attention.self, name), columns, h))
            else:
                attention.self = NoHeads()
            attention.output.dense = cut_linear(attention.output.dense, h, columns)
            attention.output.LayerNorm = cut_layer_norm(attention.output.LayerNorm, h)
            neurons = torch.tensor(ffn, dtype=torch.long)
            layer.intermediate.dense = cut_linear(layer.intermediate.dense, neurons, h)
            layer.output.dense = cut_linear(layer.output.dense, h, neurons)
            layer.output.LayerNorm = cut_layer_norm(layer.output.LayerNorm, h)
        setattr(self.head_owner, self.head_in_name, cut_linear(self.head_in, h, h))
        setattr(self.head_out_owner, self.head_out_name, cut_linear(self.head_out, None, h))
