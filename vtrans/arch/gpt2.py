"""GPT-2: pre-norm decoder with Conv1D weights (stored (in, out)), one fused query/key/value projection and
learned position embeddings; the LM head is tied to the token embedding."""
from __future__ import annotations

from vtrans.arch.base import LayerParts, Traits
from vtrans.arch.decoder import DecoderAdapter


class GPT2Adapter(DecoderAdapter):
    family = "gpt2"
    model_types = ("gpt2",)
    traits = Traits(norm="layer", fused_qkv=True, head_tokens="all")
    layer_parts = LayerParts(
        attention="attn",
        attention_inputs=("attn.c_attn",),
        attention_output="attn.c_proj",
        mlp_inputs=("mlp.c_fc",),
        mlp_output="mlp.c_proj",
        norms=("ln_1", "ln_2"),
        mlp="mlp",
    )
    layers_path = "h"
    embeddings = ("wte", "wpe")
    final_norm = "ln_f"
    # GPT2Attention splits its fused projection's output by `split_size`
    attention_sizes = {"num_heads": "heads", "embed_dim": "width", "split_size": "width"}

    @staticmethod
    def ffn_size(config) -> int:
        return config.n_inner or 4 * config.hidden_size
