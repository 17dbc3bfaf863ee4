"""BERT-style post-norm encoders with a sequence-classification head: BERT, RoBERTa (and MiniLM etc.).

Post-norm: every residual add ends in a LayerNorm, and a LayerNorm follows the embeddings. The head reads the
first ([CLS]) token: BERT's pooler then classifier, RoBERTa's classifier.dense then classifier.out_proj.
"""
from __future__ import annotations

import torch

from vtrans.arch.base import Adapter, LayerParts, Traits


class BertAdapter(Adapter):
    family = "bert"
    model_types = ("bert", "roberta")
    traits = Traits(norm="layer", head_tokens="first")
    layer_parts = LayerParts(
        attention="attention.self",
        attention_inputs=("attention.self.query", "attention.self.key", "attention.self.value"),
        attention_output="attention.output.dense",
        mlp_inputs=("intermediate.dense",),
        mlp_output="output.dense",
        norms=("attention.output.LayerNorm", "output.LayerNorm"),
    )
    layers_path = "encoder.layer"
    embeddings = ("embeddings.word_embeddings", "embeddings.position_embeddings", "embeddings.token_type_embeddings")
    embedding_norm = "embeddings.LayerNorm"

    def head_paths(self) -> tuple[str, ...]:
        if self.model is self.base:  # a bare encoder (sentence embedders): its pooler, if it has one
            return ("pooler.dense",) if getattr(self.model, "pooler", None) is not None else ()
        if hasattr(self.model.classifier, "out_proj"):  # RoBERTa
            return "classifier.dense", "classifier.out_proj"
        return f"{self.model.base_model_prefix}.pooler.dense", "classifier"

    def head_logits(self, last_hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if hasattr(self.model.classifier, "out_proj"):  # RoBERTa: the classifier pools the first token itself
            return self.model.classifier(last_hidden)
        return self.model.classifier(self.model.dropout(self.base.pooler(last_hidden)))

    @staticmethod
    def max_tokens(config) -> int:
        # RoBERTa numbers positions from pad_token_id + 1
        offset = config.pad_token_id + 1 if config.model_type == "roberta" else 0
        return config.max_position_embeddings - offset
