"""Sequence classification on labelled text (a `text` column, optional `text_pair`, a `label`): the task loss
is cross-entropy on the labels, the metric accuracy. A model without a trained head for the labels gets a
fine-tuned teacher first (vtrans.teacher)."""
from __future__ import annotations

import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification

from vtrans.data import Encoded, holdout_split, load_table
from vtrans.evaluate import predict_logits
from vtrans.objectives.base import Objective, kl_per_example


class Classification(Objective):
    name = "classification"
    metric = "accuracy"

    def auto_class(self):
        return AutoModelForSequenceClassification

    def load_teacher(self, name, train, evaluation, options, say=print):
        from vtrans.teacher import load_teacher

        return load_teacher(name, self, train, evaluation, options, say=say)

    def read(self, spec, split="train"):
        return load_table(spec, split)

    def holdout(self, data, fraction, seed):
        return holdout_split(data, fraction, seed)

    def encode(self, data, teacher, max_length):
        return Encoded(data, teacher.processor, teacher.label_map, max_length)

    def task_loss(self, logits, labels, attention_mask):
        return F.cross_entropy(logits, labels)

    def divergence(self, student, teacher, attention_mask, temperature):
        return kl_per_example(student, teacher, temperature)

    def evaluate(self, model, loader, teacher, desc="evaluating"):
        logits, labels = predict_logits(model, loader, desc)
        return {"accuracy": float((logits.argmax(-1) == labels).float().mean())}
