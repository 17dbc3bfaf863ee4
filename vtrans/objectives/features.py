"""Representation distillation for encoders without labels (sentence embedders such as all-MiniLM-L6-v2):
the compressed encoder learns to reproduce the dense one's token representations on plain text. The metric
is the cosine similarity between the compressed and the dense model's sentence embeddings (token states
mean-pooled over real tokens, as sentence-transformers pools) on held-out text: 1.0 is a perfect stand-in.
The hidden width stays, so the embeddings keep their size and their space."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoModel
from transformers.utils import cached_file

from vtrans import distributed
from vtrans.data import Sentences
from vtrans.objectives.base import PlainTextObjective


def mean_pool(token_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, S, H) token states -> (B, H) sentence embeddings: the mean over real tokens."""
    mask = attention_mask.unsqueeze(-1).to(token_states.dtype)
    return (token_states * mask).sum(1) / mask.sum(1).clamp(min=1)


ST_CONFIGS = ("sentence_bert_config.json", "config_sentence_transformers.json")


def _read(name: str, path: str) -> str | None:
    """A file of a local model directory or a Hub model (cached), or None if it has none."""
    found = cached_file(name, path, _raise_exceptions_for_missing_entries=False)
    return Path(found).read_text() if found else None


class FeatureDistillation(PlainTextObjective):
    name = "features"
    metric = "cosine"
    prunes_hidden = False

    def auto_class(self):
        return AutoModel

    def files_beside(self, name):
        """A sentence-transformers model's own files (its modules and their configs: pooling, normalisation),
        so that `SentenceTransformer(DIR, trust_remote_code=True)` pools the compressed encoder as it pooled
        the dense one."""
        modules = _read(name, "modules.json")
        if modules is None:  # a plain encoder
            return {}
        files = {"modules.json": modules}
        for path in ST_CONFIGS + tuple(f"{module['path']}/config.json" for module in json.loads(modules)
                                       if module["path"]):
            text = _read(name, path)
            if text is not None:
                files[path] = text
        return files

    def encode(self, data, teacher, max_length):
        return Sentences(data, teacher.processor, max_length)

    def outputs(self, model_output, attention_mask):
        return mean_pool(model_output.last_hidden_state, attention_mask)

    def head_outputs(self, adapter, last_hidden, attention_mask):
        return mean_pool(last_hidden, attention_mask)

    def task_loss(self, outputs, labels, attention_mask):
        return outputs.new_zeros(())  # no labels: distillation is the task

    def divergence(self, student, teacher, attention_mask, temperature):
        return 1 - F.cosine_similarity(student, teacher, dim=-1)

    def fisher_loss(self, model, batch):
        """The embedding projected on a random direction per example (fixed seed): the squared per-example
        gradient then estimates, in expectation, the summed squared sensitivity of every embedding dim to
        the unit. (The distillation loss itself has zero gradient at the dense model.)"""
        embedding = mean_pool(model(**batch).last_hidden_state, batch["attention_mask"])
        total, rows = distributed.rows(len(embedding))  # this rank's rows of the whole batch's directions
        directions = torch.randn((total, embedding.shape[1]), generator=torch.Generator().manual_seed(0))[rows]
        return (embedding * directions.to(embedding.device, embedding.dtype)).sum()

    @torch.inference_mode()
    def evaluate(self, model, loader, teacher, desc="evaluating"):
        model.eval()
        total, count = 0.0, 0
        for batch in tqdm(loader, desc=desc, leave=False):
            ours = mean_pool(model(**batch).last_hidden_state, batch["attention_mask"])
            dense = mean_pool(teacher(**batch).last_hidden_state, batch["attention_mask"])
            total += float(F.cosine_similarity(ours, dense, dim=-1).sum())
            count += len(ours)
        return {"cosine": total / count}
