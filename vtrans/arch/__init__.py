"""Family adapters. `adapter_for(model)` picks the one for a model, by its config's model_type."""
from __future__ import annotations

from vtrans.arch.base import (
    Adapter,
    Dims,
    Kept,
    MaskValues,
    call_layer,
    detach_masks,
    first_output,
    layer_stream,
    unit_counts,
    with_stream,
)
from vtrans.arch.bert import BertAdapter
from vtrans.arch.dinov2 import Dinov2Adapter
from vtrans.arch.gpt2 import GPT2Adapter
from vtrans.arch.llama import LlamaAdapter
from vtrans.arch.vit import ViTAdapter
from vtrans.errors import UsageError

ADAPTERS: tuple[type[Adapter], ...] = (BertAdapter, GPT2Adapter, LlamaAdapter, ViTAdapter, Dinov2Adapter)
SUPPORTED_MODEL_TYPES = tuple(t for a in ADAPTERS for t in a.model_types)


def adapter_class_for(model_type: str) -> type[Adapter]:
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise UsageError(
        f"model type '{model_type}' is not supported yet; supported: {', '.join(SUPPORTED_MODEL_TYPES)}. "
        "Pass a checkpoint of one of these families.")


def adapter_for(model) -> Adapter:
    return adapter_class_for(model.config.model_type)(model)


__all__ = ["Adapter", "Dims", "Kept", "MaskValues", "adapter_for", "adapter_class_for", "call_layer", "detach_masks",
           "first_output", "layer_stream", "SUPPORTED_MODEL_TYPES", "unit_counts", "with_stream"]
