"""Measured latency: forward passes of several models on the same random batch, timed interleaved (model A,
model B, model A, ...) so that whatever else loads the machine slows all of them alike.

A model is a PyTorch model (a Hub name or checkpoint, or a directory written by vtrans) or an ONNX file run by
onnxruntime (a .onnx path, or a directory written by `vtrans export`).
"""
from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from vtrans.errors import UsageError

Runner = Callable[[dict[str, torch.Tensor]], object]  # one forward pass on a batch of input_ids, attention_mask


def torch_runner(model: torch.nn.Module) -> Runner:
    model.eval()

    @torch.inference_mode()
    def run(inputs):
        return model(**inputs)
    return run


def onnx_runner(path: Path) -> Runner:
    from vtrans.deploy.onnx import onnx_session

    session = onnx_session(path)
    names = {node.name for node in session.get_inputs()}

    def run(inputs):
        return session.run(None, {name: tensor.numpy() for name, tensor in inputs.items() if name in names})
    return run


def random_batch(batch_size: int, seq_len: int, vocab_size: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, vocab_size, (batch_size, seq_len), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def measure(runners: dict[str, Runner], batch_size: int, seq_len: int, vocab_size: int, repeats: int = 10,
            warmup: int = 2) -> dict[str, list[float]]:
    """Milliseconds per forward pass of each runner, `repeats` times each, interleaved, after `warmup` passes."""
    inputs = random_batch(batch_size, seq_len, vocab_size)
    for run in runners.values():
        for _ in range(warmup):
            run(inputs)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            start = time.perf_counter()
            run(inputs)
            times[name].append(1000 * (time.perf_counter() - start))
    return times


def latency_ms(models: dict[str, torch.nn.Module], batch_size: int = 32, seq_len: int = 64, repeats: int = 10,
               vocab_size: int = 1000) -> dict[str, float]:
    """Median forward time of each PyTorch model (what a compression report records)."""
    runners = {name: torch_runner(model) for name, model in models.items()}
    times = measure(runners, batch_size, seq_len, vocab_size, repeats)
    return {name: statistics.median(t) for name, t in times.items()}


def load_runner(spec: str) -> tuple[Runner, int]:
    """(runner, vocabulary size) for a model given as on the command line."""
    path = Path(spec)
    onnx_file = path if path.suffix == ".onnx" else path / "model.onnx"
    if onnx_file.is_file():
        config = onnx_file.parent / "config.json"
        if not config.is_file():
            raise UsageError(f"{spec}: no config.json beside {onnx_file.name}; export it with vtrans export")
        return onnx_runner(onnx_file), json.loads(config.read_text())["vocab_size"]
    if (path / "config.json").is_file() and "vtrans" in json.loads((path / "config.json").read_text()):
        from vtrans.surgery import load

        model = load(path)
    else:
        import transformers

        from vtrans.teacher import load_config

        config = load_config(spec)
        model = getattr(transformers, config.architectures[0]).from_pretrained(spec, dtype=torch.float32)
    return torch_runner(model), model.config.vocab_size


def compare(specs: list[str], batch_sizes: list[int], seq_lens: list[int], repeats: int = 10,
            warmup: int = 2) -> list[dict]:
    """One row per (batch size, sequence length): each model's median and range in ms, and its speedup over the
    first model."""
    if len(set(specs)) < len(specs):
        raise UsageError("the same model is named twice; compare different models")
    loaded = {spec: load_runner(spec) for spec in specs}
    runners = {spec: runner for spec, (runner, _) in loaded.items()}
    vocab_size = min(vocab for _, vocab in loaded.values())
    rows = []
    for batch_size in batch_sizes:
        for seq_len in seq_lens:
            times = measure(runners, batch_size, seq_len, vocab_size, repeats, warmup)
            first = statistics.median(times[specs[0]])
            rows.append({"batch": batch_size, "seq_len": seq_len, "threads": torch.get_num_threads(), "models": {
                spec: {"median_ms": statistics.median(t), "min_ms": min(t), "max_ms": max(t),
                       "speedup": first / statistics.median(t)} for spec, t in times.items()}})
    return rows


def markdown(rows: list[dict]) -> str:
    specs = list(rows[0]["models"])
    lines = ["| batch x tokens | " + " | ".join(f"{spec} ms" for spec in specs) + " |",
             "|---|" + "---|" * len(specs)]
    for row in rows:
        cells = [f"{m['median_ms']:.1f} ({m['min_ms']:.1f}-{m['max_ms']:.1f})"
                 + (f", {m['speedup']:.2f}x" if i else "") for i, m in enumerate(row["models"].values())]
        lines.append(f"| {row['batch']} x {row['seq_len']} | " + " | ".join(cells) + " |")
    lines += ["", f"Median (min-max) over the repeats, models interleaved; {rows[0]['threads']} PyTorch threads; "
              "speedup against the first model."]
    return "\n".join(lines)
