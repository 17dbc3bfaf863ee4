"""Language modelling on plain text (task-agnostic compression of a decoder): the task loss is next-token
cross-entropy, distillation matches the dense model's next-token distribution at every position, and the
metric is perplexity on held-out text, in blocks of --max-length tokens."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

from vtrans.data import TextBlocks
from vtrans.objectives.base import PlainTextObjective, kl_per_example


class LanguageModelling(PlainTextObjective):
    name = "lm"
    metric = "perplexity"
    higher_is_better = False
    # the next-token distribution only: a pre-norm decoder's residual stream holds a few huge activations
    # (SmolLM2-135M: up to 2.3e4 on the first token from layer 15 on, against about 10 elsewhere), which
    # would swamp a mean-squared error on hidden states
    distill_layers = "none"
    eval_batch_size = None  # its logits are batch x length x vocabulary (8 x 128 x 49,152: 0.2 GB per copy)

    def auto_class(self):
        return AutoModelForCausalLM

    def encode(self, data, teacher, max_length):
        return TextBlocks(data, teacher.processor, max_length)

    def task_loss(self, logits, labels, attention_mask):
        # position t predicts token t + 1
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)

    def divergence(self, student, teacher, attention_mask, temperature):
        per_token = kl_per_example(student, teacher, temperature)  # (B, S)
        mask = attention_mask.float()
        return (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)

    @torch.inference_mode()
    def evaluate(self, model, loader, teacher, desc="evaluating"):
        model.eval()
        total, tokens = 0.0, 0
        for batch in tqdm(loader, desc=desc, leave=False):
            labels = batch.pop("labels")
            logits = model(**batch).logits.float()
            total += float(self.task_loss(logits, labels, batch["attention_mask"])) * labels[:, 1:].numel()
            tokens += labels[:, 1:].numel()
        return {"perplexity": math.exp(total / tokens)}
