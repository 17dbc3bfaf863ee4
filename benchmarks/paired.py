"""Is one compressed model more accurate than another, or is it noise? An exact McNemar test on the same
test examples: only the examples the two models disagree on count.

    python benchmarks/paired.py bench_out/models/vtrans-flops0.4 bench_out/models/fisher+recover-flops0.4

Uses the shared Rotten Tomatoes test split (../shared, see ../shared/ASSETS.md) unless --eval-data says
otherwise; 64 tokens per example, as benchmarks/methods.py. For images (`--objective image --image-size 56
--eval-data fashion-mnist/test-200`, as benchmarks/dinov2.py) the models' saved image processor prepares them.
Prints each model's accuracy, the discordant counts (A right and B wrong, and the reverse) and the two-sided
exact p-value.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from scipy.stats import binomtest  # noqa: E402

import vtrans  # noqa: E402
from vtrans.data import label_ids  # noqa: E402
from vtrans.objectives import objective_for  # noqa: E402
from vtrans.teacher import Teacher  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@torch.no_grad()
def correct(model_dir: Path, table, objective, options) -> torch.Tensor:
    """Per test example, whether the model at `model_dir` gets it right."""
    model = vtrans.load(model_dir)
    processor = objective.load_processor(str(model_dir), model.config, options)
    label_map = label_ids([table], model.config.label2id, model.config.num_labels)  # as compress maps them
    teacher = Teacher(model, processor, label_map, None)
    hits = []
    for batch in objective.encode(table, teacher, options.max_length).loader(64):
        labels = batch.pop("labels")
        hits.append(model(**batch).logits.argmax(-1) == labels)
    return torch.cat(hits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--eval-data", default=str(SHARED / "data" / "rotten_tomatoes" / "test.csv.gz"))
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--objective", default="classification", choices=["classification", "image"])
    parser.add_argument("--image-size", type=int)
    args = parser.parse_args()
    objective = objective_for(args.objective)
    table = objective.read(args.eval_data, split="validation")
    a, b = (correct(model_dir, table, objective, args) for model_dir in (args.a, args.b))
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    p = binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
    print(json.dumps({"a": str(args.a), "b": str(args.b), "examples": len(a), "accuracy_a": a.float().mean().item(),
                      "accuracy_b": b.float().mean().item(), "only_a_right": only_a, "only_b_right": only_b,
                      "mcnemar_exact_p": p}, indent=2))


if __name__ == "__main__":
    main()
