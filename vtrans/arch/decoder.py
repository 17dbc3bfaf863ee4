"""What pre-norm decoders (GPT-2, LLaMA and its relatives) share: the head reads the final norm's output at
every position; a sequence classifier's logits are those of each sequence's last real token."""
from __future__ import annotations

import torch

from vtrans.arch.base import Adapter


class DecoderAdapter(Adapter):
    def head_paths(self) -> tuple[str, ...]:
        return ("lm_head",) if hasattr(self.model, "lm_head") else ("score",)

    def head_logits(self, last_hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.head()[-1](self.base.get_submodule(self.final_norm)(last_hidden))  # (B, S, outputs)
        if hasattr(self.model, "lm_head"):
            return logits
        # a sequence classifier: the last real token's logits (padding on the right)
        last = (attention_mask.sum(-1) - 1 if attention_mask is not None
                else torch.full(logits.shape[:1], logits.shape[1] - 1))
        return logits[torch.arange(logits.shape[0]), last]
