"""Choosing a kept set from per-unit importance scores of heads and FFN neurons (OPTIN, Fisher, magnitude).

Scores are additive: the cost of a kept set is the total score of the units it removes. Heads and neurons
differ in size, so a single ranking would not do; instead every split is tried: for each number of kept
heads (best first), the rest of the budget goes to the best neurons (Kwon et al. 2022's mask search, which
OPTIN also uses). The hidden dimension and whole blocks stay.
"""
from __future__ import annotations

import torch

from vtrans.arch import Adapter, Kept
from vtrans.budget import Budget, dense_cost, exact_cost, select_kept


def search_kept(adapter: Adapter, budget: Budget, scores: dict[str, torch.Tensor]) -> Kept:
    """For each number of kept heads, fill the rest of the budget with the best neurons; keep the split that
    removes the least total score, then let `select_kept` bring it within the budget's tolerance."""
    dims = adapter.dims()
    seq = budget.seq_len
    dense = dense_cost(adapter, seq)
    target = budget.fraction(dense) * budget.of(dense)
    every = list(range(dims.hidden))
    head_scores, head_rank = scores["heads"].flatten().sort(descending=True)
    neuron_scores, neuron_rank = scores["ffn"].flatten().sort(descending=True)
    head_order = [divmod(int(u), dims.heads) for u in head_rank]
    neuron_order = [divmod(int(u), dims.ffn) for u in neuron_rank]
    # kept_score[n] = total score of the n best units
    kept_heads_score = torch.cat([torch.zeros(1), head_scores.cumsum(0)])
    kept_neurons_score = torch.cat([torch.zeros(1), neuron_scores.cumsum(0)])
    no_ffn = [[] for _ in range(dims.layers)]
    one_neuron = [[0]] + [[] for _ in range(dims.layers - 1)]
    per_neuron = (budget.of(exact_cost(adapter, Kept(every, no_ffn, one_neuron), seq))
                  - budget.of(exact_cost(adapter, Kept(every, no_ffn, no_ffn), seq)))  # hidden is fixed
    best = None
    for n_heads in range(len(head_order) + 1):
        heads = [[] for _ in range(dims.layers)]
        for layer, head in head_order[:n_heads]:
            heads[layer].append(head)
        base = budget.of(exact_cost(adapter, Kept(every, heads, no_ffn), seq))
        if base > target:
            break
        n_neurons = min(len(neuron_order), int((target - base) // per_neuron))
        removed = (kept_heads_score[-1] - kept_heads_score[n_heads]
                   + kept_neurons_score[-1] - kept_neurons_score[n_neurons])
        if best is None or removed < best[0]:
            best = (float(removed), n_heads, n_neurons)
    keep = {name: torch.zeros(shape, dtype=torch.bool) for name, shape in dims.mask_shapes().items()}
    keep["hidden"][:] = keep["attention"][:] = keep["ffn_block"][:] = True
    _, n_heads, n_neurons = best
    for layer, head in head_order[:n_heads]:
        keep["heads"][layer, head] = True
    for layer, unit in neuron_order[:n_neurons]:
        keep["ffn"][layer, unit] = True
    return select_kept(adapter, keep_structure_of(scores, dims), budget, keep)


def keep_structure_of(scores: dict[str, torch.Tensor], dims) -> dict[str, torch.Tensor]:
    """Rankings for `select_kept` from head and neuron scores alone: the hidden dims and whole blocks, which
    are not scored, rank above everything and so stay."""
    fixed = float("inf")
    return {"hidden": torch.full((dims.hidden,), fixed), "attention": torch.full((dims.layers,), fixed),
            "ffn_block": torch.full((dims.layers,), fixed), "heads": scores["heads"], "ffn": scores["ffn"]}


def score_log(scores: dict[str, torch.Tensor]) -> list[dict]:
    """The scores as rows of training_log.json."""
    return [{"phase": "score", "group": g, "layer": i, "scores": row.tolist()}
            for g, s in scores.items() for i, row in enumerate(s)]
