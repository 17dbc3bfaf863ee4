"""Vision transformers (ViT): a pre-norm encoder over image patches. The patch projection (a Conv2d), the CLS
token and the position embeddings write the hidden dims; the classifier reads the final norm's CLS token."""
from __future__ import annotations

import torch

from vtrans.arch.base import Adapter, LayerParts, Traits


class ViTAdapter(Adapter):
    family = "vit"
    model_types = ("vit",)
    traits = Traits(norm="layer", head_tokens="first")
    layer_parts = LayerParts(
        attention="attention",
        attention_inputs=("attention.q_proj", "attention.k_proj", "attention.v_proj"),
        attention_output="attention.o_proj",
        mlp_inputs=("mlp.fc1",),
        mlp_output="mlp.fc2",
        norms=("layernorm_before", "layernorm_after"),
        mlp="mlp",
    )
    layers_path = "layers"
    embedding_projections = ("embeddings.patch_embeddings.projection",)
    embedding_vectors = ("embeddings.cls_token", "embeddings.position_embeddings")
    projected_tokens_missing = 1  # the CLS token
    final_norm = "layernorm"
    vision = True

    def head_paths(self) -> tuple[str, ...]:
        return () if self.model is self.base else ("classifier",)

    def head_logits(self, last_hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.classifier(self.base.get_submodule(self.final_norm)(last_hidden)[:, 0])

    @staticmethod
    def max_tokens(config) -> int:
        return ViTAdapter.image_tokens(config, config.image_size)

    @staticmethod
    def image_tokens(config, image_size: int) -> int:
        """Patches of one image, plus the CLS token."""
        return (image_size // config.patch_size) ** 2 + 1
