"""Objectives: what the compressed model is for, and so how it is loaded, fed, trained and judged.

`classification` (labelled text, the default), `lm` (plain text: next-token prediction, perplexity) and
`features` (plain text, no labels: an encoder's representations, cosine similarity of sentence embeddings),
`image` (labelled images: a vision transformer's classifier, accuracy).
"""
from __future__ import annotations

from vtrans.errors import UsageError
from vtrans.objectives.base import Objective
from vtrans.objectives.classification import Classification
from vtrans.objectives.features import FeatureDistillation
from vtrans.objectives.image_classification import ImageClassification
from vtrans.objectives.language_model import LanguageModelling

OBJECTIVES: dict[str, Objective] = {
    "classification": Classification(),
    "lm": LanguageModelling(),
    "features": FeatureDistillation(),
    "image": ImageClassification(),
}


def objective_for(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise UsageError(f"--objective {name} is unknown; choose one of: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]


__all__ = ["OBJECTIVES", "Objective", "objective_for"]
