"""LLaMA-style decoders (LLaMA, Mistral, Qwen2): pre-norm with RMSNorm, rotary positions (no position
embeddings), a gated MLP (down(act(gate(x)) * up(x))) and grouped-query attention: a head unit is a KV head
with the query heads that read it, so they are kept or pruned together. The LM head may be tied."""
from __future__ import annotations

from vtrans.arch.base import LayerParts, Traits
from vtrans.arch.decoder import DecoderAdapter


class LlamaAdapter(DecoderAdapter):
    family = "llama"
    model_types = ("llama", "mistral", "qwen2")
    traits = Traits(norm="rms", head_tokens="all")
    layer_parts = LayerParts(
        attention="self_attn",
        attention_inputs=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        attention_output="self_attn.o_proj",
        mlp_inputs=("mlp.gate_proj", "mlp.up_proj"),
        mlp_output="mlp.down_proj",
        norms=("input_layernorm", "post_attention_layernorm"),
        mlp="mlp",
    )
    layers_path = "layers"
    embeddings = ("embed_tokens",)
    final_norm = "norm"
