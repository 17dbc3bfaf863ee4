"""Every method side by side on the shipped MiniLM sentiment teacher, in one run on one machine.

    python benchmarks/methods.py                      # all methods at flops=0.6 and flops=0.4
    python benchmarks/methods.py --methods optin,random --targets flops=0.5

Uses the fine-tuned MiniLM and the fixed Rotten Tomatoes split in ../shared (see ../shared/ASSETS.md), so
figures compare across runs. Prints one markdown table (also written with the raw rows to --out).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import vtrans  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
COLUMNS = ("method", "target", "achieved FLOPs", "params", "accuracy", "compression s", "speedup")


def row_of(method: str, target: str, report: dict | None, error: str | None = None) -> dict:
    if report is None:
        return {"method": method, "target": target, "error": error}
    dense, small = report["dense"], report["compressed"]
    return {"method": method, "target": target,
            "achieved_flops": small["flops"] / dense["flops"], "params": small["params"],
            "dense_params": dense["params"], "accuracy": small["metric"]["accuracy"],
            "dense_accuracy": dense["metric"]["accuracy"], "compression_seconds": report["compression_seconds"],
            "speedup": report["speedup"], "latency_ms": small["latency_ms"], "dense_latency_ms": dense["latency_ms"],
            "latency_setting": report["latency_setting"], "kept": report["kept"]}


def line(r: dict) -> str:
    if "error" in r:
        return f"| {r['method']} | {r['target']} | failed: {r['error']} | | | | |"
    return (f"| {r['method']} | {r['target']} | {r['achieved_flops']:.4f} | {r['params'] / 1e6:.2f}M | "
            f"{100 * r['accuracy']:.2f}% | {r['compression_seconds']:.0f} | {r['speedup']:.2f}x |")


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)] + [line(r) for r in rows]
    done = [r for r in rows if "error" not in r]
    if done:
        r = done[0]
        lines.append(f"| dense | - | 1.0000 | {r['dense_params'] / 1e6:.2f}M | {100 * r['dense_accuracy']:.2f}% "
                     f"| - | 1.00x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(SHARED / "models" / "minilm-l6-rt-sentiment"))
    parser.add_argument("--data", default=str(SHARED / "data" / "rotten_tomatoes" / "train.csv.gz"))
    parser.add_argument("--eval-data", default=str(SHARED / "data" / "rotten_tomatoes" / "test.csv.gz"))
    parser.add_argument("--methods", default="vtrans,fast-vtrans,faster-vtrans,optin,random")
    parser.add_argument("--targets", default="flops=0.6,flops=0.4")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--out", default="bench_out")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for target in args.targets.split(","):
            for method in args.methods.split(","):
                try:
                    result = vtrans.compress(args.model, args.data, eval_data=args.eval_data, target=target,
                                             method=method, out=Path(scratch) / f"{method}-{target}",
                                             max_length=args.max_length)
                    rows.append(row_of(method, target, result.report))
                except Exception as e:  # noqa: BLE001 - one failed method must not stop the others
                    traceback.print_exc()
                    rows.append(row_of(method, target, None, f"{type(e).__name__}: {e}"))
                print(line(rows[-1]), flush=True)
                (out / "results.json").write_text(json.dumps(rows, indent=2))
    table = markdown(rows)
    (out / "results.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
