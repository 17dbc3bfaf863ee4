"""What an objective provides. Methods, surgery and costs never ask which objective runs: they train on
`task_loss` + `logits_loss` (plus hidden-state distillation), score with the model's own `.loss` on a batch
(whose `labels` follow the Hugging Face convention of the model class), and report `evaluate`'s metric."""
from __future__ import annotations

import torch


class Objective:
    name: str = ""
    metric: str = ""  # the key `evaluate` returns
    higher_is_better: bool = True

    def auto_class(self):
        """The transformers Auto class whose head this objective trains."""
        raise NotImplementedError

    def load_teacher(self, name: str, train, evaluation, options, say=print):
        """The dense model (eval mode) and its tokenizer, prepared for this objective (e.g. fine-tuned)."""
        raise NotImplementedError

    def read(self, spec: str, split: str = "train"):
        """The raw data of DATA (a file or a `datasets` name)."""
        raise NotImplementedError

    def holdout(self, data, fraction: float, seed: int):
        """(train, evaluation) when no evaluation data is given."""
        raise NotImplementedError

    def encode(self, data, teacher, max_length: int):
        """A dataset of batches for `data` (with `.loader(...)` and `.strata` for sampling)."""
        raise NotImplementedError

    def task_loss(self, logits: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def logits_loss(self, student: torch.Tensor, teacher: torch.Tensor, attention_mask: torch.Tensor,
                    temperature: float) -> torch.Tensor:
        """KL from the teacher's softened distribution to the student's (times T^2, Hinton et al. 2015)."""
        raise NotImplementedError

    def evaluate(self, model, loader, desc: str = "evaluating") -> dict[str, float]:
        raise NotImplementedError
