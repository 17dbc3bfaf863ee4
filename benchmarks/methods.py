"""Every method side by side on the shared MiniLM sentiment teacher: `vtrans bench` with the shared assets.

    python benchmarks/methods.py                                   # all methods at flops=0.6 and flops=0.4
    python benchmarks/methods.py --methods optin,random --targets flops=0.5

Uses the fine-tuned MiniLM and the fixed Rotten Tomatoes split in ../shared (see ../shared/ASSETS.md), so
figures compare across runs; 64 tokens per example. Any other `vtrans bench` option passes through.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vtrans.cli import main  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"

if __name__ == "__main__":
    sys.exit(main(["bench", str(SHARED / "models" / "minilm-l6-rt-sentiment"),
                   "--data", str(SHARED / "data" / "rotten_tomatoes" / "train.csv.gz"),
                   "--eval-data", str(SHARED / "data" / "rotten_tomatoes" / "test.csv.gz"),
                   "--max-length", "64", "--out", "bench_out", *sys.argv[1:]]))
