"""What an objective provides. Methods, surgery and costs never ask which objective runs: they train on
`task_loss` + `output_loss` (plus hidden-state distillation), compare ablated models by `divergence`
(OPTIN), score units by the per-example gradients of `fisher_loss`, and report `evaluate`'s metric. Batches
carry `labels` in the Hugging Face convention of the model class, or none."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vtrans.arch import adapter_class_for
from vtrans.data import example_count, holdout_text, load_text
from vtrans.errors import UsageError


class Objective:
    name: str = ""
    examples: str = "rows"  # what one example of its data is called in messages
    data_wanted: str = "a CSV/TSV/JSONL file with text and label columns, or a datasets name"  # for messages
    metric: str = ""  # the key `evaluate` returns
    higher_is_better: bool = True
    prunes_hidden: bool = True  # False: the output width is part of the product (embeddings stay comparable)
    distill_layers: str = "all"  # hidden states distilled by default (training.DISTILL_LAYERS)
    exports_onnx: bool = True  # `vtrans export` / --quantize can trace it (token inputs)
    eval_batch_size: int | None = 64  # examples per evaluation batch; None: the training batch size

    def auto_class(self):
        """The transformers Auto class whose head this objective trains."""
        raise NotImplementedError

    def files_beside(self, name: str) -> dict[str, str]:
        """Files of the dense model `name` that the compressed directory carries over (path: text)."""
        return {}

    def load_teacher(self, name: str, train, evaluation, options, say=print):
        """The dense model (eval mode) and its processor, prepared for this objective (e.g. fine-tuned)."""
        raise NotImplementedError

    def load_processor(self, name: str, config, options):
        """What turns this objective's data into the model's inputs: the tokenizer, for text."""
        from vtrans.teacher import load_tokenizer

        return load_tokenizer(name)

    def head_settings(self, processor) -> dict:
        """Config settings a task head needs from the processor: where a decoder classifier finds the last
        token."""
        return {"pad_token_id": processor.pad_token_id}

    def tokens(self, config, options) -> int:
        """Tokens per example, at which FLOPs are counted: --max-length for text."""
        positions = adapter_class_for(config.model_type).max_tokens(config)
        if options.max_length > positions:
            raise UsageError(f"--max-length {options.max_length} exceeds the model's {positions} positions; "
                             "use at most that")
        return options.max_length

    def latency_tokens(self, config, options) -> int:
        """Tokens per example of the random batch latency is timed on: --latency-seq-len for text."""
        return options.latency_seq_len

    def random_inputs(self, config, options) -> dict[str, torch.Tensor]:
        """A fixed random batch of model inputs, for timing (--latency-batch examples of `latency_tokens`):
        token ids, all real."""
        from vtrans.latency import random_batch

        return random_batch(options.latency_batch, self.latency_tokens(config, options), config.vocab_size)

    def read(self, spec: str, split: str = "train"):
        """The raw data of DATA (a file or a `datasets` name)."""
        raise NotImplementedError

    def holdout(self, data, fraction: float, seed: int):
        """(train, evaluation) when no evaluation data is given."""
        raise NotImplementedError

    def encode(self, data, teacher, max_length: int):
        """A dataset of batches for `data` (with `.loader(...)` and `.strata` for sampling)."""
        raise NotImplementedError

    def outputs(self, model_output, attention_mask: torch.Tensor) -> torch.Tensor:
        """What is distilled from the teacher besides hidden states: the logits, by default."""
        return model_output.logits

    def head_outputs(self, adapter, last_hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """`outputs` computed from the last layer's output (OPTIN replays the layers itself)."""
        return adapter.head_logits(last_hidden, attention_mask)

    def task_loss(self, outputs: torch.Tensor, labels, attention_mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def divergence(self, student: torch.Tensor, teacher: torch.Tensor, attention_mask: torch.Tensor,
                   temperature: float) -> torch.Tensor:
        """How far the student's outputs are from the teacher's, per example: (B,)."""
        raise NotImplementedError

    def output_loss(self, student: torch.Tensor, teacher: torch.Tensor, attention_mask: torch.Tensor,
                    temperature: float) -> torch.Tensor:
        """The distillation loss on the outputs: the mean divergence, times T^2 so that its gradients keep
        their scale as the temperature changes (Hinton et al. 2015)."""
        return self.divergence(student, teacher, attention_mask, temperature).mean() * temperature ** 2

    def fisher_loss(self, model, batch: dict) -> torch.Tensor:
        """A loss summed over the batch's examples whose per-example gradients measure what a unit is worth
        (Fisher information): the model's own task loss on the batch's labels, by default."""
        return model(**batch).loss * example_count(batch)

    def evaluate(self, model, loader, teacher, desc: str = "evaluating") -> dict[str, float]:
        """The metric on held-out data (`teacher`: the dense model, for metrics that compare with it)."""
        raise NotImplementedError


class PlainTextObjective(Objective):
    """An objective on plain text (a .txt file, rows with a text field, or a `datasets` name), with the model
    as given: no labels, no fine-tuned head."""

    examples = "documents"
    data_wanted = "plain text (.txt, JSONL with a text field, or a datasets name)"

    def load_teacher(self, name, train, evaluation, options, say=print):
        from vtrans.teacher import load_as_given  # the teacher module trains with the objectives' losses

        return load_as_given(name, self.auto_class())

    def read(self, spec, split="train"):
        return load_text(spec, split)

    def holdout(self, data, fraction, seed):
        return holdout_text(data, fraction)


def kl_per_example(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) of the softened distributions over the last axis: (B,) or (B, S)."""
    t = temperature
    student, teacher = student.float(), teacher.float()  # bfloat16 rounding would swamp one unit's effect
    return F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), reduction="none",
                    log_target=True).sum(-1)
