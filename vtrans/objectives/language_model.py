"""Language modelling on plain text (task-agnostic compression of a decoder): the task loss is next-token
cross-entropy, distillation matches the dense model's next-token distribution at every position, and the
metric is perplexity on held-out text, in blocks of --max-length tokens."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from vtrans.data import TextBlocks, holdout_text, load_text
from vtrans.errors import UsageError
from vtrans.objectives.base import Objective


class LanguageModelling(Objective):
    name = "lm"
    metric = "perplexity"
    higher_is_better = False

    def auto_class(self):
        return AutoModelForCausalLM

    def load_teacher(self, name, train, evaluation, options, say=print):
        from vtrans.teacher import Teacher

        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError) as e:
            raise UsageError(f"MODEL '{name}' has no usable tokenizer ({str(e).splitlines()[0]}); "
                             "save the tokenizer beside the model") from None
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
        return Teacher(model.eval(), tokenizer, None, None)

    def read(self, spec, split="train"):
        return load_text(spec, split)

    def holdout(self, data, fraction, seed):
        return holdout_text(data, fraction)

    def encode(self, data, teacher, max_length):
        return TextBlocks(data, teacher.tokenizer, max_length)

    def task_loss(self, logits, labels, attention_mask):
        # position t predicts token t + 1
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)

    def logits_loss(self, student, teacher, attention_mask, temperature):
        t = temperature
        per_token = F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), reduction="none",
                             log_target=True).sum(-1)  # (B, S)
        mask = attention_mask.float()
        return (per_token * mask).sum() / mask.sum().clamp(min=1) * t * t

    @torch.inference_mode()
    def evaluate(self, model, loader, desc="evaluating"):
        model.eval()
        total, tokens = 0.0, 0
        for batch in tqdm(loader, desc=desc, leave=False):
            labels = batch.pop("labels")
            logits = model(**batch).logits.float()
            total += float(self.task_loss(logits, labels, batch["attention_mask"])) * labels[:, 1:].numel()
            tokens += labels[:, 1:].numel()
        return {"perplexity": math.exp(total / tokens)}
