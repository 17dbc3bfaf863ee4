"""DINOv2 backbones with a classification head: ViT-like, plus LayerScale (a learned per-dim scale on each
block's output, cut with the hidden width) and a classifier that reads the CLS token and the mean patch token
side by side (two hidden-wide pieces of its input)."""
from __future__ import annotations

from dataclasses import replace

import torch

from vtrans.arch.vit import ViTAdapter


class Dinov2Adapter(ViTAdapter):
    family = "dinov2"
    model_types = ("dinov2",)
    # ViT's layer, with other norm names and a LayerScale after each block
    layer_parts = replace(
        ViTAdapter.layer_parts,
        norms=("norm1", "norm2"),
        vectors=("layer_scale1.lambda1", "layer_scale2.lambda1"),
        output_scales=("layer_scale1.lambda1", "layer_scale2.lambda1"),
    )
    layers_path = "encoder.layer"
    embedding_vectors = ("embeddings.cls_token", "embeddings.mask_token", "embeddings.position_embeddings")
    head_input_copies = 2  # [CLS token, mean of the patch tokens]
    resizes_images = True  # its position embeddings are interpolated to any patch grid

    def head_logits(self, last_hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        normed = self.base.get_submodule(self.final_norm)(last_hidden)
        return self.model.classifier(torch.cat([normed[:, 0], normed[:, 1:].mean(1)], dim=-1))

    @staticmethod
    def ffn_size(config) -> int:
        return int(config.hidden_size * config.mlp_ratio)
