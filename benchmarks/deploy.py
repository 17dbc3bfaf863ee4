"""What a compressed classifier is worth once deployed: PyTorch vs ONNX Runtime, fp32 vs int8, dense vs compressed.

    python benchmarks/deploy.py bench_out/models/fisher+recover-flops0.4 --out deploy_out

Exports the shared dense MiniLM teacher and the compressed DIR to ONNX (`vtrans export --quantize int8`), then
on the shared Rotten Tomatoes test split (64 tokens, ../shared/ASSETS.md) gives each variant's accuracy, its
size on disk and its median latency at batch 32 x 64 and 1 x 64, all timed interleaved in this one process; the
paired McNemar p-value of int8 against fp32; and whether `from_pretrained(DIR, trust_remote_code=True)` gives
vtrans.load's logits.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from scipy.stats import binomtest  # noqa: E402
from transformers import AutoModelForSequenceClassification  # noqa: E402

import vtrans  # noqa: E402
from vtrans.data import Encoded, label_ids, load_table  # noqa: E402
from vtrans.deploy.onnx import export  # noqa: E402
from vtrans.latency import load_runner, measure, random_batch  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DENSE = SHARED / "models" / "minilm-l6-rt-sentiment"


def size_mb(directory: Path, name: str) -> float:
    return sum(path.stat().st_size for path in directory.glob(f"{name}*")) / 2**20


def hits(runner, loader) -> torch.Tensor:
    """Per test example, whether the runner's logits pick its label."""
    right = []
    for batch in loader:
        labels = batch.pop("labels")
        output = runner(batch)
        logits = torch.as_tensor(output[0]) if isinstance(output, list) else output.logits
        right.append(logits.argmax(-1) == labels)
    return torch.cat(right)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("compressed", type=Path)
    parser.add_argument("--out", type=Path, default=Path("deploy_out"))
    parser.add_argument("--max-length", type=int, default=64)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    exports = {"dense": args.out / "dense-onnx", "compressed": args.out / "compressed-onnx"}
    for source, target in ((DENSE, exports["dense"]), (args.compressed, exports["compressed"])):
        export(source, target, quantize="int8", overwrite=True)

    variants = {
        "dense torch": str(DENSE),
        "dense onnx fp32": str(exports["dense"] / "model.onnx"),
        "dense onnx int8": str(exports["dense"] / "model_int8.onnx"),
        "compressed torch": str(args.compressed),
        "compressed onnx fp32": str(exports["compressed"] / "model.onnx"),
        "compressed onnx int8": str(exports["compressed"] / "model_int8.onnx"),
    }
    runners = {name: load_runner(spec)[0] for name, spec in variants.items()}
    sizes = {"dense torch": size_mb(DENSE, "model.safetensors"),
             "compressed torch": size_mb(args.compressed, "model.safetensors")}
    for kind, directory in exports.items():
        sizes[f"{kind} onnx fp32"] = size_mb(directory, "model.onnx")
        sizes[f"{kind} onnx int8"] = size_mb(directory, "model_int8.onnx")

    table = load_table(str(SHARED / "data" / "rotten_tomatoes" / "test.csv.gz"), split="validation")
    tokenizer = vtrans.load_tokenizer(args.compressed)
    config = vtrans.load(args.compressed).config
    label_map = label_ids([table], config.label2id, config.num_labels)
    loader = Encoded(table, tokenizer, label_map, args.max_length).loader(64)
    correct = {name: hits(runner, loader) for name, runner in runners.items()}

    latency = {}
    for batch_size in (32, 1):
        times = measure(runners, random_batch(batch_size, args.max_length, config.vocab_size), repeats=20, warmup=3)
        latency[batch_size] = {name: statistics.median(t) for name, t in times.items()}

    fp32, int8 = correct["compressed onnx fp32"], correct["compressed onnx int8"]
    only_fp32, only_int8 = int((fp32 & ~int8).sum()), int((~fp32 & int8).sum())
    p_int8 = binomtest(only_fp32, only_fp32 + only_int8, 0.5).pvalue if only_fp32 + only_int8 else 1.0

    remote = AutoModelForSequenceClassification.from_pretrained(args.compressed, trust_remote_code=True).eval()
    batch = next(iter(loader))
    batch.pop("labels")
    with torch.no_grad():
        remote_difference = float((remote(**batch).logits - vtrans.load(args.compressed)(**batch).logits).abs().max())

    dense_32, dense_1 = latency[32]["dense torch"], latency[1]["dense torch"]
    lines = ["| variant | accuracy | size MB | ms, 32 x 64 | speedup | ms, 1 x 64 | speedup |",
             "|---|---|---|---|---|---|---|"]
    for name in variants:
        lines.append(f"| {name} | {correct[name].float().mean():.2%} | {sizes[name]:.1f} | "
                     f"{latency[32][name]:.1f} | {dense_32 / latency[32][name]:.2f}x | "
                     f"{latency[1][name]:.2f} | {dense_1 / latency[1][name]:.2f}x |")
    lines += ["",
              f"int8 vs fp32 (compressed, ONNX): {only_fp32} vs {only_int8} discordant, McNemar p = {p_int8:.3f}",
              "from_pretrained(DIR, trust_remote_code=True) vs vtrans.load(DIR): largest logit difference "
              f"{remote_difference:.1e}",
              f"{torch.get_num_threads()} PyTorch threads; variants timed interleaved in one process."]
    print("\n".join(lines))
    accuracy = {name: float(c.float().mean()) for name, c in correct.items()}
    record = {"accuracy": accuracy, "size_mb": sizes, "latency_ms": latency, "p_int8": p_int8,
              "remote_difference": remote_difference}
    (args.out / "deploy.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
