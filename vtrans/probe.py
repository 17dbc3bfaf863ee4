"""Attention probing: where each head of the dense model looks, and whether the pruned heads look elsewhere.

The VTrans paper explains its pruning this way: heads that attend mostly to special tokens ([CLS], [SEP],
BOS) and to the current token are pruned first; kept heads attend to task words. For every head, over real
(non-padding) query tokens of a data sample, each query's attention is split into four disjoint shares:
  special   keys that are special tokens (the diagonal of a special token counts here)
  current   the query's own position (the diagonal), when it is not a special token
  previous  the position just before, when it is not a special token
  rest      everything else
plus the entropy of the attention (nats). With a compressed model, the test of the claim: do pruned heads
put more mass on special + current tokens than kept heads? (means, and a one-sided Mann-Whitney U test).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from scipy.stats import mannwhitneyu
from tqdm.auto import tqdm
from transformers import AutoModel

from vtrans import plots
from vtrans.data import Sentences, Text, load_text
from vtrans.errors import UsageError
from vtrans.surgery import atomic_directory, check_output_dir
from vtrans.teacher import default_model_path, load_config, load_tokenizer, quiet_transformers

SHARES = ("special", "current", "previous", "rest")
MEASURES = SHARES + ("entropy",)
CLAIM = ("special", "current", "special+current")  # the measures the paper's claim is about


def batch_measures(attentions, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   special_ids: list[int]) -> dict[str, torch.Tensor]:
    """Per-head sums over the batch's real query tokens ({measure: (layers, heads)}) and their count.

    `attentions`: one (batch, heads, seq, seq) tensor per layer, rows summing to 1 over real keys."""
    real = attention_mask.bool()  # (B, S)
    special = torch.isin(input_ids, torch.tensor(special_ids, dtype=input_ids.dtype)) & real
    plain = (~special).float()
    sums = {name: [] for name in MEASURES}
    for att in attentions:
        att = att.float()
        shares = {"special": (att * special[:, None, None, :]).sum(-1),  # (B, H, S)
                  "current": att.diagonal(dim1=-2, dim2=-1) * plain[:, None, :]}
        previous = att.diagonal(offset=-1, dim1=-2, dim2=-1) * plain[:, None, :-1]  # query q -> key q-1
        shares["previous"] = torch.nn.functional.pad(previous, (1, 0))
        shares["rest"] = 1 - shares["special"] - shares["current"] - shares["previous"]
        shares["entropy"] = -(att * att.clamp(min=1e-12).log()).sum(-1)
        for name, value in shares.items():
            sums[name].append((value * real[:, None, :]).sum((0, 2)))
    return {name: torch.stack(rows) for name, rows in sums.items()} | {"count": real.sum()}


def kept_heads_of(compressed: Path, layers: int, heads: int) -> np.ndarray:
    """(layers, heads) booleans: which (query) heads of the dense model the compressed model in DIR keeps. With
    grouped-query attention the report lists KV heads; each keeps its group of query heads."""
    path = Path(compressed) / "report.json"
    if not path.is_file():
        raise UsageError(f"--compressed {compressed}: no report.json; give a directory written by vtrans compress")
    report = json.loads(path.read_text())
    kept_heads = report.get("kept_units", {}).get("heads")
    if kept_heads is None:
        raise UsageError(f"--compressed {compressed}: report.json has no kept_units (written by an older vtrans); "
                         "compress again")
    dense = report["dense_kept"]["layers"]
    group = report["dense_kept"].get("query_heads_per_kv_head", 1)
    if len(dense) != layers or dense[0]["heads"] * group != heads:
        raise UsageError(f"--compressed {compressed} was cut from a model with {len(dense)} layers x "
                         f"{dense[0]['heads'] * group} heads, but MODEL has {layers} x {heads}: give the model it "
                         "came from")
    kept = np.zeros((layers, heads // group, group), dtype=bool)
    for i, row in enumerate(kept_heads):
        kept[i, row] = True
    return kept.reshape(layers, heads)


def claim_test(measures: dict[str, np.ndarray], kept: np.ndarray) -> dict:
    """Pruned vs kept heads on each claim measure: means, Mann-Whitney U, one-sided p (pruned > kept)."""
    out = {}
    for name in CLAIM:
        values = measures["special"] + measures["current"] if name == "special+current" else measures[name]
        pruned_values, kept_values = values[~kept], values[kept]
        row = {"pruned_mean": float(pruned_values.mean()) if pruned_values.size else None,
               "kept_mean": float(kept_values.mean()) if kept_values.size else None,
               "pruned_heads": int(pruned_values.size), "kept_heads": int(kept_values.size)}
        if pruned_values.size and kept_values.size:
            test = mannwhitneyu(pruned_values, kept_values, alternative="greater")
            row |= {"u": float(test.statistic), "p_value": float(test.pvalue),
                    # probability that a random pruned head scores above a random kept head
                    "effect": float(test.statistic) / (pruned_values.size * kept_values.size)}
        out[name] = row
    return out


def received_attention(attentions, real: torch.Tensor, heads: np.ndarray) -> torch.Tensor:
    """Attention each key token receives, averaged over real queries and over the (layer, head) pairs in
    `heads`; one example: returns (seq,)."""
    total, n = torch.zeros(real.shape[-1]), 0
    for layer, head in zip(*np.nonzero(heads)):
        att = attentions[layer][0, head]  # (S, S)
        total += (att * real[:, None]).sum(0) / real.sum()
        n += 1
    return total / max(n, 1)


def probe(model: str | None, data: str | None, out: str | Path | None = None, compressed: str | Path | None = None,
          samples: int = 256, examples: int = 4, max_length: int = 128, batch_size: int = 32, seed: int = 0,
          overwrite: bool = False, say=print) -> dict:
    """Probe MODEL's heads on a seeded random sample of the texts in DATA (labels, if any, unused); write
    probe.json and PNGs to `out` (default COMPRESSED/probe with a compressed model, else vtrans-probe)."""
    from vtrans.data import DEMO_TEST, demo_path

    out = Path(out) if out else (Path(compressed) / "probe" if compressed else Path("vtrans-probe"))
    check_output_dir(out, overwrite)
    name = model or default_model_path()
    load_config(name)  # a supported family, or a clear error
    data = data or demo_path(DEMO_TEST)
    text = load_text(data)  # any text: a classification table's text column, or plain text
    if samples < len(text):
        text = Text(sorted(random.Random(seed).sample(text.documents, samples), key=text.documents.index), data)
    tokenizer = load_tokenizer(name)
    with quiet_transformers():  # a classifier checkpoint loaded as a bare encoder: its head is unused, say nothing
        encoder = AutoModel.from_pretrained(name, attn_implementation="eager").eval()  # eager: returns attentions
    config = encoder.config
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    kept = kept_heads_of(Path(compressed), layers, heads) if compressed else None
    encoded = Sentences(text, tokenizer, max_length)
    # structural tokens only: padding gets no attention and [UNK] stands for a real word
    special_ids = sorted(set(tokenizer.all_special_ids) - {tokenizer.pad_token_id, tokenizer.unk_token_id})

    totals, count = None, 0
    with torch.no_grad():
        for batch in tqdm(encoded.loader(batch_size), desc="probing attention", dynamic_ncols=True):
            output = encoder(**batch, output_attentions=True)
            sums = batch_measures(output.attentions, batch["input_ids"], batch["attention_mask"], special_ids)
            count += int(sums.pop("count"))
            totals = sums if totals is None else {k: totals[k] + v for k, v in sums.items()}
    measures = {k: (v / count).numpy() for k, v in totals.items()}

    result = {"model": model or "all-MiniLM-L6-v2", "data": data, "samples": len(text), "query_tokens": count,
              "special_tokens": tokenizer.convert_ids_to_tokens(special_ids),
              "measures": {k: v.round(5).tolist() for k, v in measures.items()}}
    if kept is not None:
        result |= {"compressed": str(compressed), "kept_heads": kept.tolist(), "claim": claim_test(measures, kept),
                   "examples": example_view(encoder, tokenizer, text, kept, examples, max_length)}
    with atomic_directory(out, overwrite) as tmp:
        (tmp / "probe.json").write_text(json.dumps(result, indent=2))
        pruned = ~kept if kept is not None else None
        titles = {"special": "attention mass on special tokens", "current": "attention mass on the current token",
                  "previous": "attention mass on the previous token", "rest": "attention mass on other tokens",
                  "entropy": "attention entropy (nats)"}
        for measure in MEASURES:
            plots.layer_head_heatmap(measures[measure], titles[measure], tmp / f"{measure}.png", pruned,
                                     vmax=None if measure == "entropy" else 1.0)
        if kept is not None and result["examples"]:
            plots.example_attention(result["examples"], tmp / "examples.png")
    say(f"vtrans probe: {len(text)} examples, {count} query tokens; probe.json and PNGs in {out}")
    return result


@torch.no_grad()
def example_view(encoder, tokenizer, text: Text, kept: np.ndarray, count: int, max_length: int) -> list[dict]:
    """For the first `count` examples: attention each token receives from kept vs pruned heads, top words."""
    views = []
    for document in text.documents[:count]:
        batch = tokenizer(document, truncation=True, max_length=max_length, return_tensors="pt")
        attentions = encoder(**batch, output_attentions=True).attentions
        real = batch["attention_mask"][0].float()
        tokens = tokenizer.convert_ids_to_tokens(batch["input_ids"][0])
        view = {"text": document, "tokens": tokens}
        for name, heads in (("kept", kept), ("pruned", ~kept)):
            received = received_attention(attentions, real, heads)
            view[name] = received.round(decimals=5).tolist()
            top = received.argsort(descending=True)[:5].tolist() if heads.any() else []
            view[f"{name}_top"] = [[tokens[t], round(float(received[t]), 4)] for t in top]
        views.append(view)
    return views
